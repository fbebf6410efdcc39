"""Bits per byte and rolling-window perplexity, checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smallscale.eval.tasks.perplexity import rolling_windows, split_loss, text_loss
from smallscale.model.gpt import GPT, GPTConfig


@pytest.mark.parametrize("stride", [None, 3, 1])
def test_rolling_windows_score_every_token_once_with_bounded_context(stride):
    tokens = list(range(10, 33))
    windows = rolling_windows(tokens, prefix=2, max_len=8, stride=stride)
    scored = [t for _, tgt in windows for t in tgt if t != -100]
    assert scored == tokens
    for inputs, targets in windows:
        assert len(inputs) == len(targets) <= 8
        seq = [2, *tokens]
        start = seq.index(inputs[0]) if inputs[0] != 2 else 0
        assert inputs == seq[start : start + len(inputs)]


def test_text_loss_equals_an_independent_per_token_sum():
    from smallscale.data.tokenizer import train_tokenizer

    docs = ["the cat sat on the mat and then the dog sat on the log " * 3, "a bird sang", "é ü — ok"]
    tok = train_tokenizer(docs * 20, "bpe", 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), seq_len=16, n_layer=2, n_head=2, d_model=32)).eval()
    result = text_loss(model, tok, docs, seq_len=16, eos_id=2, stride=None)
    total = 0.0
    for doc in docs:  # brute force: one forward per predicted token, lm-eval's window rule
        ids = [2, *tok.encode(doc).ids]
        for j in range(1, len(ids)):
            # target j lies in disjoint prediction window k; the window's inputs are the 16 positions
            # ending at its last target (so the final, shorter window is left-extended with context)
            window_end = min(((j - 1) // 16 + 1) * 16, len(ids) - 1)
            ctx = ids[max(0, window_end - 16) : j]
            logp = F.log_softmax(model(torch.tensor([ctx])).logits[0, -1].double(), -1)
            total -= logp[ids[j]].item()
    n_bytes = sum(len(d.encode()) for d in docs)
    assert result["bpb"] == pytest.approx(total / (math.log(2) * n_bytes), rel=1e-5)
    assert result["bytes"] == n_bytes


def test_split_bpb_is_total_nll_over_bytes(tiny_dataset):
    from smallscale.data.loader import val_batches
    from smallscale.data.shards import load_manifest

    torch.manual_seed(0)
    manifest = load_manifest(tiny_dataset)
    model = GPT(GPTConfig(vocab_size=manifest["vocab_size"], seq_len=32, n_layer=2, n_head=2, d_model=32)).eval()
    got = split_loss(model, tiny_dataset, seq_len=32, batch_size=5, device=torch.device("cpu"))
    nll = 0.0
    with torch.no_grad():
        for x, y in val_batches(tiny_dataset, 32, 64):
            nll += F.cross_entropy(model(x).logits.double().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
    assert got["bpb"] == pytest.approx(nll / (math.log(2) * manifest["splits"]["val"]["bytes"]), rel=1e-6)
    assert got["tokens"] == manifest["splits"]["val"]["tokens"]
