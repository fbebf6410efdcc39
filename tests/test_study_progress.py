"""Live study progress (smallscale/study/progress.py): what `study run` and `study status --watch`
print, read from the run folders; plain lines (start, end, a progress line at most every 30 s)
when the output is not a terminal, with an ETA from the measured rate."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smallscale.study.grid import RunSpec
from smallscale.study.progress import StudyProgress, last_record, planned_tokens, watch

from conftest import REPO
from test_study import write_study


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def spec(run_id: str, tokens: int = 1000) -> RunSpec:
    return RunSpec(run_id, {}, {"train": {"tokens": tokens, "steps": None, "global_batch_tokens": 100}}, "syn")


def write_run(study: Path, run_id: str, status: dict, records: list[dict] = (), partial: str = "") -> None:
    folder = study / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + partial)


def lines(stream: io.StringIO) -> list[str]:
    return [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in stream.getvalue().splitlines()]


def test_planned_tokens_are_whole_global_batches_as_the_trainer_plans_them():
    assert planned_tokens({"train": {"tokens": 1050, "steps": None, "global_batch_tokens": 100}}) == 1000
    assert planned_tokens({"train": {"tokens": 99, "steps": None, "global_batch_tokens": 100}}) == 100  # at least one step
    assert planned_tokens({"train": {"tokens": None, "steps": 7, "global_batch_tokens": 100}}) == 700


def test_last_record_reads_the_newest_training_record_and_skips_a_line_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "tokens": 100 * s, "loss": 5.0 - s / 100} for s in range(1, 2000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 2000, "tok')
    assert path.stat().st_size > 4 * 8192  # only the end is read
    assert last_record(path) == records[-1]
    assert last_record(tmp_path / "missing.jsonl") is None


def test_plain_output_prints_starts_ends_and_a_progress_line_at_most_every_30_s(tmp_path):
    study, clock, out = tmp_path, Clock(), io.StringIO()
    write_run(study, "a", {"state": "running", "stage": "train"})
    view = StudyProgress(study, [spec("a"), spec("b")], interactive=False, stream=out, clock=clock)
    view.started("a")
    assert lines(out) == ["run a started (0/2 done)"]

    write_run(study, "a", {"state": "running", "stage": "train"}, [{"step": 2, "tokens": 200, "loss": 4.25, "tokens_per_s": 1234.5}])
    for t in (10, 20, 29.9):
        clock.t = 1000 + t
        view.refresh(["a"], ["b"])
    assert len(lines(out)) == 1  # nothing before 30 s
    write_run(study, "a", {"state": "running", "stage": "train"}, [{"step": 3, "tokens": 300, "loss": 4.0, "tokens_per_s": 1000.0}])
    clock.t = 1030
    view.refresh(["a"], ["b"])
    # 300 tokens in 30 s: 10 tok/s; left: 700 of a and 1000 of b -> 170 s
    assert lines(out)[-1] == "progress: 0/2 runs done, 0:30 elapsed, ETA 2:50; running: a train step 3 loss 4.000 1,000 tok/s 30%"
    clock.t = 1040
    view.refresh(["a"], ["b"])
    assert len(lines(out)) == 2  # the next one 30 s after the last

    write_run(study, "a", {"state": "done", "val_bpb": 2.5, "started": 100.0, "finished": 165.0})
    view.finished("a", "done")
    assert lines(out)[-1] == "run a done in 1:05, val_bpb 2.5000 (1/2 done)"
    assert view.trained_tokens() == 1000  # a's planned tokens, all trained under this view


def test_a_run_resumed_midway_counts_only_what_it_trains_now_in_the_rate(tmp_path):
    clock, out = Clock(), io.StringIO()
    write_run(tmp_path, "a", {"state": "running", "stage": "train"}, [{"step": 5, "tokens": 500, "loss": 3.0}])
    view = StudyProgress(tmp_path, [spec("a")], interactive=False, stream=out, clock=clock)
    view.started("a")  # 500 tokens trained by an earlier process
    clock.t = 1010
    write_run(tmp_path, "a", {"state": "running", "stage": "train"}, [{"step": 6, "tokens": 600, "loss": 3.0}])
    view.refresh(["a"])
    assert view.trained_tokens() == 100
    assert view.eta_s() == pytest.approx(400 / (100 / 10))


def test_no_eta_before_a_token_is_measured(tmp_path):
    view = StudyProgress(tmp_path, [spec("a")], interactive=False, stream=io.StringIO(), clock=Clock())
    assert view.eta_s(["a"]) is None


def test_a_failed_run_ends_with_its_error_in_one_line(tmp_path):
    out = io.StringIO()
    write_run(tmp_path, "a", {"state": "failed", "error": "NonFiniteError: loss is nan\nat step 3"})
    view = StudyProgress(tmp_path, [spec("a")], interactive=False, stream=out, clock=Clock())
    view.finished("a", "failed")
    assert lines(out) == ["run a failed: NonFiniteError: loss is nan at step 3 (1/1 done)"]


def test_watch_follows_runs_that_another_process_finishes(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    write_run(tmp_path, "a", {"state": "done", "val_bpb": 3.0})
    write_run(tmp_path, "b", {"state": "failed", "error": "boom"})
    out = io.StringIO()
    watch(tmp_path, [spec("a"), spec("b")], poll_s=0.0, interactive=False, stream=out)
    assert lines(out) == ["no run is running: 1 done, 1 failed"]


@pytest.mark.slow
def test_study_run_into_a_log_file_prints_plain_lines_per_run(tmp_path, tiny_dataset):
    study = write_study(tmp_path / "s.yaml", tiny_dataset, grid={"model.position": ["rope", "learned"], "tokens": [4096]})
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "smallscale.cli", "study", "run", str(study), "-o", "out", "--no-report"],
                              cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\x1b[" not in text  # no terminal control codes in a log
    body = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in text.splitlines()]
    runs = sorted({m[1] for line in body if (m := re.match(r"run (\S+) started", line))})
    assert len(runs) == 2
    for run_id in runs:
        assert any(re.fullmatch(rf"run {re.escape(run_id)} done in \d+:\d\d, val_bpb \d\.\d{{4}} \([12]/2 done\)", line) for line in body), text
