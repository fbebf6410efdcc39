"""Prepared datasets are checked before use, never silently mixed, and never read binary as text."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smallscale.data import shards as shards_mod
from smallscale.data.shards import PrepareConfig, load_manifest, prepare, read_split
from smallscale.errors import UserError
from smallscale.train.trainer import load_run_config, train
from tests.conftest import synthetic_docs

CLI = [sys.executable, "-m", "smallscale.cli"]
TINY_RUN = ["model.preset=null", "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
            "train.steps=2", "train.global_batch_tokens=256", "train.micro_batch=8", "train.precision=fp32"]  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A prepared dataset of 58,505 train tokens (BPE 300, uint16) in one train shard."""
    tmp = tmp_path_factory.mktemp("pristine")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(synthetic_docs(1500, seed=1)), encoding="utf-8")
    prepare(PrepareConfig(source=str(corpus), out=str(tmp / "ds"), split_by="line", vocab_size=300, workers=1), progress=False)
    return tmp / "ds"


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    """A private copy of `pristine` that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "ds"))


def train_shard(dataset: Path) -> Path:
    return dataset / load_manifest(dataset)["splits"]["train"]["shards"][0]["file"]


def overwrite_tokens(shard: Path, start: int, ids: np.ndarray) -> None:
    """Replace tokens in place: the file keeps its size."""
    with open(shard, "r+b") as f:
        f.seek(start * 2)
        f.write(ids.astype(np.uint16).tobytes())


def train_in_process(dataset: Path, out: Path) -> dict:
    return train(load_run_config(None, [f"data.path={dataset}", f"out={out}", *TINY_RUN]), progress=False)


# --- item 6: corrupted shards are refused -------------------------------------------------------


def test_overwritten_tokens_of_unchanged_size_make_training_refuse_with_the_sha256_message(dataset, tmp_path):
    read_split(dataset, "train")  # verified once: the overwrite below must still be noticed
    shard = train_shard(dataset)
    size = shard.stat().st_size
    overwrite_tokens(shard, 20_000, np.random.default_rng(0).integers(3, 300, 20_000))
    assert shard.stat().st_size == size
    proc = cli("train", f"data.path={dataset}", f"out={tmp_path / 'run'}", *TINY_RUN, "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "train-00000.bin" in lines[0] and "sha256" in lines[0] and "--force" in lines[0], lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("truncate", "holds 40,000 tokens but the manifest says 58,505"),
        ("odd_size", "not a whole number of 2-byte uint16 tokens"),
        ("delete", "is missing"),
    ],
)
def test_a_shard_of_the_wrong_size_makes_training_refuse(dataset, tmp_path, damage, words):
    shard = train_shard(dataset)
    if damage == "truncate":
        os.truncate(shard, 40_000 * 2)
    elif damage == "odd_size":
        with open(shard, "ab") as f:
            f.write(b"\x01")
    else:
        shard.unlink()
    with pytest.raises(UserError, match=words) as info:
        train_in_process(dataset, tmp_path / "run")
    assert "train-00000.bin" in str(info.value) and "--force" in str(info.value)


def test_token_ids_outside_the_vocabulary_make_training_refuse(dataset, tmp_path):
    shard = train_shard(dataset)
    overwrite_tokens(shard, 30_000, np.full(10, 300))  # vocab_size 300: ids 0-299
    manifest = json.loads((dataset / "manifest.json").read_text())
    # A manifest that agrees with the bad file (say, written for another tokenizer): only the ids are wrong.
    manifest["splits"]["train"]["shards"][0]["sha256"] = shards_mod.sha256_file(shard)
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="holds token id 300, outside the vocabulary of 300 ids"):
        train_in_process(dataset, tmp_path / "run")


def test_a_damaged_val_shard_makes_evaluation_refuse(dataset):
    val = dataset / load_manifest(dataset)["splits"]["val"]["shards"][0]["file"]
    overwrite_tokens(val, 100, np.arange(3, 103))
    with pytest.raises(UserError, match="val-00000.bin .* sha256"):
        read_split(dataset, "val")


def test_a_verified_dataset_is_not_hashed_again_until_a_shard_changes(dataset, monkeypatch):
    scanned = []
    real = shards_mod._scan_shard
    monkeypatch.setattr(shards_mod, "_scan_shard", lambda path, dtype: scanned.append(path.name) or real(path, dtype))
    read_split(dataset, "train")
    read_split(dataset, "train")
    read_split(dataset, "train")
    assert scanned == ["train-00000.bin"]
    os.utime(train_shard(dataset), ns=(1, 1))  # a new modification time: the content may have changed
    read_split(dataset, "train")
    assert scanned == ["train-00000.bin", "train-00000.bin"]


def test_a_read_only_dataset_is_verified_on_every_open_without_error(dataset, monkeypatch):
    def refuse(path, obj):
        raise PermissionError(13, "Read-only file system", str(path))

    (dataset / shards_mod.VERIFIED_FILE).unlink(missing_ok=True)
    monkeypatch.setattr(shards_mod, "atomic_write_json", refuse)
    scanned = []
    real = shards_mod._scan_shard
    monkeypatch.setattr(shards_mod, "_scan_shard", lambda path, dtype: scanned.append(path.name) or real(path, dtype))
    assert sum(len(a) for a in read_split(dataset, "train")) == 58_505
    assert sum(len(a) for a in read_split(dataset, "train")) == 58_505
    assert scanned == ["train-00000.bin", "train-00000.bin"]
    assert not (dataset / shards_mod.VERIFIED_FILE).exists()


def test_data_verify_prints_one_ok_line_for_an_intact_dataset(dataset):
    proc = cli("data", "verify", dataset)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"OK {dataset}") and "62,429 tokens" in lines[0], lines


def test_data_verify_prints_one_line_per_damaged_file_and_exits_1(dataset):
    os.truncate(train_shard(dataset), 1000)
    overwrite_tokens(dataset / "val-00000.bin", 10, np.arange(3, 13))
    (dataset / "tokenizer.json").write_text((dataset / "tokenizer.json").read_text() + " ")
    proc = cli("data", "verify", dataset)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"{dataset / 'tokenizer.json'}: ") and "sha256" in lines[0]
    assert lines[1].startswith(f"{dataset / 'train-00000.bin'}: holds 500 tokens but the manifest says 58,505")
    assert lines[2].startswith(f"{dataset / 'val-00000.bin'}: has sha256 ")


def test_data_verify_ignores_the_verified_cache(dataset):
    read_split(dataset, "train")
    shard = train_shard(dataset)
    stat = shard.stat()
    overwrite_tokens(shard, 5, np.arange(3, 13))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # hide the edit from the size/mtime key
    proc = cli("data", "verify", dataset)
    assert proc.returncode == 1 and "train-00000.bin: has sha256" in proc.stdout, proc.stdout


def test_a_malformed_manifest_is_a_one_line_error(dataset):
    (dataset / "manifest.json").write_text('{"format_version": 1, "splits": ')
    proc = cli("data", "verify", dataset)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(error_lines(proc)) == 1 and "not valid JSON" in proc.stderr


# --- item 7: `data prepare` into an existing folder ---------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_docs(1500, seed=1)), encoding="utf-8")
    return path


def prep(corpus: Path, out: Path, **options) -> dict:
    options = {"split_by": "line", "workers": 1, **options}
    return prepare(PrepareConfig(source=str(corpus), out=str(out), **options), progress=False)


def test_another_vocab_size_into_a_finished_dataset_is_refused_naming_the_setting(corpus, tmp_path):
    first = prep(corpus, tmp_path / "ds", vocab_size=300)
    with pytest.raises(UserError, match=r"other settings \(vocab_size: 300 -> 1000\); pass --force"):
        prep(corpus, tmp_path / "ds", vocab_size=1000)
    assert load_manifest(tmp_path / "ds") == first


def test_the_same_settings_reuse_the_finished_dataset_without_work(corpus, tmp_path, monkeypatch):
    first = prep(corpus, tmp_path / "ds", vocab_size=300)
    monkeypatch.setattr(shards_mod, "train_tokenizer", None)  # any work would now fail
    monkeypatch.setattr(shards_mod, "_encode_part", None)
    assert prep(Path(os.path.relpath(corpus)), tmp_path / "ds", vocab_size=300, workers=2) == first


def test_force_rebuilds_with_the_new_settings(corpus, tmp_path):
    prep(corpus, tmp_path / "ds", vocab_size=300)
    cfg = PrepareConfig(source=str(corpus), out=str(tmp_path / "ds"), split_by="line", workers=1, vocab_size=1000)
    rebuilt = prepare(cfg, progress=False, force=True)
    assert rebuilt["vocab_size"] > 300 and rebuilt["config"]["vocab_size"] == 1000
    assert load_manifest(tmp_path / "ds")["tokenizer"]["sha256"] == shards_mod.sha256_file(tmp_path / "ds" / "tokenizer.json")
    assert sum(len(a) for a in read_split(tmp_path / "ds", "train")) == rebuilt["splits"]["train"]["tokens"]


def test_an_edited_corpus_at_the_same_path_is_refused(corpus, tmp_path):
    prep(corpus, tmp_path / "ds", vocab_size=300)
    corpus.write_text("\n".join(synthetic_docs(1500, seed=2)), encoding="utf-8")
    with pytest.raises(UserError, match="source files .*changed"):
        prep(corpus, tmp_path / "ds", vocab_size=300)


def test_an_unfinished_attempt_with_other_settings_does_not_lend_its_tokenizer(corpus, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(shards_mod, "_merge", crash)
    with pytest.raises(RuntimeError):
        prep(corpus, tmp_path / "ds", vocab_size=300)
    assert (tmp_path / "ds" / "tokenizer.json").exists() and not (tmp_path / "ds" / "manifest.json").exists()
    monkeypatch.undo()
    manifest = prep(corpus, tmp_path / "ds", vocab_size=1000)
    assert manifest["vocab_size"] > 300  # the 300-entry tokenizer of the killed run was not reused


def test_another_tokenizer_file_into_a_finished_dataset_is_refused(corpus, tmp_path):
    prep(corpus, tmp_path / "a", vocab_size=300)
    prep(corpus, tmp_path / "b", vocab_size=400)
    prep(corpus, tmp_path / "ds", tokenizer=str(tmp_path / "a" / "tokenizer.json"))
    with pytest.raises(UserError, match="tokenizer file content"):
        prep(corpus, tmp_path / "ds", tokenizer=str(tmp_path / "b" / "tokenizer.json"))


def test_force_with_the_datasets_own_tokenizer_file_keeps_it_and_leaves_no_stale_shard(corpus, tmp_path):
    first = prep(corpus, tmp_path / "ds", vocab_size=300, shard_tokens=10_000)
    assert len(first["splits"]["train"]["shards"]) == 6
    cfg = PrepareConfig(source=str(corpus), out=str(tmp_path / "ds"), split_by="line", workers=1,
                        tokenizer=str(tmp_path / "ds" / "tokenizer.json"))  # fmt: skip
    again = prepare(cfg, progress=False, force=True)
    assert again["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    assert sorted(p.name for p in (tmp_path / "ds").glob("*.bin")) == ["train-00000.bin", "val-00000.bin"]


def test_cli_prepare_refuses_other_settings_reuses_the_same_and_rebuilds_with_force(corpus, tmp_path):
    out = tmp_path / "ds"
    base = ["data", "prepare", corpus, "--out", out, "--split-by", "line", "--workers", "1"]
    assert cli(*base, "--vocab-size", "300").returncode == 0
    refused = cli(*base, "--vocab-size", "1000")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    lines = error_lines(refused)
    assert len(lines) == 1 and "vocab_size: 300 -> 1000" in lines[0] and "--force" in lines[0], lines
    reused = cli(*base, "--vocab-size", "300")
    assert reused.returncode == 0 and "reusing" in reused.stderr, reused.stderr
    forced = cli(*base, "--vocab-size", "1000", "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_manifest(out)["config"]["vocab_size"] == 1000 and load_manifest(out)["vocab_size"] > 300


def test_a_study_prepares_a_source_dataset_once_and_then_only_reads_it(corpus, tmp_path, monkeypatch):
    import yaml

    from smallscale.study.executors import plan

    spec = {
        "name": "tiny",
        "datasets": {"syn": {"source": str(corpus), "split_by": "line", "vocab_size": 300, "workers": 1}},
        "base": {"model": {"preset": "cpu-500k", "seq_len": 32}, "train": {"global_batch_tokens": 256, "micro_batch": 8}},
        "grid": {"train.steps": [2]},
    }
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec), encoding="utf-8")
    plan(study, tmp_path / "s", progress=False)
    manifest = load_manifest(tmp_path / "s" / "data" / "syn")
    monkeypatch.setattr(shards_mod, "prepare", None)  # a second plan must not prepare again
    plan(study, tmp_path / "s", progress=False)
    assert load_manifest(tmp_path / "s" / "data" / "syn") == manifest


# --- item 8: a NUL byte anywhere in a text file -------------------------------------------------


def text_with_nul_at(offset: int) -> bytes:
    lines = b"".join(f"line {i} of plain text\n".encode() for i in range(2000))
    assert len(lines) > offset + 100
    return lines[:offset] + b"\0" + lines[offset + 1 :]


def test_a_nul_after_the_first_8_kib_of_a_named_file_is_an_error_naming_the_offset(tmp_path):
    (tmp_path / "late.txt").write_bytes(text_with_nul_at(20_000))
    with pytest.raises(UserError, match=r"late.txt has a NUL byte at byte offset 20,000 "):
        prep(tmp_path / "late.txt", tmp_path / "ds", vocab_size=300, part_bytes=4096)


def test_a_nul_after_the_first_8_kib_of_a_file_in_a_folder_is_an_error(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(synthetic_docs(300)), encoding="utf-8")
    (folder / "late.txt").write_bytes(text_with_nul_at(20_000))
    with pytest.raises(UserError, match=r"late.txt has a NUL byte at byte offset 20,000 "):
        prepare(PrepareConfig(source=str(folder), out=str(tmp_path / "ds"), vocab_size=300, workers=1), progress=False)


def test_a_nul_found_in_a_worker_process_is_the_same_one_line_error(tmp_path, pristine):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(synthetic_docs(300)), encoding="utf-8")
    (folder / "late.txt").write_bytes(text_with_nul_at(20_000))
    with pytest.raises(UserError, match=r"late.txt has a NUL byte at byte offset 20,000 "):
        prep(folder, tmp_path / "ds", tokenizer=str(pristine / "tokenizer.json"), workers=2)  # no tokenizer training


def test_a_compressed_file_is_sniffed_for_nul_bytes_like_a_plain_one(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(synthetic_docs(300)), encoding="utf-8")
    (folder / "archive.tar.gz").write_bytes(gzip.compress(b"a.txt" + b"\0" * 500 + b"more\n" * 100))  # binary: skipped
    manifest = prep(folder, tmp_path / "ds", vocab_size=300)
    assert manifest["documents_read"] == 300
    (folder / "late.txt.gz").write_bytes(gzip.compress(text_with_nul_at(20_000)))
    with pytest.raises(UserError, match=r"late.txt.gz has a NUL byte at byte offset 20,000 of its decompressed content"):
        prep(folder, tmp_path / "ds2", vocab_size=300)
