"""Classification: macro-F1, readers of the real files, fine-tuning a head, zero-shot label wiring.

Fine-tuning is checked on a synthetic task that a tiny random GPT can learn in seconds: a text is
positive iff it holds one of GOOD (anywhere among filler words), so the pooled last-token state must
gather it through attention. Zero-shot uses oracle scorers (gold read from the raw files here, not
through the task's reader) so that accuracy must come out exactly 1.0, or 0.0 when flipped.
"""

from __future__ import annotations

import csv
import random

import pytest
import torch

from smallscale.data.tokenizer import train_tokenizer
from smallscale.errors import UserError
from smallscale.eval.scoring import LLResult
from smallscale.eval.tasks import classification
from smallscale.eval.tasks.classification import (
    AFRISENTI_SWA,
    CLASSIFICATION_TASKS,
    Example,
    FinetuneConfig,
    SequenceClassifier,
    encode_inputs,
    finetune,
    load_split,
    macro_f1,
    read_split,
    run_finetune,
    run_zero_shot,
)
from smallscale.model.gpt import GPT, GPTConfig
from tests.conftest import SHARED_DATA, WORDS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD, BAD = ["good", "great", "nice"], ["bad", "awful", "poor"]
CLASSES = ["negative", "positive"]


def separable(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        words.insert(rng.randint(0, len(words)), rng.choice(GOOD if label else BAD))
        examples.append(Example({"text": " ".join(words)}, label))
    return examples


@pytest.fixture(scope="module")
def synthetic():
    train, test = separable(256, seed=1), separable(200, seed=2)
    tokenizer = train_tokenizer([e.fields["text"] for e in train], "bpe", 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, seq_len=64, n_layer=2, n_head=2, d_model=32))
    return model, tokenizer, train, test


# ---- macro-F1 ------------------------------------------------------------------------------------

# gold 0 0 0 0 1 1 1 2 2 2 / predicted 0 0 1 2 1 1 0 2 2 1:
# class 0: TP 2 FP 1 FN 2 -> F1 4/7; class 1: TP 2 FP 2 FN 1 -> 4/7; class 2: TP 2 FP 1 FN 1 -> 2/3
GOLD = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]


def test_macro_f1_equals_hand_computed_value():
    assert macro_f1(PRED, GOLD, 3) == pytest.approx((4 / 7 + 4 / 7 + 2 / 3) / 3)  # 38/63
    metrics = classification.classification_metrics(PRED, GOLD, ["a", "b", "c"])
    assert metrics["accuracy"] == 0.6 and metrics["majority_accuracy"] == 0.4 and metrics["n"] == 10
    assert metrics["f1_per_class"] == pytest.approx({"a": 4 / 7, "b": 4 / 7, "c": 2 / 3})


def test_macro_f1_averages_only_classes_seen_in_gold_or_predictions():
    # class 2 never occurs: F1 of class 0 = 2/3 (TP 1, FN 1), class 1 = 4/5 (TP 2, FP 1)
    assert macro_f1([0, 1, 1, 1], [0, 0, 1, 1], 3) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    assert macro_f1(PRED, GOLD, 3) == pytest.approx(metrics.f1_score(GOLD, PRED, average="macro"))
    assert macro_f1([0, 1, 1, 1], [0, 0, 1, 1], 3) == pytest.approx(metrics.f1_score([0, 0, 1, 1], [0, 1, 1, 1], average="macro"))


# ---- readers -------------------------------------------------------------------------------------

# (task, split, rows, class counts) as PROVENANCE.md states them
COUNTS = [
    ("sst2", "train", 67_349, {"positive": 37_569, "negative": 29_780}),
    ("sst2", "validation", 872, {"positive": 444, "negative": 428}),
    ("sst2", "test", 1_821, {"negative": 917, "positive": 904}),
    ("afrisenti_swa", "train", 1_810, {"neutral": 1_072, "positive": 547, "negative": 191}),
    ("afrisenti_swa", "dev", 453, {"neutral": 268, "positive": 137, "negative": 48}),
    ("afrisenti_swa", "test", 748, {"neutral": 444, "positive": 224, "negative": 80}),
    ("masakhanews_swa", "train", 350, dict.fromkeys(classification._NEWS_TOPICS, 50)),
    ("masakhanews_swa", "dev", 237, {"politics": 50, "sports": 50, "health": 50, "business": 31, "religion": 29, "technology": 17, "entertainment": 10}),
    ("masakhanews_swa", "test", 476, {"health": 100, "politics": 100, "sports": 100, "business": 64, "religion": 59, "technology": 33, "entertainment": 20}),
]


@pytest.mark.data
@pytest.mark.parametrize("name,split,rows,class_counts", COUNTS, ids=[f"{t}-{s}" for t, s, _, _ in COUNTS])
def test_readers_parse_the_provenance_counts(name, split, rows, class_counts):
    task = CLASSIFICATION_TASKS[name]
    examples = read_split(task, split)
    assert len(examples) == rows
    counted = {c: sum(e.label == i for e in examples) for i, c in enumerate(task.classes)}
    assert counted == class_counts
    assert all(e.fields[k] for e in examples for k in e.fields)  # no empty text


@pytest.mark.data
def test_news_text_is_csv_unquoted_and_held_out_split_is_the_documented_one():
    news = read_split(CLASSIFICATION_TASKS["masakhanews_swa"], "test")
    # 282 of the 476 texts are CSV-quoted ("...""...") in the file: unquoted, their inner quotes stay single
    assert sum('"' in e.fields["text"] for e in news) == 282
    assert not any('""' in e.fields["text"] for e in news)
    assert {t.name: t.eval_split for t in CLASSIFICATION_TASKS.values()} == {
        "sst2": "validation", "afrisenti_swa": "test", "masakhanews_swa": "test"
    }


@pytest.mark.data
def test_limit_is_a_fixed_random_subset_not_the_first_rows():
    task = CLASSIFICATION_TASKS["masakhanews_swa"]  # the file is sorted by class
    first = load_split(task, "test", limit=70)
    assert first == load_split(task, "test", limit=70)
    assert len({e.label for e in first}) == 7
    full = read_split(task, "test")
    assert all(e in full for e in first)


# ---- fine-tuning ---------------------------------------------------------------------------------


def test_pooled_state_is_the_last_real_tokens_whatever_the_padding(synthetic):
    model, tokenizer, train, _ = synthetic
    classifier = SequenceClassifier(model, 2, dropout=0.0).eval()
    ids = encode_inputs(tokenizer, [e.fields["text"] for e in train[:6]], max_len=64)
    assert len({len(x) for x in ids}) > 1  # the batch needs padding
    batched = classifier(*classification._batch(ids, torch.device("cpu")))
    alone = torch.cat([classifier(torch.tensor([x]), torch.tensor([len(x)])) for x in ids])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    captured = []
    hook = model.norm_f.register_forward_hook(lambda module, args, out: captured.append(out))
    model(torch.tensor([ids[0]]))
    hook.remove()
    torch.testing.assert_close(classifier.body(torch.tensor([ids[0]])).logits, captured[0])  # the final-norm state


def test_finetuning_learns_a_separable_task_and_leaves_the_model_alone(synthetic):
    model, tokenizer, train, test = synthetic
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = finetune(model, tokenizer, train, test, CLASSES, cfg=FinetuneConfig(max_steps=0))
    after = finetune(model, tokenizer, train, test, CLASSES, cfg=FinetuneConfig(lr=1e-3, epochs=8))
    assert before["steps"] == 0 and 0.3 < before["accuracy"] < 0.7
    assert after["steps"] == 64 and after["accuracy"] > 0.9 and after["macro_f1"] > 0.9
    assert after["n"] == 200 and after["n_train"] == 256
    assert after["settings"]["lr"] == 1e-3 and after["settings"]["seed"] == 0
    assert all(torch.equal(v, before_weights[k]) for k, v in model.state_dict().items())


def test_finetuning_is_deterministic_given_the_seed(synthetic):
    model, tokenizer, train, test = synthetic
    cfg = FinetuneConfig(lr=1e-3, max_steps=6)
    first, again, other = (finetune(model, tokenizer, train, test, CLASSES, cfg=cfg, seed=s) for s in (0, 0, 1))
    assert first == again
    assert first["train_loss"] != other["train_loss"]


def test_select_on_dev_keeps_the_best_dev_epoch(synthetic):
    model, tokenizer, train, test = synthetic
    cfg = FinetuneConfig(lr=1e-3, epochs=3, batch_size=32, select_on_dev=True)
    result = finetune(model, tokenizer, train[:64], test[:50], CLASSES, cfg=cfg, dev=test[50:100])
    assert result["selected_epoch"] in (1, 2, 3) and result["n_dev"] == 50 and 0 <= result["dev_macro_f1"] <= 1
    with pytest.raises(UserError, match="dev split"):
        finetune(model, tokenizer, train, test, CLASSES, cfg=cfg)


def test_unknown_setting_is_a_user_error(synthetic):
    model, tokenizer, _, _ = synthetic
    with pytest.raises(UserError, match="learning_rate"):
        run_finetune("afrisenti_swa", model, tokenizer, learning_rate=1e-4)


@pytest.mark.data
def test_finetuning_on_afrisenti_runs_end_to_end():
    tweets = [e.fields["tweet"] for e in read_split(AFRISENTI_SWA, "train")]
    tokenizer = train_tokenizer(tweets, "bpe", 500)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=500, seq_len=128, n_layer=2, n_head=2, d_model=32))
    result = run_finetune("afrisenti_swa", model, tokenizer, limit_train=200, limit_eval=200, max_steps=5, seed=3)
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
    assert (result["n"], result["n_train"], result["steps"]) == (200, 200, 5)
    settings = result["settings"]
    assert (settings["seed"], settings["eval_split"], settings["max_steps"], settings["batch_size"]) == (3, "test", 5, 32)
    assert set(settings["data"]) == {"train.tsv", "test.tsv"}


# ---- zero-shot -----------------------------------------------------------------------------------

# task -> (labels_language, file under the data root, text column, label column, quoting, label -> answer)
RAW = {
    "sst2": ("en", "sst2/dev.tsv", "sentence", "label", csv.QUOTE_NONE, {"0": "negative", "1": "positive"}),
    "afrisenti_swa": ("sw", "afrisenti-swa/test.tsv", "tweet", "label", csv.QUOTE_NONE, {"negative": "hasi", "neutral": "wastani", "positive": "chanya"}),
    "masakhanews_swa": ("en", "masakhanews-swa/test.tsv", "headline", "category", csv.QUOTE_MINIMAL, None),
}


def gold_answers(name: str) -> dict[str, str]:
    _, path, text_col, label_col, quoting, answer_of = RAW[name]
    csv.field_size_limit(2**31 - 1)
    with open(SHARED_DATA / path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=quoting))
    return {row[text_col].strip(): answer_of[row[label_col]] if answer_of else row[label_col] for row in rows}


@pytest.mark.data
@pytest.mark.parametrize("name", list(RAW))
@pytest.mark.parametrize("flip", [False, True])
def test_zero_shot_predicts_the_class_the_scorer_prefers(name, flip, monkeypatch):
    gold = gold_answers(name)

    def oracle(requests):  # contexts are "Label: {text}\nQuestion:"
        return [LLResult(0.0 if (gold[c.split("\n")[0].split(": ", 1)[1]] == t.strip()) != flip else -1.0, False, 1) for c, t in requests]

    monkeypatch.setattr(classification, "model_scorer", lambda *args, **kwargs: oracle)
    result = run_zero_shot(name, None, None, labels_language=RAW[name][0], limit=None if name == "sst2" else 100)
    assert result["accuracy"] == (0.0 if flip else 1.0)
    assert result["macro_f1"] == (0.0 if flip else 1.0)
    assert result["n"] == (872 if name == "sst2" else 100)


@pytest.mark.data
def test_zero_shot_scores_with_a_real_model(synthetic):
    model, tokenizer, _, _ = synthetic
    result = run_zero_shot("afrisenti_swa", model, tokenizer, limit=20)
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1 and result["n"] == 20
    assert result["settings"]["answers"] == {"negative": " hasi", "neutral": " wastani", "positive": " chanya"}
