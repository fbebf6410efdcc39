"""Properties of `data prepare` and the loader over generated inputs (Hypothesis, derandomized).

`data prepare` on any input either writes a dataset whose manifest matches its shards, or raises
one `UserError`: never another exception, and it writes nowhere but its output folder. The loader
reads only whole windows inside the budget, each once per epoch, and budgets nest.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smallscale.data.loader import TrainLoader
from smallscale.data.shards import PrepareConfig, load_manifest, prepare, read_split, verify_dataset
from smallscale.data.sources import SourceOptions, iter_documents
from smallscale.data.tokenizer import load_tokenizer
from smallscale.errors import UserError


def bounded(max_examples: int):
    """Reproducible in CI (no example database, fixed seed); a run of each property takes ~10-20 s."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


# --- generated sources ---------------------------------------------------------------------------

TRICKY_BYTES = [b"\0", b"\r", b"\n", b"\r\n", b"\n\n", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
                "é".encode(), "e\u0301".encode(), b"<|eos|>", b" ", b"\t"]  # fmt: skip
SPLIT_BY = st.sampled_from(["file", "line", "paragraph"])


@st.composite
def messy_bytes(draw) -> bytes:
    """Text-like bytes with invalid UTF-8, NULs, CRs and BOMs, sometimes after 8 KiB of clean text."""
    pieces = draw(st.lists(st.one_of(st.sampled_from(TRICKY_BYTES), st.text(max_size=12).map(str.encode),
                                     st.binary(max_size=6)), max_size=40))  # fmt: skip
    prefix = b"a clean line of text\n" * draw(st.sampled_from([0, 0, 1, 500]))  # 500 lines: 10.5 KB
    return prefix + b"".join(pieces)


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "koi8-r", "shift_jis"]


def write_compressed(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def odd_jsonl_line(draw) -> str:
    """A line that is not a plain {"text": str} record, or one whose string holds tricky escapes."""
    kind = draw(st.sampled_from(["other_value", "no_field", "not_object", "broken", "blank", "escape"]))
    if kind == "other_value":
        return json.dumps({"text": draw(JSON_VALUES)})
    if kind == "no_field":
        return json.dumps(draw(st.dictionaries(st.sampled_from(["body", "title", "id"]), JSON_VALUES, max_size=3)))
    if kind == "not_object":
        return json.dumps(draw(JSON_VALUES))
    if kind == "broken":
        whole = json.dumps({"text": draw(st.text(max_size=20))})
        return whole[: draw(st.integers(0, len(whole) - 1))]
    if kind == "escape":  # escapes that decode to a NUL, a lone surrogate or a valid pair
        return '{"text": "a' + draw(st.sampled_from(["\\u0000", "\\ud800", "\\udfff x", "\\ud83d\\ude00"])) + 'b"}'
    return draw(st.sampled_from(["", "   ", "\t"]))


@st.composite
def jsonl_lines(draw) -> list[str]:
    """Plain records, with one odd line among them half of the time."""
    record = st.builds(lambda text, ascii_only: json.dumps({"text": text, "id": 1}, ensure_ascii=ascii_only),
                       st.text(max_size=40), st.booleans())  # fmt: skip
    lines = draw(st.lists(record, min_size=1, max_size=10))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(odd_jsonl_line()))
    return lines


# --- the property: a consistent dataset or one UserError ---------------------------------------


def tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `root` but not under `skip`."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and skip not in p.parents}  # fmt: skip


def prepare_consistently_or_user_error(source: Path, root: Path, **options) -> dict | None:
    """Run `data prepare` (vocab 300); check the dataset against its manifest and an independent read."""
    out = root / "out"
    before = tree(root, out)
    cfg = PrepareConfig(source=str(source), out=str(out), vocab_size=300, workers=1, **options)
    try:
        manifest = prepare(cfg, progress=False)
    except UserError as exc:
        assert "\n" not in str(exc).strip()
        words = [w for w in str(exc).split() if "/" not in w and not any(c.isdigit() for c in w)]
        event(f"UserError: {' '.join(words[:5])}")  # the statistics show which checks fire
        manifest = None
    assert tree(root, out) == before, "prepare wrote outside its output folder"
    if manifest is not None:
        event("prepared")
        check_manifest(out, manifest, cfg)
    return manifest


def check_manifest(out: Path, manifest: dict, cfg: PrepareConfig) -> None:
    assert verify_dataset(out) == []
    tok = load_tokenizer(out / "tokenizer.json")
    eos = manifest["eos_id"]
    decoded: list[str] = []
    for split in ("train", "val"):
        s = manifest["splits"][split]
        stream = np.concatenate([np.asarray(a, dtype=np.int64) for a in read_split(out, split)] or [np.zeros(0, np.int64)])
        assert len(stream) == s["tokens"] == sum(shard["tokens"] for shard in s["shards"])
        assert len(stream) == 0 or (stream.max() < manifest["vocab_size"] and stream[-1] == eos)
        ends = np.flatnonzero(stream == eos)
        docs = [tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in np.split(stream, ends + 1)[:-1]]  # without EOS
        assert len(docs) == s["documents"] and s["document_tokens"] == len(stream) - len(docs)
        assert sum(len(d.encode("utf-8")) for d in docs) == s["bytes"]
        decoded += docs
    # An independent single-process read of the source gives the same documents, deduplicated.
    opts = SourceOptions(split_by=cfg.split_by, text_field=cfg.text_field)
    expected = [unicodedata.normalize("NFC", d) for d in iter_documents(cfg.source, opts)]
    assert manifest["documents_read"] == len(expected)
    assert manifest["duplicates_removed"] == len(expected) - len(set(expected))
    assert Counter(decoded) == Counter(set(expected))


@pytest.mark.timeout(120)
@bounded(max_examples=100)
@given(files=st.lists(messy_bytes(), min_size=1, max_size=3), suffix=st.sampled_from([".txt", ".md", ".txt.gz"]),
       split_by=SPLIT_BY, folder=st.booleans(), part_bytes=st.sampled_from([16, 1000, 2**20]))  # fmt: skip
def test_prepare_on_messy_bytes_is_consistent_or_one_user_error(files, suffix, split_by, folder, part_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        paths = [write_compressed(root / "src" / f"f{i}{suffix}", data) for i, data in enumerate(files)]
        source = root / "src" if folder else paths[0]
        prepare_consistently_or_user_error(source, root, split_by=split_by, part_bytes=part_bytes, val_fraction=0.2)


@pytest.mark.timeout(120)
@bounded(max_examples=120)
@given(text=st.text(min_size=1, max_size=300), encoding=st.sampled_from(ENCODINGS), split_by=SPLIT_BY)
def test_prepare_on_text_in_any_encoding_is_consistent_or_one_user_error(text, encoding, split_by):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = text.encode(encoding, errors="replace")
        (root / "doc.txt").write_bytes(data)
        manifest = prepare_consistently_or_user_error(root / "doc.txt", root, split_by=split_by, val_fraction=0.0)
        if b"\0" in data:
            assert manifest is None  # UTF-16/32 text has NULs: refused as binary, never read as text


@pytest.mark.timeout(120)
@bounded(max_examples=200)
@given(lines=jsonl_lines(), split_by=SPLIT_BY, crlf=st.booleans())
def test_prepare_on_jsonl_is_consistent_or_one_user_error(lines, split_by, crlf):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data.jsonl").write_text(("\r\n" if crlf else "\n").join(lines), encoding="utf-8")
        prepare_consistently_or_user_error(root / "data.jsonl", root, split_by=split_by, val_fraction=0.2)


STRINGS = st.lists(st.none() | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30), min_size=1, max_size=10)
PARQUET_COLUMNS = {
    "string": STRINGS.map(lambda v: pa.array(v, type=pa.string())),
    "binary": st.lists(st.none() | st.binary(max_size=30), min_size=1, max_size=10).map(lambda v: pa.array(v, type=pa.binary())),
    "int": st.lists(st.integers(-(2**31), 2**31), min_size=1, max_size=10).map(lambda v: pa.array(v, type=pa.int64())),
}


@pytest.mark.timeout(120)
@bounded(max_examples=100)
@given(kind=st.sampled_from(["string", "string", "binary", "int"]), name=st.sampled_from(["text", "text", "body"]),
       row_group=st.integers(1, 4), data=st.data())  # fmt: skip
def test_prepare_on_parquet_is_consistent_or_one_user_error(kind, name, row_group, data):
    column = data.draw(PARQUET_COLUMNS[kind], label="column")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pq.write_table(pa.table({name: column}), root / "data.parquet", row_group_size=row_group)
        prepare_consistently_or_user_error(root / "data.parquet", root, val_fraction=0.2)


# --- the loader --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@bounded(max_examples=200)
@given(seq_len=st.integers(1, 48), micro_batch=st.integers(1, 6), world_size=st.integers(1, 3),
       budget=st.integers(50, 3000), seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_one_epoch_reads_every_window_of_the_budget_once_within_bounds(tiny_dataset, seq_len, micro_batch, world_size, budget, seed):
    vocab_size = load_manifest(tiny_dataset)["vocab_size"]
    try:
        ranks = [TrainLoader(tiny_dataset, seq_len, micro_batch, budget, seed=seed, rank=r, world_size=world_size)
                 for r in range(world_size)]  # fmt: skip
    except UserError:
        assert budget // seq_len <= micro_batch * world_size  # too few windows for one global batch
        return
    stream, n_windows = ranks[0].tokens, ranks[0].n_windows
    assert n_windows * seq_len + 1 <= len(stream) <= budget + 1
    windows = Counter(tuple(stream.read(w * seq_len, seq_len + 1).tolist()) for w in range(n_windows))
    rows: dict[int, tuple[int, ...]] = {}  # global sample index -> its window
    step = 0
    while len(rows) < n_windows:
        for rank, loader in enumerate(ranks):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (micro_batch, seq_len) and torch_equal(x[:, 1:], y[:, :-1])
            assert int(x.min()) >= 0 and int(y.max()) < vocab_size
            for i in range(micro_batch):
                rows[(step * world_size + rank) * micro_batch + i] = (*x[i].tolist(), int(y[i, -1]))
        step += 1
    assert Counter(rows[g] for g in range(n_windows)) == windows


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


@pytest.mark.timeout(120)
@bounded(max_examples=200)
@given(seq_len=st.integers(1, 64), data=st.data())
def test_a_smaller_budget_reads_a_prefix_of_a_larger_one(tiny_dataset, seq_len, data):
    available = load_manifest(tiny_dataset)["splits"]["train"]["tokens"]
    small = data.draw(st.integers(seq_len + 1, available - 1), label="small")
    large = data.draw(st.integers(small, available), label="large")
    a = TrainLoader(tiny_dataset, seq_len, 1, small).tokens
    b = TrainLoader(tiny_dataset, seq_len, 1, large).tokens
    assert len(b) - len(a) == large - small
    assert np.array_equal(a.read(0, len(a)), b.read(0, len(a)))
