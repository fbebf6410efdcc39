"""Named model sizes. The name is the approximate total parameter count (tied embedding counted
once) of the default architecture (rope + rmsnorm + swiglu, no bias, tied) at the preset's own
vocab_size and seq_len: within 6% of it. `preset_table` gives the exact counts for any vocabulary.

CPU presets assume a vocabulary of 8192 and a 256-token context; GPU presets 32768 and 1024. At
these sizes the embedding is a large share of the parameters (most of cpu-500k), so compare
models by `non_embedding_params` when the vocabulary differs.

Shapes are chosen for how their matmuls run on CPUs of either kind, not only for their counts: widths
and head dims are multiples of 16 (bench/bench_cpu_presets.py, bench/results/cpu_presets.json; AMD
EPYC Zen 5, 2 cores, one training step at micro-batch 8 x 256, vocab 4096, eager). cpu-2m was 7
layers x 112 (head dim 28); 5 x 128 (head dim 32) at about the same size (1.59M vs 1.56M parameters
at vocab 4096) trains 12% faster in fp32 on AVX-512 and on AVX2 alone (10.5k -> 11.8k and 10.2k ->
11.5k tokens/s) and 26% faster in bf16 (22.2k -> 27.9k), and learns no less per token (quickstart
setting, 3 seeds: 2.624 vs 2.644 val bits per byte at 98k tokens, 2.315 vs 2.333 at 295k). The
head count alone also moves speed: cpu-500k (d_model 48) with 2 heads of 24 trains 15% faster in
bf16 than with 3 of 16 (no faster in fp32 on AVX2), cpu-6m with 3 heads of 64 6-14% faster than with
6 of 32; both kept their heads, since fewer heads change the model, not only its speed, and would
need their own quality check.
"""

from __future__ import annotations

import torch

from smallscale.model.gpt import GPT, GPTConfig

_CPU = {"vocab_size": 8192, "seq_len": 256}
_GPU = {"vocab_size": 32768, "seq_len": 1024}

PRESETS: dict[str, dict] = {
    "cpu-500k": {"n_layer": 4, "n_head": 3, "d_model": 48, **_CPU},
    "cpu-2m": {"n_layer": 5, "n_head": 4, "d_model": 128, **_CPU},
    "cpu-6m": {"n_layer": 10, "n_head": 6, "d_model": 192, **_CPU},
    "20m": {"n_layer": 8, "n_head": 5, "d_model": 320, **_GPU},
    "40m": {"n_layer": 10, "n_head": 7, "d_model": 448, **_GPU},
    "80m": {"n_layer": 12, "n_head": 10, "d_model": 640, **_GPU},
    "160m": {"n_layer": 19, "n_head": 12, "d_model": 768, **_GPU},
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig for a named size; overrides replace any GPTConfig field (vocab_size, position, ...)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known presets: {', '.join(PRESETS)}.")
    return GPTConfig(**{**PRESETS[name], **overrides})


def preset_table(
    vocab_size: int | None = None,
    seq_len: int | None = None,
    position: str = "rope",
    mlp: str = "swiglu",
    norm: str = "rmsnorm",
) -> list[dict]:
    """One row per preset: name, n_layer, n_head, d_model, params, non_embedding_params,
    flops_per_token (6N + 12*n_layer*d_model*seq_len, see `GPT.flops_per_token`).

    Counts come from instantiating each model on the meta device (no memory, no init cost), so
    they are exact. vocab_size / seq_len default to each preset's own.
    """
    rows = []
    for name, shape in PRESETS.items():
        overrides = {"position": position, "mlp": mlp, "norm": norm}
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        if seq_len is not None:
            overrides["seq_len"] = seq_len
        cfg = preset_config(name, **overrides)
        with torch.device("meta"):
            model = GPT(cfg)
        rows.append(
            {
                "name": name,
                "n_layer": cfg.n_layer,
                "n_head": cfg.n_head,
                "d_model": cfg.d_model,
                "params": model.num_params(),
                "non_embedding_params": model.num_params(non_embedding=True),
                "flops_per_token": model.flops_per_token(),
            }
        )
    return rows
