"""Deterministic, resumable, rank-aware batches from token shards.

The train stream is the concatenation of the train shards in their fixed order, cut to its first
`token_budget` tokens: a smaller budget is a prefix of a larger one (nested budgets). The stream is
cut into `n_windows = (budget - 1) // seq_len` windows of `seq_len + 1` tokens (consecutive windows
share one token, so every token but the first is a target once per epoch). Sample `g` (counting
over the whole run, all ranks) is window `perm_e[g % n_windows]` of epoch `e = g // n_windows`,
where `perm_e` is a permutation seeded by (seed, e). So a batch is a pure function of
(seed, step): resuming needs only the number of samples consumed, and ranks take disjoint slices of
each global batch, hence disjoint windows within an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from smallscale.data.shards import load_manifest, read_split
from smallscale.errors import UserError


class TokenArray:
    """Several 1-D token memmaps viewed as one stream, cut to its first `limit` tokens."""

    def __init__(self, arrays: list[np.ndarray], limit: int | None = None):
        self.arrays = arrays
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        total = int(self.starts[-1])
        self.length = total if limit is None else min(limit, total)

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, crossing shard boundaries if needed."""
        assert 0 <= start and start + length <= self.length, (start, length, self.length)
        k = int(np.searchsorted(self.starts, start, side="right") - 1)
        offset = start - int(self.starts[k])
        arr = self.arrays[k]
        if offset + length <= len(arr):
            return np.asarray(arr[offset : offset + length], dtype=np.int64)
        pieces, need = [], length
        while need > 0:
            take = min(need, len(self.arrays[k]) - offset)
            pieces.append(np.asarray(self.arrays[k][offset : offset + take], dtype=np.int64))
            need -= take
            k += 1
            offset = 0
        return np.concatenate(pieces)


class TrainLoader:
    """Batches of (inputs, targets), each (micro_batch, seq_len), for one rank."""

    def __init__(
        self,
        dataset_dir: str | Path,
        seq_len: int,
        micro_batch: int,
        token_budget: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        manifest = load_manifest(dataset_dir)
        available = manifest["splits"]["train"]["tokens"]
        if token_budget is not None and token_budget > available:
            raise UserError(
                f"token_budget {token_budget:,} exceeds the {available:,} train tokens in {str(dataset_dir)!r}; "
                "lower it (repeat data with more training tokens instead) or prepare more data"
            )
        self.tokens = TokenArray(read_split(dataset_dir, "train"), token_budget)
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < micro_batch * world_size:
            raise UserError(
                f"the train stream ({len(self.tokens):,} tokens) holds only {self.n_windows} windows of "
                f"seq_len {seq_len}; need at least micro_batch x world_size = {micro_batch * world_size}"
            )
        self.samples_consumed = 0  # global sample counter (all ranks), the whole resumable state
        self._perm_epoch = -1
        self._perm = np.arange(self.n_windows)

    # -- state
    def state_dict(self) -> dict[str, int]:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["n_windows"] != self.n_windows:
            raise UserError("the checkpoint's data state does not match this dataset/seed/seq_len/budget")
        self.samples_consumed = int(state["samples_consumed"])

    @property
    def epochs(self) -> float:
        """Passes over the budgeted stream consumed so far (>1 when data is repeated)."""
        return self.samples_consumed / self.n_windows

    # -- batches
    def _window(self, g: int) -> int:
        epoch, pos = divmod(g, self.n_windows)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch of this rank; advances the global counter by micro_batch x world_size."""
        first = self.samples_consumed + self.rank * self.micro_batch
        rows = np.stack(
            [self.tokens.read(self._window(g) * self.seq_len, self.seq_len + 1) for g in range(first, first + self.micro_batch)]
        )
        self.samples_consumed += self.micro_batch * self.world_size
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()


def val_batches(
    dataset_dir: str | Path, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1, split: str = "val"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split, in order, as (inputs, targets) with every token a target exactly once.

    An EOS is prepended (as if a previous document had just ended), so the first document token is
    predicted too and the summed loss covers exactly the split's `tokens`, whose UTF-8 `bytes` are in
    the manifest: bits per byte = sum NLL / (ln 2 x bytes). The last window is shorter; its missing
    targets are -100 (ignored). Rank r takes windows r, r + world_size, ...
    """
    manifest = load_manifest(dataset_dir)
    shards = read_split(dataset_dir, split)
    eos = np.array([manifest["eos_id"]], dtype=np.dtype(manifest["dtype"]))
    stream = TokenArray([eos, *shards])
    n_targets = len(stream) - 1
    n_windows = -(-n_targets // seq_len)
    mine = list(range(rank, n_windows, world_size))
    for i in range(0, len(mine), batch_size):
        inputs = torch.zeros(len(mine[i : i + batch_size]), seq_len, dtype=torch.long)
        targets = torch.full_like(inputs, -100)
        for row, w in enumerate(mine[i : i + batch_size]):
            start = w * seq_len
            n = min(seq_len, n_targets - start)
            chunk = torch.from_numpy(stream.read(start, n + 1))
            inputs[row, :n] = chunk[:-1]
            targets[row, :n] = chunk[1:]
        yield inputs, targets
