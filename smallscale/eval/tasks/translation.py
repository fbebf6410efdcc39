"""Translation: fine-tune a pretrained run on MAFAND-MT English-Swahili pairs, translate, score.

Tasks (`TRANSLATION_TASKS`): `mafand_en_sw` (English -> Swahili) and `mafand_sw_en` (Swahili -> English).

Data, read from the data root through the built-in corpora (pinned by sha256, recorded with every
result; line i of one language's file translates line i of the other's; lines are stripped):
    train   MAFAND-MT en-swa train, 30,782 pairs (Global Voices news, the authors' train split)
    test    MAFAND-MT en-swa test, 1,835 pairs           -> results['mafand_test']
            FLORES-200 devtest, eng_Latn / swh_Latn, 1,012 -> results['flores_devtest']
MAFAND's dev split is not used: nothing is selected or tuned on it. 8 of the test's Swahili lines
also occur in train.swa (PROVENANCE.md); they are kept, as in the benchmark.

Format (`encode_pair`). A pair is one document, after the EOS that starts every document:

    [EOS] "English:" " {source}" "\\nSwahili:" " {target}" [EOS]

(for sw->en the language names swap). The five parts are tokenized separately, so the prompt a model
sees when translating is token for token the one it was fine-tuned on, and a source can be cut to
its first `max_source_tokens` tokens (the count of cut sources is recorded). The closing EOS is a
target, so the model learns where a translation ends and decoding stops there.

Fine-tuning (`finetune_translation`). A copy of the run's model (the run itself is never changed)
trains as a language model on the pairs with the loss on the target tokens only (the translation and
its closing EOS; -100 on the prompt and the padding), every parameter, AdamW, linear warmup then
linear decay to 0, for a fixed number of optimizer steps over shuffled pairs (epochs repeat the
shuffle). Pairs longer than `max_len` tokens are left out (counted). Batches are right-padded with
id 0, which no real token attends to under the causal mask. Given the seed, the result is
deterministic on CPU. The fixed hyper-parameters are `TranslationConfig`'s; every one is recorded.

Decoding. Greedy (`generate`, temperature 0) and beam search (`beam_search`, `beam_size` beams,
score = log-probability / new tokens ** length_penalty), both with the KV cache and prompts of equal
length batched, each stopping at EOS or after min(`max_new_ratio` x source tokens + `max_new_extra`,
context - prompt) new tokens. The output is the decoded text of the new tokens before EOS, stripped.

Scores: sacrebleu's corpus BLEU, chrF and chrF++ (word_order=2) with default settings (13a
tokenization for BLEU) against the one reference, with their signatures; segments are normalised as
`generation.as_segment` does, so `sacrebleu REF -i HYP -m bleu chrf` on the samples file's lines gives
the same numbers. The top-level bleu / chrf / chrfpp are those of beam search on the first evaluation
set (MAFAND test unless `eval_sets` says otherwise). Every translation is written to
`OUT/<task>_samples.jsonl`.

Vocabulary. A run whose tokenizer was trained without Swahili (or English) still translates, badly:
the result records characters and tokens per word of each language's training text, and a note when
the tokenizer cuts a language into short pieces (under `SHORT_PIECES` characters per token), the mark
of a language it has barely seen.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from sacrebleu.metrics import BLEU, CHRF
from tokenizers import Tokenizer
from torch import Tensor

from smallscale.data.builtins import builtin_paths, get_builtin
from smallscale.data.tokenizer import eos_id as tokenizer_eos_id
from smallscale.errors import UserError
from smallscale.eval.generate import beam_search, cut_at_eos, generate
from smallscale.eval.tasks.classification import SUBSET_SEED, subset
from smallscale.eval.tasks.finetuning import OPTIMIZER, SCHEDULE, Finetuner
from smallscale.eval.tasks.generation import as_segment
from smallscale.io import atomic_write_text
from smallscale.model.gpt import GPT

PAD_ID = 0  # right padding; masked out of the loss, never attended to by a real token
IGNORE = -100  # the loss ignores these target positions (prompt and padding)
# Characters per token below which a language is noted as poorly covered. Measured on MAFAND train
# text with 4k-8k BPE vocabularies: 2.8-4.5 for a language the tokenizer was trained on, 1.6-2.4 for one
# it was not (English-only or Shakespeare tokenizers on Swahili, a Swahili-only one on English).
SHORT_PIECES = 2.5
LANGUAGE_NAMES = {"en": "English", "sw": "Swahili"}

# evaluation / training set -> language -> built-in corpus (smallscale.data.builtins)
CORPORA: dict[str, dict[str, str]] = {
    "mafand_train": {"en": "mafand-en", "sw": "mafand-swa"},
    "mafand_test": {"en": "mafand-en-test", "sw": "mafand-swa-test"},
    "flores_devtest": {"en": "flores-eng-devtest", "sw": "flores-swh-devtest"},
}
EVAL_SETS = ("mafand_test", "flores_devtest")


@dataclass(frozen=True)
class Direction:
    name: str  # the task name
    source: str  # ISO 639-1
    target: str

    @property
    def prefix(self) -> str:
        return f"{LANGUAGE_NAMES[self.source]}:"

    @property
    def separator(self) -> str:
        return f"\n{LANGUAGE_NAMES[self.target]}:"

    @property
    def template(self) -> str:
        return f"[EOS]{self.prefix} {{source}}{self.separator} {{target}}[EOS]"


TRANSLATION_TASKS: dict[str, Direction] = {
    d.name: d for d in (Direction("mafand_en_sw", "en", "sw"), Direction("mafand_sw_en", "sw", "en"))
}


@dataclass(frozen=True)
class Pair:
    source: str
    reference: str
    line: int  # 0-based line of the pair in its files


@dataclass(frozen=True)
class TranslationConfig:
    """Fixed hyper-parameters. The model is small (1M-100M parameters) and the budget a few CPU
    minutes, so the lr is near pretraining's (cpu presets pretrain at 2e-3) rather than the 3e-5 of
    large models. 300 steps of 16 pairs (4,800 pairs, a sixth of an epoch) took 4.5 minutes for
    cpu-2m (then 7 x 112) on 2 shared CPU cores with one torch thread, and translating MAFAND test and FLORES
    devtest greedily and with 4 beams 3.2 minutes more."""

    lr: float = 1e-3  # peak
    batch_size: int = 16  # pairs per optimizer step
    steps: int = 300  # optimizer steps; 0 evaluates the model as it is
    warmup_frac: float = 0.05  # of the steps
    weight_decay: float = 0.01  # on matrices; not on embeddings, norms, biases
    betas: tuple[float, float] = (0.9, 0.98)  # beta2 of Vaswani et al. (2017) for translation
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm
    max_len: int = 256  # tokens per training pair, prompt included (at most the model's seq_len)
    max_source_tokens: int = 128  # a longer source is cut to its first max_source_tokens tokens
    beam_size: int = 4
    length_penalty: float = 1.0  # beam score = log-probability / new tokens ** length_penalty
    max_new_ratio: float = 2.0  # at most max_new_ratio x source tokens + max_new_extra new tokens
    max_new_extra: int = 10
    eval_batch_size: int = 32  # prompts per decoding batch (beam search: x beam_size rows)

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "steps": self.steps >= 0,
            "warmup_frac": 0 <= self.warmup_frac < 1,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip > 0,
            "max_len": self.max_len >= 8,
            "max_source_tokens": self.max_source_tokens >= 1,
            "beam_size": self.beam_size >= 1,
            "length_penalty": self.length_penalty >= 0,
            "max_new_ratio": self.max_new_ratio > 0,
            "max_new_extra": self.max_new_extra >= 0,
            "eval_batch_size": self.eval_batch_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"translation setting {name}={getattr(self, name)!r} is out of range; see TranslationConfig")


_HPARAMS = {f.name for f in fields(TranslationConfig)}


def get_direction(name: str) -> Direction:
    if name not in TRANSLATION_TASKS:
        raise UserError(f"unknown translation task {name!r}; choose from {', '.join(TRANSLATION_TASKS)}")
    return TRANSLATION_TASKS[name]


# ---- data --------------------------------------------------------------------------------------


def read_lines(corpus: str, data_root: str | Path | None = None) -> list[str]:
    """The stripped lines of a one-file built-in corpus (split on '\\n' only, as `wc -l` counts)."""
    (path,) = builtin_paths(corpus, data_root)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def load_pairs(direction: Direction, corpus_set: str, data_root: str | Path | None = None) -> list[Pair]:
    """Every aligned (source, reference) pair of `corpus_set`; pairs with an empty side are left out."""
    if corpus_set not in CORPORA:
        raise UserError(f"unknown evaluation set {corpus_set!r}; choose from {', '.join(EVAL_SETS)}")
    sources = read_lines(CORPORA[corpus_set][direction.source], data_root)
    references = read_lines(CORPORA[corpus_set][direction.target], data_root)
    if len(sources) != len(references):
        raise UserError(
            f"{corpus_set}: {len(sources)} {direction.source} lines but {len(references)} {direction.target} lines; "
            "restore the original files"
        )
    return [Pair(s, r, i) for i, (s, r) in enumerate(zip(sources, references)) if s and r]


def data_hashes(corpus_sets: Sequence[str], direction: Direction) -> dict[str, str]:
    """'folder/file' -> sha256 of every file the sets read."""
    out = {}
    for corpus_set in corpus_sets:
        for language in (direction.source, direction.target):
            entry = get_builtin(CORPORA[corpus_set][language])
            for file in entry.files:
                out[f"{entry.folder}/{file.name}"] = file.sha256
    return out


# ---- format ------------------------------------------------------------------------------------


def _encode(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def encode_prompts(
    tokenizer: Tokenizer, direction: Direction, sources: Sequence[str], max_source_tokens: int
) -> tuple[list[list[int]], list[int], int]:
    """Per source, [EOS] + prefix + " {source}" (its first max_source_tokens tokens) + separator; the
    source tokens each prompt holds; how many sources were cut."""
    eos = tokenizer_eos_id(tokenizer)
    prefix, separator = _encode(tokenizer, [direction.prefix, direction.separator])
    bodies = _encode(tokenizer, [f" {s}" for s in sources])
    n_cut = sum(len(body) > max_source_tokens for body in bodies)
    bodies = [body[:max_source_tokens] for body in bodies]
    return [[eos, *prefix, *body, *separator] for body in bodies], [len(body) for body in bodies], n_cut


def template_tokens(tokenizer: Tokenizer, direction: Direction) -> int:
    """Tokens of a prompt besides its source: EOS, prefix, separator."""
    return 1 + sum(len(ids) for ids in _encode(tokenizer, [direction.prefix, direction.separator]))


def encode_targets(tokenizer: Tokenizer, targets: Sequence[str]) -> list[list[int]]:
    """" {target}" + [EOS], per target."""
    eos = tokenizer_eos_id(tokenizer)
    return [[*ids, eos] for ids in _encode(tokenizer, [f" {t}" for t in targets])]


def encode_pair(tokenizer: Tokenizer, direction: Direction, source: str, target: str, max_source_tokens: int = 128) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of one pair: the training document is their concatenation."""
    (prompt,), _, _ = encode_prompts(tokenizer, direction, [source], max_source_tokens)
    (target_ids,) = encode_targets(tokenizer, [target])
    return prompt, target_ids


def lm_batch(examples: Sequence[tuple[list[int], list[int]]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """inputs (B, L - 1) and targets (B, L - 1) for (prompt, target) pairs, L the longest pair: position
    j of a row reads token j and is trained to predict token j + 1 only where that token belongs to the
    target; prompt and padding positions are IGNORE."""
    width = max(len(p) + len(t) for p, t in examples) - 1
    inputs = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (prompt, target) in enumerate(examples):
        sequence = prompt + target
        inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        targets[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(target)
    return inputs.to(device), targets.to(device)


# ---- fine-tuning -------------------------------------------------------------------------------


def finetune_translation(
    model: GPT,
    tokenizer: Tokenizer,
    direction: Direction,
    train: Sequence[Pair],
    cfg: TranslationConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> tuple[GPT, dict]:
    """A fine-tuned copy of `model` (the argument is untouched) and the training record: pairs used
    and left out, steps, epochs, the mean loss of the last 50 steps, seconds."""
    device = torch.device(device)
    max_len = min(cfg.max_len, model.cfg.seq_len)
    prompts, _, n_cut = encode_prompts(tokenizer, direction, [p.source for p in train], cfg.max_source_tokens)
    targets = encode_targets(tokenizer, [p.reference for p in train])
    examples = [(p, t) for p, t in zip(prompts, targets) if len(p) + len(t) <= max_len]
    if cfg.steps and not examples:
        raise UserError(f"no training pair fits in max_len={max_len} tokens; raise max_len or lower max_source_tokens")
    started = time.perf_counter()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout; the data order has its own generator
        order_rng = torch.Generator().manual_seed(seed)
        tuned = copy.deepcopy(model).to(device).train()
        order: list[int] = []
        trainer = Finetuner(
            tuned, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
            total_steps=cfg.steps, warmup_frac=cfg.warmup_frac, progress=progress,
        )  # fmt: skip
        with trainer:
            for _ in range(cfg.steps):
                if len(order) < cfg.batch_size:
                    order += torch.randperm(len(examples), generator=order_rng).tolist()
                batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
                loss = tuned(*lm_batch([examples[i] for i in batch], device)).loss
                losses.append(trainer.step(loss, f"fine-tune {direction.name}"))
    tuned.eval()
    last = losses[-50:]
    record = {
        "n_train": len(examples),
        "n_train_too_long": len(prompts) - len(examples),
        "n_train_sources_cut": n_cut,
        "steps": cfg.steps,
        "epochs": cfg.steps * cfg.batch_size / len(examples) if examples else 0.0,
        "train_loss": sum(last) / len(last) if last else None,  # mean over the last 50 steps, nats per target token
        "train_s": round(time.perf_counter() - started, 3),
        "max_len_used": max_len,
        "warmup_steps": trainer.warmup_steps,
    }
    return tuned, record


# ---- decoding ----------------------------------------------------------------------------------


def max_new_tokens(cfg: TranslationConfig, prompt_tokens: int, source_tokens: int, seq_len: int) -> int:
    """The cap on new tokens: max_new_ratio x source tokens + max_new_extra, within the context."""
    return min(math.ceil(cfg.max_new_ratio * source_tokens) + cfg.max_new_extra, seq_len - prompt_tokens)


def decode(
    model: GPT,
    prompts: Sequence[list[int]],
    caps: Sequence[int],
    eos: int,
    batch_size: int,
    device: torch.device,
    beam_size: int | None = None,
    length_penalty: float = 1.0,
) -> list[tuple[list[int], bool]]:
    """Per prompt, its new tokens before EOS and whether EOS ended them: greedy (beam_size None) or
    beam search. Prompts of equal length and cap run as one batch (up to batch_size prompts)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (prompt, cap) in enumerate(zip(prompts, caps)):
        groups.setdefault((len(prompt), cap), []).append(i)
    out: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    for (length, cap), rows in groups.items():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            if beam_size is None:
                new = generate(model, ids, cap, temperature=0, eos_id=eos)[:, length:].tolist()
                found = [(cut_at_eos(row, eos), eos in row) for row in new]
            else:
                found = [(cut_at_eos(h.tokens, eos), h.finished) for h in beam_search(model, ids, cap, beam_size, eos, length_penalty)]
            for i, result in zip(chunk, found, strict=True):
                out[i] = result
    return out


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """sacrebleu corpus BLEU, chrF, chrF++ (default settings) and their signatures."""
    hyps = [as_segment(h) for h in hypotheses]
    refs = [[as_segment(r) for r in references]]
    scorers = {"bleu": BLEU(), "chrf": CHRF(), "chrfpp": CHRF(word_order=2)}
    result: dict = {name: scorer.corpus_score(hyps, refs).score for name, scorer in scorers.items()}
    result["signatures"] = {name: str(scorer.get_signature()) for name, scorer in scorers.items()}
    return result


def tokenizer_coverage(tokenizer: Tokenizer, texts: Sequence[str]) -> dict:
    """Characters per token and tokens per whitespace word of `texts`."""
    tokens = sum(len(ids) for ids in _encode(tokenizer, texts))
    chars = sum(len(t) for t in texts)
    words = sum(len(t.split()) for t in texts)
    return {"chars_per_token": chars / tokens if tokens else None, "tokens_per_word": tokens / words if words else None}


# ---- the task ----------------------------------------------------------------------------------


def run_translation(
    task_name: str,
    model: GPT,
    tokenizer: Tokenizer,
    data_root: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    limit_train: int | None = None,
    eval_sets: Sequence[str] = EVAL_SETS,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
    **hparams,
) -> dict:
    """Fine-tune a copy of `model` on MAFAND train pairs in task `task_name`'s direction, translate
    `eval_sets` greedily and with beam search, score (see the module docstring). `limit` / `limit_train`
    keep a fixed random subset (SUBSET_SEED) of each evaluation set / of the training pairs; `hparams`
    override `TranslationConfig` fields. With `out_dir`, every translation goes to
    OUT/<task>_samples.jsonl."""
    unknown = sorted(set(hparams) - _HPARAMS)
    if unknown:
        raise UserError(f"unknown translation setting(s) {unknown}; choose from {sorted(_HPARAMS)}")
    cfg = TranslationConfig(**hparams)
    direction = get_direction(task_name)
    eval_sets = list(eval_sets)
    if not eval_sets or any(s not in EVAL_SETS for s in eval_sets):
        raise UserError(f"eval_sets {eval_sets} must name one or more of {', '.join(EVAL_SETS)}")
    template = template_tokens(tokenizer, direction)
    if template + cfg.max_source_tokens >= model.cfg.seq_len:
        raise UserError(
            f"max_source_tokens={cfg.max_source_tokens} leaves no room to translate in the model's context of "
            f"{model.cfg.seq_len} tokens; lower it below {model.cfg.seq_len - template}"
        )
    device = torch.device(device)
    eos = tokenizer_eos_id(tokenizer)

    all_train = load_pairs(direction, "mafand_train", data_root)
    train = [all_train[i] for i in subset(len(all_train), limit_train)]
    tuned, record = finetune_translation(model, tokenizer, direction, train, cfg, seed, device, progress)

    coverage = {
        direction.source: tokenizer_coverage(tokenizer, [p.source for p in train]),
        direction.target: tokenizer_coverage(tokenizer, [p.reference for p in train]),
    }
    notes = [
        f"the tokenizer cuts {LANGUAGE_NAMES[lang]} into short pieces ({c['chars_per_token']:.2f} characters per token, under "
        f"{SHORT_PIECES}): it was trained on little or no {LANGUAGE_NAMES[lang]} (or is very small); expect poor translations"
        for lang, c in coverage.items()
        if c["chars_per_token"] is not None and c["chars_per_token"] < SHORT_PIECES
    ]
    if limit is not None:
        notes.append(f"scored on a fixed random subset of {limit} sentences per set, not the whole test sets: not comparable to published scores")

    results: dict[str, dict] = {}
    samples: list[dict] = []
    for corpus_set in eval_sets:
        pairs = load_pairs(direction, corpus_set, data_root)
        pairs = [pairs[i] for i in subset(len(pairs), limit)]
        prompts, source_tokens, n_cut = encode_prompts(tokenizer, direction, [p.source for p in pairs], cfg.max_source_tokens)
        caps = [max_new_tokens(cfg, len(p), n, model.cfg.seq_len) for p, n in zip(prompts, source_tokens)]
        outputs, seconds = {}, {}
        for name, beam_size in (("greedy", None), ("beam", cfg.beam_size)):
            started = time.perf_counter()
            outputs[name] = decode(tuned, prompts, caps, eos, cfg.eval_batch_size, device, beam_size, cfg.length_penalty)
            seconds[name] = time.perf_counter() - started
        texts = {name: [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in out] for name, out in outputs.items()}
        references = [p.reference for p in pairs]
        results[corpus_set] = {"n": len(pairs), "n_sources_cut": n_cut}
        for name, output in outputs.items():
            results[corpus_set][name] = {
                **corpus_scores(texts[name], references),
                "mean_new_tokens": sum(len(ids) for ids, _ in output) / len(pairs),
                "ended_at_eos": sum(ended for _, ended in output) / len(pairs),
                "seconds": round(seconds[name], 3),
            }
        samples += [
            {"set": corpus_set, "line": p.line, "source": p.source, "reference": p.reference, "greedy": g, "beam": b}
            for p, g, b in zip(pairs, texts["greedy"], texts["beam"], strict=True)
        ]
    if out_dir is not None:
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(Path(out_dir) / f"{direction.name}_samples.jsonl", lines)

    headline = results[eval_sets[0]]["beam"]
    return {
        "task": direction.name,
        "source_language": direction.source,
        "target_language": direction.target,
        "bleu": headline["bleu"],
        "chrf": headline["chrf"],
        "chrfpp": headline["chrfpp"],
        "n": results[eval_sets[0]]["n"],
        "headline": f"{eval_sets[0]}, beam search",
        "results": results,
        **record,
        "tokenizer": coverage,
        "notes": notes,
        "settings": {
            "seed": seed,
            **asdict(cfg),
            "format": direction.template,
            "format_parts": [direction.prefix, " {source}", direction.separator, " {target}", "[EOS]"],
            "loss": "cross-entropy on the target tokens and the closing EOS only (prompt and padding ignored), mean per target token",
            "optimizer": OPTIMIZER,
            "schedule": SCHEDULE,
            "dropout": model.cfg.dropout,
            "greedy": "temperature 0, KV cache, prompts of equal length and cap batched",
            "beam": f"beam_size {cfg.beam_size}, score = log-probability / new tokens (EOS included) ** {cfg.length_penalty}, "
            "stops when beam_size hypotheses have ended or at the cap (fairseq's rule), KV cache, prompts of equal length and cap batched",
            "max_new_tokens": f"min(ceil({cfg.max_new_ratio} x source tokens) + {cfg.max_new_extra}, context - prompt tokens)",
            "train_set": "mafand_train",
            "eval_sets": eval_sets,
            "limit": limit,
            "limit_train": limit_train,
            "subset_seed": SUBSET_SEED,
            "text": "lines stripped; pairs with an empty side left out; segments normalised as sacrebleu's command line reads them",
            "hub_id": "masakhane/mafand (English-Swahili); facebook/flores (eng_Latn, swh_Latn devtest)",
            "data": data_hashes(["mafand_train", *eval_sets], direction),
        },
    }
