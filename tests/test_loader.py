"""Batches: nested budgets, determinism, exact resume, rank-disjointness, full val coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smallscale.data.loader import TokenArray, TrainLoader
from smallscale.data.shards import load_manifest, read_split
from smallscale.errors import UserError


def test_budgets_are_nested_prefixes(tiny_dataset):
    k = 5000
    small = TrainLoader(tiny_dataset, seq_len=16, micro_batch=2, token_budget=k)
    large = TrainLoader(tiny_dataset, seq_len=16, micro_batch=2, token_budget=2 * k)
    assert small.budget_tokens == k and large.budget_tokens == 2 * k
    assert np.array_equal(large.tokens.read(0, k + 1), small.tokens.read(0, k + 1))


def test_every_budget_token_is_a_target_once_per_epoch_after_a_leading_eos(tiny_dataset):
    manifest = load_manifest(tiny_dataset)
    loader = TrainLoader(tiny_dataset, seq_len=16, micro_batch=4, token_budget=16 * 40)  # 40 windows
    assert loader.n_windows == 40
    inputs, targets = zip(*(loader.next_batch() for _ in range(10)))  # one epoch: 10 x 4 windows
    assert loader.epochs == 1.0
    first = np.concatenate([np.asarray(a, dtype=np.int64) for a in read_split(tiny_dataset, "train")])[: 16 * 40]
    scored = torch.cat([t.flatten() for t in targets]).sort().values
    assert torch.equal(scored, torch.from_numpy(np.sort(first)))
    windows_with_eos_first = [x for batch in inputs for x in batch if x[0] == manifest["eos_id"]]
    assert any(torch.equal(x[1:], torch.from_numpy(first[:15])) for x in windows_with_eos_first)


def test_token_array_reads_across_shard_boundaries():
    arrays = [np.arange(0, 5), np.arange(5, 7), np.arange(7, 20)]
    ta = TokenArray(arrays, limit=18)
    assert ta.read(3, 10).tolist() == list(range(3, 13))
    assert len(ta) == 18
    with pytest.raises(AssertionError):
        ta.read(10, 9)


def test_same_seed_same_batches_and_resume_is_exact(tiny_dataset):
    def run(n, loader=None):
        loader = loader or TrainLoader(tiny_dataset, seq_len=32, micro_batch=4, seed=7)
        return [loader.next_batch() for _ in range(n)], loader

    full, _ = run(12)
    first, interrupted = run(5)
    state = interrupted.state_dict()
    resumed = TrainLoader(tiny_dataset, seq_len=32, micro_batch=4, seed=7)
    resumed.load_state_dict(state)
    rest, _ = run(7, resumed)
    for (xa, ya), (xb, yb) in zip(full, first + rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_seed = TrainLoader(tiny_dataset, seq_len=32, micro_batch=4, seed=8).next_batch()
    assert not torch.equal(other_seed[0], full[0][0])


def test_targets_are_inputs_shifted_by_one(tiny_dataset):
    x, y = TrainLoader(tiny_dataset, seq_len=32, micro_batch=4).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_ranks_never_share_a_window_and_cover_the_single_process_batch(tiny_dataset):
    kw = dict(seq_len=32, token_budget=4000, seed=3)
    ranks = [TrainLoader(tiny_dataset, micro_batch=2, rank=r, world_size=2, **kw) for r in range(2)]
    single = TrainLoader(tiny_dataset, micro_batch=4, **kw)
    n_windows = single.n_windows
    seen = []
    for _ in range(n_windows // 4):
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), single.next_batch()[0])
        seen += [tuple(row.tolist()) for p in parts for row in p]
    assert len(seen) == len(set(seen))  # within one epoch no window repeats across ranks


def test_epochs_are_reported_when_data_repeats(tiny_dataset):
    loader = TrainLoader(tiny_dataset, seq_len=32, micro_batch=4, token_budget=2000)
    steps = 3 * loader.n_windows // 4
    for _ in range(steps):
        loader.next_batch()
    assert loader.epochs == pytest.approx(steps * 4 / loader.n_windows)
    assert loader.epochs >= 2.9


def test_budget_larger_than_data_is_a_user_error(tiny_dataset):
    with pytest.raises(UserError, match="token_budget"):
        TrainLoader(tiny_dataset, seq_len=32, micro_batch=4, token_budget=10**12)
