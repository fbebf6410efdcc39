"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
- `model.safetensors`  the weights (safetensors: no pickle);
- `optimizer.pt`       optimizer state: plain tensors and numbers, loadable with weights_only=True;
- `rng.pt`             torch CPU (and CUDA) generator states as uint8 tensors;
- `state.json`         step, tokens, loader state, python/numpy RNG states, extra counters, and the
                       sha256 of each of the three files above.
It is written into `.tmp-step-NNNNNNNN/` and renamed when every file is on disk, so a process killed
mid-write (even by SIGKILL) leaves only a temp folder that `latest()` ignores and `cleanup()` removes.

A checkpoint damaged later (a bad disk, a truncated copy, a file from another run) is caught before
anything is loaded: `verify` checks state.json, the recorded hashes (checkpoints written before hashes
were recorded get every other check), the weights' header and shapes, and loads the optimizer and RNG
files as plain tensors (never unpickling code). `resume_point` resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from smallscale.errors import UserError
from smallscale.eval.runs import (
    WEIGHTS, CheckpointDamaged, check_file, check_weights, complete_checkpoints, error_line, read_checkpoint_state,
)
from smallscale.io import sha256_file, writing

PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
# Where resume moves checkpoints it had to pass over: out of the step- namespace, so the
# keep_checkpoints rotation neither counts nor deletes them, and kept for the user to inspect.
DAMAGED_PREFIX = "damaged-"
HASHED = (WEIGHTS, "optimizer.pt", "rng.pt")  # the files whose sha256 state.json records
# What resume reads from state.json, with its type (besides the step).
RESUME_KEYS: dict[str, type | tuple[type, ...]] = {
    "tokens": int, "loader": dict, "skipped_steps": int, "wall_s": (int, float), "rng": dict,
}  # fmt: skip
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
    # A full disk names the file of the checkpoint (`writing`). torch.save is given a file object:
    # its RuntimeError then keeps the OSError of the failed write as its context.
    with writing(final / WEIGHTS):
        save_file(weights, str(tmp / WEIGHTS))
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), 9)
    with writing(final / "optimizer.pt"), open(tmp / "optimizer.pt", "wb") as f:
        torch.save(optim_state, f)
    rng_plain, rng_tensors = _rng_state()
    with writing(final / "rng.pt"), open(tmp / "rng.pt", "wb") as f:
        torch.save(rng_tensors, f)
    hashes = {name: sha256_file(tmp / name) for name in HASHED}
    with writing(final / "state.json"):
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_plain, "sha256": hashes}))
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
    """Complete checkpoints (with a state.json), oldest first, intact or damaged. Temp folders of
    interrupted writes and set-aside damaged checkpoints have other names and are not listed."""
    return complete_checkpoints(ckpt_dir)


def cleanup(ckpt_dir: Path) -> None:
    """Remove leftovers of interrupted writes."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def verify(path: Path, expected: Mapping[str, torch.Size] | None = None) -> Checkpoint:
    """The checkpoint at `path` once everything resume reads from it checks out: state.json, each
    file's recorded sha256, the weights' header (and their names and shapes against `expected`, the
    shapes of the model of the run's config.yaml), the optimizer and RNG files loaded as plain
    tensors. Raises CheckpointDamaged naming the first file that fails."""
    state = read_checkpoint_state(path, RESUME_KEYS)
    if not all(isinstance(state["rng"].get(key), list) for key in ("python", "numpy")):
        raise CheckpointDamaged("state.json: 'rng' lacks the python or numpy generator state")
    check_weights(path, state, expected, "config.yaml")
    optim_state = _load_plain(path, "optimizer.pt", state)
    if not (isinstance(optim_state, dict) and {"state", "param_groups"} <= optim_state.keys()):
        raise CheckpointDamaged("optimizer.pt: not an optimizer state")
    rng_tensors = _load_plain(path, "rng.pt", state)
    if not (isinstance(rng_tensors, dict) and isinstance(rng_tensors.get("torch_cpu"), torch.Tensor)):
        raise CheckpointDamaged("rng.pt: no torch_cpu generator state")
    return Checkpoint(path=path, step=state["step"], state=state)


def _load_plain(ckpt: Path, name: str, state: Mapping[str, Any]) -> Any:
    """torch.load of a checkpoint file with weights_only=True: tensors and plain containers only."""
    path = check_file(ckpt, name, state)
    try:
        with warnings.catch_warnings():  # a foreign pickle draws protocol warnings before it is refused
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:  # a global or opcode the weights-only unpickler refuses
        raise CheckpointDamaged(f"{name}: refused to unpickle, it holds more than tensors ({_refusal(exc)})") from None
    except Exception as exc:  # a damaged zip/pickle fails in zipfile, pickle or torch, with many types
        raise CheckpointDamaged(f"{name}: unreadable ({error_line(exc)})") from None


def _refusal(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (e.g. 'Unsupported global: GLOBAL posix.system ...'),
    without the paragraphs of general advice around it, whose wording varies between torch versions."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in (text.split(marker, 1)[1] if marker in text else text).splitlines()]
    found = next((line for line in lines if line and not line.startswith(advice)), None)
    return found.split(". ", 1)[0][:200] if found else error_line(exc)


def scan(ckpt_dir: Path, expected: Mapping[str, torch.Size] | None = None) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint (None if none is) and the unusable ones newer than it, newest
    first, each with what is wrong with it."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return verify(path, expected), damaged
        except CheckpointDamaged as exc:
            damaged.append((path, str(exc)))
    return None, damaged


def latest(ckpt_dir: Path) -> Checkpoint | None:
    """The newest intact checkpoint, or None."""
    return scan(ckpt_dir)[0]


def resume_point(ckpt_dir: Path, model_state: Mapping[str, torch.Tensor], is_main: bool = True) -> Checkpoint | None:
    """The checkpoint to resume the model with state dict `model_state` from: the newest intact one.

    Newer unusable checkpoints are passed over with a warning naming them and the one resumed from,
    and (by the main process) moved to `damaged-step-NNNNNNNN/`: the rotation of keep_checkpoints
    would otherwise count them as the newest and delete the good checkpoints written after resuming.
    None if there is no checkpoint. If there are checkpoints but none is intact, a UserError: training
    from step 0 would discard them and the run's metrics, a choice left to the user."""
    found, damaged = scan(ckpt_dir, {key: value.shape for key, value in model_state.items()})
    if found is None and damaged:
        whys = "; ".join(f"{path.name}: {why}" for path, why in damaged)
        raise UserError(
            f"no intact checkpoint to resume {str(ckpt_dir.parent)!r} from ({whys}); "
            f"move {str(ckpt_dir)!r} away to train the run again from step 0"
        )
    if found is not None and is_main:
        for path, why in damaged:
            moved = _set_aside(path)
            warnings.warn(
                f"checkpoint {path.name} is unusable ({why}); resuming from {found.path.name} "
                f"(the damaged one is kept as {moved}; delete it when done)",
                stacklevel=2,
            )
    return found


def _set_aside(path: Path) -> Path:
    """Rename checkpoint folder `path` to a free `damaged-<name>[.N]` next to it; returns the new path."""
    target, n = path.with_name(DAMAGED_PREFIX + path.name), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}.{n}")
    os.replace(path, target)
    return target


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / WEIGHTS))


def load_optimizer(path: Path) -> dict[str, Any]:
    return torch.load(path / "optimizer.pt", weights_only=True)


def restore_rng(ckpt: Checkpoint) -> None:
    _set_rng_state(ckpt.state["rng"], torch.load(ckpt.path / "rng.pt", weights_only=True))
