"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
- `model.safetensors`  the weights (safetensors: no pickle);
- `optimizer.pt`       optimizer state: plain tensors and numbers, loadable with weights_only=True;
- `rng.pt`             torch CPU (and CUDA) generator states as uint8 tensors;
- `state.json`         step, tokens, loader state, python/numpy RNG states, extra counters.
It is written into `.tmp-step-NNNNNNNN/` and renamed when every file is on disk, so a process killed
mid-write (even by SIGKILL) leaves only a temp folder that `latest()` ignores and `cleanup()` removes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
# Fault injection for the kill -9 test: SIGKILL this process after writing the weights of this step.
CRASH_ENV = "SMALLSCALE_CRASH_DURING_CHECKPOINT_STEP"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    plain = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return plain, tensors


def _set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, gauss_np = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save(
    ckpt_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # safetensors refuses shared storage (tied embeddings): store each tensor once, contiguous.
    weights = {k: v.detach().contiguous().clone() for k, v in model_state.items()}
    save_file(weights, str(tmp / "model.safetensors"))
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), 9)
    torch.save(optim_state, tmp / "optimizer.pt")
    rng_plain, rng_tensors = _rng_state()
    torch.save(rng_tensors, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_plain}))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of interrupted writes are not listed)."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def cleanup(ckpt_dir: Path) -> None:
    """Remove leftovers of interrupted writes."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def latest(ckpt_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(ckpt_dir)
    if not found:
        return None
    path = found[-1]
    state = json.loads((path / "state.json").read_text())
    return Checkpoint(path=path, step=state["step"], state=state)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def load_optimizer(path: Path) -> dict[str, Any]:
    return torch.load(path / "optimizer.pt", weights_only=True)


def restore_rng(ckpt: Checkpoint) -> None:
    _set_rng_state(ckpt.state["rng"], torch.load(ckpt.path / "rng.pt", weights_only=True))
