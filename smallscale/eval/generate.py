"""Sampling from a GPT with its KV cache: greedy, temperature, top-k and nucleus (top-p).

With the cache the prompt is run once (prefill), then each step feeds only the one new token and
attends to the cached keys and values; `use_cache=False` reruns the whole sequence every step (the
reference the cached path must match, and the speed baseline in `bench/bench_generate.py`).

Length: the prompt plus `max_new_tokens` must fit in the model's context (`cfg.seq_len`); a longer
request is an error rather than a silent left-truncation of the prompt, so a continuation is always
conditioned on exactly the prompt it is reported with.

Prompts in one call share a length (no padding): the model has no padding mask, and left-padding
would shift every absolute position and let the row attend to the pads. `generate_text` therefore
batches prompts of equal token length together, so each row decodes exactly as it would alone.

Beam search (`beam_search`; prompts of one length searched together, their beams as the batch
rows): each step extends every live beam of a prompt by every token and keeps the `beam_size` best
extensions by summed log-probability; an extension by EOS that ranks among the best `beam_size`
ends a hypothesis, which is set aside with its score = summed log-probability / (new tokens, EOS
included) ** length_penalty (the length normalisation of fairseq and Hugging Face; 1.0, their
default, is the mean log-probability per token; 0 is the plain sum, which favours short outputs).
A prompt's search stops once `beam_size` of its hypotheses have ended (fairseq's rule) or after
max_new_tokens, when its live beams count as unfinished hypotheses; the best score wins. With the
cache, the rows of the beams that survive a step are gathered (`KVCache.reorder`) before the next
token runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from smallscale.data.tokenizer import eos_id as tokenizer_eos_id
from smallscale.errors import UserError
from smallscale.model.gpt import GPT


def check_length(model: GPT, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise a UserError unless prompt + new tokens fit in the model's context."""
    seq_len = model.cfg.seq_len
    if prompt_tokens + max_new_tokens > seq_len:
        raise UserError(
            f"a {prompt_tokens}-token prompt plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{seq_len} tokens; shorten the prompt or lower max_new_tokens to at most {seq_len - prompt_tokens}"
        )


def check_prompts(model: GPT, input_ids: Tensor, max_new_tokens: int) -> tuple[int, int]:
    """(batch, prompt tokens) of input_ids; a UserError unless it is a (batch, tokens) long tensor
    with at least one token per row whose prompts plus max_new_tokens fit the model's context."""
    if input_ids.dim() != 2 or input_ids.size(1) == 0 or input_ids.dtype != torch.long:
        raise UserError(
            f"input_ids must be a non-empty (batch, tokens) long tensor, got shape {tuple(input_ids.shape)} "
            f"and dtype {input_ids.dtype}"
        )
    check_length(model, input_ids.size(1), max_new_tokens)
    return input_ids.size(0), input_ids.size(1)


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V).

    temperature 0 is greedy (argmax; top_k and top_p are then irrelevant). Otherwise the logits are
    divided by the temperature, top-k keeps the k largest (ties with the k-th kept too), then top-p
    keeps the smallest set of most likely tokens whose probability reaches top_p (always at least
    the most likely one), and one token is drawn from the renormalised rest: the order and
    semantics of Hugging Face's warpers.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p  # the top-ranked token has 0 before it: always kept
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each prompt row of input_ids (B, T) by up to max_new_tokens sampled tokens.

    Returns (B, T + n) long on input_ids' device: the prompts followed by the new tokens, with
    n <= max_new_tokens. With eos_id, a row that samples EOS is finished: its later positions are
    filled with EOS, and generation stops as soon as every row has finished (so n can be smaller).
    Sampling draws from `generator` (on the model's device) if given, else torch's global RNG.
    The model runs in eval mode (no dropout) and gets its previous mode back afterwards.
    """
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1] or None, got {top_p}")
    B, T = check_prompts(model, input_ids, max_new_tokens)

    device = model.tok_emb.weight.device
    tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    tokens[:, :T] = input_ids
    if max_new_tokens == 0:
        return tokens.to(input_ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    try:
        cache = model.make_cache(B, max_len=T + max_new_tokens) if use_cache else None
        logits = model(tokens[:, :T], cache=cache).logits[:, -1]  # (B, V)
        n_new = 0
        while True:
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                next_ids = next_ids.masked_fill(finished, eos_id)
                finished |= next_ids == eos_id
            tokens[:, T + n_new] = next_ids
            n_new += 1
            if n_new == max_new_tokens or (eos_id is not None and bool(finished.all())):
                break
            if use_cache:
                logits = model(next_ids[:, None], cache=cache).logits[:, -1]
            else:
                logits = model(tokens[:, : T + n_new]).logits[:, -1]
    finally:
        model.train(was_training)
    return tokens[:, : T + n_new].to(input_ids.device)


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    batch_size: int = 16,
) -> list[str]:
    """The continuation (new text only, prompt excluded) of each prompt, in the order given.

    Each prompt is encoded after an EOS, as every training document starts after one (an empty
    prompt starts a new document); text that spells a special token stays text. Prompts with the
    same token length run as one batch (up to batch_size rows), groups in order of first
    appearance, all drawing from one generator seeded with `seed`: the output is a deterministic
    function of (prompts, settings, seed, batch_size). With stop_at_eos a continuation ends before
    the tokenizer's EOS.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    document_start = tokenizer_eos_id(tokenizer)
    encoded = [[document_start, *enc.ids] for enc in tokenizer.encode_batch(list(prompts), add_special_tokens=False)]
    eos = document_start if stop_at_eos else None
    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)

    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    continuations: list[str] = [""] * len(encoded)
    for length, rows in by_length.items():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            out = generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos, generator=generator)
            for i, new_ids in zip(chunk, out[:, length:].tolist(), strict=True):
                continuations[i] = tokenizer.decode(cut_at_eos(new_ids, eos), skip_special_tokens=True)
    return continuations


def cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """ids up to (not including) the first EOS."""
    if eos_id is None or eos_id not in ids:
        return ids
    return ids[: ids.index(eos_id)]


@dataclass(frozen=True)
class Hypothesis:
    """One output of beam search."""

    tokens: list[int]  # the new tokens, ending with EOS when `finished`
    logprob: float  # summed natural-log probability of `tokens` after the prompt
    score: float  # logprob / len(tokens) ** length_penalty: what hypotheses are ranked by
    finished: bool  # ended with EOS (else stopped at max_new_tokens)


@torch.no_grad()
def beam_search(
    model: GPT,
    input_ids: Tensor,
    max_new_tokens: int,
    beam_size: int = 4,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
    use_cache: bool = True,
) -> list[Hypothesis]:
    """The best continuation of each prompt row of input_ids (B, T) by beam search (see the module
    docstring), in row order. The prompts share a length, as in `generate`; their beams run as one
    batch of up to B * beam_size rows, and a prompt's rows leave the batch when its search stops.
    Without eos_id no hypothesis ends early. beam_size 1 is greedy decoding. The model runs in eval
    mode and gets its previous mode back afterwards."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1 for beam search, got {max_new_tokens}")
    if beam_size < 1:
        raise UserError(f"beam_size must be >= 1, got {beam_size}")
    if not length_penalty >= 0:
        raise UserError(f"length_penalty must be >= 0 (1 = mean log-probability per token), got {length_penalty}")
    if beam_size >= model.cfg.vocab_size:
        raise UserError(f"beam_size {beam_size} must be smaller than the vocabulary ({model.cfg.vocab_size} tokens)")
    n_prompts, T = check_prompts(model, input_ids, max_new_tokens)

    device = model.tok_emb.weight.device
    prompts = input_ids.to(device)
    active = list(range(n_prompts))  # prompts still searching; each owns `width` consecutive rows
    width = 1  # live beams per active prompt: the prompt itself before the first step
    live = torch.empty(n_prompts, 0, dtype=torch.long, device=device)  # (rows, n) new tokens of the live beams
    live_logprob = torch.zeros(n_prompts, device=device)  # (rows,) their summed log-probabilities
    ended: list[list[Hypothesis]] = [[] for _ in range(n_prompts)]

    def hypothesis(row: int, token: int, logprob: float, finished: bool) -> Hypothesis:
        tokens = [*live[row].tolist(), token]
        return Hypothesis(tokens, logprob, logprob / len(tokens) ** length_penalty, finished)

    was_training = model.training
    model.eval()
    try:
        cache = model.make_cache(n_prompts, max_len=T + max_new_tokens) if use_cache else None
        logits = model(prompts, cache=cache).logits[:, -1]  # (rows, V)
        for step in range(max_new_tokens):
            last_step = step == max_new_tokens - 1
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (rows, V)
            vocab = logprobs.size(-1)
            extended = (live_logprob[:, None] + logprobs).view(len(active), width * vocab)  # every beam x every token
            # 2 * beam_size candidates per prompt: at most width <= beam_size end in EOS, so beam_size stay live
            top_logprob, top_index = extended.topk(min(2 * beam_size, width * vocab), dim=-1)  # (prompts, 2 * beam_size)
            top_rows = (top_index // vocab + torch.arange(len(active), device=device)[:, None] * width).tolist()
            top_tokens, top_values = (top_index % vocab).tolist(), top_logprob.tolist()
            survivors: list[tuple[int, int, float]] = []  # (row extended, token, summed log-probability)
            still_active = []
            for slot, prompt in enumerate(active):
                keep = []
                for rank, (row, token, value) in enumerate(zip(top_rows[slot], top_tokens[slot], top_values[slot])):
                    if token == eos_id:
                        if rank < beam_size:  # an EOS outside the best beam_size is dropped, as in fairseq
                            ended[prompt].append(hypothesis(row, token, value, finished=True))
                    elif len(keep) < beam_size:
                        keep.append((row, token, value))
                if last_step:
                    ended[prompt] += [hypothesis(row, token, value, finished=False) for row, token, value in keep]
                elif len(ended[prompt]) < beam_size:
                    assert len(keep) == beam_size, "a vocabulary larger than beam_size leaves beam_size live candidates"
                    survivors += keep
                    still_active.append(prompt)
            if not still_active:
                break
            active, width = still_active, beam_size
            source_rows = torch.tensor([row for row, _, _ in survivors], device=device)  # (rows',) the beam each survivor extends
            new_tokens = torch.tensor([token for _, token, _ in survivors], device=device)  # (rows',)
            live = torch.cat([live[source_rows], new_tokens[:, None]], dim=1)
            live_logprob = torch.tensor([value for _, _, value in survivors], device=device)
            if cache is not None:
                cache.reorder(source_rows)
                logits = model(new_tokens[:, None], cache=cache).logits[:, -1]
            else:
                prompt_rows = torch.tensor(active, device=device).repeat_interleave(width)
                logits = model(torch.cat([prompts[prompt_rows], live], dim=1)).logits[:, -1]
    finally:
        model.train(was_training)
    assert all(ended), "every search ends at least one hypothesis"
    return [max(hypotheses, key=lambda h: h.score) for hypotheses in ended]
