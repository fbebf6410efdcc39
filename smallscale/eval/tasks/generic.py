"""Zero-shot tasks without code: a JSONL file plus a small YAML (or JSON) spec.

    # sentiment.yaml                               # one record: {"text": "...", "label": 1}
    type: classification
    data: sentiment.jsonl                          # relative to this file
    prompt: "Review: {text}\\nSentiment:"           # {field} placeholders (Python str.format)
    label_field: label
    labels: {0: negative, 1: positive}             # label value -> answer text scored after the prompt

    type: multiple_choice                          # {"question": "...", "options": [...], "answer": 2}
    prompt: "Question: {question}\\nAnswer:"        # or context_field: question
    choices_field: options                         # a list of answer texts per record
    label_field: answer                            # 0-based index, or the correct answer's text,
    label_map: {A: 0, B: 1, C: 2, D: 3}            #   or any value mapped to an index by label_map

    type: minimal_pair                             # {"good": "...", "bad": "...", "kind": "agreement"}
    good_field: good
    bad_field: bad
    group_field: kind                              # optional: accuracy per value of this field
    prompt: null                                   # optional shared context; none: conditioned on EOS

Scoring is that of the built-in tasks (`smallscale.eval.scoring`): each answer is the continuation
`target_delimiter + answer` (default " ") after the context; with an empty context the answer is
scored alone, conditioned on EOS. Classification and multiple choice report acc / acc_norm /
acc_bytes (classification also macro-F1 of the acc predictions); minimal pairs report accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import model_validator
from tokenizers import Tokenizer
from torch import nn

from smallscale.config import Strict, read_yaml, validate
from smallscale.errors import UserError
from smallscale.eval.scoring import Scorer, model_scorer, pick
from smallscale.eval.tasks.classification import macro_f1
from smallscale.eval.tasks.minimal_pairs import MinimalPair, evaluate_minimal_pairs
from smallscale.eval.tasks.multiple_choice import ChoiceExample, choice_metrics, score_choices
from smallscale.io import sha256_file

_REQUIRED = {
    "multiple_choice": ("choices_field", "label_field"),
    "classification": ("label_field", "labels"),
    "minimal_pair": ("good_field", "bad_field"),
}


class GenericSpec(Strict):
    type: Literal["multiple_choice", "classification", "minimal_pair"]
    data: str  # the JSONL file; a relative path is relative to the spec file
    name: str | None = None  # default: the spec file's stem
    prompt: str | None = None  # the context, as a template over the record's fields
    context_field: str | None = None  # or the context is this field's text
    target_delimiter: str = " "  # between a non-empty context and each answer
    choices_field: str | None = None
    label_field: str | None = None
    label_map: dict[str | int, int] | None = None  # multiple_choice: label value -> choice index
    labels: dict[str | int, str] | None = None  # classification: label value -> answer text
    good_field: str | None = None
    bad_field: str | None = None
    group_field: str | None = None

    @model_validator(mode="after")
    def _fields_for_type(self) -> GenericSpec:
        missing = [key for key in _REQUIRED[self.type] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"type {self.type!r} needs {' and '.join(missing)}")
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("labels needs at least 2 label values, each mapped to its answer text")
        if self.prompt is not None and self.context_field is not None:
            raise ValueError("set either prompt or context_field, not both")
        return self


def load_spec(spec_path: str | Path) -> tuple[GenericSpec, Path]:
    """The validated spec and the absolute path of its JSONL data."""
    spec_path = Path(spec_path)
    spec = validate(GenericSpec, read_yaml(spec_path), source=str(spec_path))
    data = Path(spec.data).expanduser()
    data = data if data.is_absolute() else spec_path.parent / data
    if not data.is_file():
        raise UserError(f"{str(spec_path)!r}: data file {str(data)!r} does not exist")
    return spec, data.resolve()


def _field(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise UserError(f"{where}: the record has no field {key!r} (fields: {', '.join(record)})")
    return record[key]


def _context(spec: GenericSpec, record: dict, where: str) -> str:
    if spec.prompt is not None:
        try:
            return spec.prompt.format_map(record)
        except (KeyError, IndexError, AttributeError) as exc:
            raise UserError(f"{where}: prompt placeholder {exc} is not a field of the record") from None
    if spec.context_field is not None:
        return str(_field(record, spec.context_field, where))
    return ""


def _answer(context: str, text: str, delimiter: str) -> tuple[str, str]:
    return (context, delimiter + text) if context else ("", text)


def _choice_index(spec: GenericSpec, raw: Any, choices: list[str], where: str) -> int:
    if spec.label_map is not None:
        mapping = {str(k): v for k, v in spec.label_map.items()}
        if str(raw) not in mapping:
            raise UserError(f"{where}: label {raw!r} is not a key of label_map")
        index = mapping[str(raw)]
    elif isinstance(raw, int) and not isinstance(raw, bool):
        index = raw
    elif isinstance(raw, str) and raw.strip().isdigit():
        index = int(raw)
    elif raw in choices:
        index = choices.index(raw)
    else:
        raise UserError(f"{where}: label {raw!r} is neither a 0-based index nor one of the choices; add a label_map")
    if not 0 <= index < len(choices):
        raise UserError(f"{where}: label {raw!r} points to choice {index}, but there are {len(choices)} choices")
    return index


def _records(data: Path, limit: int | None):
    with open(data, encoding="utf-8") as lines:
        count = 0
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                return
            where = f"{data}:{i + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: each line must be a JSON object")
            count += 1
            yield record, where


def evaluate_generic(spec_path: str | Path, score: Scorer, limit: int | None = None) -> dict:
    """Run the task that `spec_path` describes with `score`; `limit` keeps the first N records."""
    spec, data = load_spec(spec_path)
    delimiter = spec.target_delimiter
    if spec.type == "minimal_pair":
        pairs = []
        for record, where in _records(data, limit):
            context = _context(spec, record, where)
            good, bad = (_answer(context, str(_field(record, key, where)), delimiter)[1] for key in (spec.good_field, spec.bad_field))
            group = str(_field(record, spec.group_field, where)) if spec.group_field else "all"
            pairs.append(MinimalPair(good, bad, group, context=context))
        result = evaluate_minimal_pairs(pairs, score)
    else:
        examples = []
        verbalizers = {str(k): v for k, v in (spec.labels or {}).items()}
        for record, where in _records(data, limit):
            context = _context(spec, record, where)
            raw = _field(record, spec.label_field, where)
            if spec.type == "classification":
                choices = list(verbalizers.values())
                if str(raw) not in verbalizers:
                    raise UserError(f"{where}: label {raw!r} is not a key of labels ({', '.join(verbalizers)})")
                gold = list(verbalizers).index(str(raw))
            else:
                choices = _field(record, spec.choices_field, where)
                if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                    raise UserError(f"{where}: {spec.choices_field!r} must be a list of at least 2 strings")
                gold = _choice_index(spec, raw, choices, where)
            requests = tuple(_answer(context, c, delimiter) for c in choices)
            examples.append(ChoiceExample(requests, tuple(choices), gold, where))
        if not examples:
            raise UserError(f"{str(data)!r} has no records to score")
        logprobs = score_choices(examples, score)
        result = choice_metrics(examples, logprobs)
        if spec.type == "classification":
            predicted = [pick(lp, e.choices) for lp, e in zip(logprobs, examples)]
            result["macro_f1"] = macro_f1(predicted, [e.gold for e in examples], len(verbalizers))
    result["settings"] = {
        "spec": spec.model_dump(mode="json"),
        "limit": limit,
        "data": {data.name: sha256_file(data)},
    }
    return {"name": spec.name or Path(spec_path).stem, "type": spec.type, **result}


def run_generic(
    spec_path: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    limit: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict:
    """A spec-defined task (see the module docstring) scored with `model`."""
    result = evaluate_generic(spec_path, model_scorer(model, tokenizer, batch_size, device), limit)
    result["settings"]["batch_size"] = batch_size
    return result
