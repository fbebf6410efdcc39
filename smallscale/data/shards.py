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

Re-running into the same folder never mixes settings: the manifest (and `work/fingerprint.json` for
an unfinished attempt) records everything that determines the output (`_settings`); a complete
dataset is reused only if that matches, unfinished work only resumed if it matches, and `force`
starts from scratch. Readers check every shard against the manifest (`read_split`): sizes on each
open, sha256 and token ids once, remembered in `verified.json`; `verify_dataset` checks everything.

Only the per-document index (a few dozen bytes per document) is held in memory, never the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from smallscale.io import atomic_write_bytes, atomic_write_json, sha256_file
from smallscale.lock import hold

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
    val_source: str | None = Field(
        None, description="a source whose documents are the val split (all of them); SOURCE is then all train, "
        "val_fraction unused, and duplicates are removed within each split",
    )
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
    settings["source"] = _source_identity(cfg.source)
    settings["source_files"] = _source_files(cfg.source, parts)
    if cfg.val_source is not None:
        settings["val_source"] = _source_identity(cfg.val_source)
        settings["val_source_files"] = _source_files(cfg.val_source, sources.resolve_parts(cfg.val_source, cfg.source_options()))
    return settings


def _source_identity(source: str) -> str:
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


def _differences(recorded: dict, wanted: dict) -> list[str]:
    """'name: old -> new' for each setting that differs (source files summarised, not listed)."""
    diffs = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if old == new:
            continue
        if key == "source_files":
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
    if "settings" not in manifest:
        raise UserError(
            f"{str(out)!r} holds a dataset from an older smallscale that did not record its settings; "
            "pass --force to rebuild it, or choose another --out"
        )
    diffs = _differences(manifest["settings"], settings)
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
def prepare(cfg: PrepareConfig, progress: bool = True, force: bool = False) -> dict:
    """Run the whole preparation; returns the manifest (also written to `OUT/manifest.json`).

    A complete dataset already in `OUT` is returned as it is if it was prepared with the same
    settings, and refused otherwise; `force` deletes it (or an unfinished attempt) first. Unfinished
    work from an earlier attempt with the same settings is resumed, with other settings discarded.
    Holds OUT's lock throughout (smallscale/lock.py): FolderBusy, before anything in OUT is read or
    written, while another process prepares it.
    """
    with hold(Path(cfg.out), "data prepare"):
        return _prepare_owned(cfg, progress, force)


def _prepare_owned(cfg: PrepareConfig, progress: bool, force: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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

    if given_tokenizer is not None:
        if not tok_path.exists():
            atomic_write_bytes(tok_path, given_tokenizer)
    elif not tok_path.exists():
        tok = train_tokenizer(train_documents(cfg, parts), cfg.tokenizer, cfg.vocab_size, show_progress=progress)
        if tok.get_vocab_size() <= 3:
            raise UserError(f"source {cfg.source!r} has no training documents; the corpus is empty")
        tmp = tok_path.with_name(".tokenizer.json.tmp")
        tok.save(str(tmp))
        os.replace(tmp, tok_path)
    tok = load_tokenizer(tok_path)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    eos = eos_id(tok)
    tokenizer_sha256 = sha256_file(tok_path)
    # Written after the tokenizer: a fingerprint names the tokenizer its finished parts were encoded with.
    atomic_write_json(fp_path, {"settings": work_settings, "tokenizer_sha256": tokenizer_sha256})

    # A val source's documents all go to val (fraction 1), SOURCE's then all to train (fraction 0).
    fractions = [0.0 if cfg.val_source else cfg.val_fraction] * len(parts) + [1.0] * len(val_parts)
    jobs = [
        _EncodeJob(i, p, str(work), str(tok_path), cfg.nfc, cfg.seed, fraction, dtype.str)
        for i, (p, fraction) in enumerate(zip([*parts, *val_parts], fractions, strict=True))
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
    if cfg.dedup:  # first occurrence wins; with a val source, within each split (a hash split keeps copies together)
        keep[:] = False
        groups = [np.flatnonzero(index["val"] == v) for v in (0, 1)] if cfg.val_source else [np.arange(n_read)]
        for rows in groups:
            _, first = np.unique(index["hash"][rows], return_index=True)
            keep[rows[first]] = True
    # Fixed-seed document shuffle: this permutation IS the data order every budget is a prefix of.
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n_read)
    order = order[keep[order]]
    is_val_doc = index["val"][order].astype(bool)
    split_rows = {"train": order[~is_val_doc], "val": order[is_val_doc]}
    if len(split_rows["train"]) == 0:
        raise UserError("every document went to the val split; lower val_fraction or add documents")
    if cfg.val_source and len(split_rows["val"]) == 0:
        raise UserError(f"val source {cfg.val_source!r} yielded no documents")

    splits = {}
    for name, rows in split_rows.items():
        shards = _write_split(name, rows, index, part_of, token_parts, out, eos, dtype, cfg.shard_tokens)
        splits[name] = _split_stats(rows, index, shards)

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "tokenizer": {"path": "tokenizer.json", "sha256": tokenizer_sha256, "kind": _tokenizer_kind(cfg)},
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": eos,
        "documents_read": int(n_read),
        "duplicates_removed": int(n_read - keep.sum()),
        "replaced_invalid_utf8": int(sum(r.replaced_chars for r in results)),
        "splits": splits,
        "config": cfg.model_dump(mode="json"),
        "settings": settings,
    }
    atomic_write_json(out / "manifest.json", manifest)
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
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return f"is not a format-version-{FORMAT_VERSION} dataset manifest"
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
