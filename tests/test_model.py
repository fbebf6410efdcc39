"""The GPT model: training signal, causality, KV-cache decoding, checkpointing, counts, presets, config."""

import dataclasses
import math

import pytest
import torch

from smallscale.model import GPT, PRESETS, GPTConfig, KVCache, preset_config, preset_table

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


def tiny(**overrides) -> GPTConfig:
    shape = {"vocab_size": 97, "seq_len": 32, "n_layer": 2, "n_head": 4, "d_model": 64}
    return GPTConfig(**{**shape, **overrides})


def random_ids(B: int, T: int, seed: int = 0, vocab_size: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", POSITIONS)
def test_adamw_steps_on_a_fixed_batch_lower_the_loss(position):
    torch.manual_seed(0)
    model = GPT(tiny(position=position))
    ids = random_ids(4, 33)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(inputs, targets).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(97), abs=0.1)  # near-uniform predictions at init
    assert losses[-1] < losses[0] - 1.0


def test_loss_ignores_targets_marked_minus_100():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    ids = random_ids(2, 9)
    targets = ids[:, 1:].clone()
    targets[:, :4] = -100
    out = model(ids[:, :-1], targets)
    kept_logits, kept_targets = out.logits[:, 4:].reshape(-1, 97), targets[:, 4:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(kept_logits, kept_targets)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("position", POSITIONS)
def test_logits_never_depend_on_later_tokens(position):
    torch.manual_seed(0)
    model = GPT(tiny(position=position)).eval()
    ids = random_ids(2, 32)
    logits = model(ids).logits
    for t in (0, 9, 30):
        changed = ids.clone()
        changed[:, t + 1 :] = random_ids(2, 31 - t, seed=t + 1)
        changed_logits = model(changed).logits
        torch.testing.assert_close(changed_logits[:, : t + 1], logits[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(changed_logits[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_kv_cache_decoding_equals_full_forward(position, qk_norm):
    torch.manual_seed(0)
    model = GPT(tiny(position=position, qk_norm=qk_norm)).eval()
    ids = random_ids(2, 32)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache(batch_size=2)
        pieces = [model(ids[:, :7], cache=cache).logits, model(ids[:, 7:12], cache=cache).logits]  # chunks
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(12, 32)]  # one token at a time
    assert cache.length == 32
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_refuses_to_run_past_its_length():
    model = GPT(tiny()).eval()
    cache = KVCache(model.cfg, batch_size=1, max_len=4)
    model(random_ids(1, 3), cache=cache)
    with pytest.raises(ValueError, match="context of 4 tokens"):
        model(random_ids(1, 2), cache=cache)
    with pytest.raises(ValueError, match="context of 32 tokens"):
        model(random_ids(1, 33))


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_grad_checkpointing_gives_identical_gradients(position):
    torch.manual_seed(0)
    plain = GPT(tiny(position=position))
    recomputed = GPT(tiny(position=position, grad_checkpointing=True))
    recomputed.load_state_dict(plain.state_dict())
    ids = random_ids(2, 33)
    for model in (plain, recomputed):
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)


def test_num_params_matches_hand_count_untied_gpt2_style():
    model = GPT(tiny(position="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False))
    V, T, C, F = 97, 32, 64, 256
    per_layer = (
        2 * C  # attn_norm weight + bias
        + C * 3 * C + 3 * C  # qkv
        + C * C + C  # attn proj
        + 2 * C  # mlp_norm
        + C * F + F  # fc
        + F * C + C  # mlp proj
    )
    total = V * C + T * C + 2 * per_layer + 2 * C + V * C  # tok_emb, pos_emb, blocks, norm_f, lm_head
    assert model.num_params() == total == 114_560
    assert model.num_params(non_embedding=True) == 2 * per_layer + 2 * C
    assert model.flops_per_token() == 6 * (total - T * C - V * C) + 12 * 2 * C * T  # lookups are not matmuls


def test_num_params_counts_the_tied_embedding_once():
    model = GPT(tiny())  # rope, rmsnorm, swiglu (hidden 192), no bias, tied
    V, C, F = 97, 64, 192
    per_layer = C + 4 * C * C + C + 3 * C * F
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.num_params() == V * C + 2 * per_layer + C == 113_024
    assert model.num_params(non_embedding=True) == 2 * per_layer + C
    assert model.flops_per_token(seq_len=100) == 6 * 113_024 + 12 * 2 * C * 100


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=128))
    stds = {name: p.std().item() for name, p in model.named_parameters() if p.dim() == 2}
    assert stds["blocks.0.attn.qkv.weight"] == pytest.approx(0.02, rel=0.05)
    assert stds["blocks.3.attn.proj.weight"] == pytest.approx(0.02 / 4, rel=0.05)
    assert stds["blocks.3.mlp.proj.weight"] == pytest.approx(0.02 / 4, rel=0.05)


def test_meta_init_then_to_empty_and_init_weights_restores_position_buffers():
    reference = GPT(tiny(position="rope"))
    with torch.device("meta"):
        model = GPT(tiny(position="rope"))
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.positions.cos, reference.positions.cos)
    assert torch.equal(model.positions.sin, reference.positions.sin)
    assert torch.isfinite(model(random_ids(1, 8)).logits).all()


NOMINAL = {
    "cpu-500k": 0.5e6, "cpu-2m": 2e6, "cpu-6m": 6e6, "20m": 20e6, "40m": 40e6, "80m": 80e6, "160m": 160e6
}


def default_arch_params(vocab_size: int, n_layer: int, d_model: int) -> int:
    hidden = 64 * math.ceil(8 * d_model / 3 / 64)
    return vocab_size * d_model + n_layer * (4 * d_model**2 + 3 * d_model * hidden + 2 * d_model) + d_model


def test_presets_are_within_6_percent_of_their_names():
    assert PRESETS.keys() == NOMINAL.keys()
    for row in preset_table():
        assert abs(row["params"] / NOMINAL[row["name"]] - 1) < 0.06, row


def test_cpu_preset_widths_and_head_dims_are_multiples_of_16():
    # matmuls at these sizes run best (or no worse) at multiples of 16: bench/bench_cpu_presets.py
    for name, shape in PRESETS.items():
        assert shape["d_model"] % 16 == 0 and (shape["d_model"] // shape["n_head"]) % 16 == 0, name


def test_preset_table_is_exact():
    for vocab_size in (None, 50257):
        for row in preset_table(vocab_size=vocab_size):
            shape = PRESETS[row["name"]]
            V = vocab_size or shape["vocab_size"]
            params = default_arch_params(V, shape["n_layer"], shape["d_model"])
            assert row["params"] == params
            assert row["non_embedding_params"] == params - V * shape["d_model"]
            attention_flops = 12 * shape["n_layer"] * shape["d_model"] * shape["seq_len"]
            assert row["flops_per_token"] == 6 * params + attention_flops


def test_preset_table_matches_a_real_instantiation():
    arch = {"position": "learned", "mlp": "gelu", "norm": "layernorm"}
    row = next(r for r in preset_table(**arch) if r["name"] == "cpu-500k")
    model = GPT(preset_config("cpu-500k", **arch))
    assert row["params"] == model.num_params() == 516_528
    assert row["non_embedding_params"] == model.num_params(non_embedding=True)


def test_unknown_preset_lists_the_known_names():
    with pytest.raises(ValueError, match="cpu-500k, cpu-2m, cpu-6m, 20m, 40m, 80m, 160m"):
        preset_config("cpu-tiny")


def test_ffn_dim_defaults():
    assert tiny(mlp="gelu").ffn_dim == 256
    assert tiny(mlp="swiglu").ffn_dim == 192  # 8/3 * 64 = 170.7 -> 192
    assert tiny(d_model=192).ffn_dim == 512
    assert tiny(d_ff=100).ffn_dim == 100
    assert dataclasses.replace(tiny(), d_model=192).ffn_dim == 512


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"d_model": 60, "n_head": 8}, "d_model"),
        ({"position": "relative"}, "position"),
        ({"norm": "batchnorm"}, "norm"),
        ({"mlp": "relu"}, "mlp"),
        ({"d_model": 12, "n_head": 4, "position": "rope"}, "rope"),
        ({"d_model": 9, "n_head": 1, "position": "sinusoidal"}, "sinusoidal"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_layer": 10**6}, "n_layer"),  # a typo must not hang a study plan building it on meta
        ({"d_model": 2**20, "n_head": 1}, "d_model"),
        ({"vocab_size": 97.0}, "vocab_size"),
        ({"d_ff": 0}, "d_ff"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)
