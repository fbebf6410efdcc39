"""Position encodings against their definitions in the papers."""

import math

import pytest
import torch

from smallscale.model import GPTConfig, PositionEncoding
from smallscale.model.positions import alibi_bias, alibi_slopes, apply_rotary, rope_cos_sin, sinusoidal_table


def test_rope_equals_complex_rotation_reference():
    # Llama's non-interleaved layout: dims i and i + hs/2 are the real and imaginary parts of one
    # complex number, rotated by pos * base^(-2i/hs).
    torch.manual_seed(0)
    n_pos, hs, base = 64, 16, 10000.0
    x = torch.randn(2, 3, n_pos, hs)  # (B, nh, T, hs)
    cos, sin = rope_cos_sin(n_pos, hs, base)
    rotated = apply_rotary(x, cos, sin)

    x64 = x.double()
    z = torch.complex(x64[..., : hs // 2], x64[..., hs // 2 :])
    theta = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * theta  # (T, hs/2)
    expected = z * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat((expected.real, expected.imag), dim=-1)
    torch.testing.assert_close(rotated.double(), expected, atol=2e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hs = 8
    q, k = torch.randn(hs), torch.randn(hs)
    cos, sin = rope_cos_sin(40, hs, 10000.0)

    def score(i: int, j: int) -> float:
        return float(apply_rotary(q, cos[i], sin[i]) @ apply_rotary(k, cos[j], sin[j]))

    assert score(7, 3) == pytest.approx(score(30, 26), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_alibi_slopes_for_8_heads_are_powers_of_one_half():
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


def test_alibi_slopes_for_6_heads_follow_the_paper_rule():
    # closest power of 2 is 4: 2^-2, 2^-4, 2^-6, 2^-8; then every other slope of 8 heads: 2^-1, 2^-3
    assert torch.equal(alibi_slopes(6), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]))


def test_alibi_slopes_for_12_heads_interleave_half_integer_exponents():
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected), atol=1e-7, rtol=0)


def test_alibi_bias_is_distance_penalty_with_causal_mask():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), start=0, T=3)  # (1, nh, T, S)
    inf = float("inf")
    expected_head0 = torch.tensor([[0.0, -inf, -inf], [-0.5, 0.0, -inf], [-1.0, -0.5, 0.0]])
    assert bias.shape == (1, 2, 3, 3)
    assert torch.equal(bias[0, 0], expected_head0)
    assert torch.equal(bias[0, 1], expected_head0 / 2)


def test_alibi_bias_with_offset_is_the_last_rows_of_the_full_bias():
    slopes = alibi_slopes(4)
    full = alibi_bias(slopes, start=0, T=7)
    assert torch.equal(alibi_bias(slopes, start=5, T=2), full[:, :, 5:])


def test_sinusoidal_table_equals_vaswani_formula():
    n_pos, dim = 50, 12
    table = sinusoidal_table(n_pos, dim)
    expected = torch.zeros(n_pos, dim, dtype=torch.float64)
    for pos in range(n_pos):
        for i in range(dim // 2):
            expected[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / dim))
            expected[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / dim))
    torch.testing.assert_close(table.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(sinusoidal_table(n_pos, dim, rms=0.02), table * 0.02 * math.sqrt(2))


@pytest.mark.parametrize("d_model, init_std", [(48, 0.02), (112, 0.02), (64, 0.05)])
def test_sinusoidal_positions_are_as_strong_as_the_token_embedding_at_init(d_model, init_std):
    from smallscale.model.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=512, seq_len=256, n_layer=1, n_head=4, d_model=d_model, position="sinusoidal", init_std=init_std)
    model = GPT(cfg)
    position_rms = model.positions.embed(0, 256).pow(2).mean().sqrt().item()
    token_rms = model.tok_emb.weight.pow(2).mean().sqrt().item()
    assert position_rms == pytest.approx(init_std, rel=0.02)
    assert position_rms / token_rms == pytest.approx(1.0, abs=0.1)  # unscaled: 0.71 / 0.02 = 35x


@pytest.mark.parametrize(
    "position, answers",
    [
        ("learned", (True, False, False)),
        ("sinusoidal", (True, False, False)),
        ("rope", (False, True, False)),
        ("alibi", (False, False, True)),
        ("none", (False, False, False)),
    ],
)
def test_each_encoding_answers_only_its_own_question(position, answers):
    cfg = GPTConfig(vocab_size=11, seq_len=16, n_layer=1, n_head=2, d_model=8, position=position)
    enc = PositionEncoding(cfg)
    embed, rotary, bias = enc.embed(3, 5), enc.rotary(3, 5), enc.attn_bias(3, 5, torch.float32)
    assert (embed is not None, rotary is not None, bias is not None) == answers
    if embed is not None:
        assert embed.shape == (5, 8)
    if rotary is not None:
        assert rotary[0].shape == rotary[1].shape == (5, 4)
    if bias is not None:
        assert bias.shape == (1, 2, 5, 8)
    assert (len(list(enc.parameters())) > 0) == (position == "learned")
    assert enc.state_dict().keys() == ({"pos_emb.weight"} if position == "learned" else set())
