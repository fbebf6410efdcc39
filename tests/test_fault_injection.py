"""Fault injection, end to end: `data prepare`, `train` and `study run` are killed with SIGKILL at
seeded random points spread over a clean run's duration, or run out of room, and then run again.

Out of room is RLIMIT_FSIZE: a write that would grow any one file past N bytes fails with EFBIG, as
a write to a full disk fails with ENOSPC, so N picks the file (and so the stage) where the command
fails. Afterwards:
- every rerun ends with exactly the clean run's outputs: the dataset's shards, tokenizer.json and
  manifest.json byte for byte; a run's final weights bit for bit (CPU, fp32), its losses and
  val_bpb; a study's runs, and its results.csv rows but for the timing columns;
- a full disk is one line, exit status 1, naming the file that could not be written;
- no attempt printed a traceback (a SIGKILLed one prints nothing; study workers' logs included).

Each command runs in an interpreter that has already imported smallscale and torch
(`Interpreters`), so a kill delay counts from the command's start, not from an import of seconds.
Kill delays are stratified: kill k of K lands at a seeded uniform point of the middle half of the
k-th K-th of the clean run's duration. Where each kill landed is printed (run with -s to see it).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from smallscale.launch import launch_env
from smallscale.study.executors import load_runs, read_status
from smallscale.train import checkpoint

from conftest import REPO, synthetic_docs

_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
# What `smallscale.launch` sets when a command starts, set beforehand: no command then re-executes its
# interpreter (which has imported torch already), and study workers start as a user's would.
ENV = {**_ENV, **launch_env(_ENV)}
TIMEOUT_S = 240
# An interpreter that imports what the commands need, says so, and runs the one command it is then
# given (argv, folder, file size limit) as `smallscale` would; it records how long the command ran.
# gc.freeze: the collector then skips the imports' objects at exit, which takes 0.1 s instead of 0.75.
WARM = textwrap.dedent("""
    import gc, json, os, resource, signal, sys, time
    from pathlib import Path
    import smallscale.cli, smallscale.data.shards, smallscale.study.executors, smallscale.train.trainer
    gc.freeze()
    order = Path(sys.argv[1])
    Path(f"{order}.ready").touch()
    while not order.exists():
        time.sleep(0.002)
    command = json.loads(order.read_text())
    os.chdir(command["cwd"])
    if command["max_file_bytes"] is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (command["max_file_bytes"], command["max_file_bytes"]))
    sys.argv = ["smallscale", *command["argv"]]
    started = time.monotonic()
    try:
        smallscale.cli.main()
    finally:
        if command["max_file_bytes"] is None:
            Path(f"{order}.seconds").write_text(f"{time.monotonic() - started:.6f}")
""")


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    seconds: float | None  # how long the command ran, its interpreter's exit not counted (recorded unlimited, unkilled)


class Command:
    def __init__(self, proc: subprocess.Popen, order: Path) -> None:
        self.proc, self.order, self.started = proc, order, time.monotonic()

    def finish(self) -> Outcome:
        out, err = self.proc.communicate(timeout=TIMEOUT_S)
        ran = Path(f"{self.order}.seconds")
        return Outcome(self.proc.returncode, out, err, float(ran.read_text()) if ran.exists() else None)

    def kill_at(self, delay_s: float) -> Outcome:
        """SIGKILL the command `delay_s` seconds after its start (if it still runs by then)."""
        time.sleep(max(0.0, self.started + delay_s - time.monotonic()))
        self.proc.kill()
        return self.finish()


class Interpreters:
    """Python processes that have imported smallscale and wait for one command each. While a command
    runs, the next interpreter imports (~2 s of CPU): on two cores, side by side, so every command
    starts at once and shares the machine the same way as every other."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.numbers = folder, itertools.count()
        self.spare = self._spawn()

    def _spawn(self) -> tuple[subprocess.Popen, Path]:
        order = self.folder / f"command-{next(self.numbers)}.json"
        proc = subprocess.Popen([sys.executable, "-c", WARM, str(order)], env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        return proc, order

    def start(self, argv: list[str], cwd: Path, max_file_bytes: int | None = None) -> Command:
        proc, order = self.spare
        wait_for(lambda: Path(f"{order}.ready").exists() or proc.poll() is not None, "an interpreter never got ready")
        assert proc.poll() is None, proc.communicate()
        self.spare = self._spawn()
        draft = order.with_suffix(".draft")
        draft.write_text(json.dumps({"argv": argv, "cwd": str(cwd), "max_file_bytes": max_file_bytes}))
        draft.rename(order)  # whole, or not there yet
        return Command(proc, order)

    def run(self, argv: list[str], cwd: Path, max_file_bytes: int | None = None) -> Outcome:
        return self.start(argv, cwd, max_file_bytes).finish()

    def close(self) -> None:
        self.spare[0].kill()
        self.spare[0].communicate()


def wait_for(condition: Callable[[], bool], failure: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(failure)
        time.sleep(0.005)


@pytest.fixture(scope="module")
def interpreters(tmp_path_factory):
    pool = Interpreters(tmp_path_factory.mktemp("interpreters"))
    yield pool
    pool.close()


def kill_delay(clean_s: float, stratum: int, strata: int) -> float:
    """A seeded uniform point of the middle half of the `stratum`-th of `strata` equal slices of the
    clean run's duration: the kills of a command spread over its run, no two close together."""
    return (stratum + 0.25 + 0.5 * random.Random(stratum).random()) / strata * clean_s


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


def assert_one_line_no_space(outcome: Outcome, path: str, then: str) -> None:
    """Exit status 1 and one line on stderr naming the file that could not be written and what to do."""
    assert outcome.rc == 1, outcome.err
    line = f"error: no space left writing {path} (File too large); free space and {then}"
    assert outcome.err.strip() == line, outcome.err


def landed(command: str, stratum: int, strata: int, delay_s: float, clean_s: float, killed: Outcome, where: str) -> None:
    fate = "killed" if killed.rc == -9 else f"not killed: it had ended (exit {killed.rc})"
    print(f"\n{command} kill {stratum + 1}/{strata}: at {delay_s:.2f} s of a {clean_s:.2f} s clean run, {fate}: {where}")


# ----------------------------------------------------------------------------- data prepare
PREPARE_KILLS = 3
PREPARE = ["data", "prepare", "CORPUS", "-o", "ds", "--vocab-size", "300", "--split-by", "line", "--workers", "1",
           "--shard-tokens", "100000"]  # fmt: skip
PARTS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Eight files (eight source parts, ~140 KB each), 12,000 one-line documents in all: ~1 s to prepare."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = synthetic_docs(12000, seed=7)
    for i in range(PARTS):
        (folder / f"part{i}.txt").write_text("\n".join(docs[i::PARTS]) + "\n", encoding="utf-8")
    return folder


def prepare_args(corpus: Path) -> list[str]:
    return [str(corpus) if a == "CORPUS" else a for a in PREPARE]


@pytest.fixture(scope="module")
def clean_dataset(interpreters, corpus, tmp_path_factory) -> tuple[Path, float]:
    """The dataset prepared once, undisturbed, and how long that took (seconds)."""
    cwd = tmp_path_factory.mktemp("clean-prepare")
    done = interpreters.run(prepare_args(corpus), cwd)
    assert done.rc == 0, done.err
    return cwd / "ds", done.seconds


def dataset_files(ds: Path) -> dict[str, bytes | None]:
    """The contents of a dataset folder (None for a folder, such as a work/ left behind), but for
    dot files (the lock, temp files) and the record of verified shards."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(ds.iterdir())
            if not p.name.startswith(".") and p.name != "verified.json"}  # fmt: skip


def prepare_stage(ds: Path) -> str:
    if (ds / "manifest.json").exists():
        return "after manifest.json, removing work/" if (ds / "work").exists() else "done (exiting)"
    shards = list(ds.glob("*-*.bin"))
    if shards:
        return f"assembling ({len(shards)} shard(s) written)"
    if (ds / "tokenizer.json").exists():
        return f"encoding ({len(list(ds.glob('work/part-*.done.json')))}/{PARTS} parts done)"
    return "reading the corpus and training the tokenizer"


@pytest.mark.slow
@pytest.mark.parametrize("stratum", range(PREPARE_KILLS))
def test_data_prepare_killed_anywhere_then_run_again_equals_a_clean_prepare(interpreters, corpus, clean_dataset, tmp_path, stratum):
    clean, clean_s = clean_dataset
    delay = kill_delay(clean_s, stratum, PREPARE_KILLS)
    killed = interpreters.start(prepare_args(corpus), tmp_path).kill_at(delay)
    landed("data prepare", stratum, PREPARE_KILLS, delay, clean_s, killed, prepare_stage(tmp_path / "ds"))
    again = interpreters.run(prepare_args(corpus), tmp_path)
    assert_no_traceback(killed.out, killed.err, again.out, again.err)
    assert again.rc == 0, again.err
    assert dataset_files(tmp_path / "ds") == dataset_files(clean)


# Each size stops `data prepare` at a later file; each attempt goes on from the one before.
PREPARE_FULL = [
    (0, ".smallscale.lock"),  # nothing fits: the owner record of the folder's lock
    (4096, "tokenizer.json"),  # ~8 KB: the trained tokenizer
    (65536, "work/part-000000.tokens.npy"),  # 121-125 KB each: encoding the first source part
    (150_000, "train-00000.bin"),  # 200 KB: assembling the first shard
]


@pytest.mark.slow
def test_data_prepare_on_a_disk_that_fills_at_each_stage_fails_in_one_line_then_finishes_like_a_clean_prepare(
    interpreters, corpus, clean_dataset, tmp_path
):
    for max_file_bytes, file in PREPARE_FULL:
        full = interpreters.run(prepare_args(corpus), tmp_path, max_file_bytes)
        print(f"\ndata prepare, files limited to {max_file_bytes:,} bytes: {full.err.strip()}")
        assert_one_line_no_space(full, f"ds/{file}", "run the same command again")
    again = interpreters.run(prepare_args(corpus), tmp_path)
    assert_no_traceback(again.out, again.err)
    assert again.rc == 0, again.err
    assert dataset_files(tmp_path / "ds") == dataset_files(clean_dataset[0])


def test_data_prepare_run_again_removes_the_work_files_of_one_killed_after_its_manifest(tmp_path):
    from smallscale.data.shards import PrepareConfig, prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_docs(300)), encoding="utf-8")
    cfg = PrepareConfig(source=str(corpus), out=str(tmp_path / "ds"), split_by="line", vocab_size=300, workers=1)
    manifest = prepare(cfg, progress=False)
    left = tmp_path / "ds" / "work" / "part-000000.tokens.npy"  # what a kill during the final removal of work/ leaves
    left.parent.mkdir()
    left.write_bytes(bytes(4096))
    assert prepare(cfg, progress=False) == manifest
    assert not left.parent.exists()


# ----------------------------------------------------------------------------- train
TRAIN_KILLS = 3
TRAIN_STEPS = 120
# ~2 s: timing the CPU's matmul peak (for MFU, ~1 s) before step 1, then 120 steps of ~4 ms;
# checkpoints at steps 30, 60, 90 and 120 (the last two kept); a metrics line (~270 bytes) a step.
# Energy is measured only where the disk fills: starting CodeCarbon costs ~3 s of CPU before step 1.
TRAIN = ["model.preset=cpu-500k", "model.seq_len=64", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
         "train.global_batch_tokens=1024", "train.micro_batch=16", "train.eval_batch=8", f"train.steps={TRAIN_STEPS}",
         "train.log_every_steps=1", "train.checkpoint_every_tokens=30720", "train.precision=fp32", "train.device=cpu"]  # fmt: skip
NO_ENERGY = "train.energy.measure=false"


def train_args(dataset: Path, *overrides: str) -> list[str]:
    return ["train", f"data.path={dataset}", "out=run", *TRAIN, *overrides, "--no-progress"]


def again_args(cwd: Path, first: list[str]) -> list[str]:
    """What a user runs after an interrupted `first` (a `train`): `resume` once the run exists
    (`train` into it is refused), else `first` again."""
    return ["resume", "run", "--no-progress"] if (cwd / "run" / "config.yaml").exists() else first


@pytest.fixture(scope="module")
def clean_run(interpreters, clean_dataset, tmp_path_factory) -> tuple[Path, float]:
    cwd = tmp_path_factory.mktemp("clean-train")
    done = interpreters.run(train_args(clean_dataset[0], NO_ENERGY), cwd)
    assert done.rc == 0, done.err
    return cwd / "run", done.seconds


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    found = checkpoint.latest(run / "checkpoints")
    assert found is not None, f"{run} has no checkpoint"
    return checkpoint.load_weights(found.path)


def assert_same_run(run: Path, clean: Path) -> None:
    """Bit-equal final weights, the same losses (steps strictly increasing) and the same val_bpb."""
    mine, reference = final_weights(run), final_weights(clean)
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in reference), f"{run} ended with other weights than a clean run"
    steps = [m["step"] for m in metrics(run)]
    assert all(a < b for a, b in itertools.pairwise(steps)), steps
    deterministic = ("step", "loss", "lr", "grad_norm", "val_loss", "val_bpb")
    assert [{k: m.get(k) for k in deterministic} for m in metrics(run)] == [{k: m.get(k) for k in deterministic} for m in metrics(clean)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_bpb"] == json.loads((clean / "summary.json").read_text())["val_bpb"]


def train_stage(run: Path) -> str:
    if (run / "summary.json").exists():
        return "done (exiting)"
    if not (run / "config.yaml").exists():
        return "setup, before config.yaml"
    in_flight = sorted((run / "checkpoints").glob(".tmp-step-*"))
    if in_flight:
        return f"writing checkpoint {in_flight[-1].name.removeprefix('.tmp-')}"
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    if not lines:
        return "setup, before step 1"
    done = json.loads(lines[-1])["step"] if lines[-1].endswith("}") else len(lines) - 1
    return f"step {done + 1} of {TRAIN_STEPS} (last checkpoint: {saved[-1] if saved else 'none'})"


@pytest.mark.slow
@pytest.mark.parametrize("stratum", range(TRAIN_KILLS))
def test_train_killed_anywhere_then_resumed_equals_a_clean_run(interpreters, clean_dataset, clean_run, tmp_path, stratum):
    clean, clean_s = clean_run
    delay = kill_delay(clean_s, stratum, TRAIN_KILLS)
    first = train_args(clean_dataset[0], NO_ENERGY)
    killed = interpreters.start(first, tmp_path).kill_at(delay)
    landed("train", stratum, TRAIN_KILLS, delay, clean_s, killed, train_stage(tmp_path / "run"))
    again = interpreters.run(again_args(tmp_path, first), tmp_path)
    assert_no_traceback(killed.out, killed.err, again.out, again.err)
    assert again.rc == 0, again.err
    assert_same_run(tmp_path / "run", clean)


# Each size stops `train` at a later file; each attempt goes on from the one before (`resume` once
# config.yaml exists; with no checkpoint written yet, each starts again from step 0).
TRAIN_FULL = [
    (0, ".smallscale.lock"),  # nothing fits: the owner record of the run's lock
    (4096, "metrics.jsonl"),  # ~270 bytes a step: full at step 16, before the first checkpoint
    (100_000, "checkpoints/step-00000030/model.safetensors"),  # 143 KB: the first checkpoint's weights
    (180_000, "checkpoints/step-00000030/optimizer.pt"),  # 216 KB: its optimizer state
]


@pytest.mark.slow
def test_train_on_a_disk_that_fills_at_each_stage_fails_in_one_line_then_resumes_like_a_clean_run(
    interpreters, clean_dataset, clean_run, tmp_path
):
    first = train_args(clean_dataset[0])  # energy measured: CodeCarbon's emissions.csv shares the disk
    for max_file_bytes, file in TRAIN_FULL:
        argv = again_args(tmp_path, first)
        full = interpreters.run(argv, tmp_path, max_file_bytes)
        print(f"\n{argv[0]}, files limited to {max_file_bytes:,} bytes: {full.err.strip()}")
        # `train` into a run that exists is refused: the way on is `resume`
        refused = argv[0] == "train" and (tmp_path / "run" / "config.yaml").exists()
        assert_one_line_no_space(full, f"run/{file}", "resume the run: smallscale resume run" if refused else "run the same command again")
    resumed = interpreters.run(again_args(tmp_path, first), tmp_path)
    assert_no_traceback(resumed.out, resumed.err)
    assert resumed.rc == 0, resumed.err
    assert_same_run(tmp_path / "run", clean_run[0])


# ----------------------------------------------------------------------------- study run
STUDY_KILLS = 2
# Measurements of the machine (time, memory, energy; the carbon intensity is co2_kg / energy_kwh, so
# it carries float noise across a resume) and the id (a hash of the run's absolute path), not
# results: every other column of a results.csv row must equal the clean study's.
MEASURED_COLUMNS = {"run_id", "wall_s", "tokens_per_s", "mfu", "peak_mem_bytes", "energy_j", "gpu_util", "energy_kwh",
                    "energy_gpu_kwh", "co2_kg", "carbon_intensity_g_per_kwh"}  # fmt: skip


@pytest.fixture(scope="module")
def study_file(corpus, tmp_path_factory) -> Path:
    """Two runs (seeds 0 and 1) of 30 steps, two workers at once; the dataset prepared while planning.
    Energy is not measured: CodeCarbon's start costs each worker ~3 s of CPU (the train tests measure it)."""
    spec = {
        "name": "faults",
        "datasets": {"syn": {"source": str(corpus), "vocab_size": 300, "split_by": "line", "workers": 1, "shard_tokens": 20000}},
        "base": {"model": {"preset": "cpu-500k", "seq_len": 64, "n_layer": 1, "d_model": 32, "n_head": 2},
                 "optim": {"name": "adamw", "lr": 3e-3},
                 "train": {"global_batch_tokens": 1024, "micro_batch": 16, "eval_batch": 8, "steps": 30, "log_every_steps": 1,
                           "checkpoint_every_tokens": 10240, "precision": "fp32", "device": "cpu", "energy": {"measure": False}}},
        "grid": {"train.seed": [0, 1]},
        "executor": {"kind": "pool", "workers": 2},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("study") / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def study_args(study_file: Path) -> list[str]:
    return ["study", "run", str(study_file), "-o", "out", "--no-progress"]


@pytest.fixture(scope="module")
def clean_study(interpreters, study_file, tmp_path_factory) -> tuple[Path, float]:
    cwd = tmp_path_factory.mktemp("clean-study")
    done = interpreters.run(study_args(study_file), cwd)
    assert done.rc == 0, done.err
    return cwd / "out", done.seconds


def results_by_seed(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        return {row["axis.train.seed"]: {k: v for k, v in row.items() if k not in MEASURED_COLUMNS} for row in csv.DictReader(f)}


def runs_by_seed(out: Path) -> dict[int, Path]:
    return {spec.axes["train.seed"]: out / "runs" / spec.id for spec in load_runs(out)}


def assert_same_study(out: Path, clean: Path) -> None:
    runs, reference = runs_by_seed(out), runs_by_seed(clean)
    assert runs.keys() == reference.keys()
    for seed, run in runs.items():
        assert read_status(out, run.name)["state"] == "done"
        assert_same_run(run, reference[seed])
    rows, clean_rows = results_by_seed(out), results_by_seed(clean)
    assert rows.keys() == clean_rows.keys()
    differing = {seed: {k: (v, clean_rows[seed].get(k)) for k, v in row.items() if v != clean_rows[seed].get(k)} for seed, row in rows.items()}
    assert not any(differing.values()), differing
    assert_no_traceback(*(p.read_text() for p in out.glob("runs/*/log.txt")))


def study_stage(out: Path) -> str:
    if not (out / "manifest.json").exists():
        return f"planning: data prepare, {prepare_stage(out / 'data' / 'syn')}"
    runs = runs_by_seed(out)
    if all(read_status(out, run.name)["state"] == "done" for run in runs.values()):
        return "done (exiting)" if (out / "report" / "index.html").exists() else "results and report"
    return "; ".join(f"seed {seed}: {run_stage(run)}" for seed, run in sorted(runs.items()))


def run_stage(run: Path) -> str:
    """Where a study's run was: not started, its worker starting (importing), or a `train_stage`."""
    if (run / "config.yaml").exists():
        return train_stage(run)
    return "worker starting" if (run / "log.txt").exists() else "not started"


@pytest.mark.slow
@pytest.mark.parametrize("stratum", range(STUDY_KILLS))
def test_study_killed_anywhere_then_run_again_equals_a_clean_study(interpreters, study_file, clean_study, tmp_path, stratum):
    clean, clean_s = clean_study
    delay = kill_delay(clean_s, stratum, STUDY_KILLS)
    killed = interpreters.start(study_args(study_file), tmp_path).kill_at(delay)
    landed("study run", stratum, STUDY_KILLS, delay, clean_s, killed, study_stage(tmp_path / "out"))
    again = interpreters.run(study_args(study_file), tmp_path)
    assert_no_traceback(killed.out, killed.err, again.out, again.err)
    assert again.rc == 0, again.err
    assert_same_study(tmp_path / "out", clean)


@pytest.mark.slow
def test_study_worker_on_a_full_disk_fails_its_run_in_one_line_and_the_rerun_finishes_it(
    interpreters, study_file, clean_study, tmp_path
):
    # The dataset (parts up to 125,362 bytes, shards 40 KB) fits; each run's first checkpoint (143,488 bytes of weights) does not.
    full = interpreters.run(study_args(study_file), tmp_path, max_file_bytes=134_000)
    assert full.rc == 1, full.err
    assert_no_traceback(full.out, full.err)
    out = tmp_path / "out"
    for run in runs_by_seed(out).values():
        status = read_status(out, run.name)
        weights = Path("out", "runs", run.name, "checkpoints", "step-00000010", "model.safetensors")
        assert status["state"] == "failed"
        assert status["error"] == f"no space left writing {weights} (File too large); free space and run the same command again"
        assert_no_traceback((run / "log.txt").read_text())
    again = interpreters.run(study_args(study_file), tmp_path)
    assert_no_traceback(again.out, again.err)
    assert again.rc == 0, again.err
    assert_same_study(out, clean_study[0])
