"""`heldout_sources`: in-domain bits per byte of each source of a mixture, on the source's own val split.

A mixture dataset (`smallscale data mix`, a study's `mix:`) keeps each source as a prepared dataset
in `DATASET/sources/<name>` with the mixture's tokenizer; its val split is that source's held-out
text (the same documents, in the same order, in every mixture that names the source with the same
options: split and order go by document hash and seed, not by tokenizer, unless a val split reaches
its `val_tokens` cap, which counts tokens). Each is scored as `heldout` scores a split
(every document on its own after an EOS; bits per byte over its UTF-8 bytes), so the numbers compare
across mixtures and tokenizers.

Metrics: `<source>.bpb` per source (top level, so the results table has `eval.heldout_sources.<source>.bpb`),
`bpb` pooled over all sources' documents, `mean_bpb` the unweighted mean over sources, and
`sources.<name>` with loss, perplexity, tokens, bytes and documents. `max_documents` (or `limit`)
scores the first N documents of each source's val split (in its fixed order): the same
documents whichever tokenizer reads them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smallscale.data.loader import split_stream
from smallscale.data.mixture import source_folders
from smallscale.data.shards import load_manifest
from smallscale.errors import UserError
from smallscale.eval.tasks.perplexity import (
    ScoringSet,
    document_spans,
    document_windows,
    score,
)


def _first_documents(folder: Path, tokenizer, seq_len: int, max_documents: int | None) -> tuple[ScoringSet, int]:
    """The source's val split (its first `max_documents` documents) as a ScoringSet, and how many documents."""
    stream, eos = split_stream(folder, "val")
    spans = document_spans(stream, eos)
    if max_documents is None or max_documents >= len(spans):
        return ScoringSet.from_split(folder, seq_len, "val"), len(spans)
    spans = spans[:max_documents]
    texts = tokenizer.decode_batch([stream.read(int(a), int(b - a)).tolist() for a, b in spans], skip_special_tokens=False)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return ScoringSet(stream, eos, document_windows(spans, seq_len), n_bytes, sum(len(t.split()) for t in texts)), len(spans)


def run_heldout_sources(
    model: nn.Module,
    tokenizer,
    dataset_dir: str | Path,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    max_documents: int | None = None,
) -> dict:
    """Bits per byte of every source's val split of the mixture `dataset_dir` (module docstring)."""
    if max_documents is not None and max_documents < 1:
        raise UserError(f"heldout_sources: max_documents must be a positive number of documents, got {max_documents}")
    device = torch.device(device or next(model.parameters()).device)
    seq_len = model.cfg.seq_len
    mixture_tokenizer = load_manifest(dataset_dir)["tokenizer"]["sha256"]
    result: dict = {}
    per_source: dict[str, dict] = {}
    nll_bits, n_bytes = 0.0, 0
    for name, folder in source_folders(dataset_dir).items():
        if load_manifest(folder)["tokenizer"]["sha256"] != mixture_tokenizer:
            raise UserError(f"source {name!r} of {str(dataset_dir)!r} was prepared with another tokenizer than the mixture's; "
                            "rebuild the mixture with --force")  # fmt: skip
        scoring, n_docs = _first_documents(folder, tokenizer, seq_len, max_documents)
        scores = score(model, scoring, batch_size * seq_len, device)
        per_source[name] = {**scores, "documents": n_docs}
        result[f"{name}.bpb"] = scores["bpb"]
        nll_bits += scores["bpb"] * scores["bytes"]
        n_bytes += scores["bytes"]
    bpbs = [s["bpb"] for s in per_source.values()]
    result.update(
        bpb=nll_bits / n_bytes if n_bytes else math.nan,
        mean_bpb=float(np.mean(bpbs)),
        n=sum(s["tokens"] for s in per_source.values()),
        sources=per_source,
        settings={"dataset": str(dataset_dir), "split": "val", "context": seq_len, "protocol": "documents",
                  "max_documents": max_documents},  # fmt: skip
    )
    return result
