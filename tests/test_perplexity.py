"""Bits per byte and rolling-window perplexity, checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
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


def _val_documents(dataset) -> list[str]:
    """The raw documents of the tiny dataset's val split (conftest: synthetic lines, default split)."""
    from smallscale.data.shards import doc_hash, is_val, normalize

    from conftest import synthetic_docs

    seen, docs = set(), []
    for line in synthetic_docs(3000, seed=1):
        text = normalize(line, nfc=True)
        h = doc_hash(text)
        if text.strip() and h not in seen and is_val(h, 1234, 0.05):
            docs.append(text)
        seen.add(h)
    return docs


def _tiny_model(vocab_size: int, seq_len: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_head=2, d_model=32)).eval()


def test_heldout_bpb_equals_the_raw_text_bpb_of_the_same_documents(tiny_dataset):
    from smallscale.data.shards import load_manifest
    from smallscale.data.tokenizer import load_tokenizer

    manifest = load_manifest(tiny_dataset)
    tok = load_tokenizer(tiny_dataset / "tokenizer.json")
    model = _tiny_model(manifest["vocab_size"], seq_len=8)  # short context: documents span several windows
    docs = _val_documents(tiny_dataset)
    assert len(docs) == manifest["splits"]["val"]["documents"]
    split = split_loss(model, tiny_dataset, seq_len=8, batch_size=5, device=torch.device("cpu"))
    raw = text_loss(model, tok, docs[::-1], seq_len=8, eos_id=manifest["eos_id"], batch_size=7)  # other order, batches
    assert split["bytes"] == raw["bytes"] == sum(len(d.encode()) for d in docs)
    assert split["tokens"] == raw["tokens"] == manifest["splits"]["val"]["document_tokens"]
    assert split["bpb"] == pytest.approx(raw["bpb"], rel=1e-6)


def test_split_bpb_scores_document_tokens_not_the_eos_separators(tiny_dataset):
    from smallscale.data.loader import split_stream
    from smallscale.data.shards import load_manifest

    manifest = load_manifest(tiny_dataset)
    model = _tiny_model(manifest["vocab_size"])
    got = split_loss(model, tiny_dataset, seq_len=32, batch_size=5, device=torch.device("cpu"))
    # reference: lm-evaluation-harness's rolling windows over each document alone, after an EOS;
    # the EOS that closes a document is not scored
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    stream, eos = split_stream(tiny_dataset, "val")
    ids = stream.read(0, len(stream)).tolist()
    nll, n = 0.0, 0
    bounds = [i for i, t in enumerate(ids) if t == eos]
    assert max(b - a for a, b in zip(bounds, bounds[1:])) > 33  # some documents need several windows
    with torch.no_grad():
        for first_eos, closing_eos in zip(bounds, bounds[1:]):
            doc = ids[first_eos + 1 : closing_eos]
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(doc, eos, 32, 1)):
                logits = model(torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont) :].double()
                nll += F.cross_entropy(logits, torch.tensor(cont), reduction="sum").item()
                n += len(cont)
    assert n == got["tokens"] == manifest["splits"]["val"]["document_tokens"] < manifest["splits"]["val"]["tokens"]
    assert got["bpb"] == pytest.approx(nll / (math.log(2) * manifest["splits"]["val"]["bytes"]), rel=1e-6)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_score_disjoint_batches_that_add_up_to_the_whole_split(tiny_dataset, world_size):
    from smallscale.data.shards import load_manifest
    from smallscale.eval.tasks.perplexity import ScoringSet, score

    model = _tiny_model(load_manifest(tiny_dataset)["vocab_size"])
    scoring = ScoringSet.from_split(tiny_dataset, 32)
    whole = score(model, scoring, 5 * 32, "cpu")
    parts = [score(model, scoring, 5 * 32, "cpu", rank=r, world_size=world_size) for r in range(world_size)]
    assert sum(p["tokens"] for p in parts) == whole["tokens"]
    assert sum(p["loss"] * p["tokens"] for p in parts) == pytest.approx(whole["loss"] * whole["tokens"], rel=1e-9)
    assert max(len(scoring.batches(5 * 32)[r::world_size]) for r in range(world_size)) == scoring.batches_per_rank(5 * 32, world_size)


def test_stream_protocol_crosses_documents_but_never_scores_eos(tiny_dataset):
    from smallscale.data.shards import load_manifest
    from smallscale.eval.tasks.perplexity import ScoringSet

    manifest = load_manifest(tiny_dataset)
    model = _tiny_model(manifest["vocab_size"])
    packed = split_loss(model, tiny_dataset, 32, 5, "cpu", protocol="stream")
    assert packed["tokens"] == manifest["splits"]["val"]["document_tokens"]
    windows = ScoringSet.from_split(tiny_dataset, 32, protocol="stream").windows
    assert (windows[:, 1] == 32).sum() == len(windows) - 1  # full windows but the last


def test_a_capped_subset_scores_the_first_documents_with_their_own_bytes(tiny_dataset):
    from smallscale.data.shards import load_manifest
    from smallscale.eval.tasks.perplexity import ScoringSet, _decoded_size, document_spans

    manifest = load_manifest(tiny_dataset)["splits"]["val"]
    whole = ScoringSet.from_split(tiny_dataset, 32)
    spans = document_spans(whole.stream, whole.eos)
    assert _decoded_size(tiny_dataset, whole.stream, spans) == (manifest["bytes"], manifest["words"])  # exact round trip
    cap = manifest["document_tokens"] // 3
    subset = ScoringSet.from_split(tiny_dataset, 32, max_tokens=cap)
    kept = int(np.searchsorted(np.cumsum(spans[:, 1] - spans[:, 0]), cap, side="right"))
    assert subset.n_bytes == _decoded_size(tiny_dataset, whole.stream, spans[:kept])[0] < manifest["bytes"]
    model = _tiny_model(load_manifest(tiny_dataset)["vocab_size"])
    scored = split_loss(model, tiny_dataset, 32, 5, "cpu")["tokens"]
    from smallscale.eval.tasks.perplexity import score

    assert score(model, subset, 5 * 32, "cpu")["tokens"] == int((spans[:kept, 1] - spans[:kept, 0]).sum()) <= cap < scored
