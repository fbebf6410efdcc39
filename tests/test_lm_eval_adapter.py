"""lm-evaluation-harness adapter: `lm_eval` evaluates a run in-process and gets smallscale's numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from conftest import synthetic_docs  # noqa: E402
from smallscale.errors import UserError  # noqa: E402
from smallscale.eval.generate import generate_text  # noqa: E402
from smallscale.eval.lm_eval_adapter import SmallscaleLM  # noqa: E402
from smallscale.eval.scoring import loglikelihood, pick  # noqa: E402
from smallscale.train.trainer import load_run_config, train  # noqa: E402

# Sentences in the training vocabulary, with one right ending and two wrong ones.
ITEMS = [
    {"question": "The cat sat on the", "choices": ["mat.", "blue", "heard ran"], "answer": 0},
    {"question": "A dog ran under a", "choices": ["sang the", "tree.", "and and"], "answer": 1},
    {"question": "The bird sang and then", "choices": ["mat mat", "the a", "ran."], "answer": 2},
    {"question": "A big red", "choices": ["dog sat.", "on under", "the then"], "answer": 0},
    {"question": "The small blue bird", "choices": ["a the", "sang.", "under on"], "answer": 1},
    {"question": "Then the dog saw a", "choices": ["heard", "and", "cat."], "answer": 2},
    {"question": "A cat heard the", "choices": ["bird.", "a a", "on"], "answer": 0},
    {"question": "The tree", "choices": ["the the", "was big.", "under a"], "answer": 1},
]


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm-eval") / "run"
    overrides = [
        f"data.path={tiny_dataset}", f"out={out}", "model.preset=null", "model.n_layer=2", "model.n_head=2",
        "model.d_model=32", "model.seq_len=32", "train.steps=20", "train.global_batch_tokens=512",
        "train.micro_batch=8", "train.precision=fp32", "train.eval_batch=8", "optim.lr=3e-3",
    ]  # fmt: skip
    train(load_run_config(None, overrides), progress=False)
    return out


@pytest.fixture(scope="module")
def lm(run_dir) -> SmallscaleLM:
    return SmallscaleLM(pretrained=str(run_dir), device="cpu", batch_size=4)


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=a, idx=0) for a in args]


def test_simple_evaluate_accuracy_equals_smallscale_scoring(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    (tmp_path / "toy.yaml").write_text(
        f"""
task: smallscale_toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf-cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
        encoding="utf-8",
    )
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="smallscale", model_args=f"pretrained={lm.run.run_dir},device=cpu,batch_size=4",
        tasks=["smallscale_toy_choice"], task_manager=tasks, bootstrap_iters=0,
    )  # fmt: skip
    acc = out["results"]["smallscale_toy_choice"]["acc,none"]

    scores = loglikelihood(lm.model, lm.tokenizer, [(it["question"], " " + c) for it in ITEMS for c in it["choices"]])
    logprobs = [[s.logprob for s in scores[3 * i : 3 * i + 3]] for i in range(len(ITEMS))]
    expected = sum(pick(lp, it["choices"]) == it["answer"] for lp, it in zip(logprobs, ITEMS)) / len(ITEMS)
    assert acc == expected
    assert 0 < expected < 1  # a comparison that a constant answer would fail
    assert out["config"]["step"] == 20


def test_loglikelihood_matches_scoring(lm):
    pairs = [("The cat sat on the", " mat."), ("", "A dog ran."), ("Then ", "the bird sang.")]
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    want = [(r.logprob, r.is_greedy) for r in loglikelihood(lm.model, lm.tokenizer, pairs)]
    assert got == want


def test_loglikelihood_rolling_follows_lm_eval_windows(lm):
    """The sum lm-eval's own window rule gives, scored with plain forwards of the model."""
    text = " ".join(synthetic_docs(4, seed=5))
    ids = lm.tokenizer.encode(text).ids
    eos = lm.tokenizer.token_to_id("<|eos|>")
    assert len(ids) > 2 * 32  # several windows, the last partly re-reading context
    expected = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, eos, 32, 1)):
        window = torch.tensor(ctx + cont)
        with torch.no_grad():
            logprobs = lm.model(window[None, :-1]).logits[0].log_softmax(-1)
        targets = window[1:]
        expected += logprobs[-len(cont) :].gather(-1, targets[-len(cont) :, None]).sum().item()

    short = "The cat sat."
    got, got_short, got_empty = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,), (short,), ("",)))
    assert got == pytest.approx(expected, rel=1e-5)
    assert got_short == pytest.approx(loglikelihood(lm.model, lm.tokenizer, [("", short)])[0].logprob, rel=1e-5)
    assert got_empty == 0.0
    assert math.isfinite(got) and got < 0


def test_generate_until_is_greedy_and_stops_at_the_stop_string(lm):
    prompts = ["The cat sat on the", "A dog"]
    full = generate_text(lm.model, lm.tokenizer, prompts, max_new_tokens=12, temperature=0)
    stop = full[0].strip()[:2]  # a string that occurs in the first continuation
    got = lm.generate_until(
        requests("generate_until", (prompts[0], {"until": [stop], "max_gen_toks": 12}), (prompts[1], {"until": [], "max_gen_toks": 12}))
    )
    assert got == [full[0].split(stop, 1)[0], full[1]]


def test_generate_until_keeps_the_end_of_a_long_prompt(lm):
    prompt = " ".join(synthetic_docs(3, seed=7))
    assert len(lm.tokenizer.encode(prompt).ids) > 32
    (text,) = lm.generate_until(requests("generate_until", (prompt, {"until": ["\n\n"]})))  # default budget 256
    assert isinstance(text, str)


def test_unsupported_generation_settings_are_refused(lm):
    with pytest.raises(UserError, match="num_beams"):
        lm.generate_until(requests("generate_until", ("The cat", {"until": ["."], "num_beams": 4})))


def test_a_missing_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SmallscaleLM(pretrained=str(tmp_path / "nope"))

