"""Sampling with the KV cache: it decodes exactly like full recomputation, and every knob does what it says."""

from __future__ import annotations

import pytest
import torch

from smallscale.data.tokenizer import train_tokenizer
from smallscale.errors import UserError
from smallscale.eval.generate import generate, generate_text
from smallscale.model.gpt import GPT, GPTConfig
from tests.conftest import synthetic_docs

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


def tiny_model(position: str = "rope", vocab_size: int = 64, seq_len: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_head=2, d_model=32, position=position))


def prompts(batch: int = 3, length: int = 5, vocab_size: int = 64) -> torch.Tensor:
    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("position", POSITIONS)
def test_greedy_with_cache_equals_greedy_without(position):
    model = tiny_model(position)
    x = prompts()
    cached = generate(model, x, 27, temperature=0)
    recomputed = generate(model, x, 27, temperature=0, use_cache=False)
    assert cached.shape == (3, 32)
    assert torch.equal(cached[:, :5], x)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("position", POSITIONS)
def test_sampling_with_cache_equals_sampling_without(position):
    # Greedy decoding of a random model soon repeats one token; sampling walks varied sequences.
    model = tiny_model(position)
    x = prompts()
    cached = generate(model, x, 27, generator=torch.Generator().manual_seed(5))
    recomputed = generate(model, x, 27, use_cache=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(cached, recomputed)


def test_same_seed_same_samples_different_seed_different():
    model, x = tiny_model(), prompts()
    a = generate(model, x, 20, generator=torch.Generator().manual_seed(0))
    b = generate(model, x, 20, generator=torch.Generator().manual_seed(0))
    c = generate(model, x, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model, x = tiny_model(), prompts()
    greedy = generate(model, x, 20, temperature=0)
    for seed in range(3):
        top_k_1 = generate(model, x, 20, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(seed))
        tiny_p = generate(model, x, 20, temperature=1.5, top_p=1e-6, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(top_k_1, greedy)
        assert torch.equal(tiny_p, greedy)


def test_top_k_and_top_p_restrict_the_support():
    model, x = tiny_model(), prompts()
    # top_k=3: every sampled token is among the 3 most likely under full recomputation.
    out = generate(model, x, 20, top_k=3, generator=torch.Generator().manual_seed(0))
    logits = model(out[:, :-1]).logits[:, 4:]  # (B, 20, V): the distributions the new tokens came from
    assert (logits.topk(3, dim=-1).indices == out[:, 5:, None]).any(-1).all()
    # top_p=0.3: every sampled token has less than 0.3 of the probability ranked above it.
    out = generate(model, x, 20, top_p=0.3, generator=torch.Generator().manual_seed(0))
    probs = model(out[:, :-1]).logits[:, 4:].softmax(-1)
    chosen = probs.gather(-1, out[:, 5:, None])  # (B, 20, 1)
    mass_above = (probs * (probs > chosen)).sum(-1)
    assert (mass_above < 0.3).all()


def test_eos_ends_a_row_and_pads_it_with_eos():
    model, x = tiny_model(), prompts()
    free = generate(model, x, 20, temperature=0)
    eos = int(free[0, 5 + 2])  # row 0's third new token becomes "EOS"
    out = generate(model, x, 20, temperature=0, eos_id=eos)
    for row_free, row in zip(free, out, strict=True):
        new_free = row_free[5:].tolist()
        if eos not in new_free:
            assert row.tolist() == row_free[: len(row)].tolist()
            continue
        end = new_free.index(eos)
        assert row[5 : 5 + end + 1].tolist() == new_free[: end + 1]  # identical up to and including EOS
        assert (row[5 + end :] == eos).all()  # then only EOS


def test_generation_stops_when_every_row_has_ended():
    model, x = tiny_model(), prompts(batch=1)
    first = int(generate(model, x, 1, temperature=0)[0, -1])
    out = generate(model, x, 20, temperature=0, eos_id=first)
    assert out.shape == (1, 6)


def test_prompt_plus_new_tokens_must_fit_the_context():
    model = tiny_model(seq_len=32)
    x = prompts(length=12)
    assert generate(model, x, 20, temperature=0).shape == (3, 32)  # exactly seq_len: fine
    with pytest.raises(UserError, match="context of 32 tokens.*at most 20"):
        generate(model, x, 21)


def test_zero_new_tokens_returns_the_prompt_and_mode_is_restored():
    model, x = tiny_model(), prompts()
    model.train()
    assert torch.equal(generate(model, x, 0), x)
    generate(model, x, 3)
    assert model.training


def test_generate_text_batches_equal_lengths_like_one_by_one():
    tok = train_tokenizer(synthetic_docs(100), "bpe", 300)
    model = tiny_model(vocab_size=tok.get_vocab_size(), seq_len=48)
    texts = ["The cat sat", "A big dog ran under the", "The cat ran", "Then a bird"]
    together = generate_text(model, tok, texts, max_new_tokens=12, temperature=0)
    alone = [generate_text(model, tok, [t], max_new_tokens=12, temperature=0)[0] for t in texts]
    assert together == alone
    assert len(together) == 4 and all(isinstance(t, str) for t in together)
    sampled = generate_text(model, tok, texts, max_new_tokens=12, seed=3)
    assert sampled == generate_text(model, tok, texts, max_new_tokens=12, seed=3)


def test_generate_text_prompts_start_after_an_eos_like_every_training_document():
    tok = train_tokenizer(synthetic_docs(100), "bpe", 300)
    model = tiny_model(vocab_size=tok.get_vocab_size(), seq_len=48)
    eos = tok.token_to_id("<|eos|>")
    ids = tok.encode("The cat sat", add_special_tokens=False).ids
    expected = generate(model, torch.tensor([[eos, *ids]]), 10, temperature=0, eos_id=eos)[0, 1 + len(ids) :].tolist()
    got = generate_text(model, tok, ["The cat sat"], max_new_tokens=10, temperature=0)[0]
    assert got == tok.decode([t for t in expected if t != eos][: expected.index(eos) if eos in expected else None])
    assert isinstance(generate_text(model, tok, [""], max_new_tokens=4, temperature=0)[0], str)  # a new document
