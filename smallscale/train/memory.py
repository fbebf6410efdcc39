"""Predicted peak memory of a training run, before anything is allocated, and the check that refuses a
run that cannot fit its device.

The peak is the memory that lives throughout (weights, optimizer state, DDP buckets, runtime) plus
the most that the largest of these moments of a training step adds, and the evaluation between
steps: on CUDA whichever adds more; on CPU both, because glibc malloc does not hand the freed
memory of the step to the evaluation's large buffers (bench/results/memory_model.json):

    forward          every tensor saved for backward, plus the logits next to the loss's probabilities
    backward         the saved tensors, plus the output head's weight gradient being formed
    last_block       the blocks' backward at the last block: the blocks' saved tensors, the head's
                     gradient, the block's backward temporaries (checkpointing: its recomputed activations)
    first_block      the same at the first block, by which time the other blocks' gradients exist
    end_of_backward  all gradients, and the tied embedding's lookup gradient being added to the head's
    optimizer        all gradients, plus the update's temporaries (Lion, LAMB; fused AdamW has none)
    eval             the validation logits of `train.eval_batch` sequences, upcast to fp32 for the loss

The saved tensors are those the model actually keeps (smallscale/model/gpt.py), per block, with
B = micro_batch, T = seq_len, C = d_model, H = the MLP width, nh = heads, a = 2 bytes under
bf16/fp16 autocast and 4 in fp32:

    residual stream (fp32)     block input and the mid-block sum: 2·B·T·C·4, RMSNorm's 1/rms 2·B·T·4
    norm outputs               2·B·T·C·a (inputs of the qkv and MLP matmuls)
    q, k after rope            2·B·T·C·a;  v: a view that keeps all of qkv (3·B·T·C·a), or a copy
                               (B·T·C·a) where the CPU matmul attention reshapes it (micro-batch > 1)
    attention                  CPU bf16 training (matmul attention): probabilities B·nh·T²·a and the
                               head-merged output B·T·C·a; elsewhere (flash / efficient SDPA): the
                               output B·T·C·a and the log-sum-exp B·nh·T·4
    MLP                        SwiGLU: [gate | up] 2·B·T·H·a, silu(gate) and the product, B·T·H·a each;
                               GELU: its input and output, B·T·H·a each
    autocast weight copies     the block's matrices in a (saved by every matmul)

and once: the last residual and its norm, the loss's (B·T, V) probabilities (they become the
logits' gradient) and, under autocast, a copy of the tied embedding in a. With gradient
checkpointing a block keeps only its fp32 input (B·T·C·4) and recomputes the rest in backward, one
block at a time.

Under DDP each rank also holds gradient buckets (one more copy of the gradients); FSDP2 shards
weights, gradients and optimizer state by the world size and gathers one block's (and the root's)
weights at a time. Model FLOPs and device time are `study plan`'s business; this module is bytes.

Validated on CPU (bench/bench_memory.py --validate, bench/results/memory_model.json): the tensor
bytes of a step match a count of live tensors to 0.1% in bf16 (cpu-2m, then 7 x 112, to 80m) and to 0.7% in fp32
(cpu-6m, 20m); the process's peak resident memory is within 15% (AMD EPYC Zen 5, tuned malloc). The CUDA overheads (context, allocator slack) are documented figures, not
measured here; bench/gpu_check.py compares the tensor bytes with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from smallscale.errors import UserError
from smallscale.model.gpt import GPT, GPTConfig

if TYPE_CHECKING:
    from smallscale.train.trainer import RunConfig

DEVICE_MEMORY_ENV = "SMALLSCALE_DEVICE_MEMORY"  # what `--device-memory` sets, so study workers see it too

# CPU: the process's peak resident memory is this much plus the tensor bytes: Python, torch,
# smallscale, the loader and evaluation set, thread pools. And glibc malloc does not give the final
# evaluation's large buffers (fp32 logits) the memory the training step freed, with or without
# smallscale's malloc tuning: on CPU they add to the step's peak instead of taking its place.
# Fitted to the peaks of 8 CPU runs (4 sizes x checkpointing off/on; bench/bench_memory.py
# --validate, torch 2.13) whose tensor bytes the model predicts exactly.
CPU_RUNTIME_BYTES = 550 * 2**20
CUDA_CONTEXT_BYTES = 2**30
CUDA_ALLOCATOR_SLACK = 0.10  # reserved beyond allocated by the caching allocator, as a fraction

Phase = Literal["forward", "backward", "last_block", "first_block", "end_of_backward", "optimizer", "eval"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one rank's predicted peak, by what holds them. `peak` is the total the check uses."""

    weights: int  # fp32, this rank's shard under FSDP plus the gathered block(s)
    gradients: int  # all of them (they exist at the optimizer step; the peak may come earlier)
    optimizer_state: int
    activations: int  # what the step and evaluation add to the persistent bytes at the peak
    activations_no_checkpointing: int  # the most a training step adds (activations, gradients, temporaries),
    activations_checkpointing: int  # without / with checkpointing
    eval: int  # the most the evaluation adds
    ddp_buckets: int
    runtime: int  # the CPU process, or the CUDA context plus the caching allocator's slack
    peak: int
    phase: Phase  # the moment of the step that peaks, or 'eval' where the evaluation adds more
    checkpointing: bool
    precision: str
    details: dict[str, int] = field(default_factory=dict)  # each moment of the step, bytes added

    def breakdown(self) -> dict[str, int]:
        """Named parts; peak = weights + optimizer_state + ddp_buckets + runtime + the step's part
        (with this run's checkpointing setting) and the evaluation's: the larger on CUDA, both on CPU."""
        return {
            "weights": self.weights, "gradients": self.gradients, "optimizer_state": self.optimizer_state,
            "step_no_checkpointing": self.activations_no_checkpointing,
            "step_checkpointing": self.activations_checkpointing, "eval": self.eval,
            "ddp_buckets": self.ddp_buckets, "runtime": self.runtime, "peak": self.peak,
        }  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its config and exact parameter counts."""

    cfg: GPTConfig
    params: int  # every trainable parameter once (the tied embedding once)
    block_matrix_params: int  # per block: the weights of its Linears (cast under autocast)
    block_params: int  # per block, all
    embedding_params: int  # tok_emb (= the tied head)
    head_params: int  # an untied lm_head, else 0
    muon_params: int  # what Muon updates (2-D hidden matrices); AdamW takes the rest
    largest_group: int  # parameters in the larger of the 'decay' / 'no_decay' groups (optim.param_groups)


def model_shape(cfg: GPTConfig) -> ModelShape:
    """Exact parameter counts from the model built on the meta device (no memory, milliseconds)."""
    from smallscale.optim import OptimConfig, _classify, param_groups

    with torch.device("meta"):
        model = GPT(cfg)
    block = model.blocks[0]
    block_matrix = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                       for m in block.modules() if isinstance(m, torch.nn.Linear))  # fmt: skip
    muon = sum(p.numel() for p, kind in _classify(model) if kind == "matrix")
    return ModelShape(
        cfg=cfg, params=model.num_params(), block_matrix_params=block_matrix,
        block_params=sum(p.numel() for p in block.parameters()), embedding_params=model.tok_emb.weight.numel(),
        head_params=0 if cfg.tie_embeddings else model.lm_head.weight.numel(), muon_params=muon,
        largest_group=max(sum(p.numel() for p in g["params"]) for g in param_groups(model, OptimConfig())),
    )  # fmt: skip


def optimizer_state_bytes(shape: ModelShape, optimizer: str) -> tuple[int, int]:
    """(state bytes that persist, temporaries during the update), fp32 parameters.

    AdamW (fused): two moments. Lion: one moment; its foreach update copies one parameter group.
    LAMB (ours): two moments; the update of a group holds sqrt(v) and the update. SGD: one momentum
    buffer. Muon: one momentum buffer for the 2-D hidden matrices, AdamW's two moments for the rest;
    Newton-Schulz works on one matrix at a time (a few bf16 copies of it)."""
    p = shape.params
    if optimizer == "adamw":
        return 2 * p * 4, 0
    if optimizer == "lion":
        return p * 4, shape.largest_group * 4
    if optimizer == "lamb":
        return 2 * p * 4, 2 * shape.largest_group * 4
    if optimizer == "sgd":
        return p * 4, 0
    assert optimizer == "muon", optimizer
    cfg = shape.cfg
    largest = max(cfg.ffn_dim * cfg.d_model * (2 if cfg.mlp == "swiglu" else 1), 3 * cfg.d_model**2)
    return shape.muon_params * 4 + 2 * (p - shape.muon_params) * 4, 4 * largest * 2  # ~4 bf16 copies


def attention_path(cfg: GPTConfig, device_type: str, precision: str) -> Literal["matmul", "sdpa"]:
    """Which attention the model runs in training (gpt.attention): softmax(QKᵀ)V as matmuls for
    causal bf16 on CPU, torch's fused SDPA (flash / memory-efficient, no T x T saved) elsewhere."""
    causal = cfg.position != "alibi"
    if device_type == "cpu" and precision == "bf16" and causal and cfg.dropout == 0.0:
        return "matmul"
    return "sdpa"


def activation_terms(
    cfg: GPTConfig, micro_batch: int, precision: str, device_type: str, block_matrix_params: int
) -> dict[str, int]:
    """Bytes saved for backward by one block ('block'; 'block_checkpointed' with checkpointing) and
    by the head ('head', of which 'probs'), and the temporaries of the moments in the module
    docstring ('logits', 'head_grad', 'block_backward', 'autocast_cache'), for one micro-batch."""
    B, T, C, H, nh = micro_batch, cfg.seq_len, cfg.d_model, cfg.ffn_dim, cfg.n_head
    a = 4 if precision == "fp32" else 2
    N = B * T
    path = attention_path(cfg, device_type, precision)
    rope = cfg.position == "rope"
    block = 2 * N * C * 4 + 2 * N * 4  # fp32 residuals (input, mid-block) and their norms' 1/rms
    block += 2 * N * C * a  # the two norm outputs
    if cfg.qk_norm:
        block += 3 * N * C * a + 2 * B * nh * T * 4  # q, k norms keep qkv (their input) and 1/rms
    q_k_copies = rope or cfg.qk_norm or (path == "matmul" and B > 1)
    block += 2 * N * C * a if q_k_copies else 0
    if path == "matmul":
        if not cfg.qk_norm:  # (with q, k norms qkv is counted above)
            block += 3 * N * C * a if B == 1 else N * C * a  # v: a view that keeps qkv, or the reshape's copy
        block += B * nh * T * T * a + N * C * a  # softmax probabilities, head-merged output
        attention_backward = 2 * B * nh * T * T * a  # gradients of the probabilities and of the scores
    else:
        block += 0 if cfg.qk_norm else 3 * N * C * a  # v is a view of qkv: all of it stays
        block += N * C * a + B * nh * T * 4  # output (the proj input), log-sum-exp
        attention_backward = 4 * N * C * a  # gradients of q, k, v and the output
    if cfg.position == "alibi" and a == 2:
        block += nh * T * T * a  # the ALiBi bias cast to the autocast dtype in each layer
    if cfg.mlp == "swiglu":
        mlp_saved = 4 * N * H * a  # [gate | up], silu(gate), silu(gate) * up
        mlp_backward = 3 * N * H * a  # gradients of the product, silu(gate) and up
    else:
        mlp_saved = 2 * N * H * a  # GELU's input and output
        mlp_backward = 2 * N * H * a
    block += mlp_saved
    # A block's backward runs its MLP first; by the attention's turn the MLP's tensors are freed.
    block_backward = max(mlp_backward, attention_backward - mlp_saved)
    if rope:
        block += 4 * T * cfg.head_dim * a  # cos and sin in the activation dtype, per call
    if a == 2:
        block += block_matrix_params * a  # autocast's copies of the block's weights
    autocast_head = cfg.vocab_size * C * a if a == 2 else 0
    head = N * C * 4 + N * 4 + N * C * a + N * cfg.vocab_size * a + autocast_head
    return {
        "block": block,
        "block_checkpointed": N * C * 4,
        "head": head,
        "logits": N * cfg.vocab_size * a,  # the returned logits, alive with the probabilities in forward
        # d loss/d weight (in a, then fp32 under autocast), the contiguous hᵀ and d loss/d h
        "head_grad": cfg.vocab_size * C * (4 + (a if a == 2 else 0)) + 2 * N * C * a,
        "block_backward": block_backward,
        "probs": N * cfg.vocab_size * a,
        "autocast_cache": cfg.n_layer * block_matrix_params * a if a == 2 else 0,
    }


def eval_bytes(cfg: GPTConfig, eval_batch: int, precision: str, val_tokens: int | None = None) -> int:
    """The evaluation's largest moment (eval/tasks/perplexity.score, no gradients): the logits, their
    fp32 copy and the fp32 log-softmax of cross_entropy, for a batch of `eval_batch` sequences (no
    more tokens than the validation split has, where known)."""
    n = eval_batch * cfg.seq_len if val_tokens is None else min(eval_batch * cfg.seq_len, val_tokens)
    a = 4 if precision == "fp32" else 2
    logits = n * cfg.vocab_size * (a + 4 + 4 if a == 2 else 8)
    block = n * (3 * cfg.d_model + 2 * cfg.ffn_dim) * a  # one layer's temporaries
    return logits + block + (cfg.vocab_size * cfg.d_model * a if a == 2 else 0)


def estimate(
    cfg: GPTConfig,
    micro_batch: int,
    precision: str,
    device_type: str,
    optimizer: str = "adamw",
    eval_batch: int = 16,
    world_size: int = 1,
    parallel: str = "ddp",
    val_tokens: int | None = None,
    shape: ModelShape | None = None,
) -> MemoryEstimate:
    """One rank's predicted peak memory for training `cfg` (see the module docstring).

    precision: fp32, bf16 or fp16 (resolved, not 'auto'); device_type: cpu or cuda."""
    assert precision in ("fp32", "bf16", "fp16"), precision
    shape = shape or model_shape(cfg)
    terms = activation_terms(cfg, micro_batch, precision, device_type, shape.block_matrix_params)
    L = cfg.n_layer
    sharded = parallel == "fsdp" and world_size > 1
    shard = world_size if sharded else 1
    weights = shape.params * 4 // shard
    grads = shape.params * 4 // shard
    state, update_tmp = optimizer_state_bytes(shape, optimizer)
    state //= shard
    buckets = shape.params * 4 if parallel == "ddp" and world_size > 1 else 0
    gathered = 0
    if sharded:  # one block being computed and the next prefetched, and the root (embedding, head)
        gathered = 2 * shape.block_params * 4 + (shape.embedding_params + shape.head_params) * 4
    embedding_grad = shape.embedding_params * 4  # the lookup's own gradient before it joins the head's

    def moments(checkpointing: bool) -> dict[str, int]:
        """Bytes beyond the persistent ones at each moment of a step (module docstring)."""
        per_block = terms["block_checkpointed"] if checkpointing else terms["block"]
        recompute = terms["block"] - terms["block_checkpointed"] if checkpointing else 0  # its input is kept anyway
        # in the blocks' backward, at the last block and at the first: the head's gradient is done
        # (its saved tensors freed), the blocks not yet reached keep theirs, the ones passed hold
        # their parameters' gradients; plus the current block's (recomputed) activations and the
        # temporaries of its MLP's backward, which comes first
        working = embedding_grad + recompute + terms["block_backward"]
        mlp_out_grad = cfg.ffn_dim * cfg.d_model * 4  # backward starts at the MLP's output projection
        return {
            "forward": L * per_block + terms["head"] + terms["logits"] + (terms["autocast_cache"] if checkpointing else 0),
            "backward": L * per_block + terms["head"] + terms["head_grad"],
            "last_block": L * per_block + mlp_out_grad + working,
            "first_block": per_block + (L - 1) * shape.block_params * 4 + mlp_out_grad + working,
            # a tied embedding's lookup gradient is added to the head's as a new tensor: two more of it
            "end_of_backward": grads + (2 * embedding_grad if cfg.tie_embeddings else 0),
            "optimizer": grads + update_tmp,
        }

    plain, checkpointed = moments(False), moments(True)
    during_step = checkpointed if cfg.grad_checkpointing else plain
    step_phase = max(during_step, key=during_step.__getitem__)
    evaluation = eval_bytes(cfg, eval_batch, precision, val_tokens)
    if device_type == "cuda":  # the caching allocator reuses the step's freed blocks for the evaluation
        added = max(during_step[step_phase], evaluation)
    else:
        added = during_step[step_phase] + evaluation
    phase = step_phase if during_step[step_phase] >= evaluation else "eval"
    tensors = weights + state + buckets + gathered + added
    if device_type == "cuda":
        runtime = CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * tensors)
    else:
        runtime = CPU_RUNTIME_BYTES
    return MemoryEstimate(
        weights=weights + gathered, gradients=grads, optimizer_state=state, activations=added,
        activations_no_checkpointing=max(plain.values()), activations_checkpointing=max(checkpointed.values()),
        eval=evaluation, ddp_buckets=buckets, runtime=runtime, peak=tensors + runtime, phase=phase,  # type: ignore[arg-type]
        checkpointing=cfg.grad_checkpointing, precision=precision,
        details={f"{k}_bytes": v for k, v in during_step.items()},
    )  # fmt: skip


def planned_device_type(choice: str) -> str:
    """The device a run's `train.device` means on this machine; 'cuda' stays 'cuda' even where
    there is none, so a GPU study can be planned on a laptop."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def planned_precision(choice: str, device_type: str) -> str:
    """`train.precision` as the trainer resolves it (trainer.resolve_precision), assuming a
    bf16-capable GPU when planning for one that is not here."""
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp16"
    from smallscale.train.trainer import cpu_supports_bf16

    return "bf16" if cpu_supports_bf16() else "fp32"


def estimate_run(
    cfg: RunConfig, model_cfg: GPTConfig, precision: str, device_type: str, world_size: int = 1, val_tokens: int | None = None
) -> MemoryEstimate:
    """`estimate` for a run config whose model is `model_cfg` (vocabulary from its dataset)."""
    return estimate(
        model_cfg, cfg.train.micro_batch, precision, device_type, optimizer=cfg.optim.name,
        eval_batch=cfg.train.eval_batch, world_size=world_size, parallel=cfg.train.parallel, val_tokens=val_tokens,
    )  # fmt: skip


def val_tokens_of(dataset: str) -> int | None:
    """The validation split's tokens of a prepared dataset (what one evaluation batch can hold at most)."""
    from smallscale.data.shards import load_manifest

    return load_manifest(dataset)["splits"].get("val", {}).get("tokens")


def check_run(cfg: RunConfig, model_cfg: GPTConfig, precision: str, device: torch.device, world_size: int) -> MemoryEstimate:
    """Refuse (UserError) a run that cannot fit the memory of `device`, before anything is allocated.
    CPU ranks on one machine share its memory; each GPU rank has its own."""
    est = estimate_run(cfg, model_cfg, precision, device.type, world_size, val_tokens_of(cfg.data.path))
    available, source = available_memory(device.type, device.index or 0)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    check_fits(os.path.basename(os.path.normpath(cfg.out)) or cfg.out, est, available, source, sharing)
    return est


def estimate_config(config: dict, vocab_size: int, val_tokens: int | None = None) -> MemoryEstimate:
    """`estimate_run` for a run config as plain data (a study's expanded run), one process."""
    from smallscale.config import validate
    from smallscale.train.trainer import RunConfig

    cfg = validate(RunConfig, {"out": "<plan>", **config}, source="run config")
    device_type = planned_device_type(cfg.train.device)
    precision = planned_precision(cfg.train.precision, device_type)
    return estimate_run(cfg, cfg.model.build(vocab_size), precision, device_type, val_tokens=val_tokens)


def check_all_fit(estimates: list[tuple[str, str, MemoryEstimate]]) -> None:
    """Refuse (one line, the first that does not fit, and how many others do not) a study whose
    runs, as (name, device type, estimate), cannot fit their device's memory (`available_memory`)."""
    available = {kind: available_memory(kind) for kind in {kind for _, kind, _ in estimates}}
    unfit = [(name, kind, est) for name, kind, est in estimates
             if available[kind][0] is not None and est.peak > available[kind][0]]  # fmt: skip
    if not unfit:
        return
    name, kind, est = unfit[0]
    try:
        check_fits(name, est, *available[kind])
    except UserError as exc:
        others = f" ({len(unfit) - 1} more runs do not fit either)" if len(unfit) > 1 else ""
        raise UserError(f"{exc}{others}") from None


def checkpoint_bytes(est: MemoryEstimate) -> int:
    """Disk for one checkpoint of a one-process estimate: the fp32 weights (as many bytes as the
    gradients) and the optimizer state, which a checkpoint saves whole (train/checkpoint.py)."""
    return est.gradients + est.optimizer_state


# ----------------------------------------------------------------------------- sizes and devices
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from '80GiB', '512MiB', '1.5TB', '4096' (IEC units are powers of 2, SI of 10)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"device memory {text!r} is not a size; write it like 80GiB, 512MiB or 24GB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """1.23 GiB / 456 MiB: binary units, as nvidia-smi and free -h print them."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"


def available_memory(device_type: str, device_index: int = 0) -> tuple[int | None, str]:
    """(bytes a run may use, where that came from). `$SMALLSCALE_DEVICE_MEMORY` (--device-memory)
    wins; else the GPU's total memory from NVML, or on CPU the memory available now plus what this
    process already holds. (None, reason) when it cannot be known (a GPU run planned without NVML)."""
    given = os.environ.get(DEVICE_MEMORY_ENV)
    if given:
        return parse_size(given), "--device-memory"
    if device_type == "cuda":
        total = _nvml_total(device_index)
        return (total, "NVML") if total is not None else (None, "no NVML here; pass --device-memory to check")
    import psutil

    return psutil.virtual_memory().available + psutil.Process().memory_info().rss, "available RAM"


def _nvml_total(index: int) -> int | None:
    from smallscale.train.telemetry import _import_pynvml, _nvml_handle

    nvml = _import_pynvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return None
    try:
        if torch.cuda.is_available():
            handle = _nvml_handle(nvml, torch.device("cuda", index))
        else:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except nvml.NVMLError:
        return None
    finally:
        nvml.nvmlShutdown()


def check_fits(name: str, est: MemoryEstimate, available: int | None, source: str, ranks_sharing: int = 1) -> None:
    """Refuse, in one line, a run whose predicted peak (times the ranks that share the memory, as
    CPU processes on one machine do) exceeds `available`, saying what to change."""
    need = est.peak * ranks_sharing
    if available is None or need <= available:
        return
    if est.phase == "eval":
        fixes = ["lower train.eval_batch"]
    else:
        fixes = ["lower train.micro_batch (more accumulation, same global batch)"]
        if 2 * est.eval > est.activations:
            fixes.append("lower train.eval_batch")
        if not est.checkpointing:
            fixes.append("set model.grad_checkpointing=true")
        if est.precision == "fp32":
            fixes.append("use train.precision=bf16")
        if 2 * (est.weights + est.optimizer_state) > available:
            fixes.append("shard it with train.parallel=fsdp")
    ranks = f" x {ranks_sharing} processes" if ranks_sharing > 1 else ""
    raise UserError(
        f"run {name} needs about {format_bytes(need)}{ranks} at its peak ({est.phase.replace('_', ' ')}) but the "
        f"device has {format_bytes(available)} ({source}); {', or '.join(fixes)}"
    )
