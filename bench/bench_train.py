"""Training throughput of smallscale against Hugging Face transformers and litgpt, same shape, same run.

One training step = forward + cross-entropy on every token + backward + grad clip + AdamW step, on
a fixed random batch (no data loading), at n_layer 4, d_model 256, 4 heads, seq 256, batch 16,
vocab 8192, for these peers (peers eager only; smallscale eager and torch.compile):

  HF GPT2LMHeadModel   vs smallscale position=learned norm=layernorm mlp=gelu   bias=True
  HF LlamaForCausalLM  vs smallscale position=rope    norm=rmsnorm   mlp=swiglu bias=False
  litgpt GPT           (RMSNorm, LLaMAMLP, rope, no bias: the llama-like model again)

The HF model is `smallscale.export.to_hf` of the smallscale one and the litgpt one is built from a
litgpt Config and loaded with the same weights (checked logit for logit): identical FLOPs.
smallscale computes its loss itself (GPT.forward with targets); the peers get F.cross_entropy over
all B*T logits (not HF's shifted `labels=` loss over B*(T-1)), under the same autocast. All use
torch AdamW (fused, as smallscale's trainer builds it; betas 0.9/0.95, weight decay 0.1: on every
tensor for the peers, as smallscale's trainer groups them for smallscale) and clip_grad_norm_. MFU =
tokens/s * (6N + 12*n_layer*d_model*seq_len) / peak, the peak being the best timed square matmul
(1024 and 2048) in the case's dtype (`telemetry.measure_cpu_matmul_peak`, in fresh processes before
and after the cases). litgpt is optional: without it that peer is skipped with a message.

Two machine kinds (--isa): 'native', and 'avx2', where torch, oneDNN and MKL are capped at AVX2 (an
AVX2-only CPU: no AVX-512, no bf16 hardware, so fp32 cases only). The ratios in a run are to HF GPT2
eager fp32 measured in that run. bench/results/train.json holds one entry per kind.

The starred case is smallscale's default for a run of at least 1000 steps (`train.compile=auto`
compiles those); shorter runs train eager, the row below it.

Cases take turns, one step each per round, and each reports its median step, so a change in the
machine's load hits every case alike; the load average is printed. The process re-executes itself
under the CPU allocator setting of `smallscale.launch`, as the CLI does, so every case, peers
included, runs with the same allocator; SMALLSCALE_NO_MALLOC_TUNING=1 measures glibc's defaults.
A few minutes on 2 cores (compilation included), results in bench/results/train.json.

Run: `bash dev.sh shell python bench/bench_train.py [--isa avx2] [--steps 8] [--only llama] [--no-compile]`
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass

from smallscale.io import atomic_write_json
from smallscale.launch import allocator_setting, ensure_cpu_allocator_env

# torch's, oneDNN's and MKL's own caps on the vector ISA they use: an AVX2-only CPU (no AVX-512, no
# bf16 or AMX hardware) simulated on a newer one. All three are read when the library loads.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def restrict_isa(isa: str) -> None:
    """Re-execute this process with the AVX2 caps set ('avx2') or removed ('native'), unless they
    already are; call it before torch is imported."""
    wanted = AVX2_ENV if isa == "avx2" else {}
    if all(os.environ.get(name) == wanted.get(name) for name in AVX2_ENV):
        return
    for name in AVX2_ENV:
        os.environ.pop(name, None)
    os.environ.update(wanted)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def isa_setting() -> dict:
    """The machine kind a result was measured as: 'avx2' (restricted) or 'native', with torch's
    resolved CPU capability and the caps in force."""
    import torch

    return {
        "isa": "avx2" if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" else "native",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {name: os.environ[name] for name in AVX2_ENV if name in os.environ},
    }


SHAPE = {"vocab_size": 8192, "seq_len": 256, "n_layer": 4, "n_head": 4, "d_model": 256}
BATCH = 16
ARCHS = {
    "gpt2": {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
}
PEER_NAME = {("hf", "gpt2"): "HF GPT2LMHeadModel", ("hf", "llama"): "HF LlamaForCausalLM", ("litgpt", "llama"): "litgpt GPT"}


@dataclass(frozen=True)
class Case:
    impl: str  # 'smallscale' | 'hf' | 'litgpt'
    arch: str  # 'gpt2' | 'llama'
    precision: str  # 'fp32' | 'bf16' (autocast)
    compiled: bool

    @property
    def name(self) -> str:
        who = f"smallscale {self.arch}-like" if self.impl == "smallscale" else PEER_NAME[self.impl, self.arch]
        return f"{who} {self.precision} {'compiled' if self.compiled else 'eager'}"


REFERENCE = Case("hf", "gpt2", "fp32", False)


def litgpt_available() -> bool:
    return importlib.util.find_spec("litgpt") is not None


def all_cases(compile_: bool, precisions: tuple[str, ...], litgpt: bool) -> list[Case]:
    cases = [Case("hf", arch, precision, False) for arch in ARCHS for precision in precisions]
    if litgpt:
        cases += [Case("litgpt", "llama", precision, False) for precision in precisions]
    for arch in ARCHS:
        for compiled in (False, True) if compile_ else (False,):
            cases += [Case("smallscale", arch, precision, compiled) for precision in precisions]
    return cases


def to_litgpt(ours):
    """litgpt's GPT at the shape of `ours` (a smallscale llama-like GPT) with its weights: the same
    model, so the same FLOPs and losses. Tied head, as ours and the HF export."""
    import torch
    from litgpt import GPT as LitGPT
    from litgpt import Config as LitConfig

    cfg = ours.cfg
    lit_cfg = LitConfig(
        name="smallscale-bench", block_size=cfg.seq_len, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model, rotary_percentage=1.0, rope_base=int(cfg.rope_base),
        parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=cfg.norm_eps,
        mlp_class_name="LLaMAMLP", intermediate_size=cfg.ffn_dim,
    )  # fmt: skip
    model = LitGPT(lit_cfg)
    state = {"transformer.wte.weight": ours.tok_emb.weight, "transformer.ln_f.weight": ours.norm_f.weight}
    for i, block in enumerate(ours.blocks):
        gate, up = block.mlp.fc.weight.chunk(2)  # ours computes [gate | up] in one Linear
        state |= {
            f"transformer.h.{i}.norm_1.weight": block.attn_norm.weight,
            f"transformer.h.{i}.attn.qkv.weight": block.attn.qkv.weight,  # [q | k | v] in both
            f"transformer.h.{i}.attn.proj.weight": block.attn.proj.weight,
            f"transformer.h.{i}.norm_2.weight": block.mlp_norm.weight,
            f"transformer.h.{i}.mlp.fc_1.weight": gate,
            f"transformer.h.{i}.mlp.fc_2.weight": up,
            f"transformer.h.{i}.mlp.proj.weight": block.mlp.proj.weight,
        }
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state.pop(name) if name != "lm_head.weight" else ours.lm_head.weight)
    assert not state, f"unused weights: {sorted(state)}"
    model.lm_head.weight = model.transformer.wte.weight
    ids = torch.arange(cfg.seq_len)[None] % cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ours(ids).logits, atol=1e-4, rtol=1e-4)
    return model


def default_case() -> Case:
    """What `smallscale train` does on this machine with nothing set, for a run long enough that
    throughput matters (at least AUTO_COMPILE_MIN_STEPS steps): the default architecture,
    `train.precision=auto` and `train.compile=auto`."""
    import torch

    from smallscale.model.gpt import GPTConfig
    from smallscale.train.trainer import AUTO_COMPILE_MIN_STEPS, TrainSection, resolve_compile, resolve_precision

    defaults = GPTConfig(**SHAPE)
    arch = next(name for name, switches in ARCHS.items() if all(getattr(defaults, k) == v for k, v in switches.items()))
    precision = resolve_precision("auto", torch.device("cpu"))
    compiled = resolve_compile(TrainSection.model_fields["compile"].default, AUTO_COMPILE_MIN_STEPS)
    return Case("smallscale", arch, precision, compiled)


def build(case: Case):
    """(model, optimizer, loss_fn(inputs, targets) -> loss, flops_per_token) for one case."""
    import torch
    import torch.nn.functional as F

    from smallscale.export import to_hf
    from smallscale.model.gpt import GPT, GPTConfig
    from smallscale.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    ours = GPT(GPTConfig(**SHAPE, **ARCHS[case.arch]))
    flops_per_token = ours.flops_per_token()
    if case.impl == "smallscale":
        model = ours.train()
        optimizer = build_optimizer(model, OptimConfig())
        forward = torch.compile(model) if case.compiled else model

        def loss_fn(inputs, targets):
            return forward(inputs, targets).loss

    elif case.impl == "litgpt":
        model = to_litgpt(ours).train()
        del ours
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        forward = torch.compile(model) if case.compiled else model

        def loss_fn(inputs, targets):
            logits = forward(inputs)  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    else:
        model = to_hf(ours).train()
        del ours
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        forward = torch.compile(model) if case.compiled else model

        def loss_fn(inputs, targets):
            logits = forward(input_ids=inputs).logits  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return model, optimizer, loss_fn, flops_per_token


class Runner:
    """One case, built and warmed up, ready to time one step at a time (so cases can take turns)."""

    def __init__(self, case: Case, warmup: int):
        import torch

        self.case = case
        self.model, self.optimizer, self.loss_fn, self.flops_per_token = build(case)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["seq_len"] + 1), generator=gen)
        self.inputs, self.targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        bf16 = case.precision == "bf16"
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step_s: list[float] = []
        self.sys_s = self.user_s = 0.0
        self.page_faults = 0
        t0 = time.perf_counter()
        for _ in range(warmup):
            self.first_loss = self.step()  # the last warmup step's loss
        self.warmup_s = time.perf_counter() - t0

    def step(self) -> float:
        import torch

        with self.autocast():
            loss = self.loss_fn(self.inputs, self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def timed_step(self) -> None:
        usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        self.last_loss = self.step()
        self.step_s.append(time.perf_counter() - t0)
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        self.sys_s += usage1.ru_stime - usage0.ru_stime
        self.user_s += usage1.ru_utime - usage0.ru_utime
        self.page_faults += usage1.ru_minflt - usage0.ru_minflt

    def result(self) -> dict:
        steps, tokens = len(self.step_s), BATCH * SHAPE["seq_len"]
        median_s = statistics.median(self.step_s)
        return {
            "tokens_per_s": tokens / median_s,
            "ms_per_step": 1e3 * median_s,
            "mean_ms_per_step": 1e3 * statistics.fmean(self.step_s),
            "min_ms_per_step": 1e3 * min(self.step_s),
            "sys_ms_per_step": 1e3 * self.sys_s / steps,
            "user_ms_per_step": 1e3 * self.user_s / steps,
            "page_faults_per_step": self.page_faults / steps,
            "warmup_s": self.warmup_s,
            "flops_per_token": self.flops_per_token,
            "loss_first": self.first_loss,
            "loss_last": self.last_loss,
        }


def measure_peaks(precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, float]:
    """The matmul peak per precision, timed in a fresh process (telemetry caches one per process)."""
    code = (
        "import json, torch; from smallscale.train import telemetry; "
        "print(json.dumps({name: telemetry.measure_cpu_matmul_peak(dtype, seconds=2.0) "
        f"for name, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)) if name in {precisions!r}}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case (compiled cases: at least 2)")
    parser.add_argument("--only", nargs="*", default=None, help="run only cases whose name contains one of these")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: restrict torch, oneDNN and MKL to AVX2 (and fp32: bf16 is emulated there)")  # fmt: skip
    parser.add_argument("--out", default="bench/results/train.json", help="results go under the key of --isa")
    args = parser.parse_args()
    restrict_isa(args.isa)

    import torch

    from smallscale import provenance
    from smallscale.train import telemetry
    from smallscale.train.trainer import cpu_supports_bf16

    precisions = ("fp32", "bf16") if cpu_supports_bf16() else ("fp32",)
    if not litgpt_available():
        print("litgpt is not installed (`pip install litgpt`): skipping the litgpt GPT peer", flush=True)
    peaks_before = measure_peaks(precisions)
    default = default_case()
    cases = all_cases(not args.no_compile, precisions, litgpt_available())
    if args.only:
        cases = [c for c in cases if c == REFERENCE or any(s in c.name for s in args.only)]
    runners, errors = [], {}
    for case in cases:
        print(f"... building and warming up {case.name}", flush=True)
        try:
            runners.append(Runner(case, max(args.warmup, 2) if case.compiled else args.warmup))
        except Exception as exc:  # compile on CPU needs a C++ toolchain; report, don't abort the run
            traceback.print_exc(limit=3)
            errors[case] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    # Cases take turns, one step each, so a change in the machine's load hits all of them alike.
    load_before = os.getloadavg()[0]
    for _ in range(args.steps):
        for runner in runners:
            runner.timed_step()
    load_after = os.getloadavg()[0]
    peaks_after = measure_peaks()
    peak = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}

    results = {r.case: r.result() for r in runners}
    ref = results.get(REFERENCE)
    rows = []
    for case in cases:
        row = {**asdict(case), "name": case.name, "default": case == default}
        if case in errors:
            rows.append({**row, "error": errors[case]})
            continue
        r = results[case]
        r["mfu"] = telemetry.mfu(r["tokens_per_s"], r["flops_per_token"], peak[case.precision])
        r["mfu_vs_bf16_peak"] = telemetry.mfu(r["tokens_per_s"], r["flops_per_token"], peak["bf16"]) if "bf16" in peak else None
        if ref is not None:
            r["vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
        rows.append({**row, **r})

    setting = isa_setting()
    peaks_text = ", ".join(f"{name} {flops / 1e9:.0f} GFLOP/s" for name, flops in peak.items())
    print(f"\n{provenance.cpu_model()}, {setting['isa']} (torch CPU capability {setting['cpu_capability']}); "
          f"peak (timed matmul, {torch.get_num_threads()} threads, best of before/after): {peaks_text}; "
          f"allocator: {allocator_setting()}; load average {load_before:.1f} -> {load_after:.1f}; "
          f"{args.steps} timed steps per case, median")  # fmt: skip
    print(f"{'case':<44} {'ms/step':>8} {'tokens/s':>9} {'MFU':>6} {'MFU bf16pk':>10} {'x HF GPT2 fp32':>14} {'sys ms':>7}")
    for r in rows:
        mark = " *" if r["default"] else ""
        if "error" in r:
            print(f"{r['name'] + mark:<44} failed: {r['error']}")
            continue
        bf16_mfu = "-" if r["mfu_vs_bf16_peak"] is None else f"{r['mfu_vs_bf16_peak']:.1%}"
        print(f"{r['name'] + mark:<44} {r['ms_per_step']:>8.0f} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} "
              f"{bf16_mfu:>10} {r.get('vs_reference', float('nan')):>13.2f}x {r['sys_ms_per_step']:>7.0f}")  # fmt: skip
    print("* = smallscale's default here for a run of >= 1000 steps (default architecture, train.precision=auto, "
          "train.compile=auto); shorter runs train eager")  # fmt: skip
    default_row = next((r for r in rows if r["default"] and "error" not in r), None)
    if default_row is not None and "vs_reference" in default_row:
        print(f"default: {default_row['vs_reference']:.2f}x HF GPT2 eager fp32, {default_row['mfu']:.1%} of the "
              f"{default_row['precision']} matmul peak")  # fmt: skip

    result = {
        "command": " ".join(sys.argv),
        "shape": {**SHAPE, "batch": BATCH},
        "steps": args.steps,
        "statistic": "median step time",
        "peak_flops": peak,
        "peak_flops_before_after": [peaks_before, peaks_after],
        "allocator": allocator_setting(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "load_average": [load_before, load_after],
        "torch_threads": torch.get_num_threads(),
        "cpu": provenance.cpu_model(),
        "setting": setting,
        "packages": {
            name: importlib.metadata.version(name)
            for name in ("torch", "transformers", "litgpt", "smallscale")
            if importlib.util.find_spec(name) is not None
        },
        "python": platform.python_version(),
        "results": rows,
    }
    atomic_write_json(args.out, {**read_settings(args.out), setting["isa"]: result})
    print(f"wrote {args.out} [{setting['isa']!r}]")


def read_settings(path: str) -> dict:
    """The results already in `path`, one entry per setting ('native', 'avx2'); a file in another
    layout (one run of an older version) is replaced."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return saved if saved and set(saved) <= {"native", "avx2"} else {}


if __name__ == "__main__":
    ensure_cpu_allocator_env()
    main()
