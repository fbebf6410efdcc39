"""The batched log-likelihood engine: equal to a one-forward-per-token loop, lm-eval conventions."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from smallscale.data.tokenizer import train_tokenizer
from smallscale.eval.scoring import choice_accuracy, encode_request, loglikelihood, pick
from smallscale.model.gpt import GPT, GPTConfig, GPTOutput
from tests.conftest import synthetic_docs

SEQ_LEN = 24


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_docs(300), "bpe", 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    # init_std 0.3: far from uniform predictions, so a wrong gather or offset changes the numbers
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), seq_len=SEQ_LEN, n_layer=2, n_head=2, d_model=32, init_std=0.3)
    return GPT(cfg).eval()


REQUESTS = [
    ("The cat sat on the", " mat."),
    ("", "The dog ran under a big tree."),  # empty context: conditioned on EOS
    ("A bird sang", " and then the red cat saw a small dog."),
    ("The dog ", "sat"),  # trailing space moves to the continuation
    ("Then" + " the big red dog ran" * 8, " on the mat."),  # longer than seq_len: left-truncated
    ("Under", " a"),
    ("The mat and the tree and the bird", " sang."),
]


@torch.no_grad()
def brute_force(model, tok, context: str, continuation: str) -> tuple[float, bool, int]:
    """One forward per continuation token over the same window the engine keeps, summed in float64."""
    ctx, cont = encode_request(tok, context, continuation)
    window = (ctx + cont)[-(model.cfg.seq_len + 1) :]
    total, greedy = 0.0, True
    for j in range(len(window) - len(cont), len(window)):
        logits = model(torch.tensor([window[:j]])).logits[0, -1].double()
        total += logits.log_softmax(-1)[window[j]].item()
        greedy &= int(logits.argmax()) == window[j]
    return total, greedy, len(cont)


def test_batched_engine_equals_per_token_loop(model, tok):
    results = loglikelihood(model, tok, REQUESTS, batch_size=3)
    for request, result in zip(REQUESTS, results):
        logprob, greedy, n_tokens = brute_force(model, tok, *request)
        assert result.n_tokens == n_tokens > 0
        assert result.logprob == pytest.approx(logprob, abs=1e-4)
        assert result.is_greedy == greedy
        assert result.logprob < 0


def test_truncation_keeps_the_continuation_and_the_last_context_tokens(model, tok):
    context, continuation = REQUESTS[4]
    ctx, cont = encode_request(tok, context, continuation)
    assert len(ctx) + len(cont) > SEQ_LEN + 1  # the case really truncates
    kept = (ctx + cont)[-(SEQ_LEN + 1) :]
    assert kept[-len(cont) :] == cont and ctx[0] == tok.token_to_id("<|eos|>")  # the leading EOS is dropped first
    # the result is that of the kept window, scored directly in one forward
    (full,) = loglikelihood(model, tok, [(context, continuation)])
    with torch.no_grad():
        logprobs = model(torch.tensor([kept[:-1]])).logits[0].double().log_softmax(-1)
    direct = sum(logprobs[i, kept[i + 1]].item() for i in range(len(kept) - 1 - len(cont), len(kept) - 1))
    assert full.logprob == pytest.approx(direct, abs=1e-5)


@torch.no_grad()
def test_a_continuation_longer_than_the_context_is_scored_in_rolling_windows(model, tok):
    ctx, cont = encode_request(tok, "The", " cat sat" * 20)
    assert len(cont) > SEQ_LEN
    (result,) = loglikelihood(model, tok, [("The", " cat sat" * 20)])
    full = ctx + cont
    total = 0.0  # each token conditioned on the window that ends with its chunk (chunks of SEQ_LEN from the end)
    end = len(full)
    while end > len(ctx):
        n = min(SEQ_LEN, end - len(ctx))
        window = full[max(0, end - SEQ_LEN - 1) : end]
        for j in range(len(window) - n, len(window)):
            total += model(torch.tensor([window[:j]])).logits[0, -1].double().log_softmax(-1)[window[j]].item()
        end -= n
    assert result.n_tokens == len(cont)
    assert result.logprob == pytest.approx(total, abs=1e-4)


def test_empty_context_is_conditioned_on_eos(tok):
    ctx, cont = encode_request(tok, "", "The cat sat.")
    assert ctx == [tok.token_to_id("<|eos|>")] == [2]
    assert cont == tok.encode("The cat sat.").ids


def test_context_continuation_boundary_follows_lm_eval(model, tok):
    # trailing whitespace of the context belongs to the continuation
    assert encode_request(tok, "The cat sat on the ", "mat") == encode_request(tok, "The cat sat on the", " mat")
    # continuation tokens = whole-string tokens after the context's own tokens
    ctx, cont = encode_request(tok, "The cat sat on the", " mat")
    whole = tok.encode("The cat sat on the mat").ids
    assert ctx == [2, *tok.encode("The cat sat on the").ids]  # after the EOS every document follows
    assert ctx[1:] + cont == whole
    a, b = loglikelihood(model, tok, [("The cat sat on the ", "mat"), ("The cat sat on the", " mat")])
    assert a == b


def test_a_token_across_the_boundary_keeps_the_context_tokens(tok):
    # "ca" + "t": the whole string has a token spanning both; context text is never scored
    whole = tok.encode("the cat").ids
    ctx, cont = encode_request(tok, "the ca", "t")
    assert ctx == [2, *tok.encode("the ca").ids]
    assert whole[: len(ctx) - 1] != ctx[1:]  # "Ġcat" spans the boundary: the case the fallback handles
    assert cont == tok.encode("t").ids


def test_results_keep_input_order_for_any_batch_size(model, tok):
    requests = REQUESTS * 3
    random.Random(0).shuffle(requests)
    by_size = [loglikelihood(model, tok, requests, batch_size=size) for size in (1, 7, 64)]
    one_by_one = [loglikelihood(model, tok, [request])[0] for request in requests]
    for results in by_size:
        assert [r.n_tokens for r in results] == [r.n_tokens for r in one_by_one]
        assert [r.is_greedy for r in results] == [r.is_greedy for r in one_by_one]
        for got, want in zip(results, one_by_one):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)


class BigramModel(nn.Module):
    """logits at position t depend only on token t: next-token preferences we can set by hand."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.cfg = SimpleNamespace(seq_len=SEQ_LEN)
        self.table = nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def forward(self, input_ids):
        return GPTOutput(self.table[input_ids], None)


def test_is_greedy_on_a_constructed_model(tok):
    bigram = BigramModel(tok.get_vocab_size())
    ctx, cont = encode_request(tok, "The cat", " sat on the mat.")
    tokens = ctx + cont
    with torch.no_grad():
        for a, b in zip(tokens, tokens[1:]):
            bigram.table[a, b] = 5.0  # each next token of the sentence is the argmax
    greedy, other = loglikelihood(bigram, tok, [("The cat", " sat on the mat."), ("The cat", " sat on the tree.")])
    assert greedy.is_greedy and not other.is_greedy
    assert other.logprob < greedy.logprob
    # with only bigram preferences, each token's log-prob is exact: 5 - logsumexp over the row
    row = torch.zeros(tok.get_vocab_size())
    row[0] = 5.0
    assert greedy.logprob == pytest.approx(len(cont) * (5.0 - torch.logsumexp(row, 0).item()), abs=1e-4)


def test_pick_normalisations():
    # acc: raw sum; acc_norm: per character; acc_bytes: per UTF-8 byte ("é" is 1 char, 2 bytes)
    assert pick([-10.0, -12.0], ["ab", "abcdef"], "acc") == 0
    assert pick([-10.0, -12.0], ["ab", "abcdef"], "acc_norm") == 1
    logprobs, choices = [-4.0, -3.0], ["\u00e9\u00e9", "ab"]
    assert (pick(logprobs, choices, "acc"), pick(logprobs, choices, "acc_norm"), pick(logprobs, choices, "acc_bytes")) == (1, 1, 0)
    assert pick([-1.0, -1.0], ["a", "b"]) == 0  # ties go to the first choice


def test_choice_accuracy_counts_and_stderr():
    metrics = choice_accuracy([[-1.0, -2.0], [-1.0, -2.0], [-3.0, -2.0], [-3.0, -2.0]], [["a", "b"]] * 4, [0, 1, 1, 1])
    assert metrics["acc"] == 0.75 and metrics["n"] == 4
    assert metrics["acc_stderr"] == pytest.approx((0.75 * 0.25 / 3) ** 0.5)
