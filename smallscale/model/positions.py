"""Position encodings: learned, sinusoidal, rotary (RoPE), ALiBi and none (NoPE), behind one interface.

The model asks its `PositionEncoding` three questions about the positions start .. start+T-1
(start > 0 when decoding with a KV cache); each answer is None where the encoding does not apply:

  embed(start, T)             (T, d_model) added to the token embeddings     learned, sinusoidal
  rotary(start, T)            (cos, sin), each (T, head_dim), for q and k   rope
  attn_bias(start, T, dtype)  (1, n_head, T, start+T) additive, causal      alibi

'none' (NoPE) answers None to all three: order then comes only from the causal mask.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from smallscale.model.gpt import GPTConfig


def sinusoidal_table(n_pos: int, dim: int, device: torch.device | None = None, rms: float | None = None) -> Tensor:
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same). (n_pos, dim)

    Unscaled, every row has RMS 1/sqrt(2) (each sin/cos pair has squared norm 1). With `rms`, the
    table is multiplied by rms * sqrt(2) so that its RMS is `rms` (see `PositionEncoding`)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.arange(n_pos, dtype=torch.float32, device=device)[:, None] * inv_freq  # (n_pos, dim/2)
    table = torch.empty(n_pos, dim, device=device)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()
    return table if rms is None else table * (rms * math.sqrt(2.0))


def rope_cos_sin(
    n_pos: int, head_dim: int, base: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables (n_pos, head_dim) in the Hugging Face Llama layout: frequencies repeated as [f, f].

    Computed exactly as `LlamaRotaryEmbedding` does (fp32, inv_freq = base^(-2i/head_dim)), so an exported
    model reproduces our logits.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(n_pos, dtype=torch.float32, device=device)[:, None] * inv_freq  # (n_pos, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (n_pos, hs)
    return angles.cos(), angles.sin()


def swap_halves(x: Tensor) -> Tensor:
    """[x1, x2] -> [x2, x1] over the last dim: pairs dimension i with i + hs/2 (non-interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


class _Rotary(torch.autograd.Function):
    """x * cos + [-x2, x1] * sin, written as x * cos + swap_halves(x) * signed_sin with
    signed_sin = [-sin1, sin2], in three passes over x each way (autograd of the plain expression
    takes eight, plus their temporaries). The rotation is orthogonal, so the backward is the
    rotation by the opposite angle: g * cos - swap_halves(g) * signed_sin."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, signed_sin)
        return torch.mul(x, cos).addcmul_(swap_halves(x), signed_sin)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, signed_sin = ctx.saved_tensors
        return torch.mul(grad, cos).addcmul_(swap_halves(grad), signed_sin, value=-1.0), None, None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys x (..., T, hs) by their positions' angles; cos, sin are (T, hs) with
    equal halves (the `rope_cos_sin` layout), cast to x's dtype as transformers' Llama does."""
    half = sin.size(-1) // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return _Rotary.apply(x, cos.to(x.dtype), signed_sin.to(x.dtype))


def alibi_slopes(n_head: int) -> Tensor:
    """Per-head ALiBi slopes (Press et al., 2022), (n_head,).

    For n a power of 2: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise take the
    slopes for the largest power of 2 below n, then every other slope of the sequence for twice that.
    """

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(closest) + geometric(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, start: int, T: int) -> Tensor:
    """Additive attention bias for queries at start..start+T-1 over keys 0..start+T-1: (1, nh, T, S).

    bias = -slope * (query_pos - key_pos) for visible keys and -inf for future keys, so this one
    tensor is both the ALiBi penalty and the causal mask.
    """
    q_pos = torch.arange(start, start + T, device=slopes.device)
    k_pos = torch.arange(start + T, device=slopes.device)
    dist = k_pos[None, :] - q_pos[:, None]  # (T, S), <= 0 where visible
    bias = slopes.float()[:, None, None] * dist  # (nh, T, S)
    return bias.masked_fill(dist > 0, float("-inf")).unsqueeze(0)


class PositionEncoding(nn.Module):
    """The position encoding named by `cfg.position`; see the module docstring for the interface.

    Only 'learned' has parameters (`pos_emb`, an nn.Embedding). Tables, cos/sin and slopes are
    non-persistent buffers: recomputed, never checkpointed. Positions run up to cfg.seq_len.

    The sinusoidal table is scaled to RMS `init_std`, the RMS of the token embedding at
    initialisation, i.e. the scale of the learned table it replaces (GPT-2's wpe, N(0, init_std)).
    Vaswani et al. add the unit table to embeddings multiplied by sqrt(d_model) with init std
    d_model^-0.5 (RMS 1); with our std-0.02 init the unit table (RMS 0.71) would be 35x stronger than
    token identity at the first block (d_model 48: 2.81 bpb against 2.55 scaled, 60 steps of cpu-500k
    on Tiny Shakespeare; tests/test_variant_parity.py is the guard). Scaling the table, rather than
    the embedding, keeps every other variant and the tied output head unchanged.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.position
        self.seq_len = cfg.seq_len
        self.d_model = cfg.d_model
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.rope_base = cfg.rope_base
        self.init_std = cfg.init_std
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if self.kind == "learned" else None
        if self.kind == "sinusoidal":
            self.register_buffer("table", torch.empty(cfg.seq_len, cfg.d_model), persistent=False)
        elif self.kind == "rope":
            self.register_buffer("cos", torch.empty(cfg.seq_len, self.head_dim), persistent=False)
            self.register_buffer("sin", torch.empty(cfg.seq_len, self.head_dim), persistent=False)
        elif self.kind == "alibi":
            self.register_buffer("slopes", torch.empty(cfg.n_head), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Fill the buffers in place (also after `to_empty()` from the meta device)."""
        if self.kind == "sinusoidal":
            self.table.copy_(sinusoidal_table(self.seq_len, self.d_model, self.table.device, rms=self.init_std))
        elif self.kind == "rope":
            cos, sin = rope_cos_sin(self.seq_len, self.head_dim, self.rope_base, self.cos.device)
            self.cos.copy_(cos)
            self.sin.copy_(sin)
        elif self.kind == "alibi":
            self.slopes.copy_(alibi_slopes(self.n_head))

    def embed(self, start: int, T: int) -> Tensor | None:
        if self.kind == "learned":
            return self.pos_emb(torch.arange(start, start + T, device=self.pos_emb.weight.device))
        if self.kind == "sinusoidal":
            return self.table[start : start + T]
        return None

    def rotary(self, start: int, T: int) -> tuple[Tensor, Tensor] | None:
        if self.kind == "rope":
            return self.cos[start : start + T], self.sin[start : start + T]
        return None

    def attn_bias(self, start: int, T: int, dtype: torch.dtype) -> Tensor | None:
        if self.kind == "alibi":
            return alibi_bias(self.slopes, start, T).to(dtype)
        return None
