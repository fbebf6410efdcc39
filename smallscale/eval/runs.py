"""Load a trained run for evaluation: model (eval mode), tokenizer and the files they came from.

Reads only what the trainer leaves on disk, never `smallscale.train`:
    model.json                          the GPTConfig, as `dataclasses.asdict`
    config.yaml                         `data.path`: the prepared dataset, which holds tokenizer.json
    metrics.jsonl                       one JSON object per logged step (`read_metrics`)
    checkpoints/step-NNNNNNNN/          complete checkpoints have a state.json (written last)
        model.safetensors
        state.json                      `step`, and the `sha256` of each file (since checkpoints record it)

The checks of a checkpoint's state.json and weights live here, and `smallscale.train.checkpoint`
uses them too, so evaluation and resume agree on what an intact checkpoint is.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from smallscale.config import read_yaml
from smallscale.data.tokenizer import load_tokenizer
from smallscale.errors import UserError
from smallscale.io import sha256_file
from smallscale.model.gpt import GPT, GPTConfig

STEP_PREFIX = "step-"
WEIGHTS = "model.safetensors"
STATE = "state.json"


@dataclass
class LoadedRun:
    model: GPT  # in eval mode, on the requested device
    tokenizer: Tokenizer
    model_cfg: GPTConfig
    dataset_dir: Path
    run_dir: Path
    checkpoint: Path  # the checkpoint folder the weights came from
    step: int


class CheckpointDamaged(Exception):
    """A file of a checkpoint is missing, unreadable, not what state.json recorded, or of another
    model shape. str(): 'FILE: what is wrong', for messages that name the checkpoint around it."""


def checkpoint_step(path: Path) -> int | None:
    """The step in a folder name `step-NNNNNNNN`, or None for any other name."""
    digits = path.name[len(STEP_PREFIX) :]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints under checkpoints/ (`step-NNNNNNNN` folders with a state.json, which is
    written last), oldest first, intact or damaged; interrupted writes are not listed."""
    return complete_checkpoints(run_dir / "checkpoints")


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """`list_checkpoints` of the checkpoints folder `ckpt_dir` itself."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / STATE).is_file()]
    return sorted(done, key=checkpoint_step)


def read_checkpoint_state(ckpt: Path, required: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """state.json of `ckpt`, checked: a JSON object with an integer `step` (the folder's, in a
    `step-NNNNNNNN` folder) and each `required` key with a value of its type. Raises CheckpointDamaged."""
    path = ckpt / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(f"{STATE}: missing") from None
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise CheckpointDamaged(f"{STATE}: unreadable ({error_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointDamaged(f"{STATE}: not a JSON object")
    for key, kind in {"step": int, **(required or {})}.items():
        if key not in state:
            raise CheckpointDamaged(f"{STATE}: no {key!r}")
        # bool is an int to isinstance; no field of a checkpoint's state is a bool
        if isinstance(state[key], bool) or not isinstance(state[key], kind):
            raise CheckpointDamaged(f"{STATE}: {key!r} is {state[key]!r}")
    folder_step = checkpoint_step(ckpt)
    if folder_step is not None and state.get("step") != folder_step:
        raise CheckpointDamaged(f"{STATE}: step {state.get('step')!r} in folder {ckpt.name}")
    return state


def check_file(ckpt: Path, name: str, state: Mapping[str, Any]) -> Path:
    """The path of file `name` of `ckpt` after checking that it exists and, where state.json records
    hashes, that its sha256 is the recorded one. Raises CheckpointDamaged."""
    path = ckpt / name
    if not path.is_file():
        raise CheckpointDamaged(f"{name}: missing")
    hashes = state.get("sha256")
    if hashes is None:
        return path  # written before checkpoints recorded hashes: the loaders check what they can
    if not isinstance(hashes, dict) or not isinstance(hashes.get(name), str):
        raise CheckpointDamaged(f"{STATE}: no sha256 recorded for {name}")
    if sha256_file(path) != hashes[name]:
        raise CheckpointDamaged(f"{name}: sha256 mismatch (the bytes are not those that were saved)")
    return path


def check_weights(ckpt: Path, state: Mapping[str, Any], expected: Mapping[str, torch.Size] | None, expected_from: str) -> Path:
    """The path of the weights of `ckpt` after checking the file (see `check_file`), its safetensors
    header (which must describe the whole file: a truncated file fails) and, unless `expected` is None,
    that it holds exactly the tensors of `expected` with their shapes. Raises CheckpointDamaged."""
    path = check_file(ckpt, WEIGHTS, state)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise CheckpointDamaged(f"{WEIGHTS}: unreadable ({error_line(exc)})") from None
    if expected is None:
        return path
    want = {key: list(shape) for key, shape in expected.items()}
    missing, extra = sorted(want.keys() - shapes.keys()), sorted(shapes.keys() - want.keys())
    differ = [f"{k} {shapes[k]} vs {want[k]} in {expected_from}" for k in want if k in shapes and shapes[k] != want[k]]
    differ += [f"no {k}, which {expected_from} has" for k in missing] + [f"{k}, which {expected_from} lacks" for k in extra]
    if differ:
        more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
        raise CheckpointDamaged(f"{WEIGHTS}: weights of another model shape ({differ[0]}{more})")
    return path


def error_line(exc: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), for one-line messages."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def find_checkpoint(run_dir: Path, checkpoint: str) -> Path:
    """The named checkpoint: 'step-00000100', '100', or a folder path."""
    as_path = Path(checkpoint)
    if as_path.is_dir() and (as_path / WEIGHTS).is_file():
        return as_path
    found = list_checkpoints(run_dir)
    for ckpt in found:
        if checkpoint in (ckpt.name, str(checkpoint_step(ckpt))):
            return ckpt
    names = ", ".join(c.name for c in found) or "none"
    raise UserError(f"checkpoint {checkpoint!r} is not a complete checkpoint of {str(run_dir)!r}; available: {names}")


def _usable(ckpt: Path, expected: Mapping[str, torch.Size], expected_from: str) -> dict[str, Any]:
    """state.json of `ckpt` (empty for a folder given by path that has none) once its weights check out."""
    state = read_checkpoint_state(ckpt) if checkpoint_step(ckpt) is not None or (ckpt / STATE).exists() else {}
    check_weights(ckpt, state, expected, expected_from)
    return state


def _newest_usable(run_dir: Path, expected: Mapping[str, torch.Size]) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint whose weights are intact; a warning names each newer one passed over."""
    damaged: list[tuple[str, CheckpointDamaged]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            state = _usable(ckpt, expected, "model.json")
        except CheckpointDamaged as exc:
            damaged.append((ckpt.name, exc))
            continue
        for name, why in damaged:
            warnings.warn(f"checkpoint {name} of {str(run_dir)!r} is unusable ({why}); using {ckpt.name}", stacklevel=3)
        return ckpt, state
    if damaged:
        whys = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise UserError(f"run directory {str(run_dir)!r} has no usable checkpoint ({whys})")
    raise UserError(f"run directory {str(run_dir)!r} has no complete checkpoint under checkpoints/; train it first or resume it")


def _dataset_dir(run_dir: Path, override: str | Path | None) -> Path:
    if override is not None:
        candidates = [Path(override)]
    else:
        data = read_yaml(run_dir / "config.yaml").get("data")
        path = data.get("path") if isinstance(data, dict) else None
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
        fields = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        return GPTConfig(**fields)
    except (TypeError, ValueError) as exc:  # ValueError: also JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{str(path)!r} is not a valid model config ({error_line(exc)})") from None


def load_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    dataset_dir: str | Path | None = None,
) -> LoadedRun:
    """Rebuild the model of `run_dir` from a checkpoint and load the tokenizer of the dataset it was
    trained on (`data.path` of config.yaml, or `dataset_dir`).

    `checkpoint` None or 'latest' is the newest checkpoint whose weights are intact: newer damaged
    ones are passed over with a warning naming them. A named checkpoint that is damaged is an error,
    since the user asked for those weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist")
    model_cfg = load_model_config(run_dir)
    model = GPT(model_cfg)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if checkpoint is None or checkpoint == "latest":
        ckpt, state = _newest_usable(run_dir, expected)
    else:
        ckpt = find_checkpoint(run_dir, checkpoint)
        try:
            state = _usable(ckpt, expected, "model.json")
        except CheckpointDamaged as exc:
            others = ", ".join(c.name for c in list_checkpoints(run_dir) if c != ckpt) or "none"
            raise UserError(f"checkpoint {ckpt.name} of {str(run_dir)!r} is unusable ({exc}); choose another (available: {others})") from None
    data_dir = _dataset_dir(run_dir, dataset_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    if tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise UserError(
            f"the tokenizer in {str(data_dir)!r} has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{model_cfg.vocab_size}; pass the dataset the run was trained on"
        )
    model.load_state_dict(load_file(str(ckpt / WEIGHTS)))  # names and shapes checked above
    model.to(device)
    step = state.get("step", checkpoint_step(ckpt))
    return LoadedRun(model.eval(), tokenizer, model_cfg, data_dir, run_dir.resolve(), ckpt.resolve(), -1 if step is None else step)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, each a JSON object with an integer `step`.

    The trainer appends one line per record, so a process killed mid-write (or a full disk) leaves a
    partial last line: a last line that does not parse is dropped. A bad line anywhere else is
    damage that dropping would hide, and a UserError naming its line number."""
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            if number == lines[-1][0]:
                break
            raise UserError(f"line {number} of {str(path)!r} is not valid JSON ({error_line(exc)}); delete or repair that line") from None
        if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
            raise UserError(f"line {number} of {str(path)!r} is not a metrics record (a JSON object with an integer step); delete or repair that line")
        records.append(record)
    return records
