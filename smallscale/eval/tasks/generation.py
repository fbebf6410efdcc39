"""Generation quality on held-out text: continue the start of val documents, compare with the truth.

Protocol (`run_generation`): the val split's token stream is cut at EOS into documents; those with
at least prompt_tokens + new_tokens tokens are eligible, and n_prompts of them are drawn without
replacement by a numpy generator seeded with `seed` (then kept in stream order). The prompt is the EOS
before a document and its first prompt_tokens tokens (every training document follows an EOS); the
model samples exactly new_tokens more, and the reference is the document's true next new_tokens
tokens. Prompt, continuation and reference are scored as decoded text.

Length is fixed, EOS suppressed: the EOS logit is set to -inf at every sampled position, so every
continuation has the reference's length in tokens. Why: the reference never ends inside its
new_tokens (the document is long enough), and chrF and BLEU reward length (chrF's recall, BLEU's
brevity penalty). A continuation that may stop at EOS makes a better model score *worse*: on the
quickstart, chrF fell from 20.3 to 10.6 as cpu-500k went from 49k to 295k training tokens, because
the better model ended its continuations early (EOS in 19% -> 94% of them, 60 -> 30 new tokens), having
learnt that Shakespeare's speeches are short. With the length fixed, the overlap metrics compare
texts of equal length and measure what the model writes, not when it stops. How much the model
wanted to stop is kept as a diagnostic: `eos_probability`, the mean probability (at temperature 1,
before suppression) it gave EOS over the sampled positions. `settings.eos` records the protocol.

Metrics (`text_metrics`), all on a 0-100 scale except the ratios; what each measures:
- chrF (character n-gram F-score, n <= 6, recall weighted 2x) and chrF++ (word_order=2: word uni-
  and bigrams too): closeness to the true continuation's characters and words: spelling, vocabulary
  and local phrasing of the document. BLEU: word 1-4-gram precision with a brevity penalty; close to
  0 for continuations this short and free, so chrF is the one to read. All three: sacrebleu's
  corpus-level scores with default settings, reported with their signatures. Each segment is first
  made what a one-segment-per-line file gives sacrebleu's command line: line breaks inside it become
  spaces and trailing whitespace is dropped, so `python -m sacrebleu REF -i HYP -m chrf bleu` on such
  files reproduces the numbers.
- distinct-1 / distinct-2 (Li et al., 2016): unique n-grams / all n-grams, pooled over every
  continuation, on whitespace tokens (n-grams never cross continuations). Low = repetitive or generic.
- self-BLEU (Zhu et al., 2018): the mean over continuations of sacrebleu's sentence BLEU
  (effective order, exp smoothing: `sacrebleu.sentence_bleu`'s defaults) of one continuation
  against all the others as its references. High = the samples resemble each other. O(n^2).
- repetition_4: per continuation, the fraction of its whitespace 4-grams that repeat an earlier
  4-gram of the same continuation; averaged over continuations with at least one 4-gram. High = loops.
A ratio with nothing to count (no n-grams, fewer than two continuations for self-BLEU) is None.
distinct-n, self-BLEU and repetition_4 describe the samples (variety, loops); they are diagnostics,
not quality scores: the true text has values of its own, and neither extreme is "better".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from sacrebleu.metrics import BLEU, CHRF
from tokenizers import Tokenizer

from smallscale.data.loader import split_stream
from smallscale.data.shards import load_manifest
from smallscale.data.tokenizer import eos_id as tokenizer_eos_id
from smallscale.errors import UserError
from smallscale.eval.generate import check_length, generate
from smallscale.eval.tasks.perplexity import document_spans
from smallscale.io import atomic_write_text
from smallscale.model.gpt import GPT

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what Python's universal-newline file reading splits on


def as_segment(text: str) -> str:
    """text as one line of a segment-per-line file, read back the way sacrebleu's CLI reads it."""
    return _LINE_BREAK.sub(" ", text).rstrip()


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique / total whitespace n-grams, pooled over all texts; None if there are none."""
    grams = [g for text in texts for g in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(texts: Sequence[str], n: int = 4) -> float | None:
    """Mean over texts (with >= 1 n-gram) of the fraction of n-grams repeating an earlier one."""
    rates = []
    for text in texts:
        grams = _ngrams(text.split(), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else None


def self_bleu(texts: Sequence[str]) -> tuple[float | None, str | None]:
    """Mean sentence BLEU of each text against all the others, and its signature (nrefs = n - 1);
    (None, None) for fewer than two texts."""
    bleu = BLEU(effective_order=True)
    segments = [as_segment(t) for t in texts]
    if len(segments) < 2:
        return None, None
    scores = [
        bleu.sentence_score(hyp, segments[:i] + segments[i + 1 :]).score for i, hyp in enumerate(segments)
    ]
    return sum(scores) / len(scores), str(bleu.get_signature())


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """chrF, chrF++, BLEU (corpus level, one reference each), distinct-1/2, self-BLEU, repetition_4."""
    if len(hypotheses) != len(references):
        raise UserError(f"got {len(hypotheses)} hypotheses but {len(references)} references; give one reference each")
    if not hypotheses:
        raise UserError("no hypotheses to score; give at least one")
    hyps = [as_segment(h) for h in hypotheses]
    refs = [[as_segment(r) for r in references]]
    scorers = {"chrf": CHRF(), "chrfpp": CHRF(word_order=2), "bleu": BLEU()}
    result: dict = {name: scorer.corpus_score(hyps, refs).score for name, scorer in scorers.items()}
    signatures = {name: str(scorer.get_signature()) for name, scorer in scorers.items()}
    result["distinct_1"] = distinct_n(hyps, 1)
    result["distinct_2"] = distinct_n(hyps, 2)
    result["self_bleu"], signatures["self_bleu"] = self_bleu(hyps)
    result["repetition_4"] = repetition_rate(hyps, 4)
    result["signatures"] = signatures
    return result


@contextmanager
def suppressed_eos(model: GPT, eos: int) -> Iterator[list[torch.Tensor]]:
    """While open, the model's EOS logit is -inf at every position (it can never be sampled); yields
    the list to which each forward call appends p(EOS) at its last position before suppression
    (B,), softmax at temperature 1: what the model wanted, which the samples no longer show."""
    eos_probs: list[torch.Tensor] = []

    def hook(module, args, output):
        logits = output.logits  # (B, T, V)
        eos_probs.append(logits[:, -1].float().softmax(dim=-1)[:, eos].cpu())
        return output._replace(logits=logits.index_fill(-1, torch.tensor([eos], device=logits.device), float("-inf")))

    handle = model.register_forward_hook(hook)
    try:
        yield eos_probs
    finally:
        handle.remove()


def run_generation(
    model: GPT,
    tokenizer: Tokenizer,
    dataset_dir: str | Path,
    out_dir: str | Path,
    n_prompts: int = 100,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = 0.95,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict:
    """Sample continuations of exactly new_tokens tokens (EOS suppressed, module docstring) of
    val-document prompts, score them, write OUT/samples.jsonl atomically.

    The model is moved to `device` (in place, as nn.Module.to does). If fewer than n_prompts
    documents are long enough, all of them are used: `n` in the result is the number scored.
    Returns the `text_metrics` values plus n, n_eligible, eos_probability, settings.
    """
    sizes = {"n_prompts": n_prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch_size": batch_size}
    for name, value in sizes.items():
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    check_length(model, 1 + prompt_tokens, new_tokens)  # the EOS before the prompt takes a position
    manifest = load_manifest(dataset_dir)
    eos = int(manifest["eos_id"])
    if tokenizer_eos_id(tokenizer) != eos or tokenizer.get_vocab_size() != manifest["vocab_size"]:
        raise UserError(f"the tokenizer is not the one {str(dataset_dir)!r} was prepared with; load its tokenizer.json")

    stream, _ = split_stream(dataset_dir, "val")
    spans = document_spans(stream, eos)
    starts, lengths = spans[:, 0], spans[:, 1] - spans[:, 0]
    eligible = np.flatnonzero(lengths >= prompt_tokens + new_tokens)
    if len(eligible) == 0:
        raise UserError(
            f"no val document in {str(dataset_dir)!r} has prompt_tokens + new_tokens = {prompt_tokens + new_tokens} "
            f"tokens (longest: {int(lengths.max(initial=0))}); lower prompt_tokens or new_tokens"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=min(n_prompts, len(eligible)), replace=False))
    docs = [stream.read(int(starts[d]), prompt_tokens + new_tokens) for d in chosen]
    prompts = torch.from_numpy(np.stack([np.concatenate([[eos], doc[:prompt_tokens]]) for doc in docs]))  # (n, 1 + prompt_tokens)

    model.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    new_ids: list[list[int]] = []
    eos_probability: list[float] = []  # per prompt: mean p(EOS) over its new_tokens sampled positions
    for start in range(0, len(docs), batch_size):
        batch = prompts[start : start + batch_size].to(device)
        with suppressed_eos(model, eos) as eos_probs:
            out = generate(model, batch, new_tokens, temperature, top_k, top_p, generator=generator)
        assert len(eos_probs) == new_tokens, "one forward call per sampled token"
        new_ids += out[:, 1 + prompt_tokens :].tolist()
        eos_probability += torch.stack(eos_probs).mean(dim=0).tolist()

    settings = {
        "split": "val",
        "seed": seed,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "max_new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "n_prompts": n_prompts,
        "batch_size": batch_size,
        "eos": "suppressed: every continuation has exactly new_tokens tokens, the reference's length",
    }
    samples, hyps, refs = [], [], []
    for doc_index, doc, ids, p_eos in zip(chosen, docs, new_ids, eos_probability, strict=True):
        assert len(ids) == new_tokens and eos not in ids
        sample = {
            "doc_index": int(doc_index),
            "prompt": tokenizer.decode(doc[:prompt_tokens].tolist()),
            "continuation": tokenizer.decode(ids, skip_special_tokens=True),
            "reference": tokenizer.decode(doc[prompt_tokens:].tolist()),
            "new_tokens": len(ids),
            "eos_probability": p_eos,
            "settings": settings,
        }
        samples.append(sample)
        hyps.append(sample["continuation"])
        refs.append(sample["reference"])
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))

    metrics = text_metrics(hyps, refs)
    return {
        **metrics,
        "n": len(samples),
        "n_eligible": int(len(eligible)),
        "eos_probability": sum(eos_probability) / len(samples),
        "settings": settings,
    }
