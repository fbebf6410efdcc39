"""Load a trained run for evaluation: model (eval mode), tokenizer and the files they came from.

Reads only what the trainer leaves on disk, never `smallscale.train`:
    model.json                          the GPTConfig, as `dataclasses.asdict`
    config.yaml                         `data.path`: the prepared dataset, which holds tokenizer.json
    checkpoints/step-NNNNNNNN/          complete checkpoints have a state.json (written last)
        model.safetensors
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from smallscale.config import read_yaml
from smallscale.data.tokenizer import load_tokenizer
from smallscale.errors import UserError
from smallscale.model.gpt import GPT, GPTConfig

STEP_PREFIX = "step-"


@dataclass
class LoadedRun:
    model: GPT  # in eval mode, on the requested device
    tokenizer: Tokenizer
    model_cfg: GPTConfig
    dataset_dir: Path
    run_dir: Path
    checkpoint: Path  # the checkpoint folder the weights came from
    step: int


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first; interrupted writes are not listed."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    done = [
        p
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit() and (p / "state.json").is_file()
    ]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def find_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    """The named checkpoint ('step-00000100', '100', or a folder path), or the latest complete one."""
    found = list_checkpoints(run_dir)
    if checkpoint is None or checkpoint == "latest":
        if not found:
            raise UserError(f"run directory {str(run_dir)!r} has no complete checkpoint under checkpoints/; train it first or resume it")
        return found[-1]
    as_path = Path(checkpoint)
    if as_path.is_dir() and (as_path / "model.safetensors").is_file():
        return as_path
    for ckpt in found:
        step = int(ckpt.name[len(STEP_PREFIX) :])
        if checkpoint in (ckpt.name, str(step)):
            return ckpt
    names = ", ".join(c.name for c in found) or "none"
    raise UserError(f"checkpoint {checkpoint!r} is not a complete checkpoint of {str(run_dir)!r}; available: {names}")


def _dataset_dir(run_dir: Path, override: str | Path | None) -> Path:
    if override is not None:
        candidates = [Path(override)]
    else:
        config = read_yaml(run_dir / "config.yaml")
        path = (config.get("data") or {}).get("path")
        if not isinstance(path, str):
            raise UserError(f"{str(run_dir / 'config.yaml')!r} has no data.path; pass the dataset folder explicitly")
        # A relative data.path was relative to the working directory of training; try the run's
        # parent folder too, so a run evaluated from elsewhere still finds its dataset.
        candidates = [Path(path)] if Path(path).is_absolute() else [Path(path), run_dir.parent / path, run_dir / path]
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file():
            return candidate.resolve()
    raise UserError(
        f"no tokenizer.json in the run's dataset folder {str(candidates[0])!r}; "
        "pass dataset_dir= (the prepared dataset the run was trained on)"
    )


def load_model_config(run_dir: Path) -> GPTConfig:
    path = run_dir / "model.json"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no model.json); point to the folder `smallscale train` wrote")
    try:
        return GPTConfig(**json.loads(path.read_text(encoding="utf-8")))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{str(path)!r} is not a valid model config ({exc})") from None


def load_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    dataset_dir: str | Path | None = None,
) -> LoadedRun:
    """Rebuild the model of `run_dir` from a checkpoint (default: the latest complete one) and load
    the tokenizer of the dataset it was trained on (`data.path` of config.yaml, or `dataset_dir`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist")
    model_cfg = load_model_config(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    data_dir = _dataset_dir(run_dir, dataset_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    if tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise UserError(
            f"the tokenizer in {str(data_dir)!r} has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{model_cfg.vocab_size}; pass the dataset the run was trained on"
        )
    weights_path = ckpt / "model.safetensors"
    if not weights_path.is_file():
        raise UserError(f"checkpoint {str(ckpt)!r} has no model.safetensors")
    model = GPT(model_cfg)
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"weights in {str(weights_path)!r} do not fit {str(run_dir / 'model.json')!r}: {detail}") from None
    model.to(device)
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
    step = int(state.get("step", ckpt.name[len(STEP_PREFIX) :] if ckpt.name.startswith(STEP_PREFIX) else -1))
    return LoadedRun(model.eval(), tokenizer, model_cfg, data_dir, run_dir.resolve(), ckpt.resolve(), step)
