"""The 20m preset at its real shape (seq 1024, vocabulary 32768) trains on CPU, and DDP and FSDP2
over 2 gloo processes match one process's losses (same global batch) within 1e-5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import synthetic_docs

VOCAB = 32768


@pytest.fixture(scope="module")
def vocab_32768_dataset(tmp_path_factory) -> Path:
    """A prepared dataset with a 32768-entry tokenizer: a 512-entry BPE padded with special tokens
    that text never produces, so the model has the real embedding, head and loss width."""
    from smallscale.data.shards import PrepareConfig, prepare
    from smallscale.data.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("vocab32768")
    docs = synthetic_docs(2000, seed=3)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(docs), encoding="utf-8")
    tok = train_tokenizer(docs, "bpe", 512)
    tok.add_special_tokens([f"<|unused{i}|>" for i in range(VOCAB - tok.get_vocab_size())])
    tok.save(str(tmp / "tokenizer.json"))
    out = tmp / "ds"
    prepare(PrepareConfig(source=str(corpus), out=str(out), tokenizer=str(tmp / "tokenizer.json"), split_by="line",
                          workers=1, val_tokens=2048), progress=False)  # fmt: skip
    return out


def run_args(dataset: Path) -> list[str]:
    # 3 steps of 2 sequences: one process accumulates 2 micro-batches, two processes take one each
    return [f"data.path={dataset}", "model.preset=20m", "train.steps=3", "train.global_batch_tokens=2048",
            "train.micro_batch=1", "train.precision=fp32", "train.compile=false", "train.log_every_steps=1",
            "train.eval_batch=1", "--no-progress"]  # fmt: skip


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process_run(vocab_32768_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    cmd = [sys.executable, "-m", "smallscale.cli", "train", f"out={out}", *run_args(vocab_32768_dataset)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_20m_trains_at_its_real_shape_on_cpu(single_process_run):
    summary = json.loads((single_process_run / "summary.json").read_text())
    losses = [m["loss"] for m in metrics(single_process_run)]
    assert summary["params"] == 20_649_280
    assert json.loads((single_process_run / "model.json").read_text())["seq_len"] == 1024
    assert losses[0] == pytest.approx(10.4, abs=0.3)  # ln(32768) = 10.40: the untrained model is uniform
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_at_20m(vocab_32768_dataset, single_process_run, tmp_path, strategy):
    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "smallscale.cli",
           "train", f"out={out}", f"train.parallel={strategy}", *run_args(vocab_32768_dataset)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, parallel = metrics(single_process_run), metrics(out)
    assert [m["step"] for m in parallel] == [1, 2, 3]
    assert [m["loss"] for m in parallel] == pytest.approx([m["loss"] for m in single], abs=1e-5)
    assert parallel[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], abs=1e-5)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
