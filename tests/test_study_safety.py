"""Study files come from anyone: no name in one may reach outside the study directory, and no value
in one may hang, exhaust memory or end in a traceback. Each attack is tried through the functions
and through the command line (exit status 2, one `error:` line, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from smallscale.data.shards import VERIFIED_FILE
from smallscale.errors import UserError
from smallscale.eval.tasks.registry import result_path, save_result
from smallscale.study import grid
from smallscale.study.executors import load_runs, plan, run_one

from conftest import REPO, synthetic_docs

TINY_MODEL = {"preset": "cpu-500k", "seq_len": 64, "n_layer": 1, "d_model": 32, "n_head": 2}
TINY_TRAIN = {"global_batch_tokens": 1024, "micro_batch": 16, "eval_batch": 8, "log_every_steps": 1}


def write_study(path: Path, **fields) -> Path:
    spec = {"name": "attack", "base": {"model": TINY_MODEL, "train": TINY_TRAIN}, "grid": {"tokens": [2048]},
            "derive": {"train.tokens": "tokens"}, **fields}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file and folder under `root`: relative path -> (size, mtime in ns) of a file, None for
    a folder (whose own mtime only repeats what its listing shows)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}  # fmt: skip


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smallscale.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout)  # fmt: skip


def cli_in_process(*args: str, cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """`smallscale ARGS` through the CLI's own entry point, in this process: the same handling of
    errors as the command (exit status 2, one line), without paying for a new interpreter and torch."""
    from smallscale.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SMALLSCALE_NO_MALLOC_TUNING", "1")  # `train` and `study run` would re-exec the process
    monkeypatch.setattr(sys, "argv", ["smallscale", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, info.value.code, out.out, out.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder that is not the study's, holding files a climbing dataset name would reach
    (`data prepare` ends by deleting OUT/work)."""
    folder = tmp_path / "victim"
    (folder / "work").mkdir(parents=True)
    (folder / "work" / "precious.txt").write_text("keep me", encoding="utf-8")
    (folder / "notes.txt").write_text("keep me too", encoding="utf-8")
    return folder


@pytest.fixture
def climbing_dataset_study(tmp_path: Path) -> Path:
    """A study in tmp/s/ whose dataset `../../../victim` resolves, from tmp/s/study/data/, to tmp/victim."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_docs(300)), encoding="utf-8")
    source = {"source": str(corpus), "vocab_size": 300, "split_by": "line", "workers": 1, "val_fraction": 0.1}
    return write_study(tmp_path / "s" / "attack.yaml", datasets={"../../../victim": source})


# ----------------------------------------------------------------------------- item 9: names that become paths
def test_climbing_dataset_name_is_refused_before_anything_is_prepared(tmp_path, victim, climbing_dataset_study):
    before = snapshot(victim)
    with pytest.raises(UserError, match=r"'datasets'.*'\.\./\.\./\.\./victim' is not a plain name") as info:
        plan(climbing_dataset_study, tmp_path / "s" / "study", progress=False)
    assert "\n" not in str(info.value)
    assert snapshot(victim) == before
    assert not (tmp_path / "s" / "study").exists()


def test_study_run_cli_refuses_a_climbing_dataset_name_and_touches_nothing(tmp_path, victim, climbing_dataset_study):
    before = snapshot(tmp_path)
    proc = cli("study", "run", str(climbing_dataset_study), "--out", str(tmp_path / "s" / "study"), "--no-progress",
               cwd=tmp_path)  # fmt: skip
    assert_one_line_error(proc, "datasets", "../../../victim", "plain name")
    assert snapshot(tmp_path) == before
    assert (victim / "work" / "precious.txt").read_text(encoding="utf-8") == "keep me"


def test_study_plan_cli_refuses_a_climbing_dataset_name(tmp_path, climbing_dataset_study, monkeypatch, capsys):
    proc = cli_in_process("study", "plan", str(climbing_dataset_study), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, "datasets", "plain name")


@pytest.mark.parametrize(
    ("evals", "key"),
    [
        ([{"task": "heldout", "name": "../../.."}], "evals.0.name"),
        ([{"task": "../../.."}], "evals.0.task"),
        (["../../.."], "evals.0"),
        ([{"task": "heldout", "name": "/tmp/x"}], "evals.0.name"),
        ([{"task": "heldout", "name": "a\0b"}], "evals.0.name"),
        ([{"task": "heldout", "name": ".."}], "evals.0.name"),
        ([{"task": "heldout", "name": ""}], "evals.0.name"),
    ],
)
def test_eval_names_that_are_not_plain_file_names_are_refused(tmp_path, tiny_dataset, evals, key):
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}}, evals=evals)
    with pytest.raises(UserError, match=rf"invalid value for '{key}'.*not a plain name") as info:
        grid.load_study(study)
    assert "\n" not in str(info.value)


def test_study_run_cli_refuses_a_climbing_eval_name_and_writes_nothing(tmp_path, tiny_dataset):
    study = write_study(tmp_path / "a" / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}},
                        evals=[{"task": "heldout", "name": "../../.."}])  # fmt: skip
    before, data_before = snapshot(tmp_path), snapshot(tiny_dataset)
    proc = cli("study", "run", str(study), "--out", str(tmp_path / "a" / "study"), "--no-progress", "--no-report",
               cwd=tmp_path, timeout=300)  # fmt: skip
    assert_one_line_error(proc, "evals.0.name", "plain name")
    assert snapshot(tmp_path) == before and snapshot(tiny_dataset) == data_before


def test_study_plan_cli_refuses_a_climbing_eval_name(tmp_path, tiny_dataset, monkeypatch, capsys):
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}},
                        evals=[{"task": "heldout", "name": "../../.."}])  # fmt: skip
    proc = cli_in_process("study", "plan", str(study), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, "evals.0.name", "plain name")


@pytest.mark.parametrize("name", ["../../..", "../x", "/etc/passwd", "a/b", "", "..", "a\0b"])
def test_result_files_cannot_leave_the_run_eval_folder(tmp_path, name):
    with pytest.raises(UserError, match="eval result name"):
        result_path(tmp_path / "run", name)
    with pytest.raises(UserError, match="eval result name"):
        save_result(tmp_path / "run", name, {"acc": 1.0})
    assert list(tmp_path.rglob("*")) == []


def test_generic_task_results_stay_in_the_run_eval_folder(tmp_path):
    run = tmp_path / "run"
    assert result_path(run, "generic:tasks/sentiment.yaml") == run / "eval" / "generic-sentiment.json"
    assert result_path(run, "generic:../../my task\0.yaml") == run / "eval" / "generic-my-task-.json"
    assert result_path(run, "generic:../..").parent == run / "eval"


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 101])
def test_study_name_must_be_a_plain_name(tmp_path, tiny_dataset, name):
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}}, name=name)
    with pytest.raises(UserError, match=r"invalid value for 'name'.*not a plain name"):
        grid.load_study(study)


def test_run_ids_read_from_a_manifest_must_be_plain_names(tmp_path):
    run = {"id": "../../../victim", "axes": {}, "config": {}, "dataset": "syn", "evals": []}
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "s", "runs": [run]}), encoding="utf-8")
    with pytest.raises(UserError, match=r"run id '\.\./\.\./\.\./victim' is not a plain name"):
        load_runs(tmp_path)


def test_a_run_folder_linked_outside_the_study_is_refused(tmp_path, tiny_dataset):
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}})
    spec, study_dir = grid.load_study(study), tmp_path / "study"
    (run,) = grid.expand(spec, study_dir, {"syn": 512})
    (tmp_path / "elsewhere").mkdir()
    (study_dir / "runs").mkdir(parents=True)
    (study_dir / "runs" / run.id).symlink_to(tmp_path / "elsewhere")  # the existing run keeps its folder
    with pytest.raises(UserError, match="run directory .* outside"):
        grid.expand(spec, study_dir, {"syn": 512})


def test_a_dataset_folder_linked_outside_the_study_is_refused_before_preparing(tmp_path, victim, climbing_dataset_study):
    spec = yaml.safe_load(climbing_dataset_study.read_text(encoding="utf-8"))
    spec["datasets"] = {"syn": spec["datasets"].pop("../../../victim")}
    study = write_study(tmp_path / "linked.yaml", **spec)
    (tmp_path / "study" / "data").mkdir(parents=True)
    (tmp_path / "study" / "data" / "syn").symlink_to(victim)
    before = snapshot(victim)
    with pytest.raises(UserError, match="dataset 'syn' folder .* outside"):
        plan(study, tmp_path / "study", progress=False)
    assert snapshot(victim) == before


def test_a_prepared_dataset_given_by_path_is_only_read(tmp_path, tiny_dataset):
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}},
                        base={"model": TINY_MODEL, "train": {**TINY_TRAIN, "device": "cpu"}}, evals=["heldout"])  # fmt: skip
    before = snapshot(tiny_dataset)
    _, (run,) = plan(study, tmp_path / "study", progress=False)
    status = run_one(tmp_path / "study", run.id)
    assert status["state"] == "done", status
    assert (tmp_path / "study" / "runs" / run.id / "eval" / "heldout.json").is_file()
    after = snapshot(tiny_dataset)
    assert {k: v for k, v in after.items() if k in before} == before  # every file as it was
    assert set(after) - set(before) <= {VERIFIED_FILE}  # at most the shard-check cache (skipped when read-only)


def test_a_run_stopped_by_sigterm_is_interrupted_not_failed_and_the_rerun_finishes_it(tmp_path, tiny_dataset, monkeypatch):
    from smallscale.errors import Stopped
    from smallscale.study import executors
    from smallscale.train import trainer

    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}},
                        base={"model": TINY_MODEL, "train": {**TINY_TRAIN, "device": "cpu"}})  # fmt: skip
    _, (run,) = plan(study, tmp_path / "study", progress=False)

    def stopped(*args, **kwargs):
        raise Stopped("stopped by SIGTERM at step 3 of 8, checkpoint saved; `smallscale resume RUN` continues it")

    monkeypatch.setattr(trainer, "train", stopped)
    monkeypatch.setenv("SMALLSCALE_NO_MALLOC_TUNING", "1")  # main() would re-exec this process to tune malloc
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "ACTIVE"))  # and set this in it
    assert executors.main([str(tmp_path / "study"), run.id]) == 143  # the worker's exit status, as if killed by it
    status = executors.read_status(tmp_path / "study", run.id)
    assert status["state"] == "interrupted" and "SIGTERM" in status["error"]
    assert [r.id for r in executors.todo(tmp_path / "study", [run], retry_failed=False)] == [run.id]
    monkeypatch.undo()
    assert run_one(tmp_path / "study", run.id)["state"] == "done"


# ----------------------------------------------------------------------------- item 10: derived values
VARIABLES = {"tokens": 2048, "params": 500_000, "position": "rope"}


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("2**10**10", "out of range"),  # was: 1.5 GB and no end
        ("1" + "+1" * 100_000, "200,001 characters"),  # was: RecursionError
        ("1/0", "divides by zero"),  # was: ZeroDivisionError
        ("10.0**400", "out of range"),  # was: OverflowError
        ("min()", "min() takes 2 or more arguments, got 0"),  # was: TypeError
        ("max(tokens)", "max() takes 2 or more arguments, got 1"),
        ("floor(1, 2)", "floor() takes 1 argument, got 2"),
        ("1e400", "out of range"),
        ("(-8) ** 0.5", "not a real number"),  # complex
        ("round(tokens, -10**18)", "round()'s digits"),  # 10**(10**18)
        ("position * 10**9", "'rope' is not a number"),  # a 4 GB string
        ("-" * 500 + "1", "too complex"),
        ("(" * 300 + "1" + ")" * 300, "not an arithmetic expression"),
        ("tokens\0", "not an arithmetic expression"),
        ("dataset_tokens * 4", "out of range"),
    ],
)
def test_derived_values_that_would_hang_or_crash_are_one_line_errors(expr, words):
    started = time.perf_counter()
    with pytest.raises(UserError) as info:
        grid.evaluate(expr, {**VARIABLES, "dataset_tokens": 2**62})
    message = str(info.value)
    assert time.perf_counter() - started < 2
    assert "\n" not in message and message.startswith("derived value '") and words in message


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("ceil(20 * params / 1024) * 1024", 10_000_384),
        ("min(tokens, 2**62)", 2048),
        ("2**63", 2**63),
        ("round(params / 3, -3)", 167_000),
        ("-tokens + +tokens", 0),
        ("position", "rope"),  # a bare name copies any axis value
    ],
)
def test_ordinary_derived_values_are_unchanged(expr, value):
    assert grid.evaluate(expr, VARIABLES) == value


@pytest.mark.parametrize("expr", ["2**10**10", "'1' + '+1' * 100000", "1/0", "10.0**400", "min()"])
def test_study_plan_cli_reports_a_bad_derived_value_in_one_line(tmp_path, tiny_dataset, expr, monkeypatch, capsys):
    expr = eval(expr) if expr.startswith("'") else expr  # the 200,001-character sum, built here
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}}, derive={"train.tokens": expr})
    started = time.perf_counter()
    proc = cli_in_process("study", "plan", str(study), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert time.perf_counter() - started < 2
    assert_one_line_error(proc, "derived value")


BILLION_LAUGHS = """\
name: laughs
datasets: {d: {source: builtin:tinyshakespeare}}
expected:
  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
grid: {laughs: [*i]}
"""  # 9**9 strings once expanded: the axis value's name in the run id alone was gigabytes


def test_yaml_alias_bomb_in_a_study_file_is_refused_quickly(tmp_path):
    study = tmp_path / "bomb.yaml"
    study.write_text(BILLION_LAUGHS, encoding="utf-8")
    assert study.stat().st_size < 900
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"expands to more than 100,000 values") as info:
        grid.load_study(study)
    assert time.perf_counter() - started < 2 and "\n" not in str(info.value)


def test_study_plan_cli_refuses_a_yaml_alias_bomb(tmp_path):
    (tmp_path / "bomb.yaml").write_text(BILLION_LAUGHS, encoding="utf-8")
    assert_one_line_error(cli("study", "plan", "bomb.yaml", cwd=tmp_path, timeout=60), "expands to more than")


def test_a_grid_of_more_points_than_a_study_may_have_is_refused(tmp_path, tiny_dataset):
    axes = {f"k{i}": list(range(10)) for i in range(6)}  # 10**6 runs
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}}, grid=axes)
    with pytest.raises(UserError, match="1,000,000 points; a study may have at most 10,000 runs"):
        grid.load_study(study)


def test_a_huge_model_in_a_study_is_a_one_line_error(tmp_path, tiny_dataset):
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}},
                        base={"model": {**TINY_MODEL, "d_model": 2**40, "n_head": 1}, "train": TINY_TRAIN})  # fmt: skip
    with pytest.raises(UserError, match="d_model=1099511627776 is larger than 65,536"):
        grid.expand(grid.load_study(study), tmp_path, {"syn": 512})


@pytest.mark.parametrize("axes", [{"dataset": [["syn"]]}, {"a..b": [1]}, {".".join(["a"] * 5000): [1]}])
def test_odd_axes_are_one_line_errors(tmp_path, tiny_dataset, axes):
    study = write_study(tmp_path / "s.yaml", datasets={"syn": {"path": str(tiny_dataset)}}, grid=axes)
    with pytest.raises(UserError) as info:
        grid.expand(grid.load_study(study), tmp_path, {"syn": 512})
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- item 11: the key in an error
@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"evals": [{"task": "heldout", "limit": -1}]}, "invalid value for 'evals.0.limit' (got -1): Input should be greater than 0"),
        ({"evals": [{"task": "heldout", "limit": "ten"}]}, "'evals.0.limit' (got 'ten')"),
        ({"evals": [{"limit": 3}]}, "'evals.0.task'"),
        ({"evals": [{"task": "heldout", "bogus": 1}]}, "unknown key 'evals.0.bogus'"),
        ({"evals": [5]}, "'evals.0' (got 5): Input should be a valid string or a valid dictionary"),
        ({"derive": {"train.tokens": [1]}}, "'derive.train.tokens' (got [1]): Input should be a valid string, a valid integer or a valid number"),
        ({"grid": {"tokens": 5}}, "'grid.tokens' (got 5): Input should be a valid list"),
        ({"grids": [{"grid": {"tokens": "many"}}]}, "'grids.0.grid.tokens'"),
        ({"datasets": {"syn": 5}}, "'datasets.syn' (got 5)"),
        ({"executor": {"workers": 0}}, "'executor.workers'"),
        ({"datasets": {"syn": {"path": "a\0b"}}}, "'datasets.syn.path' (got 'a\\x00b'): a path cannot contain a NUL character"),
    ],
)
def test_study_errors_name_the_key_the_user_wrote(tmp_path, tiny_dataset, fields, words):
    study = write_study(tmp_path / "s.yaml", **{"datasets": {"syn": {"path": str(tiny_dataset)}}, **fields})
    with pytest.raises(UserError) as info:
        grid.load_study(study)
    assert words in str(info.value)
    for tag in (".str", ".EvalSpec", ".int", "function-after", "literal["):
        assert tag not in str(info.value)
