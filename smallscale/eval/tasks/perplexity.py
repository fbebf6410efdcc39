"""Loss, perplexity and bits per byte: one definition for every held-out and raw-text figure.

**Bits per byte** = sum of the NLL (nats) of every *document token* / (ln 2 x UTF-8 bytes of the
documents), the lm-evaluation-harness definition (`loglikelihood_rolling`, `bits_per_byte`): each
document is conditioned on a leading EOS (as every training document follows one), its tokens are
predicted, and the EOS that closes it is never a target, because its bytes (none) are not in the
denominator. So the held-out split of a prepared dataset (`heldout`, the trainer's `val_bpb`) and
the same documents given as raw text (`wikitext2`, `flores_*`, `text_loss`) score the same number
(tests/test_perplexity.py holds them equal). Perplexity (exp of the mean token loss) only compares
models that share a tokenizer.

**Windows.** Everything is scored over one layout: a token stream `[EOS] doc_1 EOS doc_2 EOS ...`
(a prepared split is stored this way; raw documents are tokenised into it). A window is a slice of
the stream `(start, n_inputs, n_context)`: inputs `stream[start : start + n_inputs]`, targets the
next tokens, of which the first `n_context` are context only (not scored) and EOS targets are never
scored. Two protocols cut the windows:
- `documents` (default): each document alone in disjoint windows of the model's context (lm-eval's
  rolling windows; `stride` < context re-reads context so every token sees more of it);
- `stream`: disjoint windows over the packed stream, attending across document boundaries as in
  training: what `length_extrapolation` needs, since most documents are shorter than the context.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smallscale.data.loader import TokenArray, split_stream
from smallscale.data.shards import load_manifest
from smallscale.errors import UserError

Protocol = Literal["documents", "stream"]
_SCAN_TOKENS = 1 << 22  # tokens per read when finding document boundaries


def document_spans(stream: TokenArray, eos: int) -> np.ndarray:
    """(n_docs, 2) int64 rows [start, end) of every document's tokens in `stream`, which begins with
    an EOS; a document ends at the next EOS (or at the end of the stream)."""
    eos_positions = []
    for offset in range(0, len(stream), _SCAN_TOKENS):
        chunk = stream.read(offset, min(_SCAN_TOKENS, len(stream) - offset))
        eos_positions.append(np.flatnonzero(chunk == eos) + offset)
    ends = np.concatenate([*eos_positions, np.array([len(stream)], dtype=np.int64)]) if eos_positions else np.array([len(stream)])
    starts, ends = ends[:-1] + 1, ends[1:]
    keep = ends > starts  # no empty documents (and nothing after a final EOS)
    return np.stack([starts[keep], ends[keep]], axis=1).astype(np.int64)


def document_windows(spans: np.ndarray, max_len: int, stride: int | None = None) -> np.ndarray:
    """(n, 3) windows (start, n_inputs, n_context) scoring every token of every span exactly once,
    each document on its own (lm-eval's `get_rolling_token_windows`): the first window predicts up
    to max_len tokens from the EOS before the document; each later one predicts the next `stride`
    tokens (default max_len) and reads as many of the document's tokens before them as fit in
    max_len, so a document's last, shorter window still sees a full context (not scored)."""
    stride = stride or max_len
    if not 0 < stride <= max_len:
        raise UserError(f"stride must be in [1, context {max_len}], got {stride}")
    lengths = spans[:, 1] - spans[:, 0]
    per_doc = np.where(lengths > 0, 1 + -(-np.maximum(lengths - max_len, 0) // stride), 0)
    doc = np.repeat(np.arange(len(spans)), per_doc)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # window index within its document
    # in document coordinates: this window predicts tokens [scored, end); sequence index i is the
    # stream position (document start - 1 + i), 0 being the EOS before the document
    scored = np.where(k == 0, 0, max_len + (k - 1) * stride)
    end = np.minimum(scored + np.where(k == 0, max_len, stride), lengths[doc])
    begin = np.maximum(0, end - max_len)
    return np.stack([spans[doc, 0] - 1 + begin, end - begin, scored - begin], axis=1).astype(np.int64).reshape(-1, 3)


def stream_windows(n_tokens: int, max_len: int) -> np.ndarray:
    """(n, 3) disjoint windows over a packed stream of n_tokens: every token after the first is a
    target once (EOS targets are skipped when scoring)."""
    starts = np.arange(0, n_tokens - 1, max_len, dtype=np.int64)
    n_inputs = np.minimum(max_len, n_tokens - 1 - starts)
    return np.stack([starts, n_inputs, np.zeros_like(starts)], axis=1)


def _decoded_size(dataset_dir: str | Path, stream: TokenArray, spans: np.ndarray) -> tuple[int, int]:
    """(UTF-8 bytes, whitespace words) of the documents `spans` of a prepared split, by decoding them."""
    from smallscale.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(dataset_dir) / "tokenizer.json")
    texts = tokenizer.decode_batch([stream.read(int(a), int(b - a)).tolist() for a, b in spans], skip_special_tokens=False)
    return sum(len(t.encode("utf-8")) for t in texts), sum(len(t.split()) for t in texts)


@dataclass
class ScoringSet:
    """A token stream, the windows that score it and the bytes (and words) of its documents."""

    stream: TokenArray
    eos: int
    windows: np.ndarray  # (n, 3) start, n_inputs, n_context
    n_bytes: int
    n_words: int | None = None

    @classmethod
    def from_split(
        cls, dataset_dir: str | Path, seq_len: int, split: str = "val", protocol: Protocol = "documents",
        stride: int | None = None, max_tokens: int | None = None,
    ) -> ScoringSet:  # fmt: skip
        """The split's documents; with `max_tokens`, only its first documents (in stream order) holding
        at most that many document tokens (at least one document): a fixed subset for cheap in-loop
        evaluation, whose bytes are counted by decoding it (the tokenizers round-trip exactly)."""
        manifest = load_manifest(dataset_dir)
        if split not in manifest["splits"]:
            raise UserError(f"split {split!r} not in {str(dataset_dir)!r}; it has {sorted(manifest['splits'])}")
        info = manifest["splits"][split]
        stream, eos = split_stream(dataset_dir, split)
        n_bytes, n_words = int(info["bytes"]), info.get("words")
        if protocol == "stream":
            return cls(stream, eos, stream_windows(len(stream), seq_len), n_bytes, n_words)
        spans = document_spans(stream, eos)
        if max_tokens is not None and int((spans[:, 1] - spans[:, 0]).sum()) > max_tokens:
            kept = max(1, int(np.searchsorted(np.cumsum(spans[:, 1] - spans[:, 0]), max_tokens, side="right")))
            spans = spans[:kept]
            n_bytes, n_words = _decoded_size(dataset_dir, stream, spans)
        return cls(stream, eos, document_windows(spans, seq_len, stride), n_bytes, n_words)

    @classmethod
    def from_documents(cls, token_docs: Sequence[Sequence[int]], eos: int, seq_len: int, n_bytes: int,
                       stride: int | None = None, n_words: int | None = None) -> ScoringSet:  # fmt: skip
        """Documents as token lists, laid out as a prepared split is: [EOS] doc EOS doc EOS ..."""
        lengths = np.array([len(d) for d in token_docs], dtype=np.int64)
        flat = np.full(1 + int(lengths.sum()) + len(token_docs), eos, dtype=np.int64)
        ends = 1 + np.cumsum(lengths + 1) - 1  # position of each closing EOS
        starts = ends - lengths
        for doc, first in zip(token_docs, starts.tolist(), strict=True):
            flat[first : first + len(doc)] = doc
        spans = np.stack([starts, ends], axis=1)[lengths > 0]
        return cls(TokenArray([flat]), eos, document_windows(spans, seq_len, stride), n_bytes, n_words)

    def batches(self, batch_tokens: int) -> list[np.ndarray]:
        """Window indices per batch: windows sorted longest first (ties in stream order), each batch
        as many rows as fit `batch_tokens` at its widest row, so short documents pack densely."""
        order = np.argsort(-self.windows[:, 1], kind="stable")
        batches, i = [], 0
        while i < len(order):
            width = int(self.windows[order[i], 1])
            rows = max(1, batch_tokens // width)
            batches.append(order[i : i + rows])
            i += rows
        return batches

    def batches_per_rank(self, batch_tokens: int, world_size: int) -> int:
        """The most batches any rank gets (ranks take batches round-robin), for `pad_batches_to`."""
        return -(-len(self.batches(batch_tokens)) // world_size)

    def tensors(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(rows), widest), right-padded; unscored targets are -100."""
        width = int(self.windows[rows, 1].max())
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.full_like(inputs, -100)
        for r, (start, n, n_context) in enumerate(self.windows[rows].tolist()):
            chunk = torch.from_numpy(self.stream.read(start, n + 1))
            inputs[r, :n] = chunk[:-1]
            scored = chunk[1:].clone()
            scored[:n_context] = -100
            scored[scored == self.eos] = -100
            targets[r, :n] = scored
        return inputs, targets


@torch.no_grad()
def score(
    model: nn.Module,
    scoring: ScoringSet,
    batch_tokens: int,
    device: torch.device | str,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[list[float]], list[float]] = lambda v: v,
    pad_batches_to: int | None = None,
) -> dict[str, float]:
    """Sum the NLL of `scoring`'s targets (this rank's batches), reduce over ranks, return
    loss / ppl / bpb / tokens / bytes.

    `pad_batches_to` runs extra dummy forwards so every rank makes the same number of calls (needed
    when the forward contains collectives, as under FSDP).
    """
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    batches = scoring.batches(batch_tokens)[rank::world_size]
    for rows in batches:
        inputs, targets = (t.to(device, non_blocking=True) for t in scoring.tensors(rows))
        with autocast():
            logits = model(inputs).logits
        nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        count += (targets != -100).sum()
    for _ in range(len(batches), pad_batches_to or 0):
        with autocast():
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
    total_nll, total_tokens = reduce([nll.item(), count.item()])
    model.train(was_training)
    loss = total_nll / total_tokens if total_tokens else float("nan")
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": total_nll / (math.log(2) * scoring.n_bytes) if scoring.n_bytes else float("nan"),
        "tokens": int(total_tokens),
        "bytes": int(scoring.n_bytes),
    }


def split_loss(
    model: nn.Module,
    dataset_dir: str | Path,
    seq_len: int,
    batch_size: int,
    device: torch.device | str,
    split: str = "val",
    protocol: Protocol = "documents",
) -> dict[str, float]:
    """Loss / ppl / bpb of a prepared split (`batch_size` rows of `seq_len` tokens per forward)."""
    scoring = ScoringSet.from_split(dataset_dir, seq_len, split, protocol)
    return score(model, scoring, batch_size * seq_len, device)


# ----------------------------------------------------------------------------- raw text
def rolling_windows(tokens: list[int], prefix: int, max_len: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that score every token of one document exactly once: the windows
    of `document_windows` for a single document, as token lists (targets -100 where not scored)."""
    seq = [prefix, *tokens]
    windows = []
    for start, n, n_context in document_windows(np.array([[1, 1 + len(tokens)]]), max_len, stride).tolist():
        windows.append((seq[start : start + n], [-100] * n_context + seq[start + 1 + n_context : start + 1 + n]))
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
    """Loss / perplexities / bits per byte of raw documents, each scored on its own (module docstring)."""
    token_docs = [enc.ids for enc in tokenizer.encode_batch(documents, add_special_tokens=False)]
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    n_words = sum(len(d.split()) for d in documents)
    scoring = ScoringSet.from_documents(token_docs, eos_id, seq_len, n_bytes, stride)
    result = score(model, scoring, batch_size * seq_len, device)
    nll = result["loss"] * result["tokens"] if result["tokens"] else 0.0
    return {
        "loss": result["loss"],
        "token_ppl": result["ppl"],
        "word_ppl": math.exp(min(nll / n_words, 50.0)) if n_words else float("nan"),
        "byte_ppl": math.exp(min(nll / n_bytes, 50.0)) if n_bytes else float("nan"),
        "bpb": result["bpb"],
        "tokens": result["tokens"],
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
    """The held-out split of the prepared dataset the run was trained on: every document token scored
    once, each document on its own (the bits per byte of the same documents as raw text)."""
    device = torch.device(device or next(model.parameters()).device)
    result = split_loss(model, dataset_dir, model.cfg.seq_len, batch_size, device, split=split)
    return {**result, "n": result["tokens"], "settings": {"dataset": str(dataset_dir), "split": split,
                                                          "context": model.cfg.seq_len, "protocol": "documents"}}  # fmt: skip


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

    Scored over the packed stream (`stream` protocol in the module docstring: windows run across
    document boundaries, as in training, since most documents are shorter than the context; EOS
    targets are not scored, so the numerator and denominator are those of every other bpb). The
    same weights are evaluated in a model whose position tables run to the longer context:
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
        scores = split_loss(long_model, dataset_dir, base.seq_len * k, max(1, batch_size // k), device, split=split,
                            protocol="stream")  # fmt: skip
        result[f"bpb_{k}x"], result[f"loss_{k}x"] = scores["bpb"], scores["loss"]
    for k in factors:
        if k > 1 and f"bpb_{k}x" in result and "bpb_1x" in result:
            result[f"ratio_{k}x"] = result[f"bpb_{k}x"] / result["bpb_1x"]
    result["n"] = load_manifest(dataset_dir)["splits"][split]["document_tokens"]
    result["settings"]["protocol"] = "stream"
    return result
