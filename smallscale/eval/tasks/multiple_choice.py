"""Multiple-choice zero-shot tasks: the model picks the choice it finds most likely.

Each choice is one request `(context, continuation)`; the prediction is the argmax of the summed
log-likelihood (`acc`), of the log-likelihood per character of the choice text (`acc_norm`, as
lm-eval) or per UTF-8 byte (`acc_bytes`); see `smallscale.eval.scoring`. Prompts are those of
lm-evaluation-harness, zero-shot, with its target delimiter " " before every answer:

    hellaswag   "{activity_label}: {ctx}"               -> " {ending}"   (4 endings)
    piqa        "Question: {goal}\\nAnswer:"             -> " {sol}"      (2 solutions)
    arc_easy    "Question: {stem}\\nAnswer:"             -> " {choice}"   (3-5 choices)
    winogrande  "{sentence up to _}{option}"            -> " {rest of sentence after _}"
                (partial scoring: both options share the continuation, so acc_norm = acc)

HellaSwag: the stored copy is klosax's text rendering of the validation split, which already
applied lm-eval's WikiHow cleanup and joined ctx_a and ctx_b as "ctx_a ctx_b"; lm-eval capitalises
ctx_b first. Its cleanup (`hellaswag_preprocess`) is applied again here (a no-op on this file).
"""

from __future__ import annotations

from functools import partial

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from smallscale.data.builtins import BuiltinFile, fetch
from smallscale.errors import UserError
from smallscale.eval.scoring import Request, Scorer, choice_accuracy, model_scorer

DELIMITER = " "  # lm-eval's default target_delimiter, between a prompt and each answer


@dataclass(frozen=True)
class ChoiceExample:
    requests: tuple[Request, ...]  # one (context, continuation) per choice
    choices: tuple[str, ...]  # each choice's answer text, as acc_norm / acc_bytes count it
    gold: int  # index of the correct choice
    id: str


@dataclass(frozen=True)
class ChoiceTask:
    name: str
    hub_id: str  # the same split on the Hugging Face Hub, for users with internet
    folder: str  # under the data root and the cache
    files: tuple[BuiltinFile, ...]
    prompt: str  # the prompt format in words, recorded with every result
    parse: Callable[[list[Path]], Iterator[ChoiceExample]]  # the files, in `files` order -> examples


def _raw(repo: str, commit: str, path: str, sha256: str, size_bytes: int) -> BuiltinFile:
    return BuiltinFile(path.rsplit("/", 1)[-1], sha256, f"https://raw.githubusercontent.com/{repo}/{commit}/{path}", size_bytes)


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as lines:
        for i, line in enumerate(lines):
            if line.strip():
                yield i, json.loads(line)


def _bad(path: Path, line: int, what: str) -> UserError:
    return UserError(f"{path}:{line + 1}: {what}; restore the original file")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup of WikiHow artefacts ("[title]", "[step]", ...)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _parse_hellaswag(paths: list[Path]) -> Iterator[ChoiceExample]:
    # 6 lines per item: "activity_label: ctx", the gold index, then the 4 endings
    (path,) = paths
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise _bad(path, len(lines) - 1, f"{len(lines)} lines is not a whole number of 6-line items")
    for start in range(0, len(lines), 6):
        query = hellaswag_preprocess(lines[start])
        endings = tuple(hellaswag_preprocess(e) for e in lines[start + 2 : start + 6])
        label = lines[start + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise _bad(path, start + 1, f"label {label!r} is not 0-3")
        yield ChoiceExample(tuple((query, DELIMITER + e) for e in endings), endings, int(label), str(start // 6))


def _parse_piqa(paths: list[Path]) -> Iterator[ChoiceExample]:
    questions, labels_path = paths
    labels = labels_path.read_text(encoding="utf-8").split()
    for i, record in _jsonl(questions):
        if i >= len(labels) or labels[i] not in ("0", "1"):
            raise _bad(labels_path, i, "missing or invalid label (want 0 or 1)")
        context = f"Question: {record['goal']}\nAnswer:"
        sols = (record["sol1"], record["sol2"])
        yield ChoiceExample(tuple((context, DELIMITER + s) for s in sols), sols, int(labels[i]), str(i))


def _parse_arc(paths: list[Path]) -> Iterator[ChoiceExample]:
    (path,) = paths
    for i, record in _jsonl(path):
        question = record["question"]
        labels = [c["label"] for c in question["choices"]]
        if record["answerKey"] not in labels:  # keys are letters or, for a few items, digits
            raise _bad(path, i, f"answerKey {record['answerKey']!r} is not one of the labels {labels}")
        context = f"Question: {question['stem']}\nAnswer:"
        texts = tuple(c["text"] for c in question["choices"])
        yield ChoiceExample(tuple((context, DELIMITER + t) for t in texts), texts, labels.index(record["answerKey"]), record["id"])


def _parse_winogrande(paths: list[Path]) -> Iterator[ChoiceExample]:
    (path,) = paths
    for i, record in _jsonl(path):
        sentence = record["sentence"]
        if "_" not in sentence or record["answer"] not in ("1", "2"):
            raise _bad(path, i, "a WinoGrande item needs a '_' blank and answer '1' or '2'")
        blank = sentence.index("_")
        rest = sentence[blank + 1 :].strip()
        options = (record["option1"], record["option2"])
        requests = tuple((sentence[:blank] + option, DELIMITER + rest) for option in options)
        yield ChoiceExample(requests, (rest, rest), int(record["answer"]) - 1, record["qID"])


_KLOSAX = ("klosax/hellaswag_text_data", "1105d370f8340eac3c63a91fd1fa58e8999f9505")
_YBISK = ("ybisk/ybisk.github.io", "21edab439af693b961be2f069e8690a88d3b4e37")
_TEMPORAL_RNNS = ("RazvanDu/TemporalRNNs", "979116de476dc3b1d98198707a2da2caa64c83db")

HELLASWAG = ChoiceTask(
    name="hellaswag",
    hub_id="Rowan/hellaswag (validation)",
    folder="hellaswag-val",
    files=(_raw(*_KLOSAX, "hellaswag_val_full.txt", "d572539320eb2050e858ca34b495bbe2103e3b3f1391a9c3bcdf215b0bb93bd1", 7_770_677),),
    prompt='context "{activity_label}: {ctx}" (lm-eval WikiHow cleanup), continuation " {ending}"',
    parse=_parse_hellaswag,
)
PIQA = ChoiceTask(
    name="piqa",
    hub_id="ybisk/piqa (validation)",
    folder="piqa",
    files=(
        _raw(*_YBISK, "piqa/data/valid.jsonl", "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d", 495_929),
        _raw(*_YBISK, "piqa/data/valid-labels.lst", "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb", 3_676),
    ),
    prompt='context "Question: {goal}\\nAnswer:", continuation " {sol}"',
    parse=_parse_piqa,
)
ARC_EASY = ChoiceTask(
    name="arc_easy",
    hub_id="allenai/ai2_arc ARC-Easy (test)",
    folder="arc-easy",
    files=(
        _raw(*_TEMPORAL_RNNS, "ARC-Easy/ARC-Easy-Test.jsonl", "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be", 895_104),
    ),
    prompt='context "Question: {stem}\\nAnswer:", continuation " {choice text}"',
    parse=_parse_arc,
)
WINOGRANDE = ChoiceTask(
    name="winogrande",
    hub_id="allenai/winogrande winogrande_xl (validation)",
    folder="winogrande-dev",
    files=(
        _raw(*_TEMPORAL_RNNS, "winogrande_1.1/dev.jsonl", "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8", 275_682),
    ),
    prompt='partial scoring: context "{sentence before _}{option}", continuation " {sentence after _}" '
    "(shared by both options, so acc_norm = acc)",
    parse=_parse_winogrande,
)
CHOICE_TASKS: dict[str, ChoiceTask] = {t.name: t for t in (HELLASWAG, PIQA, ARC_EASY, WINOGRANDE)}


def load_choice_task(task: ChoiceTask, data_root: str | Path | None = None, limit: int | None = None) -> list[ChoiceExample]:
    """The first `limit` examples (all by default) of `task`, from the data root, cache or origin."""
    paths = [fetch(task.folder, f.name, f.sha256, f.url, data_root) for f in task.files]
    examples = []
    for example in task.parse(paths):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(example)
    return examples


def score_choices(examples: list[ChoiceExample], score: Scorer) -> list[list[float]]:
    """Every choice's log-likelihood, per example (all requests go to `score` in one call)."""
    results = score([request for example in examples for request in example.requests])
    logprobs, start = [], 0
    for example in examples:
        logprobs.append([r.logprob for r in results[start : start + len(example.requests)]])
        start += len(example.requests)
    return logprobs


def choice_metrics(examples: list[ChoiceExample], logprobs: list[list[float]]) -> dict:
    """acc / acc_norm / acc_bytes (+ standard errors), n, and the chance level, over `examples`."""
    out = choice_accuracy(logprobs, [e.choices for e in examples], [e.gold for e in examples])
    out["chance"] = sum(1 / len(e.choices) for e in examples) / len(examples)
    return out


def evaluate_choices(examples: list[ChoiceExample], score: Scorer) -> dict:
    return choice_metrics(examples, score_choices(examples, score))


def run_choice_task(
    task: ChoiceTask,
    model: nn.Module,
    tokenizer: Tokenizer,
    data_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict:
    examples = load_choice_task(task, data_root, limit)
    result = evaluate_choices(examples, model_scorer(model, tokenizer, batch_size, device))
    result["settings"] = {
        "prompt": task.prompt,
        "shots": 0,
        "normalisation": "acc: sum of token log-probs; acc_norm: / characters of the choice; acc_bytes: / UTF-8 bytes",
        "limit": limit,
        "batch_size": batch_size,
        "hub_id": task.hub_id,
        "data": {f.name: f.sha256 for f in task.files},
    }
    return result


# The four tasks differ only in their ChoiceTask definition (above: sizes, prompts, scoring).
run_hellaswag = partial(run_choice_task, HELLASWAG)  # validation, 10,042 items, 4 endings
run_piqa = partial(run_choice_task, PIQA)  # validation, 1,838 items, 2 solutions
run_arc_easy = partial(run_choice_task, ARC_EASY)  # test, 2,376 questions, 3-5 choices
run_winogrande = partial(run_choice_task, WINOGRANDE)  # dev, 1,267 items, 2 options, partial scoring
