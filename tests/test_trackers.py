"""Trackers fed from metrics.jsonl: a run with TensorBoard and W&B (offline) read back record for
record; a study's group and axes in each; a failing or missing tracker never stops a run; `study
sync` replays finished runs; trackio and MLflow adapters where their packages are installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from smallscale.eval.runs import read_metrics
from smallscale.train import trackers
from smallscale.train.trackers import RunInfo, RunLabels, open_trackers, scalars
from smallscale.train.trainer import load_run_config, train

TINY = ["model.preset=null", "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
        "train.steps=6", "train.global_batch_tokens=512", "train.micro_batch=8", "train.precision=fp32",
        "train.log_every_steps=2", "train.eval_every_tokens=1024", "train.eval_batch=8", "train.eval_tokens=2000",
        "train.energy.measure=false"]  # fmt: skip
LABELS = RunLabels(group="grid-study", tags={"model.d_model": 32, "train.seed": 0})


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files in `folder`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_hparams(folder: Path) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def wandb_records(run_file: Path):
    """The protobuf records of an offline W&B run file (`run-ID.wandb`): a 7-byte W&B header, then
    LevelDB-log chunks (crc32c, little-endian length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_offline_run(run_dir: Path) -> dict:
    """{'group', 'tags', 'config', 'history': {step: {key: value}}} of the offline run in RUN_DIR/wandb."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out: dict = {"history": {}}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(group=record.run.run_group, tags=list(record.run.tags),
                       config={i.key: json.loads(i.value_json) for i in record.run.config.update})  # fmt: skip
        elif kind == "history":
            row = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            out["history"][record.history.step.num] = row
    return out


@pytest.fixture(scope="module")
def tracked_run(tiny_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """One tiny run with train.trackers=[tensorboard, wandb], W&B offline, labelled like a study's run."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    out = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        cfg = load_run_config(None, [f"data.path={tiny_dataset}", f"out={out}", *TINY, "train.trackers=[tensorboard,wandb]",
                                     "train.tracker_project=smallscale-tests"])  # fmt: skip
        summary = train(cfg, progress=False, labels=LABELS)
    return out, summary


def test_tensorboard_events_hold_every_metrics_record(tracked_run):
    out, _ = tracked_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6] and all("val_bpb" in r for r in records)
    events = tensorboard_scalars(out / "tensorboard")
    for name in {k for r in records for k in scalars(r)}:
        expected = [(r["step"], r[name]) for r in records if name in r]
        assert [step for step, _ in events[name]] == [step for step, _ in expected], name
        assert [value for _, value in events[name]] == pytest.approx([v for _, v in expected], rel=1e-6), name  # float32


def test_tensorboard_hparams_hold_the_axes_config_and_final_metrics(tracked_run):
    out, summary = tracked_run
    hparams = tensorboard_hparams(out / "tensorboard")
    assert hparams["axis.model.d_model"] == 32 and hparams["axis.train.seed"] == 0
    assert hparams["optim.name"] == "adamw" and hparams["train.steps"] == 6
    final = tensorboard_scalars(out / "tensorboard")["final/val_bpb"]
    assert final == [(6, pytest.approx(summary["val_bpb"], rel=1e-6))]


def test_wandb_offline_run_holds_the_config_and_every_scalar(tracked_run):
    out, _ = tracked_run
    run = wandb_offline_run(out)
    assert run["group"] == "grid-study" and run["tags"] == ["model.d_model=32", "train.seed=0"]
    assert run["config"]["optim"]["lr"] == pytest.approx(1e-3) and run["config"]["train"]["steps"] == 6
    assert run["config"]["axis"] == {"model.d_model": 32, "train.seed": 0}
    records = read_metrics(out / "metrics.jsonl")
    assert sorted(run["history"]) == [r["step"] for r in records]
    for record in records:
        logged = {k: v for k, v in run["history"][record["step"]].items() if not k.startswith("_")}
        assert logged == pytest.approx(scalars(record)), record["step"]


def test_a_failing_tracker_warns_once_and_the_run_finishes(tiny_dataset, tmp_path, monkeypatch):
    calls = []

    class Broken:
        def start(self, info: RunInfo) -> None:
            calls.append("start")

        def log(self, record: dict) -> None:
            calls.append("log")
            raise RuntimeError("disk on fire")

        def finish(self, final: dict) -> None:
            raise AssertionError("a dropped tracker is not called again")

    monkeypatch.setitem(trackers.ADAPTERS, "tensorboard", Broken)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"tracker 'tensorboard' disabled: RuntimeError: disk on fire") as caught:
        summary = train(load_run_config(None, [f"data.path={tiny_dataset}", f"out={out}", *TINY, "train.trackers=[tensorboard]"]),
                        progress=False)  # fmt: skip
    assert summary["status"] == "done" and calls == ["start", "log"]
    assert sum("disabled" in str(w.message) for w in caught) == 1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4, 6]  # the source of truth is whole


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # `import trackio` raises ImportError
    info = RunInfo(run_dir=tmp_path, name="r", config={}, project="p")
    with pytest.warns(UserWarning, match=r"tracker 'trackio' disabled: trackio is not installed \(pip install 'smallscale\[trackio\]'\)"):
        opened = open_trackers(["trackio"], info)
    assert opened.names == [] and opened.finish({"val_bpb": 1.0}) == []


def test_unknown_tracker_name_is_a_config_error(tiny_dataset, tmp_path):
    from smallscale.errors import UserError

    with pytest.raises(UserError, match=r"train\.trackers\.0"):
        load_run_config(None, [f"data.path={tiny_dataset}", f"out={tmp_path}/r", *TINY, "train.trackers=[tensorbord]"])


def fake_study(root: Path) -> Path:
    """A study folder with one finished run (a) and one pending (b), as `study run` leaves them."""
    records = [{"step": 2, "tokens": 1024, "loss": 5.0, "lr": 1e-3}, {"step": 4, "tokens": 2048, "loss": 4.0, "lr": 5e-4,
                                                                       "val_bpb": 3.1}]  # fmt: skip
    runs = [{"id": rid, "axes": {"model.d_model": d, "optim.name": "lion"}, "dataset": "syn",
             "config": {"train": {"tracker_project": "sync-tests"}}, "evals": []} for rid, d in (("a", 32), ("b", 64))]  # fmt: skip
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"name": "sync-study", "runs": runs}), encoding="utf-8")
    run = root / "runs" / "a"
    (run / "eval").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "done"}), encoding="utf-8")
    (run / "config.yaml").write_text(yaml.safe_dump({"optim": {"name": "lion", "lr": 1e-3}, "train": {"steps": 4}}), encoding="utf-8")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (run / "summary.json").write_text(json.dumps({"status": "done", "steps": 4, "val_bpb": 3.1, "energy_kwh": 2e-5}), encoding="utf-8")
    (run / "eval" / "heldout.json").write_text(json.dumps({"bpb": 3.05, "n": 20, "energy": {"energy_kwh": 1e-6}}), encoding="utf-8")
    return root


def test_study_sync_replays_finished_runs_into_tensorboard_with_axes(tmp_path):
    pytest.importorskip("tensorboard")
    from typer.testing import CliRunner

    from smallscale.cli import app

    study = fake_study(tmp_path / "study")
    for _ in range(2):  # a second sync writes the events anew: still one point per step
        result = CliRunner().invoke(app, ["study", "sync", str(study), "--to", "tensorboard"])
        assert result.exit_code == 0, result.output
    assert "tensorboard: 1 of 1 finished runs (1 not finished, left out)" in result.output
    events = tensorboard_scalars(study / "runs" / "a" / "tensorboard")
    assert events["loss"] == [(2, 5.0), (4, 4.0)] and events["val_bpb"] == [(4, pytest.approx(3.1))]
    assert events["final/eval.heldout.bpb"] == [(4, pytest.approx(3.05))]
    hparams = tensorboard_hparams(study / "runs" / "a" / "tensorboard")
    assert hparams["axis.model.d_model"] == 32 and hparams["axis.optim.name"] == "lion"
    assert not (study / "runs" / "b" / "tensorboard").exists()


def test_study_sync_to_wandb_groups_runs_by_study(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from typer.testing import CliRunner

    from smallscale.cli import app

    monkeypatch.setenv("WANDB_MODE", "offline")
    study = fake_study(tmp_path / "study")
    result = CliRunner().invoke(app, ["study", "sync", str(study), "--to", "wandb"])
    assert result.exit_code == 0 and "wandb: 1 of 1 finished runs" in result.output, result.output
    run = wandb_offline_run(study / "runs" / "a")
    assert run["group"] == "sync-study" and run["tags"] == ["model.d_model=32", "optim.name=lion"]
    assert run["history"][4]["loss"] == 4.0 and run["config"]["optim"]["name"] == "lion"


def test_study_sync_refuses_an_unknown_tracker(tmp_path):
    from typer.testing import CliRunner

    from smallscale.cli import app

    study = fake_study(tmp_path / "study")
    result = CliRunner().invoke(app, ["study", "sync", str(study), "--to", "neptune"])
    assert result.exit_code != 0 and "'neptune' is not a tracker" in str(result.exception)


def test_trackio_adapter_logs_every_record(tmp_path):
    pytest.importorskip("trackio", reason="trackio is not installed (pip install 'smallscale[trackio]')")
    code = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from smallscale.train.trackers import RunInfo, RunLabels, open_trackers
        info = RunInfo(run_dir=Path({str(tmp_path)!r}), name="run-a", config={{"optim": {{"lr": 0.001}}}},
                       project="smallscale-tests", labels=RunLabels("grid", {{"train.seed": 0}}))
        opened = open_trackers(["trackio"], info)
        for step, loss in ((2, 3.5), (4, 2.5)):
            opened.log({{"step": step, "tokens": 512 * step, "loss": loss}})
        assert opened.finish({{"val_bpb": 2.0}}) == ["trackio"]
        import trackio
        print(json.dumps(trackio.SQLiteStorage.get_logs("smallscale-tests", "run-a")))
    """)  # fmt: skip
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}  # trackio reads it at import
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    logs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(row["step"], row["loss"], row["tokens"]) for row in logs] == [(2, 3.5, 1024), (4, 2.5, 2048)]


def test_mlflow_adapter_logs_params_tags_and_every_record(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'smallscale[mlflow]')")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    info = RunInfo(run_dir=tmp_path, name="run-a", config={"optim": {"lr": 0.001}}, project="smallscale-tests",
                   labels=RunLabels("grid", {"train.seed": 0}))  # fmt: skip
    opened = open_trackers(["mlflow"], info)
    for step, loss in ((2, 3.5), (4, 2.5)):
        opened.log({"step": step, "loss": loss})
    assert opened.finish({"val_bpb": 2.0}) == ["mlflow"]
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("smallscale-tests").experiment_id])
    assert run.data.tags["group"] == "grid" and run.data.tags["axis.train.seed"] == "0"
    assert run.data.params["optim.lr"] == "0.001" and run.data.metrics["final/val_bpb"] == 2.0
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(2, 3.5), (4, 2.5)]
