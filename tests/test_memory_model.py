"""The memory model (smallscale/train/memory.py): exact tensor bytes against a live-tensor count,
the process peak of a real run, optimizer state per optimizer, and the refusal of a run that
cannot fit (train, train --dry-run, study plan, study run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smallscale.errors import UserError
from smallscale.model.gpt import GPT, GPTConfig
from smallscale.optim import OptimConfig, build_optimizer
from smallscale.train import memory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_memory import live_tensor_peak  # noqa: E402

TINY = {"vocab_size": 512, "seq_len": 64, "n_layer": 2, "n_head": 2, "d_model": 64}


def step_tensor_bytes(est: memory.MemoryEstimate) -> int:
    """What a training step holds beyond the weights: optimizer state plus its largest moment."""
    return est.optimizer_state + max(est.details.values())


@pytest.mark.parametrize(
    ("precision", "checkpointing", "batch", "overrides"),
    [("bf16", False, 2, {}), ("bf16", True, 2, {}), ("fp32", False, 1, {}), ("fp32", True, 2, {"mlp": "gelu"}),
     ("bf16", False, 2, {"position": "learned", "norm": "layernorm"})],
)  # fmt: skip
def test_predicted_tensor_bytes_match_the_live_tensors_of_two_training_steps(precision, checkpointing, batch, overrides):
    cfg = GPTConfig(**TINY, grad_checkpointing=checkpointing, **overrides)
    predicted = step_tensor_bytes(memory.estimate(cfg, batch, precision, "cpu", eval_batch=0))
    # exact to 0.1% at the bench's sizes (bench/results/memory_model.json); at these tiny shapes the
    # backward's small temporaries are approximations that overstate by at most ~5%
    assert predicted == pytest.approx(live_tensor_peak(cfg, batch, precision), rel=0.06)


@pytest.mark.parametrize("name", ["adamw", "lion", "lamb", "sgd", "muon"])
def test_optimizer_state_is_what_each_optimizer_allocates(name):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    optimizer = build_optimizer(model, OptimConfig(name=name))
    model(torch.randint(0, 512, (1, 64)), torch.randint(0, 512, (1, 64))).loss.backward()
    optimizer.step()
    allocated = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.numel() > 1)  # fmt: skip  (step counters are scalars)
    predicted, _ = memory.optimizer_state_bytes(memory.model_shape(model.cfg), name)
    assert predicted == allocated


def test_checkpointing_fsdp_and_ddp_change_the_parts_they_should():
    cfg = GPTConfig(**TINY)
    plain = memory.estimate(cfg, 4, "bf16", "cuda")
    params = sum(p.numel() for p in GPT(cfg).parameters())
    assert plain.weights == plain.gradients == params * 4 and plain.optimizer_state == 2 * params * 4
    assert plain.activations_checkpointing < plain.activations_no_checkpointing
    assert memory.estimate(cfg, 4, "bf16", "cuda", world_size=2, parallel="ddp").ddp_buckets == params * 4
    fsdp = memory.estimate(cfg, 4, "bf16", "cuda", world_size=4, parallel="fsdp")
    assert fsdp.optimizer_state == plain.optimizer_state // 4 and fsdp.gradients == plain.gradients // 4


def test_sizes_parse_in_binary_and_decimal_units():
    assert memory.parse_size("80GiB") == 80 * 2**30
    assert memory.parse_size("512 MiB") == 512 * 2**20
    assert memory.parse_size("24GB") == 24 * 10**9
    with pytest.raises(UserError, match="80GiB"):
        memory.parse_size("eighty gigs")


def train_cmd(tiny_dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "smallscale.cli", "train", f"out={out}", f"data.path={tiny_dataset}", "model.preset=null",
            "model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.seq_len=64", "train.steps=2",
            "train.global_batch_tokens=512", "train.micro_batch=8", "train.eval_batch=4", "--no-progress", *extra]  # fmt: skip


@pytest.mark.slow
def test_a_tiny_runs_process_peak_is_within_a_quarter_of_the_prediction(tiny_dataset, tmp_path):
    subprocess.run(train_cmd(tiny_dataset, tmp_path / "run"), check=True, capture_output=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cfg = GPTConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=2, d_model=64)
    predicted = memory.estimate(cfg, 8, summary["precision"], "cpu", eval_batch=4).peak
    assert predicted == pytest.approx(summary["peak_mem_bytes"], rel=0.25)


def test_train_refuses_a_run_that_cannot_fit_before_writing_anything(tiny_dataset, tmp_path):
    proc = subprocess.run(train_cmd(tiny_dataset, tmp_path / "run", "--device-memory", "256MiB"), capture_output=True, text=True)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: run run needs about ") and "but the device has 256 MiB (--device-memory)" in line
    assert "lower train.micro_batch" in line
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_memory_breakdown_and_trains_nothing(tiny_dataset, tmp_path):
    proc = subprocess.run(train_cmd(tiny_dataset, tmp_path / "run", "--dry-run", "--device-memory", "64GiB"),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for part in ("optimizer state", "checkpointing", "evaluation: 4 sequences", "peak", "64.00 GiB (--device-memory)", "fits: yes"):
        assert part in proc.stdout
    assert not (tmp_path / "run").exists()


def write_study(tmp_path: Path, tiny_dataset: Path) -> Path:
    study = tmp_path / "study.yaml"
    study.write_text(f"""name: memcheck
datasets: {{tiny: {{path: {tiny_dataset}}}}}
base:
  model: {{preset: null, n_layer: 2, n_head: 2, d_model: 64, seq_len: 64}}
  train: {{steps: 2, global_batch_tokens: 512, micro_batch: 8, eval_batch: 4}}
grid: {{train.seed: [0, 1]}}
""")
    return study


def test_study_plan_prints_peak_memory_and_refuses_runs_that_cannot_fit(tiny_dataset, tmp_path):
    study = write_study(tmp_path, tiny_dataset)
    cli = [sys.executable, "-m", "smallscale.cli", "study", "plan", str(study), "--watts", "300"]
    fits = subprocess.run([*cli, "--device-memory", "64GiB"], capture_output=True, text=True, cwd=tmp_path)
    assert fits.returncode == 0, fits.stderr
    assert "peak mem" in fits.stdout and "wall-clock" in fits.stdout and "disk:" in fits.stdout
    refused = subprocess.run([*cli, "--device-memory", "300MiB"], capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2
    assert "but the device has 300 MiB" in refused.stderr and "(1 more runs do not fit either)" in refused.stderr


@pytest.mark.slow
def test_study_run_refuses_before_any_run_starts(tiny_dataset, tmp_path):
    study = write_study(tmp_path, tiny_dataset)
    proc = subprocess.run([sys.executable, "-m", "smallscale.cli", "study", "run", str(study), "--out", str(tmp_path / "s"),
                           "--device-memory", "300MiB", "--no-progress"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "but the device has 300 MiB" in proc.stderr
    assert not (tmp_path / "s" / "runs").exists()
