"""Live progress of a study, from the files its runs write (status.json, metrics.jsonl).

`study run` and `study status --watch` show the same view, whoever trains the runs:
- in a terminal, a study bar (runs done / total, elapsed, ETA) over one bar per running run (stage,
  step, loss, tokens/s, tokens trained of the run's planned tokens);
- elsewhere (a log file, CI, SLURM), plain lines: one when a run starts and one when it ends, and a
  progress line at most every `every_s` seconds (30 by default) while runs are going.

ETA: the tokens the unfinished runs still have to train (planned: train.steps or train.tokens, in
whole global batches) divided by the study's measured rate: the tokens trained since this view
started, evaluations and startup included (they take wall time too), over the seconds since then.
Before any token is measured there is no ETA ("ETA -").

The worker processes never talk to this view: it reads the run folders, so what it shows is what a
second terminal or a crashed-and-restarted `study run` would see.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from smallscale.study.grid import RunSpec

TAIL_BYTES = 8192  # the last records of metrics.jsonl: enough for a few lines, however long the file


def planned_tokens(config: dict[str, Any]) -> int:
    """Tokens a run trains: whole global batches, as the trainer plans them (`plan_batches`)."""
    train = config.get("train", {})
    batch = int(train.get("global_batch_tokens") or 0)
    steps = train.get("steps")
    if steps is None:
        steps = max(1, int(train.get("tokens") or 0) // batch) if batch else 0
    return int(steps) * batch


def last_record(metrics: Path) -> dict[str, Any] | None:
    """The newest complete training record (one with a loss) of a metrics.jsonl, reading only its end;
    None when there is none yet. A partial last line (being written) is skipped."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("tokens"), int) and "loss" in record:
            return record
    return None


@dataclass
class RunView:
    """What the view knows of one running run."""

    id: str
    stage: str
    planned: int
    tokens: int = 0
    step: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None

    def describe(self) -> str:
        parts = [self.id, self.stage]
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        if self.planned:
            parts.append(f"{100 * min(self.tokens, self.planned) / self.planned:.0f}%")
        return " ".join(parts)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StudyProgress:
    """The view over `runs` of `study_dir`. Call `started` / `finished` / `note` as runs come and
    go (the executor knows when), `refresh(active)` often (it rate-limits itself), `stop` at the end.
    `interactive`: rich bars (True) or plain lines (False); default: whether `stream` is a terminal."""

    def __init__(
        self,
        study_dir: str | Path,
        runs: Sequence[RunSpec],
        done: int = 0,
        interactive: bool | None = None,
        every_s: float = 30.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.study_dir = Path(study_dir)
        self.planned = {r.id: planned_tokens(r.config) for r in runs}
        self.total = len(runs)
        self.done = done
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every_s = every_s
        self.clock = clock
        self.t0 = clock()
        self.last_line = self.t0
        self.finished_tokens = 0  # planned tokens of the runs finished under this view
        self.base_tokens: dict[str, int] = {}  # tokens a run had when first seen (trained before this view)
        self.views: dict[str, RunView] = {}
        self._bars: Any = None
        self._study_task: Any = None
        self._run_tasks: dict[str, Any] = {}
        if self.interactive:
            self._start_bars()

    # ------------------------------------------------------------------ events
    def started(self, run_id: str) -> None:
        self.views[run_id] = self._read(run_id)
        self._line(f"run {run_id} started ({self.done}/{self.total} done)")
        self.refresh([*self.views], force=False)

    def finished(self, run_id: str, state: str, counted: bool = True) -> None:
        """`run_id` ended in `state`; `counted`: it now counts as done for the study bar."""
        self.views.pop(run_id, None)
        if counted:
            self.done += 1
            self.finished_tokens += max(0, self.planned.get(run_id, 0) - self.base_tokens.get(run_id, 0))
        status = self._status(run_id)
        detail = ""
        if state == "done" and isinstance(status.get("val_bpb"), float):
            detail = f", val_bpb {status['val_bpb']:.4f}"
        elif state == "failed" and status.get("error"):
            detail = f": {' '.join(str(status['error']).split())[:200]}"
        took = ""
        if isinstance(status.get("started"), (int, float)) and isinstance(status.get("finished"), (int, float)):
            took = f" in {format_duration(status['finished'] - status['started'])}"
        self._line(f"run {run_id} {state}{took}{detail} ({self.done}/{self.total} done)")
        if self._bars is not None and run_id in self._run_tasks:
            self._bars.remove_task(self._run_tasks.pop(run_id))
        self.refresh([*self.views], force=False)

    def note(self, text: str, counted: bool = False) -> None:
        """A line about the study (a run skipped, done by another process); `counted` adds a done run."""
        self.done += counted
        self._line(text)

    # ------------------------------------------------------------------ state
    def _status(self, run_id: str) -> dict[str, Any]:
        from smallscale.study.executors import read_status

        try:
            return read_status(self.study_dir, run_id)
        except (OSError, ValueError):
            return {"state": "pending"}

    def _read(self, run_id: str) -> RunView:
        from smallscale.study.executors import run_dir

        status = self._status(run_id)
        view = RunView(run_id, str(status.get("stage") or status.get("state") or "starting"), self.planned.get(run_id, 0))
        record = last_record(run_dir(self.study_dir, run_id) / "metrics.jsonl")
        if record is not None:
            view.tokens, view.step, view.loss = int(record["tokens"]), record.get("step"), record.get("loss")
            view.tokens_per_s = record.get("tokens_per_s")
        self.base_tokens.setdefault(run_id, view.tokens)
        return view

    def trained_tokens(self) -> int:
        """Tokens trained since this view started, by finished and running runs."""
        live = sum(max(0, v.tokens - self.base_tokens.get(v.id, 0)) for v in self.views.values())
        return self.finished_tokens + live

    def eta_s(self, pending: Sequence[str] = ()) -> float | None:
        """Seconds until the running runs and `pending` ones finish at the measured rate; None before
        any token is measured."""
        elapsed = self.clock() - self.t0
        trained = self.trained_tokens()
        if trained <= 0 or elapsed <= 0:
            return None
        left = sum(max(0, v.planned - v.tokens) for v in self.views.values())
        left += sum(self.planned.get(r, 0) for r in pending)
        return left / (trained / elapsed)

    def refresh(self, active: Sequence[str], pending: Sequence[str] = (), force: bool = False) -> None:
        """Re-read the running runs `active`; redraw the bars, or print a progress line if
        `every_s` seconds have passed since the last line (or `force`)."""
        self.views = {run_id: self._read(run_id) for run_id in active}
        eta = self.eta_s(pending)
        if self._bars is not None:
            self._draw(eta)
            return
        now = self.clock()
        if self.views and (force or now - self.last_line >= self.every_s):
            running = "; ".join(v.describe() for v in self.views.values())
            self._line(f"progress: {self.done}/{self.total} runs done, {format_duration(now - self.t0)} elapsed, "
                       f"ETA {format_duration(eta)}; running: {running}")  # fmt: skip

    def stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    # ------------------------------------------------------------------ output
    def _line(self, text: str) -> None:
        self.last_line = self.clock()
        if self._bars is not None:
            self._bars.console.print(text, highlight=False)
        else:
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] {text}", file=self.stream, flush=True)

    def _start_bars(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bars = Progress(TextColumn("{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              TextColumn("{task.fields[info]}"), console=Console(file=self.stream))  # fmt: skip
        self._study_task = self._bars.add_task("study", total=self.total, completed=self.done, label="study", info="ETA -")
        self._bars.start()

    def _draw(self, eta: float | None) -> None:
        bars = self._bars
        bars.update(self._study_task, completed=self.done, info=f"ETA {format_duration(eta)}")
        for run_id in [r for r in self._run_tasks if r not in self.views]:
            bars.remove_task(self._run_tasks.pop(run_id))
        for run_id, view in self.views.items():
            if run_id not in self._run_tasks:
                self._run_tasks[run_id] = bars.add_task(run_id, total=max(1, view.planned), label=f"  {run_id}", info="")
            info = view.describe().removeprefix(run_id).strip()
            bars.update(self._run_tasks[run_id], completed=min(view.tokens, max(1, view.planned)), info=info)


def watch(
    study_dir: str | Path,
    runs: Sequence[RunSpec],
    every_s: float = 30.0,
    poll_s: float = 1.0,
    interactive: bool | None = None,
    stream: TextIO | None = None,
    max_idle_polls: int = 3,
) -> None:
    """Follow a study that other processes run (`study status --watch`): the view of `StudyProgress`,
    its start and end lines taken from the runs' status files. Returns once no run is running and
    none has changed state for `max_idle_polls` polls in a row (the study finished, or nothing works
    on it), or on Ctrl-C."""
    from smallscale.study.executors import read_status

    def states() -> dict[str, str]:
        return {r.id: read_status(study_dir, r.id)["state"] for r in runs}

    seen = states()
    ended = ("done", "failed")
    view = StudyProgress(study_dir, runs, done=sum(s in ended for s in seen.values()), interactive=interactive,
                         every_s=every_s, stream=stream)  # fmt: skip
    for run_id in [r for r, s in seen.items() if s == "running"]:
        view.started(run_id)
    idle = 0
    try:
        while True:
            now = states()
            for run_id, state in now.items():
                before = seen[run_id]
                if state == before:
                    continue
                if state == "running":
                    view.started(run_id)
                elif before == "running" or state in ended:
                    view.finished(run_id, state, counted=state in ended and before not in ended)
            seen = now
            running = [r for r, s in now.items() if s == "running"]
            view.refresh(running, [r for r, s in now.items() if s in ("pending", "interrupted")])
            idle = 0 if running else idle + 1
            if idle >= max_idle_polls:
                counts = {s: sum(v == s for v in now.values()) for s in dict.fromkeys(now.values())}
                view.note("no run is running: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
                return
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return
    finally:
        view.stop()
