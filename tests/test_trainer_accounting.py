"""What a run reports about itself: epochs, FLOPs, and a final evaluation that a kill cannot skip."""

from __future__ import annotations

import json

import pytest
import torch

from smallscale.model.gpt import GPT, GPTConfig
from smallscale.train.trainer import load_run_config, resume, train

TINY = ["model.preset=null", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
        "train.global_batch_tokens=512", "train.micro_batch=8", "train.precision=fp32", "train.eval_batch=8"]  # fmt: skip


def test_training_for_exactly_the_token_budget_is_exactly_one_epoch(tiny_dataset, tmp_path):
    budget = 12 * 512
    cfg = load_run_config(None, [f"data.path={tiny_dataset}", f"out={tmp_path / 'r'}", *TINY,
                                 f"train.tokens={budget}", f"data.token_budget={budget}"])  # fmt: skip
    summary = train(cfg, progress=False)
    assert summary["tokens_seen"] == summary["token_budget"] == budget
    assert summary["epochs"] == 1.0  # was 192/191 windows: one window trained twice


def test_train_tokens_never_exceed_what_was_asked(tiny_dataset, tmp_path):
    cfg = load_run_config(None, [f"data.path={tiny_dataset}", f"out={tmp_path / 'r'}", *TINY, "train.tokens=5000"])
    summary = train(cfg, progress=False)
    assert summary["steps"] == 9 and summary["tokens_seen"] == 9 * 512 <= 5000


@pytest.mark.parametrize("tied", [True, False])
def test_flops_count_matmul_parameters_only(tied):
    cfg = GPTConfig(vocab_size=1000, seq_len=64, n_layer=2, n_head=2, d_model=32, position="learned", tie_embeddings=tied)
    model = GPT(cfg)
    lookups = model.positions.pos_emb.weight.numel() + (0 if tied else model.tok_emb.weight.numel())
    assert model.flops_per_token() == 6 * (model.num_params() - lookups) + 12 * 2 * 32 * 64
    with torch.device("meta"):
        untied = GPT(GPTConfig(vocab_size=1000, seq_len=64, n_layer=2, n_head=2, d_model=32, tie_embeddings=False))
        tied_model = GPT(GPTConfig(vocab_size=1000, seq_len=64, n_layer=2, n_head=2, d_model=32))
    assert untied.flops_per_token() == tied_model.flops_per_token()  # the same matmuls, one more lookup table


def test_a_run_killed_after_its_final_checkpoint_evaluates_when_resumed(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    cfg = load_run_config(None, [f"data.path={tiny_dataset}", f"out={run}", *TINY, "train.steps=6",
                                 "train.log_every_steps=1", "train.checkpoint_every_tokens=1024"])  # fmt: skip
    finished = train(cfg, progress=False)
    records = (run / "metrics.jsonl").read_text()
    (run / "summary.json").unlink()  # the state of a kill between the last checkpoint and summary.json
    summary = resume(run, progress=False)
    assert summary["val_bpb"] is not None and summary["val_bpb"] == finished["val_bpb"]
    assert json.loads((run / "summary.json").read_text())["val_loss"] == finished["val_loss"]
    assert (run / "metrics.jsonl").read_text() == records  # no step trained twice, no record repeated


def test_a_nonfinite_step_is_named_exactly_although_values_are_read_only_at_log_steps(tiny_dataset, tmp_path):
    from smallscale.errors import UserError

    diverge = ["optim.name=sgd", "optim.lr=1e12", "train.grad_clip=null", "train.steps=12"]
    messages = []
    for log_every in (1, 5):
        cfg = load_run_config(None, [f"data.path={tiny_dataset}", f"out={tmp_path / str(log_every)}", *TINY, *diverge,
                                     f"train.log_every_steps={log_every}", "train.checkpoint_every_tokens=512"])  # fmt: skip
        with pytest.raises(UserError, match=r"non-finite loss or gradient norm at step (\d+)") as info:
            train(cfg, progress=False)
        messages.append(str(info.value))
        bad_step = int(str(info.value).split("at step ")[1].split()[0])
        saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / str(log_every) / "checkpoints").glob("step-*"))
        assert all(s < bad_step for s in saved)  # no checkpoint keeps the weights of a non-finite step
    assert messages[0] == messages[1]  # the same first bad step, whether read every step or every fifth
