"""Mixtures (`smallscale data mix`, a study's `mix:`): proportions at every prefix, manifest counts,
reproducibility, re-runs, training and per-source evaluation on a mixture, study files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smallscale.data.mixture import TOLERANCE, MixtureConfig, interleave, prepare_mixture
from smallscale.data.shards import load_manifest, read_split, verify_dataset
from smallscale.data.tokenizer import load_tokenizer
from smallscale.errors import UserError
from smallscale.study import grid

from conftest import synthetic_docs

CLI = [sys.executable, "-m", "smallscale.cli"]


# ----------------------------------------------------------------------------- the interleave
def labels_per_token(lengths: list[np.ndarray], picks: np.ndarray) -> np.ndarray:
    """The source of every token of the interleaved stream."""
    cursor = [0] * len(lengths)
    sizes = []
    for s in picks.tolist():
        sizes.append(lengths[s][cursor[s]])
        cursor[s] += 1
    return np.repeat(picks, sizes)


def worst_share_error(labels: np.ndarray, weights: list[float], from_tokens: int) -> float:
    """max over prefixes T >= from_tokens and sources s of |tokens_s(T) / T - w_s|, at every token."""
    positions = np.arange(1, len(labels) + 1)
    worst = 0.0
    for s, w in enumerate(weights):
        share = np.cumsum(labels == s) / positions
        worst = max(worst, float(np.abs(share - w)[max(from_tokens, 1) - 1 :].max(initial=0.0)))
    return worst


def document_lengths(family: str, n: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Stored document lengths (tokens + EOS) of one source: even, skewed, or all alike."""
    if family == "uniform":
        return rng.integers(2, 2 * scale + 2, size=n)
    if family == "lognormal":  # long tail: a few documents 10-20x the median
        return np.clip(rng.lognormal(np.log(scale), 1.0, size=n).astype(np.int64), 2, 20 * scale)
    return np.full(n, scale + 1)


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4),
    families=st.lists(st.sampled_from(["uniform", "lognormal", "constant"]), min_size=4, max_size=4),
    scales=st.lists(st.integers(1, 60), min_size=4, max_size=4),
    sizes=st.lists(st.integers(200, 3000), min_size=4, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_prefix_keeps_the_proportions(weights, families, scales, sizes, seed):
    rng = np.random.default_rng(seed)
    w = [x / sum(weights) for x in weights]
    lengths = [document_lengths(families[s], sizes[s], scales[s], rng) for s in range(len(w))]
    order = interleave(lengths, w)
    labels = labels_per_token(lengths, order.picks)
    counts = np.stack([np.cumsum(labels == s) for s in range(len(w))])  # (k, T): tokens of each source in each prefix
    deviation = np.abs(counts - np.outer(w, np.arange(1, len(labels) + 1)))
    longest = max(int(x[: u].max(initial=0)) for x, u in zip(lengths, order.used))
    # The guarantee, at every token: within (k-1) x the longest document of the weighted share.
    assert deviation.max() <= order.bound_tokens + 1e-6 and order.bound_tokens == (len(w) - 1) * longest
    assert order.max_deviation_tokens == pytest.approx(deviation.max())
    # Every prefix from the recorded position on is within 1 point of each weight, and that position
    # comes no later than the guarantee implies (100 x the bound, plus the document it falls in).
    if order.within_from_tokens is not None:
        assert worst_share_error(labels, w, order.within_from_tokens) <= TOLERANCE + 1e-12  # (a share may sit on it)
        assert order.within_from_tokens <= 100 * order.bound_tokens + longest
    else:
        assert len(labels) < 100 * order.bound_tokens  # so short that even the whole stream may drift by more
    # It stops when the source it needs runs out, having taken a prefix of each source's documents.
    assert order.used[order.exhausted] == len(lengths[order.exhausted])
    assert order.tokens == [int(x[:u].sum()) for x, u in zip(lengths, order.used)]


def test_a_token_cap_stops_at_the_first_document_boundary_past_it():
    lengths = [np.full(1000, 10), np.full(1000, 30)]
    order = interleave(lengths, [0.5, 0.5], max_tokens=6000)
    assert order.exhausted is None and 6000 <= order.total < 6030
    assert order.tokens[0] == pytest.approx(order.tokens[1], abs=30)


# ----------------------------------------------------------------------------- a prepared mixture
def write_sources(folder: Path) -> dict[str, Path]:
    """Three small line corpora with different documents (lengths, words, case)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"plain": synthetic_docs(500, seed=1), "loud": [d.upper() for d in synthetic_docs(300, seed=2)],
             "long": [" ".join(synthetic_docs(6, seed=100 + i)) for i in range(120)]}  # fmt: skip
    paths = {}
    for name, docs in texts.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(docs), encoding="utf-8")
    return paths


def mixture_config(paths: dict[str, Path], out: Path, weights: dict[str, float], **options) -> MixtureConfig:
    sources = {n: {"weight": w, "source": str(paths[n]), "split_by": "line", "val_fraction": 0.1} for n, w in weights.items()}
    return MixtureConfig(sources=sources, out=str(out), **{"vocab_size": 400, "tokenizer_train_bytes": 30_000, "workers": 1, **options})


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    return write_sources(tmp_path_factory.mktemp("corpora"))


@pytest.fixture(scope="module")
def mixed(corpora, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mix") / "m"
    prepare_mixture(mixture_config(corpora, out, {"plain": 0.5, "loud": 0.3, "long": 0.2}), progress=False)
    return out


def source_documents(folder: Path, split: str) -> list[np.ndarray]:
    """The documents (each with its EOS) of a prepared split, in stream order."""
    stream = np.concatenate([np.asarray(a) for a in read_split(folder, split)])
    ends = np.flatnonzero(stream == load_manifest(folder)["eos_id"]) + 1
    return np.split(stream, ends)[:-1]


def expected_stream(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """(tokens, source of each token, each source's documents) of `split` rebuilt from the sources' own splits."""
    manifest = load_manifest(out)
    names = list(manifest["mixture"]["weights"])
    docs = [source_documents(out / "sources" / n, split) for n in names]
    order = interleave([np.array([len(d) for d in ds]) for ds in docs], list(manifest["mixture"]["weights"].values()))
    cursor, tokens = [0] * len(names), []
    for s in order.picks.tolist():
        tokens.append(docs[s][cursor[s]])
        cursor[s] += 1
    return np.concatenate(tokens), labels_per_token([np.array([len(d) for d in ds]) for ds in docs], order.picks), docs


def test_the_train_stream_is_the_sources_documents_interleaved_by_weight(mixed):
    manifest = load_manifest(mixed)
    tokens, labels, _ = expected_stream(mixed, "train")
    written = np.concatenate([np.asarray(a) for a in read_split(mixed, "train")])
    assert np.array_equal(written, tokens)
    weights = list(manifest["mixture"]["weights"].values())
    within = manifest["mixture"]["prefix_tolerance"]["train"]["within_from_tokens"]
    assert within is not None and within < len(tokens)  # the later budgets of this stream are within 1%
    worst = worst_share_error(labels, weights, within)
    assert worst <= TOLERANCE + 1e-12, worst  # every token budget from there on, checked token by token
    stop = manifest["mixture"]["stop"]["train"]  # it stops where the source it needs next has run out
    counts = manifest["splits"]["train"]["sources"]
    assert [n for n, c in counts.items() if c["documents"] == c["available_documents"]] == [stop.split()[1]]


def test_manifest_counts_equal_recounts_per_source(mixed):
    manifest = load_manifest(mixed)
    tok = load_tokenizer(mixed / "tokenizer.json")
    names = list(manifest["mixture"]["weights"])
    for split in ("train", "val"):
        tokens, labels, docs = expected_stream(mixed, split)
        recorded = manifest["splits"][split]
        for s, name in enumerate(names):
            used = docs[s][: recorded["sources"][name]["documents"]]
            texts = tok.decode_batch([d[:-1].tolist() for d in used], skip_special_tokens=False)
            assert recorded["sources"][name]["tokens"] == int((labels == s).sum()) == sum(len(d) for d in used)
            assert recorded["sources"][name]["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
            assert recorded["sources"][name]["words"] == sum(len(t.split()) for t in texts)
        assert recorded["tokens"] == len(tokens) == sum(sh["tokens"] for sh in recorded["shards"])
        assert recorded["documents"] == sum(v["documents"] for v in recorded["sources"].values())
    assert verify_dataset(mixed) == []


def test_the_same_spec_gives_identical_bytes(corpora, mixed, tmp_path):
    again = tmp_path / "again"
    prepare_mixture(mixture_config(corpora, again, {"plain": 0.5, "loud": 0.3, "long": 0.2}), progress=False)
    files = sorted(p.name for p in mixed.iterdir() if p.suffix in (".bin", ".json") and p.name not in ("manifest.json", "verified.json"))
    assert "train-00000.bin" in files and "tokenizer.json" in files
    assert all((mixed / f).read_bytes() == (again / f).read_bytes() for f in files)
    first, second = load_manifest(mixed), load_manifest(again)
    assert first["splits"] == second["splits"] and first["settings"] == second["settings"]


def test_rerun_reuses_refuses_other_settings_and_force_rebuilds(corpora, tmp_path):
    out = tmp_path / "m"
    cfg = mixture_config(corpora, out, {"plain": 1, "loud": 1})
    prepare_mixture(cfg, progress=False)
    shard = out / "train-00000.bin"
    stamp = shard.stat().st_mtime_ns
    prepare_mixture(cfg, progress=False)
    assert shard.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(UserError, match=r"other settings \(source loud: .*'weight': 1\.0.* -> .*'weight': 3\.0.*; weights"):
        prepare_mixture(mixture_config(corpora, out, {"plain": 1, "loud": 3}), progress=False)
    manifest = prepare_mixture(mixture_config(corpora, out, {"plain": 1, "loud": 3}), progress=False, force=True)
    assert manifest["mixture"]["weights"] == {"plain": 0.25, "loud": 0.75}


def test_a_total_beyond_what_the_sources_hold_is_refused(corpora, tmp_path):
    with pytest.raises(UserError, match=r"mixture source '(plain|long)' ran out at [\d,]+ train tokens, short of train_tokens 10,000,000"):
        prepare_mixture(mixture_config(corpora, tmp_path / "m", {"plain": 1, "long": 1}, train_tokens=10_000_000), progress=False)


def test_a_mixture_trains_on_a_budget_and_evaluates_per_source(mixed, tmp_path):
    from smallscale.config import validate
    from smallscale.eval.runs import load_run
    from smallscale.eval.tasks.registry import run_task
    from smallscale.train.trainer import RunConfig, train

    cfg = validate(RunConfig, {"out": str(tmp_path / "run"), "data": {"path": str(mixed), "token_budget": 4096},
                               "model": {"preset": "cpu-500k", "n_layer": 1, "d_model": 32, "n_head": 2, "seq_len": 64},
                               "train": {"tokens": 4096, "global_batch_tokens": 1024, "micro_batch": 16, "eval_batch": 8}})  # fmt: skip
    summary = train(cfg, progress=False)
    assert summary["tokens_seen"] == 4096
    run = load_run(tmp_path / "run", device="cpu")
    result = run_task("heldout_sources", run, limit=10)
    per = result["sources"]
    assert set(per) == {"plain", "loud", "long"} and all(per[n]["documents"] == 10 for n in per)
    assert all(result[f"{n}.bpb"] == per[n]["bpb"] > 0 for n in per)
    pooled = sum(p["bpb"] * p["bytes"] for p in per.values()) / sum(p["bytes"] for p in per.values())
    assert result["bpb"] == pytest.approx(pooled)


def test_heldout_sources_scores_the_same_documents_in_every_mixture(corpora, mixed, tmp_path):
    from smallscale.eval.tasks.heldout_sources import run_heldout_sources
    from smallscale.model.gpt import GPT, GPTConfig

    other = tmp_path / "other"  # shares `plain` with `mixed`, with another partner, weight and tokenizer
    prepare_mixture(mixture_config(corpora, other, {"plain": 0.8, "long": 0.2}, vocab_size=500), progress=False)
    sizes = []
    for folder in (mixed, other):
        model = GPT(GPTConfig(vocab_size=load_manifest(folder)["vocab_size"], seq_len=32, n_layer=1, n_head=2, d_model=16)).eval()
        result = run_heldout_sources(model, load_tokenizer(folder / "tokenizer.json"), folder, max_documents=7)
        sizes.append(result["sources"]["plain"]["bytes"])
    assert sizes[0] == sizes[1] > 0  # the same 7 documents under two tokenizers


def test_heldout_sources_of_a_plain_dataset_is_one_error(tiny_dataset):
    from smallscale.eval.tasks.heldout_sources import run_heldout_sources
    from smallscale.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=512, seq_len=32, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(UserError, match="is not a mixture .* with `heldout` instead"):
        run_heldout_sources(model, None, tiny_dataset)


# ----------------------------------------------------------------------------- command line
def test_data_mix_command_builds_a_verified_dataset_and_names_bad_options(corpora, tmp_path):
    spec = tmp_path / "mix.yaml"
    spec.write_text(yaml.safe_dump({"sources": {"plain": {"weight": 2, "source": str(corpora["plain"]), "split_by": "line"},
                                                "loud": {"weight": 1, "source": str(corpora["loud"]), "split_by": "line"}},
                                    "vocab_size": 400, "tokenizer_train_bytes": 20000}), encoding="utf-8")  # fmt: skip
    made = subprocess.run([*CLI, "data", "mix", str(spec), "-o", str(tmp_path / "m"), "--workers", "1"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert "every prefix of at least" in made.stdout and "holds each source's share within 1%" in made.stdout
    verified = subprocess.run([*CLI, "data", "verify", str(tmp_path / "m")], capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout.startswith("OK")
    spec.write_text(yaml.safe_dump({"sources": {"plain": {"weight": 1, "source": str(corpora["plain"]), "vocab_size": 300}}}))
    bad = subprocess.run([*CLI, "data", "mix", str(spec), "-o", str(tmp_path / "b")], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "'vocab_size' is set for the whole mixture, not per source" in bad.stderr


# ----------------------------------------------------------------------------- study files
def write_study(path: Path, corpora: dict[str, Path], **fields) -> Path:
    spec = {
        "name": "mixes",
        "datasets": {
            "plain": {"source": str(corpora["plain"]), "split_by": "line"},
            "loud": {"source": str(corpora["loud"]), "split_by": "line"},
            "one": {"mix": {"sources": {"plain": 1}, "vocab_size": 400, "tokenizer_train_bytes": 20000}},
            "two": {"mix": {"sources": {"plain": 0.5, "loud": 0.5}, "vocab_size": 400, "tokenizer_train_bytes": 20000}},
        },
        "base": {"model": {"preset": "cpu-500k", "n_layer": 1, "d_model": 32, "n_head": 2, "seq_len": 64},
                 "train": {"global_batch_tokens": 1024, "micro_batch": 16}},
        "grid": {"dataset": ["one", "two"]},
        "derive": {"train.tokens": 4096, "data.token_budget": 4096},
        **fields,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def test_a_study_prepares_its_mixtures_and_only_them(corpora, tmp_path):
    from smallscale.study.executors import plan

    study = write_study(tmp_path / "s.yaml", corpora)
    _, runs = plan(study, tmp_path / "study", progress=False)
    data = tmp_path / "study" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["one", "two"]  # the sources live inside each mixture
    assert sorted(p.name for p in (data / "two" / "sources").iterdir()) == ["loud", "plain"]
    assert {r.dataset for r in runs} == {"one", "two"}
    assert all(Path(r.config["data"]["path"]).parent == data.resolve() for r in runs)
    two = load_manifest(data / "two")
    assert two["mixture"]["weights"] == {"plain": 0.5, "loud": 0.5}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"grid": {"dataset": ["one", "plain"]}}, "dataset 'plain' is a mixture source, so no run can train on it alone"),
        ({"datasets": {"one": {"mix": {"sources": {"nope": 1}}}}}, "mixture source 'nope' is not a dataset of the study"),
        ({"datasets": {"one": {"mix": {"sources": {"plain": -1}}}}}, "sources.plain.weight"),
        ({"datasets": {"one": {"mix": {"sources": {"plain": 1}}, "vocab_size": 400}}}, "put 'vocab_size' inside its `mix:`"),
        ({"datasets": {"one": {"mix": {"sources": {"plain": 1}}, "source": "x"}}}, "exactly one of `path` (prepared), `source` or `mix`"),
    ],
)
def test_study_mixture_mistakes_are_one_line_errors(corpora, tmp_path, change, words):
    study = write_study(tmp_path / "s.yaml", corpora)
    spec = yaml.safe_load(study.read_text())
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if key == "datasets" else value
    study.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(UserError) as info:
        grid.load_study(study)
    assert words in str(info.value) and "\n" not in str(info.value)

