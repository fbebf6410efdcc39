"""The fixed document order of a prepared dataset, and exact dedup, in memory bounded for any corpus size.

A document's place is its *order key*: a 64-bit bijection of its content hash keyed by the seed
(`order_keys`). The dataset lists its documents by increasing key, so the order is a pseudo-random
permutation fixed by (seed, content) alone: not by where a document lies in the source, how the
source was cut into parts, how many processes or array tasks encoded them, or in what order they
finished. Copies of one document (equal hash, hence equal key) are adjacent in that order, which is
what makes dedup a comparison with the neighbour instead of a set of every hash seen.

Each encoded part stores its per-document index, and its tokens, sorted by key
(`shards._encode_part`), so reading the dataset's order reads every part file front to back. The
merge reads the corpus in key ranges (`ordered_records`): range b of 2^k holds the keys whose top k bits
are b, so the ranges in turn are the whole order, and k is chosen so that a range holds about
`BUCKET_DOCS` records. Only one range's records (41 bytes each) are in memory at a time, read from
every part's index file by offset. Nothing here grows with the corpus but one small table of
(parts x ranges) positions; how many ranges there are changes memory, never the output.

Ties (equal keys: copies, kept when dedup is off or when one copy is train and one val) are broken
by split (train first) and then by source position (part, then place in the part), which cutting
the source differently does not change.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Per-document index record written by the encode step, one file per part, sorted by `key`.
INDEX_DTYPE = np.dtype(
    [("key", "<u8"), ("offset", "<i8"), ("tokens", "<i8"), ("bytes", "<i8"), ("words", "<i8"), ("val", "u1")]
)
# Records per key range in the merge: ~11 MB of records, ~40 MB with the sort's temporaries.
BUCKET_DOCS = 1 << 18

# splitmix64's finalizer: xor-shifts and odd multipliers, each a bijection of 64-bit words.
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))


def order_keys(hashes: np.ndarray, seed: int) -> np.ndarray:
    """The order key (uint64) of each document from its 64-bit content hash: distinct hashes give
    distinct keys, and the seed changes the whole order."""
    salt = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=8, person=b"doc-order").digest()
    z = np.asarray(hashes, dtype=np.uint64) ^ np.uint64(int.from_bytes(salt, "little"))
    z = (z ^ (z >> _SHIFTS[0])) * _MIX[0]
    z = (z ^ (z >> _SHIFTS[1])) * _MIX[1]
    return z ^ (z >> _SHIFTS[2])


def sort_index(index: np.ndarray) -> np.ndarray:
    """A part's index records by key; equal keys keep their source order."""
    return index[np.argsort(index["key"], kind="stable")]


def first_copies(records: np.ndarray) -> np.ndarray:
    """Mask of the records (in order) that are the first of their (key, split): exact dedup, within
    each split, of records where copies are adjacent."""
    keep = np.ones(len(records), dtype=bool)
    if len(records) > 1:
        keys, val = records["key"], records["val"]
        keep[1:] = (keys[1:] != keys[:-1]) | (val[1:] != val[:-1])
    return keep


class IndexFile:
    """One part's index file (.npy of INDEX_DTYPE sorted by key), read by record ranges."""

    def __init__(self, path: Path):
        self.path = path
        self.offset, self.count = npy_data_offset(path, INDEX_DTYPE)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Records [start, stop)."""
        size = INDEX_DTYPE.itemsize
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), (stop - start) * size, self.offset + start * size)
        assert len(data) == (stop - start) * size, (self.path, start, stop)
        return np.frombuffer(data, dtype=INDEX_DTYPE)

    def key_positions(self, edges: np.ndarray) -> np.ndarray:
        """[0, first record with key >= each edge..., count]: where each key range starts and ends."""
        keys = self.read(0, self.count)["key"]
        return np.concatenate([[0], np.searchsorted(keys, edges, side="left"), [self.count]])


def range_edges(n_docs: int, bucket_docs: int) -> np.ndarray:
    """The inner boundaries (uint64) of 2^k equal key ranges holding about `bucket_docs` records each."""
    bits = min(32, max(0, math.ceil(math.log2(max(1.0, n_docs / bucket_docs)))))
    if bits == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.arange(1, 1 << bits, dtype=np.uint64) << np.uint64(64 - bits)


def ordered_records(index_paths: list[Path], bucket_docs: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(records, part number of each) for one key range after another: together every record of
    every part, in the dataset's order (key, then split, then source position). `bucket_docs`
    (default BUCKET_DOCS) sets the memory held at once, and nothing else."""
    files = [IndexFile(path) for path in index_paths]
    edges = range_edges(sum(f.count for f in files), bucket_docs or BUCKET_DOCS)
    positions = np.stack([f.key_positions(edges) for f in files]) if files else np.zeros((0, len(edges) + 2), np.int64)
    for b in range(len(edges) + 1):
        pieces, owners = [], []
        for part, f in enumerate(files):
            start, stop = int(positions[part, b]), int(positions[part, b + 1])
            if stop > start:
                pieces.append(f.read(start, stop))
                owners.append(np.full(stop - start, part, dtype=np.int32))
        if not pieces:
            continue
        records, owner = np.concatenate(pieces), np.concatenate(owners)
        order = np.lexsort((records["val"], records["key"]))  # stable: equal (key, val) stay in part order
        yield records[order], owner[order]


def npy_data_offset(path: Path, dtype: np.dtype) -> tuple[int, int]:
    """(byte offset of the data, element count) of a 1-D .npy file of `dtype`."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        shape, fortran_order, stored = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
        assert stored == dtype and len(shape) == 1 and not fortran_order, (path, stored, shape)
        return f.tell(), shape[0]
