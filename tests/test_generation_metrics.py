"""Generation metrics: sacrebleu parity with its command line, the diversity measures on known
answers, and `run_generation` end to end on a tiny prepared dataset (fixed length, EOS suppressed)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from smallscale.data.shards import PrepareConfig, prepare
from smallscale.data.tokenizer import eos_id, load_tokenizer
from smallscale.errors import UserError
from smallscale.eval.tasks.generation import (
    distinct_n,
    repetition_rate,
    run_generation,
    self_bleu,
    text_metrics,
)
from smallscale.model.gpt import GPT, GPTConfig
from tests.conftest import SHARED_DATA, synthetic_docs

FLORES_SWH = SHARED_DATA / "flores200-swh-eng" / "swh_Latn.devtest"


def perturb(line: str, rng: random.Random) -> str:
    """A plausible system output: some words dropped, swapped, or misspelt."""
    words = line.split()
    out = []
    for word in words:
        r = rng.random()
        if r < 0.1:
            continue
        if r < 0.2 and len(word) > 3:
            i = rng.randrange(len(word) - 1)
            word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        out.append(word)
    if len(out) > 3 and rng.random() < 0.5:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def sacrebleu_cli(ref_file, hyp_file, *args) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(hyp_file), "-w", "4", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    parsed = json.loads(proc.stdout)
    return {entry["name"]: entry for entry in (parsed if isinstance(parsed, list) else [parsed])}


def flores_references() -> list[str]:
    with open(FLORES_SWH, encoding="utf-8") as f:  # read in place; lines keep their trailing spaces
        return [next(f).rstrip("\n") for _ in range(50)]


@pytest.mark.parametrize(
    "source",
    ["synthetic", pytest.param("flores", marks=pytest.mark.data)],
)
def test_chrf_chrfpp_bleu_match_the_sacrebleu_command_line(source, tmp_path):
    refs = flores_references() if source == "flores" else synthetic_docs(50, seed=3)
    rng = random.Random(0)
    hyps = [perturb(r, rng) for r in refs]
    hyps[7] = ""  # an empty output line is legal and must count
    (tmp_path / "ref.txt").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")

    ours = text_metrics(hyps, refs)
    cli = sacrebleu_cli(tmp_path / "ref.txt", tmp_path / "hyp.txt", "-m", "chrf", "bleu")
    cli_pp = sacrebleu_cli(tmp_path / "ref.txt", tmp_path / "hyp.txt", "-m", "chrf", "--chrf-word-order", "2")

    assert round(ours["chrf"], 4) == cli["chrF2"]["score"]
    assert round(ours["bleu"], 4) == cli["BLEU"]["score"]
    assert round(ours["chrfpp"], 4) == cli_pp["chrF2++"]["score"]
    assert ours["signatures"]["chrf"] == cli["chrF2"]["signature"]
    assert ours["signatures"]["bleu"] == cli["BLEU"]["signature"]
    assert ours["signatures"]["chrfpp"] == cli_pp["chrF2++"]["signature"]
    assert 10 < ours["bleu"] < 90 and ours["chrf"] < ours["chrfpp"] + 5  # a real-ish, non-degenerate set


def test_segments_are_scored_as_single_lines():
    # A line break inside a continuation cannot exist in a segment-per-line file: it becomes a space.
    assert text_metrics(["a cat\nsat on the mat "], ["a cat sat on the mat"])["bleu"] == pytest.approx(100.0)


def test_distinct_n_on_known_examples():
    texts = ["a b c a", "a b"]
    assert distinct_n(texts, 1) == 3 / 6  # a b c a a b: {a, b, c}
    assert distinct_n(texts, 2) == 3 / 4  # (a b) (b c) (c a) | (a b)
    assert distinct_n(["one two three"], 2) == 1.0
    assert distinct_n(["single", ""], 2) is None


def test_repetition_rate_on_known_examples():
    assert repetition_rate(["a b c d a b c d"]) == pytest.approx(1 / 5)  # abcd bcda cdab dabc abcd
    assert repetition_rate(["a b c d e"]) == 0.0
    assert repetition_rate(["a b c d a b c d", "a b c d e", "too short"]) == pytest.approx(0.1)
    assert repetition_rate(["x x x x x x"]) == pytest.approx(2 / 3)  # three 4-grams, all "x x x x"
    assert repetition_rate(["short"]) is None


def test_self_bleu_is_100_for_identical_and_0_for_disjoint_continuations():
    same = ["the cat sat on the mat today"] * 4
    assert self_bleu(same)[0] == pytest.approx(100.0)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue cyan", "cat dog cow pig"]
    assert self_bleu(disjoint)[0] == 0.0
    assert self_bleu(["only one"]) == (None, None)
    metrics = text_metrics(same, same)
    assert metrics["self_bleu"] == pytest.approx(100.0)
    assert "eff:yes" in metrics["signatures"]["self_bleu"]


@pytest.fixture(scope="module")
def ascii_dataset(tmp_path_factory):
    """A prepared dataset of ASCII documents (so decoded token slices concatenate exactly)."""
    tmp = tmp_path_factory.mktemp("gen")
    docs = [d for d in synthetic_docs(1500, seed=2) if d.isascii()]
    (tmp / "corpus.txt").write_text("\n".join(docs), encoding="utf-8")
    out = tmp / "ds"
    source = tmp / "corpus.txt"
    prepare(PrepareConfig(source=str(source), out=str(out), split_by="line", vocab_size=300, workers=1), progress=False)
    return out, docs


def tiny_model(vocab_size: int, seq_len: int = 48) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_head=2, d_model=32))


def test_run_generation_writes_samples_and_scores(ascii_dataset, tmp_path):
    dataset, docs = ascii_dataset
    tok = load_tokenizer(dataset / "tokenizer.json")
    model = tiny_model(tok.get_vocab_size())
    result = run_generation(model, tok, dataset, tmp_path / "a", n_prompts=12, prompt_tokens=8, new_tokens=10, seed=1)

    lines = (tmp_path / "a" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    samples = [json.loads(line) for line in lines]
    assert len(samples) == result["n"] == 12 and result["n_eligible"] >= 12
    assert set(samples[0]) == {"doc_index", "prompt", "continuation", "reference", "new_tokens", "eos_probability", "settings"}
    settings = samples[0]["settings"]
    assert {k: settings[k] for k in ("seed", "temperature", "top_k", "top_p", "max_new_tokens")} == {
        "seed": 1, "temperature": 0.8, "top_k": None, "top_p": 0.95, "max_new_tokens": 10,
    }
    assert settings["eos"].startswith("suppressed")
    indices = [s["doc_index"] for s in samples]
    assert indices == sorted(set(indices))
    for s in samples:
        assert any(doc.startswith(s["prompt"] + s["reference"]) for doc in docs)  # true prompt + true next tokens
        assert len(tok.encode(s["prompt"]).ids) == 8 and len(tok.encode(s["reference"]).ids) == 10
        assert s["new_tokens"] == 10 and 0 < s["eos_probability"] < 1
    for key in ("chrf", "chrfpp", "bleu", "distinct_1", "distinct_2", "self_bleu", "repetition_4", "eos_probability", "signatures"):
        assert key in result
    assert list((tmp_path / "a").iterdir()) == [tmp_path / "a" / "samples.jsonl"]  # no temp files left

    again = run_generation(model, tok, dataset, tmp_path / "b", n_prompts=12, prompt_tokens=8, new_tokens=10, seed=1)
    assert (tmp_path / "b" / "samples.jsonl").read_text() == (tmp_path / "a" / "samples.jsonl").read_text()
    assert again["chrf"] == result["chrf"]


def test_a_model_that_wants_to_stop_still_writes_the_reference_length(ascii_dataset, tmp_path):
    # The length confound: a model that puts nearly all its mass on EOS would, free to stop, write
    # nothing and score chrF ~0. Suppressed, it writes exactly new_tokens tokens; its wish to stop
    # shows in eos_probability.
    dataset, _ = ascii_dataset
    tok = load_tokenizer(dataset / "tokenizer.json")
    model = tiny_model(tok.get_vocab_size())
    eos = eos_id(tok)

    def prefer_eos(module, args, output):
        return output._replace(logits=output.logits.index_fill(-1, torch.tensor([eos]), 30.0))

    model.register_forward_hook(prefer_eos)
    result = run_generation(model, tok, dataset, tmp_path, n_prompts=6, prompt_tokens=8, new_tokens=12, seed=0)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["new_tokens"] for s in samples] == [12] * 6  # twelve tokens, none of them EOS
    assert all(s["continuation"] for s in samples)
    assert result["eos_probability"] > 0.99


def test_run_generation_rejects_impossible_requests(ascii_dataset, tmp_path):
    dataset, _ = ascii_dataset
    tok = load_tokenizer(dataset / "tokenizer.json")
    model = tiny_model(tok.get_vocab_size())
    with pytest.raises(UserError, match="context of 48 tokens"):
        run_generation(model, tok, dataset, tmp_path, prompt_tokens=40, new_tokens=10)
    long_context = tiny_model(tok.get_vocab_size(), seq_len=1024)
    with pytest.raises(UserError, match="no val document"):
        run_generation(long_context, tok, dataset, tmp_path, prompt_tokens=1000, new_tokens=8)
