"""The log-likelihood engine every zero-shot task shares, with lm-evaluation-harness conventions.

A request is `(context, continuation)`; its result is the summed log-probability (nats) of the
continuation's tokens given everything before them, whether each of them is the argmax (`is_greedy`),
and how many tokens were scored. Tokenisation follows lm-eval's `TemplateLM` / `HFLM._encode_pair`:

- trailing whitespace of the context moves to the front of the continuation
  (`("Answer: ", "Paris")` is scored as `("Answer:", " Paris")`);
- the continuation's tokens are `encode(context + continuation)` after the first
  `len(encode(context))` tokens, so the continuation is tokenised as it appears in running text.
  Where a token of that whole-string encoding spans the boundary (the context ends inside a word
  and BPE merges across it), the context's own tokens are kept and the continuation is encoded on
  its own instead, so the scored tokens never include context text (lm-eval would split the token);
- every context starts with EOS (`<|eos|>`), the token every training document follows, so the
  text is scored as the start of a document (as lm-eval does for models whose tokenizer adds a BOS,
  e.g. Llama's); an empty context is EOS alone (lm-eval's prefix token);
- inputs longer than the model's context keep their last `seq_len + 1` tokens (left truncation):
  the continuation is always scored whole, on as much context as fits. A continuation longer than
  `seq_len` tokens cannot be scored and is an error.

Requests are deduplicated, sorted by length (longest first), padded on the right and scored with one
forward per batch; results come back in input order. Padding sits after every real token, so the
causal mask keeps it from changing any scored position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from tokenizers import Tokenizer
from torch import nn

from smallscale.data.tokenizer import eos_id
from smallscale.errors import UserError

Request = tuple[str, str]  # (context, continuation)


class LLResult(NamedTuple):
    logprob: float  # sum over the continuation's tokens of ln p(token | preceding tokens)
    is_greedy: bool  # every continuation token is the model's argmax at its position
    n_tokens: int  # continuation tokens scored


Scorer = Callable[[list[Request]], list[LLResult]]  # what a task needs from a model


def encode_request(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for one request, by the conventions in the module docstring."""
    return encode_requests(tokenizer, [(context, continuation)])[0]


def encode_requests(tokenizer: Tokenizer, requests: Sequence[Request]) -> list[tuple[list[int], list[int]]]:
    """`encode_request` for many requests at once."""
    prefix = [eos_id(tokenizer)]
    contexts, continuations = [], []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        continuations.append(continuation)
    # Encode in batches: `encode_batch` runs in Rust threads, which matters for 100k+ requests.
    ctx_ids = [e.ids for e in tokenizer.encode_batch(contexts, add_special_tokens=False)]
    whole_ids = [e.ids for e in tokenizer.encode_batch([c + t for c, t in zip(contexts, continuations)], add_special_tokens=False)]
    pairs: list[tuple[list[int], list[int]]] = []
    for context, continuation, ctx, whole in zip(contexts, continuations, ctx_ids, whole_ids):
        if not context:
            pairs.append((prefix, whole))
        elif whole[: len(ctx)] == ctx and (len(whole) > len(ctx) or not continuation):
            pairs.append((prefix + ctx, whole[len(ctx) :]))
        else:  # a merge across the boundary: keep the context's tokens, encode the continuation alone
            pairs.append((prefix + ctx, tokenizer.encode(continuation, add_special_tokens=False).ids))
    return pairs


def _windows(ctx: list[int], cont: list[int], seq_len: int) -> list[tuple[list[int], int]]:
    """(window tokens, number of continuation tokens it scores) covering the whole continuation.

    Usually one window: the last seq_len + 1 tokens of context + continuation (the model reads all
    but the last). A continuation longer than the context is scored in chunks of seq_len tokens,
    each conditioned on the seq_len tokens before its end (the `loglikelihood_rolling` rule), so
    every continuation token is scored exactly once and nothing is silently dropped.
    """
    full = ctx + cont
    pieces = []
    end = len(full)
    while end > len(ctx):
        n_scored = min(seq_len, end - len(ctx))
        pieces.append((full[max(0, end - seq_len - 1) : end], n_scored))
        end -= n_scored
    return pieces[::-1] or [(full[-(seq_len + 1) :], 0)]


@torch.inference_mode()
def loglikelihood(
    model: nn.Module,
    tokenizer: Tokenizer,
    requests: Sequence[Request],
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> list[LLResult]:
    """Score every `(context, continuation)` request with `model` (a `GPT`: `model(ids).logits`,
    `model.cfg.seq_len`). `device` is where the model lives (default: that of its parameters)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seq_len = model.cfg.seq_len
    pairs = encode_requests(tokenizer, requests)

    # One entry per distinct (tokens, continuation length): BLiMP, for one, repeats sentences.
    index_of: dict[tuple[tuple[int, ...], int], int] = {}
    unique: list[tuple[list[int], int]] = []  # (window tokens, continuation length)
    slots: list[list[int]] = []  # per request, the unique windows whose scores add up to its score
    for ctx, cont in pairs:
        slot = []
        for window, n_scored in _windows(ctx, cont, seq_len):
            key = (tuple(window), n_scored)
            if key not in index_of:
                index_of[key] = len(unique)
                unique.append((window, n_scored))
            slot.append(index_of[key])
        slots.append(slot)

    scores: list[LLResult | None] = [None] * len(unique)
    # Longest first: the first batch shows the peak memory at once; ties by tokens for determinism.
    order = sorted(range(len(unique)), key=lambda i: (-len(unique[i][0]), unique[i][0]))
    order = [i for i in order if unique[i][1] > 0]
    for i in range(len(unique)):
        if unique[i][1] == 0:
            scores[i] = LLResult(0.0, True, 0)  # log p(empty string) = 0

    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, result in zip(batch, _score_batch(model, [unique[i] for i in batch], device)):
                scores[i] = result
    finally:
        model.train(was_training)
    return [_combine([scores[j] for j in slot]) for slot in slots]


def _combine(parts: list[LLResult | None]) -> LLResult:
    assert all(p is not None for p in parts)
    if len(parts) == 1:
        return parts[0]
    return LLResult(sum(p.logprob for p in parts), all(p.is_greedy for p in parts), sum(p.n_tokens for p in parts))


def _score_batch(model: nn.Module, items: list[tuple[list[int], int]], device: torch.device) -> list[LLResult]:
    """One forward over right-padded windows; gather each continuation's token log-probs."""
    lengths = [len(window) - 1 for window, _ in items]  # model inputs drop the last token
    T = max(lengths)
    inputs = torch.zeros(len(items), T, dtype=torch.long)  # pad id 0; padding follows every real token
    targets = torch.zeros(len(items), T, dtype=torch.long)
    scored = torch.zeros(len(items), T, dtype=torch.bool)  # positions predicting a continuation token
    for row, ((window, n_cont), n) in enumerate(zip(items, lengths)):
        inputs[row, :n] = torch.tensor(window[:-1])
        targets[row, :n] = torch.tensor(window[1:])
        scored[row, n - n_cont : n] = True
    inputs, targets, scored = inputs.to(device), targets.to(device), scored.to(device)

    logits = model(inputs).logits.float()  # (B, T, V)
    # log_softmax at the target only: target logit - logsumexp, without a (B, T, V) copy
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    token_logprobs = target_logits - torch.logsumexp(logits, dim=-1)  # (B, T)
    greedy = logits.argmax(dim=-1) == targets  # (B, T)
    sums = torch.where(scored, token_logprobs.double(), 0.0).sum(dim=1)  # (B,) float64
    all_greedy = (greedy | ~scored).all(dim=1)  # (B,)
    return [
        LLResult(float(s), bool(g), n_cont)
        for s, g, (_, n_cont) in zip(sums.tolist(), all_greedy.tolist(), items)
    ]


def model_scorer(
    model: nn.Module, tokenizer: Tokenizer, batch_size: int = 64, device: str | torch.device | None = None
) -> Scorer:
    """`loglikelihood` bound to one model: the form in which tasks take a model."""
    return partial(loglikelihood, model, tokenizer, batch_size=batch_size, device=device)


# ---- turning per-choice log-likelihoods into accuracy -------------------------------------------

# How a choice's log-likelihood is normalised before the argmax, by metric name:
#   acc        none (the sum of token log-probs)
#   acc_norm   divided by the number of characters of the choice text (lm-eval's acc_norm)
#   acc_bytes  divided by the number of UTF-8 bytes of the choice text (lm-eval's acc_bytes;
#              unlike characters, bytes weigh non-Latin scripts by their encoded size)
# The choice text is the answer without the delimiter in front of it, as in lm-eval.
NORMALISATIONS: dict[str, Callable[[str], float]] = {
    "acc": lambda text: 1.0,
    "acc_norm": lambda text: float(max(len(text), 1)),
    "acc_bytes": lambda text: float(max(len(text.encode("utf-8")), 1)),
}


def pick(logprobs: Sequence[float], choices: Sequence[str], metric: str = "acc") -> int:
    """Index of the best choice under `metric`'s normalisation; ties go to the first (as np.argmax)."""
    norm = NORMALISATIONS[metric]
    values = [lp / norm(text) for lp, text in zip(logprobs, choices, strict=True)]
    return max(range(len(values)), key=lambda i: (values[i], -i))


def stderr(p: float, n: int) -> float | None:
    """Standard error of a mean of n Bernoulli outcomes with mean p (sample std, as lm-eval);
    None for a single example (JSON has no NaN)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def choice_accuracy(
    logprobs: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], golds: Sequence[int]
) -> dict[str, float | int | None]:
    """acc, acc_norm, acc_bytes (see NORMALISATIONS), their standard errors, and n, over examples."""
    n = len(golds)
    if n == 0:
        raise UserError("no examples to score; check the task's data and limit")
    out: dict[str, float | int | None] = {}
    for metric in NORMALISATIONS:
        correct = sum(pick(lp, ch, metric) == gold for lp, ch, gold in zip(logprobs, choices, golds, strict=True))
        out[metric] = correct / n
        out[f"{metric}_stderr"] = stderr(correct / n, n)
    out["n"] = n
    return out
