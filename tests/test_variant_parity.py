"""Variant parity: every architecture switch and every optimizer trains to within a stated margin of
the best variant on one fixed corpus and budget. A variant that lags by more is a bug until
explained: this is the test that catches a mis-scaled position table (before the fix, sinusoidal
positions at 35x the token embedding's scale lagged by ~0.6 bits per byte here, at 3.90).

Setting: Tiny Shakespeare, BPE 512, a 2-layer d_model-64 model (4 heads), context 64, 300 AdamW
steps of 1,024 tokens at the optimizer defaults, fp32, seed 0; val bits per byte over the held-out
split. Print the table with `bash dev.sh test tests/test_variant_parity.py -s`.

Explained lags, measured in this setting (one seed):
- SwiGLU trails GELU by ~0.1 bpb at every position/norm: with init std 0.02 and d_model 64 its gate
  and up projections are both ~0.16 in scale, so their product starts ~7x smaller than GELU's output
  and the MLP leaves its quadratic regime later. The gap closes with width (d_model 128: 0.05) and
  training (600 steps: 0.003), so it is a transient of tiny widths, within the margin.
- Learned positions trail by ~0.1 bpb: the table starts random and must be learned.
- Lion (lr 3e-4) and LAMB (lr 2e-3) at their paper defaults lag by 0.6-1.2 bpb: the defaults are for
  long, large-batch runs (Lion's 3-10x below AdamW; LAMB's lr is a relative change of each tensor per
  step, so 300 steps at 2e-3 change a weight by at most e^0.6). They are held to the margin at the
  learning rates a short run needs (Lion 2e-3, as the quickstart's sweep found; LAMB 2e-2).
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.data]

MARGIN_BPB = 0.35  # largest explained lag in the table below is ~0.25 (learned + layernorm + swiglu)
STEPS = 300
ARCHITECTURES = [
    f"{position}/{norm}/{mlp}"
    for position, norm, mlp in itertools.product(
        ["learned", "sinusoidal", "rope", "alibi", "none"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"]
    )
]
DEFAULT_LR_OPTIMIZERS = ["adamw", "sgd", "muon", "lion", "lamb"]
SHORT_RUN_LR = {"lion": 2e-3, "lamb": 2e-2}  # see the module docstring
HELD_TO_MARGIN_AT_DEFAULT = ["adamw", "sgd", "muon"]


def _overrides(variant: str) -> list[str]:
    if "/" in variant:
        position, norm, mlp = variant.split("/")
        return [f"model.position={position}", f"model.norm={norm}", f"model.mlp={mlp}"]
    name, _, lr = variant.partition("@")
    return [f"optim.name={name}", *([f"optim.lr={lr}"] if lr else [])]


def _train_one(args: tuple[str, str, str]) -> tuple[str, float]:
    """One run in a worker process (one thread each: two workers share the two cores)."""
    variant, dataset, out = args
    import torch

    torch.set_num_threads(1)
    from smallscale.train.trainer import load_run_config, train

    cfg = load_run_config(None, [
        f"data.path={dataset}", f"out={out}", "model.preset=null", "model.n_layer=2", "model.n_head=4",
        "model.d_model=64", "model.seq_len=64", f"train.steps={STEPS}", "train.global_batch_tokens=1024",
        "train.micro_batch=16", "train.precision=fp32", "train.compile=false", "train.log_every_steps=1000",
        "train.eval_batch=64", *_overrides(variant),
    ])  # fmt: skip
    return variant, train(cfg, progress=False)["val_bpb"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict[str, float]:
    from smallscale.data.shards import PrepareConfig, prepare

    tmp = tmp_path_factory.mktemp("parity")
    dataset = tmp / "shakespeare-512"
    prepare(PrepareConfig(source="builtin:tinyshakespeare", out=str(dataset), vocab_size=512, workers=1), progress=False)
    variants = [*ARCHITECTURES, *DEFAULT_LR_OPTIMIZERS, *(f"{n}@{lr}" for n, lr in SHORT_RUN_LR.items())]
    jobs = [(v, str(dataset), str(tmp / "runs" / v.replace("/", "-"))) for v in variants]
    workers = min(2, len(os.sched_getaffinity(0)))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        result = dict(pool.map(_train_one, jobs))
    best_arch = min(result[v] for v in ARCHITECTURES)
    best_opt = min(result[v] for v in HELD_TO_MARGIN_AT_DEFAULT)
    print(f"\nvariant parity: val bits per byte after {STEPS} steps (margin {MARGIN_BPB})")
    for v in variants:
        best = best_arch if v in ARCHITECTURES else best_opt
        print(f"  {v:28s} {result[v]:.4f}  +{result[v] - best:.4f}")
    return result


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_every_architecture_trains_within_the_margin_of_the_best(table, variant):
    best = min(table[v] for v in ARCHITECTURES)
    assert table[variant] - best <= MARGIN_BPB, f"{variant}: {table[variant]:.4f} vs best {best:.4f}"


@pytest.mark.parametrize("optimizer", HELD_TO_MARGIN_AT_DEFAULT)
def test_optimizers_at_their_default_lr_train_within_the_margin_of_the_best(table, optimizer):
    best = min(table[v] for v in HELD_TO_MARGIN_AT_DEFAULT)
    assert table[optimizer] - best <= MARGIN_BPB, f"{optimizer}: {table[optimizer]:.4f} vs best {best:.4f}"


@pytest.mark.parametrize("optimizer", sorted(SHORT_RUN_LR))
def test_lion_and_lamb_lag_only_by_their_default_lr(table, optimizer):
    best = min(table[v] for v in HELD_TO_MARGIN_AT_DEFAULT)
    tuned = table[f"{optimizer}@{SHORT_RUN_LR[optimizer]}"]
    assert tuned - best <= MARGIN_BPB, f"{optimizer} at lr {SHORT_RUN_LR[optimizer]}: {tuned:.4f} vs best {best:.4f}"
    assert table[optimizer] > tuned  # the explained lag: a larger lr is what it needed
