"""study.yaml -> the list of runs of a study, each a validated run config with a stable id.

A study file (see configs/studies/ for complete examples):

    name: quickstart
    datasets:                      # prepared into STUDY_DIR/data/<name> (or `path:` to a prepared one)
      shakespeare: {source: builtin:tinyshakespeare, tokenizer: bpe, vocab_size: 4096}
    base:                          # a run config (smallscale train) without `out` and `data.path`
      model: {preset: cpu-2m, position: rope}
      optim: {name: adamw, lr: 2.0e-3}
      train: {global_batch_tokens: 8192, micro_batch: 16}
    grids:                         # the union of these blocks; runs shared by two blocks run once
      - grid: {model.preset: [cpu-500k, cpu-2m, cpu-6m], tokens: [250000, 500000]}
      - grid: {model.position: [rope, learned], train.seed: [0, 1]}
        set: {model.preset: cpu-2m, tokens: 500000}
      - zip: {optim.name: [lion, lamb], optim.lr: [3.0e-4, 1.0e-2]}
    derive:                        # evaluated in order, after the axes; names: axes, params, ...
      train.tokens: tokens
      data.token_budget: tokens
    evals: [heldout, {task: blimp, limit: 10}, {task: length_extrapolation, options: {factors: [1, 2, 4]}}]

An axis key is a dotted run-config path (`model.position`, `optim.lr`, `train.seed`) or a bare
name: a variable for `derive` expressions (`tokens`, `k`), or `dataset` (a key of `datasets`).
`grid` takes the Cartesian product of its lists, `zip` pairs its lists element by element, and a
block with both takes the product of the two; `set` fixes values for that block only.

Derived values are arithmetic over the variables: every axis value (by its bare name, and by its
last path component, e.g. `position`), `params` and `non_embedding_params` (exact counts for the
run's model and the dataset's vocabulary), `seq_len`, `vocab_size`, `n_layer`, `d_model`, and
`dataset_tokens` (the dataset's train tokens). Example: `train.tokens: 20 * params` (Chinchilla's
20 tokens per parameter), `data.token_budget: min(train_tokens, dataset_tokens)` (more than one
epoch where the data runs out; `train_tokens` is the derived `train.tokens` above it).

A run is identified by the sha256 of its resolved config (without `out`); its id (directory name) is
a readable slug of its axis values plus 8 hex digits of that hash. A run reached from two blocks runs
once, and a run whose directory exists keeps it, so an unchanged run is never redone when the file
changes.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from smallscale.config import Strict, deep_merge, read_yaml, validate
from smallscale.errors import UserError


class DatasetSpec(Strict):
    """A dataset of the study: `path` to a prepared dataset, or `source` (+ prepare options)."""

    model_config = {"extra": "allow"}  # every `smallscale data prepare` option (PrepareConfig fields)
    path: str | None = None
    source: str | None = None


class EvalSpec(Strict):
    task: str
    name: str | None = Field(None, description="result name (eval/<name>.json); default: the task")
    limit: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    options: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return self.name or self.task


class Block(Strict):
    grid: dict[str, list[Any]] = {}
    zip: dict[str, list[Any]] = {}
    set: dict[str, Any] = {}


class ExecutorSpec(Strict):
    kind: str = "local"  # local | pool | slurm (see executors.py)
    workers: int | None = Field(None, gt=0)
    slurm: dict[str, Any] = {}  # submitit parameters, e.g. {partition: gpu, gpus_per_node: 1, timeout_min: 240}


class StudySpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    datasets: dict[str, DatasetSpec]
    dataset: str | None = Field(None, description="the default dataset (required when there are several)")
    base: dict[str, Any] = {}
    grids: list[Block] = []
    grid: dict[str, list[Any]] = {}
    zip: dict[str, list[Any]] = {}
    derive: dict[str, str | int | float] = {}
    evals: list[str | EvalSpec] = []
    executor: ExecutorSpec = ExecutorSpec()
    expected: dict[str, Any] = {}  # free-form notes (e.g. expected GPU-hours), copied to the report

    def blocks(self) -> list[Block]:
        top = [Block(grid=self.grid, zip=self.zip)] if (self.grid or self.zip) else []
        return [*self.grids, *top] or [Block()]

    def eval_specs(self) -> list[EvalSpec]:
        return [EvalSpec(task=e) if isinstance(e, str) else e for e in self.evals]


@dataclass
class RunSpec:
    id: str
    axes: dict[str, Any]  # axis name -> value, as written in the study file
    config: dict[str, Any]  # the validated run config (RunConfig), as plain data
    dataset: str
    evals: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "axes": self.axes, "dataset": self.dataset, "config": self.config, "evals": self.evals}


def load_study(path: str | Path) -> StudySpec:
    spec = validate(StudySpec, read_yaml(path), source=str(path))
    for block in spec.blocks():
        lengths = {k: len(v) for k, v in block.zip.items()}
        if len(set(lengths.values())) > 1:
            raise UserError(f"{path}: zip lists must have equal lengths, got {lengths}")
        for key, values in {**block.grid, **block.zip}.items():
            if not values:
                raise UserError(f"{path}: axis {key!r} has no values")
    if spec.dataset is None and len(spec.datasets) > 1 and not any(
        "dataset" in {**b.grid, **b.zip, **b.set} for b in spec.blocks()
    ):
        raise UserError(f"{path}: several datasets; set `dataset:` (the default) or make `dataset` an axis")
    for name, ds in spec.datasets.items():
        if (ds.path is None) == (ds.source is None):
            raise UserError(f"{path}: dataset {name!r} needs exactly one of `path` (prepared) or `source`")
    return spec


def dataset_dir(study_dir: Path, name: str, ds: DatasetSpec) -> Path:
    return Path(ds.path).resolve() if ds.path else (study_dir / "data" / name).resolve()


# ----------------------------------------------------------------------------- expansion
def block_points(block: Block) -> list[dict[str, Any]]:
    """The axis assignments of one block: product(grid) x zip-rows, each merged with `set`."""
    grid_keys = list(block.grid)
    grid_rows = [dict(zip(grid_keys, values, strict=True)) for values in itertools.product(*block.grid.values())]
    n_zip = len(next(iter(block.zip.values()))) if block.zip else 1
    zip_rows = [{k: v[i] for k, v in block.zip.items()} for i in range(n_zip)] if block.zip else [{}]
    return [{**block.set, **g, **z} for g in grid_rows for z in zip_rows]


def expand(
    spec: StudySpec, study_dir: Path, vocab_sizes: dict[str, int], dataset_tokens: dict[str, int] | None = None
) -> list[RunSpec]:
    """Every run of the study, in file order, duplicates (same resolved config) removed.

    `vocab_sizes` maps dataset name -> vocabulary size (from its manifest), needed for the exact
    parameter counts that derived values may use and for validating model shapes.
    `dataset_tokens` (train-split tokens per dataset) is the variable `dataset_tokens` of derived
    values, e.g. `min(20 * params, dataset_tokens)`; unknown (not prepared yet) reads as unlimited.
    """
    from smallscale.train.trainer import RunConfig

    runs: dict[str, RunSpec] = {}
    axis_names = _axis_order(spec)
    for point in (p for block in spec.blocks() for p in block_points(block)):
        dataset = point.get("dataset", spec.dataset or next(iter(spec.datasets)))
        if dataset not in spec.datasets:
            raise UserError(f"study {spec.name}: dataset {dataset!r} is not one of {', '.join(spec.datasets)}")
        config = copy.deepcopy(spec.base)
        config.pop("out", None)
        for key, value in point.items():
            if "." in key:
                config = deep_merge(config, _nested(key, value))
        extra = {"dataset_tokens": (dataset_tokens or {}).get(dataset, 2**62)}
        variables = {**_variables(point, config, vocab_sizes[dataset]), **extra}
        derived: dict[str, Any] = {}
        for key, expr in spec.derive.items():  # in file order: a later value may use an earlier one
            derived[key] = evaluate(expr, variables) if isinstance(expr, str) else expr
            config = deep_merge(config, _nested(key, derived[key]))
            variables = {**_variables({**point, **derived}, config, vocab_sizes[dataset]), **extra}
        config = deep_merge(config, {"data": {"path": str(dataset_dir(study_dir, dataset, spec.datasets[dataset]))},
                                     "out": "<study>"})  # fmt: skip
        resolved = canonical(validate(RunConfig, config, source=f"study {spec.name}, run {point}"), vocab_sizes[dataset])
        axes = {name: point[name] for name in axis_names if name in point}
        if "dataset" not in axes and len(spec.datasets) > 1:
            axes["dataset"] = dataset
        digest = config_digest(resolved)
        if digest in runs:  # the same run reached from another block: one run, all its axis values
            runs[digest].axes = {**axes, **runs[digest].axes}
            continue
        run_id = _existing_id(study_dir, digest) or make_id(axes, digest)
        resolved["out"] = str((study_dir / "runs" / run_id).resolve())
        evals = [e.model_dump() for e in spec.eval_specs()]
        runs[digest] = RunSpec(id=run_id, axes=axes, config=resolved, dataset=dataset, evals=evals)
    return list(runs.values())


def canonical(cfg: Any, vocab_size: int) -> dict[str, Any]:
    """The run config with every default made explicit (model shape from its preset, the optimizer's
    own defaults), without `out`: two spellings of one run resolve to the same dict."""
    from dataclasses import asdict

    shape = asdict(cfg.model.build(vocab_size))
    model = {k: shape[k] if k in shape else v for k, v in cfg.model.model_dump().items()}
    data = cfg.model_copy(update={"optim": cfg.optim.resolved()}).model_dump(mode="json")
    data["model"] = model
    data.pop("out")
    return data


def config_digest(resolved: dict[str, Any]) -> str:
    """8 hex digits of the sha256 of the resolved run config (without `out`): the run's identity."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]


def _existing_id(study_dir: Path, digest: str) -> str | None:
    """A run directory already made for this config keeps its name, whatever the axes now read."""
    found = sorted((study_dir / "runs").glob(f"*{digest}")) if (study_dir / "runs").is_dir() else []
    return found[0].name if found else None


def _axis_order(spec: StudySpec) -> list[str]:
    names: list[str] = []
    for block in spec.blocks():
        for key in (*block.grid, *block.zip, *block.set):
            if key not in names:
                names.append(key)
    return names


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _variables(point: dict[str, Any], config: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    from smallscale.model.gpt import GPT
    from smallscale.train.trainer import ModelSection

    variables: dict[str, Any] = {}
    for key, value in point.items():
        variables[key.replace(".", "_")] = value
        variables.setdefault(key.rsplit(".", 1)[-1], value)
    try:
        model_cfg = validate(ModelSection, config.get("model", {}), source="model").build(vocab_size)
    except UserError:
        return variables  # the run's own validation reports the problem
    import torch

    with torch.device("meta"):  # exact counts without allocating the weights
        model = GPT(model_cfg)
    variables.update(
        params=model.num_params(), non_embedding_params=model.num_params(non_embedding=True), vocab_size=vocab_size,
        seq_len=model_cfg.seq_len, n_layer=model_cfg.n_layer, d_model=model_cfg.d_model,
    )  # fmt: skip
    return variables


def make_id(axes: dict[str, Any], digest: str) -> str:
    """e.g. `cpu-2m.tokens250k.rope.seed1-1a2b3c4d`: numbers carry their axis name, text stands alone."""
    parts = [_short(v) if isinstance(v, str) else f"{k.rsplit('.', 1)[-1]}{_short(v)}" for k, v in axes.items()]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", ".".join(parts)).strip(".-")[:80]
    return f"{slug}-{digest}" if slug else digest


def _short(value: Any) -> str:
    """500000 -> 500k, 2500000 -> 2.5M, 8192 -> 8192, 0.002 -> 0.002, True -> True."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if float(value).is_integer():
        v = int(value)
        for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
            if abs(v) >= scale and v % (scale // 100) == 0:  # at most two decimals
                return f"{v / scale:g}{unit}"
        return str(v)
    return f"{value:g}"


# ----------------------------------------------------------------------------- derived values
# A dozen lines of AST walking instead of eval(): study files may come from anyone, and only
# arithmetic on known names is needed (no attribute access, calls other than these, or imports).
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}  # fmt: skip
_FUNCTIONS = {"int": int, "round": round, "min": min, "max": max, "ceil": math.ceil, "floor": math.floor}


def evaluate(expr: str, variables: dict[str, Any]) -> Any:
    """Evaluate an arithmetic expression such as `20 * params` or `ceil(tokens / 8192) * 8192`."""

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in variables:
                raise UserError(f"derived value {expr!r}: unknown name {node.id!r}; known: {', '.join(sorted(variables))}")
            return variables[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
            return _FUNCTIONS[node.func.id](*(walk(a) for a in node.args))
        raise UserError(f"derived value {expr!r}: only arithmetic, names and {', '.join(_FUNCTIONS)} are allowed")

    try:
        value = walk(ast.parse(str(expr), mode="eval"))
    except SyntaxError:
        raise UserError(f"derived value {expr!r} is not an arithmetic expression") from None
    return int(value) if isinstance(value, float) and value.is_integer() else value


def spec_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
