"""Zero-shot tasks on the real files: counts, chance level, label wiring; generic specs; run loading.

Oracle scorers stand in for a model: they give the gold answer (read here from the raw files,
independently of the task loaders) the higher log-likelihood, or, flipped, the lower one. Accuracy
must then be exactly 1.0 or 0.0, which proves that labels and choices are paired correctly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from smallscale.data.tokenizer import train_tokenizer
from smallscale.errors import UserError
from smallscale.eval.runs import load_run
from smallscale.eval.scoring import LLResult, Scorer
from smallscale.eval.tasks.generic import evaluate_generic, run_generic
from smallscale.eval.tasks.minimal_pairs import BLIMP_FILES, evaluate_minimal_pairs, load_blimp
from smallscale.eval.tasks.multiple_choice import CHOICE_TASKS, evaluate_choices, load_choice_task
from smallscale.eval.tasks.registry import result_path, run_task, save_result
from smallscale.model.gpt import GPT, GPTConfig
from tests.conftest import SHARED_DATA, synthetic_docs

LIMIT = 20
PARADIGMS = ["adjunct_island", "anaphor_gender_agreement", "wh_island"]


def oracle(is_gold: Callable[[str, str], bool], flip: bool = False) -> Scorer:
    def score(requests):
        return [LLResult(0.0 if is_gold(c, t) != flip else -1.0, False, 1) for c, t in requests]

    return score


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- a run directory written by hand, as the trainer lays it out -----------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    dataset = root / "dataset"
    dataset.mkdir()
    train_tokenizer(synthetic_docs(300), "bpe", 300).save(str(dataset / "tokenizer.json"))
    run = root / "run"
    cfg = GPTConfig(vocab_size=300, seq_len=256, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run / "checkpoints" / "step-00000005").mkdir()  # interrupted: no state.json
    (run / "model.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (run / "config.yaml").write_text(yaml.safe_dump({"out": str(run), "data": {"path": str(dataset)}}))
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(run / "checkpoints" / "step-00000003" / "model.safetensors"))
    (run / "checkpoints" / "step-00000003" / "state.json").write_text(json.dumps({"step": 3}))
    torch.save(model.state_dict(), root / "reference.pt")
    return run


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def test_load_run_takes_the_latest_complete_checkpoint(run, run_dir):
    assert run.step == 3 and run.checkpoint.name == "step-00000003"
    assert not run.model.training
    assert run.tokenizer.token_to_id("<|eos|>") == 2
    reference = GPT(run.model_cfg)
    reference.load_state_dict(torch.load(run_dir.parent / "reference.pt", weights_only=True))
    ids = torch.tensor([[5, 9, 40, 2]])
    assert torch.equal(run.model(ids).logits, reference.eval()(ids).logits)


def test_load_run_errors_name_the_problem(run_dir, tmp_path):
    assert load_run(run_dir, checkpoint="3").step == 3
    with pytest.raises(UserError, match="not a complete checkpoint"):
        load_run(run_dir, checkpoint="5")
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.json").write_text((run_dir / "model.json").read_text())
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_run(empty)


# ---- BLiMP --------------------------------------------------------------------------------------


@pytest.mark.data
def test_blimp_loads_67_paradigms_of_1000_pairs():
    pairs = load_blimp()
    assert len(pairs) == 67_000
    groups = {p.group for p in pairs}
    assert groups == set(BLIMP_FILES) and len(groups) == 67
    assert len({p.phenomenon for p in pairs}) == 13  # as the files label them (12 in the paper + s-selection)
    # 7 pairs of the published files have identical sentences; strict > counts them wrong
    assert sum(p.good == p.bad for p in pairs) == 7


@pytest.mark.data
def test_blimp_oracle_scores_one_and_flipped_zero():
    good = {r["sentence_good"] for name in PARADIGMS for r in jsonl(SHARED_DATA / "blimp" / f"{name}.jsonl")}
    pairs = load_blimp(paradigms=PARADIGMS, limit=LIMIT)
    right = evaluate_minimal_pairs(pairs, oracle(lambda c, t: t in good))
    wrong = evaluate_minimal_pairs(pairs, oracle(lambda c, t: t in good, flip=True))
    assert (right["acc"], wrong["acc"], right["n"]) == (1.0, 0.0, 3 * LIMIT)
    assert set(right["by_group"]) == set(PARADIGMS)
    assert all(g == {"acc": 1.0, "n": LIMIT} for g in right["by_group"].values())


@pytest.mark.data
def test_untrained_model_is_near_chance_on_blimp(run):
    # 5 pairs from each paradigm: an untrained model's accuracy is systematic within a paradigm
    # (it mostly prefers the sentence with fewer tokens), so sample across all of them
    result = run_task("blimp", run, limit=5)
    assert result["n"] == 335 and len(result["by_paradigm"]) == 67 and len(result["by_phenomenon"]) == 13
    assert 0.3 < result["acc"] < 0.7
    assert result["settings"]["limit_per_paradigm"] == 5


# ---- multiple choice ------------------------------------------------------------------------------


def _gold_hellaswag() -> list[tuple[str, str]]:
    lines = (SHARED_DATA / "hellaswag-val" / "hellaswag_val_full.txt").read_text(encoding="utf-8").splitlines()
    return [(lines[i].strip(), lines[i + 2 + int(lines[i + 1])].strip()) for i in range(0, 6 * LIMIT, 6)]


def _gold_piqa() -> list[tuple[str, str]]:
    folder = SHARED_DATA / "piqa"
    labels = (folder / "valid-labels.lst").read_text().split()
    return [(r["goal"], r[f"sol{int(labels[i]) + 1}"]) for i, r in enumerate(jsonl(folder / "valid.jsonl")[:LIMIT])]


def _gold_arc() -> list[tuple[str, str]]:
    records = jsonl(SHARED_DATA / "arc-easy" / "ARC-Easy-Test.jsonl")[:LIMIT]
    return [
        (r["question"]["stem"], next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"]))
        for r in records
    ]


def _gold_winogrande() -> list[tuple[str, str]]:
    # (sentence with the gold option in the blank up to the blank's end, the rest); twin items share
    # their text before the blank, so the rest is needed to tell them apart
    records = jsonl(SHARED_DATA / "winogrande-dev" / "dev.jsonl")[:LIMIT]
    out = []
    for r in records:
        before, after = r["sentence"].split("_")
        out.append((before + r[f"option{r['answer']}"], after.strip()))
    return out


# (question text found in the context, gold answer text) for the first LIMIT items of each task
GOLD = {"hellaswag": _gold_hellaswag, "piqa": _gold_piqa, "arc_easy": _gold_arc, "winogrande": _gold_winogrande}
FULL_COUNTS = {"hellaswag": 10_042, "piqa": 1_838, "arc_easy": 2_376, "winogrande": 1_267}


def _is_gold(task: str, gold: list[tuple[str, str]]) -> Callable[[str, str], bool]:
    if task == "winogrande":  # partial scoring: the option ends the context
        return lambda c, t: any(c == context and t.strip() == rest for context, rest in gold)
    return lambda c, t: any(question in c and t.strip() == answer.strip() for question, answer in gold)


@pytest.mark.data
@pytest.mark.parametrize("task", list(CHOICE_TASKS))
def test_choice_task_counts_and_oracle(task):
    assert len(load_choice_task(CHOICE_TASKS[task])) == FULL_COUNTS[task]
    examples = load_choice_task(CHOICE_TASKS[task], limit=LIMIT)
    is_gold = _is_gold(task, GOLD[task]())
    right = evaluate_choices(examples, oracle(is_gold))
    wrong = evaluate_choices(examples, oracle(is_gold, flip=True))
    assert right["n"] == wrong["n"] == LIMIT
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert (right[metric], wrong[metric]) == (1.0, 0.0), metric


@pytest.mark.data
@pytest.mark.parametrize("task", ["hellaswag", "piqa", "arc_easy", "winogrande"])
def test_registry_runs_each_choice_task_on_a_tiny_model(run, task, tmp_path):
    result = run_task(task, run, limit=LIMIT)
    assert result["task"] == task and result["n"] == LIMIT and result["step"] == 3
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert 0.0 <= result[metric] <= 1.0
    assert result["settings"]["limit"] == LIMIT and result["settings"]["prompt"]
    path = save_result(tmp_path, task, result)
    assert path == tmp_path / "eval" / f"{task}.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(result, allow_nan=False))


# ---- generic tasks from a spec ------------------------------------------------------------------


def _write(tmp_path: Path, spec: dict, records: list[dict], name: str = "task") -> Path:
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"data": f"{name}.jsonl", **spec}))
    return path


ANIMALS = [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("duck", "quack")]


def test_generic_multiple_choice_with_label_map(tmp_path, run):
    letters = "ABCD"
    records = [
        {"q": f"What does a {animal} say?", "options": [s for _, s in ANIMALS], "key": letters[i]}
        for i, (animal, _) in enumerate(ANIMALS)
    ]
    spec = _write(
        tmp_path,
        {"type": "multiple_choice", "prompt": "Question: {q}\nAnswer:", "choices_field": "options", "label_field": "key",
         "label_map": {c: i for i, c in enumerate(letters)}},
        records,
    )  # fmt: skip
    says = dict(ANIMALS)
    is_gold = lambda c, t: any(f"a {a} say" in c and t == " " + says[a] for a in says)  # noqa: E731
    assert evaluate_generic(spec, oracle(is_gold))["acc"] == 1.0
    assert evaluate_generic(spec, oracle(is_gold, flip=True))["acc"] == 0.0
    result = run_generic(spec, run.model, run.tokenizer, limit=3)
    assert result["n"] == 3 and result["type"] == "multiple_choice" and result["name"] == "task"
    assert result["chance"] == 0.25


def test_generic_classification_reports_macro_f1(tmp_path):
    records = [{"text": f"{w} film number {i}", "label": int(w == "great")} for i, w in enumerate(["great", "awful"] * 5)]
    spec = _write(
        tmp_path,
        {"type": "classification", "prompt": "Review: {text}\nSentiment:", "label_field": "label",
         "labels": {0: "negative", 1: "positive"}},
        records,
    )  # fmt: skip
    is_gold = lambda c, t: ("great" in c) == (t == " positive")  # noqa: E731
    right = evaluate_generic(spec, oracle(is_gold))
    assert (right["acc"], right["macro_f1"], right["n"]) == (1.0, 1.0, 10)
    assert evaluate_generic(spec, oracle(is_gold, flip=True))["macro_f1"] == 0.0


def test_generic_minimal_pairs_by_group_and_through_the_registry(tmp_path, run):
    records = [
        {"good": "the cats run", "bad": "the cats runs", "kind": "agreement"},
        {"good": "a dog sat", "bad": "a dog sitted", "kind": "morphology"},
        {"good": "the birds sing", "bad": "the birds sings", "kind": "agreement"},
    ]
    spec = _write(tmp_path, {"type": "minimal_pair", "good_field": "good", "bad_field": "bad", "group_field": "kind"}, records)
    good = {r["good"] for r in records}
    right = evaluate_generic(spec, oracle(lambda c, t: c == "" and t in good))
    assert right["acc"] == 1.0 and right["by_group"]["agreement"] == {"acc": 1.0, "n": 2}
    assert evaluate_generic(spec, oracle(lambda c, t: t in good, flip=True))["acc"] == 0.0
    result = run_task(f"generic:{spec}", run)
    assert result["n"] == 3 and 0.0 <= result["acc"] <= 1.0
    assert result_path(run.run_dir, f"generic:{spec}") == run.run_dir / "eval" / "generic-task.json"


def test_generic_spec_errors_are_one_line_user_errors(tmp_path):
    spec = _write(tmp_path, {"type": "multiple_choice", "label_field": "y"}, [{"x": "a"}])
    with pytest.raises(UserError, match="choices_field"):
        evaluate_generic(spec, oracle(lambda c, t: True))
    spec = _write(tmp_path, {"type": "minimal_pair", "good_field": "good", "bad_field": "bad"}, [{"good": "a b"}], "missing")
    with pytest.raises(UserError, match=r"missing\.jsonl:1: the record has no field 'bad'"):
        evaluate_generic(spec, oracle(lambda c, t: True))
    with pytest.raises(UserError, match="unknown task"):
        run_task("hellaswag2", None)
