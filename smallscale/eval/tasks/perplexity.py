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
