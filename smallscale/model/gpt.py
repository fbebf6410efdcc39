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
        if d_ff is not None and (isinstance(d_ff, bool) or not isinstance(d_ff, int) or d_ff < 1):
            raise ValueError(f"GPTConfig.d_ff must be a positive integer or None, got {self.d_ff!r}.")
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


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v for q (B, nh, T, hs), k and v (B, nh, S, hs) -> (B, nh, T, hs).

    F.scaled_dot_product_attention everywhere but in one case: causal bf16 training on CPU, where
    torch's flash-attention backward is slow (2.13, one core, B*nh=64, T=256, hs=64: 52 ms forward +
    backward, against 27 ms for the same attention as two batched matmuls and a softmax).
    """
    if is_causal and q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad and dropout_p == 0.0:
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


CE_CHUNK_ROWS = 128  # rows of logits per pass: 128 x 8192 fp32 = 4 MiB, about one core's L2


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose target is not -100, with d loss / d logits computed in the
    forward pass, chunk by chunk while the chunk is in cache, and kept in the logits' dtype.

    F.cross_entropy on bf16 logits converts them to fp32, materialises fp32 log-probabilities, then in
    backward zero-fills and scatters an fp32 gradient and converts it back: eight passes over (N, V)
    values, which on a CPU cost more than the output matmul. Here: log_softmax and exp per chunk in
    cache, one write of the gradient, one scaling pass in backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # logits (N, V), targets (N,)
        valid = targets != -100
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)  # (N, 1)
        row_weight = (valid / valid.sum()).unsqueeze(1)  # (N, 1): a kept row's share of the mean; no rows -> nan
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if need_grad else None
        target_logprobs = torch.empty(logits.size(0), 1, dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), CE_CHUNK_ROWS):
            rows = slice(start, start + CE_CHUNK_ROWS)
            logprobs = torch.log_softmax(logits[rows], dim=1, dtype=torch.float32)  # (n, V)
            torch.gather(logprobs, 1, safe_targets[rows], out=target_logprobs[rows])
            if need_grad:  # (softmax - one_hot(target)) * row_weight
                probs = logprobs.exp_()
                probs.scatter_add_(1, safe_targets[rows], torch.full_like(target_logprobs[rows], -1.0))
                torch.mul(probs, row_weight[rows], out=grad[rows])
        if need_grad:
            ctx.save_for_backward(grad)
        return -(target_logprobs * row_weight).sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,), ignoring targets equal to -100; the
    same value and gradient as F.cross_entropy(logits.float(), targets, ignore_index=-100)."""
    return _CrossEntropy.apply(logits, targets)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        # rows [q | k | v], each with its heads contiguous (the layout of GPT-2's c_attn)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
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

        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return GPTOutput(logits, loss)

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
        6*N + 12*n_layer*d_model*seq_len, where N counts all parameters, the tied embedding once,
        excluding position tables (a lookup, not a matmul); the second term is attention's QK^T and AV."""
        seq_len = self.cfg.seq_len if seq_len is None else seq_len
        n = self.num_params()
        if self.positions.pos_emb is not None:
            n -= self.positions.pos_emb.weight.numel()
        return float(6 * n + 12 * self.cfg.n_layer * self.cfg.d_model * seq_len)
