"""Loss, perplexity and bits per byte over a whole prepared split.

bits per byte = sum of token NLLs (nats) / (ln 2 x UTF-8 bytes of the text those tokens encode); the
byte count comes from the dataset manifest, so the figure compares across tokenizers. Perplexity
(exp of the mean token loss) only compares models that share a tokenizer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smallscale.data.loader import val_batches
from smallscale.data.shards import load_manifest
from smallscale.errors import UserError


@torch.no_grad()
def split_loss(
    model: nn.Module,
    dataset_dir: str | Path,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    split: str = "val",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[list[float]], list[float]] = lambda v: v,
    pad_batches_to: int | None = None,
) -> dict[str, float]:
    """Sum NLL over `split` (this rank's share), reduce over ranks, return loss/ppl/bpb.

    `pad_batches_to` runs extra dummy forwards so every rank makes the same number of calls (needed
    when the forward contains collectives, as under FSDP).
    """
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = 0
    for inputs, targets in val_batches(dataset_dir, seq_len, batch_size, rank=rank, world_size=world_size, split=split):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            logits = model(inputs).logits
        nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        count += (targets != -100).sum()
        n_batches += 1
    while pad_batches_to is not None and n_batches < pad_batches_to:
        with autocast():
            model(torch.zeros(1, seq_len, dtype=torch.long, device=device))
        n_batches += 1
    total_nll, total_tokens = reduce([nll.item(), count.item()])
    model.train(was_training)
    n_bytes = load_manifest(dataset_dir)["splits"][split]["bytes"]
    loss = total_nll / total_tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": total_nll / (math.log(2) * n_bytes),
        "tokens": int(total_tokens),
        "bytes": int(n_bytes),
    }


def batches_per_rank(dataset_dir: str | Path, seq_len: int, batch_size: int, world_size: int, split: str = "val") -> int:
    """The largest number of val batches any rank gets (for `pad_batches_to`)."""
    tokens = load_manifest(dataset_dir)["splits"][split]["tokens"]
    windows = -(-tokens // seq_len)
    per_rank = -(-windows // world_size)
    return -(-per_rank // batch_size)


# ----------------------------------------------------------------------------- raw text, rolling windows
def rolling_windows(tokens: list[int], prefix: int, max_len: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that score every token of `tokens` exactly once.

    lm-evaluation-harness `loglikelihood_rolling` convention: the first token is predicted from
    `prefix` (EOS here). With `stride = max_len` (the default) windows are disjoint; with a smaller
    stride each window re-reads `max_len - stride` tokens of context and scores only its last
    `stride` tokens (targets of context positions are -100), so every token sees more context.
    """
    stride = stride or max_len
    assert 0 < stride <= max_len
    seq = [prefix, *tokens]  # seq[i] predicts seq[i + 1]
    windows = []
    scored = 0  # tokens of `tokens` scored so far
    while scored < len(tokens):
        n_new = min(stride if scored else max_len, len(tokens) - scored)
        end = scored + n_new  # predict tokens[scored:end] = seq[scored+1 : end+1]
        start = max(0, end - max_len)  # inputs seq[start:end]
        inputs = seq[start:end]
        targets = [-100] * (scored - start) + seq[scored + 1 : end + 1]
        windows.append((inputs, targets))
        scored = end
    return windows


@torch.no_grad()
def text_loss(
    model: nn.Module,
    tokenizer,
    documents: list[str],
    seq_len: int,
    eos_id: int,
    batch_size: int = 16,
    stride: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss / perplexities / bits per byte of raw documents (each scored on its own, rolling windows)."""
    was_training = model.training
    model.eval()
    windows = []
    for enc in tokenizer.encode_batch(documents, add_special_tokens=False):
        windows += rolling_windows(enc.ids, eos_id, seq_len, stride)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        width = max(len(inp) for inp, _ in chunk)
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (inp, tgt) in enumerate(chunk):
            inputs[row, : len(inp)] = torch.tensor(inp)
            targets[row, : len(tgt)] = torch.tensor(tgt)
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs).logits.float()
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    model.train(was_training)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    n_words = sum(len(d.split()) for d in documents)
    return {
        "loss": nll / count,
        "token_ppl": math.exp(min(nll / count, 50.0)),
        "word_ppl": math.exp(min(nll / n_words, 50.0)),
        "byte_ppl": math.exp(min(nll / n_bytes, 50.0)),
        "bpb": nll / (math.log(2) * n_bytes),
        "tokens": count,
        "bytes": n_bytes,
        "words": n_words,
        "documents": len(documents),
        "stride": stride or seq_len,
        "context": seq_len,
    }


# ----------------------------------------------------------------------------- named tasks
# Raw-text corpora scored document by document (bits per byte compare across tokenizers).
TEXT_TASKS: dict[str, dict] = {
    "wikitext2": {"source": "builtin:wikitext2-test", "hub": "Salesforce/wikitext (wikitext-2-v1, test)",
                  "note": "tokenised v1 text (<unk>, @-@); one document per article"},
    "tinyshakespeare": {"source": "builtin:tinyshakespeare", "tail_fraction": 0.1, "hub": None,
                        "note": "last 10% of the speeches (char-rnn/nanoGPT convention); overlaps the training "
                                "text of a run prepared from builtin:tinyshakespeare"},
    "flores_swh": {"source": "builtin:flores-swh-devtest", "hub": "openlanguagedata/flores_plus (swh_Latn, devtest)",
                   "note": "1,012 sentences, each scored alone"},
    "flores_eng": {"source": "builtin:flores-eng-devtest", "hub": "openlanguagedata/flores_plus (eng_Latn, devtest)",
                   "note": "1,012 sentences, each scored alone"},
    "swahili_nt": {"source": "builtin:swahili-nt", "hub": None,
                   "note": "Swahili New Testament, one document per chapter: out-of-domain (religious) Swahili "
                           "for models trained on web/news text"},
}  # fmt: skip


def run_text_task(
    name: str,
    model: nn.Module,
    tokenizer,
    data_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    stride: int | None = None,
) -> dict:
    """Loss, perplexities and bits per byte of one of TEXT_TASKS (`limit` = first N documents)."""
    from smallscale.data import sources
    from smallscale.data.tokenizer import eos_id

    spec = TEXT_TASKS[name]
    docs = list(sources.iter_documents(spec["source"], sources.SourceOptions(data_root=str(data_root) if data_root else None)))
    if "tail_fraction" in spec:
        docs = docs[int(len(docs) * (1 - spec["tail_fraction"])) :]
    docs = docs[:limit] if limit else docs
    device = device or next(model.parameters()).device
    seq_len = model.cfg.seq_len
    result = text_loss(model, tokenizer, docs, seq_len, eos_id(tokenizer), batch_size, stride, device)
    return {**result, "n": len(docs), "settings": {"source": spec["source"], "hub_id": spec["hub"], "note": spec["note"],
                                                   "stride": stride or seq_len, "context": seq_len, "limit": limit}}  # fmt: skip


def run_heldout(
    model: nn.Module,
    tokenizer,
    dataset_dir: str | Path,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    split: str = "val",
) -> dict:
    """The held-out split of the prepared dataset the run was trained on (every token scored once)."""
    device = torch.device(device or next(model.parameters()).device)
    result = split_loss(model, dataset_dir, model.cfg.seq_len, batch_size, device, split=split)
    return {**result, "n": result["tokens"], "settings": {"dataset": str(dataset_dir), "split": split,
                                                          "context": model.cfg.seq_len}}  # fmt: skip


# ----------------------------------------------------------------------------- beyond the training context
def run_length_extrapolation(
    model: nn.Module,
    tokenizer,
    dataset_dir: str | Path,
    factors: tuple[int, ...] | list[int] = (1, 2, 4),
    batch_size: int = 8,
    device: torch.device | str | None = None,
    split: str = "val",
) -> dict:
    """Held-out bits per byte with contexts of factor x the training context (every token scored once).

    The same weights are evaluated in a model whose position tables run to the longer context:
    sinusoidal, rotary, ALiBi and NoPE extend by formula; a learned table has no rows beyond
    the training length, so those factors are reported as not applicable (with the reason).
    Metrics `bpb_<k>x` / `loss_<k>x` per factor; `ratio_<k>x` = bpb_kx / bpb_1x.
    """
    from dataclasses import replace

    from smallscale.model.gpt import GPT

    device = torch.device(device or next(model.parameters()).device)
    base = model.cfg
    result: dict = {"settings": {"dataset": str(dataset_dir), "split": split, "train_context": base.seq_len,
                                 "factors": list(factors), "position": base.position}}  # fmt: skip
    state = model.state_dict()
    for k in factors:
        if k < 1 or int(k) != k:
            raise UserError(f"length_extrapolation: factors must be positive integers, got {k!r}")
        if k > 1 and base.position == "learned":
            result["settings"]["not_applicable"] = "learned position tables have no rows beyond the training context"
            continue
        long_model = model if k == 1 else GPT(replace(base, seq_len=base.seq_len * k)).to(device)
        if long_model is not model:
            long_model.load_state_dict(state)  # position buffers are non-persistent: recomputed for the longer context
            long_model.eval()
        scores = split_loss(long_model, dataset_dir, base.seq_len * k, max(1, batch_size // k), device, split=split)
        result[f"bpb_{k}x"], result[f"loss_{k}x"] = scores["bpb"], scores["loss"]
    for k in factors:
        if k > 1 and f"bpb_{k}x" in result and "bpb_1x" in result:
            result[f"ratio_{k}x"] = result[f"bpb_{k}x"] / result["bpb_1x"]
    result["n"] = load_manifest(dataset_dir)["splits"][split]["tokens"]
    return result
