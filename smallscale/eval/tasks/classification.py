"""Text classification: fine-tuning a classification head (GLUE / BabyLM style), or zero-shot scoring.

Tasks (`CLASSIFICATION_TASKS`; files resolved like corpora: data root, cache, pinned origin URL):

    sst2             English movie-review sentiment, 2 classes. Train: GLUE train (67,349 phrases).
                     Reported on: GLUE validation (872), as GLUE and BabyLM do: GLUE's test labels
                     are hidden. The stored `test-labeled.tsv` (1,821) has labels of undocumented
                     origin (not GLUE); it is split 'test', used only when asked (eval_split='test').
                     No dev split: with validation held out, nothing is selected on it.
    afrisenti_swa    Swahili tweet sentiment, 3 classes (59% neutral on test: read macro-F1).
                     train 1,810 / dev 453 / test 748 (reported on).
    masakhanews_swa  Swahili news topic, 7 classes. Train: the authors' few-shot split, 50 articles
                     per class (350; the full 1,658-article train file is not stored). dev 237 /
                     test 476 (reported on). Input: headline + "\\n" + article text.

Fine-tuning (`run_finetune`, `finetune`). A copy of the pretrained GPT with its `lm_head` replaced by
the identity, so the model's own forward returns the final-norm hidden states (B, T, C); the
representation of a text is the hidden state of its LAST real (non-pad) token, which under the causal
mask is the only one that has seen the whole text (as GPT2ForSequenceClassification pools). A linear
head (N(0, 0.02) weights, zero bias) maps it to class logits; dropout is the model's `cfg.dropout`, in
the body and on the pooled state. Input tokens are `[EOS] + text` (EOS is the document boundary the
model saw in pretraining), truncated to `max_len` tokens keeping the start, right-padded with id 0.
Every parameter is trained with AdamW; see `FinetuneConfig` for the fixed hyper-parameters. Metrics
are accuracy and macro-F1 on the held-out split; nothing is chosen on it. With `select_on_dev`, the
epoch with the best dev macro-F1 is kept (tasks with a dev split only). Given the seed, fine-tuning
is deterministic on CPU (it seeds head init, dropout and data order in a forked RNG).

Zero-shot (`run_zero_shot`). Each class is a verbalised answer scored after a prompt by
`smallscale.eval.scoring`; the prediction is the class with the highest log-likelihood (`acc`: summed
over the answer's tokens; `acc_norm` / `acc_bytes`: per character / byte of the answer word):

    sst2             "Review: {sentence}\\nSentiment:"   -> " negative" | " positive"
    afrisenti_swa    sw "Tweet: {tweet}\\nHisia:"         -> " hasi" | " wastani" | " chanya"
                     en "Tweet: {tweet}\\nSentiment:"     -> " negative" | " neutral" | " positive"
    masakhanews_swa  sw "Kichwa cha habari: {headline}\\nMada:" -> " biashara" | " burudani" | " afya"
                        | " siasa" | " dini" | " michezo" | " teknolojia"
                     en "Headline: {headline}\\nTopic:"   -> " business" | ... (the label names)

The answer language defaults to the task's (`labels_language`). MasakhaNEWS prompts show the headline
only, as lm-eval's `masakhanews` prompts do: whole articles exceed a small model's context.

`limit_train` / `limit_eval` / `limit` take a fixed random subset (shuffled with seed 0, whatever the
fine-tuning seed): the files are sorted by class, so their first rows would hold one class only.

Macro-F1 (`macro_f1`) averages per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in
the gold labels or the predictions (scikit-learn's `f1_score(average='macro')`).
"""

from __future__ import annotations

import copy
import csv
import math
import random
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from smallscale.data.builtins import BuiltinFile, fetch
from smallscale.data.tokenizer import eos_id
from smallscale.errors import UserError
from smallscale.eval.scoring import NORMALISATIONS, model_scorer, pick, stderr
from smallscale.eval.tasks.finetuning import OPTIMIZER, SCHEDULE, Finetuner
from smallscale.eval.tasks.multiple_choice import ChoiceExample, score_choices
from smallscale.model.gpt import GPT

DELIMITER = " "  # between a zero-shot prompt and each answer word, as lm-eval
SUBSET_SEED = 0  # the shuffle behind every limit_*, fixed so all models and seeds see the same subset
HEAD_INIT_STD = 0.02
PAD_ID = 0  # right padding, after every real token: the causal mask keeps it out of their states


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]  # the record's text columns, e.g. {"headline": ..., "text": ...}
    label: int  # index into the task's classes


@dataclass(frozen=True)
class Prompt:
    template: str  # over the record's text columns (str.format)
    answers: tuple[str, ...]  # one answer word per class, in class order


@dataclass(frozen=True)
class ClassificationTask:
    name: str
    language: str  # ISO 639-1
    hub_id: str  # the same data on the Hugging Face Hub, for users with internet (not used here)
    folder: str  # under the data root and the cache
    splits: dict[str, BuiltinFile]  # split name -> file (a name may hold a subfolder)
    train_split: str
    dev_split: str | None  # for select_on_dev; None where there is none
    eval_split: str  # the held-out split metrics are reported on
    label_column: str
    labels: dict[str, str]  # label value in the file -> class name; the order defines class indices
    input_template: str  # the fine-tuning input, over the text columns
    prompts: dict[str, Prompt]  # answer language -> zero-shot prompt
    quoting: int  # csv quoting of the files
    note: str  # the split choice, in words, recorded with every result

    @property
    def classes(self) -> list[str]:
        return list(self.labels.values())


def _raw(repo: str, commit: str, path: str, sha256: str, size_bytes: int, name: str | None = None) -> BuiltinFile:
    url = f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"
    return BuiltinFile(name or path.rsplit("/", 1)[-1], sha256, url, size_bytes)


_AUTOPROMPT = ("eyalbd2/Reproducing-AutoPrompt", "6288fb5bec9c572f2492875ae0111df5b6daed11")
_AFRISENTI = ("afrisenti-semeval/afrisent-semeval-2023", "5aec3cfcf87b59f885e98641f72e52182776429d")
_MASAKHANEWS = ("masakhane-io/masakhane-news", "819be052e79e0a600e0ed4a7356594681cb5c4f3")
_NEWS_TOPICS = ("business", "entertainment", "health", "politics", "religion", "sports", "technology")

SST2 = ClassificationTask(
    name="sst2",
    language="en",
    hub_id="stanfordnlp/sst2 (train / validation)",
    folder="sst2",
    splits={
        "train": _raw(*_AUTOPROMPT, "glue_data/SST-2/train_full.tsv", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1", 3_806_081),
        "validation": _raw(*_AUTOPROMPT, "glue_data/SST-2/dev.tsv", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0", 94_931),
        "test": _raw(*_AUTOPROMPT, "glue_data/SST-2/test-labeled.tsv", "c0efc56ade6e0598d0f8daca1976e232aee0bcabca8e599341cad290d9d10b3c", 194_804),
    },
    train_split="train",
    dev_split=None,
    eval_split="validation",
    label_column="label",
    labels={"0": "negative", "1": "positive"},
    input_template="{sentence}",
    prompts={"en": Prompt("Review: {sentence}\nSentiment:", ("negative", "positive"))},
    quoting=csv.QUOTE_NONE,
    note="train: GLUE train; reported on GLUE validation (GLUE test labels are hidden; "
    "'test' = test-labeled.tsv, labels of undocumented origin); no dev split",
)
AFRISENTI_SWA = ClassificationTask(
    name="afrisenti_swa",
    language="sw",
    hub_id="shmuhammad/AfriSenti-twitter-sentiment (config swa)",
    folder="afrisenti-swa",
    splits={
        split: _raw(*_AFRISENTI, f"data/swa/{split}.tsv", sha, size)
        for split, sha, size in (
            ("train", "d0cd654eeb84dae25e3fe8521ac88a1004cdd625e0fe90e7ab9a039a6655e431", 212_734),
            ("dev", "ef91098b77b5137e093fb78d7a0cc3bd4c561ba1f87dc86fdccbc16b4807f2af", 51_430),
            ("test", "1720b2a4dedce37e64b5820420a5de78caf66eaf2102f9cf276faba3a8261eb1", 90_792),
        )
    },
    train_split="train",
    dev_split="dev",
    eval_split="test",
    label_column="label",
    labels={"negative": "negative", "neutral": "neutral", "positive": "positive"},
    input_template="{tweet}",
    prompts={
        "sw": Prompt("Tweet: {tweet}\nHisia:", ("hasi", "wastani", "chanya")),
        "en": Prompt("Tweet: {tweet}\nSentiment:", ("negative", "neutral", "positive")),
    },
    quoting=csv.QUOTE_NONE,
    note="train: train; dev: dev (only with select_on_dev); reported on test",
)
MASAKHANEWS_SWA = ClassificationTask(
    name="masakhanews_swa",
    language="sw",
    hub_id="masakhane/masakhanews (config swa)",
    folder="masakhanews-swa",
    splits={
        "train": _raw(
            *_MASAKHANEWS,
            "few_shot_data/50_samples/swa/train.tsv",
            "66906840a795422827e1ae5a6bfc2df6a444f2247937e6f1c40e58902a8160fd",
            1_210_159,
            name="few_shot_50/train.tsv",
        ),
        "dev": _raw(*_MASAKHANEWS, "data/swa/dev.tsv", "3bdbcea3c4a2dc878181c24ce2570ba49fe6a2d90bc8d604d22f35d317d02054", 859_264),
        "test": _raw(*_MASAKHANEWS, "data/swa/test.tsv", "6d7e076f2fb53e46c7b2ed855fd77aa5e3351435e2bddafcd07cceeceada61aa", 1_760_033),
    },
    train_split="train",
    dev_split="dev",
    eval_split="test",
    label_column="category",
    labels={topic: topic for topic in _NEWS_TOPICS},
    input_template="{headline}\n{text}",
    prompts={
        "sw": Prompt("Kichwa cha habari: {headline}\nMada:", ("biashara", "burudani", "afya", "siasa", "dini", "michezo", "teknolojia")),
        "en": Prompt("Headline: {headline}\nTopic:", _NEWS_TOPICS),
    },
    # Fields holding quotes are CSV-quoted ("...""..."), as pandas / the Hub loader read them.
    quoting=csv.QUOTE_MINIMAL,
    note="train: the authors' 50-per-class few-shot split (the full train file is not stored); "
    "dev: dev (only with select_on_dev); reported on test",
)
CLASSIFICATION_TASKS: dict[str, ClassificationTask] = {t.name: t for t in (SST2, AFRISENTI_SWA, MASAKHANEWS_SWA)}


def get_classification_task(name: str) -> ClassificationTask:
    if name not in CLASSIFICATION_TASKS:
        raise UserError(f"unknown classification task {name!r}; choose from {', '.join(CLASSIFICATION_TASKS)}")
    return CLASSIFICATION_TASKS[name]


# ---- data --------------------------------------------------------------------------------------


def subset(n: int, limit: int | None) -> list[int]:
    """Row indices kept by `limit`: all, or a fixed random `limit` of them (SUBSET_SEED), in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise UserError(f"a limit must be a positive number of examples, got {limit}")
    return sorted(random.Random(SUBSET_SEED).sample(range(n), limit))


def read_split(task: ClassificationTask, split: str, data_root: str | Path | None = None) -> list[Example]:
    """Every example of `split` of `task`, in file order."""
    if split not in task.splits:
        raise UserError(f"task {task.name!r} has no split {split!r}; choose from {', '.join(task.splits)}")
    file = task.splits[split]
    path = fetch(task.folder, file.name, file.sha256, file.url, data_root)
    text_columns = _placeholders(task)
    csv.field_size_limit(2**31 - 1)  # news articles exceed the default 128 KiB field limit
    examples = []
    with open(path, encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=task.quoting)
        header = next(rows, [])
        missing = [c for c in (task.label_column, *text_columns) if c not in header]
        if missing:
            raise UserError(f"{path}: header {header} lacks column(s) {missing}; restore the original file")
        for line, row in enumerate(rows, start=2):
            if len(row) != len(header):
                raise UserError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}; restore the original file")
            record = dict(zip(header, row))
            if record[task.label_column] not in task.labels:
                raise UserError(f"{path}:{line}: label {record[task.label_column]!r} is not one of {list(task.labels)}")
            label = list(task.labels).index(record[task.label_column])
            examples.append(Example({c: record[c].strip() for c in text_columns}, label))
    return examples


def load_split(
    task: ClassificationTask, split: str, data_root: str | Path | None = None, limit: int | None = None
) -> list[Example]:
    """`read_split`, keeping the fixed random subset `limit` (see `subset`)."""
    examples = read_split(task, split, data_root)
    return [examples[i] for i in subset(len(examples), limit)]


def _placeholders(task: ClassificationTask) -> list[str]:
    """The text columns the task reads: every {field} of its input template and prompts."""
    names: list[str] = []
    for template in (task.input_template, *(p.template for p in task.prompts.values())):
        for _, name, _, _ in string.Formatter().parse(template):
            if name and name not in names:
                names.append(name)
    return names


def _data_hashes(task: ClassificationTask, splits: Sequence[str | None]) -> dict[str, str]:
    return {task.splits[s].name: task.splits[s].sha256 for s in splits if s is not None}


# ---- metrics -----------------------------------------------------------------------------------


def confusion_matrix(predicted: Sequence[int], gold: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = gold class, columns = predicted class."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(gold, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return counts


def f1_per_class(predicted: Sequence[int], gold: Sequence[int], n_classes: int) -> list[float | None]:
    """F1 = 2TP / (2TP + FP + FN) per class; None for a class absent from gold and predictions."""
    counts = confusion_matrix(predicted, gold, n_classes)
    tp = np.diag(counts)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    return [float(2 * t / (2 * t + p + n)) if t + p + n else None for t, p, n in zip(tp, fp, fn)]


def macro_f1(predicted: Sequence[int], gold: Sequence[int], n_classes: int | None = None) -> float:
    """Mean per-class F1 over the classes present in gold or predictions (sklearn's macro average)."""
    if len(predicted) != len(gold) or len(gold) == 0:
        raise UserError(f"macro_f1 needs equally many predictions and gold labels, at least one; got {len(predicted)} and {len(gold)}")
    n_classes = n_classes if n_classes is not None else max(max(predicted), max(gold)) + 1
    present = [f for f in f1_per_class(predicted, gold, n_classes) if f is not None]
    return sum(present) / len(present)


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], classes: Sequence[str]) -> dict:
    """accuracy (+ stderr), macro-F1, per-class F1, n, the majority class's share, chance."""
    n = len(gold)
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    per_class = f1_per_class(predicted, gold, len(classes))
    return {
        "accuracy": correct / n,
        "accuracy_stderr": stderr(correct / n, n),
        "macro_f1": macro_f1(predicted, gold, len(classes)),
        "f1_per_class": dict(zip(classes, per_class)),
        "n": n,
        "majority_accuracy": int(np.bincount(np.asarray(gold), minlength=len(classes)).max()) / n,  # best constant guess
        "chance": 1 / len(classes),
    }


# ---- fine-tuning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """Fixed fine-tuning hyper-parameters. lr is higher than BERT/GLUE's 2e-5..5e-5 (and BabyLM's
    5e-5) because the models here are small (1M-100M parameters), which tolerate and need more;
    batch, decay, warmup and schedule follow GLUE practice (linear warmup, linear decay to 0)."""

    lr: float = 3e-4  # peak, body and head alike
    batch_size: int = 32
    epochs: int = 3
    max_steps: int | None = None  # stop after this many optimizer steps if sooner; 0: evaluate untrained
    warmup_frac: float = 0.1  # of the total steps
    weight_decay: float = 0.01  # on matrices and the head's weight; not embeddings, norms, biases
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm
    max_len: int = 128  # tokens per input including the leading EOS (and at most the model's seq_len)
    select_on_dev: bool = False  # keep the epoch with the best dev macro-F1 (tasks with a dev split)
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 0,
            "warmup_frac": 0 <= self.warmup_frac < 1,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip > 0,
            "max_len": self.max_len >= 2,
            "eval_batch_size": self.eval_batch_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"fine-tuning setting {name}={getattr(self, name)!r} is out of range; see FinetuneConfig")


class SequenceClassifier(nn.Module):
    """A copy of a GPT whose lm_head is the identity, plus a linear head on the last real token.

    Relies on `GPT.forward` without targets returning `lm_head(norm_f(x))`; were that to change, the
    shape assertion in `forward` fails (tests compare the body's output with norm_f's)."""

    def __init__(self, model: GPT, n_classes: int, dropout: float):
        super().__init__()
        self.body = copy.deepcopy(model)  # the caller's model is never trained
        self.body.lm_head = nn.Identity()  # body(ids).logits is now the final-norm hidden state
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(model.cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        hidden = self.body(input_ids).logits  # (B, T, C)
        assert hidden.size(-1) == self.head.in_features, "GPT.forward no longer ends in lm_head(norm_f(x))"
        last = hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]  # (B, C)
        return self.head(self.dropout(last))  # (B, n_classes)


def encode_inputs(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """[EOS] + the text's tokens, cut to max_len tokens (the start is kept)."""
    eos = eos_id(tokenizer)
    return [[eos, *e.ids][:max_len] for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def _batch(ids: Sequence[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(x) for x in ids])
    inputs = torch.full((len(ids), int(lengths.max())), PAD_ID, dtype=torch.long)
    for row, x in enumerate(ids):
        inputs[row, : len(x)] = torch.tensor(x)
    return inputs.to(device), lengths.to(device)


@torch.inference_mode()
def predict(classifier: SequenceClassifier, ids: Sequence[list[int]], batch_size: int, device: torch.device) -> list[int]:
    was_training = classifier.training
    classifier.eval()
    predicted: list[int] = []
    for start in range(0, len(ids), batch_size):
        predicted += classifier(*_batch(ids[start : start + batch_size], device)).argmax(dim=-1).tolist()
    classifier.train(was_training)
    return predicted


def finetune(
    model: GPT,
    tokenizer: Tokenizer,
    train: Sequence[Example],
    evaluate: Sequence[Example],
    classes: Sequence[str],
    input_template: str = "{text}",
    cfg: FinetuneConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dev: Sequence[Example] | None = None,
    progress: bool | None = None,
) -> dict:
    """Fine-tune a copy of `model` on `train`; metrics on `evaluate` (see the module docstring).

    `dev` is used only with `cfg.select_on_dev`. `progress`: a rich progress bar; None shows it
    when training takes 200 steps or more. The result holds the metrics, the number of training
    examples and steps, the mean training loss of the last epoch, and every setting."""
    cfg = cfg or FinetuneConfig()
    if not train or not evaluate:
        raise UserError(f"fine-tuning needs training and evaluation examples; got {len(train)} and {len(evaluate)}")
    if cfg.select_on_dev and not dev:
        raise UserError("select_on_dev needs a dev split; this task has none (set select_on_dev=False)")
    device = torch.device(device)
    max_len = min(cfg.max_len, model.cfg.seq_len)

    def encode(examples: Sequence[Example]) -> list[list[int]]:
        return encode_inputs(tokenizer, [input_template.format_map(e.fields) for e in examples], max_len)

    train_ids, eval_ids = encode(train), encode(evaluate)
    dev_ids = encode(dev) if cfg.select_on_dev and dev else None
    train_labels = torch.tensor([e.label for e in train])
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # head init and dropout; the data order has its own generator
        order_rng = torch.Generator().manual_seed(seed)
        classifier = SequenceClassifier(model, len(classes), model.cfg.dropout).to(device).train()
        epoch_losses, best = [], None  # best: (dev macro-F1, epoch, state)
        trainer = Finetuner(
            classifier, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
            total_steps=total_steps, warmup_frac=cfg.warmup_frac, progress=progress,
        )  # fmt: skip
        with trainer:
            for epoch in range(cfg.epochs):
                if trainer.steps_done >= total_steps:
                    break
                epoch_losses = []
                for batch in torch.randperm(len(train), generator=order_rng).split(cfg.batch_size):
                    if trainer.steps_done >= total_steps:
                        break
                    logits = classifier(*_batch([train_ids[i] for i in batch], device))  # (B, n_classes)
                    loss = F.cross_entropy(logits, train_labels[batch].to(device))
                    epoch_losses.append(trainer.step(loss, f"fine-tune epoch {epoch + 1}"))
                if dev_ids is not None:
                    dev_f1 = macro_f1(predict(classifier, dev_ids, cfg.eval_batch_size, device), [e.label for e in dev], len(classes))
                    if best is None or dev_f1 > best[0]:
                        best = (dev_f1, epoch + 1, {k: v.detach().clone() for k, v in classifier.state_dict().items()})
        if best is not None:
            classifier.load_state_dict(best[2])
        predicted = predict(classifier, eval_ids, cfg.eval_batch_size, device)

    result = classification_metrics(predicted, [e.label for e in evaluate], classes)
    result.update(
        n_train=len(train),
        steps=trainer.steps_done,
        train_loss=sum(epoch_losses) / len(epoch_losses) if epoch_losses else None,  # mean over the last epoch
    )
    if best is not None:
        result.update(dev_macro_f1=best[0], selected_epoch=best[1], n_dev=len(dev))
    result["settings"] = {
        "method": "finetune",
        "seed": seed,
        **asdict(cfg),
        "max_len_used": max_len,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": trainer.warmup_steps,
        "schedule": SCHEDULE,
        "optimizer": OPTIMIZER,
        "dropout": model.cfg.dropout,
        "pooling": "final-norm hidden state of the last non-pad token",
        "head": f"linear, weights N(0, {HEAD_INIT_STD}), bias 0",
        "input": f"[EOS] + {input_template!r}, first max_len tokens, right-padded",
    }
    return result


_HPARAMS = {f.name for f in fields(FinetuneConfig)}


def run_finetune(
    task_name: str,
    model: GPT,
    tokenizer: Tokenizer,
    data_root: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    eval_split: str | None = None,
    limit_train: int | None = None,
    limit_eval: int | None = None,
    progress: bool | None = None,
    **hparams,
) -> dict:
    """Fine-tune a copy of `model` on task `task_name`'s train split; accuracy and macro-F1 on its
    held-out split (`eval_split` overrides it). `hparams` override `FinetuneConfig` fields;
    `limit_eval` also limits the dev split."""
    unknown = sorted(set(hparams) - _HPARAMS)
    if unknown:
        raise UserError(f"unknown fine-tuning setting(s) {unknown}; choose from {sorted(_HPARAMS)}")
    cfg = FinetuneConfig(**hparams)
    task = get_classification_task(task_name)
    eval_split = eval_split or task.eval_split
    if eval_split in (task.train_split, task.dev_split if cfg.select_on_dev else None):
        raise UserError(f"eval_split {eval_split!r} is also used for training or selection; pick a held-out split")
    train = load_split(task, task.train_split, data_root, limit_train)
    evaluate = load_split(task, eval_split, data_root, limit_eval)
    dev_split = task.dev_split if cfg.select_on_dev else None
    dev = load_split(task, dev_split, data_root, limit_eval) if dev_split else None
    result = finetune(model, tokenizer, train, evaluate, task.classes, task.input_template, cfg, seed, device, dev, progress)
    result = {"task": task.name, "language": task.language, **result}
    result["settings"].update(
        train_split=task.train_split,
        eval_split=eval_split,
        dev_split=dev_split,
        splits=task.note,
        limit_train=limit_train,
        limit_eval=limit_eval,
        subset_seed=SUBSET_SEED,
        hub_id=task.hub_id,
        data=_data_hashes(task, [task.train_split, eval_split, dev_split]),
    )
    return result


# ---- zero-shot ---------------------------------------------------------------------------------


def zero_shot_examples(task: ClassificationTask, examples: Sequence[Example], labels_language: str) -> list[ChoiceExample]:
    """One request per class: (prompt, " " + answer word)."""
    if labels_language not in task.prompts:
        raise UserError(f"task {task.name!r} has no {labels_language!r} prompt; choose from {', '.join(task.prompts)}")
    prompt = task.prompts[labels_language]
    out = []
    for i, example in enumerate(examples):
        context = prompt.template.format_map(example.fields)
        out.append(ChoiceExample(tuple((context, DELIMITER + a) for a in prompt.answers), prompt.answers, example.label, str(i)))
    return out


def run_zero_shot(
    task_name: str,
    model: nn.Module,
    tokenizer: Tokenizer,
    data_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    labels_language: str | None = None,
    metric: str = "acc",
    eval_split: str | None = None,
) -> dict:
    """Zero-shot accuracy and macro-F1 on the held-out split: the class whose answer word the model
    finds most likely after the prompt (`metric`: normalisation, a key of scoring.NORMALISATIONS)."""
    if metric not in NORMALISATIONS:
        raise UserError(f"unknown metric {metric!r}; choose from {', '.join(NORMALISATIONS)}")
    task = get_classification_task(task_name)
    eval_split = eval_split or task.eval_split
    labels_language = labels_language or task.language
    examples = load_split(task, eval_split, data_root, limit)
    choices = zero_shot_examples(task, examples, labels_language)
    logprobs = score_choices(choices, model_scorer(model, tokenizer, batch_size, device))
    predicted = [pick(lp, c.choices, metric) for lp, c in zip(logprobs, choices)]
    result = {"task": task.name, "language": task.language, **classification_metrics(predicted, [e.label for e in examples], task.classes)}
    prompt = task.prompts[labels_language]
    result["settings"] = {
        "method": "zero_shot",
        "prompt": prompt.template,
        "answers": dict(zip(task.classes, (DELIMITER + a for a in prompt.answers))),
        "labels_language": labels_language,
        "metric": metric,
        "shots": 0,
        "eval_split": eval_split,
        "splits": task.note,
        "limit": limit,
        "subset_seed": SUBSET_SEED,
        "batch_size": batch_size,
        "hub_id": task.hub_id,
        "data": _data_hashes(task, [eval_split]),
    }
    return result


# Zero-shot tasks in the registry's form: (model, tokenizer, data_root=None, limit=None, ...) -> dict
ZERO_SHOT_TASKS = {name: partial(run_zero_shot, name) for name in CLASSIFICATION_TASKS}
