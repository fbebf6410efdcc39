"""Beam search with a KV cache: greedy at beam size 1, better than greedy where greedy is myopic, the
length normalisation it records, and the cache's row gathering (`KVCache.reorder`).

The hand-built model is a GPT whose next-token distribution depends only on the last token (a
bigram table): its blocks are zeroed, the embedding is one-hot and the head reads the table, so
every probability below is exact and the best sequence can be worked out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from smallscale.errors import UserError
from smallscale.eval.generate import beam_search, generate
from smallscale.model.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

START, EOS, A, B, C = range(5)  # token ids of the bigram model
OTHER = 1e-6  # probability of every transition not listed


def bigram_gpt(transitions: dict[int, dict[int, float]], vocab: int = 5) -> GPT:
    """A GPT with P(next = j | last = i) = transitions[i][j] (OTHER for unlisted j, renormalised)."""
    probs = torch.full((vocab, vocab), OTHER)
    for i, row in transitions.items():
        for j, p in row.items():
            probs[i, j] = p
    table = (probs / probs.sum(dim=1, keepdim=True)).log()  # (V, V) next-token log-probs
    model = GPT(GPTConfig(vocab_size=vocab, seq_len=16, n_layer=1, n_head=1, d_model=vocab, position="none", tie_embeddings=False))
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.zero_()  # each block adds 0 to the residual stream
        model.tok_emb.weight.copy_(torch.eye(vocab))
        gain = (1 / vocab + model.cfg.norm_eps) ** -0.5  # RMSNorm of a one-hot row: gain * one-hot
        model.lm_head.weight.copy_(table.T / gain)  # logits after token i = table[i]
    return model.eval()


# From START greedy takes A (0.55) and then ends (0.4): P = 0.22. B (0.45) then EOS (0.9) is 0.405.
MYOPIC = {START: {A: 0.55, B: 0.45}, A: {EOS: 0.4, B: 0.3, C: 0.3}, B: {EOS: 0.9, A: 0.05, C: 0.05}, C: {EOS: 1.0}}
# [EOS] has P 0.45 (log -0.80); [A, EOS] has P 0.3 (log -1.20) but -0.60 per token.
SHORT_OR_LONG = {START: {A: 0.5, EOS: 0.45}, A: {EOS: 0.6, B: 0.4}, B: {EOS: 1.0}, C: {EOS: 1.0}}


def test_bigram_model_gives_the_table_probabilities():
    model = bigram_gpt(MYOPIC)
    logprobs = model(torch.tensor([[START, A]])).logits.log_softmax(-1)[0]
    assert logprobs[0, A].exp().item() == pytest.approx(0.55, rel=1e-4)
    assert logprobs[1, EOS].exp().item() == pytest.approx(0.4, rel=1e-4)


def test_beam_search_finds_the_likelier_sequence_greedy_misses():
    model = bigram_gpt(MYOPIC)
    prompt = torch.tensor([[START]])
    greedy = generate(model, prompt, 4, temperature=0, eos_id=EOS)[0, 1:].tolist()
    assert greedy[:2] == [A, EOS]
    (best,) = beam_search(model, prompt, 4, beam_size=2, eos_id=EOS)
    assert best.tokens == [B, EOS] and best.finished
    assert best.logprob == pytest.approx(math.log(0.45 * 0.9), rel=1e-4)
    assert beam_search(model, prompt, 4, beam_size=1, eos_id=EOS)[0].tokens == [A, EOS]


@pytest.mark.parametrize("length_penalty,expected", [(0.0, [EOS]), (1.0, [A, EOS])])
def test_length_penalty_ranks_by_sum_or_by_mean_log_probability(length_penalty, expected):
    (best,) = beam_search(bigram_gpt(SHORT_OR_LONG), torch.tensor([[START]]), 4, beam_size=2, eos_id=EOS, length_penalty=length_penalty)
    assert best.tokens == expected
    assert best.score == pytest.approx(best.logprob / len(best.tokens) ** length_penalty)


def test_without_eos_the_search_runs_to_max_new_tokens_unfinished():
    (best,) = beam_search(bigram_gpt(MYOPIC), torch.tensor([[START]]), 3, beam_size=3)
    assert len(best.tokens) == 3 and not best.finished


@pytest.fixture(scope="module")
def random_gpt() -> GPT:
    torch.manual_seed(0)  # init_std 0.3: peaked, far-from-tied next-token distributions
    return GPT(GPTConfig(vocab_size=64, seq_len=48, n_layer=2, n_head=2, d_model=32, init_std=0.3)).eval()


PROMPTS = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (1, 5, 9, 17)]


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"{len(p)}-token prompt")
def test_beam_size_one_is_greedy_decoding(random_gpt, prompt):
    eos = 7
    greedy = generate(random_gpt, prompt[None], 24, temperature=0, eos_id=eos)[0, len(prompt) :].tolist()
    ended = greedy[: greedy.index(eos) + 1] if eos in greedy else greedy
    assert beam_search(random_gpt, prompt[None], 24, beam_size=1, eos_id=eos)[0].tokens == ended


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"{len(p)}-token prompt")
def test_cached_and_uncached_beam_search_agree(random_gpt, prompt):
    (cached,) = beam_search(random_gpt, prompt[None], 20, beam_size=3, eos_id=7)
    (uncached,) = beam_search(random_gpt, prompt[None], 20, beam_size=3, eos_id=7, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert cached.logprob == pytest.approx(uncached.logprob, abs=1e-4)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_prompts_searched_together_get_the_hypotheses_they_get_alone(random_gpt, use_cache):
    model = copy.deepcopy(random_gpt)
    with torch.no_grad():
        model.tok_emb.weight[7] *= 3  # a likelier EOS (the head is tied), so searches end at different steps
    prompts = torch.randint(0, 64, (6, 4), generator=torch.Generator().manual_seed(0))
    together = beam_search(model, prompts, 16, beam_size=3, eos_id=7, use_cache=use_cache)
    alone = [beam_search(model, p[None], 16, beam_size=3, eos_id=7, use_cache=use_cache)[0] for p in prompts]
    assert [h.tokens for h in together] == [h.tokens for h in alone]
    assert [h.logprob for h in together] == pytest.approx([h.logprob for h in alone], abs=1e-4)
    assert len({len(h.tokens) for h in together}) > 1  # the prompts' searches stop at different steps


def test_kv_cache_reorder_gathers_and_expands_rows(random_gpt):
    prompts = torch.stack([p[:5] for p in PROMPTS[1:]])  # (3, 5), three different prompts
    order = torch.tensor([2, 0, 0, 1])  # a permutation with a repeat: 3 rows become 4
    cache = random_gpt.make_cache(3)
    random_gpt(prompts, cache=cache)
    cache.reorder(order)
    reordered = random_gpt(torch.full((4, 1), 3), cache=cache).logits
    fresh = random_gpt.make_cache(4)
    random_gpt(prompts[order], cache=fresh)
    expected = random_gpt(torch.full((4, 1), 3), cache=fresh).logits
    torch.testing.assert_close(reordered, expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"beam_size": 0}, "beam_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"length_penalty": -1.0}, "length_penalty"),
        ({"input_ids": torch.tensor([1, 2, 3])}, r"\(batch, tokens\)"),
        ({"max_new_tokens": 60}, "exceeds the model's context"),
        ({"beam_size": 64}, "smaller than the vocabulary"),
    ],
)
def test_bad_arguments_are_user_errors(random_gpt, kwargs, message):
    args = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 4, "beam_size": 2, **kwargs}
    with pytest.raises(UserError, match=message):
        beam_search(random_gpt, **args)


@pytest.mark.parametrize(
    "prompt", [torch.tensor([START, A]), torch.tensor([[0.0, 1.0]]), torch.zeros((2, 0), dtype=torch.long)],
    ids=["1-d", "float", "no-tokens"],
)
def test_beam_search_and_generate_refuse_a_bad_prompt_alike(prompt):
    model = bigram_gpt(MYOPIC)
    messages = []
    for decode in (beam_search, generate):
        with pytest.raises(UserError, match=r"input_ids must be a non-empty \(batch, tokens\) long tensor") as err:
            decode(model, prompt, 2)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_beam_search_over_no_prompts_returns_no_hypotheses():
    assert beam_search(bigram_gpt(MYOPIC), torch.zeros((0, 3), dtype=torch.long), 2) == []
