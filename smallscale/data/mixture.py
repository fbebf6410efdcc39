"""Weighted mixtures of sources with one shared tokenizer: `smallscale data mix SPEC.yaml -o OUT`.

A mixture is a prepared dataset (same shards, manifest and verification as `data prepare`), made
from several sources in fixed proportions by tokens:

1. tokenizer: trained on a sample of the mixture in its proportions (each source's train-split
   documents, in source order, up to weight x `tokenizer_train_bytes` bytes), or a given file;
2. sources: each is prepared with that tokenizer by `shards.prepare` into `OUT/sources/<name>`, a
   complete dataset with its own train/val split (hash split, dedup and shuffle as `data prepare`);
   its val split is the source's in-domain held-out text (eval task `heldout_sources`);
3. interleave: the train stream takes whole documents, each from the source whose token count is
   furthest below its share of the stream so far (`interleave`), each source's documents in its own
   prepared order. So every prefix of the stream, hence every token budget, keeps the proportions:
   source s holds w_s x T tokens of a T-token prefix, give or take (k-1) x the longest document
   (k sources; tokens as stored, each document with its EOS). The val split is interleaved the same
   way from the sources' val splits;
4. `manifest.json` last: per-source tokens, documents and bytes of each split, the weights, each
   source's settings, and `mixture.prefix_tolerance`: the stream position from which every longer
   prefix holds each source's share within 1 percentage point (`TOLERANCE`).

End of the stream: the interleave stops when the source it needs next has no documents left (the
first exhausted source; the others keep their unused documents), or with `train_tokens` at the
first document boundary at or past that many tokens (refused if a source runs out before). Nothing
is repeated. The val split stops at its first exhausted source likewise: its proportions match the
train stream's, while each source's whole val split stays in `OUT/sources/<name>`.

Same spec -> byte-identical output (no randomness beyond each source's seeded order). Re-running
into the same folder follows `data prepare`: the same settings reuse the mixture (each source is
re-checked by `prepare`, so an edited local corpus is refused), other settings are refused naming
each difference, and `force` rebuilds; OUT's lock is held throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field, field_validator, model_validator

from smallscale.config import Strict, read_yaml, validate
from smallscale.data import sources as sources_mod
from smallscale.data.loader import TokenArray
from smallscale.data.shards import (
    FORMAT_VERSION,
    PrepareConfig,
    load_manifest,
    prepare,
    read_split,
    setting_differences,
    source_identity,
    train_documents,
)
from smallscale.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from smallscale.errors import UserError
from smallscale.io import atomic_write_bytes, atomic_write_json, sha256_file, writing
from smallscale.lock import hold
from smallscale.paths import NAME_RULE, is_plain_name

MIXTURE_FORMAT = 1  # `mixture.format` in the manifest: the layout and stop rule described above
TOLERANCE = 0.01  # a source's share of a prefix may differ from its weight by this much (absolute)
MAX_SOURCES = 64
SOURCES_DIR = "sources"
FINGERPRINT = "mixture-fingerprint.json"  # the settings of an unfinished attempt
# Options that belong to the whole mixture, not to one source.
MIXTURE_LEVEL = ("out", "tokenizer", "vocab_size", "tokenizer_train_bytes", "shard_tokens", "workers", "data_root")
SOURCE_OPTIONS = tuple(k for k in PrepareConfig.model_fields if k not in MIXTURE_LEVEL and k != "source")
_NOT_SETTINGS = ("out", "workers", "data_root")  # where it goes and how fast: the output is the same
_DECODE_BATCH = 1024  # documents per decode when counting bytes


class MixSource(Strict):
    """One source: its weight, and its `data prepare` options (`source`, `split_by`, `seed`, ...)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())
    weight: float = Field(gt=0, allow_inf_nan=False, description="relative share of tokens; weights are normalised")
    source: str

    @model_validator(mode="after")
    def _known_options(self) -> MixSource:
        for key in self.model_extra or {}:
            if key in MIXTURE_LEVEL:
                raise ValueError(f"{key!r} is set for the whole mixture, not per source")
            if key not in SOURCE_OPTIONS:
                raise ValueError(f"unknown source option {key!r}; choose from weight, source, {', '.join(SOURCE_OPTIONS)}")
        return self

    def options(self) -> dict[str, Any]:
        """The `data prepare` options of this source (without weight)."""
        return {"source": self.source, **(self.model_extra or {})}


class MixtureConfig(Strict):
    """Everything `data mix` needs; recorded in the manifest."""

    sources: dict[str, MixSource] = Field(min_length=1, max_length=MAX_SOURCES)
    out: str
    tokenizer: str = Field("bpe", description="'bpe', 'unigram', or a path to an existing tokenizer.json")
    vocab_size: int = Field(8192, ge=300, le=2**31 - 1)
    tokenizer_train_bytes: int = Field(200_000_000, gt=0, description="mixture text used to train the tokenizer")
    train_tokens: int | None = Field(None, gt=0, description="stop the train stream here; default: at the first exhausted source")
    shard_tokens: int = Field(100_000_000, gt=0)
    workers: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 1)), ge=1)
    data_root: str | None = None

    @field_validator("sources")
    @classmethod
    def _plain_names(cls, sources: dict[str, MixSource]) -> dict[str, MixSource]:
        for name in sources:  # each becomes the folder OUT/sources/<name>
            if not is_plain_name(name):
                raise ValueError(f"source name {name!r} is not a plain name; {NAME_RULE}")
        return sources

    def weights(self) -> dict[str, float]:
        """Each source's share of tokens: its weight over the sum of weights."""
        total = sum(s.weight for s in self.sources.values())
        return {name: s.weight / total for name, s in self.sources.items()}

    def prepare_config(self, name: str, tokenizer_path: str | Path | None = None) -> PrepareConfig:
        """The `data prepare` config of source `name` (into OUT/sources/<name>, with the mixture's tokenizer)."""
        fields = {**self.sources[name].options(), "out": str(Path(self.out) / SOURCES_DIR / name),
                  "shard_tokens": self.shard_tokens, "workers": self.workers, "data_root": self.data_root}  # fmt: skip
        if tokenizer_path is not None:
            fields["tokenizer"] = str(tokenizer_path)
        return validate(PrepareConfig, fields, source=f"mixture source {name!r}")


def load_mixture_spec(path: str | Path, out: str | Path, **overrides: Any) -> MixtureConfig:
    """A mixture spec file (YAML: `sources: {NAME: {weight: W, source: S, ...}}` + mixture options)."""
    data = read_yaml(path)
    return validate(MixtureConfig, {**data, **{k: v for k, v in overrides.items() if v is not None}, "out": str(out)},
                    source=str(path))  # fmt: skip


def study_mixture(mix: dict[str, Any], datasets: dict[str, dict[str, Any]], out: str | Path, where: str) -> MixtureConfig:
    """The mixture of a study dataset `mix: {sources: {NAME: WEIGHT, ...}, vocab_size: ..., ...}`,
    whose source names are other datasets of the study (their `source:` and prepare options)."""
    if not isinstance(mix, dict) or not isinstance(mix.get("sources"), dict) or not mix["sources"]:
        raise UserError(f"{where}: `mix` needs `sources: {{NAME: WEIGHT, ...}}` naming other datasets of the study")
    resolved = {}
    for name, weight in mix["sources"].items():
        if name not in datasets:
            raise UserError(f"{where}: mixture source {name!r} is not a dataset of the study; define it under `datasets:` with a `source:`")
        options = {k: v for k, v in datasets[name].items() if v is not None}
        if "source" not in options or "path" in options or "mix" in options:
            raise UserError(f"{where}: mixture source {name!r} must be a dataset given by `source:` (and prepare options), "
                            "not by `path:` or `mix:`")  # fmt: skip
        stray = [k for k in options if k in MIXTURE_LEVEL]
        if stray:
            raise UserError(f"{where}: dataset {name!r} is a mixture source, so {stray[0]!r} belongs in the mixture's `mix:`")
        resolved[name] = {"weight": weight, **options}
    return validate(MixtureConfig, {**mix, "sources": resolved, "out": str(out)}, source=where)


# ----------------------------------------------------------------------------- the interleave
@dataclass
class Interleave:
    """The order of a mixed stream: which source each document comes from, and how well it keeps
    the proportions (tokens as stored, each document with its EOS)."""

    picks: np.ndarray  # (n_docs,) source index of each document, in stream order
    used: list[int]  # documents taken from each source (a prefix of its order)
    tokens: list[int]  # tokens taken from each source
    exhausted: int | None  # the source that ran out (None: stopped at max_tokens)
    max_deviation_tokens: float  # max over prefixes and sources of |tokens_s - w_s x T|
    within_from_tokens: int | None  # every prefix of at least this many tokens has each share within
    # TOLERANCE; None: not even the whole stream (its documents are too long for its length)
    bound_tokens: int  # (k-1) x the longest document taken: the guarantee on max_deviation_tokens

    @property
    def total(self) -> int:
        return sum(self.tokens)


def interleave(lengths: Sequence[Sequence[int]], weights: Sequence[float], max_tokens: int | None = None,
               tolerance: float = TOLERANCE) -> Interleave:  # fmt: skip
    """Deterministic weighted interleave of documents with token `lengths` per source.

    Next comes a document of the source with the largest deficit w_s x T - tokens_s (ties: the first
    source). The deficits sum to zero, and the chosen one is >= 0, so no deficit falls below -L (L the
    longest document) and none rises above (k-1) x L: every prefix holds w_s x T +- (k-1) x L tokens of
    source s. Within one document a source's share moves monotonically, so checking both ends of every
    document checks every token position (`within_from_tokens` is exact at document ends and
    conservative inside the one document where the share crosses the tolerance)."""
    k = len(weights)
    assert k == len(lengths) and k > 0 and abs(sum(weights) - 1.0) < 1e-9, (k, weights)
    picks: list[int] = []
    used, tokens = [0] * k, [0] * k
    total, longest, max_dev, within_from = 0, 0, 0.0, 0
    exhausted: int | None = None
    previous_bad = k > 1  # just after T = 0 the first document is the whole prefix
    while max_tokens is None or total < max_tokens:
        s = max(range(k), key=lambda j: weights[j] * total - tokens[j])
        if used[s] == len(lengths[s]):
            exhausted = s
            break
        length = int(lengths[s][used[s]])
        used[s] += 1
        tokens[s] += length
        total += length
        picks.append(s)
        longest = max(longest, length)
        deviation = max(abs(tokens[j] - weights[j] * total) for j in range(k))
        max_dev = max(max_dev, deviation)
        bad = deviation > tolerance * total
        if bad or previous_bad:
            within_from = total
        previous_bad = bad
    return Interleave(np.asarray(picks, dtype=np.uint8), used, tokens, exhausted, max_dev,
                      None if previous_bad else within_from, (k - 1) * longest)


# ----------------------------------------------------------------------------- writing
class _ShardWriter:
    """Documents (each with its EOS) -> `{split}-NNNNN.bin` shards of at most `shard_tokens`, written as
    `data prepare` writes them (temp file, fsync, rename) and listed as in its manifest."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.docs_started = 0
        self.shards: list[dict] = []

    def add(self, document: np.ndarray) -> None:
        self.docs_started += 1
        start = 0
        while start < len(document):  # a document may straddle two shards; the stream is what matters
            take = min(len(document) - start, self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + take] = document[start : start + take]
            self.fill += take
            start += take
            if self.fill == self.shard_tokens:
                self._emit()

    def close(self) -> list[dict]:
        if self.fill:
            self._emit()
        return self.shards

    def _emit(self) -> None:
        tokens = self.buf[: self.fill]
        path = self.out / f"{self.split}-{len(self.shards):05d}.bin"
        tmp = path.with_name(f".{path.name}.tmp")
        with writing(path), open(tmp, "wb") as f:
            f.write(memoryview(np.ascontiguousarray(tokens).view(np.uint8)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.shards.append({"file": path.name, "tokens": int(self.fill), "documents_started": self.docs_started,
                            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()})  # fmt: skip
        self.fill = 0
        self.docs_started = 0


@dataclass
class _SourceSplit:
    """One prepared split of a source: its token stream and where each document ends (after its EOS)."""

    stream: TokenArray
    ends: np.ndarray  # (n_docs,) exclusive end of each document, its EOS included
    info: dict  # the split's entry in the source's manifest

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ends, prepend=0)

    def document(self, i: int, with_eos: bool = True) -> np.ndarray:
        start = int(self.ends[i - 1]) if i else 0
        return self.stream.read(start, int(self.ends[i]) - start - (0 if with_eos else 1))


def _source_split(folder: Path, split: str, eos: int) -> _SourceSplit:
    manifest = load_manifest(folder)
    stream = TokenArray(read_split(folder, split))
    chunk = 1 << 22
    ends = [np.flatnonzero(stream.read(o, min(chunk, len(stream) - o)) == eos) + o + 1 for o in range(0, len(stream), chunk)]
    ends_all = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    info = manifest["splits"][split]
    assert len(ends_all) == info["documents"] and (not len(stream) or ends_all[-1] == len(stream)), (folder, split)
    return _SourceSplit(stream, ends_all, info)


def _size_of(tok, split: _SourceSplit, docs: range) -> tuple[int, int]:
    """(UTF-8 bytes, whitespace words) of documents `docs` of `split`, by decoding them (exact: the
    tokenizers round-trip)."""
    n_bytes = n_words = 0
    for first in range(docs.start, docs.stop, _DECODE_BATCH):
        batch = [split.document(i, with_eos=False).tolist() for i in range(first, min(first + _DECODE_BATCH, docs.stop))]
        for text in tok.decode_batch(batch, skip_special_tokens=False):
            n_bytes += len(text.encode("utf-8"))
            n_words += len(text.split())
    return n_bytes, n_words


def _used_size(tok, split: _SourceSplit, n_used: int) -> tuple[int, int]:
    """(bytes, words) of the first `n_used` documents: from the manifest when all are used, else by
    decoding the used or the unused documents, whichever are fewer."""
    n = len(split.ends)
    whole = int(split.info["bytes"]), int(split.info["words"])
    if n_used == n:
        return whole
    if n_used <= n - n_used:
        return _size_of(tok, split, range(n_used))
    rest = _size_of(tok, split, range(n_used, n))
    return whole[0] - rest[0], whole[1] - rest[1]


def _write_mixed_split(out: Path, split: str, names: list[str], parts: list[_SourceSplit], weights: list[float],
                       max_tokens: int | None, dtype: np.dtype, shard_tokens: int, tok) -> tuple[dict, Interleave]:  # fmt: skip
    order = interleave([p.lengths for p in parts], weights, max_tokens)
    writer = _ShardWriter(out, split, dtype, shard_tokens)
    cursor = [0] * len(parts)
    for s in order.picks.tolist():
        writer.add(parts[s].document(cursor[s]).astype(dtype, copy=False))
        cursor[s] += 1
    shards = writer.close()
    per_source = {}
    for name, part, n_used, n_tokens in zip(names, parts, order.used, order.tokens, strict=True):
        n_bytes, n_words = _used_size(tok, part, n_used)
        per_source[name] = {"tokens": n_tokens, "document_tokens": n_tokens - n_used, "documents": n_used, "bytes": n_bytes,
                            "words": n_words, "share": n_tokens / order.total if order.total else None,
                            "available_documents": len(part.ends)}  # fmt: skip
    totals = {key: sum(v[key] for v in per_source.values()) for key in ("tokens", "document_tokens", "documents", "bytes", "words")}
    stats = {
        **totals,  # tokens as stored: one EOS after each document
        "bytes_per_token": totals["bytes"] / totals["document_tokens"] if totals["document_tokens"] else None,
        "fertility": totals["document_tokens"] / totals["words"] if totals["words"] else None,
        "shards": shards,
        "sources": per_source,
    }
    assert stats["tokens"] == sum(s["tokens"] for s in shards)
    return stats, order


# ----------------------------------------------------------------------------- settings and re-runs
def _settings(cfg: MixtureConfig, tokenizer_sha256: str | None) -> dict:
    """Everything that determines the mixture (a local corpus's content is checked by each source's
    own `prepare`)."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_SETTINGS}
    settings["mixture_format"] = MIXTURE_FORMAT
    settings["weights"] = cfg.weights()
    for src in settings["sources"].values():
        src["source"] = source_identity(src["source"])
        if src.get("val_source"):
            src["val_source"] = source_identity(src["val_source"])
        src.pop("part_bytes", None)  # how a file is cut into work units, not what is read
    if cfg.tokenizer not in ("bpe", "unigram"):
        settings["tokenizer"] = "file"
        settings["tokenizer_sha256"] = tokenizer_sha256
        del settings["vocab_size"], settings["tokenizer_train_bytes"]
    return settings


def _discard(out: Path) -> None:
    """Delete what `prepare_mixture` writes into `out`, the manifest first."""
    from smallscale.data.shards import VERIFIED_FILE

    if not out.is_dir():
        return
    for name in ("manifest.json", VERIFIED_FILE, FINGERPRINT, "tokenizer.json", ".tokenizer.json.tmp"):
        (out / name).unlink(missing_ok=True)
    for path in out.iterdir():
        stem = path.name.lstrip(".").removesuffix(".tmp")
        if stem.endswith(".bin") and stem.split("-", 1)[0] in ("train", "val") and stem.split("-", 1)[-1][:-4].isdigit():
            path.unlink()
    shutil.rmtree(out / SOURCES_DIR, ignore_errors=True)


def _resumable(fingerprint: Path, settings: dict) -> bool:
    """Whether OUT holds an unfinished attempt with exactly these settings."""
    try:
        return json.loads(fingerprint.read_text(encoding="utf-8")) == settings
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def _say(message: str, progress: bool) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(message, highlight=False, markup=False)


def _reuse(cfg: MixtureConfig, settings: dict, progress: bool) -> dict | None:
    """The complete mixture in OUT if made with `settings` (its sources re-checked), else UserError;
    None if OUT holds no complete mixture."""
    out = Path(cfg.out)
    if not (out / "manifest.json").exists():
        return None
    manifest = load_manifest(out)
    if "mixture" not in manifest:
        raise UserError(f"{str(out)!r} already holds a dataset that is not a mixture; pass --force to replace it, or choose another --out")
    diffs = setting_differences(manifest.get("settings", {}), settings, per_entry={"sources": "source"})
    if diffs:
        raise UserError(f"{str(out)!r} already holds a mixture made with other settings ({'; '.join(diffs)}); "
                        "pass --force to rebuild it, or choose another --out")  # fmt: skip
    for name in cfg.sources:  # an edited local corpus, or a damaged source folder, is refused here
        prepare(cfg.prepare_config(name, out / "tokenizer.json"), progress=False)
    _say(f"{out} already holds this mixture (same settings); reusing it (--force rebuilds it)", progress)
    return manifest


def _given_tokenizer(cfg: MixtureConfig) -> bytes | None:
    if cfg.tokenizer in ("bpe", "unigram"):
        return None
    load_tokenizer(cfg.tokenizer)  # validates
    return Path(cfg.tokenizer).read_bytes()


def _tokenizer_sample(cfg: MixtureConfig) -> Iterator[str]:
    """Each source's train-split documents (source order) up to its share of `tokenizer_train_bytes`."""
    weights = cfg.weights()
    for name in cfg.sources:
        budget = max(1, round(weights[name] * cfg.tokenizer_train_bytes))
        source_cfg = cfg.prepare_config(name).model_copy(update={"tokenizer_train_bytes": budget})
        yield from train_documents(source_cfg, sources_mod.resolve_parts(source_cfg.source, source_cfg.source_options()))


# ----------------------------------------------------------------------------- entry point
def prepare_mixture(cfg: MixtureConfig, progress: bool = True, force: bool = False) -> dict:
    """Make the mixture in `cfg.out` (module docstring); returns its manifest. Holds OUT's lock."""
    with hold(Path(cfg.out), "data mix"):
        return _mix_owned(cfg, progress, force)


def _mix_owned(cfg: MixtureConfig, progress: bool, force: bool) -> dict:
    out = Path(cfg.out)
    given = _given_tokenizer(cfg)
    settings = _settings(cfg, hashlib.sha256(given).hexdigest() if given is not None else None)
    if force:
        _discard(out)
    elif (reused := _reuse(cfg, settings, progress)) is not None:
        return reused
    fingerprint = out / FINGERPRINT
    if not _resumable(fingerprint, settings):
        if (out / "tokenizer.json").exists() or (out / SOURCES_DIR).exists():
            _say(f"discarding an unfinished earlier mixture in {out}: it does not match these settings", progress)
        _discard(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(fingerprint, settings)

    tok_path = out / "tokenizer.json"
    if given is not None:
        if not tok_path.exists():
            atomic_write_bytes(tok_path, given)
    elif not tok_path.exists():
        tok = train_tokenizer(_tokenizer_sample(cfg), cfg.tokenizer, cfg.vocab_size, show_progress=progress)  # type: ignore[arg-type]
        if tok.get_vocab_size() <= 3:
            raise UserError("the mixture's sources have no training documents; the corpora are empty")
        tmp = tok_path.with_name(".tokenizer.json.tmp")
        with writing(tok_path):
            tok.save(str(tmp))
        os.replace(tmp, tok_path)
    tok = load_tokenizer(tok_path)
    eos = eos_id(tok)

    names = list(cfg.sources)
    source_manifests = {}
    for name in names:
        _say(f"preparing source {name} with the mixture's tokenizer", progress)
        source_manifests[name] = prepare(cfg.prepare_config(name, tok_path), progress=progress)
        if source_manifests[name]["splits"]["val"]["documents"] == 0:
            raise UserError(f"mixture source {name!r} has no val documents (its in-domain held-out text); raise its val_fraction")
    first = source_manifests[names[0]]
    dtype = np.dtype(first["dtype"])
    weights = [cfg.weights()[n] for n in names]
    folders = [out / SOURCES_DIR / n for n in names]

    splits, orders = {}, {}
    for split, cap in (("train", cfg.train_tokens), ("val", None)):
        parts = [_source_split(folder, split, eos) for folder in folders]
        splits[split], orders[split] = _write_mixed_split(out, split, names, parts, weights, cap, dtype, cfg.shard_tokens, tok)
        if cap is not None and orders[split].exhausted is not None:
            raise UserError(f"mixture source {names[orders[split].exhausted]!r} ran out at {orders[split].total:,} train "
                            f"tokens, short of train_tokens {cap:,}; lower train_tokens or its weight, or give it more text")  # fmt: skip
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": "mixture:" + ",".join(f"{n}={w:.6g}" for n, w in zip(names, weights, strict=True)),
        "tokenizer": {"path": "tokenizer.json", "sha256": sha256_file(tok_path), "kind": cfg.tokenizer if given is None else "file"},
        "vocab_size": tok.get_vocab_size(),
        "dtype": dtype.name,
        "eos_id": eos,
        "documents_read": sum(m["documents_read"] for m in source_manifests.values()),
        "duplicates_removed": sum(m["duplicates_removed"] for m in source_manifests.values()),
        "replaced_invalid_utf8": sum(m["replaced_invalid_utf8"] for m in source_manifests.values()),
        "splits": splits,
        "mixture": {
            "format": MIXTURE_FORMAT,
            "weights": dict(zip(names, weights, strict=True)),
            "stop": {split: "train_tokens reached" if o.exhausted is None else f"source {names[o.exhausted]} exhausted"
                     for split, o in orders.items()},  # fmt: skip
            "prefix_tolerance": {split: {"tolerance": TOLERANCE, "within_from_tokens": o.within_from_tokens,
                                         "max_deviation_tokens": o.max_deviation_tokens, "bound_tokens": o.bound_tokens}
                                 for split, o in orders.items()},  # fmt: skip
            "sources": {name: {"path": f"{SOURCES_DIR}/{name}", "source": source_manifests[name]["source"],
                               "weight": w, "manifest_sha256": sha256_file(folder / "manifest.json"),
                               "splits": {s: {k: v for k, v in info.items() if k != "shards"}
                                          for s, info in source_manifests[name]["splits"].items()}}
                        for name, w, folder in zip(names, weights, folders, strict=True)},  # fmt: skip
        },
        "config": cfg.model_dump(mode="json"),
        "settings": settings,
    }
    atomic_write_json(out / "manifest.json", manifest)
    fingerprint.unlink(missing_ok=True)
    return manifest


def source_folders(dataset_dir: str | Path) -> dict[str, Path]:
    """{source name: its prepared folder} of a mixture dataset; UserError if it is not a mixture."""
    manifest = load_manifest(dataset_dir)
    mixture = manifest.get("mixture")
    if not isinstance(mixture, dict) or not isinstance(mixture.get("sources"), dict):
        raise UserError(f"{str(dataset_dir)!r} is not a mixture (made by `smallscale data mix` or a study's `mix:`); "
                        "score its val split with `heldout` instead")  # fmt: skip
    folders = {}
    for name in mixture["sources"]:
        if not is_plain_name(name):  # a manifest may come from anyone: a name must not climb out
            raise UserError(f"mixture manifest of {str(dataset_dir)!r} names a source {name!r}, which is not a plain name")
        folders[name] = Path(dataset_dir) / SOURCES_DIR / name
    return folders

