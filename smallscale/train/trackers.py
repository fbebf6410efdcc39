"""Experiment trackers fed from metrics.jsonl: TensorBoard, Weights & Biases, trackio, MLflow.

metrics.jsonl stays the source of truth. The trainer writes each record there first and then hands
the same dict to the run's trackers (`train.trackers: [tensorboard, wandb]`, default none), on rank 0
only; `replay` feeds a finished run's files to a tracker after the fact (`smallscale study sync`).
A study labels each run with the study's name as its group and the run's axis values as tags and
hyperparameters, so a tracker's runs table is the study grid.

    tensorboard  event files in RUN_DIR/tensorboard (`tensorboard --logdir STUDY_DIR/runs`); the
                 final metrics and the config go to the HParams table
    wandb        RUN_DIR/wandb; online when WANDB_MODE says so or wandb has an API key (WANDB_API_KEY
                 or `wandb login`), else offline (upload later with `wandb sync RUN_DIR/wandb/offline-run-*`)
    trackio      trackio's local database ($TRACKIO_DIR, default ~/.cache/huggingface/trackio)
    mlflow       MLflow's tracking store ($MLFLOW_TRACKING_URI, default MLflow's own)

Trackers are optional extras (`pip install 'smallscale[trackers]'` for TensorBoard and W&B,
`smallscale[trackio]`, `smallscale[mlflow]`); a tracker's package is imported only when a run asks for it. A tracker that fails, at start or later (not installed, no network, a
bug in its library), warns once and is dropped: it never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

TrackerName = Literal["tensorboard", "wandb", "trackio", "mlflow"]
TRACKERS: tuple[str, ...] = get_args(TrackerName)
EXTRAS = {"tensorboard": "trackers", "wandb": "trackers", "trackio": "trackio", "mlflow": "mlflow"}  # pip extras
NOT_METRICS = {"step"}  # the x-axis of every record, not a series of its own


@dataclass(frozen=True)
class RunLabels:
    """How a run is labelled in a tracker: its study (the group) and its axis values (the tags)."""

    group: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunInfo:
    run_dir: Path
    name: str  # the run's folder name (a study's run id)
    config: dict[str, Any]  # the resolved run config, as written to config.yaml
    project: str  # train.tracker_project
    labels: RunLabels = RunLabels()
    start_step: int = 0  # a resumed run starts after this step: trackers drop what they hold beyond it


class Tracker(Protocol):
    def start(self, info: RunInfo) -> None: ...

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: `step` and numbers (loss, lr, val_bpb, ...)."""

    def finish(self, final: dict[str, Any]) -> None:
        """`final`: the run's last numbers (summary.json, eval results) for the tracker's runs table."""


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record, `step` excepted (booleans and text are not series)."""
    return {k: float(v) for k, v in record.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1e-3}}` -> `{"optim.lr": 1e-3}`; lists as JSON text, None as "null" (what
    hyperparameter tables accept: numbers, text, booleans)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def hyperparameters(info: RunInfo) -> dict[str, Any]:
    """The run's axis values (`axis.<name>`) and its flattened config."""
    axes = flat_config({"axis": info.labels.tags}) if info.labels.tags else {}
    return {**axes, **flat_config(info.config)}


# ----------------------------------------------------------------------------- adapters
class TensorBoardTracker:
    """Scalars at each record's step in RUN_DIR/tensorboard; at the end the hyperparameters with
    the final metrics (as `final/<name>`, apart from the curves) in the same folder."""

    def start(self, info: RunInfo) -> None:
        # torch's writer; it needs the tensorboard package
        from torch.utils.tensorboard import SummaryWriter

        self._info = info
        # purge_step: TensorBoard hides what an interrupted session logged beyond the checkpoint
        # this one resumes from (metrics.jsonl is truncated the same way).
        self._writer = SummaryWriter(log_dir=str(info.run_dir / "tensorboard"), purge_step=info.start_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, global_step=record["step"])

    def finish(self, final: dict[str, Any]) -> None:
        metrics = {f"final/{k}": v for k, v in scalars(final).items()}
        if metrics:
            self._writer.add_hparams(hyperparameters(self._info), metrics, run_name=".", global_step=final.get("steps"))
        self._writer.close()


def wandb_mode() -> str:
    """WANDB_MODE if set; else online with an API key (WANDB_API_KEY or ~/.netrc from `wandb
    login`), offline without one: a machine without W&B credentials never tries the network."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        credentials = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        credentials = None
    return "online" if credentials else "offline"


class WandbTracker:
    """A W&B run in RUN_DIR/wandb: group = study, tags = `axis=value`, config = the run config plus
    `axis`. Its id comes from the run folder, so a resumed run continues the same W&B run."""

    def __init__(self, fresh_id: bool = False) -> None:
        self.fresh_id = fresh_id  # replays make new W&B runs rather than append to a trained one

    def start(self, info: RunInfo) -> None:
        import wandb

        run_id = None if self.fresh_id else hashlib.sha1(str(info.run_dir.resolve()).encode()).hexdigest()[:16]
        config = {**info.config, **({"axis": info.labels.tags} if info.labels.tags else {})}
        self._run = wandb.init(
            project=info.project, name=info.name, group=info.labels.group, config=config,
            tags=[f"{k}={v}"[:64] for k, v in info.labels.tags.items()], dir=str(info.run_dir), id=run_id,
            resume="allow" if run_id else None, mode=wandb_mode(),
            settings=wandb.Settings(console="off", silent=True, save_code=False),
        )  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        self._run.log(scalars(record), step=record["step"])

    def finish(self, final: dict[str, Any]) -> None:
        self._run.summary.update(scalars(final))
        self._run.finish()


class TrackioTracker:
    """A trackio run (group = study, config = the flattened run config plus `axis`); trackio keeps
    no summary, so its runs table shows each series' last value."""

    def start(self, info: RunInfo) -> None:
        import trackio

        self._trackio = trackio
        config = {**flat_config(info.config), **({"axis": info.labels.tags} if info.labels.tags else {})}
        trackio.init(project=info.project, name=info.name, group=info.labels.group, config=config, resume="allow",
                     embed=False, auto_log_cpu=False, auto_log_gpu=False)  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        self._trackio.log(scalars(record), step=record["step"])

    def finish(self, final: dict[str, Any]) -> None:
        self._trackio.finish()


class MlflowTracker:
    """An MLflow run in the experiment `project`: tags `group` and `axis.<name>`, params = the
    flattened config (values cut to MLflow's 6000 characters)."""

    def start(self, info: RunInfo) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_experiment(info.project)
        tags = {**({"group": info.labels.group} if info.labels.group else {}),
                **{f"axis.{k}": str(v) for k, v in info.labels.tags.items()}}  # fmt: skip
        mlflow.start_run(run_name=info.name, tags=tags)
        mlflow.log_params({k: str(v)[:6000] for k, v in hyperparameters(info).items()})

    def log(self, record: dict[str, Any]) -> None:
        self._mlflow.log_metrics(scalars(record), step=record["step"])

    def finish(self, final: dict[str, Any]) -> None:
        self._mlflow.log_metrics({f"final/{k}": v for k, v in scalars(final).items()})
        self._mlflow.end_run()


ADAPTERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker, "mlflow": MlflowTracker}


# ----------------------------------------------------------------------------- the set a run uses
class Trackers:
    """The trackers of one run. Every call is guarded: a tracker that raises warns once, naming
    itself and the error, and is dropped for the rest of the run."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self._trackers = dict(trackers)

    @property
    def names(self) -> list[str]:
        return list(self._trackers)

    def start(self, info: RunInfo) -> None:
        for name in list(self._trackers):
            self._call(name, "start", info)

    def log(self, record: dict[str, Any]) -> None:
        for name in list(self._trackers):
            self._call(name, "log", record)

    def finish(self, final: dict[str, Any]) -> list[str]:
        """Finish every tracker; returns those that took the whole run."""
        for name in list(self._trackers):
            self._call(name, "finish", final)
        finished = self.names
        self._trackers.clear()
        return finished

    def _call(self, name: str, method: str, arg: Any) -> None:
        try:
            getattr(self._trackers[name], method)(arg)
        except Exception as exc:  # a tracker's library may raise anything; the run goes on without it
            missing = isinstance(exc, ImportError) and method == "start"
            why = f"{name} is not installed (pip install 'smallscale[{EXTRAS[name]}]')" if missing else f"{type(exc).__name__}: {exc}"
            warnings.warn(f"tracker {name!r} disabled: {why}; metrics.jsonl still has every record", stacklevel=3)
            del self._trackers[name]


def open_trackers(names: list[str], info: RunInfo, fresh_ids: bool = False) -> Trackers:
    """Start the named trackers for a run (each guarded: see `Trackers`)."""
    trackers = Trackers({name: WandbTracker(fresh_ids) if name == "wandb" else ADAPTERS[name]() for name in names})
    trackers.start(info)
    return trackers


def replay(run_dir: Path, names: list[str], project: str, labels: RunLabels) -> list[str]:
    """Feed a finished run's metrics.jsonl, summary.json and eval/*.json to the named trackers, as
    if they had watched it; returns the trackers that took it all. TensorBoard's event files are
    written anew; W&B gets a new run each time."""
    from smallscale.config import read_yaml
    from smallscale.eval.runs import read_metrics

    info = RunInfo(run_dir=run_dir, name=run_dir.name, config=read_yaml(run_dir / "config.yaml"), project=project, labels=labels)
    if "tensorboard" in names:
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)  # smallscale's own folder: written anew
    trackers = open_trackers(names, info, fresh_ids=True)
    for record in read_metrics(run_dir / "metrics.jsonl"):
        trackers.log(record)
    final = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    for path in sorted((run_dir / "eval").glob("*.json")):
        final.update({f"eval.{path.stem}.{k}": v for k, v in json.loads(path.read_text(encoding="utf-8")).items()})
    return trackers.finish(final)
