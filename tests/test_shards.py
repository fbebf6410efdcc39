"""`data prepare`: round trip, byte counts, shards, resume, parallelism, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from smallscale.data import shards as shards_mod
from smallscale.data.shards import PrepareConfig, load_manifest, prepare, read_split
from smallscale.data.tokenizer import load_tokenizer
from smallscale.errors import UserError
from tests.conftest import nfc


def decode_split(out: Path, split: str) -> list[str]:
    tok = load_tokenizer(out / "tokenizer.json")
    eos = load_manifest(out)["eos_id"]
    stream = np.concatenate([np.asarray(a) for a in read_split(out, split)] or [np.zeros(0, np.int64)])
    ends = np.flatnonzero(stream == eos)
    assert len(ends) == 0 or ends[-1] == len(stream) - 1  # the stream ends with EOS
    docs, start = [], 0
    for end in ends:
        docs.append(tok.decode(stream[start:end].tolist(), skip_special_tokens=False))
        start = end + 1
    return docs


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_round_trip_reproduces_normalised_unique_documents(text_folder, tmp_path, kind):
    folder, docs = text_folder
    out = tmp_path / "ds"
    manifest = prepare(PrepareConfig(source=str(folder), out=str(out), tokenizer=kind, vocab_size=400, workers=1, val_fraction=0.2), progress=False)
    decoded = decode_split(out, "train") + decode_split(out, "val")
    expected = {nfc(d) for d in docs}
    assert Counter(decoded) == Counter(expected)  # every unique document exactly once
    assert manifest["duplicates_removed"] == 10
    assert manifest["documents_read"] == 210
    for split in ("train", "val"):
        split_docs = decode_split(out, split)
        s = manifest["splits"][split]
        assert s["documents"] == len(split_docs) > 0
        assert s["bytes"] == sum(len(d.encode("utf-8")) for d in split_docs)
        assert s["tokens"] == sum(sh["tokens"] for sh in s["shards"])
        assert s["fertility"] > 0.5 and s["bytes_per_token"] > 1.0


def test_without_nfc_text_is_kept_as_is(text_folder, tmp_path):
    folder, docs = text_folder
    out = tmp_path / "ds"
    prepare(PrepareConfig(source=str(folder), out=str(out), nfc=False, vocab_size=400, workers=1), progress=False)
    decoded = set(decode_split(out, "train") + decode_split(out, "val"))
    assert decoded == set(docs)
    assert any("e\u0301" in d for d in decoded)


def test_shards_are_bounded_and_stream_matches_manifest(text_folder, tmp_path):
    folder, _ = text_folder
    out = tmp_path / "ds"
    m = prepare(PrepareConfig(source=str(folder), out=str(out), vocab_size=400, shard_tokens=1000, workers=1), progress=False)
    train = m["splits"]["train"]
    assert len(train["shards"]) > 3
    assert all(s["tokens"] <= 1000 for s in train["shards"])
    assert m["dtype"] == "uint16"
    for s in train["shards"]:
        assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
    assert not (out / "work").exists()
    assert not list(out.glob(".*tmp"))


def test_workers_give_identical_output(text_folder, tmp_path):
    folder, _ = text_folder
    m1 = prepare(PrepareConfig(source=str(folder), out=str(tmp_path / "a"), vocab_size=400, workers=1), progress=False)
    m2 = prepare(PrepareConfig(source=str(folder), out=str(tmp_path / "b"), vocab_size=400, workers=2), progress=False)
    for split in ("train", "val"):
        assert [s["sha256"] for s in m1["splits"][split]["shards"]] == [s["sha256"] for s in m2["splits"][split]["shards"]]


def test_rerun_after_crash_does_not_redo_finished_parts(tmp_path, monkeypatch):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_text("\n".join(f"line {i} {j} of file" for j in range(50)), encoding="utf-8")
    cfg = PrepareConfig(source=str(corpus), out=str(tmp_path / "ds"), split_by="line", vocab_size=300, workers=1)

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(shards_mod, "_merge", crash)
    with pytest.raises(RuntimeError):
        prepare(cfg, progress=False)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert len(list((tmp_path / "ds" / "work").glob("part-*.done.json"))) == 4
    monkeypatch.undo()

    encoded = []
    real = shards_mod._encode_part
    monkeypatch.setattr(shards_mod, "_encode_part", lambda job: encoded.append(real(job)) or encoded[-1])
    m = prepare(cfg, progress=False)
    assert all(r.skipped for r in encoded) and len(encoded) == 4
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 200


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"good line one\nbad \xff\xfe line\nanother good line\n" * 20)
    m = prepare(PrepareConfig(source=str(corpus), out=str(tmp_path / "ds"), split_by="line", vocab_size=300, dedup=False, workers=1), progress=False)
    assert m["replaced_invalid_utf8"] >= 20
    assert m["documents_read"] == 60


def test_empty_corpus_is_a_user_error(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        prepare(PrepareConfig(source=str(corpus), out=str(tmp_path / "ds"), split_by="line", workers=1), progress=False)


def test_reused_tokenizer_file(text_folder, tmp_path):
    folder, _ = text_folder
    m1 = prepare(PrepareConfig(source=str(folder), out=str(tmp_path / "a"), vocab_size=400, workers=1), progress=False)
    m2 = prepare(PrepareConfig(source=str(folder), out=str(tmp_path / "b"), tokenizer=str(tmp_path / "a" / "tokenizer.json"), workers=1), progress=False)
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]
    assert m2["tokenizer"]["kind"] == "file"
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["splits"]["train"]["tokens"] == m1["splits"]["train"]["tokens"]


def test_splitting_a_large_file_into_byte_ranges_changes_nothing(tmp_path):
    from tests.conftest import synthetic_docs

    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(synthetic_docs(800, seed=5)), encoding="utf-8")
    whole = prepare(PrepareConfig(source=str(corpus), out=str(tmp_path / "a"), split_by="line", vocab_size=300, workers=1), progress=False)
    tok = str(tmp_path / "a" / "tokenizer.json")
    parts = prepare(PrepareConfig(source=str(corpus), out=str(tmp_path / "b"), split_by="line", tokenizer=tok, part_bytes=4096, workers=2), progress=False)
    assert parts["documents_read"] == whole["documents_read"] == 800
    for split in ("train", "val"):
        assert [s["sha256"] for s in parts["splits"][split]["shards"]] == [s["sha256"] for s in whole["splits"][split]["shards"]]


def test_a_worker_loads_the_tokenizer_once_for_all_its_parts(tmp_path):
    # one load per part left ~4.5 MB of native heap behind each time: a worker's memory grew with
    # the corpus (bench/bench_prepare_scale.py: 229 MB per worker at 200 MB, 395 MB at 2 GB)
    from smallscale.data import sources
    from tests.conftest import synthetic_docs

    shards = shards_mod
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(synthetic_docs(400, seed=6)), encoding="utf-8")
    first = prepare(PrepareConfig(source=str(corpus), out=str(tmp_path / "a"), split_by="line", vocab_size=300, workers=1), progress=False)
    shards._worker_tokenizer.cache_clear()
    tok = str(tmp_path / "a" / "tokenizer.json")
    again = prepare(PrepareConfig(source=str(corpus), out=str(tmp_path / "b"), split_by="line", tokenizer=tok, part_bytes=2048, workers=1), progress=False)
    n_parts = len(sources.resolve_parts(str(corpus), sources.SourceOptions(split_by="line", part_bytes=2048)))
    assert n_parts >= 5 and again["documents_read"] == first["documents_read"] == 400
    assert shards._worker_tokenizer.cache_info()[:2] == (n_parts - 1, 1)  # (hits, misses): one load
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [s["sha256"] for s in first["splits"]["train"]["shards"]]


def test_a_val_source_is_the_whole_val_split_and_source_the_whole_train_split(tmp_path):
    from tests.conftest import synthetic_docs

    train_docs, val_docs = synthetic_docs(120, seed=3), synthetic_docs(30, seed=4)
    val_docs.append(train_docs[0])  # a val document that also occurs in train stays in both
    (tmp_path / "train.txt").write_text("\n".join(train_docs), encoding="utf-8")
    (tmp_path / "dev.txt").write_text("\n".join(val_docs), encoding="utf-8")
    out = tmp_path / "ds"
    cfg = PrepareConfig(source=str(tmp_path / "train.txt"), val_source=str(tmp_path / "dev.txt"), out=str(out),
                        split_by="line", vocab_size=300, workers=1)  # fmt: skip
    manifest = prepare(cfg, progress=False)
    assert Counter(decode_split(out, "val")) == Counter({nfc(d) for d in val_docs})
    assert Counter(decode_split(out, "train")) == Counter({nfc(d) for d in train_docs})
    assert manifest["settings"]["val_source"] == str(tmp_path / "dev.txt")
