"""The results table of a study: one row per run (config, final metrics, evals, efficiency).

Columns, in this order (a missing value is an empty cell in CSV, null in Parquet):
    run_id, status, error
    axis.<name>          each axis of the study file, as written
    dataset, tokenizer, preset, n_layer, d_model, n_head, seq_len, position, optimizer, lr, schedule,
    precision, grad_checkpointing, compile, seed, token_budget, unique_tokens, train_tokens, fertility  (the
                         run's config; unique_tokens = token_budget, the distinct training tokens the run
                         may see; fertility = training-split tokens per whitespace word of the dataset)
    params, non_embedding_params, tokens_seen, steps, flops, epochs, val_loss, val_bpb, val_ppl, wall_s,
    tokens_per_s, mfu, peak_mem_bytes, optimizer_state_bytes, energy_j, gpu_util, device, energy_kwh,
    energy_gpu_kwh, co2_kg, carbon_intensity_g_per_kwh, energy_country, energy_method  (summary.json)
    eval.<task>.<metric> each numeric top-level value of RUN_DIR/eval/<task>.json (`n`, the number of
                         examples scored, included: the report's intervals on accuracies need it)

`flops` = flops_per_token x tokens_seen with flops_per_token = 6N + 12·n_layer·d_model·seq_len.
`epochs` = passes over the unique tokens (train windows consumed / windows in the budget, i.e.
tokens_seen / unique_tokens; > 1 when data is repeated).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

from smallscale.io import atomic_write_bytes, atomic_write_text
from smallscale.study.executors import load_runs, read_status, run_dir

SUMMARY_COLUMNS = ("params", "non_embedding_params", "tokens_seen", "steps", "flops", "epochs", "val_loss", "val_bpb", "val_ppl",
                   "wall_s", "tokens_per_s", "mfu", "peak_mem_bytes", "optimizer_state_bytes", "energy_j", "gpu_util",
                   "device", "energy_kwh", "energy_gpu_kwh", "co2_kg", "carbon_intensity_g_per_kwh", "energy_country",
                   "energy_method")  # fmt: skip
EVAL_SKIP = {"step", "wall_s"}  # bookkeeping, not metrics


def collect(study_dir: str | Path) -> list[dict[str, Any]]:
    rows = []
    manifests: dict[str, dict[str, Any]] = {}  # dataset path -> its manifest, read once for all its runs
    for spec in load_runs(study_dir):
        out = run_dir(study_dir, spec.id)
        status = read_status(study_dir, spec.id)
        row: dict[str, Any] = {"run_id": spec.id, "status": status["state"], "error": status.get("error")}
        row.update({f"axis.{k}": v for k, v in spec.axes.items()})
        data_path = spec.config.get("data", {}).get("path", "")
        if data_path not in manifests:
            manifests[data_path] = _read_json(Path(data_path) / "manifest.json") or {}
        row.update(_config_columns(spec.config, spec.dataset, out, manifests[data_path]))
        summary = _read_json(out / "summary.json") or {}
        row.update({k: summary.get(k) for k in SUMMARY_COLUMNS})
        if summary.get("flops_per_token") is not None:
            row["flops"] = summary["flops_per_token"] * summary["tokens_seen"]
        row["precision"] = summary.get("precision") or row["precision"]  # what 'auto' resolved to
        row["compile"] = summary.get("compile", row["compile"])
        for path in sorted((out / "eval").glob("*.json")) if (out / "eval").is_dir() else []:
            result = _read_json(path) or {}
            for key, value in result.items():
                if key not in EVAL_SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[f"eval.{path.stem}.{key}"] = value
        rows.append(row)
    return rows


def _config_columns(config: dict[str, Any], dataset: str, out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    model = _read_json(out / "model.json") or {}  # the exact shape, once the run has started
    m, o, t, d = config.get("model", {}), config.get("optim", {}), config.get("train", {}), config.get("data", {})
    tokens = t.get("tokens") if t.get("tokens") is not None else (t.get("steps") or 0) * t.get("global_batch_tokens", 0)
    pick = lambda key: model.get(key, m.get(key))  # noqa: E731
    budget = d.get("token_budget") or (manifest.get("splits") or {}).get("train", {}).get("tokens")  # no budget: the whole split
    return {
        "dataset": dataset, "tokenizer": (manifest.get("tokenizer") or {}).get("kind"), "preset": m.get("preset"),
        "n_layer": pick("n_layer"), "d_model": pick("d_model"), "n_head": pick("n_head"), "seq_len": pick("seq_len"),
        "position": pick("position"), "optimizer": o.get("name"), "lr": o.get("lr"),
        "schedule": (config.get("schedule") or {}).get("kind"), "precision": t.get("precision"),
        "grad_checkpointing": bool(pick("grad_checkpointing")), "compile": t.get("compile"), "seed": t.get("seed"),
        "token_budget": budget, "unique_tokens": budget,
        "train_tokens": tokens,
        "fertility": (manifest.get("splits") or {}).get("train", {}).get("fertility"),  # tokens per whitespace word
    }  # fmt: skip


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None if it is missing, or damaged (with a warning naming it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        warnings.warn(f"{path} is unreadable ({type(exc).__name__}); its values are left out of the results", stacklevel=2)
        return None
    if not isinstance(data, dict):
        warnings.warn(f"{path} does not hold a JSON object; its values are left out of the results", stacklevel=2)
        return None
    return data


def columns(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    evals = sorted(k for k in names if k.startswith("eval."))
    return [k for k in names if not k.startswith("eval.")] + evals


def write_results(study_dir: str | Path) -> tuple[Path, Path]:
    """Write results.csv and results.parquet (atomically); returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = collect(study_dir)
    names = columns(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in names})
    csv_path, parquet_path = Path(study_dir) / "results.csv", Path(study_dir) / "results.parquet"
    atomic_write_text(csv_path, text.getvalue())
    table = pa.table({k: _arrow_column([row.get(k) for row in rows]) for k in names})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write_bytes(parquet_path, buffer.getvalue().to_pybytes())
    return csv_path, parquet_path


def _arrow_column(values: list[Any]):
    """One Arrow type per column: numbers stay numeric (ints widen to float when mixed), else text."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.bool_())
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        kind = pa.int64() if all(isinstance(v, int) for v in present) else pa.float64()
        return pa.array(values, type=kind)
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())
