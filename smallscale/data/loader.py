"""Deterministic, resumable, rank-aware batches from token shards.

The train stream is one EOS followed by the concatenation of the train shards in their fixed
order, cut to its first `token_budget` tokens: a smaller budget is a prefix of a larger one (nested
budgets). The stream is cut into `n_windows = budget // seq_len` windows of `seq_len + 1` tokens
(consecutive windows share one token, and the leading EOS is only an input, so every budget token is
a target once per epoch; the last `budget % seq_len` tokens are not used). Sample `g` (counting
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


# Version of the window layout (2: one EOS before the train stream); a checkpoint records it.
LAYOUT_VERSION = 2


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
        # One EOS before the stream, as if a previous document had just ended: the first document is
        # predicted from it, as every later one is from its predecessor's EOS, and each of the
        # `budget` tokens is a target once per epoch (budget // seq_len windows).
        eos = np.array([manifest["eos_id"]], dtype=np.dtype(manifest["dtype"]))
        self.tokens = TokenArray([eos, *read_split(dataset_dir, "train")], None if token_budget is None else token_budget + 1)
        self.budget_tokens = len(self.tokens) - 1
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.n_windows = self.budget_tokens // seq_len
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
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "n_windows": self.n_windows,
                "layout": LAYOUT_VERSION}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("layout") != LAYOUT_VERSION:
            raise UserError(
                "the checkpoint was written by an earlier smallscale whose train windows were laid out differently "
                "(no leading EOS); resuming would change the data order: start the run again"
            )
        if state.get("seed") != self.seed or state.get("n_windows") != self.n_windows or not isinstance(state.get("samples_consumed"), int):
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


def split_stream(dataset_dir: str | Path, split: str = "val") -> tuple[TokenArray, int]:
    """(stream, eos_id): the tokens of `split` with one EOS prepended, as if a previous document had
    just ended, so that every document (its tokens, then its EOS) starts after an EOS.
    Evaluation windows over it are cut by `smallscale.eval.tasks.perplexity`."""
    manifest = load_manifest(dataset_dir)
    eos = np.array([manifest["eos_id"]], dtype=np.dtype(manifest["dtype"]))
    return TokenArray([eos, *read_split(dataset_dir, split)]), int(manifest["eos_id"])
