"""The cluster executor: one SLURM array task per run, through submitit.

A preempted or timed-out task is requeued by submitit (`Checkpointable.checkpoint`), and the run
picks up from its latest checkpoint because `run_one` always resumes. `cluster="local"` runs the
same jobs with submitit's local executor (what the tests use; no SLURM needed).

A run is trained only under its run directory's lock (`run_one`, see smallscale/lock.py: on a
cluster the lock lives on the shared filesystem, so it holds across nodes). A requeued task and a
task of a manual rerun (`smallscale study run` again, which resubmits every run not done and not
owned) may both start one run: the first takes the lock and trains, the other returns at once
without touching the run (`{"state": "running", "owner": ...}`), and its driver waits for the owner
(executors.execute). A killed task's lock ends with its process, so the requeued task takes over
at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import submitit

from smallscale.io import atomic_write_json
from smallscale.lock import FolderBusy


class RunJob(submitit.helpers.Checkpointable):
    """Picklable job: run (or resume) one run of a study. The inherited `checkpoint` resubmits the
    same call on preemption/timeout, which resumes from the run's checkpoint."""

    def __call__(self, study_dir: str, run_id: str) -> dict[str, Any]:
        from smallscale.study.executors import run_one

        try:
            return run_one(study_dir, run_id)
        except FolderBusy as busy:  # another task or process trains this run: leave it to them
            return {"state": "running", "owner": busy.owner.describe(), "skipped": str(busy)}


def make_executor(folder: Path, parameters: dict[str, Any], cluster: str | None, name: str) -> submitit.AutoExecutor:
    """A submitit executor logging to FOLDER/<job id>/, with `parameters` (submitit's names, e.g.
    slurm_partition, timeout_min, cpus_per_task, mem_gb) and `name` unless they name the job."""
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
    executor.update_parameters(**{"name": name, **parameters})
    return executor


def submit(study_dir: Path, run_ids: list[str], parameters: dict[str, Any], cluster: str | None = None) -> list[Any]:
    """Submit one array job; adds its tasks to STUDY_DIR/slurm/jobs.json (run id -> latest job id)."""
    executor = make_executor(study_dir / "slurm", parameters, cluster, name=f"smallscale-{study_dir.name}")
    jobs = executor.map_array(RunJob(), [str(study_dir)] * len(run_ids), run_ids) if run_ids else []
    index = study_dir / "slurm" / "jobs.json"
    known = json.loads(index.read_text(encoding="utf-8")) if index.exists() else {}
    atomic_write_json(index, {**known, **{rid: job.job_id for rid, job in zip(run_ids, jobs, strict=True)}})
    return jobs


def submit_and_wait(study_dir: Path, run_ids: list[str], parameters: dict[str, Any], cluster: str | None = None) -> None:
    """Submit and block until every job has finished (a failed job is recorded by its run's status)."""
    from smallscale.study.executors import record_failure, run_dir

    for run_id, job in zip(run_ids, submit(study_dir, run_ids, parameters, cluster), strict=True):
        try:
            job.result()
        except Exception as exc:  # the job died outside run_one (e.g. killed); record it on the run
            record_failure(run_dir(study_dir, run_id), f"submitit job {job.job_id}: {str(exc).strip()[-300:]}")
