"""The training loop: accumulation, precision, clipping, eval cadence, checkpoints, guards.

The trainer reads token shards through `smallscale.data.loader` and knows nothing about which corpus
they came from. Everything a run produces lives in its run directory:

    config.yaml   the resolved config          env.json      versions, hardware, git revision
    model.json    the GPTConfig (all a loader needs besides the weights and the dataset's tokenizer)
    metrics.jsonl one JSON object per logged step (and per eval)
    checkpoints/  atomic checkpoints (see checkpoint.py)
    summary.json  written at the end

Units: budgets and cadences are in tokens; `step` is one optimizer update of `global_batch_tokens`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from smallscale import hardware, provenance
from smallscale.config import Strict, dump_config, read_yaml, validate
from smallscale.data.loader import TrainLoader
from smallscale.data.shards import load_manifest
from smallscale.energy import EnergyConfig, EnergyMeter, Reading
from smallscale.errors import Stopped, UserError
from smallscale.eval.tasks.perplexity import ScoringSet, score
from smallscale.io import atomic_write_json, atomic_write_text, writing
from smallscale.model.gpt import GPT, GPTConfig, GPTOutput
from smallscale.model.presets import PRESETS, preset_config
from smallscale.optim import OptimConfig, ScheduleConfig, build_optimizer, lr_at
from smallscale.train import checkpoint, distributed, telemetry, trackers
from smallscale.train.trackers import RunLabels, TrackerName

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class DataSection(Strict):
    path: str = Field(description="a prepared dataset folder (smallscale data prepare)")
    token_budget: int | None = Field(None, gt=0, description="use only the first N train tokens (nested prefixes)")
    shuffle: bool = True


class ModelSection(Strict):
    """A preset plus any GPTConfig field to override; vocab_size comes from the dataset."""

    preset: str | None = "cpu-2m"
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    seq_len: int | None = None
    position: Literal["learned", "sinusoidal", "rope", "alibi", "none"] | None = None
    rope_base: float | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu"] | None = None
    bias: bool | None = None
    qk_norm: bool | None = None
    tie_embeddings: bool | None = None
    dropout: float | None = None
    init_std: float | None = None
    grad_checkpointing: bool | None = None

    def build(self, vocab_size: int) -> GPTConfig:
        fields = {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}
        fields["vocab_size"] = vocab_size
        try:
            if self.preset is None:
                return GPTConfig(**fields)
            if self.preset not in PRESETS:
                raise UserError(f"model.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
            return preset_config(self.preset, **fields)
        except (ValueError, TypeError) as exc:
            raise UserError(f"model: {exc}") from None


# torch.compile costs ~33 s on a 2-core CPU the first time a shape is seen and 7-8 s from inductor's
# cache (bench/bench_components.py 'compile_cpu2m', with and without an empty
# TORCHINDUCTOR_CACHE_DIR), then saves 25-30% of every step
# (bench/bench_train.py: 316 -> 231 ms at 5M parameters; bench/bench_components.py, 'compile_cpu2m':
# 131-155 -> 97-102 ms for cpu-2m, then 7 x 112, at micro-batch 8), so it repays itself within a few hundred steps.
AUTO_COMPILE_MIN_STEPS = 1000


class TrainSection(Strict):
    tokens: int | None = Field(None, gt=0, description="total training tokens (may exceed the data budget: epochs)")
    steps: int | None = Field(None, gt=0, description="alternatively, optimizer steps")
    global_batch_tokens: int = Field(16384, gt=0)
    micro_batch: int = Field(16, gt=0, description="sequences per forward pass per device")
    precision: Precision = "auto"
    compile: bool | Literal["auto"] = Field(
        "auto",
        description=f"torch.compile the model; auto: for runs of at least {AUTO_COMPILE_MIN_STEPS} optimizer steps, "
        "falling back to eager with a warning if compilation fails",
    )
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    eval_every_tokens: int | None = Field(None, gt=0)
    eval_at_tokens: list[Annotated[int, Field(gt=0)]] = Field(
        [], description="also evaluate after the step that reaches each of these token counts (e.g. log-spaced)"
    )
    eval_batch: int = Field(16, gt=0)
    eval_tokens: int | None = Field(
        2_000_000, gt=0, description="in-loop evaluations score the first val documents up to this many tokens "
        "(a fixed subset, so evaluation stays cheap on a large val split); null: the whole val split",
    )
    checkpoint_every_tokens: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every_steps: int = Field(10, gt=0)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    trackers: list[TrackerName] = Field(
        [], description="also log each metrics.jsonl record to these (optional extras): tensorboard, wandb, trackio, mlflow"
    )
    tracker_project: str = Field("smallscale", description="the project (W&B, trackio) or experiment (MLflow) runs log to")
    energy: EnergyConfig = EnergyConfig()

    @model_validator(mode="after")
    def _budget(self) -> TrainSection:
        if self.tokens is not None and self.steps is not None:  # e.g. train.steps=N over a config that sets tokens
            raise ValueError(f"set exactly one of train.tokens ({self.tokens}) and train.steps ({self.steps}); "
                             "to override one, also set the other to null, e.g. train.tokens=null train.steps=N")
        if self.tokens is None and self.steps is None:
            raise ValueError("set exactly one of train.tokens and train.steps")
        return self


class RunConfig(Strict):
    out: str = Field(description="run directory")
    data: DataSection
    model: ModelSection = ModelSection()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainSection


def load_run_config(path: str | Path | None, overrides: list[str]) -> RunConfig:
    from smallscale.config import deep_merge, parse_overrides

    data = read_yaml(path) if path is not None else {}
    return validate(RunConfig, deep_merge(data, parse_overrides(overrides)), source=str(path or "config"))


# ----------------------------------------------------------------------------- setup helpers
def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available; use device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def cpu_supports_bf16() -> bool:
    """bf16 matmuls in hardware: the CPU has AVX512-BF16 or AMX, and torch may use them (not
    restricted below AVX-512 by ATEN_CPU_CAPABILITY); elsewhere bf16 is emulated, far slower than fp32."""
    flags = provenance.cpu_flags()
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def resolve_precision(choice: Precision, device: torch.device) -> str:
    if choice == "fp16" and device.type != "cuda":
        raise UserError("train.precision 'fp16' needs a CUDA device (GradScaler); use bf16 or fp32 on CPU")
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.precision 'bf16' is not supported by this GPU; use fp16 or fp32")
    if choice == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        bf16_flops, fp32_flops = telemetry.cpu_matmul_rates(torch.bfloat16)
        warnings.warn(
            f"train.precision=bf16 on this CPU is emulated: a 512x512 matmul ran {fp32_flops / bf16_flops:.0f}x slower "
            f"than fp32 ({bf16_flops / 1e9:.1f} GFLOP/s vs {fp32_flops / 1e9:.1f} GFLOP/s); use precision=fp32 or auto",
            stacklevel=2,
        )
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def resolve_compile(choice: bool | str, total_steps: int) -> bool:
    """Whether to torch.compile the model: the explicit choice, or for 'auto' whether the run is
    long enough to repay compilation."""
    if choice == "auto":
        return total_steps >= AUTO_COMPILE_MIN_STEPS
    return bool(choice)


def autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def plan_batches(cfg: RunConfig, seq_len: int, world_size: int) -> tuple[int, int]:
    """(accumulation steps, total steps), with clear errors for impossible combinations."""
    t = cfg.train
    per_micro = t.micro_batch * seq_len * world_size
    if per_micro > t.global_batch_tokens:
        raise UserError(
            f"train.micro_batch {t.micro_batch} x seq_len {seq_len} x {world_size} device(s) = {per_micro} tokens "
            f"exceeds train.global_batch_tokens {t.global_batch_tokens}; lower micro_batch or raise the global batch"
        )
    if t.global_batch_tokens % per_micro:
        raise UserError(
            f"train.global_batch_tokens {t.global_batch_tokens} is not a multiple of micro_batch x seq_len x devices "
            f"= {per_micro}; use e.g. {per_micro * max(1, round(t.global_batch_tokens / per_micro))}"
        )
    accum = t.global_batch_tokens // per_micro
    # Whole steps not exceeding train.tokens (at least one), so that train.tokens = data.token_budget
    # never trains a window twice.
    total_steps = t.steps if t.steps is not None else max(1, t.tokens // t.global_batch_tokens)
    return accum, total_steps


def _every(tokens_before: int, tokens_after: int, period: int | None) -> bool:
    return period is not None and tokens_after // period > tokens_before // period


# ----------------------------------------------------------------------------- the run
class NonFiniteError(UserError):
    pass


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, labels: RunLabels | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the summary. Holds the run directory's
    lock throughout (smallscale/lock.py): FolderBusy, before anything is written, if another
    process trains or resumes it. `labels`: the run's group and tags in its trackers (a study's)."""
    import os

    from smallscale.lock import hold

    out = Path(cfg.out)
    device = resolve_device(cfg.train.device)
    # Rank 0 alone writes the run directory, so it alone holds the lock, taken before the process
    # group exists: a busy directory stops rank 0 at once and torchrun then stops the other ranks,
    # none of them left waiting in a collective.
    owning = hold(out, "resume" if resume else "train") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with owning:
        info = distributed.setup(device.type)
        try:
            with contextlib.ExitStack() as on_exit:  # stops the energy meter and the trackers however the run ends
                return _train(cfg, out, device, info, resume, progress, labels or RunLabels(), on_exit)
        finally:
            distributed.teardown()


def _train(
    cfg: RunConfig, out: Path, device: torch.device, info: distributed.DistInfo, resume: bool, progress: bool,
    labels: RunLabels, on_exit: contextlib.ExitStack,
) -> dict[str, Any]:  # fmt: skip
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    if device.type == "cpu":
        hardware.set_cpu_threads()  # one per usable core (affinity, cgroup quota) unless OMP_NUM_THREADS is set
    ckpt_dir = out / "checkpoints"
    if (out / "config.yaml").exists() and not resume:
        raise UserError(f"run directory {str(out)!r} already exists; resume it with `smallscale resume {out}` or choose another out")
    manifest = load_manifest(cfg.data.path)
    model_cfg = cfg.model.build(manifest["vocab_size"])
    precision = resolve_precision(cfg.train.precision, device)
    accum, total_steps = plan_batches(cfg, model_cfg.seq_len, info.world_size)
    total_tokens = total_steps * cfg.train.global_batch_tokens
    autocast = autocast_factory(precision, device)
    from smallscale.train.memory import check_run

    check_run(cfg, model_cfg, precision, device, info.world_size)  # refuse a run that cannot fit, before allocating

    torch.manual_seed(cfg.train.seed)
    model = GPT(model_cfg).to(device)
    n_params, n_nonemb = model.num_params(), model.num_params(non_embedding=True)
    flops_per_token = model.flops_per_token(model_cfg.seq_len)
    loader = TrainLoader(
        cfg.data.path, model_cfg.seq_len, cfg.train.micro_batch, cfg.data.token_budget,
        seed=cfg.train.seed, rank=info.rank, world_size=info.world_size, shuffle=cfg.data.shuffle,
    )  # fmt: skip

    step, tokens_seen, skipped, wall_before = 0, 0, 0, 0.0
    found = checkpoint.resume_point(ckpt_dir, model.state_dict(), info.is_main) if resume else None
    summary_path = out / "summary.json"
    if found is not None and found.state["step"] >= total_steps and summary_path.exists():
        with contextlib.suppress(ValueError):  # not JSON or not UTF-8 (a disk fault): written again below
            if isinstance(summary := json.loads(summary_path.read_text(encoding="utf-8")), dict):
                return summary  # already finished: nothing to do
        warnings.warn(f"{summary_path} is damaged; writing it again", stacklevel=2)
    if found is not None:
        model.load_state_dict(checkpoint.load_weights(found.path))
        loader.load_state_dict(found.state["loader"])
        step, tokens_seen = found.state["step"], found.state["tokens"]
        skipped, wall_before = found.state["skipped_steps"], found.state["wall_s"]
    checkpoint.cleanup(ckpt_dir)

    wrapped = distributed.wrap(model, info, cfg.train.parallel, device)
    optimizer = build_optimizer(model, cfg.optim)  # after wrapping: FSDP2 replaces parameters
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if found is not None:
        distributed.load_optimizer_state(model, optimizer, checkpoint.load_optimizer(found.path))
    compiled = resolve_compile(cfg.train.compile, total_steps)
    forward = torch.compile(wrapped) if compiled else wrapped
    compile_pending = compiled
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if found is not None:
        checkpoint.restore_rng(found)  # last: nothing above may consume random numbers after it

    def write_env() -> None:
        env = {**provenance.environment(), "precision": precision, "compile": compiled, "world_size": info.world_size}
        atomic_write_json(out / "env.json", env)

    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg.model_copy(update={"optim": cfg.optim.resolved()})))
        write_env()
        # The exact model shape, so evaluation/export rebuild the model without the trainer's config.
        atomic_write_json(out / "model.json", dataclasses.asdict(model_cfg))
        _truncate_metrics(metrics_path, step)
    peak_flops, peak_source = telemetry.device_peak_flops(device, torch.bfloat16 if precision != "fp32" else torch.float32)
    peak_total = peak_flops * info.world_size

    heldout = ScoringSet.from_split(cfg.data.path, model_cfg.seq_len, "val", max_tokens=cfg.train.eval_tokens)
    eval_batch_tokens = cfg.train.eval_batch * model_cfg.seq_len

    def evaluate() -> dict[str, float]:
        # eager: the validation batches would each be a new shape for the compiled model to compile
        return score(
            wrapped, heldout, eval_batch_tokens, device, autocast=autocast, rank=info.rank, world_size=info.world_size,
            reduce=lambda v: distributed.all_reduce_sum(v, device),
            pad_batches_to=heldout.batches_per_rank(eval_batch_tokens, info.world_size)
            if cfg.train.parallel == "fsdp" and info.enabled else None,
        )  # fmt: skip

    def save_checkpoint() -> None:
        weights = distributed.full_state_dict(wrapped)
        optim_state = distributed.optimizer_state(model, optimizer)
        if info.is_main:
            state = {"tokens": tokens_seen, "loader": loader.state_dict(), "skipped_steps": skipped,
                     "wall_s": wall_before + (time.perf_counter() - t_start), "energy": meter.lap().as_dict()}  # fmt: skip
            checkpoint.save(ckpt_dir, step, weights, optim_state, state, cfg.train.keep_checkpoints)

    telemetry.reset_peak_memory(device)
    gpu = telemetry.GpuMonitor(device) if info.is_main else None
    if gpu:
        gpu.start()
    # Rank 0 measures energy (CodeCarbon: the machine's GPUs, its own CPU share) and feeds the trackers.
    meter = EnergyMeter(cfg.train.energy, out, before=Reading.from_dict(found.state.get("energy")) if found is not None else None)
    on_exit.callback(meter.close)
    if info.is_main:
        meter.start()
    run_info = trackers.RunInfo(run_dir=out, name=out.name, config=read_yaml(out / "config.yaml") if info.is_main else {},
                                project=cfg.train.tracker_project, labels=labels, start_step=step)  # fmt: skip
    run_trackers = trackers.open_trackers(cfg.train.trackers if info.is_main else [], run_info)
    on_exit.callback(run_trackers.finish, {})
    t_start = time.perf_counter()
    startup_s = telemetry.seconds_since_process_start()  # interpreter, imports, data checks, model build
    window_t, window_tokens = t_start, 0
    last_eval: dict[str, float] | None = None
    first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # the first non-finite step, 0: none
    step_loss = float("nan")
    stop = _StopRequest(on_exit)
    bar = _progress_bar(progress and info.is_main, total_steps, step)

    while step < total_steps:
        # The lr of the update that completes this batch (so the first step is not at lr 0).
        lr_scale = lr_at(tokens_seen + cfg.train.global_batch_tokens, total_tokens, 1.0, cfg.schedule)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * lr_scale
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            inputs, targets = loader.next_batch()
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with distributed.no_sync(wrapped, micro == accum - 1), autocast():
                if compile_pending:  # compilation happens here, in the first forward
                    forward, compiled, loss = _first_compiled_loss(forward, wrapped, cfg.train.compile, inputs, targets)
                    compile_pending = False
                    if not compiled and info.is_main:
                        write_env()  # it fell back to eager: say so where the run records its setting
                else:
                    loss = forward(inputs, targets).loss
            scaled = loss / accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach()
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
        tokens_before = tokens_seen
        # No host sync per step (a GPU would idle while Python waits): the loss and gradient norm are
        # read back only at log, eval and checkpoint steps, and a non-finite step is remembered on
        # the device (its step number) and raised at the next such step, before any checkpoint could
        # keep its weights. Skipping a bad step must decide before the update, so `skip` (and fp16's
        # scaler, which skips by itself) reads the values every step.
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        if cfg.train.on_nonfinite == "skip" and scaler is None and not bool(finite):
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
        else:
            if scaler is None and cfg.train.on_nonfinite == "stop":
                first_bad_step = torch.where(finite | (first_bad_step > 0), first_bad_step, step + 1)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.train.global_batch_tokens
        window_tokens += cfg.train.global_batch_tokens

        record: dict[str, Any] | None = None
        log_now = step % cfg.train.log_every_steps == 0 or step == total_steps
        eval_now = (
            _every(tokens_before, tokens_seen, cfg.train.eval_every_tokens)
            or any(tokens_before < t <= tokens_seen for t in cfg.train.eval_at_tokens)
            or step == total_steps
        )
        save_now = _every(tokens_before, tokens_seen, cfg.train.checkpoint_every_tokens) or step == total_steps
        stopping = False
        # A stop request is acted on where the host reads back anyway (every rank must agree to
        # save a checkpoint together); alone, at once.
        if log_now or eval_now or save_now or (stop.requested and not info.enabled):  # the host reads back here, and only here
            _raise_if_nonfinite(int(first_bad_step), loader, accum * cfg.train.micro_batch * info.world_size)
            step_loss, requests = distributed.all_reduce_sum([loss_sum.item() / accum, float(stop.requested)], device)
            step_loss /= info.world_size
            stopping = requests > 0
        if log_now:
            now = time.perf_counter()
            tok_s = window_tokens / max(now - window_t, 1e-9)
            window_t, window_tokens = now, 0
            record = {
                "step": step, "tokens": tokens_seen, "loss": step_loss, "lr": base_lrs[0] * lr_scale,
                "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                "mfu": telemetry.mfu(tok_s, flops_per_token, peak_total), "epochs": loader.epochs,
                "skipped_steps": skipped,
            }  # fmt: skip
        if eval_now:
            eval_start = time.perf_counter()
            last_eval = evaluate()
            record = (record or {"step": step, "tokens": tokens_seen, "loss": step_loss})
            record.update(val_loss=last_eval["loss"], val_bpb=last_eval["bpb"], val_ppl=last_eval["ppl"],
                          eval_s=time.perf_counter() - eval_start)  # fmt: skip
        if record is not None and info.is_main:
            record["elapsed_s"] = wall_before + (time.perf_counter() - t_start)  # training wall time, evals included
            with writing(metrics_path), open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            run_trackers.log(record)  # after metrics.jsonl, the source of truth
        if save_now or stopping:
            save_checkpoint()
        if bar is not None:
            bar.update(bar.task_ids[0], completed=step, **({"loss": step_loss} if log_now else {}))
        if stopping and step < total_steps:
            if bar is not None:
                bar.stop()
            raise Stopped(f"stopped by SIGTERM at step {step} of {total_steps}, checkpoint saved; "
                          f"`smallscale resume {out}` continues it")  # fmt: skip

    if bar is not None:
        bar.stop()
    if last_eval is None:  # resumed after the final checkpoint but before summary.json: evaluate now
        last_eval = evaluate()
    wall = wall_before + (time.perf_counter() - t_start)
    gpu_summary = gpu.stop() if gpu else {"gpu_util": None, "energy_j": None}
    energy_summary = meter.stop()  # CodeCarbon's kWh and CO2; energy_j above is the GPU's own NVML counter
    tokens_per_s = tokens_seen / wall if wall else 0.0
    summary = {
        "status": "done",
        "params": n_params,
        "non_embedding_params": n_nonemb,
        "flops_per_token": flops_per_token,
        "flops_convention": "6N + 12*n_layer*d_model*seq_len per token; N: matmul parameters (the tied embedding once, "
                            "not position tables or an untied input embedding)",
        "tokens_seen": tokens_seen,
        "steps": step,
        "epochs": loader.epochs,
        "token_budget": loader.budget_tokens,
        "val_loss": last_eval["loss"] if last_eval else None,
        "val_bpb": last_eval["bpb"] if last_eval else None,
        "val_ppl": last_eval["ppl"] if last_eval else None,
        "val_tokens": last_eval["tokens"] if last_eval else None,
        "wall_s": wall,
        "startup_s": startup_s,
        "tokens_per_s": tokens_per_s,
        "mfu": telemetry.mfu(tokens_per_s, flops_per_token, peak_total),
        "peak_flops": peak_total,
        "peak_flops_source": peak_source,
        "peak_mem_bytes": telemetry.peak_memory_bytes(device),
        "optimizer_state_bytes": _optimizer_state_bytes(optimizer),
        "device": telemetry.device_name(device),
        "skipped_steps": skipped,
        "precision": precision,
        "compile": compiled,
        "world_size": info.world_size,
        **gpu_summary,
        **energy_summary,
    }
    if info.is_main:
        atomic_write_json(out / "summary.json", summary)
        run_trackers.finish(summary)
    return summary


class _StopRequest:
    """Whether this process got SIGTERM during training (a scheduler's preemption or time-limit
    notice, `kill`, the death of the study that started it): the loop then saves a checkpoint at
    the end of the step and raises `Stopped`, instead of dying with the work since the last
    periodic checkpoint. Installed only in the main thread (Python's rule for signal handlers);
    the previous handler comes back when training ends."""

    def __init__(self, on_exit: contextlib.ExitStack):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._handle)
            on_exit.callback(signal.signal, signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


def _raise_if_nonfinite(bad_step: int, loader: TrainLoader, samples_per_step: int) -> None:
    """NonFiniteError for the first step whose loss or gradient norm was not finite (0: none was)."""
    if bad_step:
        first = (bad_step - 1) * samples_per_step  # a batch is a pure function of the step (loader.py)
        raise NonFiniteError(
            f"non-finite loss or gradient norm at step {bad_step} (batch of samples {first}..{first + samples_per_step - 1}); "
            "lower optim.lr, enable grad_clip, or set train.on_nonfinite=skip"
        )


def _first_compiled_loss(
    forward: Callable[..., GPTOutput], eager: Callable[..., GPTOutput], choice: bool | str, inputs: Tensor, targets: Tensor
) -> tuple[Callable[..., GPTOutput], bool, Tensor]:
    """(forward, compiled, loss) for the first batch, which is when torch.compile compiles. A failure
    (e.g. no C++ compiler for inductor's CPU code) happens before any backward, so under
    compile='auto' it warns and the eager model takes over; under compile=true it is a UserError."""
    try:
        return forward, True, forward(inputs, targets).loss
    except Exception as exc:  # dynamo and inductor raise many types; the message says which
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        if choice != "auto":
            raise UserError(
                f"torch.compile failed: {type(exc).__name__}: {first_line}; set train.compile=false to train "
                "without it (on CPU, inductor needs a C++ compiler)"
            ) from exc
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {first_line}); training without it", stacklevel=2)
        return eager, False, eager(inputs, targets).loss


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors on this rank (moments etc.; what Q3 compares)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (and a last line torn by the interruption)
    so the file reads as one clean run."""
    from smallscale.eval.runs import read_metrics

    if not path.exists():
        return
    keep = [record for record in read_metrics(path) if record["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in keep))


def _progress_bar(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
    )  # fmt: skip
    bar.add_task("train", total=total, completed=start, loss=float("nan"))
    bar.start()
    return bar


def resume(run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Continue a run from its latest checkpoint with its recorded config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = validate(RunConfig, read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    cfg.out = str(run_dir)
    return train(cfg, resume=True, progress=progress)
