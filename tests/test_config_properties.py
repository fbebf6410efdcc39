"""Property-based tests: whatever a config file, an override, a study file or a derived value holds,
loading it either works or raises one UserError line; it never hangs, crashes with another
exception, or writes outside the study directory.

Bounded for CI: derandomized (the same examples every run, no example database), a deadline per
example, and 300-500 examples per property: 1-4 s each on 2 cores.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smallscale.errors import UserError
from smallscale.eval.tasks.registry import result_path
from smallscale.study import grid
from smallscale.study.executors import plan
from smallscale.train.trainer import RunConfig, load_run_config

from test_study_safety import snapshot

BOUNDED = {"derandomize": True, "database": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

# ----------------------------------------------------------------------------- strategies
# YAML pieces that exercise the loader's edges: anchors and aliases, merge keys, tags, flow and
# block nesting, dates, base-60 and hex numbers, special floats, quotes and control characters.
YAML_PIECES = [
    "&a ", "*a", "&b ", "*b", "<<: ", "!!binary ", "!!set ", "!!python/object:os.system ", "!!str ", "!!int ", "[", "]",
    "{", "}", ", ", ": ", "- ", "? ", "\n", "  ", "\t", "#", "'", '"', "\\", "\0", "2024-13-45", "2024-01-31", "1:59:59",
    "0x1F", "0o17", "1_000", "1e400", ".inf", ".nan", "-.inf", "~", "null", "yes", "no", "3.0e-4", "9" * 120, "train",
    "compile", "optim", "lr", "model", "preset", "out", "data", "path", "tokens", "steps", "---", "...", "%YAML 1.1",
]  # fmt: skip
RUN_KEYS = ["out", "data", "model", "optim", "schedule", "train", "path", "token_budget", "preset", "n_layer", "d_model",
            "position", "name", "lr", "betas", "tokens", "steps", "compile", "precision", "micro_batch", "bogus"]  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "cpu-500k", "rope", "adamw", "-1", "0", "1e400"]),
)  # fmt: skip
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(RUN_KEYS) | st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)
yaml_text = st.one_of(
    st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join),
    json_like.map(lambda v: yaml.safe_dump(v, sort_keys=False)),
    st.dictionaries(st.sampled_from(RUN_KEYS), json_like, max_size=5).map(lambda v: yaml.safe_dump(v, sort_keys=False)),
    st.text(max_size=200),
)
file_bytes = st.one_of(yaml_text.map(lambda t: t.encode("utf-8")), st.binary(max_size=200))

dotted_keys = st.one_of(
    st.sampled_from(["optim.lr", "optim.betas", "train.compile", "train.tokens", "model.preset", "model.position",
                     "data.path", "out", "train", "a..b", ".x", "x.", "", "model.preset.deeper"]),
    st.lists(st.sampled_from(RUN_KEYS), min_size=1, max_size=20).map(".".join),
    st.text(max_size=12),
)  # fmt: skip
overrides = st.lists(
    st.tuples(dotted_keys, st.one_of(yaml_text, st.text(max_size=20)), st.sampled_from(["=", "", "=="])).map("".join),
    max_size=5,
)

# A small grammar of derived-value expressions: numbers (in range, huge, special), names (known,
# unknown, textual), every operator, the allowed calls with any number of arguments, and others.
NAMES = ["tokens", "params", "position", "dataset_tokens", "unknown", "__import__", "x"]
atoms = st.one_of(
    st.integers(-(10**30), 10**30).map(str), st.sampled_from(["0", "1", "2", "10", "0.5", "1e400", "1e-400", "2**63", "True"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr), st.sampled_from(NAMES),
)  # fmt: skip


def _combine(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    operators = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "<<", "&", "==", "if"])
    functions = st.sampled_from(["int", "round", "min", "max", "ceil", "floor", "abs", "eval", "print"])
    return st.one_of(
        st.tuples(inner, operators, inner).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        st.tuples(st.sampled_from(["-", "+", "~", "not "]), inner).map("".join),
        st.tuples(functions, st.lists(inner, max_size=4)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        inner.map(lambda e: f"({e})"),
        inner.map(lambda e: f"{e}.real"),
    )


expressions = st.one_of(st.recursive(atoms, _combine, max_leaves=12), st.text(max_size=30))
VARIABLES = {"tokens": 2048, "params": 500_000, "position": "rope", "dataset_tokens": 2**62}

def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy, in_ten: int = 8) -> st.SearchStrategy:
    """`usual` in `in_ten` examples out of 10, else `odd`: a study has many parts, and one odd part
    ends it at validation, so most parts must be plausible for examples to reach planning."""
    return st.integers(0, 9).flatmap(lambda i: usual if i < in_ten else odd)


# Names that end up as file or folder names: plain ones, and every way of climbing out.
plain_names = st.sampled_from(["syn", "web", "ok_name-1.0", "heldout"])
odd_names = st.one_of(
    st.sampled_from(["../../../victim", "..", ".", "", "/abs", "a/b", "a\\b", "a\0b", "x" * 101, "-x", ".hidden", "C:\\x",
                     "../../..", "victim/../../..", "~/x", "a\nb"]),
    st.text(max_size=12),
)  # fmt: skip
names = mostly(plain_names, odd_names)
good_expressions = st.sampled_from(["tokens", "2048", "ceil(20 * params / 1024) * 1024", "min(tokens, dataset_tokens)", "tokens * 2"])


@st.composite
def study_dicts(draw: st.DrawFn, dataset_path: str, missing_source: str) -> dict[str, Any]:
    """Structurally plausible study files: the right sections, with values mostly plausible."""
    sources = mostly(st.sampled_from([{"path": dataset_path}, {"source": missing_source, "workers": 1}]),
                     st.sampled_from([{"path": dataset_path, "source": missing_source}, {}, {"path": "a\0b"}]), 9)  # fmt: skip
    datasets = draw(st.dictionaries(names, sources, min_size=1, max_size=3))
    plausible = {"tokens": [2048, 4096], "model.d_model": [32, 64], "model.position": ["rope", "learned", "alibi"],
                 "train.seed": [0, 1, 2], "dataset": list(datasets), "optim.lr": [1e-3, 3e-3], "k": [1, 2]}  # fmt: skip
    axes = draw(st.lists(mostly(st.sampled_from(list(plausible)), st.text(max_size=8)), max_size=2, unique=True))
    grid = {key: draw(st.lists(mostly(st.sampled_from(plausible.get(key, [1])), scalars), min_size=1, max_size=3)) for key in axes}
    model = {"preset": "cpu-500k", "seq_len": 64, "n_layer": draw(mostly(st.just(1), st.sampled_from([2, 0, "x"]))),
             "d_model": draw(mostly(st.just(32), st.sampled_from([64, 33, 2**40]))), "n_head": 2}  # fmt: skip
    derive_keys = mostly(st.sampled_from(["train.tokens", "data.token_budget"]), st.sampled_from(["train.seed", "a..b"]) | st.text(max_size=8))
    eval_names = mostly(plain_names, odd_names, 5)
    evals = st.one_of(eval_names, st.fixed_dictionaries({"task": eval_names}, optional={"name": eval_names, "limit": st.integers(-2, 3)}))
    study: dict[str, Any] = {
        "name": draw(names),
        "datasets": datasets,
        "base": {"model": model, "train": {"global_batch_tokens": 1024, "micro_batch": 16, "tokens": 2048}},
        "grid": grid,
        "derive": draw(st.dictionaries(derive_keys, mostly(good_expressions, expressions | st.integers()), max_size=2)),
        "evals": draw(st.lists(evals, max_size=2)),
    }
    if len(datasets) > 1 or draw(st.booleans()):
        study["dataset"] = draw(mostly(st.sampled_from(list(datasets)), names))
    return study


# ----------------------------------------------------------------------------- properties
@settings(max_examples=400, deadline=timedelta(seconds=2), **BOUNDED)
@given(content=file_bytes)
def test_any_run_config_file_loads_or_is_one_user_error(tmp_path_factory, content):
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    (folder / "run.yaml").write_bytes(content)
    before = snapshot(folder)
    try:
        assert isinstance(load_run_config(folder / "run.yaml", []), RunConfig)
    except UserError as exc:
        assert "\n" not in str(exc)
    assert snapshot(folder) == before  # loading reads; `out` and `data.path` are not created


@settings(max_examples=400, deadline=timedelta(seconds=2), **BOUNDED)
@given(items=overrides)
def test_any_overrides_load_or_are_one_user_error(items):
    try:
        assert isinstance(load_run_config(None, items), RunConfig)
    except UserError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=500, deadline=timedelta(seconds=1), **BOUNDED)
@given(expr=expressions)
def test_any_derived_value_is_a_bounded_number_or_one_user_error(expr):
    try:
        value = grid.evaluate(expr, VARIABLES)
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("derived value ")
        return
    assert value == "rope" or (isinstance(value, (int, float)) and abs(value) <= 2**63)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_dataset) -> tuple[Path, Path]:
    """(parent, study_dir): the study is parent/s/study, so that a dataset `../../../victim` would
    be parent/victim, where files wait that nothing may touch."""
    parent = tmp_path_factory.mktemp("sandbox")
    (parent / "victim" / "work").mkdir(parents=True)
    (parent / "victim" / "work" / "precious.txt").write_text("keep me", encoding="utf-8")
    (parent / "s").mkdir()
    return parent, parent / "s" / "study"


def assert_writes_inside(spec: grid.StudySpec, runs: list[grid.RunSpec], study_dir: Path) -> None:
    """Every folder or file the study will write lies inside it: run folders, prepared datasets, results."""
    for run in runs:
        out = Path(run.config["out"])
        assert out.parent == (study_dir / "runs").resolve()
        if spec.datasets[run.dataset].source is not None:
            assert Path(run.config["data"]["path"]).parent == (study_dir / "data").resolve()
        assert all(result_path(out, ev["name"] or ev["task"]).parent == out / "eval" for ev in run.evals)


@settings(max_examples=300, deadline=timedelta(seconds=5), **BOUNDED)
@given(data=st.data())
def test_any_study_file_plans_or_is_one_user_error_and_writes_only_inside_the_study(sandbox, tiny_dataset, data):
    parent, study_dir = sandbox
    study = data.draw(study_dicts(str(tiny_dataset), str(parent / "missing-corpus.txt")))
    spec_path = parent / "s" / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study, sort_keys=False, allow_unicode=False), encoding="utf-8")
    shutil.rmtree(study_dir, ignore_errors=True)
    before, dataset_before = snapshot(parent), snapshot(tiny_dataset)
    stage = "load_study"
    try:
        spec = grid.load_study(spec_path)
        stage = "expand"
        assert_writes_inside(spec, grid.expand(spec, study_dir, dict.fromkeys(spec.datasets, 512)), study_dir)
        stage = "plan"
        _, planned = plan(spec_path, study_dir, progress=False, spec=spec)
        assert_writes_inside(spec, planned, study_dir)
        event(f"planned {len(planned)} run(s)")  # --hypothesis-show-statistics: how far the examples get
    except UserError as exc:
        assert "\n" not in str(exc)
        event(f"UserError in {stage}")
    finally:
        after = snapshot(parent)
        assert {k: v for k, v in after.items() if not Path(k).is_relative_to("s/study")} == before
        assert snapshot(tiny_dataset) == dataset_before
        shutil.rmtree(study_dir, ignore_errors=True)
