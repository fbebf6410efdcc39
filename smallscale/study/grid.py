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

A dataset may be a weighted mixture of other datasets of the study (`smallscale/data/mixture.py`):

    datasets:
      wiki: {source: builtin:wikitext2}                    # a mixture source: its `source:` + prepare options
      stories: {source: builtin:tinystories}
      mixed: {mix: {sources: {wiki: 0.5, stories: 0.5}, tokenizer: bpe, vocab_size: 4096}}
      wiki-only: {mix: {sources: {wiki: 1}, tokenizer: bpe, vocab_size: 4096}}

`mix:` holds the weights by source name and the mixture's own options (`tokenizer`, `vocab_size`,
`tokenizer_train_bytes`, `train_tokens`, `shard_tokens`); each source keeps its prepare options
(`split_by`, `val_fraction`, `seed`, ...). A dataset named by some `mix` is a mixture source: it is
prepared only inside each mixture (with that mixture's tokenizer, into STUDY_DIR/data/<mix>/sources/)
and no run may train on it alone; a one-source mixture trains on one source with the same held-out
documents as every mixture that contains it (eval task `heldout_sources`).

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

Repetition (limited data) is a first-class pair of bare axes: `unique_tokens` (the data budget U)
and `epochs` (passes over it). A run with both gets `data.token_budget = unique_tokens` and
`train.tokens = round(unique_tokens * epochs)`, unless `derive` sets those keys (derive runs after
the axes, so its values win). The two go together: one without the other is an error. Example
(the first blocks of configs/studies/repetition.yaml; blocks cap the largest runs):

    grids:
      - grid: {model.preset: [cpu-500k, cpu-2m], unique_tokens: [24576, 49152], epochs: [1, 2, 4, 8]}
      - grid: {model.preset: [cpu-500k, cpu-2m], unique_tokens: [98304], epochs: [1, 2, 4]}

Names that become file or folder names (the study's, its datasets', its evals' result names, run
ids) must be plain names (`paths.py`): a study file may come from anyone, and `../../x` must not
reach outside the study directory. Derived values, the YAML itself (`config.py`) and the number of
runs (`MAX_RUNS`) are bounded for the same reason.

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
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from smallscale.config import MAX_KEY_PARTS, Strict, deep_merge, read_yaml, validate
from smallscale.errors import UserError
from smallscale.paths import NAME_RULE, check_inside, check_name, is_plain_name

MAX_RUNS = 10_000  # points over all blocks, before duplicates are merged: a study file is not a way to hang `plan`
GENERIC_PREFIX = "generic:"  # a task from a spec file (eval/tasks/registry.py); its result name is made safe there


def _plain_name(name: str) -> str:
    if not is_plain_name(name):
        raise ValueError(f"not a plain name; {NAME_RULE}")
    return name


def _task_name(task: str) -> str:
    return task if task.startswith(GENERIC_PREFIX) else _plain_name(task)


def _axis_keys(axes: dict[str, Any]) -> dict[str, Any]:
    for key in axes:
        parts = key.split(".")
        if "" in parts or len(parts) > MAX_KEY_PARTS:
            raise ValueError(f"key {key!r} must be a dotted run-config path such as optim.lr or a bare name such as tokens")
    return axes


def _dataset_names(datasets: dict[str, Any]) -> dict[str, Any]:
    for name in datasets:  # each is prepared into STUDY_DIR/data/<name>
        if not is_plain_name(name):
            raise ValueError(f"dataset name {name!r} is not a plain name; {NAME_RULE}")
    return datasets


def _no_nul(path: str) -> str:
    if "\0" in path:
        raise ValueError("a path cannot contain a NUL character")
    return path


PlainName = Annotated[str, AfterValidator(_plain_name)]  # one file or folder name (paths.py)
TaskName = Annotated[str, AfterValidator(_task_name)]  # a task that names its result file, or generic:SPEC
AXIS_KEYS = AfterValidator(_axis_keys)


class DatasetSpec(Strict):
    """A dataset of the study: `path` to a prepared dataset, `source` (+ prepare options), or `mix`
    (a weighted mixture of other datasets of the study, `smallscale.data.mixture.study_mixture`)."""

    model_config = {"extra": "allow"}  # every `smallscale data prepare` option (PrepareConfig fields)
    path: Annotated[str, AfterValidator(_no_nul)] | None = None
    source: str | None = None
    mix: dict[str, Any] | None = None


def mixture_sources(datasets: dict[str, DatasetSpec]) -> set[str]:
    """The datasets that some `mix` names as a source: prepared only inside mixtures, never trained on alone."""
    return {name for ds in datasets.values() if isinstance(ds.mix, dict) and isinstance(ds.mix.get("sources"), dict)
            for name in ds.mix["sources"]}  # fmt: skip


class EvalSpec(Strict):
    task: TaskName
    name: PlainName | None = Field(None, description="result name (eval/<name>.json); default: the task")
    limit: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    options: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return self.name or self.task


class Block(Strict):
    grid: Annotated[dict[str, list[Any]], AXIS_KEYS] = {}
    zip: Annotated[dict[str, list[Any]], AXIS_KEYS] = {}
    set: Annotated[dict[str, Any], AXIS_KEYS] = {}

    def size(self) -> int:
        """How many points the block has: the product of the grid lists, times the zip rows."""
        zip_rows = len(next(iter(self.zip.values()))) if self.zip else 1
        return math.prod(len(values) for values in self.grid.values()) * zip_rows


class ExecutorSpec(Strict):
    kind: str = "local"  # local | pool | slurm (see executors.py)
    workers: int | None = Field(None, gt=0)
    slurm: dict[str, Any] = {}  # submitit parameters, e.g. {partition: gpu, gpus_per_node: 1, timeout_min: 240}


class StudySpec(Strict):
    name: PlainName  # the default study directory is studies/<name>
    description: str = ""
    datasets: Annotated[dict[str, DatasetSpec], AfterValidator(_dataset_names)]
    dataset: str | None = Field(None, description="the default dataset (required when there are several)")
    base: dict[str, Any] = {}
    grids: list[Block] = []
    grid: Annotated[dict[str, list[Any]], AXIS_KEYS] = {}
    zip: Annotated[dict[str, list[Any]], AXIS_KEYS] = {}
    derive: Annotated[dict[str, str | int | float], AXIS_KEYS] = {}
    evals: list[TaskName | EvalSpec] = []
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

    def __post_init__(self) -> None:  # also for runs read back from a manifest.json, which anyone may edit
        check_name(self.id, "run id")

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
    n_points = sum(block.size() for block in spec.blocks())
    if n_points > MAX_RUNS:
        raise UserError(f"{path}: the grids have {n_points:,} points; a study may have at most {MAX_RUNS:,} runs")
    if spec.dataset is None and len(spec.datasets) > 1 and not any(
        "dataset" in {**b.grid, **b.zip, **b.set} for b in spec.blocks()
    ):
        raise UserError(f"{path}: several datasets; set `dataset:` (the default) or make `dataset` an axis")
    for name, ds in spec.datasets.items():
        if sum(x is not None for x in (ds.path, ds.source, ds.mix)) != 1:
            raise UserError(f"{path}: dataset {name!r} needs exactly one of `path` (prepared), `source` or `mix`")
        if ds.mix is not None:
            from smallscale.data.mixture import study_mixture

            if ds.model_extra:
                raise UserError(f"{path}: dataset {name!r} is a mixture; put {next(iter(ds.model_extra))!r} inside its `mix:`")
            study_mixture(ds.mix, {n: d.model_dump() for n, d in spec.datasets.items()}, "<study>", f"{path}: dataset {name!r}")
    sources_only = mixture_sources(spec.datasets)
    for block in spec.blocks():
        for point in block_points(block):
            used = point.get("dataset", spec.dataset or next(iter(spec.datasets)))
            if isinstance(used, str) and used in sources_only:  # a value of another type: `expand` names it
                raise UserError(f"{path}: dataset {used!r} is a mixture source, so no run can train on it alone; "
                                f"make a one-source mixture (`mix: {{sources: {{{used}: 1}}}}`) to train on it")  # fmt: skip
    return spec


def dataset_dir(study_dir: Path, name: str, ds: DatasetSpec) -> Path:
    """A `path` dataset is only read, wherever it is; a `source` dataset is prepared (written, and
    its work folder deleted) in STUDY_DIR/data/<name>, which must lie inside the study directory."""
    if ds.path is not None:
        return Path(ds.path).resolve()
    folder = Path(study_dir) / "data" / check_name(name, "dataset name")
    return check_inside(folder, study_dir, f"dataset {name!r} folder")


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
        if not isinstance(dataset, str) or dataset not in spec.datasets:
            raise UserError(f"study {spec.name}: dataset {dataset!r} is not one of {', '.join(spec.datasets)}")
        config = copy.deepcopy(spec.base)
        config.pop("out", None)
        for key, value in point.items():
            if "." in key:
                config = deep_merge(config, _nested(key, value))
        if "unique_tokens" in point or "epochs" in point:  # the repetition pair (module docstring)
            unique, epochs = point.get("unique_tokens"), point.get("epochs")
            number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0  # noqa: E731
            if not (number(unique) and float(unique).is_integer() and number(epochs)):
                raise UserError(f"study {spec.name}: axes unique_tokens={unique!r} and epochs={epochs!r} go together: a positive "
                                "whole number of tokens and a positive number of passes over them; give both")  # fmt: skip
            config = deep_merge(config, {"data": {"token_budget": int(unique)}, "train": {"tokens": round(unique * epochs)}})
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
        resolved["out"] = str(check_inside(study_dir / "runs" / check_name(run_id, "run id"), study_dir, "run directory"))
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
    return next((p.name for p in found if is_plain_name(p.name)), None)


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

    try:
        with torch.device("meta"):  # exact counts without allocating the weights
            model = GPT(model_cfg)
    except RuntimeError as exc:  # on the meta device only a size too large for int64 fails
        raise UserError(f"model {_brief(config.get('model'), 200)} is too large to build: {exc}") from None
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
# An AST walker instead of eval(): study files may come from anyone, and only arithmetic on known
# names is needed (no attribute access, calls other than these, or imports). It is bounded too, so
# that a short expression can neither hang nor exhaust memory (`2**10**10` needs 1.5 GB): the
# expression's length and AST size, and every number it makes: finite, at most 2**63 in size
# (token counts fit in int64), and a power is refused before it is computed when it would not be.
MAX_EXPR_CHARS = 1000
MAX_EXPR_NODES = 256  # AST nodes, operators included: `ceil(tokens / 8192) * 8192` has 11
MAX_EXPR_DEPTH = 32
MAX_DERIVED = 2**63
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}  # fmt: skip
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# name -> (function, fewest arguments, most arguments)
_FUNCTIONS = {"int": (int, 1, 1), "round": (round, 1, 2), "min": (min, 2, MAX_EXPR_NODES), "max": (max, 2, MAX_EXPR_NODES),
              "ceil": (math.ceil, 1, 1), "floor": (math.floor, 1, 1)}  # fmt: skip
MAX_ROUND_DIGITS = 30  # round(x, -10**18) would compute 10**(10**18)
_OUT_OF_RANGE = "a number is out of range (derived numbers are finite and at most 2**63 in size)"


def evaluate(expr: str, variables: dict[str, Any]) -> Any:
    """Evaluate an arithmetic expression such as `20 * params` or `ceil(tokens / 8192) * 8192`.

    Any problem (syntax, an unknown name, division by zero, a number out of range, a wrong number
    of arguments) is a one-line UserError that names the expression."""
    text = str(expr)
    where = f"derived value {_brief(text)}"
    if len(text) > MAX_EXPR_CHARS:
        raise UserError(f"{where} has {len(text):,} characters; at most {MAX_EXPR_CHARS:,} are allowed")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise UserError(f"{where} is not an arithmetic expression") from None
    _check_size(tree, where)
    try:
        value = _walk(tree.body, variables, where)
    except ZeroDivisionError:
        raise UserError(f"{where} divides by zero") from None
    except OverflowError:
        raise UserError(f"{where}: {_OUT_OF_RANGE}") from None
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise UserError(f"{where} cannot be computed: {exc}") from None
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _check_size(tree: ast.AST, where: str) -> None:
    """At most MAX_EXPR_NODES nodes and MAX_EXPR_DEPTH levels, counted without recursion."""
    stack, seen = [(tree, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_EXPR_NODES or depth > MAX_EXPR_DEPTH:
            raise UserError(f"{where} is too complex (at most {MAX_EXPR_NODES} terms, {MAX_EXPR_DEPTH} levels); split it into several derived values")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _walk(node: ast.AST, variables: dict[str, Any], where: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return _bounded(node.value, where)
    if isinstance(node, ast.Name):  # a bare name may stand for any axis value, text included
        if node.id not in variables:
            raise UserError(f"{where}: unknown name {node.id!r}; known: {', '.join(sorted(variables))}")
        return variables[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _number(_walk(node.left, variables, where), where), _number(_walk(node.right, variables, where), where)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right, where)
        return _bounded(_BINARY[type(node.op)](left, right), where)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _bounded(_UNARY[type(node.op)](_number(_walk(node.operand, variables, where), where)), where)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
        name = node.func.id
        function, fewest, most = _FUNCTIONS[name]
        if not fewest <= len(node.args) <= most:
            wanted = (f"{fewest} argument" + "s" * (fewest > 1) if fewest == most
                      else f"{fewest} or more arguments" if most == MAX_EXPR_NODES else f"{fewest} to {most} arguments")  # fmt: skip
            raise UserError(f"{where}: {name}() takes {wanted}, got {len(node.args)}")
        args = [_number(_walk(a, variables, where), where) for a in node.args]
        if name == "round" and len(args) == 2 and not (isinstance(args[1], int) and abs(args[1]) <= MAX_ROUND_DIGITS):
            raise UserError(f"{where}: round()'s digits must be a whole number from -{MAX_ROUND_DIGITS} to {MAX_ROUND_DIGITS}")
        return _bounded(function(*args), where)
    raise UserError(f"{where}: only arithmetic, names and {', '.join(_FUNCTIONS)} are allowed")


def _number(value: Any, where: str) -> int | float:
    if not isinstance(value, (int, float)):
        raise UserError(f"{where}: {_brief(value, 40)} is not a number")
    return _bounded(value, where)


def _bounded(value: Any, where: str) -> Any:
    if not isinstance(value, (int, float)):  # e.g. (-8) ** 0.5 is complex
        raise UserError(f"{where}: a result is not a real number")
    if abs(value) > MAX_DERIVED or (isinstance(value, float) and not math.isfinite(value)):
        raise UserError(f"{where}: {_OUT_OF_RANGE}")
    return value


def _check_power(base: int | float, exponent: int | float, where: str) -> None:
    """Refuse an integer power of at least 2**64 from the operands' bit lengths, before computing it."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and (abs(base).bit_length() - 1) * exponent > 63:
        raise UserError(f"{where}: {_OUT_OF_RANGE}")


def spec_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
