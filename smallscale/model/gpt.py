"""The decoder-only transformer. Every architectural variant is a `GPTConfig` switch.

Pre-norm blocks (x + attn(norm(x)), x + mlp(norm(x))), attention always through
`F.scaled_dot_product_attention`, GPT-2 scaled init. Shapes: B batch, T new tokens, S keys
(cached + new), C = d_model, nh = n_head, hs = head_dim, V = vocab_size.

Module names and types are a contract with the optimizer's parameter grouping and with
`smallscale.export`: `tok_emb` (nn.Embedding), `positions.pos_emb` (nn.Embedding, 'learned' only),
norms are nn.LayerNorm / nn.RMSNorm, every projection is an nn.Linear, `norm_f`, `lm_head`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from smallscale.model.positions import PositionEncoding, apply_rotary

Position = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu"]


# Upper bounds on shape fields: building even a meta-device model costs time per layer, so an
# n_layer of 10**6 from a typo would hang `study plan` instead of failing.
_LIMITS = {"vocab_size": 2**31 - 1, "seq_len": 2**20, "n_layer": 1024, "n_head": 1024, "d_model": 2**16, "d_ff": 2**20}


@dataclass
class GPTConfig:
    """Shape and architecture of a GPT. The defaults are the recommended architecture:
    RoPE + RMSNorm + SwiGLU, no biases, tied embeddings (LlamaForCausalLM-exportable)."""

    vocab_size: int
    seq_len: int  # maximum context, in tokens
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int | None = None  # MLP hidden width; None -> `ffn_dim`'s default for the mlp kind
    position: Position = "rope"
    rope_base: float = 10000.0
    norm: Norm = "rmsnorm"
    mlp: MLPKind = "swiglu"
    bias: bool = False  # biases in every Linear and LayerNorm (never in lm_head)
    qk_norm: bool = False  # RMSNorm over the head dim of q and k, before rope
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    grad_checkpointing: bool = False  # recompute each block's activations in backward

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}.")
            if value > _LIMITS[name]:  # far beyond any model this toolkit trains; a typo, not a plan
                raise ValueError(f"GPTConfig.{name}={value} is larger than {_LIMITS[name]:,}; check the value.")
        for name, kind in (("position", Position), ("norm", Norm), ("mlp", MLPKind)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(
                    f"GPTConfig.{name}={getattr(self, name)!r} is unknown; use one of {get_args(kind)}."
                )
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick d_model as a multiple of n_head."
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(
                f"GPTConfig.position='rope' needs an even head dim, got d_model/n_head={self.head_dim}; "
                "change d_model or n_head."
            )
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"GPTConfig.position='sinusoidal' needs an even d_model, got {self.d_model}.")
        d_ff = self.d_ff
        if d_ff is not None and (isinstance(d_ff, bool) or not isinstance(d_ff, int) or not 1 <= d_ff <= _LIMITS["d_ff"]):
            raise ValueError(f"GPTConfig.d_ff must be a positive integer up to {_LIMITS['d_ff']:,} or None, got {self.d_ff!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        for name in ("rope_base", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)!r}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        """MLP hidden width: d_ff if set, else 4*d_model (gelu) or 8/3*d_model rounded up to a
        multiple of 64 (swiglu, which has three matrices instead of two: about equal parameters).
        A property rather than a filled-in field, so `dataclasses.replace(cfg, d_model=...)` stays right."""
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


class GPTOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # mean cross-entropy over targets != -100, when targets are given


class KVCache:
    """Preallocated keys and values for incremental decoding: per layer (B, nh, max_len, hs).

    `length` (a Python int, so no device sync) counts the positions already cached; a forward with
    the cache writes the new tokens' keys and values after them and advances it.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = cfg.seq_len if max_len is None else max_len
        if not 1 <= self.max_len <= cfg.seq_len:
            raise ValueError(f"KVCache max_len={self.max_len} must be in [1, seq_len={cfg.seq_len}].")
        shape = (batch_size, cfg.n_head, self.max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's new k, v (B, nh, T, hs); return all keys and values so far (B, nh, S, hs)."""
        end = self.length + k.size(2)
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def reset(self) -> None:
        self.length = 0

    def reorder(self, index: Tensor) -> None:
        """Make row i of every layer's keys and values a copy of row index[i] (index: (B',) long, on
        the cache's device). B' may differ from B: beam search expands each prefilled prompt row into
        its beams and, each step, keeps the rows of the beams that survive. Only the `length` filled
        positions are copied."""
        for tensors in (self.keys, self.values):
            for layer, t in enumerate(tensors):
                kept = t[index, :, : self.length]  # (B', nh, length, hs)
                if len(index) != t.size(0):
                    t = tensors[layer] = t.new_zeros(len(index), *t.shape[1:])
                t[:, :, : self.length] = kept


class _RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, statistics in fp32, output in
    `out_dtype`. torch's rms_norm is a composite on CPU (pow, mean, rsqrt, two muls forward and
    autograd through each): here one reduction and three elementwise passes forward, about ten
    backward, against about twice that, for the same result to fp32 rounding."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=stats_dtype)  # (..., 1)
        rstd = norm.square_().div_(x.size(-1)).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight).to(out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        grad = grad.to(rstd.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x).mul_(rstd).flatten(0, -2).sum(0).to(weight.dtype)
        grad_x_hat = grad * weight  # (..., C)
        # grad_x = g_hat * rstd - x * rstd^3 * mean(g_hat * x); where x^2 overflowed (rstd = 0) this
        # is nan, as autograd through the composite gives, rather than a silent zero
        coef = (grad_x_hat * x).mean(dim=-1, keepdim=True).mul_(rstd.pow(3))  # (..., 1)
        grad_x = torch.addcmul(grad_x_hat.mul_(rstd), x, coef, value=-1.0)
        return grad_x.to(x.dtype), grad_weight, None, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) computed by `_RMSNormFunction`. Under autocast the
    output is already in the autocast dtype, which the Linear after every norm would cast it to."""

    def forward(self, x: Tensor) -> Tensor:
        assert self.weight is not None and self.eps is not None, "built by make_norm / with eps"
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        return _RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps)


CpuKind = Literal["amx", "avx512", "avx2"]
FastPath = Literal["matmul_attention", "transposed_head_grad"]


def detect_cpu_kind() -> CpuKind:
    """This CPU as torch's kernels see it: 'avx2' when ATen dispatches below AVX-512 (an AVX2-only
    CPU, or ATEN_CPU_CAPABILITY=avx2), else 'amx' with AMX tiles, else 'avx512'."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return "avx2"
    return "amx" if torch.cpu._is_amx_tile_supported() else "avx512"


# Fixed for the life of the process (torch reads ATEN_CPU_CAPABILITY once); a module constant, so
# torch.compile guards on it instead of tracing the probe.
CPU_KIND: CpuKind = detect_cpu_kind()


def use_fast_path(name: FastPath, device_type: str, dtype: torch.dtype) -> bool:
    """Whether training on `device_type` with matmuls in `dtype` (the autocast dtype under autocast)
    takes the hand-written form of `name` rather than plain PyTorch: the one place these choices are
    made. Numbers: forward + backward, one thread's CPU time (which other processes on a shared
    machine do not stretch), median, torch 2.13, AMD EPYC (Zen 5, AVX-512 + AVX512-BF16, no AMX) native
    and capped at AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2),
    bench/bench_components.py --only fast_paths --cpu-time [--isa avx2], at the bench_train.py shape
    (16 x 256 tokens, d_model 256, 4 heads, vocab 8192); the preset shapes (cpu-500k, cpu-2m, cpu-6m)
    agree unless said otherwise. Two-thread wall-clock runs (without --cpu-time, on the same machine
    shared at load 6-9) point the same way at most shapes, with more noise.

    The other custom functions beat their plain form in every setting, so they have no plain branch:
    `_LinearCrossEntropy` against F.cross_entropy on the logits (AVX2 fp32 541 vs 560 ms, AVX-512
    fp32 543 vs 566, bf16 148 vs 183), `_RMSNormFunction` against F.rms_norm (2.1 vs 3.1 ms, 2.4 vs
    3.7, 2.5 vs 3.8) and positions' `_Rotary` against transformers' rotate_half expression (4.2 vs
    4.9 ms, 4.7 vs 5.4, 2.7 vs 3.0; the exceptions, cpu-500k on AVX2 1.09 vs 1.02 ms and cpu-2m
    in fp32 with AVX-512 2.00 vs 1.90, are within noise of a 2 ms operation).
    """
    if device_type != "cpu":
        return False  # not measured off CPU: SDPA, and autograd's own layout for the head gradient
    if name == "matmul_attention":
        # bf16: SDPA's flash backward is slow: 47.4 ms against 17.7 for two batched matmuls and a
        # softmax (cpu-2m shape 31.5 vs 11.3). fp32: SDPA is faster, with AVX-512 (45.9 vs 48.6 ms;
        # cpu-500k 11.7 vs 17.4) and on AVX2 (45.6 vs 47.8; cpu-500k 12.2 vs 16.1).
        return dtype == torch.bfloat16
    # transposed_head_grad: (h^T.contiguous() @ dlogits)^T against autograd's dlogits^T @ h for
    # the output head's weight gradient. Faster only with AMX bf16 (Intel Xeon, AMX: 13 vs 17 ms);
    # slower with AVX512-BF16 (48.1 vs 46.5 ms; cpu-6m 20.6 vs 18.0), in fp32 with AVX-512 (179.9
    # vs 174.7) and on AVX2 (177.7 vs 170.2; at cpu-500k 21.1 vs 23.2 the other way).
    return name == "transposed_head_grad" and dtype == torch.bfloat16 and CPU_KIND == "amx"


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v for q (B, nh, T, hs), k and v (B, nh, S, hs) -> (B, nh, T, hs).

    F.scaled_dot_product_attention, except in causal training where `use_fast_path` picks two
    batched matmuls and a softmax (`_matmul_causal_attention`).
    """
    if is_causal and q.requires_grad and dropout_p == 0.0 and use_fast_path("matmul_attention", q.device.type, q.dtype):
        return _matmul_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def _matmul_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    B, nh, T, hs = q.shape
    causal_bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # (T, T)
    scores = torch.baddbmm(
        causal_bias, q.reshape(B * nh, T, hs), k.reshape(B * nh, T, hs).transpose(1, 2), alpha=hs**-0.5
    )  # (B*nh, T, T)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v.reshape(B * nh, T, hs)).view(B, nh, T, hs)


class _LinearCrossEntropy(torch.autograd.Function):
    """logits = h @ weight^T and their mean cross-entropy over targets != -100, in one autograd node
    that computes d loss / d logits = softmax - one_hot(target) during the forward pass.

    Why: F.cross_entropy on bf16 logits converts them to fp32, materialises fp32 log-probabilities,
    then in backward zero-fills and scatters an fp32 gradient, converts it back and scales it: about
    eight passes over the (N, V) logits, which on a CPU cost more than the output matmul itself.
    Here one softmax kernel writes the unscaled gradient in the logits' dtype, and the backward
    scales the two small matmul outputs (N, C) and (V, C) instead of the (N, V) gradient.

    The loss is -log(softmax[target]) from that softmax: exact in fp32; under bf16 autocast the
    probabilities are bf16, which moves a token's loss by at most ~0.002 nats (2^-9 relative in the
    probability), less than rounding the logits to bf16 already does; a target probability that
    underflows to 0 falls back to an exact log_softmax of its row.

    `linear_cross_entropy` keeps this node out of torch.compile graphs: forward + backward at the
    bench shape take 46-49 ms here against 69-77 ms for F.cross_entropy compiled by inductor
    (bench/bench_components.py, 'loss'; torch 2.13, 2 cores).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # h (N, C), weight (V, C), targets (N,) -> logits (N, V), loss ()
        ctx.dtypes = h.dtype, weight.dtype
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            h, weight = h.to(dtype), weight.to(dtype)
        logits = h @ weight.t()  # (N, V)
        valid = targets != -100  # (N,)
        safe_targets = torch.where(valid, targets, 0)
        probs = torch.softmax(logits, dim=1)  # (N, V), logits' dtype; becomes d loss / d logits below
        target_probs = probs.gather(1, safe_targets[:, None]).squeeze(1).float()  # (N,)
        target_logprobs = target_probs.log()
        underflow = (target_probs == 0).nonzero().squeeze(1)
        if underflow.numel():
            exact = torch.log_softmax(logits[underflow].float(), dim=1)
            target_logprobs[underflow] = exact.gather(1, safe_targets[underflow, None]).squeeze(1)
        n_valid = valid.sum()
        loss = -(target_logprobs * valid).sum() / n_valid  # no kept rows -> nan, as F.cross_entropy
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            rows = torch.arange(len(targets), device=targets.device)
            # index_put_ rather than scatter_: scatter on bf16 converts the whole tensor (torch 2.13, CPU)
            probs.index_put_((rows, safe_targets), torch.tensor(-1.0, dtype=probs.dtype), accumulate=True)
            probs.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # only the ignored rows, not all of (N, V)
            ctx.save_for_backward(h, weight, probs, n_valid)
        ctx.set_materialize_grads(False)
        return logits, loss

    @staticmethod
    def backward(ctx, grad_logits: Tensor | None, grad_loss: Tensor | None) -> tuple[Tensor | None, Tensor | None, None]:
        h, weight, dlogits, n_valid = ctx.saved_tensors
        if grad_loss is None:  # only the logits were used
            grad_logits, scale = grad_logits.to(dlogits.dtype), None
        else:
            scale = grad_loss / n_valid
            if grad_logits is not None:  # the logits fed another loss too: fold ours in at full size
                grad_logits, scale = dlogits * scale.to(dlogits.dtype) + grad_logits, None
            else:
                grad_logits = dlogits
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_logits @ weight).to(ctx.dtypes[0])  # (N, C)
            grad_h = grad_h if scale is None else grad_h.mul_(scale)
        if ctx.needs_input_grad[1]:
            if use_fast_path("transposed_head_grad", h.device.type, grad_logits.dtype):
                grad_w = (h.t().contiguous() @ grad_logits).t()
            else:
                grad_w = grad_logits.t() @ h
            # contiguous: a transposed gradient made the bench step ~12 ms slower (tied-embedding
            # accumulation and optimizer; Intel Xeon with AMX, measured once, A/B of the whole step)
            grad_w = grad_w.to(ctx.dtypes[1], memory_format=torch.contiguous_format)  # (V, C)
            grad_w = grad_w if scale is None else grad_w.mul_(scale)
        return grad_h, grad_w, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, loss) for h (N, C), weight (V, C), targets (N,): logits = h @ weight^T (N, V) and the
    mean cross-entropy over targets != -100, with the value and gradients of
    F.cross_entropy(logits.float(), targets, ignore_index=-100)."""
    return _linear_cross_entropy(h, weight, targets)


@torch.compiler.disable  # eager inside a compiled model: see _LinearCrossEntropy
def _linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    return _LinearCrossEntropy.apply(h, weight, targets)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        # rows [q | k | v], each with its heads contiguous (the layout of GPT-2's c_attn)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, attn_mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs)
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # under autocast q is lower precision than the residual stream
        # Without a mask, queries and keys are either the same positions (causal) or one new token
        # that may see every cached key (no mask at all).
        is_causal = attn_mask is None and q.size(2) == k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask, is_causal, dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.ffn_dim
        # swiglu: one Linear computes [gate | up] side by side (one matmul instead of two)
        self.fc = nn.Linear(cfg.d_model, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2*hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)  # exact (erf) GELU, = transformers' activation_function='gelu'
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, attn_mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, attn_mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = PositionEncoding(cfg)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and position buffer, e.g. after `to_empty()` from meta.

        GPT-2 init: weights N(0, init_std), biases 0, norms 1; the residual output projections
        (attn.proj, mlp.proj) N(0, init_std / sqrt(2 * n_layer)) so the residual stream's variance
        does not grow with depth.
        """
        resid_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith(("attn.proj", "mlp.proj")) else self.cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        self.positions.reset_buffers()

    def forward(
        self, input_ids: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> GPTOutput:
        """input_ids (B, T) long; targets (B, T) long with -100 = ignore; with a cache, input_ids are
        the tokens after the `cache.length` already cached ones."""
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        limit = self.cfg.seq_len if cache is None else cache.max_len
        if start + T > limit:
            raise ValueError(
                f"{start + T} positions exceed the model's context of {limit} tokens; shorten the input "
                "(or build the model / cache with a larger seq_len / max_len)."
            )
        x = self.tok_emb(input_ids)  # (B, T, C)
        abs_pos = self.positions.embed(start, T)  # (T, C) or None
        if abs_pos is not None:
            x = x + abs_pos
        x = self.emb_dropout(x)

        # Position and mask inputs are computed once here and shared by every layer.
        rope = self.positions.rotary(start, T)  # (cos, sin) each (T, hs), or None
        attn_mask = self.positions.attn_bias(start, T, x.dtype)  # (1, nh, T, S) ALiBi + causal, or None
        if attn_mask is None and start > 0 and T > 1:  # a chunk after cached tokens: causal, offset by start
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)

        recompute = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, rope, attn_mask, None, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache)
        if cache is not None:
            cache.length = start + T

        h = self.norm_f(x)  # (B, T, C)
        if targets is None:
            return GPTOutput(self.lm_head(h), None)  # (B, T, V)
        logits, loss = linear_cross_entropy(h.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        return GPTOutput(logits.view(B, T, -1), loss)

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KVCache on this model's device and dtype."""
        weight = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len, device=weight.device, dtype=weight.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; a tied embedding counts once. non_embedding excludes tok_emb, pos_emb
        and (if untied) lm_head."""
        total = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return total
        embeddings = [self.tok_emb.weight]
        if self.positions.pos_emb is not None:
            embeddings.append(self.positions.pos_emb.weight)
        if not self.cfg.tie_embeddings:
            embeddings.append(self.lm_head.weight)
        return total - sum(p.numel() for p in embeddings)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) at context seq_len (default cfg.seq_len):
        6*N + 12*n_layer*d_model*seq_len, where N counts the parameters that take part in a matmul:
        all of them, the tied embedding once (as the output head), but not the lookups, i.e. position
        tables and an untied input embedding; the second term is attention's QK^T and AV."""
        seq_len = self.cfg.seq_len if seq_len is None else seq_len
        n = self.num_params()
        if self.positions.pos_emb is not None:
            n -= self.positions.pos_emb.weight.numel()
        if not self.cfg.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        return float(6 * n + 12 * self.cfg.n_layer * self.cfg.d_model * seq_len)
