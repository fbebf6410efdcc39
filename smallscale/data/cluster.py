"""`data prepare --executor slurm` (or `submitit-local`): the preparation's steps as SLURM jobs.

The command (on a login node, say) resolves the source, holds the dataset folder's lock, submits
and waits; every heavy step runs in jobs, through submitit:
1. tokenizer training: one job (none when tokenizer.json exists or is given);
2. encoding: one job array; task t of T encodes parts t, t+T, t+2T, ... (T = --workers, at most the
   number of parts). A part is written whole or not at all, so a killed, preempted or timed-out task
   loses at most the part it was encoding: its requeue (submitit checkpointing) and any rerun of the
   command skip every finished part;
3. merge: one job writes the shards and manifest.json (one pass over the encoded parts).
The jobs run the very functions of the local executor (`shards._train_tokenizer_file`,
`shards._encode_part`, `shards._merge`) on the same files, in the command's working directory, so
the dataset equals a local `data prepare` of the same source and settings, token for token.

Job logs are in OUT/work/slurm/ (removed with work/ when the dataset is complete). The folder and
the source must be on a filesystem the compute nodes share. If the command itself is killed, cancel
its jobs (`scancel`) before running it again. `submitit-local` runs the same jobs as local processes
(what the tests use; no SLURM needed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from smallscale.errors import UserError
from smallscale.study.slurm import make_executor


@dataclass(frozen=True)
class _Refused:
    """A UserError raised in a job, carried back as a value so the command prints its one line."""

    message: str


def _encode_parts(encode: Callable[[Any], Any], jobs: Sequence[Any]) -> list[Any]:
    return [encode(job) for job in jobs]


class _Step(submitit.helpers.Checkpointable):
    """One step in the command's working directory; on preemption or timeout submitit requeues the
    same call (`checkpoint`), which skips the parts already finished."""

    def __call__(self, cwd: str, fn: Callable[..., Any], *args: Any) -> Any:
        os.chdir(cwd)
        try:
            return fn(*args)
        except UserError as exc:
            return _Refused(str(exc))


class ArraySteps:
    """`shards.Steps` on SLURM (`cluster=None`) or submitit's local executor (`cluster="local"`)."""

    def __init__(self, folder: Path, parameters: dict[str, Any], cluster: str | None, tasks: int, progress: bool):
        self.folder, self.parameters, self.cluster, self.tasks, self.progress = folder, parameters, cluster, tasks, progress
        self.step = _Step()

    def _executor(self, name: str) -> submitit.AutoExecutor:
        return make_executor(self.folder, self.parameters, self.cluster, name=f"smallscale-prepare-{name}")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        step = fn.__name__.strip("_").replace("_", "-")  # train-tokenizer-file, merge
        job = self._executor(step).submit(self.step, os.getcwd(), fn, *args)
        self._say(f"submitted {step} as job {job.job_id}; logs in {self.folder}")
        return _outcome(job, f"job {job.job_id} ({step})")

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[Any]:
        tasks = max(1, min(self.tasks, len(jobs)))
        groups = [list(jobs[t::tasks]) for t in range(tasks)]
        n = len(groups)
        array = self._executor("encode").map_array(self.step, [os.getcwd()] * n, [_encode_parts] * n, [fn] * n, groups)
        self._say(f"submitted encoding of {len(jobs)} part(s) as a job array of {n} task(s) "
                  f"({array[0].job_id.split('_')[0] if array else '-'}); logs in {self.folder}")  # fmt: skip
        return [result for job in array for result in _outcome(job, f"array task {job.job_id} (encoding)")]

    def _say(self, message: str) -> None:
        if self.progress:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(message, highlight=False, markup=False)


def _outcome(job: Any, what: str) -> Any:
    """The job's result; a UserError in the job is raised here as it was; a job that ended without
    a result (killed, out of memory or time and not requeued) is one line saying how to go on."""
    try:
        result = job.result()
    except UncompletedJobError:
        raise UserError(
            f"{what} ended without finishing (killed, or out of memory or time; see its log in {job.paths.folder}); "
            "run the same command again: finished parts are kept"
        ) from None
    if isinstance(result, _Refused):
        raise UserError(result.message)
    return result
