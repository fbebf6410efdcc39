"""Export to Hugging Face transformers: same logits, or a refusal that names the switch."""

import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402

from smallscale.export import hf_config_for, to_hf  # noqa: E402
from smallscale.model import GPT, GPTConfig  # noqa: E402

LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "rope_base": 500.0}
GPT2 = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "d_ff": 96}


def tiny(**overrides) -> GPTConfig:
    shape = {"vocab_size": 97, "seq_len": 32, "n_layer": 2, "n_head": 4, "d_model": 64}
    return GPTConfig(**{**shape, **overrides})


def randomized(cfg: GPTConfig) -> GPT:
    """A model whose norms and biases are random too (init leaves them 1 and 0, hiding mapping bugs)."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    "arch, hf_class", [(LLAMA, transformers.LlamaForCausalLM), (GPT2, transformers.GPT2LMHeadModel)]
)
def test_exported_model_gives_the_same_logits(arch, hf_class, tied):
    model = randomized(tiny(**arch, tie_embeddings=tied))
    hf_model = to_hf(model)
    assert type(hf_model) is hf_class
    assert not hf_model.training
    assert (hf_model.lm_head.weight is hf_model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf_model(ids).logits
    assert ours.std() > 0.1  # the comparison is not between two near-constant outputs
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_export_copies_rather_than_shares_weights():
    model = randomized(tiny(**LLAMA))
    hf_model = to_hf(model)
    with torch.no_grad():
        model.tok_emb.weight.zero_()
    assert hf_model.get_input_embeddings().weight.abs().sum() > 0


def test_hf_config_carries_shape_and_hyperparameters():
    llama = hf_config_for(tiny(**LLAMA, norm_eps=1e-6))
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (64, 192, 2)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (4, 4, 16)
    assert (llama.max_position_embeddings, llama.rms_norm_eps, llama.tie_word_embeddings) == (32, 1e-6, True)
    gpt2 = hf_config_for(tiny(**GPT2, tie_embeddings=False))
    assert (gpt2.n_embd, gpt2.n_inner, gpt2.n_positions, gpt2.activation_function) == (64, 96, 32, "gelu")
    assert gpt2.tie_word_embeddings is False


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"position": "alibi"}, ["position='alibi'"]),
        ({"position": "sinusoidal"}, ["position='sinusoidal'"]),
        ({"qk_norm": True}, ["qk_norm=True"]),
        ({"bias": True}, ["bias=True"]),
        ({**GPT2, "mlp": "swiglu"}, ["mlp='swiglu'"]),
        ({"position": "none", "norm": "layernorm"}, ["position='none'", "norm='layernorm'"]),
    ],
)
def test_unrepresentable_configs_are_refused_naming_the_switches(overrides, named):
    with pytest.raises(ValueError, match="Cannot export") as excinfo:
        to_hf(GPT(tiny(**overrides)))
    for switch in named:
        assert switch in str(excinfo.value)
    assert "dropout" not in str(excinfo.value) and "tie_embeddings" not in str(excinfo.value)
