"""One writer per folder, end to end: two `smallscale` processes started together (or one while the
other works) on one study, one run directory, one dataset folder. Afterwards every metrics.jsonl
has strictly increasing steps, every run's final weights equal a clean single-process run's, and
nothing printed a traceback. The second `train`/`resume`/`data prepare` is refused in one line
naming the owner; a second `study run` shares the study (see smallscale/study/executors.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from smallscale.lock import hold
from smallscale.study.executors import load_runs, read_status, run_dir
from smallscale.train import checkpoint
from smallscale.train.trainer import RunConfig, load_run_config, train

from conftest import REPO, synthetic_docs

ENV = {**os.environ, "PYTHONPATH": str(REPO), "SMALLSCALE_NO_MALLOC_TUNING": "1", "COLUMNS": "200"}
# The command runs once its gate file exists; its imports are done by then, so start offsets are
# exact (an import takes seconds here, more than the offsets tested).
GATE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import smallscale.cli, smallscale.data.shards, smallscale.study.executors, smallscale.train.trainer
    gate = Path(sys.argv[1])
    Path(sys.argv[1] + ".ready").touch()
    while not gate.exists():
        time.sleep(0.002)
    sys.argv = ["smallscale", *sys.argv[2:]]
    smallscale.cli.main()
""")
TIMEOUT_S = 240


class Gated:
    """A `smallscale` command waiting at a gate; `go()` starts it, `finish()` returns (rc, stdout, stderr)."""

    def __init__(self, tmp: Path, name: str, args: list[str], cwd: Path) -> None:
        self.gate, self.out, self.err = tmp / f"gate-{name}", tmp / f"{name}.out", tmp / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", GATE, str(self.gate), *args], cwd=cwd, env=ENV,
                                         stdout=out, stderr=err)  # fmt: skip
        self.pid = self.proc.pid

    def wait_ready(self) -> None:
        wait_for(lambda: Path(f"{self.gate}.ready").exists(), f"{self.gate.name} never got ready: {self.err.read_text()}")

    def go(self) -> None:
        self.gate.touch()

    def finish(self) -> tuple[int, str, str]:
        rc = self.proc.wait(TIMEOUT_S)
        return rc, self.out.read_text(), self.err.read_text()


def wait_for(condition: Callable[[], bool], failure: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(failure)
        time.sleep(0.005)


def race(tmp: Path, args_a: list[str], args_b: list[str], cwd: Path, start_b: Callable[[], bool] | float) -> tuple[Gated, Gated]:
    """Start A, then B `start_b` seconds later or once `start_b()` is true; both imported beforehand."""
    a, b = Gated(tmp, "a", args_a, cwd), Gated(tmp, "b", args_b, cwd)
    a.wait_ready()
    b.wait_ready()
    a.go()
    if callable(start_b):
        wait_for(start_b, "A never reached the point where B should start")
    else:
        time.sleep(start_b)
    b.go()
    return a, b


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    found = checkpoint.latest(run / "checkpoints")
    assert found is not None, f"{run} has no checkpoint"
    return checkpoint.load_weights(found.path)


def assert_same_weights(run: Path, reference: Path) -> None:
    mine, clean = final_weights(run), final_weights(reference)
    assert mine.keys() == clean.keys()
    assert all(torch.equal(mine[k], clean[k]) for k in clean), f"{run} ended with other weights than a clean run"


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


def assert_refused_by(rc: int, stderr: str, folder: str, purpose: str, owner_pid: int) -> None:
    """Exit 2 and one line: the folder, what its owner does, the owner's pid and host."""
    assert rc == 2, stderr
    assert re.fullmatch(
        rf"error: '{re.escape(folder)}' is in use: {purpose} running as pid {owner_pid} on host "
        rf"{re.escape(socket.gethostname())} since \d\d:\d\d; wait for it or stop it",
        stderr.strip(),
    ), stderr


# ----------------------------------------------------------------------------- one run directory
# 400 steps of ~4 ms: B, started at A's first checkpoint (step 50), meets A with ~1.4 s of training
# left, many times what B takes from its start to the lock.
TRAIN = ["model.preset=cpu-500k", "model.seq_len=64", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
         "train.global_batch_tokens=1024", "train.micro_batch=16", "train.eval_batch=8", "train.steps=400",
         "train.log_every_steps=50", "train.checkpoint_every_tokens=51200"]  # fmt: skip


def train_args(dataset: Path) -> list[str]:
    return ["train", f"data.path={dataset}", "out=run", *TRAIN, "--no-progress"]


@pytest.fixture(scope="module")
def clean_run(tiny_dataset, tmp_path_factory) -> Path:
    """The run trained once, alone, in this process."""
    out = tmp_path_factory.mktemp("clean") / "run"
    train(load_run_config(None, [f"data.path={tiny_dataset}", f"out={out}", *TRAIN]), progress=False)
    return out


def first_checkpoint(run: Path) -> Callable[[], bool]:
    return lambda: any((run / "checkpoints").glob("step-*"))


@pytest.mark.slow
@pytest.mark.parametrize("second, when", [("train", "together"), ("train", "after A's first checkpoint"),
                                          ("resume", "after A's first checkpoint")])  # fmt: skip
def test_second_trainer_of_a_run_is_refused_and_the_run_stays_clean(tmp_path, tiny_dataset, clean_run, second, when):
    args_b = train_args(tiny_dataset) if second == "train" else ["resume", "run", "--no-progress"]
    a, b = race(tmp_path, train_args(tiny_dataset), args_b, tmp_path, 0.0 if when == "together" else first_checkpoint(tmp_path / "run"))
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = a.finish(), b.finish()
    assert_no_traceback(out_a, err_a, out_b, err_b)
    if rc_a == 2:  # together: either may win
        (a, rc_a, err_a), (b, rc_b, err_b) = (b, rc_b, err_b), (a, rc_a, err_a)
    assert rc_a == 0, err_a
    assert_refused_by(rc_b, err_b, "run", "train", a.pid)
    assert metric_steps(tmp_path / "run") == list(range(50, 401, 50))
    assert_same_weights(tmp_path / "run", clean_run)


@pytest.mark.slow
def test_trainer_killed_with_sigkill_is_resumed_at_once_by_the_next(tmp_path, tiny_dataset, clean_run):
    a, b = Gated(tmp_path, "a", train_args(tiny_dataset), tmp_path), Gated(tmp_path, "b", ["resume", "run", "--no-progress"], tmp_path)
    a.wait_ready()
    b.wait_ready()
    a.go()
    wait_for(first_checkpoint(tmp_path / "run"), "A never wrote a checkpoint")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    b.go()
    rc_b, out_b, err_b = b.finish()
    assert rc_b == 0, err_b
    assert_no_traceback(out_b, err_b)
    assert metric_steps(tmp_path / "run") == list(range(50, 401, 50))
    assert_same_weights(tmp_path / "run", clean_run)


# ----------------------------------------------------------------------------- one study
def write_study(path: Path, corpus: Path) -> Path:
    spec = {
        "name": "race",
        "datasets": {"syn": {"source": str(corpus), "vocab_size": 300, "split_by": "line", "workers": 1}},
        "base": {"model": {"preset": "cpu-500k", "seq_len": 64, "n_layer": 1, "d_model": 32, "n_head": 2},
                 "optim": {"name": "adamw", "lr": 3e-3},
                 "train": {"global_batch_tokens": 1024, "micro_batch": 16, "eval_batch": 8, "steps": 6,
                           "log_every_steps": 2, "checkpoint_every_tokens": 2048}},
        "grid": {"train.seed": [0, 1]},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def a_run_is_training(study: Path) -> Callable[[], bool]:
    return lambda: any(json.loads(p.read_text())["state"] == "running" for p in study.glob("runs/*/status.json") if p.stat().st_size)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["together", "0.3 s later", "once A trains a run"])
def test_two_study_processes_share_the_study_and_train_each_run_once(tmp_path, when):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_docs(2000, seed=3)), encoding="utf-8")
    args = ["study", "run", str(write_study(tmp_path / "s.yaml", corpus)), "-o", "out", "--no-report", "--no-progress"]
    start_b = {"together": 0.0, "0.3 s later": 0.3, "once A trains a run": a_run_is_training(tmp_path / "out")}[when]
    a, b = race(tmp_path, args, args, tmp_path, start_b)
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = a.finish(), b.finish()
    out = tmp_path / "out"
    logs = [p.read_text() for p in out.glob("runs/*/log.txt")]
    assert_no_traceback(out_a, err_a, out_b, err_b, *logs)
    assert (rc_a, rc_b) == (0, 0), err_a + err_b
    assert "2 done" in out_a and "2 done" in out_b  # each waited for the run the other trained
    for spec in load_runs(out):
        status = read_status(out, spec.id)
        assert (status["state"], status["attempts"]) == ("done", 1)  # trained once, by one process
        assert metric_steps(run_dir(out, spec.id)) == [2, 4, 6]
        clean = tmp_path / "clean" / spec.id
        train(RunConfig.model_validate({**spec.config, "out": str(clean)}), progress=False)
        assert_same_weights(run_dir(out, spec.id), clean)


# A study worker in the middle of training: holds the run's lock and has recorded itself as running.
WORKER = textwrap.dedent("""
    import os, socket, sys, time
    from smallscale.lock import hold
    from smallscale.study.executors import _write_status, run_dir
    out = run_dir(sys.argv[1], sys.argv[2])
    with hold(out, "study worker"):
        _write_status(out / "status.json", state="running", stage="train", host=socket.gethostname(), pid=os.getpid(),
                      started=time.time(), attempts=1)
        print("training", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def planned(tmp_path, tiny_dataset) -> tuple[Path, str]:
    """A planned one-run study (tiny model, 4 steps): its directory and its run id."""
    from smallscale.study.executors import plan

    spec = {"name": "owned", "datasets": {"syn": {"path": str(tiny_dataset)}},
            "base": {"model": {"preset": "cpu-500k", "seq_len": 64, "n_layer": 1, "d_model": 32, "n_head": 2},
                     "train": {"global_batch_tokens": 1024, "micro_batch": 16, "eval_batch": 8, "steps": 4}}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    _, runs = plan(tmp_path / "s.yaml", tmp_path / "out", progress=False)
    return tmp_path / "out", runs[0].id


@pytest.fixture
def worker(planned):
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(planned[0]), planned[1]], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "training"
    yield proc
    proc.kill()
    proc.wait()


def study_status(out: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "smallscale.cli", "study", "status", str(out)], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_study_status_names_the_live_owner_of_a_running_run_and_drops_it_once_killed(planned, worker):
    out, run_id = planned
    row = next(line for line in study_status(out).splitlines() if run_id in line)
    assert re.search(rf"running .* train .* pid {worker.pid} on host {re.escape(socket.gethostname())} since \d\d:\d\d \(lock held\)", row), row
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    row = next(line for line in study_status(out).splitlines() if run_id in line)
    assert f"interrupted │ process {worker.pid} on host {socket.gethostname()} ended during train" in row
    assert "lock held" not in row  # no owner any more


def test_running_record_without_its_lock_reads_interrupted_even_if_the_pid_lives(planned):
    from smallscale.study.executors import _write_status

    out, run_id = planned
    _write_status(run_dir(out, run_id) / "status.json", state="running", stage="train", host=socket.gethostname(), pid=os.getpid())
    assert read_status(out, run_id)["state"] == "interrupted"  # this pid is alive, but it holds no lock
    with hold(run_dir(out, run_id), "study worker"):
        assert read_status(out, run_id)["state"] == "running"


def test_requeued_slurm_task_leaves_a_run_another_process_trains_and_takes_it_over_once_free(planned, worker):
    pytest.importorskip("submitit")
    from smallscale.study.slurm import RunJob

    out, run_id = planned
    before = (run_dir(out, run_id) / "status.json").read_text()
    result = RunJob()(str(out), run_id)  # what a requeued (or duplicate) array task runs
    assert (result["state"], result["owner"].split(" since")[0]) == ("running", f"pid {worker.pid} on host {socket.gethostname()}")
    assert (run_dir(out, run_id) / "status.json").read_text() == before and not (run_dir(out, run_id) / "metrics.jsonl").exists()
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    status = RunJob()(str(out), run_id)
    assert (status["state"], status["attempts"]) == ("done", 2) and metric_steps(run_dir(out, run_id))[-1] == 4


def test_study_worker_of_an_owned_run_exits_3_in_one_line_without_touching_it(planned, worker):
    out, run_id = planned
    before = (run_dir(out, run_id) / "status.json").read_text()
    result = subprocess.run([sys.executable, "-m", "smallscale.study.executors", str(out), run_id], env=ENV, capture_output=True, text=True)
    assert result.returncode == 3 and result.stderr.strip().startswith(f"run {run_id} skipped: '{run_dir(out, run_id)}' is in use: study worker running as pid {worker.pid} on host ")
    assert "\n" not in result.stderr.strip() and (run_dir(out, run_id) / "status.json").read_text() == before


# ----------------------------------------------------------------------------- one dataset folder
def shard_digests(dataset: Path) -> dict[str, str]:
    files = [p for p in dataset.iterdir() if re.fullmatch(r"(train|val)-\d+\.bin|tokenizer\.json", p.name)]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
@pytest.mark.parametrize("when", ["together", "once A has begun"])
def test_second_data_prepare_of_a_folder_is_refused_and_the_dataset_stays_clean(tmp_path, when):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_docs(12000, seed=5)), encoding="utf-8")  # ~0.7 s to prepare
    args = ["data", "prepare", str(corpus), "-o", "ds", "--vocab-size", "300", "--split-by", "line", "--workers", "1"]
    a, b = race(tmp_path, args, args, tmp_path, 0.0 if when == "together" else (lambda: (tmp_path / "ds" / "work").exists()))
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = a.finish(), b.finish()
    assert_no_traceback(out_a, err_a, out_b, err_b)
    if rc_a == 2:
        (a, rc_a, err_a), (b, rc_b, err_b) = (b, rc_b, err_b), (a, rc_a, err_a)
    assert rc_a == 0, err_a
    assert_refused_by(rc_b, err_b, "ds", "data prepare", a.pid)
    clean = subprocess.run([sys.executable, "-m", "smallscale.cli", *args[:4], str(tmp_path / "clean"), *args[5:]],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    assert shard_digests(tmp_path / "ds") == shard_digests(tmp_path / "clean") != {}
