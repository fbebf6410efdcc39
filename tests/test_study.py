"""Studies: grid expansion, derived values, stable ids, executors, resume of a killed study, results."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from smallscale.errors import UserError
from smallscale.study import grid
from smallscale.study.executors import execute, load_runs, plan, read_status
from smallscale.study.results import write_results

from conftest import REPO

TINY_MODEL = {"preset": "cpu-500k", "seq_len": 64, "n_layer": 2, "d_model": 32, "n_head": 2}
TINY_TRAIN = {"global_batch_tokens": 1024, "micro_batch": 16, "eval_batch": 8, "log_every_steps": 2}


def write_study(path: Path, dataset: Path, **fields) -> Path:
    spec = {
        "name": "tiny",
        "datasets": {"syn": {"path": str(dataset)}},
        "base": {"model": TINY_MODEL, "optim": {"name": "adamw", "lr": 3e-3}, "train": TINY_TRAIN},
        "derive": {"train.tokens": "tokens", "data.token_budget": "tokens"},
        **fields,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")  # derive runs in file order
    return path


# ----------------------------------------------------------------------------- expansion
def test_grid_union_zip_set_and_dedup(tmp_path, tiny_dataset):
    study = write_study(
        tmp_path / "s.yaml", tiny_dataset,
        grids=[
            {"grid": {"model.d_model": [32, 64], "tokens": [2048, 4096]}},  # 4 runs
            {"grid": {"model.position": ["rope", "learned"]}, "set": {"model.d_model": 32, "tokens": 2048}},  # 1 new
            {"zip": {"optim.name": ["lion", "lamb"], "optim.lr": [3e-4, 1e-2]}, "set": {"tokens": 2048}},  # 2 new
        ],
    )  # fmt: skip
    spec = grid.load_study(study)
    runs = grid.expand(spec, tmp_path / "out", {"syn": 512})
    assert len(runs) == 7  # (rope, d32, 2048) appears in blocks 1 and 2 but runs once
    by_axes = {tuple(sorted(r.axes.items())): r for r in runs}
    lion = next(r for r in runs if r.axes.get("optim.name") == "lion")
    assert lion.config["optim"]["lr"] == pytest.approx(3e-4) and lion.config["train"]["tokens"] == 2048
    assert all(r.config["data"]["token_budget"] == r.config["train"]["tokens"] for r in runs)
    assert len(by_axes) == 7 and len({r.id for r in runs}) == 7
    assert all(Path(r.config["out"]).parent == (tmp_path / "out" / "runs").resolve() for r in runs)


def test_ids_are_stable_and_readable(tmp_path, tiny_dataset):
    a = grid.expand(grid.load_study(write_study(tmp_path / "a.yaml", tiny_dataset, grid={"tokens": [2048, 250000]})), tmp_path, {"syn": 512})
    # Another axis order and an extra block: the shared runs keep their ids.
    b = grid.expand(grid.load_study(write_study(tmp_path / "b.yaml", tiny_dataset,
                                                grids=[{"grid": {"tokens": [250000, 2048, 4096]}}])), tmp_path, {"syn": 512})  # fmt: skip
    assert {r.id for r in a} < {r.id for r in b}
    assert sorted(r.id.rsplit("-", 1)[0] for r in a) == ["tokens2048", "tokens250k"]
    # Any change of the resolved config changes the id.
    c = grid.expand(grid.load_study(write_study(tmp_path / "c.yaml", tiny_dataset, grid={"tokens": [2048]},
                                                base={"model": TINY_MODEL, "train": {**TINY_TRAIN, "seed": 1}})), tmp_path, {"syn": 512})  # fmt: skip
    assert c[0].id not in {r.id for r in a}


def test_derived_values_use_exact_parameter_counts(tmp_path, tiny_dataset):
    from smallscale.model.gpt import GPT
    from smallscale.train.trainer import ModelSection

    study = write_study(tmp_path / "s.yaml", tiny_dataset, grid={"model.d_model": [32, 64]},
                        derive={"train.tokens": "ceil(20 * params / 1024) * 1024", "data.token_budget": "20 * params"})  # fmt: skip
    runs = grid.expand(grid.load_study(study), tmp_path, {"syn": 512})
    assert len(runs) == 2
    for run in runs:
        n = GPT(ModelSection(**{**TINY_MODEL, "d_model": run.axes["model.d_model"]}).build(512)).num_params()
        assert run.config["data"]["token_budget"] == 20 * n
        assert run.config["train"]["tokens"] == -(-20 * n // 1024) * 1024
    assert runs[0].config["data"]["token_budget"] < runs[1].config["data"]["token_budget"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"zip": {"optim.name": ["lion", "lamb"], "optim.lr": [1e-3]}}, "equal lengths"),
        ({"grid": {"tokens": [1024]}, "derive": {"train.tokens": "tokens * oops"}}, "unknown name 'oops'"),
        ({"grid": {"tokens": [1024]}, "derive": {"train.tokens": "__import__('os')"}}, "only arithmetic"),
        ({"grid": {"dataset": ["nope"], "tokens": [1024]}}, "dataset 'nope'"),
        ({"grid": {"tokens": [1024], "model.position": ["rotary"]}}, "model.position"),
    ],
)
def test_study_file_errors_are_one_line(tmp_path, tiny_dataset, fields, message):
    study = write_study(tmp_path / "s.yaml", tiny_dataset, **fields)
    with pytest.raises(UserError, match=message) as info:
        grid.expand(grid.load_study(study), tmp_path, {"syn": 512})
    assert "\n" not in str(info.value).strip()


# ----------------------------------------------------------------------------- execution
def _cli(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smallscale.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, **kwargs)  # fmt: skip


@pytest.mark.slow
def test_study_runs_evals_writes_results_and_skips_done_runs(tmp_path, tiny_dataset):
    study = write_study(
        tmp_path / "s.yaml", tiny_dataset, grid={"model.position": ["rope", "learned"], "tokens": [4096]},
        evals=[{"task": "length_extrapolation", "options": {"factors": [1, 2]}}],
    )  # fmt: skip
    out = tmp_path / "study"
    _, runs = plan(study, out, progress=False)
    assert execute(out, runs, progress=False)["done"] == 2
    csv_path, parquet_path = write_results(out)
    rows = {r["axis.model.position"]: r for r in csv.DictReader(csv_path.open())}
    assert set(rows) == {"rope", "learned"}
    for row in rows.values():
        assert row["status"] == "done" and int(row["tokens_seen"]) == 4096 and float(row["val_bpb"]) > 0
        # the packed stream (context across documents) vs each document alone: the same metric, close
        assert float(row["eval.length_extrapolation.bpb_1x"]) == pytest.approx(float(row["val_bpb"]), rel=0.05)
        # AdamW: two fp32 moments per parameter, plus a 4-byte step counter per parameter tensor
        assert 8 * int(row["params"]) < int(row["optimizer_state_bytes"]) <= 8 * int(row["params"]) + 4 * 64
    assert rows["rope"]["eval.length_extrapolation.bpb_2x"] and not rows["learned"]["eval.length_extrapolation.bpb_2x"]
    import pyarrow.parquet as pq

    assert pq.read_table(parquet_path).num_rows == 2
    mtimes = {r.id: (out / "runs" / r.id / "summary.json").stat().st_mtime_ns for r in runs}
    assert execute(out, runs, progress=False)["done"] == 2  # again: nothing to do
    for r in runs:
        assert (out / "runs" / r.id / "summary.json").stat().st_mtime_ns == mtimes[r.id]
        assert read_status(out, r.id)["attempts"] == 1


@pytest.mark.slow
def test_failed_run_is_recorded_and_does_not_stop_the_study(tmp_path, tiny_dataset):
    # micro_batch 64 x seq_len 64 exceeds the 1024-token global batch: that run fails at start.
    study = write_study(tmp_path / "s.yaml", tiny_dataset, grid={"train.micro_batch": [64, 16], "tokens": [2048]})
    result = _cli("study", "run", str(study), "--out", str(tmp_path / "out"), "--no-report", "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    states = {r.axes["train.micro_batch"]: read_status(tmp_path / "out", r.id) for r in load_runs(tmp_path / "out")}
    assert states[16]["state"] == "done"
    assert states[64]["state"] == "failed" and "exceeds train.global_batch_tokens" in states[64]["error"]
    status = _cli("study", "status", str(tmp_path / "out"), cwd=tmp_path)
    assert status.returncode == 0 and "failed" in status.stdout and "1 done" in status.stdout


@pytest.mark.slow
def test_killed_study_resumes_interrupted_run_and_skips_finished(tmp_path, tiny_dataset):
    train = {**TINY_TRAIN, "checkpoint_every_tokens": 2048, "log_every_steps": 1}
    study = write_study(tmp_path / "s.yaml", tiny_dataset, grid={"tokens": [2048, 200704]},
                        base={"model": TINY_MODEL, "train": train}, derive={"train.tokens": "tokens"})  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "smallscale.cli", "study", "run", str(study), "--out", str(out),
                             "--no-report", "--no-progress"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 240
        long_dir = None
        while time.time() < deadline:
            if (out / "manifest.json").exists():
                long_dir = out / "runs" / next(r.id for r in load_runs(out) if r.axes["tokens"] == 200704)
                done = list((long_dir / "checkpoints").glob("step-*/state.json")) if long_dir.exists() else []
                if any(int(p.parent.name.split("-")[1]) >= 8 for p in done):
                    break
                assert read_status(out, long_dir.name)["state"] != "failed", (long_dir / "log.txt").read_text()
            time.sleep(0.2)
        else:
            pytest.fail("the long run never wrote a checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)  # the study process dies; its worker gets SIGTERM (PDEATHSIG)
        proc.wait()
    runs = {r.axes["tokens"]: r for r in load_runs(out)}
    for _ in range(100):  # the orphaned worker needs a moment to receive its signal and exit
        if read_status(out, runs[200704].id)["state"] == "interrupted":
            break
        time.sleep(0.1)
    assert read_status(out, runs[2048].id)["state"] == "done"
    assert read_status(out, runs[200704].id)["state"] == "interrupted"
    status = _cli("study", "status", str(out), cwd=tmp_path)
    assert "interrupted" in status.stdout and "1 done" in status.stdout

    result = _cli("study", "run", str(study), "--out", str(out), "--no-report", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    short, long = read_status(out, runs[2048].id), read_status(out, runs[200704].id)
    assert short["attempts"] == 1  # finished run skipped
    assert long["state"] == "done" and long["attempts"] == 2 and long["resumed_from_step"] >= 8
    steps = [json.loads(line)["step"] for line in (long_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 200704 // 1024  # one clean run after the resume


@pytest.mark.slow
def test_submitit_local_executor_runs_the_array(tmp_path, tiny_dataset):
    pytest.importorskip("submitit")
    study = write_study(tmp_path / "s.yaml", tiny_dataset, grid={"train.seed": [0, 1], "tokens": [2048]})
    out = tmp_path / "out"
    _, runs = plan(study, out, progress=False)
    counts = execute(out, runs, kind="submitit-local", slurm={"timeout_min": 10}, progress=False)
    assert counts["done"] == 2
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert set(jobs) == {r.id for r in runs}
    losses = {read_status(out, r.id)["val_bpb"] for r in runs}
    assert len(losses) == 2  # different seeds, different results


def test_derived_budget_can_be_capped_at_the_dataset(tmp_path, tiny_dataset):
    study = write_study(tmp_path / "s.yaml", tiny_dataset, grid={"tokens": [2048, 1_000_000]},
                        derive={"train.tokens": "tokens", "data.token_budget": "min(train_tokens, dataset_tokens)"})  # fmt: skip
    runs = grid.expand(grid.load_study(study), tmp_path, {"syn": 512}, {"syn": 50_000})
    assert [(r.config["train"]["tokens"], r.config["data"]["token_budget"]) for r in runs] == [(2048, 2048), (1_000_000, 50_000)]
    unknown = grid.expand(grid.load_study(study), tmp_path, {"syn": 512})  # not prepared yet: unlimited
    assert unknown[1].config["data"]["token_budget"] == 1_000_000


@pytest.mark.slow
def test_pool_executor_runs_runs_concurrently(tmp_path, tiny_dataset):
    study = write_study(tmp_path / "s.yaml", tiny_dataset, grid={"train.seed": [0, 1], "tokens": [2048]})
    out = tmp_path / "out"
    _, runs = plan(study, out, progress=False)
    assert execute(out, runs, kind="pool", workers=2, progress=False)["done"] == 2
    spans = [(read_status(out, r.id)["started"], read_status(out, r.id)["finished"]) for r in runs]
    assert max(s for s, _ in spans) < min(f for _, f in spans)  # both were running at the same time
