"""Documents -> token shards + manifest: `smallscale data prepare`.

Pipeline (each step leaves files, so a crash never redoes finished work):

1. tokenizer: train on the train-split documents (first `tokenizer_train_bytes` of them) or load one;
2. encode (parallel over source parts): every document is normalised, hashed, assigned to train or
   val *by its hash* (so the split is independent of order and duplicates land together), encoded
   (tokens spooled to an unnamed temp file), and given its order key (smallscale/data/order.py).
   The part's tokens are then saved by increasing key to `work/part-NNNNNN.tokens.npy`, and its
   index records (key, where the tokens are, counts) to `work/part-NNNNNN.index.npy`. A part is
   written whole (temp files renamed, `done.json` last) and never redone, so a kill loses at most
   the parts in flight, one per worker;
3. merge: read the parts' index records in key ranges, drop exact duplicates (copies are
   neighbours in that order), cap the val split at `val_tokens`, and copy each document's tokens
   (EOS after each) into bounded shards `train-NNNNN.bin`, each written to a temp file and renamed.
   Since every part file is in key order too, the merge reads each front to back. The order key is
   a seeded bijection of the content hash, so the document order is fixed by (seed, corpus) alone,
   and token budgets are prefixes of it, so budgets nest;
4. `manifest.json` last (atomically): its presence means the dataset is complete.

Memory does not grow with the corpus: a worker holds one batch of documents, its part's index
records (41 bytes a document) and a 2 MB copy buffer; the merge one key range of index records
(`order.BUCKET_DOCS`) and an 8 MB copy buffer. Steps 1-3 run in this process and a process pool, or as SLURM jobs
(smallscale/data/cluster.py); both run the same functions on the same files, so give the same dataset.

Re-running into the same folder never mixes settings: the manifest (and `work/fingerprint.json` for
an unfinished attempt) records everything that determines the output (`_settings`); a complete
dataset is reused only if that matches, unfinished work only resumed if it matches, and `force`
starts from scratch. Readers check every shard against the manifest (`read_split`): sizes on each
open, sha256 and token ids once, remembered in `verified.json`; `verify_dataset` checks everything.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import re
import resource
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import numpy as np
from pydantic import Field
from tokenizers import Tokenizer

from smallscale.config import Strict
from smallscale.data import order, sources
from smallscale.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from smallscale.errors import UserError
from smallscale.io import atomic_file, atomic_write_bytes, atomic_write_json, sha256_file, writing
from smallscale.lock import hold

# 2: documents in order-key order (smallscale/data/order.py), where 1 shuffled them by a seeded
# permutation of their source positions; the val split capped at val_tokens. Both read the same.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
EXECUTORS = ("local", "slurm", "submitit-local")


class PrepareConfig(Strict):
    """Everything `data prepare` needs; also recorded in the manifest."""

    source: str
    out: str
    tokenizer: str = Field("bpe", description="'bpe', 'unigram', or a path to an existing tokenizer.json")
    vocab_size: int = Field(8192, ge=300, le=2**31 - 1)
    tokenizer_train_bytes: int = Field(200_000_000, gt=0, description="text used to train the tokenizer")
    split_by: Literal["file", "line", "paragraph"] | None = None
    text_field: str = "text"
    hf_config: str | None = None
    hf_split: str = "train"
    streaming: bool = False
    data_root: str | None = None
    nfc: bool = True
    dedup: bool = True
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    val_tokens: int | None = Field(
        10_000_000, gt=0, description="at most this many val tokens (EOS included): the first val documents in "
        "the dataset order; the documents the hash holds out beyond it are trained on (with val_source: left out)",
    )
    val_source: str | None = Field(
        None, description="a source whose documents are the val split (all of them); SOURCE is then all train, "
        "val_fraction unused, and duplicates are removed within each split",
    )
    seed: int = Field(1234, ge=-(2**63), lt=2**63)
    shard_tokens: int = Field(100_000_000, gt=0, description="max tokens per shard file")
    workers: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 1)), ge=1,
                         description="encoding processes; with a SLURM executor, array tasks")  # fmt: skip
    part_bytes: int = Field(64 * 2**20, gt=0, description="split large line-based files into parts of this size")

    def source_options(self) -> sources.SourceOptions:
        return sources.SourceOptions(
            split_by=self.split_by,
            text_field=self.text_field,
            hf_config=self.hf_config,
            hf_split=self.hf_split,
            streaming=self.streaming,
            data_root=self.data_root,
            part_bytes=self.part_bytes,
        )


def normalize(text: str, nfc: bool) -> str:
    return unicodedata.normalize("NFC", text) if nfc else text


def doc_hash(text: str) -> int:
    """64-bit content hash: dedup key, the split assignment (with the seed) and the order key."""
    return _hash_utf8(text.encode("utf-8"))


def _hash_utf8(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def is_val(h: int, seed: int, val_fraction: float) -> bool:
    mixed = hashlib.blake2b(h.to_bytes(8, "little"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(mixed.digest(), "little") / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def train_documents(cfg: PrepareConfig, parts: list[sources.Part]) -> Iterator[str]:
    """Train-split documents of SOURCE's `parts` in source order, up to `tokenizer_train_bytes` (for
    tokenizer training)."""
    budget = cfg.tokenizer_train_bytes
    val_fraction = 0.0 if cfg.val_source else cfg.val_fraction
    for part in parts:
        for raw in sources.read_part(part):
            text = normalize(raw, cfg.nfc)
            if is_val(doc_hash(text), cfg.seed, val_fraction):
                continue
            yield text
            budget -= len(text.encode("utf-8"))
            if budget <= 0:
                return


# ----------------------------------------------------------------------------- tokenizer step
def _train_tokenizer_file(cfg: PrepareConfig, parts: list[sources.Part], show_progress: bool) -> None:
    """Train the tokenizer on SOURCE and save it as OUT/tokenizer.json (temp file renamed)."""
    tok_path = Path(cfg.out) / "tokenizer.json"
    tok = train_tokenizer(train_documents(cfg, parts), cfg.tokenizer, cfg.vocab_size, show_progress=show_progress)
    if tok.get_vocab_size() <= 3:
        raise UserError(f"source {cfg.source!r} has no training documents; the corpus is empty")
    tmp = tok_path.with_name(".tokenizer.json.tmp")
    with writing(tok_path):
        tok.save(str(tmp))
    os.replace(tmp, tok_path)


# ----------------------------------------------------------------------------- encode step
@dataclass(frozen=True)
class _EncodeJob:
    index: int
    part: sources.Part
    work_dir: str
    tokenizer_path: str
    nfc: bool
    seed: int
    val_fraction: float
    dtype: str


@dataclass
class _EncodeResult:
    index: int
    documents: int
    text_bytes: int
    replaced_chars: int
    skipped: bool


def _part_paths(work_dir: str | Path, index: int) -> tuple[Path, Path, Path]:
    base = Path(work_dir) / f"part-{index:06d}"
    return base.with_suffix(".tokens.npy"), base.with_suffix(".index.npy"), base.with_suffix(".done.json")


def _encode_part(job: _EncodeJob, batch_docs: int = 512) -> _EncodeResult:
    """Encode one part into its token file and index, both in order-key order, so that the merge
    reads every part file front to back (sequential I/O, whatever the disk)."""
    tokens_path, index_path, done_path = _part_paths(job.work_dir, job.index)
    if done_path.exists():
        done = json.loads(done_path.read_text())
        return _EncodeResult(job.index, done["documents"], done["text_bytes"], done["replaced_chars"], True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = _part_tokenizer(job.tokenizer_path)
    dtype = np.dtype(job.dtype)
    stats = sources.ReadStats()
    columns: dict[str, list[int]] = {"hash": [], "tokens": [], "bytes": [], "words": [], "val": []}
    with _Spool(tokens_path, dtype) as spool:  # tokens in source order, on disk: a part can be any size
        texts = (normalize(raw, job.nfc) for raw in sources.read_part(job.part, stats))
        while batch := list(itertools.islice(texts, batch_docs)):
            _encode_batch(tok, batch, spool, columns, job)
        index = np.zeros(len(columns["hash"]), dtype=order.INDEX_DTYPE)
        index["key"] = order.order_keys(np.array(columns["hash"], dtype=np.uint64), job.seed)
        for name in ("tokens", "bytes", "words", "val"):
            index[name] = columns[name]
        index["offset"] = np.cumsum(index["tokens"]) - index["tokens"]  # in the spool
        index = order.sort_index(index)
        _save_in_order(spool, index, tokens_path, dtype)
    index["offset"] = np.cumsum(index["tokens"]) - index["tokens"]  # in the saved file
    _save_npy_atomic(index_path, index)
    text_bytes = int(index["bytes"].sum())
    summary = {"documents": len(index), "text_bytes": text_bytes, "replaced_chars": stats.replaced_chars}
    atomic_write_json(done_path, summary)  # last: marks the part finished
    return _EncodeResult(job.index, len(index), text_bytes, stats.replaced_chars, False)


def _part_tokenizer(path: str) -> Tokenizer:
    try:
        stat = os.stat(path)
    except OSError:
        return load_tokenizer(path)  # its one-line error
    return _worker_tokenizer(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(path: str, mtime_ns: int, size: int) -> Tokenizer:
    """One tokenizer per worker process for all its parts (keyed by the file's identity). Loading
    one per part cost ~4.5 MB of resident memory per part that freeing it never gave back (native
    heap; malloc_trim does not help): a worker's peak grew with the number of parts it encoded, 229
    MB at 200 MB of corpus against 395 MB at 2 GB (bench/bench_prepare_scale.py)."""
    return load_tokenizer(path)


def _encode_batch(tok: Tokenizer, texts: list[str], spool: _Spool, columns: dict[str, list[int]], job: _EncodeJob) -> None:
    """Append the tokens of `texts` to `spool` and their index fields to `columns`."""
    ids = [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]
    spool.write(np.fromiter(itertools.chain.from_iterable(ids), dtype=spool.dtype, count=sum(map(len, ids))))
    for text, doc_ids in zip(texts, ids, strict=True):
        data = text.encode("utf-8")
        h = _hash_utf8(data)
        columns["hash"].append(h)
        columns["tokens"].append(len(doc_ids))
        columns["bytes"].append(len(data))
        columns["words"].append(len(text.split()))
        columns["val"].append(is_val(h, job.seed, job.val_fraction))


class _Spool:
    """A part's tokens in source order, in an unnamed temp file next to `path` (the file errors name)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype

    def __enter__(self) -> _Spool:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".spool")
        os.unlink(tmp)  # gone with its last descriptor, however the process ends
        self.file = os.fdopen(fd, "w+b")
        return self

    def write(self, tokens: np.ndarray) -> None:
        with writing(self.path):
            _write_array(self.file, tokens)

    def __exit__(self, *_: object) -> None:
        self.file.close()


def _save_in_order(spool: _Spool, index: np.ndarray, path: Path, dtype: np.dtype) -> None:
    """The documents of `index` (offsets into `spool`), in its order, as the .npy file `path`."""
    with writing(path):
        spool.file.flush()
    with atomic_file(path) as f:
        f.write(_npy_header(dtype, int(index["tokens"].sum())))
        copier = _Copier(dtype, _PART_COPY_TOKENS, lambda tokens: _write_array(f, tokens))
        size, source = dtype.itemsize, spool.file.fileno()
        for offset, count in zip(index["offset"].tolist(), index["tokens"].tolist(), strict=True):
            copier.run(source, offset * size, count)
        copier.flush()


def _npy_header(dtype: np.dtype, count: int) -> bytes:
    """The .npy (format 1.0) header of a 1-D array of `count` elements."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)})
    return buf.getvalue()


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """`np.save` (format 1.0), through `_write_array`, written whole or not at all (`atomic_file`:
    two array tasks that both encode one part never write into one file)."""
    with atomic_file(path) as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        _write_array(f, array)


def _write_array(f: BinaryIO, array: np.ndarray) -> None:
    """`array`'s bytes in C order, by the file's own write: a full disk is then an OSError with its
    errno (ENOSPC, EFBIG), where numpy's tofile reports only a byte count."""
    f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


class _Copier:
    """Token runs read from files by byte position, and single tokens, passed to `sink` in order
    through one buffer of `capacity` tokens: memory stays bounded for documents of any length."""

    def __init__(self, dtype: np.dtype, capacity: int, sink: Callable[[np.ndarray], None]):
        self.buf = np.empty(capacity, dtype=dtype)
        self.bytes = memoryview(self.buf).cast("B")
        self.fill = 0  # tokens in the buffer
        self.emitted = 0  # tokens passed to the sink
        self.sink = sink

    @property
    def position(self) -> int:
        """Tokens copied so far."""
        return self.emitted + self.fill

    def run(self, fd: int, position: int, count: int) -> None:
        size = self.buf.itemsize
        while count > 0:
            if self.fill == len(self.buf):
                self.flush()
            take = min(count, len(self.buf) - self.fill)
            view = self.bytes[self.fill * size : (self.fill + take) * size]
            assert os.preadv(fd, [view], position) == len(view), (fd, position, take)
            self.fill += take
            position += take * size
            count -= take

    def token(self, value: int) -> None:
        if self.fill == len(self.buf):
            self.flush()
        self.buf[self.fill] = value
        self.fill += 1

    def flush(self) -> None:
        if self.fill:
            self.sink(self.buf[: self.fill])
        self.emitted += self.fill
        self.fill = 0


# ----------------------------------------------------------------------------- merge step
_PART_COPY_TOKENS = 2**20  # an encode worker's copy buffer (2 MB of uint16)
_COPY_TOKENS = 4 * 2**20  # the merge's copy buffer: 8 MB of uint16 (16 MB of uint32) tokens


class _PartTokens:
    """The token files of the encoded parts, open for reading documents by offset."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        _allow_open_files(len(paths))
        self.fds: list[int] = []
        self.starts: list[int] = []  # byte offset of each file's first token
        try:
            for path in paths:
                self.starts.append(order.npy_data_offset(path, dtype)[0])
                self.fds.append(os.open(path, os.O_RDONLY))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _allow_open_files(n: int) -> None:
    """Raise this process's soft limit on open files to fit `n` more, or say how."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 256
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise UserError(
            f"the merge reads {n:,} encoded parts at once but the open-file limit is {hard:,}; "
            "raise it (ulimit -n) or pass a larger --part-bytes"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class _SplitWriter:
    """One split's token stream (each document followed by EOS) as shards of at most `shard_tokens`
    tokens; each shard goes to a temp file that is renamed once complete, with its sha256 taken on
    the way."""

    def __init__(self, out: Path, name: str, dtype: np.dtype, shard_tokens: int, eos: int):
        self.out, self.name, self.shard_tokens, self.eos = out, name, shard_tokens, eos
        self.copier = _Copier(dtype, min(_COPY_TOKENS, shard_tokens), self._write)
        self.shards: list[dict] = []
        self.starts: dict[int, int] = {}  # shard number -> documents that start in it
        self.file: BinaryIO | None = None
        self.in_shard = 0
        self.digest = hashlib.sha256()
        self.totals = {"documents": 0, "document_tokens": 0, "bytes": 0, "words": 0}

    def add(self, parts: _PartTokens, owner: np.ndarray, records: np.ndarray) -> None:
        """Append the documents `records` (index records, in order) of parts `owner`."""
        for name in ("tokens", "bytes", "words"):
            self.totals["document_tokens" if name == "tokens" else name] += int(records[name].sum())
        self.totals["documents"] += len(records)
        size, copier = self.copier.buf.itemsize, self.copier
        for part, offset, count in zip(owner.tolist(), records["offset"].tolist(), records["tokens"].tolist(), strict=True):
            shard = copier.position // self.shard_tokens
            self.starts[shard] = self.starts.get(shard, 0) + 1
            copier.run(parts.fds[part], parts.starts[part] + offset * size, count)
            copier.token(self.eos)

    def _write(self, tokens: np.ndarray) -> None:
        done = 0
        while done < len(tokens):
            if self.file is None:
                self.file = open(self._tmp(len(self.shards)), "wb")  # noqa: SIM115 (closed in _close_shard)
            take = min(len(tokens) - done, self.shard_tokens - self.in_shard)
            chunk = tokens[done : done + take].view(np.uint8)
            with writing(self._path(len(self.shards))):
                self.file.write(chunk)
            self.digest.update(chunk)
            self.in_shard += take
            done += take
            if self.in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        assert self.file is not None
        number = len(self.shards)
        path = self._path(number)
        with writing(path):
            self.file.flush()
            os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self._tmp(number), path)
        self.shards.append({"file": path.name, "tokens": self.in_shard, "documents_started": self.starts.get(number, 0),
                            "sha256": self.digest.hexdigest()})  # fmt: skip
        self.in_shard = 0
        self.digest = hashlib.sha256()

    def finish(self) -> None:
        self.copier.flush()
        if self.file is not None:
            self._close_shard()

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _path(self, number: int) -> Path:
        return self.out / f"{self.name}-{number:05d}.bin"

    def _tmp(self, number: int) -> Path:
        path = self._path(number)
        return path.with_name(f".{path.name}.tmp")

    def stats(self) -> dict:
        t = self.totals
        return {
            "tokens": t["document_tokens"] + t["documents"],  # as stored: one EOS after each document
            "document_tokens": t["document_tokens"],
            "documents": t["documents"],
            "bytes": t["bytes"],
            "words": t["words"],
            "bytes_per_token": t["bytes"] / t["document_tokens"] if t["document_tokens"] else None,
            "fertility": t["document_tokens"] / t["words"] if t["words"] else None,  # tokens per whitespace word
            "shards": self.shards,
        }


class _ValCap:
    """The val split is the first val documents, in order, whose tokens (EOS included) fit `limit`."""

    def __init__(self, limit: int | None):
        self.room = limit
        self.full = False

    def fitting(self, stored_tokens: np.ndarray) -> int:
        """How many of the next val documents (their stored token counts, in order) go to val."""
        if self.room is None:
            return len(stored_tokens)
        if self.full:
            return 0
        total = np.cumsum(stored_tokens)
        n = int(np.searchsorted(total, self.room, side="right"))
        self.room -= int(total[n - 1]) if n else 0
        self.full = n < len(stored_tokens)
        return n


def _merge(cfg: PrepareConfig, settings: dict, jobs: list[_EncodeJob]) -> dict:
    """Step 3 and 4: the encoded parts -> shards and manifest.json (written last); returns the manifest."""
    out = Path(cfg.out)
    work = out / "work"
    tok_path = out / "tokenizer.json"
    tok = load_tokenizer(tok_path)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    eos = eos_id(tok)
    done = [json.loads(_part_paths(work, job.index)[2].read_text(encoding="utf-8")) for job in jobs]
    n_read = sum(d["documents"] for d in done)
    if n_read == 0:
        raise UserError(f"source {cfg.source!r} yielded no documents; the corpus is empty")

    writers = {name: _SplitWriter(out, name, dtype, cfg.shard_tokens, eos) for name in ("train", "val")}
    cap = _ValCap(cfg.val_tokens)
    kept = 0
    over_cap = {"documents": 0, "document_tokens": 0}
    parts = _PartTokens([_part_paths(work, job.index)[0] for job in jobs], dtype)
    try:
        for records, owner in order.ordered_records([_part_paths(work, job.index)[1] for job in jobs]):
            if cfg.dedup:  # the first copy of each document in each split (copies are neighbours)
                first = order.first_copies(records)
                records, owner = records[first], owner[first]
            kept += len(records)
            val_rows = np.flatnonzero(records["val"])
            within = val_rows[: cap.fitting(records["tokens"][val_rows] + 1)]
            beyond = val_rows[len(within) :]
            over_cap["documents"] += len(beyond)
            over_cap["document_tokens"] += int(records["tokens"][beyond].sum())
            to_val = np.zeros(len(records), dtype=bool)
            to_val[within] = True
            to_train = records["val"] == 0
            if cfg.val_source is None:  # held out by the hash beyond the cap: trained on, in its place
                to_train[beyond] = True
            for name, rows in (("train", np.flatnonzero(to_train)), ("val", np.flatnonzero(to_val))):
                writers[name].add(parts, owner[rows], records[rows])
        for writer in writers.values():
            writer.finish()
        splits = {name: writer.stats() for name, writer in writers.items()}
    finally:
        parts.close()
        for writer in writers.values():
            writer.abort()
    _check_splits(cfg, splits, over_cap)

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "tokenizer": {"path": "tokenizer.json", "sha256": sha256_file(tok_path), "kind": _tokenizer_kind(cfg)},
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": eos,
        "documents_read": int(n_read),
        "duplicates_removed": int(n_read - kept),
        "val_cap": {
            "val_tokens": cfg.val_tokens,
            "reached": cap.full,
            # held out by the hash but past the cap: trained on (or, from a val source, left out)
            "documents_over": over_cap["documents"],
            "document_tokens_over": over_cap["document_tokens"],
            "over_cap_to": "nowhere" if cfg.val_source else "train",
        },
        "replaced_invalid_utf8": int(sum(d["replaced_chars"] for d in done)),
        "splits": splits,
        "config": cfg.model_dump(mode="json"),
        "settings": settings,
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _check_splits(cfg: PrepareConfig, splits: dict, over_cap: dict) -> None:
    if splits["train"]["documents"] == 0:
        raise UserError("every document went to the val split; lower val_fraction or add documents")
    if splits["val"]["documents"] == 0 and over_cap["documents"]:
        raise UserError(f"val_tokens {cfg.val_tokens:,} is smaller than the first val document; raise it")
    if cfg.val_source and splits["val"]["documents"] == 0:
        raise UserError(f"val source {cfg.val_source!r} yielded no documents")


# ----------------------------------------------------------------------------- settings
# Options that do not change the prepared dataset: where it goes, how many processes encode, how
# the source is cut into parts, and where built-in files (pinned by sha256) are looked up.
_NOT_SETTINGS = ("out", "workers", "part_bytes", "data_root")
_SHARD_FILE = re.compile(r"\.?(train|val)-\d{5,}\.bin(\.tmp)?")


def _settings(cfg: PrepareConfig, parts: list[sources.Part], tokenizer_sha256: str | None) -> dict:
    """Everything that determines the prepared dataset; compared before reusing one or its unfinished work.

    A given tokenizer file counts by its sha256, not its path. A local source counts by its absolute
    path and the (path, size, modification time) of every file it reads, so an edited corpus is not
    mistaken for the one a dataset was prepared from.
    """
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_SETTINGS}
    if cfg.tokenizer not in ("bpe", "unigram"):
        settings["tokenizer"] = "file"
        settings["tokenizer_sha256"] = tokenizer_sha256
        del settings["vocab_size"], settings["tokenizer_train_bytes"]  # the file fixes the vocabulary
    settings["source"] = source_identity(cfg.source)
    settings["source_files"] = _source_files(cfg.source, parts)
    if cfg.val_source is not None:
        settings["val_source"] = source_identity(cfg.val_source)
        settings["val_source_files"] = _source_files(cfg.val_source, sources.resolve_parts(cfg.val_source, cfg.source_options()))
    return settings


def source_identity(source: str) -> str:
    """`source` with a local path made absolute, so `corpus/` and `./corpus` compare equal."""
    if source.startswith("builtin:"):
        return source
    if source.startswith("hf:"):
        name = source.removeprefix("hf:")
        return f"hf:{os.path.abspath(os.path.expanduser(name))}" if Path(name).expanduser().exists() else source
    return os.path.abspath(os.path.expanduser(source))


def _source_files(source: str, parts: list[sources.Part]) -> dict | None:
    """Count and digest of (path, size, mtime) of the local files read; None if nothing local is read."""
    if source.startswith("builtin:"):
        return None  # built-in files are pinned by sha256: the name determines the content
    roots = dict.fromkeys(Path(p.path) for p in parts if Path(p.path).exists())
    files = [f for root in roots for f in (sorted(x for x in root.rglob("*") if x.is_file()) if root.is_dir() else [root])]
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "sha256": digest.hexdigest()}


def setting_differences(recorded: dict, wanted: dict, per_entry: dict[str, str] | None = None) -> list[str]:
    """'name: old -> new' for each setting that differs (source files summarised, not listed).
    `per_entry` maps a setting whose value is a mapping (a mixture's `sources`) to the label its
    entries are reported under, one line per entry that differs ('source NAME: old -> new')."""
    diffs = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if old == new:
            continue
        if key in (per_entry or {}) and isinstance(old, dict) and isinstance(new, dict):
            diffs += [f"{per_entry[key]} {name}: {old.get(name)!r} -> {new.get(name)!r}"
                      for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]  # fmt: skip
        elif key == "source_files":
            diffs.append("source files (changed since: sizes or modification times differ)")
        elif key == "tokenizer_sha256":
            diffs.append("tokenizer file content (sha256 differs)")
        else:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    return diffs


def _discard(out: Path) -> None:
    """Delete what `prepare` writes into `out` (manifest first, so no half-deleted dataset looks complete)."""
    if not out.is_dir():
        return
    for name in ("manifest.json", VERIFIED_FILE, ".tokenizer.json.tmp", "tokenizer.json"):
        (out / name).unlink(missing_ok=True)
    for path in out.iterdir():
        if _SHARD_FILE.fullmatch(path.name):
            path.unlink()
    shutil.rmtree(out / "work", ignore_errors=True)


def _reuse(out: Path, settings: dict, progress: bool) -> dict:
    """The complete dataset in `out` if it was prepared with `settings` and is intact, else UserError."""
    manifest = load_manifest(out)
    shutil.rmtree(out / "work", ignore_errors=True)  # left by a preparation killed after its manifest
    if manifest["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{str(out)!r} holds a dataset of format version {manifest['format_version']}, whose document order this "
            f"version (format {FORMAT_VERSION}) does not reproduce; pass --force to rebuild it, or choose another --out"
        )
    if "settings" not in manifest:
        raise UserError(
            f"{str(out)!r} holds a dataset from an older smallscale that did not record its settings; "
            "pass --force to rebuild it, or choose another --out"
        )
    diffs = setting_differences(manifest["settings"], settings)
    if diffs:
        raise UserError(
            f"{str(out)!r} already holds a dataset prepared with other settings ({'; '.join(diffs)}); "
            "pass --force to rebuild it, or choose another --out"
        )
    problems = _tokenizer_problems(out, manifest) + _size_problems(out, manifest, _all_shards(manifest))
    if problems:
        file, what = problems[0]
        raise UserError(f"{str(out)!r} holds this dataset but {file} {what}; pass --force to rebuild it")
    _say(f"{out} already holds this dataset (same settings); reusing it (--force rebuilds it)", progress)
    return manifest


def _say(message: str, progress: bool) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(message, highlight=False, markup=False)


def _given_tokenizer(cfg: PrepareConfig) -> bytes | None:
    """The bytes of `cfg.tokenizer` when it names a file (validated); read now, since it may lie in `out`."""
    if cfg.tokenizer in ("bpe", "unigram"):
        return None
    load_tokenizer(cfg.tokenizer)
    return Path(cfg.tokenizer).read_bytes()


# ----------------------------------------------------------------------------- entry point
class Steps(Protocol):
    """Where the steps run: here and in a process pool (`_LocalSteps`), or as SLURM jobs (cluster.py)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def map(self, fn: Callable[[_EncodeJob], _EncodeResult], jobs: Sequence[_EncodeJob]) -> list[_EncodeResult]: ...


class _LocalSteps:
    def __init__(self, workers: int, progress: bool):
        self.workers, self.progress = workers, progress

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def map(self, fn: Callable[[_EncodeJob], _EncodeResult], jobs: Sequence[_EncodeJob]) -> list[_EncodeResult]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        results: list[_EncodeResult] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not self.progress, transient=False) as bar:
            task = bar.add_task(f"encoding {len(jobs)} part(s)", total=len(jobs))
            if self.workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(max_workers=min(self.workers, len(jobs))) as pool:
                    for res in pool.map(fn, jobs):
                        results.append(res)
                        bar.advance(task)
            else:
                for job in jobs:
                    results.append(fn(job))
                    bar.advance(task)
        return results


def prepare(
    cfg: PrepareConfig,
    progress: bool = True,
    force: bool = False,
    executor: str = "local",
    cluster_parameters: dict[str, Any] | None = None,
) -> dict:
    """Run the whole preparation; returns the manifest (also written to `OUT/manifest.json`).

    A complete dataset already in `OUT` is returned as it is if it was prepared with the same
    settings, and refused otherwise; `force` deletes it (or an unfinished attempt) first. Unfinished
    work from an earlier attempt with the same settings is resumed, with other settings discarded.
    Holds OUT's lock throughout (smallscale/lock.py): FolderBusy, before anything in OUT is read or
    written, while another process prepares it.

    `executor`: 'local' (this process and `workers` processes), or 'slurm' / 'submitit-local'
    (smallscale/data/cluster.py: tokenizer, encoding and merge as jobs, with submitit
    `cluster_parameters` such as {"slurm_partition": "cpu", "timeout_min": 240}). The dataset is the same.
    """
    if executor not in EXECUTORS:
        raise UserError(f"executor {executor!r} is unknown; choose one of {', '.join(EXECUTORS)}")
    with hold(Path(cfg.out), "data prepare"):
        return _prepare_owned(cfg, progress, force, executor, cluster_parameters or {})


def _steps(executor: str, cfg: PrepareConfig, work: Path, parameters: dict[str, Any], progress: bool) -> Steps:
    if executor == "local":
        return _LocalSteps(cfg.workers, progress)
    try:
        from smallscale.data.cluster import ArraySteps
    except ImportError:
        raise UserError(f"--executor {executor} needs submitit; install it: pip install 'smallscale[study]'") from None
    return ArraySteps(work / "slurm", parameters, "local" if executor == "submitit-local" else None, cfg.workers, progress)


def _prepare_owned(cfg: PrepareConfig, progress: bool, force: bool, executor: str, parameters: dict[str, Any]) -> dict:
    out = Path(cfg.out)
    parts = sources.resolve_parts(cfg.source, cfg.source_options())
    val_parts = sources.resolve_parts(cfg.val_source, cfg.source_options()) if cfg.val_source else []
    given_tokenizer = _given_tokenizer(cfg)
    settings = _settings(cfg, parts, hashlib.sha256(given_tokenizer).hexdigest() if given_tokenizer is not None else None)
    if force:
        _discard(out)
    elif (out / "manifest.json").exists():
        return _reuse(out, settings, progress)
    work = out / "work"
    fp_path = work / "fingerprint.json"
    tok_path = out / "tokenizer.json"
    work_settings = {**settings, "part_bytes": cfg.part_bytes}
    if not _resumable(fp_path, work_settings, tok_path):
        if out.is_dir() and (fp_path.exists() or tok_path.exists()):
            _say(f"discarding an unfinished earlier preparation in {out}: it does not match these settings", progress)
        _discard(out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    steps = _steps(executor, cfg, work, parameters, progress)

    if given_tokenizer is not None:
        if not tok_path.exists():
            atomic_write_bytes(tok_path, given_tokenizer)
    elif not tok_path.exists():
        steps.call(_train_tokenizer_file, cfg, parts, progress and executor == "local")
    dtype = token_dtype(load_tokenizer(tok_path).get_vocab_size())
    # Written after the tokenizer: a fingerprint names the tokenizer its finished parts were encoded with.
    atomic_write_json(fp_path, {"settings": work_settings, "tokenizer_sha256": sha256_file(tok_path)})

    # A val source's documents all go to val (fraction 1), SOURCE's then all to train (fraction 0).
    fractions = [0.0 if cfg.val_source else cfg.val_fraction] * len(parts) + [1.0] * len(val_parts)
    jobs = [
        _EncodeJob(i, p, str(work), str(tok_path), cfg.nfc, cfg.seed, fraction, dtype.str)
        for i, (p, fraction) in enumerate(zip([*parts, *val_parts], fractions, strict=True))
    ]
    steps.map(_encode_part, jobs)
    manifest = steps.call(_merge, cfg, settings, jobs)
    shutil.rmtree(work)
    return manifest


def _tokenizer_kind(cfg: PrepareConfig) -> str:
    return cfg.tokenizer if cfg.tokenizer in ("bpe", "unigram") else "file"


def _resumable(fp_path: Path, work_settings: dict, tok_path: Path) -> bool:
    """Whether `work/` and `tokenizer.json` are an unfinished attempt with exactly these settings."""
    if not (fp_path.is_file() and tok_path.is_file()):
        return False
    try:
        recorded = json.loads(fp_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return recorded == {"settings": work_settings, "tokenizer_sha256": sha256_file(tok_path)}


# ----------------------------------------------------------------------------- reading and verification
VERIFIED_FILE = "verified.json"  # shards whose content was checked, keyed by size and times
_SCAN_CHUNK_BYTES = 16 * 2**20  # bounded memory for any shard size; a multiple of every token itemsize
_REBUILD = "re-run `smallscale data prepare` for this dataset with --force (its options are under config in manifest.json)"


def load_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(
            f"{str(dataset_dir)!r} is not a prepared dataset (no manifest.json); run `smallscale data prepare` first"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"manifest.json of {str(dataset_dir)!r} is not valid JSON ({exc}); {_REBUILD}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise UserError(f"manifest.json of {str(dataset_dir)!r} {problem}; {_REBUILD}")
    return manifest


def _manifest_problem(manifest: object) -> str | None:
    """Why `manifest` cannot describe a dataset this version reads, or None."""
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        return f"is not a dataset manifest of format version {' or '.join(map(str, READABLE_FORMAT_VERSIONS))}"
    try:
        if manifest["dtype"] not in ("uint16", "uint32"):
            return f"has token dtype {manifest['dtype']!r}, not uint16 or uint32"
        if not isinstance(manifest["vocab_size"], int):
            return f"has vocab_size {manifest['vocab_size']!r}, not an integer"
        for name, split in manifest["splits"].items():
            counted = sum(int(s["tokens"]) for s in split["shards"])
            if counted != split["tokens"]:
                return f"counts {split['tokens']!r} {name} tokens but lists shards of {counted:,}"
            for file in [s["file"] for s in split["shards"]] + [manifest["tokenizer"]["path"]]:
                if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                    return f"names the file {file!r}, which is not a plain file name in the dataset folder"
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"is incomplete or malformed ({type(exc).__name__}: {exc})"
    return None


def read_split(dataset_dir: str | Path, split: str) -> list[np.memmap]:
    """The token shards of `split` as read-only memmaps, in stream order, after checking them.

    Every call checks that each shard exists with the size the manifest gives. Its content (sha256
    as in the manifest, every token id < vocab_size) is checked once, and remembered in
    `verified.json` until the file's size or times change. A failure is one UserError line.
    """
    manifest = load_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise UserError(f"split {split!r} not in {str(dataset_dir)!r}; it has {sorted(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    problems = _size_problems(dataset_dir, manifest, shards) or _content_problems(dataset_dir, manifest, shards)
    if problems:
        file, what = problems[0]
        raise UserError(f"shard {file} of {str(dataset_dir)!r} {what}; {_REBUILD}")
    dtype = np.dtype(manifest["dtype"])
    return [np.memmap(Path(dataset_dir) / s["file"], dtype=dtype, mode="r") for s in shards if s["tokens"] > 0]


def verify_dataset(dataset_dir: str | Path) -> list[tuple[str, str]]:
    """Check everything, ignoring `verified.json`: (file, what is wrong) per problem; empty if intact."""
    manifest = load_manifest(dataset_dir)
    shards = _all_shards(manifest)
    sized = _size_problems(dataset_dir, manifest, shards)
    bad_size = {file for file, _ in sized}
    intact_size = [s for s in shards if s["file"] not in bad_size]
    content = _content_problems(dataset_dir, manifest, intact_size, use_cache=False)
    return _tokenizer_problems(dataset_dir, manifest) + sized + content


def _all_shards(manifest: dict) -> list[dict]:
    return [shard for split in manifest["splits"].values() for shard in split["shards"]]


def _tokenizer_problems(dataset_dir: str | Path, manifest: dict) -> list[tuple[str, str]]:
    file = manifest["tokenizer"]["path"]
    path = Path(dataset_dir) / file
    if not path.is_file():
        return [(file, "is missing")]
    if sha256_file(path) != manifest["tokenizer"]["sha256"]:
        return [(file, "differs from the tokenizer the manifest records (sha256 mismatch)")]
    return []


def _size_problems(dataset_dir: str | Path, manifest: dict, shards: list[dict]) -> list[tuple[str, str]]:
    """Cheap checks: each shard exists and holds exactly the manifest's token count."""
    dtype = np.dtype(manifest["dtype"])
    problems = []
    for shard in shards:
        path = Path(dataset_dir) / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            problems.append((shard["file"], "is missing"))
        elif size % dtype.itemsize:
            problems.append((shard["file"], f"has {size:,} bytes, not a whole number of {dtype.itemsize}-byte "
                                            f"{dtype.name} tokens (the manifest expects {expected:,} bytes)"))  # fmt: skip
        elif size != expected:
            problems.append((shard["file"], f"holds {size // dtype.itemsize:,} tokens but the manifest says "
                                            f"{shard['tokens']:,} (the file was truncated or overwritten)"))  # fmt: skip
    return problems


def _content_problems(
    dataset_dir: str | Path, manifest: dict, shards: list[dict], use_cache: bool = True
) -> list[tuple[str, str]]:
    """Full checks (sha256, max token id) of the shards not already verified; remembers the good ones."""
    folder = Path(dataset_dir)
    dtype = np.dtype(manifest["dtype"])
    vocab_size = manifest["vocab_size"]
    verified = _read_verified(folder)
    problems = []
    changed = False
    for shard in shards:
        file = shard["file"]
        key = _file_key(folder / file)
        if use_cache and _still_verified(verified.get(file), key, shard["sha256"], vocab_size):
            continue
        sha256, max_id = _scan_shard(folder / file, dtype)
        what = []
        if sha256 != shard["sha256"]:
            what.append(f"has sha256 {sha256[:12]}..., not the manifest's {shard['sha256'][:12]}... (its content changed)")
        if max_id >= vocab_size:
            what.append(f"holds token id {max_id:,}, outside the vocabulary of {vocab_size:,} ids")
        if what:
            problems.append((file, " and ".join(what)))
            changed |= verified.pop(file, None) is not None
        else:
            verified[file] = {**key, "sha256": sha256, "max_id": max_id}
            changed = True
    if changed:
        _write_verified(folder, verified)
    return problems


def _still_verified(known: dict | None, key: dict, sha256: str, vocab_size: int) -> bool:
    """Whether a remembered check covers the file as it is now, with the manifest as it is now."""
    if known is None or any(known.get(k) != v for k, v in key.items()) or known.get("sha256") != sha256:
        return False
    return isinstance(known.get("max_id"), int) and known["max_id"] < vocab_size


def _file_key(path: Path) -> dict:
    """What must be unchanged for an earlier verification to still hold (a copy or edit changes it)."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _scan_shard(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """(sha256 hex digest, largest token id; -1 if empty) in one chunked pass over the file."""
    digest = hashlib.sha256()
    max_id = -1
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK_BYTES):
            digest.update(chunk)
            ids = np.frombuffer(chunk, dtype=dtype, count=len(chunk) // dtype.itemsize)
            if len(ids):
                max_id = max(max_id, int(ids.max()))
    return digest.hexdigest(), max_id


def _read_verified(folder: Path) -> dict[str, dict]:
    try:
        cache = json.loads((folder / VERIFIED_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # none yet, or unreadable: everything is simply verified again
    files = cache.get("files") if isinstance(cache, dict) else None
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _write_verified(folder: Path, verified: dict[str, dict]) -> None:
    try:
        atomic_write_json(folder / VERIFIED_FILE, {"files": verified})
    except OSError:
        pass  # a read-only dataset folder: verify again next time rather than fail
