"""What raters compare: systems (runs) and items (prompts continued by at least two of them).

Input: study dirs (every STUDY_DIR/runs/<run_id>/ with an eval/samples.jsonl is a system; runs
without one are skipped) and run dirs (each must have eval/samples.jsonl). A system is named by its
run directory's name. Prompts are matched across systems by their exact text, so runs evaluated with
the same generation seed and dataset line up; an item's id is a hash of that text, stable across
restarts and across adding or removing runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from smallscale.errors import UserError

SAMPLES = Path("eval") / "samples.jsonl"
DB_NAME = "human_eval.sqlite"


@dataclass(frozen=True)
class Item:
    item_id: str
    prompt: str
    continuations: dict[str, str]  # system (run id) -> continuation


@dataclass(frozen=True)
class Pool:
    systems: tuple[str, ...]
    items: dict[str, Item]  # item_id -> Item
    comparisons: tuple[tuple[str, str, str], ...]  # every (item_id, system_lo, system_hi) both systems continued


def item_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def is_study_dir(path: Path) -> bool:
    return (path / "runs").is_dir() and not (path / SAMPLES).is_file()


def run_dirs(paths: list[Path]) -> list[Path]:
    """The run dirs with samples that `paths` (study dirs and/or run dirs) name, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{str(path)!r} is not a folder; give a study dir (with runs/) or run dirs with {SAMPLES}")
        if is_study_dir(path):
            found += sorted(run for run in (path / "runs").iterdir() if (run / SAMPLES).is_file())
        elif (path / SAMPLES).is_file():
            found.append(path)
        else:
            raise UserError(
                f"{str(path)!r} has neither runs/ nor {SAMPLES}; run `smallscale eval RUN_DIR --tasks generation` first"
            )
    return found


def read_samples(path: Path) -> dict[str, str]:
    """prompt -> continuation from one samples.jsonl (the first sample of a repeated prompt wins)."""
    samples: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                prompt, continuation = sample["prompt"], sample["continuation"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{line_no} is not a JSON object with 'prompt' and 'continuation'; regenerate it") from None
            if not isinstance(prompt, str) or not isinstance(continuation, str):
                raise UserError(f"{path}:{line_no}: 'prompt' and 'continuation' must be strings")
            samples.setdefault(prompt, continuation)
    return samples


def load_pool(paths: list[Path]) -> Pool:
    """Systems, items and comparisons from study/run dirs; a UserError if fewer than two systems share a prompt."""
    per_system: dict[str, dict[str, str]] = {}
    origin: dict[str, Path] = {}
    for run in run_dirs(paths):
        name = run.name
        if name in per_system and origin[name].resolve() != run.resolve():
            raise UserError(f"two runs are both named {name!r} ({origin[name]} and {run}); systems are named by run dir, rename one")
        per_system[name], origin[name] = read_samples(run / SAMPLES), run
    prompts: dict[str, dict[str, str]] = {}
    for system, samples in per_system.items():
        for prompt, continuation in samples.items():
            prompts.setdefault(prompt, {})[system] = continuation
    items = {item_id(p): Item(item_id(p), p, conts) for p, conts in prompts.items() if len(conts) >= 2}
    if not items:
        raise UserError(
            f"found {len(per_system)} run(s) with {SAMPLES} ({', '.join(sorted(per_system)) or 'none'}) but no prompt "
            "continued by two of them; evaluate at least two runs with the same generation settings"
        )
    comparisons = tuple(
        (iid, lo, hi) for iid, item in sorted(items.items()) for lo, hi in combinations(sorted(item.continuations), 2)
    )
    systems = tuple(sorted({s for item in items.values() for s in item.continuations}))
    return Pool(systems=systems, items=items, comparisons=comparisons)


def default_db(paths: list[Path]) -> Path:
    """STUDY_DIR/human_eval.sqlite for one study dir; ./human_eval.sqlite otherwise."""
    if len(paths) == 1 and is_study_dir(paths[0]):
        return paths[0] / DB_NAME
    return Path(DB_NAME)
