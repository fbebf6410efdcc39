"""Zero-shot tasks by name, and `run_task`: what `smallscale eval RUN_DIR --tasks ...` calls.

Names: the built-in tasks in `TASKS`, or `generic:PATH` for a spec file (see `generic.py`).
Every task returns a JSON-serialisable dict: its metrics, `n`, and `settings` (prompt, scoring,
normalisation, limit, batch size, data files with sha256) so a number can be traced to how it was
made. `run_task` adds the run, checkpoint, wall time and the energy and CO2 CodeCarbon measured
(smallscale/energy.py); `save_result` writes RUN_DIR/eval/<task>.json.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from smallscale.energy import EnergyMeter, run_energy_config
from smallscale.errors import UserError
from smallscale.eval.runs import LoadedRun
from smallscale.eval.tasks.classification import CLASSIFICATION_TASKS, run_finetune, run_zero_shot
from smallscale.eval.tasks.generation import run_generation
from smallscale.eval.tasks.generic import run_generic
from smallscale.eval.tasks.heldout_sources import run_heldout_sources
from smallscale.eval.tasks.minimal_pairs import run_blimp
from smallscale.eval.tasks.multiple_choice import run_arc_easy, run_hellaswag, run_piqa, run_winogrande
from smallscale.eval.tasks.perplexity import TEXT_TASKS, run_heldout, run_length_extrapolation, run_text_task
from smallscale.eval.tasks.translation import TRANSLATION_TASKS, run_translation
from smallscale.io import atomic_write_json
from smallscale.paths import check_name

# (model, tokenizer, data_root=None, limit=None, batch_size=..., device=None, **task options) -> dict
TaskFn = Callable[..., dict]

TASKS: dict[str, TaskFn] = {
    "blimp": run_blimp,  # limit = pairs per paradigm; option paradigms=[...]
    "hellaswag": run_hellaswag,
    "piqa": run_piqa,
    "arc_easy": run_arc_easy,
    "winogrande": run_winogrande,
    **{name: partial(run_text_task, name) for name in TEXT_TASKS},  # bits per byte on raw text
    **{f"{name}_zeroshot": partial(run_zero_shot, name) for name in CLASSIFICATION_TASKS},
}


def _finetune(name: str, run: LoadedRun, data_root=None, limit=None, batch_size=None, device=None, **opts) -> dict:
    # limit = examples for training and for evaluation (fast checks); the full splits otherwise
    hp = {"batch_size": batch_size} if batch_size else {}
    return run_finetune(name, run.model, run.tokenizer, data_root=data_root, device=device or "cpu",
                        limit_train=limit, limit_eval=limit, **hp, **opts)  # fmt: skip


def _heldout(run: LoadedRun, data_root=None, limit=None, batch_size=None, device=None, **opts) -> dict:
    return run_heldout(run.model, run.tokenizer, run.dataset_dir, batch_size=batch_size or 16, device=device, **opts)


def _heldout_sources(run: LoadedRun, data_root=None, limit=None, batch_size=None, device=None, **opts) -> dict:
    # limit = documents per source (the same documents under every tokenizer)
    return run_heldout_sources(run.model, run.tokenizer, run.dataset_dir, batch_size=batch_size or 16, device=device,
                               **({"max_documents": limit} if limit else {}), **opts)  # fmt: skip


def _length_extrapolation(run: LoadedRun, data_root=None, limit=None, batch_size=None, device=None, **opts) -> dict:
    return run_length_extrapolation(run.model, run.tokenizer, run.dataset_dir, device=device,
                                    **({"batch_size": batch_size} if batch_size else {}), **opts)  # fmt: skip


def _generation(run: LoadedRun, data_root=None, limit=None, batch_size=None, device=None, **opts) -> dict:
    # writes RUN_DIR/eval/samples.jsonl (prompt, continuation, reference, settings) for human evaluation
    return run_generation(run.model, run.tokenizer, run.dataset_dir, Path(run.run_dir) / "eval", n_prompts=limit or 100,
                          device=device or "cpu", **({"batch_size": batch_size} if batch_size else {}), **opts)  # fmt: skip


def _translation(name: str, run: LoadedRun, data_root=None, limit=None, batch_size=None, device=None, **opts) -> dict:
    # fine-tunes a copy of the run's model; writes RUN_DIR/eval/<task>_samples.jsonl (source, reference, greedy, beam).
    # --batch-size is the decoding batch, as for every other task; the fine-tuning batch (a fixed
    # hyper-parameter, TranslationConfig.batch_size) changes only through the task's options.
    return run_translation(name, run.model, run.tokenizer, data_root=data_root, device=device or "cpu", limit=limit,
                           out_dir=Path(run.run_dir) / "eval", **({"eval_batch_size": batch_size} if batch_size else {}), **opts)  # fmt: skip


# Tasks that need the run itself (its dataset, its folder), not only model and tokenizer.
RUN_TASKS: dict[str, Callable[..., dict]] = {
    "heldout": _heldout,
    "heldout_sources": _heldout_sources,  # a mixture's per-source val splits (in-domain); option max_documents
    "length_extrapolation": _length_extrapolation,  # option factors=[1,2,4]
    "generation": _generation,
    **{name: partial(_translation, name) for name in TRANSLATION_TASKS},  # limit = test sentences per set
    **{f"{name}_finetune": partial(_finetune, name) for name in CLASSIFICATION_TASKS},
}
GENERIC_PREFIX = "generic:"


def get_task(name: str) -> TaskFn:
    """The task function for `name` (a key of TASKS, or generic:PATH to a spec file)."""
    if name.startswith(GENERIC_PREFIX):
        spec_path = name[len(GENERIC_PREFIX) :]
        if not spec_path:
            raise UserError("task 'generic:' needs a spec file, e.g. generic:tasks/sentiment.yaml")

        def run(model, tokenizer, data_root=None, **kwargs) -> dict:  # a spec names its own data file
            return run_generic(spec_path, model, tokenizer, **kwargs)

        return run
    if name not in TASKS:
        known = ", ".join([*TASKS, *RUN_TASKS])
        raise UserError(f"unknown task {name!r}; choose from {known}, or generic:PATH for a spec file")
    return TASKS[name]


def run_task(
    name: str,
    run: LoadedRun,
    data_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    **task_options: Any,
) -> dict:
    """Evaluate the loaded run on task `name`. None for limit / batch_size keeps the task's default
    (all examples; a batch size suited to its lengths); device defaults to the model's."""
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of examples, got {limit}")
    given = {"limit": limit, "batch_size": batch_size}
    task = None if name in RUN_TASKS else get_task(name)  # an unknown name fails before any work
    # CodeCarbon around the task, as around training (the run's train.energy; its log in RUN_DIR/eval)
    with EnergyMeter(run_energy_config(run.run_dir), Path(run.run_dir) / "eval") as meter:
        started = time.perf_counter()
        if task is None:
            result = RUN_TASKS[name](run, data_root=data_root, limit=limit, batch_size=batch_size, device=device, **task_options)
        else:
            result = task(run.model, run.tokenizer, data_root=data_root, device=device, **{k: v for k, v in given.items() if v is not None}, **task_options)
        wall_s = round(time.perf_counter() - started, 3)
    return {
        **result,
        "task": name,
        "run_dir": str(run.run_dir),
        "checkpoint": run.checkpoint.name,
        "step": run.step,
        "wall_s": wall_s,
        "energy": meter.fields,  # nested: results.py reads top-level numbers of a result as its metrics
    }


def result_path(run_dir: str | Path, name: str) -> Path:
    """RUN_DIR/eval/<task>.json; a generic task is stored as generic-<spec stem>.json (with any run
    of characters other than letters, digits, '.', '_' and '-' as one '-'). Names come from study
    files, which anyone may write: one that is not a plain file name (`../../x`) is a UserError, so
    a result never lands outside RUN_DIR/eval."""
    if name.startswith(GENERIC_PREFIX):
        stem = "generic-" + re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name[len(GENERIC_PREFIX) :]).stem)[:80]
    else:
        stem = check_name(name, "eval result name")
    return Path(run_dir) / "eval" / f"{stem}.json"


def save_result(run_dir: str | Path, name: str, result: dict) -> Path:
    """Write `result` atomically to `result_path(run_dir, name)` and return that path."""
    path = result_path(run_dir, name)
    atomic_write_json(path, result)
    return path
