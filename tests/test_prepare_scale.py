"""`data prepare` at scale: a document order and dedup in bounded memory that equal the in-memory
definition, the same dataset from any number of workers, parts, key ranges or array tasks, sharded
`hf:` streams read in parallel, and a capped val split."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smallscale.data import order, sources
from smallscale.data import shards as shards_mod
from smallscale.data.shards import PrepareConfig, doc_hash, is_val, load_manifest, prepare, read_split
from smallscale.errors import UserError
from tests.conftest import nfc, synthetic_docs
from tests.test_shards import decode_split

CLI = [sys.executable, "-m", "smallscale.cli"]
SEED = 1234


def bounded(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None)


def in_key_order(docs: list[str], seed: int = SEED) -> list[str]:
    """The reference order, computed in memory: unique documents by increasing order key."""
    unique = list(dict.fromkeys(docs))
    keys = order.order_keys(np.array([doc_hash(d) for d in unique], dtype=np.uint64), seed)
    return [unique[i] for i in np.argsort(keys, kind="stable")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """Three files of one-line documents, 1,200 distinct and 150 repeated (also across files)."""
    folder = tmp_path_factory.mktemp("scale") / "corpus"
    folder.mkdir()
    docs = synthetic_docs(1200, seed=11)
    lines = docs + docs[::8]
    for i in range(3):
        (folder / f"f{i}.txt").write_text("\n".join(lines[i::3]) + "\n", encoding="utf-8")
    return folder, [nfc(d) for d in docs]


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "ds"
    prepare(PrepareConfig(source=str(corpus[0]), out=str(out), split_by="line", vocab_size=300, workers=1), progress=False)
    return out / "tokenizer.json"


def prep(corpus: Path, out: Path, tokenizer: Path, **options) -> dict:
    options = {"split_by": "line", "workers": 1, "tokenizer": str(tokenizer), **options}
    return prepare(PrepareConfig(source=str(corpus), out=str(out), **options), progress=False)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


# ----------------------------------------------------------------------------- order and dedup
def test_each_split_lists_its_unique_documents_by_increasing_order_key(corpus, tokenizer, tmp_path):
    folder, docs = corpus
    manifest = prep(folder, tmp_path / "ds", tokenizer)
    val = [d for d in docs if is_val(doc_hash(d), SEED, 0.05)]
    assert decode_split(tmp_path / "ds", "val") == in_key_order(val)
    assert decode_split(tmp_path / "ds", "train") == in_key_order([d for d in docs if d not in set(val)])
    assert manifest["documents_read"] == 1350 and manifest["duplicates_removed"] == 150


def test_the_order_is_a_function_of_the_seed(corpus, tokenizer, tmp_path):
    folder, docs = corpus
    prep(folder, tmp_path / "ds", tokenizer, seed=7, val_fraction=0.0)
    decoded = decode_split(tmp_path / "ds", "train")
    assert decoded == in_key_order(docs, seed=7) != in_key_order(docs, seed=SEED)


def test_without_dedup_copies_are_kept_side_by_side(corpus, tokenizer, tmp_path):
    folder, docs = corpus
    manifest = prep(folder, tmp_path / "ds", tokenizer, dedup=False, val_fraction=0.0)
    expected = [d for d in in_key_order(docs) for _ in range(2 if d in set(docs[::8]) else 1)]
    assert decode_split(tmp_path / "ds", "train") == expected
    assert manifest["duplicates_removed"] == 0


@bounded(60)
@given(
    part_sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    bucket_docs=st.integers(1, 50),
    data=st.data(),
)
def test_reading_by_key_ranges_equals_one_sort_of_everything(tmp_path_factory, part_sizes, bucket_docs, data):
    """Key ranges of any size give every record once, in (key, split, source position) order."""
    folder = tmp_path_factory.mktemp("index")
    keys = st.sampled_from([0, 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)  # edge keys and repeats
    paths, everything = [], []
    for part, size in enumerate(part_sizes):
        index = np.zeros(size, dtype=order.INDEX_DTYPE)
        index["key"] = data.draw(st.lists(keys, min_size=size, max_size=size))
        index["val"] = data.draw(st.lists(st.integers(0, 1), min_size=size, max_size=size))
        index["offset"] = np.arange(size)  # the source position within the part
        index = order.sort_index(index)
        paths.append(folder / f"part-{part}.index.npy")
        np.save(paths[-1], index)
        everything += [(int(r["key"]), int(r["val"]), part, int(r["offset"])) for r in index]
    got = [(int(r["key"]), int(r["val"]), int(p), int(r["offset"]))
           for records, owner in order.ordered_records(paths, bucket_docs) for r, p in zip(records, owner)]  # fmt: skip
    assert got == sorted(everything)


@bounded(8)
@given(workers=st.integers(1, 2), part_bytes=st.integers(2_000, 40_000), bucket_docs=st.integers(1, 2_000),
       copy_tokens=st.integers(1, 64), dedup=st.booleans())  # fmt: skip
def test_workers_parts_key_ranges_and_buffers_never_change_the_dataset(corpus, tokenizer, tmp_path_factory, workers, part_bytes,
                                                                      bucket_docs, copy_tokens, dedup):  # fmt: skip
    folder, _ = corpus
    reference = tmp_path_factory.getbasetemp() / f"reference-{dedup}"
    if not reference.exists():
        prep(folder, reference, tokenizer, dedup=dedup, shard_tokens=5_000)
    out = tmp_path_factory.mktemp("variant") / "ds"
    with pytest.MonkeyPatch.context() as patch:  # copy buffers shorter than most documents: copied in pieces
        patch.setattr(order, "BUCKET_DOCS", bucket_docs)
        patch.setattr(shards_mod, "_COPY_TOKENS", copy_tokens)
        patch.setattr(shards_mod, "_PART_COPY_TOKENS", copy_tokens)
        prep(folder, out, tokenizer, dedup=dedup, shard_tokens=5_000, workers=workers, part_bytes=part_bytes)
    assert shard_bytes(out) == shard_bytes(reference)
    assert load_manifest(out)["splits"] == load_manifest(reference)["splits"]


def test_the_merge_holds_the_same_memory_for_ten_times_the_documents(tmp_path):
    """Python-level allocations of the merge (numpy's included), at 1,000 and 10,000 documents."""
    peaks = []
    for n in (1_000, 10_000):
        corpus = tmp_path / f"c{n}.txt"
        corpus.write_text("\n".join(f"document {i} of {n}: " + "word " * (i % 7) for i in range(n)), encoding="utf-8")
        out = tmp_path / f"ds{n}"
        cfg = PrepareConfig(source=str(corpus), out=str(out), split_by="line", vocab_size=300, workers=1, part_bytes=20_000)
        real_merge = shards_mod._merge

        def measured(*args, _real=real_merge):
            tracemalloc.start()
            try:
                return _real(*args)
            finally:
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(shards_mod, "_merge", measured)
            patch.setattr(order, "BUCKET_DOCS", 64)
            patch.setattr(shards_mod, "_COPY_TOKENS", 1024)
            manifest = prepare(cfg, progress=False)
        assert manifest["documents_read"] == n
    assert peaks[1] < 1.3 * peaks[0], peaks


# ----------------------------------------------------------------------------- a job array
def test_a_submitit_local_job_array_prepares_the_same_dataset_as_a_local_prepare(corpus, tmp_path):
    folder, _ = corpus
    common = ["data", "prepare", str(folder), "--split-by", "line", "--vocab-size", "300", "--part-bytes", "20000"]
    local = subprocess.run([*CLI, *common, "--out", str(tmp_path / "local"), "--workers", "1"], capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    array = subprocess.run([*CLI, *common, "--out", "array", "--workers", "2", "--executor", "submitit-local"],
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert array.returncode == 0, array.stderr
    assert "job array of 2 task(s)" in array.stderr and "submitted merge" in array.stderr, array.stderr
    assert shard_bytes(tmp_path / "array") == shard_bytes(tmp_path / "local") != {}
    assert (tmp_path / "array" / "tokenizer.json").read_bytes() == (tmp_path / "local" / "tokenizer.json").read_bytes()
    assert load_manifest(tmp_path / "array")["splits"] == load_manifest(tmp_path / "local")["splits"]
    assert not (tmp_path / "array" / "work").exists()


def test_a_user_error_in_an_array_task_is_the_same_one_line_error(corpus, tokenizer, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(synthetic_docs(300)), encoding="utf-8")
    lines = b"".join(f"line {i} of plain text\n".encode() for i in range(2000))
    (folder / "late.txt").write_bytes(lines[:20_000] + b"\0" + lines[20_001:])
    proc = subprocess.run([*CLI, "data", "prepare", str(folder), "--out", str(tmp_path / "ds"), "--split-by", "line",
                           "--tokenizer", str(tokenizer), "--executor", "submitit-local"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "late.txt has a NUL byte at byte offset 20,000" in proc.stderr


def test_an_unknown_executor_is_one_line(corpus, tmp_path):
    proc = subprocess.run([*CLI, "data", "prepare", str(corpus[0]), "--out", str(tmp_path / "ds"), "--executor", "pbs"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "executor 'pbs' is unknown; choose one of local, slurm, submitit-local" in proc.stderr


# ----------------------------------------------------------------------------- hf: streaming
@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """A local dataset of 6 Parquet files (a sharded HF dataset), 40 documents each."""
    folder = tmp_path_factory.mktemp("hf") / "sharded"
    folder.mkdir()
    files = [synthetic_docs(40, seed=100 + i) for i in range(6)]
    for i, docs in enumerate(files):
        pq.write_table(pa.table({"text": docs}), folder / f"train-{i:05d}-of-00006.parquet", row_group_size=16)
    return folder, files


def read_documents(part: sources.Part) -> list[str]:
    return list(sources.read_part(part))


def test_a_streamed_sharded_dataset_is_one_part_per_file_each_reading_its_own(parquet_shards):
    folder, files = parquet_shards
    parts = sources.resolve_parts(f"hf:{folder}", sources.SourceOptions(streaming=True))
    assert [(p.index, p.num_shards, p.streaming) for p in parts] == [(i, 6, True) for i in range(6)]
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        read = list(pool.map(read_documents, parts))  # each worker its own shards
    assert read == files


def test_parallel_streaming_equals_the_serial_stream(parquet_shards):
    import datasets

    folder, _ = parquet_shards
    serial = [r["text"] for r in datasets.load_dataset(str(folder), split="train", streaming=True)]
    parts = sources.resolve_parts(f"hf:{folder}", sources.SourceOptions(streaming=True))
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        parallel = [doc for docs in pool.map(read_documents, parts) for doc in docs]
    assert parallel == serial and len(serial) == 240


def test_a_streamed_dataset_prepares_the_same_with_two_workers_as_with_one(parquet_shards, tmp_path):
    folder, _ = parquet_shards
    base = {"source": f"hf:{folder}", "streaming": True, "vocab_size": 300}
    one = prepare(PrepareConfig(**base, out=str(tmp_path / "one"), workers=1), progress=False)
    two = prepare(PrepareConfig(**base, out=str(tmp_path / "two"), workers=2), progress=False)
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    assert one["documents_read"] == two["documents_read"] == 240


# ----------------------------------------------------------------------------- val cap
def test_the_val_split_is_the_first_val_documents_that_fit_val_tokens_and_the_rest_are_trained_on(corpus, tokenizer, tmp_path):
    folder, docs = corpus
    uncapped = prep(folder, tmp_path / "all", tokenizer, val_fraction=0.2, val_tokens=None)
    capped = prep(folder, tmp_path / "capped", tokenizer, val_fraction=0.2, val_tokens=2_000)
    all_val = decode_split(tmp_path / "all", "val")
    val = decode_split(tmp_path / "capped", "val")
    assert capped["splits"]["val"]["tokens"] <= 2_000 < uncapped["splits"]["val"]["tokens"]
    assert val == all_val[: len(val)] and len(val) > 0
    assert decode_split(tmp_path / "capped", "train") == in_key_order([d for d in docs if d not in set(val)])
    cap = capped["val_cap"]
    assert cap == {"val_tokens": 2_000, "reached": True, "documents_over": len(all_val) - len(val),
                   "document_tokens_over": uncapped["splits"]["val"]["document_tokens"] - capped["splits"]["val"]["document_tokens"],
                   "over_cap_to": "train"}  # fmt: skip
    assert capped["settings"]["val_tokens"] == capped["config"]["val_tokens"] == 2_000
    assert capped["splits"]["train"]["documents"] + len(val) == uncapped["splits"]["train"]["documents"] + len(all_val)


def test_a_capped_val_source_leaves_its_other_documents_out(corpus, tokenizer, tmp_path):
    folder, docs = corpus
    dev = tmp_path / "dev.txt"
    dev.write_text("\n".join(synthetic_docs(100, seed=99)), encoding="utf-8")
    manifest = prep(folder, tmp_path / "ds", tokenizer, val_source=str(dev), val_tokens=1_000)
    assert manifest["splits"]["val"]["tokens"] <= 1_000 and manifest["val_cap"]["over_cap_to"] == "nowhere"
    assert decode_split(tmp_path / "ds", "train") == in_key_order(docs)
    assert manifest["splits"]["val"]["documents"] + manifest["val_cap"]["documents_over"] == len({nfc(d) for d in synthetic_docs(100, seed=99)})


def test_a_val_cap_below_the_first_val_document_is_a_user_error(corpus, tokenizer, tmp_path):
    with pytest.raises(UserError, match="val_tokens 3 is smaller than the first val document; raise it"):
        prep(corpus[0], tmp_path / "ds", tokenizer, val_tokens=3)


def test_cli_val_tokens_is_recorded_and_zero_means_no_cap(corpus, tmp_path):
    base = [*CLI, "data", "prepare", str(corpus[0]), "--split-by", "line", "--vocab-size", "300", "--workers", "1"]
    assert subprocess.run([*base, "--out", str(tmp_path / "a"), "--val-tokens", "1500"], capture_output=True).returncode == 0
    assert subprocess.run([*base, "--out", str(tmp_path / "b"), "--val-tokens", "0"], capture_output=True).returncode == 0
    assert load_manifest(tmp_path / "a")["settings"]["val_tokens"] == 1500
    assert load_manifest(tmp_path / "b")["settings"]["val_tokens"] is None
    assert load_manifest(tmp_path / "a")["splits"]["val"]["tokens"] <= 1500 < load_manifest(tmp_path / "b")["splits"]["val"]["tokens"]


# ----------------------------------------------------------------------------- format version
def test_a_format_1_dataset_is_read_but_not_reused(corpus, tokenizer, tmp_path):
    import json

    folder, _ = corpus
    manifest = prep(folder, tmp_path / "ds", tokenizer)
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert sum(len(a) for a in read_split(tmp_path / "ds", "train")) == manifest["splits"]["train"]["tokens"]
    with pytest.raises(UserError, match="format version 1, whose document order this version .* pass --force"):
        prep(folder, tmp_path / "ds", tokenizer)
