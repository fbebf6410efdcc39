"""Translation (mafand_en_sw, mafand_sw_en): the pair format and its loss mask, fine-tuning, scoring
with sacrebleu, and the task end to end on the real files and from the command line.

Fine-tuning is checked on a synthetic language pair a tiny GPT learns in seconds: "Swahili" is the
English sentence with every word reversed, so the target is a function of the prompt."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from smallscale.data.tokenizer import train_tokenizer
from smallscale.errors import UserError
from smallscale.eval.tasks.translation import (
    IGNORE,
    PAD_ID,
    TRANSLATION_TASKS,
    Pair,
    TranslationConfig,
    corpus_scores,
    encode_pair,
    encode_prompts,
    finetune_translation,
    lm_batch,
    load_pairs,
    run_translation,
    tokenizer_coverage,
)
from smallscale.model.gpt import GPT, GPTConfig
from tests.conftest import WORDS
from tests.test_generation_metrics import perturb, sacrebleu_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EN_SW = TRANSLATION_TASKS["mafand_en_sw"]
CLI = [sys.executable, "-m", "smallscale.cli"]


def reversed_words(n: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        pairs.append(Pair(" ".join(words), " ".join(w[::-1] for w in words), i))
    return pairs


@pytest.fixture(scope="module")
def toy():
    pairs = reversed_words(400, seed=0)
    texts = [f"English: {p.source}\nSwahili: {p.reference}" for p in pairs]
    tokenizer = train_tokenizer(texts, "bpe", 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, seq_len=64, n_layer=1, n_head=2, d_model=32))
    return model, tokenizer, pairs


# ---- format and loss mask ----------------------------------------------------------------------


def test_a_pair_is_one_document_prompt_then_target_then_eos(toy):
    _, tokenizer, _ = toy
    eos = tokenizer.token_to_id("<|eos|>")
    prompt, target = encode_pair(tokenizer, EN_SW, "the cat sat", "eht tac tas")
    assert prompt[0] == eos and target[-1] == eos and eos not in prompt[1:] + target[:-1]
    assert tokenizer.decode(prompt[1:]) == "English: the cat sat\nSwahili:"
    assert tokenizer.decode(target[:-1]) == " eht tac tas"
    sw_en = encode_pair(tokenizer, TRANSLATION_TASKS["mafand_sw_en"], "eht tac", "the cat")
    assert tokenizer.decode(sw_en[0][1:]) == "Swahili: eht tac\nEnglish:"


def test_the_prompt_translated_is_the_prompt_trained_on_and_a_long_source_is_cut(toy):
    _, tokenizer, _ = toy
    prompts, source_tokens, n_cut = encode_prompts(tokenizer, EN_SW, ["the cat sat", "a " * 40], max_source_tokens=8)
    assert prompts[0] == encode_pair(tokenizer, EN_SW, "the cat sat", "x", max_source_tokens=8)[0]
    assert source_tokens[1] == 8 and n_cut == 1
    assert tokenizer.decode(prompts[1]).endswith("a a a\nSwahili:")


def test_loss_targets_are_the_target_tokens_only():
    # prompt 5 6 7, target 8 9 2 (EOS); a shorter pair pads with 0 and ignores the padding
    inputs, targets = lm_batch([([5, 6, 7], [8, 9, 2]), ([5, 6], [8, 2])])
    assert inputs.tolist() == [[5, 6, 7, 8, 9], [5, 6, 8, PAD_ID, PAD_ID]]
    assert targets.tolist() == [[IGNORE, IGNORE, 8, 9, 2], [IGNORE, 8, 2, IGNORE, IGNORE]]


def test_the_model_loss_is_the_mean_over_target_tokens(toy):
    model, _, _ = toy
    examples = [([2, 40, 41, 42], [50, 51, 2]), ([2, 40, 43], [52, 2])]
    inputs, targets = lm_batch(examples)
    logprobs = model(inputs).logits.log_softmax(-1)
    expected = -torch.stack([logprobs[0, 3, 50], logprobs[0, 4, 51], logprobs[0, 5, 2], logprobs[1, 2, 52], logprobs[1, 3, 2]]).mean()
    torch.testing.assert_close(model(inputs, targets).loss, expected)


# ---- fine-tuning -------------------------------------------------------------------------------


def test_finetuning_learns_a_toy_language_pair_and_leaves_the_model_alone(toy):
    model, tokenizer, pairs = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, record = finetune_translation(model, tokenizer, EN_SW, pairs, TranslationConfig(steps=150, lr=3e-3, max_len=64))
    assert record["steps"] == 150 and record["n_train"] == 400 and record["epochs"] == pytest.approx(6.0)
    examples = [encode_pair(tokenizer, EN_SW, p.source, p.reference) for p in pairs]
    with torch.no_grad():
        untrained, trained = (m(*lm_batch(examples)).loss.item() for m in (model, tuned))
    assert untrained > 5.0 and trained < 0.4 * untrained and record["train_loss"] < 0.4 * untrained  # nats per target token
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not tuned.training


def test_finetuning_is_deterministic_given_the_seed(toy):
    model, tokenizer, pairs = toy
    cfg = TranslationConfig(steps=5, max_len=64)
    runs = [finetune_translation(model, tokenizer, EN_SW, pairs, cfg, seed=s) for s in (0, 0, 1)]
    (first, first_record), (again, again_record), (_, other_record) = runs
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    assert first_record["train_loss"] == again_record["train_loss"] != other_record["train_loss"]


def test_pairs_longer_than_max_len_are_left_out_and_counted(toy):
    model, tokenizer, pairs = toy
    long = Pair(" ".join(["cat"] * 40), " ".join(["tac"] * 40), 0)
    _, record = finetune_translation(model, tokenizer, EN_SW, [*pairs[:10], long], TranslationConfig(steps=1, max_len=64))
    assert (record["n_train"], record["n_train_too_long"]) == (10, 1)


def test_coverage_counts_characters_and_words_per_token(toy):
    _, tokenizer, _ = toy
    cov = tokenizer_coverage(tokenizer, ["the cat", "a dog sat"])
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in ["the cat", "a dog sat"])
    assert cov == {"chars_per_token": 16 / tokens, "tokens_per_word": tokens / 5}


# ---- scoring -----------------------------------------------------------------------------------


def test_corpus_scores_match_the_sacrebleu_command_line(tmp_path):
    rng = random.Random(1)
    refs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(60)]
    hyps = [perturb(r, rng) for r in refs]
    (tmp_path / "ref.txt").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    ours = corpus_scores(hyps, refs)
    cli = sacrebleu_cli(tmp_path / "ref.txt", tmp_path / "hyp.txt", "-m", "bleu", "chrf")
    cli_pp = sacrebleu_cli(tmp_path / "ref.txt", tmp_path / "hyp.txt", "-m", "chrf", "--chrf-word-order", "2")
    assert (round(ours["bleu"], 4), round(ours["chrf"], 4), round(ours["chrfpp"], 4)) == (
        cli["BLEU"]["score"], cli["chrF2"]["score"], cli_pp["chrF2++"]["score"]
    )
    assert ours["signatures"] == {
        "bleu": cli["BLEU"]["signature"], "chrf": cli["chrF2"]["signature"], "chrfpp": cli_pp["chrF2++"]["signature"]
    }
    assert 10 < ours["bleu"] < 90


# ---- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"learning_rate": 1e-3}, "learning_rate"),
        ({"beam_size": 0}, "beam_size=0"),
        ({"eval_sets": ["wmt"]}, "eval_sets"),
        ({"max_source_tokens": 60}, "max_source_tokens=60"),
    ],
)
def test_bad_settings_are_user_errors(toy, kwargs, message):
    model, tokenizer, _ = toy
    with pytest.raises(UserError, match=message):
        run_translation("mafand_en_sw", model, tokenizer, **kwargs)


def test_unknown_direction_is_a_user_error(toy):
    model, tokenizer, _ = toy
    with pytest.raises(UserError, match="mafand_en_fr"):
        run_translation("mafand_en_fr", model, tokenizer)


# ---- real files --------------------------------------------------------------------------------


@pytest.mark.data
def test_pairs_are_aligned_and_counted_as_provenance_states():
    counts = {s: len(load_pairs(EN_SW, s)) for s in ("mafand_train", "mafand_test", "flores_devtest")}
    assert counts == {"mafand_train": 30_782, "mafand_test": 1_835, "flores_devtest": 1_012}
    first = load_pairs(TRANSLATION_TASKS["mafand_sw_en"], "flores_devtest")[0]
    assert first.source.startswith('"Sasa tuna panya') and first.source.endswith("aliongeza.")  # trailing space stripped
    assert first.reference.startswith('"We now have 4-month-old mice')


def tiny_mafand_run(out) -> dict:
    """The task end to end on a tiny random model with a tokenizer of MAFAND text: 4 sentences per
    set, 2 training steps, short outputs."""
    train = load_pairs(EN_SW, "mafand_train")[:1500]
    tokenizer = train_tokenizer([p.source for p in train] + [p.reference for p in train], "bpe", 500)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=500, seq_len=256, n_layer=1, n_head=2, d_model=32))
    options = {"steps": 2, "batch_size": 4, "beam_size": 2, "max_new_ratio": 0.25, "max_new_extra": 2}
    return run_translation("mafand_en_sw", model, tokenizer, limit=4, limit_train=40, seed=3, out_dir=out, **options)


@pytest.fixture(scope="module")
def mafand_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt")
    return tiny_mafand_run(out), out


@pytest.mark.data
def test_the_task_runs_end_to_end_and_records_how_it_was_made(mafand_result):
    result, out = mafand_result
    assert (result["task"], result["source_language"], result["target_language"], result["n"]) == ("mafand_en_sw", "en", "sw", 4)
    assert result["steps"] == 2 and result["n_train"] + result["n_train_too_long"] == 40
    for corpus_set in ("mafand_test", "flores_devtest"):
        for decoding in ("greedy", "beam"):
            scores = result["results"][corpus_set][decoding]
            assert {"bleu", "chrf", "chrfpp", "mean_new_tokens", "ended_at_eos", "seconds"} <= set(scores)
            assert scores["signatures"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
            assert scores["signatures"]["chrfpp"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:2|space:no|version:")
    assert result["bleu"] == result["results"]["mafand_test"]["beam"]["bleu"]
    settings = result["settings"]
    assert (settings["seed"], settings["steps"], settings["beam_size"], settings["limit"]) == (3, 2, 2, 4)
    assert settings["format"] == "[EOS]English: {source}\nSwahili: {target}[EOS]"
    assert set(settings["data"]) == {
        f"{folder}/{name}"
        for folder, names in (("mafand-mt-en-swa", ["train.en", "train.swa", "test.en", "test.swa"]),
                              ("flores200-swh-eng", ["eng_Latn.devtest", "swh_Latn.devtest"]))
        for name in names
    }  # fmt: skip
    assert any("subset of 4 sentences" in note for note in result["notes"])
    assert len((out / "mafand_en_sw_samples.jsonl").read_text().splitlines()) == 8


@pytest.mark.data
def test_the_samples_file_rescored_by_the_sacrebleu_command_line_gives_the_result(mafand_result, tmp_path):
    result, out = mafand_result
    samples = [json.loads(line) for line in (out / "mafand_en_sw_samples.jsonl").read_text().splitlines()]
    test = [s for s in samples if s["set"] == "mafand_test"]
    (tmp_path / "ref.txt").write_text("".join(s["reference"] + "\n" for s in test), encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("".join(s["beam"] + "\n" for s in test), encoding="utf-8")
    cli = sacrebleu_cli(tmp_path / "ref.txt", tmp_path / "hyp.txt", "-m", "bleu", "chrf", "--chrf-word-order", "2")
    beam = result["results"]["mafand_test"]["beam"]
    assert (cli["BLEU"]["score"], cli["chrF2++"]["score"]) == (round(beam["bleu"], 4), round(beam["chrfpp"], 4))


@pytest.mark.data
def test_the_same_seed_gives_the_same_translations(mafand_result, tmp_path):
    result, out = mafand_result
    again = tiny_mafand_run(tmp_path)
    assert again["train_loss"] == result["train_loss"]
    assert (tmp_path / "mafand_en_sw_samples.jsonl").read_text() == (out / "mafand_en_sw_samples.jsonl").read_text()


@pytest.mark.data
def test_eval_command_runs_the_task_on_a_run(tiny_dataset, tmp_path):
    from smallscale.train.trainer import load_run_config, train

    run = tmp_path / "run"
    overrides = [f"data.path={tiny_dataset}", f"out={run}", "model.preset=null", "model.n_layer=1", "model.n_head=2",
                 "model.d_model=32", "model.seq_len=256", "train.steps=2", "train.global_batch_tokens=2048",
                 "train.micro_batch=8", "train.precision=fp32"]  # fmt: skip
    train(load_run_config(None, overrides), progress=False)
    options = ["steps=2", "beam_size=2", "max_new_ratio=0.25", "max_new_extra=2", "eval_sets=[mafand_test]", "limit_train=16"]
    proc = subprocess.run([*CLI, "eval", str(run), "--tasks", "mafand_sw_en", "--limit", "3",
                           *[arg for o in options for arg in ("-o", f"mafand_sw_en.{o}")]],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run / "eval" / "mafand_sw_en.json").read_text())
    assert (result["task"], result["n"], result["step"], result["settings"]["eval_sets"]) == ("mafand_sw_en", 3, 2, ["mafand_test"])
    assert any("Swahili into short pieces" in note for note in result["notes"])  # the run's tokenizer saw synthetic English only
    assert len((run / "eval" / "mafand_sw_en_samples.jsonl").read_text().splitlines()) == 3
