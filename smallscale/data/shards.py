"""Documents -> token shards + manifest: `smallscale data prepare`.

Pipeline (each step leaves files, so a crash never redoes finished work):

1. tokenizer: train on the train-split documents (first `tokenizer_train_bytes` of them) or load one;
2. encode (parallel over source parts): every document is normalised, hashed, assigned to train or
   val *by its hash* (so the split is independent of order and duplicates land together), encoded,
   and written to `work/part-NNNNNN.{tokens,index}.npy`; a finished part is never redone;
3. assemble: drop exact duplicates (first occurrence wins), shuffle documents with a fixed seed, and
   copy their tokens (EOS after each document) into bounded shards `train-NNNNN.bin`, written to a
   temp file and renamed. Token budgets are prefixes of this one fixed order, so budgets nest;
4. `manifest.json` last (atomically): its presence means the dataset is complete.

Only the per-document index (a few dozen bytes per document) is held in memory, never the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from smallscale.config import Strict
from smallscale.data import sources
from smallscale.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from smallscale.errors import UserError
from smallscale.io import atomic_write_json, sha256_file

FORMAT_VERSION = 1
# Per-document index record written by the encode step.
INDEX_DTYPE = np.dtype(
    [("hash", "<u8"), ("offset", "<i8"), ("tokens", "<i8"), ("bytes", "<i8"), ("words", "<i8"), ("val", "u1")]
)


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
    seed: int = 1234
    shard_tokens: int = Field(100_000_000, gt=0, description="max tokens per shard file")
    workers: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 1)), ge=1)
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
    """64-bit content hash: dedup key and (with the seed) the split assignment."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_val(h: int, seed: int, val_fraction: float) -> bool:
    mixed = hashlib.blake2b(h.to_bytes(8, "little"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(mixed.digest(), "little") / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def train_documents(cfg: PrepareConfig, parts: list[sources.Part]) -> Iterator[str]:
    """Train-split documents in source order, up to `tokenizer_train_bytes` (for tokenizer training)."""
    budget = cfg.tokenizer_train_bytes
    for part in parts:
        for raw in sources.read_part(part):
            text = normalize(raw, cfg.nfc)
            if is_val(doc_hash(text), cfg.seed, cfg.val_fraction):
                continue
            yield text
            budget -= len(text.encode("utf-8"))
            if budget <= 0:
                return


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
    tokens_path, index_path, done_path = _part_paths(job.work_dir, job.index)
    if done_path.exists():
        done = json.loads(done_path.read_text())
        return _EncodeResult(job.index, done["documents"], done["text_bytes"], done["replaced_chars"], True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = load_tokenizer(job.tokenizer_path)
    stats = sources.ReadStats()
    records: list[tuple[int, int, int, int, int, int]] = []
    token_chunks: list[np.ndarray] = []
    offset = 0
    text_bytes = 0

    def flush(batch: list[str]) -> None:
        nonlocal offset, text_bytes
        for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False), strict=True):
            ids = np.asarray(enc.ids, dtype=job.dtype)
            h = doc_hash(text)
            n_bytes = len(text.encode("utf-8"))
            records.append((h, offset, len(ids), n_bytes, len(text.split()), is_val(h, job.seed, job.val_fraction)))
            token_chunks.append(ids)
            offset += len(ids)
            text_bytes += n_bytes

    batch: list[str] = []
    for raw in sources.read_part(job.part, stats):
        batch.append(normalize(raw, job.nfc))
        if len(batch) >= batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    tokens = np.concatenate(token_chunks) if token_chunks else np.zeros(0, dtype=job.dtype)
    index = np.array(records, dtype=INDEX_DTYPE)
    _save_npy_atomic(tokens_path, tokens)
    _save_npy_atomic(index_path, index)
    summary = {"documents": len(records), "text_bytes": text_bytes, "replaced_chars": stats.replaced_chars}
    atomic_write_json(done_path, summary)  # last: marks the part finished
    return _EncodeResult(job.index, len(records), text_bytes, stats.replaced_chars, False)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- assemble step
def _write_split(
    name: str,
    order: np.ndarray,
    index: np.ndarray,
    part_of: np.ndarray,
    part_tokens: list[np.ndarray],
    out_dir: Path,
    eos: int,
    dtype: np.dtype,
    shard_tokens: int,
) -> list[dict]:
    """Write the documents `order` (rows of `index`) as shards of at most `shard_tokens` tokens."""
    shards: list[dict] = []
    buf = np.empty(shard_tokens, dtype=dtype)
    fill = 0
    shard_docs = 0

    def emit() -> None:
        nonlocal fill, shard_docs
        path = out_dir / f"{name}-{len(shards):05d}.bin"
        shards.append(_write_shard(path, buf[:fill], shard_docs))
        fill = 0
        shard_docs = 0

    for row in order:
        rec = index[row]
        doc = part_tokens[part_of[row]][rec["offset"] : rec["offset"] + rec["tokens"]]
        pieces = (doc, np.array([eos], dtype=dtype))
        shard_docs += 1
        for piece in pieces:  # a document may straddle two shards; the stream is what matters
            start = 0
            while start < len(piece):
                take = min(len(piece) - start, shard_tokens - fill)
                buf[fill : fill + take] = piece[start : start + take]
                fill += take
                start += take
                if fill == shard_tokens:
                    emit()
    if fill:
        emit()
    return shards


def _write_shard(path: Path, tokens: np.ndarray, documents: int) -> dict:
    """Write one shard (tmp + rename); an existing complete shard with the same content is kept."""
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()
    if not (path.exists() and path.stat().st_size == tokens.nbytes and sha256_file(path) == digest):
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            tokens.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return {"file": path.name, "tokens": int(len(tokens)), "documents_started": documents, "sha256": digest}


def _split_stats(rows: np.ndarray, index: np.ndarray, shards: list[dict]) -> dict:
    recs = index[rows]
    n_tokens = int(recs["tokens"].sum())  # document tokens, without the EOS separators
    n_bytes = int(recs["bytes"].sum())
    n_words = int(recs["words"].sum())
    return {
        "tokens": n_tokens + len(rows),  # as stored: one EOS after each document
        "document_tokens": n_tokens,
        "documents": int(len(rows)),
        "bytes": n_bytes,
        "words": n_words,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else None,
        "fertility": n_tokens / n_words if n_words else None,  # tokens per whitespace word
        "shards": shards,
    }


# ----------------------------------------------------------------------------- entry point
def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Run the whole preparation; returns the manifest (also written to `OUT/manifest.json`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    parts = sources.resolve_parts(cfg.source, cfg.source_options())

    tok_path = out / "tokenizer.json"
    if cfg.tokenizer in ("bpe", "unigram"):
        if not tok_path.exists():
            tok = train_tokenizer(train_documents(cfg, parts), cfg.tokenizer, cfg.vocab_size, show_progress=progress)
            if tok.get_vocab_size() <= 3:
                raise UserError(f"source {cfg.source!r} has no training documents; the corpus is empty")
            tmp = tok_path.with_name(".tokenizer.json.tmp")
            tok.save(str(tmp))
            os.replace(tmp, tok_path)
        tok = load_tokenizer(tok_path)
    else:
        tok = load_tokenizer(cfg.tokenizer)
        if Path(cfg.tokenizer).resolve() != tok_path.resolve():
            shutil.copyfile(cfg.tokenizer, tok_path)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    eos = eos_id(tok)

    fingerprint = {k: v for k, v in cfg.model_dump().items() if k not in ("workers", "out", "shard_tokens", "data_root")}
    fingerprint["tokenizer_sha256"] = sha256_file(tok_path)
    fp_path = work / "fingerprint.json"
    if fp_path.exists() and json.loads(fp_path.read_text()) != fingerprint:
        shutil.rmtree(work)  # settings changed: earlier partial work is not reusable
        work.mkdir()
    atomic_write_json(fp_path, fingerprint)

    jobs = [
        _EncodeJob(i, p, str(work), str(tok_path), cfg.nfc, cfg.seed, cfg.val_fraction, dtype.str)
        for i, p in enumerate(parts)
    ]
    results: list[_EncodeResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"encoding {len(jobs)} part(s)", total=len(jobs))
        if cfg.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs))) as pool:
                for res in pool.map(_encode_part, jobs):
                    results.append(res)
                    bar.advance(task)
        else:
            for job in jobs:
                results.append(_encode_part(job))
                bar.advance(task)

    index_parts = [np.load(_part_paths(work, j.index)[1]) for j in jobs]
    token_parts = [np.load(_part_paths(work, j.index)[0], mmap_mode="r") for j in jobs]
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=INDEX_DTYPE)
    part_of = np.concatenate([np.full(len(ix), k, dtype=np.int32) for k, ix in enumerate(index_parts)] or [np.zeros(0, np.int32)])
    n_read = len(index)
    if n_read == 0:
        raise UserError(f"source {cfg.source!r} yielded no documents; the corpus is empty")

    keep = np.ones(n_read, dtype=bool)
    if cfg.dedup:
        _, first = np.unique(index["hash"], return_index=True)
        keep[:] = False
        keep[first] = True
    # Fixed-seed document shuffle: this permutation IS the data order every budget is a prefix of.
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n_read)
    order = order[keep[order]]
    is_val_doc = index["val"][order].astype(bool)
    split_rows = {"train": order[~is_val_doc], "val": order[is_val_doc]}
    if len(split_rows["train"]) == 0:
        raise UserError("every document went to the val split; lower val_fraction or add documents")

    splits = {}
    for name, rows in split_rows.items():
        shards = _write_split(name, rows, index, part_of, token_parts, out, eos, dtype, cfg.shard_tokens)
        splits[name] = _split_stats(rows, index, shards)

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "tokenizer": {"path": "tokenizer.json", "sha256": sha256_file(tok_path), "kind": _tokenizer_kind(cfg)},
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": eos,
        "documents_read": int(n_read),
        "duplicates_removed": int(n_read - keep.sum()),
        "replaced_invalid_utf8": int(sum(r.replaced_chars for r in results)),
        "splits": splits,
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(out / "manifest.json", manifest)
    shutil.rmtree(work)
    return manifest


def _tokenizer_kind(cfg: PrepareConfig) -> str:
    return cfg.tokenizer if cfg.tokenizer in ("bpe", "unigram") else "file"


def load_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(
            f"{str(dataset_dir)!r} is not a prepared dataset (no manifest.json); run `smallscale data prepare` first"
        )
    return json.loads(path.read_text())


def read_split(dataset_dir: str | Path, split: str) -> list[np.memmap]:
    """The token shards of `split` as read-only memmaps, in stream order."""
    manifest = load_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise UserError(f"split {split!r} not in {str(dataset_dir)!r}; it has {sorted(manifest['splits'])}")
    dtype = np.dtype(manifest["dtype"])
    return [
        np.memmap(Path(dataset_dir) / s["file"], dtype=dtype, mode="r")
        for s in manifest["splits"][split]["shards"]
        if s["tokens"] > 0
    ]
