"""Trainer: losses fall for every variant, exact resume (also after kill -9), accumulation, DDP, guards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smallscale.errors import UserError
from smallscale.train.trainer import load_run_config, resume, train

TINY_MODEL = ["model.preset=null", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.seq_len=32"]


def run_cfg(dataset: Path, out: Path, *overrides: str):
    base = [
        f"data.path={dataset}", f"out={out}", *TINY_MODEL, "train.steps=12", "train.global_batch_tokens=512",
        "train.micro_batch=8", "train.precision=fp32", "train.log_every_steps=1", "train.eval_batch=8",
    ]  # fmt: skip
    return load_run_config(None, [*base, *overrides])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in metrics(run)]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(str(last / "model.safetensors"))


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_every_position_encoding_trains(tiny_dataset, tmp_path, position):
    summary = train(run_cfg(tiny_dataset, tmp_path / "r", f"model.position={position}", "train.steps=25", "optim.lr=3e-3"), progress=False)
    ls = losses(tmp_path / "r")
    assert sum(ls[-5:]) / 5 < ls[0] - 1.0, ls  # from ~ln(512)=6.2 down by more than a nat
    assert summary["val_bpb"] is not None and summary["val_loss"] < ls[0]


@pytest.mark.parametrize(
    ("optimizer", "lr"), [("adamw", 3e-3), ("lion", 1e-3), ("lamb", 5e-2), ("sgd", 0.5), ("muon", 3e-3)]
)
def test_every_optimizer_trains(tiny_dataset, tmp_path, optimizer, lr):
    # A 2-layer model and 25 steps: learning rates a few times above the defaults for real runs.
    train(run_cfg(tiny_dataset, tmp_path / "r", f"optim.name={optimizer}", f"optim.lr={lr}", "train.steps=25"), progress=False)
    ls = losses(tmp_path / "r")
    assert sum(ls[-5:]) / 5 < ls[0] - 0.5, ls


def test_run_directory_is_self_describing(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    summary = train(run_cfg(tiny_dataset, run, "train.eval_every_tokens=2048"), progress=False)
    for name in ("config.yaml", "env.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file()
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"].startswith("2.") and env["precision"] == "fp32"
    evals = [m for m in metrics(run) if "val_loss" in m]
    assert [m["step"] for m in evals] == [4, 8, 12]  # 512 tokens/step, eval every 2048 tokens
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in metrics(run)[0]
    for key in ("params", "non_embedding_params", "tokens_seen", "epochs", "val_loss", "val_bpb", "wall_s", "tokens_per_s", "mfu", "peak_mem_bytes"):
        assert summary[key] is not None, key
    assert summary["tokens_seen"] == 12 * 512 and 0 < summary["mfu"] < 1


def test_gradient_accumulation_matches_one_large_batch(tiny_dataset, tmp_path):
    a = train(run_cfg(tiny_dataset, tmp_path / "a", "train.micro_batch=4", "train.steps=4"), progress=False)  # 4 x 4 seqs
    b = train(run_cfg(tiny_dataset, tmp_path / "b", "train.micro_batch=16", "train.steps=4"), progress=False)  # 1 x 16 seqs
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


def test_resume_is_bitwise_identical(tiny_dataset, tmp_path):
    overrides = ("train.checkpoint_every_tokens=2048", "train.keep_checkpoints=5", "model.dropout=0.1")
    full = tmp_path / "full"
    train(run_cfg(tiny_dataset, full, *overrides), progress=False)
    part = tmp_path / "part"  # the state of a run that stopped after its step-4 checkpoint
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000004", part / "checkpoints" / "step-00000004")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")  # later records must be dropped
    cfg = run_cfg(tiny_dataset, part, *overrides)
    (part / "config.yaml").write_text(__import__("smallscale.config", fromlist=["x"]).dump_config(cfg))
    resume(part, progress=False)
    assert losses(part) == losses(full)  # exact float equality
    wf, wp = final_weights(full), final_weights(part)
    assert all(torch.equal(wf[k], wp[k]) for k in wf)


@pytest.mark.slow
def test_resume_after_kill_9_during_checkpoint_write(tiny_dataset, tmp_path):
    args = [f"data.path={tiny_dataset}", *TINY_MODEL, "train.steps=12", "train.global_batch_tokens=512", "train.micro_batch=8",
            "train.precision=fp32", "train.log_every_steps=1", "train.checkpoint_every_tokens=2048", "train.eval_batch=8"]  # fmt: skip
    cli = [sys.executable, "-m", "smallscale.cli"]
    ref = tmp_path / "ref"
    subprocess.run([*cli, "train", f"out={ref}", *args, "--no-progress"], check=True, capture_output=True)
    run = tmp_path / "killed"
    env = {**os.environ, "SMALLSCALE_CRASH_DURING_CHECKPOINT_STEP": "8"}
    proc = subprocess.run([*cli, "train", f"out={run}", *args, "--no-progress"], env=env, capture_output=True)
    assert proc.returncode == -9  # SIGKILL mid-write of the step-8 checkpoint
    assert (run / "checkpoints" / ".tmp-step-00000008").is_dir()
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000004"]
    subprocess.run([*cli, "resume", str(run), "--no-progress"], check=True, capture_output=True)
    assert losses(run) == losses(ref)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    wr, wk = final_weights(ref), final_weights(run)
    assert all(torch.equal(wr[k], wk[k]) for k in wr)


def test_sigterm_saves_a_checkpoint_at_the_step_and_resume_continues_exactly(tiny_dataset, tmp_path, monkeypatch):
    import signal

    from smallscale.data.loader import TrainLoader
    from smallscale.errors import Stopped

    full = tmp_path / "full"
    train(run_cfg(tiny_dataset, full, "train.keep_checkpoints=20", "train.checkpoint_every_tokens=2048"), progress=False)
    real_next_batch, calls = TrainLoader.next_batch, []

    def next_batch(self):  # 2 micro-batches per step: the 9th is the first of step 5
        calls.append(1)
        if len(calls) == 9:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next_batch(self)

    monkeypatch.setattr(TrainLoader, "next_batch", next_batch)
    part = tmp_path / "part"
    with pytest.raises(Stopped, match=r"stopped by SIGTERM at step 5 of 12, checkpoint saved; `smallscale resume .*part` continues it"):
        train(run_cfg(tiny_dataset, part, "train.keep_checkpoints=20", "train.checkpoint_every_tokens=2048"), progress=False)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler is gone again
    assert sorted(p.name for p in (part / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000005"]
    monkeypatch.undo()
    resume(part, progress=False)
    assert losses(part) == losses(full)  # exact float equality
    wf, wp = final_weights(full), final_weights(part)
    assert all(torch.equal(wf[k], wp[k]) for k in wf)


@pytest.mark.slow
def test_train_stopped_by_sigterm_exits_143_with_one_line_and_resumes(tiny_dataset, tmp_path):
    import signal
    import time

    args = [f"data.path={tiny_dataset}", *TINY_MODEL, "train.steps=200", "train.global_batch_tokens=512", "train.micro_batch=8",
            "train.precision=fp32", "train.log_every_steps=1", "train.eval_batch=8", "train.eval_every_tokens=null",
            "train.checkpoint_every_tokens=null", "--no-progress"]  # fmt: skip
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "smallscale.cli", "train", f"out={run}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ((run / "metrics.jsonl").exists() and len(metrics(run)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    (step,) = [int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*")]
    assert 3 <= step < 200 and f"stopped by SIGTERM at step {step} of 200, checkpoint saved" in output
    assert "Traceback" not in output
    done = subprocess.run([sys.executable, "-m", "smallscale.cli", "resume", str(run), "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["step"] for m in metrics(run)] == list(range(1, 201))
    assert json.loads((run / "summary.json").read_text())["steps"] == 200


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_cpu_processes_match_one_process(tiny_dataset, tmp_path, strategy):
    args = [f"data.path={tiny_dataset}", *TINY_MODEL, "train.steps=6", "train.global_batch_tokens=512", "train.micro_batch=4",
            "train.precision=fp32", "train.log_every_steps=1", "train.eval_batch=8", "--no-progress"]  # fmt: skip
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "smallscale.cli", "train", f"out={single}", *args], check=True, capture_output=True)
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "smallscale.cli", "train", f"out={ddp}", f"train.parallel={strategy}", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(ddp) == pytest.approx(losses(single), abs=1e-5)
    md, ms = metrics(ddp)[-1], metrics(single)[-1]
    assert md["val_loss"] == pytest.approx(ms["val_loss"], abs=1e-5)
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2


def test_nonfinite_loss_stops_with_step_or_is_skipped(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match=r"non-finite .* at step \d+"):
        train(run_cfg(tiny_dataset, tmp_path / "a", "optim.lr=1e12", "optim.name=sgd", "train.grad_clip=null"), progress=False)
    summary = train(run_cfg(tiny_dataset, tmp_path / "b", "optim.lr=1e12", "optim.name=sgd", "train.grad_clip=null", "train.on_nonfinite=skip"), progress=False)
    assert summary["skipped_steps"] > 0
    assert metrics(tmp_path / "b")[-1]["skipped_steps"] == summary["skipped_steps"]


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.bogus=1", "unknown key 'train.bogus'"),
        ("train.micro_batch=abc", "train.micro_batch"),
        ("train.micro_batch=64", "exceeds train.global_batch_tokens"),
        ("train.precision=fp16", "fp16"),
        ("model.position=xpos", "model.position"),
        ("model.preset=huge", "model.preset"),
    ],
)
def test_config_mistakes_are_one_clear_error(tiny_dataset, tmp_path, override, words):
    with pytest.raises(UserError) as err:
        train(run_cfg(tiny_dataset, tmp_path / "r", override), progress=False)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_existing_run_directory_is_not_overwritten(tiny_dataset, tmp_path):
    train(run_cfg(tiny_dataset, tmp_path / "r", "train.steps=2"), progress=False)
    with pytest.raises(UserError, match="already exists"):
        train(run_cfg(tiny_dataset, tmp_path / "r", "train.steps=2"), progress=False)


def test_compile_auto_is_on_only_for_runs_long_enough_to_repay_it():
    from smallscale.train.trainer import AUTO_COMPILE_MIN_STEPS, resolve_compile

    assert AUTO_COMPILE_MIN_STEPS == 1000
    assert not resolve_compile("auto", 999) and resolve_compile("auto", 1000)
    assert resolve_compile(True, 1) and not resolve_compile(False, 10**6)
    assert run_cfg(Path("d"), Path("o")).train.compile == "auto"


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_dataset, tmp_path):
    eager = train(run_cfg(tiny_dataset, tmp_path / "eager", "train.steps=6", "train.compile=false"), progress=False)
    compiled = train(run_cfg(tiny_dataset, tmp_path / "compiled", "train.steps=6", "train.compile=true"), progress=False)
    assert (eager["compile"], compiled["compile"]) == (False, True)
    assert json.loads((tmp_path / "compiled" / "env.json").read_text())["compile"] is True
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)


def _failing_compile(model, *args, **kwargs):
    def compiled(*a, **k):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nlong inductor trace ...")

    return compiled


def test_failed_compile_falls_back_under_auto_and_is_a_clear_error_when_asked_for(tiny_dataset, tmp_path, monkeypatch):
    from smallscale.train import trainer

    monkeypatch.setattr(torch, "compile", _failing_compile)
    monkeypatch.setattr(trainer, "AUTO_COMPILE_MIN_STEPS", 1)  # so 'auto' compiles this 4-step run
    with pytest.warns(UserWarning, match="torch.compile failed .*No working C\\+\\+ compiler.*training without it"):
        summary = train(run_cfg(tiny_dataset, tmp_path / "auto", "train.steps=4"), progress=False)
    assert summary["compile"] is False and len(losses(tmp_path / "auto")) == 4
    assert json.loads((tmp_path / "auto" / "env.json").read_text())["compile"] is False
    assert losses(tmp_path / "auto")[-1] < losses(tmp_path / "auto")[0]
    with pytest.raises(UserError) as err:
        train(run_cfg(tiny_dataset, tmp_path / "forced", "train.steps=4", "train.compile=true"), progress=False)
    assert "train.compile=false" in str(err.value) and "No working C++ compiler" in str(err.value)
    assert "\n" not in str(err.value)
