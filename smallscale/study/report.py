"""`smallscale study report STUDY_DIR`: the results table -> answers to the study's questions.

Reads STUDY_DIR/results.csv (one row per run, see results.py), runs/<id>/metrics.jsonl and
study.yaml; writes STUDY_DIR/report/{index.html, report.md, *.png, findings.json} and the scaling
fits to STUDY_DIR/fits.json. Every section states its finding with its uncertainty, or says
plainly which runs the study lacks to answer it.

Comparisons are paired: two runs are compared only when every config column except the one under
study is equal (seed included), so seed and data-order noise cancel in the difference. Intervals
are 95% Student-t over pairs (geometric for ratios); scaling fits use the bootstrap of scaling.py.
Losses across tokenizers are compared in bits per byte; fits in nats on a single tokenizer.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from smallscale.errors import UserError
from smallscale.io import atomic_write_bytes, atomic_write_text

Run = dict[str, Any]  # one typed row of results.csv

CONFIG_COLUMNS = ("dataset", "tokenizer", "preset", "n_layer", "d_model", "n_head", "seq_len", "position", "optimizer",
                  "lr", "schedule", "precision", "grad_checkpointing", "compile", "seed", "token_budget", "train_tokens")  # fmt: skip
REFERENCE_COLUMNS = ("position", "optimizer", "lr", "precision", "dataset", "tokenizer", "grad_checkpointing", "compile")
VARIANT_COLUMNS = (*REFERENCE_COLUMNS, "schedule", "seq_len")  # what a "variant" of a model size may change
STRING_COLUMNS = {"run_id", "status", "error", "device", "dataset", "tokenizer", "preset", "position", "optimizer",
                  "schedule", "precision"}  # fmt: skip
BOOL_COLUMNS = {"grad_checkpointing", "compile"}
LOWER_IS_BETTER = re.compile(r"(bpb|ppl|perplexity|loss|nll)(_\d+(\.\d+)?x)?$")
EXTRAPOLATION = re.compile(r"^eval\.length_extrapolation\.bpb_(\d+(?:\.\d+)?)x$")


# ----------------------------------------------------------------------------- the results table
@dataclass
class Results:
    rows: list[Run]
    columns: list[str]

    def done(self, *required: str) -> list[Run]:
        """Done runs that have a finite number in every `required` column."""
        return [r for r in self.rows if r["status"] == "done" and all(_num(r, c) is not None for c in required)]


def _cell(column: str, raw: Any) -> Any:
    """A CSV cell as a typed value: None, bool, int, float or str (lenient about booleans)."""
    if isinstance(raw, str):
        raw = raw.strip()
        if raw == "":
            return None
        if column in STRING_COLUMNS:
            return raw
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        for kind in (int, float):
            try:
                raw = kind(raw)
                break
            except ValueError:
                pass
    if column in BOOL_COLUMNS and raw in (0, 1):
        return bool(raw)
    return raw


def load_results(study_dir: Path) -> Results:
    if not study_dir.is_dir():
        raise UserError(f"{str(study_dir)!r} is not a directory; pass the study directory given to `smallscale study run`.")
    csv_path, parquet_path = study_dir / "results.csv", study_dir / "results.parquet"
    if csv_path.is_file():
        with csv_path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            raw_rows, columns = list(reader), list(reader.fieldnames or [])
    elif parquet_path.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(parquet_path)
        raw_rows, columns = table.to_pylist(), table.column_names
    elif (study_dir / "study.yaml").is_file() or (study_dir / "manifest.json").is_file():
        raise UserError(f"{str(study_dir)!r} has no results table (results.csv); run the study first, then report.")
    else:
        raise UserError(f"{str(study_dir)!r} is not a study directory (no study.yaml, manifest.json or results.csv).")
    if "run_id" not in columns:
        raise UserError(f"{str(csv_path)!r} has no run_id column; it is not a smallscale results table.")
    rows = [{c: _cell(c, row.get(c)) for c in columns} for row in raw_rows]
    for row in rows:
        row["run_id"] = str(row["run_id"])
        row["status"] = str(row.get("status") or "unknown").lower()
    return Results(rows, columns)


def _num(run: Run, column: str) -> float | None:
    value = run.get(column)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _reference(runs: list[Run], columns=REFERENCE_COLUMNS) -> dict[str, Any]:
    """The study's reference variant: the most common value of each column among `runs`."""
    ref = {}
    for c in columns:
        counts = Counter(r.get(c) for r in runs if r.get(c) is not None)
        if counts:
            ref[c] = counts.most_common(1)[0][0]
    return ref


def _matches(run: Run, ref: dict[str, Any]) -> bool:
    return all(run.get(c) == v for c, v in ref.items())


def _size(run: Run) -> str:
    preset, n = run.get("preset"), _num(run, "params")
    return f"{preset} ({_si(n)})" if preset and n else str(preset or _si(n))


def _data_key(run: Run) -> tuple:
    """Equal data: the same planned training tokens and data budget."""
    if run.get("train_tokens") is None and run.get("token_budget") is None:
        return (None, _num(run, "tokens_seen"))
    return (run.get("train_tokens"), run.get("token_budget"))


def _pair_groups(runs: list[Run], column: str, companions: tuple[str, ...] = ()) -> list[dict[Any, Run]]:
    """Groups of runs equal in every config column but `column`: {value of column: run}.

    `companions` may differ too, as hyperparameters tuned per value (each optimizer's own lr);
    where several runs compete for one slot, the most common companion setting wins."""
    key_columns = [c for c in CONFIG_COLUMNS if c != column and c not in companions]
    setting = lambda r: (r.get(column), *(r.get(c) for c in companions))  # noqa: E731
    typical = Counter(setting(r) for r in runs)
    groups: dict[tuple, dict[Any, Run]] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: -typical[setting(r)]):
        if r.get(column) is not None:
            groups[tuple(r.get(c) for c in key_columns)].setdefault(r.get(column), r)
    return [g for g in groups.values() if len(g) >= 2]


def _baseline(groups: list[dict[Any, Run]], preferred: Any) -> Any:
    values = Counter(v for g in groups for v in g)
    return preferred if preferred in values else values.most_common(1)[0][0]


# ----------------------------------------------------------------------------- statistics
def _mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and Student-t interval; no interval from a single value."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), None, None
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def _effect(items: list[tuple[float, str, str]], ratio: bool = False) -> dict[str, Any]:
    """Summary of paired (value, baseline_run, other_run); ratios are averaged in log space."""
    values = [math.log(v) if ratio else v for v, _, _ in items]
    mean, lo, hi = _mean_ci(values)
    if ratio:
        mean, lo, hi = math.exp(mean), None if lo is None else math.exp(lo), None if hi is None else math.exp(hi)
    return {"n_pairs": len(items), "mean": mean, "lo": lo, "hi": hi,
            "pairs": [{"baseline": b, "other": o, "value": v} for v, b, o in items]}  # fmt: skip


def _paired(groups, baseline, metric, ratio=False) -> dict[Any, dict[str, Any]]:
    """Per value other than `baseline`: its paired differences (or ratios) of `metric`."""
    items: dict[Any, list] = defaultdict(list)
    for g in groups:
        b = _num(g[baseline], metric) if baseline in g else None
        for value, run in g.items():
            x = _num(run, metric)
            if value != baseline and b is not None and x is not None and (not ratio or (x > 0 and b > 0)):
                items[value].append((x / b if ratio else x - b, g[baseline]["run_id"], run["run_id"]))
    return {v: _effect(it, ratio) for v, it in items.items()}


def _diff_sentence(other: Any, base: Any, eff: dict[str, Any], unit: str = "bits/byte") -> str:
    """One sentence for a lower-is-better paired difference other − base."""
    m, lo, hi, n = eff["mean"], eff["lo"], eff["hi"], eff["n_pairs"]
    if m == 0 or (lo is not None and lo <= 0 <= hi):
        ci = "a single pair" if lo is None else f"95% CI {lo:+.3f} to {hi:+.3f}, {n} pairs"
        return f"**No clear difference between {other} and {base}**: {other} − {base} = {m:+.3f} {unit} ({ci})."
    winner, loser = (base, other) if m > 0 else (other, base)
    ci = "a single pair: no interval is possible" if lo is None else \
        f"95% CI {min(abs(lo), abs(hi)):.3f}–{max(abs(lo), abs(hi)):.3f}, {n} paired runs"  # fmt: skip
    return f"**{winner} beats {loser} by {abs(m):.3f} {unit}** ({ci})."


def _ratio_text(eff: dict[str, Any]) -> str:
    ci = "one pair: no interval" if eff["lo"] is None else f"95% CI ×{eff['lo']:.2f}–×{eff['hi']:.2f}, {eff['n_pairs']} pairs"
    return f"×{eff['mean']:.2f} ({ci})"


# ----------------------------------------------------------------------------- formatting
def _si(x: float | None) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):  # a bootstrap interval end from diverged resamples
        return "∞" if x > 0 else "−∞" if x < 0 else "undefined"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _show(x: Any) -> str:
    return "—" if x is None else str(x)


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _pm(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return _f(values[0], digits) if values else "—"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _short(text: Any, limit: int = 400) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else f"{text[:150]} … {text[-(limit - 153):]}"


def _jsonable(x: Any) -> Any:
    """Plain JSON: numpy to Python, non-finite floats to null, dataclasses to dicts."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x if x is None or isinstance(x, str) else str(x)


# ----------------------------------------------------------------------------- sections
@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Plot:
    name: str  # file stem of the PNG
    caption: str
    png: bytes


@dataclass
class Section:
    key: str  # its key in findings.json
    title: str
    finding_md: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Plot] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def _unanswered(key: str, title: str, reason: str, **data: Any) -> Section:
    return Section(key, title, f"**Not answered by this study.** {reason}", data={"answered": False, "reason": reason, **data})


def _figure(ncols: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    fig = Figure(figsize=(6.0 * ncols, 4.2), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _log_x(ax) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short decades


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _not_varied(key: str, title: str, runs: list[Run], column: str, axis: str) -> Section | None:
    values = sorted({str(r[column]) for r in runs if r.get(column) is not None})
    if len(values) < 2:
        used = f"all done runs use {values[0]}" if values else f"no done run records `{column}`"
        return _unanswered(key, title, f"The study does not vary `{column}` ({used}); add a `{axis}` axis to answer it.")
    return None


def _effects_table(caption: str, label: str, effects: dict[Any, dict], signed: bool = True) -> Table:
    fmt = (lambda x: f"{x:+.4f}") if signed else (lambda x: f"{x:.3f}")  # noqa: E731
    rows = [[str(v), str(e["n_pairs"]), fmt(e["mean"]), "—" if e["lo"] is None else f"{fmt(e['lo'])} to {fmt(e['hi'])}"]
            for v, e in sorted(effects.items(), key=lambda kv: str(kv[0]))]  # fmt: skip
    return Table(caption, [label, "pairs", "mean" if signed else "ratio", "95% CI"], rows)


def _effect_plot(name: str, effects: dict[Any, dict], baseline: Any, what: str) -> Plot:
    fig, (ax,) = _figure()
    names = sorted(effects, key=str)
    means = [effects[v]["mean"] for v in names]
    err = [[m - (effects[v]["lo"] if effects[v]["lo"] is not None else m) for v, m in zip(names, means)],
           [(effects[v]["hi"] if effects[v]["hi"] is not None else m) - m for v, m in zip(names, means)]]  # fmt: skip
    ax.bar(range(len(names)), means, yerr=err, capsize=6, color="#7aa6d6", width=0.5)
    ax.set_xlim(-0.75, len(names) - 0.25)
    for i, v in enumerate(names):
        ax.plot([i] * effects[v]["n_pairs"], [p["value"] for p in effects[v]["pairs"]], "k.", alpha=0.6)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), [str(v) for v in names])
    ax.set_ylabel(f"val_bpb − {baseline} (bits/byte)")
    ax.set_title(f"{what}: paired difference vs {baseline} (lower is better)")
    return Plot(name, f"Paired val_bpb differences vs {baseline}; bars: mean with 95% t-interval; dots: pairs.", _png(fig))


def overview(res: Results, name: str) -> Section:
    counts = Counter(r["status"] for r in res.rows)
    failed = [r for r in res.rows if r["status"] == "failed"]
    wall_s = sum(_num(r, "wall_s") or 0.0 for r in res.rows)
    axes = [c for c in res.columns if c.startswith("axis.")]
    runs = Table("All runs", ["run", "status", *[c[5:] for c in axes], "params", "tokens seen", "val_bpb"],
                 [[r["run_id"], r["status"], *[_show(r.get(c)) for c in axes], _si(_num(r, "params")),
                   _si(_num(r, "tokens_seen")), _f(_num(r, "val_bpb"), 4)] for r in res.rows])  # fmt: skip
    finding = (f"Study **{name}**: **{len(res.rows)} runs** ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
               f"total training wall time {_duration(wall_s)}.")  # fmt: skip
    tables = [runs]
    if failed:
        finding += f" **{len(failed)} run(s) failed**; their errors are listed below and they are left out of every analysis."
        tables.insert(0, Table("Failed runs", ["run", "error"], [[r["run_id"], _short(r.get("error"))] for r in failed]))
    data = {"answered": True, "n_runs": len(res.rows), "by_status": dict(counts), "total_wall_s": wall_s,
            "failed": [{"run_id": r["run_id"], "error": r.get("error")} for r in failed]}  # fmt: skip
    return Section("overview", "0. Overview", finding, tables, data=data)


def data_efficiency(res: Results) -> Section:
    key, title = "data_efficiency", "1. Data efficiency vs model size"
    runs = res.done("val_bpb", "params")
    ref = _reference(runs)
    runs = [r for r in runs if _matches(r, ref)]
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        cells[(_num(r, "params"), _data_key(r))].append(r)
    sizes = sorted({p for p, _ in cells})
    if len(sizes) < 2:
        return _unanswered(key, title, f"It needs done runs of at least two model sizes in the reference variant; found {len(sizes)}.")
    points = []
    for (params, dkey), members in cells.items():
        bpb = [_num(r, "val_bpb") for r in members]
        points.append({"params": params, "size": _size(members[0]), "_key": dkey, "_bpb": bpb,
                       "train_tokens": members[0].get("train_tokens"), "token_budget": members[0].get("token_budget"),
                       "tokens_seen": float(np.mean([_num(r, "tokens_seen") or np.nan for r in members])),
                       "n_seeds": len(members), "val_bpb_mean": float(np.mean(bpb)),
                       "val_bpb_std": float(np.std(bpb, ddof=1)) if len(bpb) > 1 else None,
                       "runs": [r["run_id"] for r in members]})  # fmt: skip
    points.sort(key=lambda p: (p["params"], p["tokens_seen"]))
    cases = []
    by_data: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        by_data[p["_key"]].append(p)
    for group in by_data.values():
        for i, small in enumerate(group):
            for large in group[i + 1 :]:
                if small["val_bpb_mean"] < large["val_bpb_mean"]:
                    lo, hi = _welch_ci(large["_bpb"], small["_bpb"])
                    cases.append({"smaller": small["size"], "larger": large["size"], "smaller_params": small["params"],
                                  "larger_params": large["params"], "tokens": small["train_tokens"] or small["tokens_seen"],
                                  "smaller_bpb": small["val_bpb_mean"], "larger_bpb": large["val_bpb_mean"],
                                  "margin": large["val_bpb_mean"] - small["val_bpb_mean"], "lo": lo, "hi": hi})  # fmt: skip
    fig, (ax,) = _figure()
    for params in sizes:
        line = [p for p in points if p["params"] == params]
        ax.errorbar([p["tokens_seen"] for p in line], [p["val_bpb_mean"] for p in line], marker="o", capsize=4,
                    yerr=[p["val_bpb_std"] or 0.0 for p in line], label=line[0]["size"])  # fmt: skip
    _log_x(ax)
    ax.set(xlabel="tokens seen", ylabel="val_bpb (bits/byte)", title="Validation bits/byte vs data, per model size")
    ax.legend(title="model")
    plot = Plot("data_efficiency", "val_bpb vs tokens seen (log x), reference variant; error bars: ±1 std across seeds.", _png(fig))
    rows = [[p["size"], _si(p["train_tokens"]), _si(p["tokens_seen"]), str(p["n_seeds"]), _pm(p["_bpb"], 4)] for p in points]
    table = Table("Reference variant, seeds averaged", ["model", "train tokens", "tokens seen", "seeds", "val_bpb (± std)"], rows)
    largest_data = max(by_data.values(), key=lambda g: (len(g) > 1, g[0]["tokens_seen"]))
    first, last = largest_data[0], largest_data[-1]
    finding = (f"Reference variant: {', '.join(f'{c}={v}' for c, v in ref.items())}. "
               f"At the largest data size ({_si(first['tokens_seen'])} tokens), val_bpb goes from "
               f"{first['val_bpb_mean']:.3f} ({first['size']}) to {last['val_bpb_mean']:.3f} ({last['size']}).")  # fmt: skip
    if not cases:
        finding += " **No smaller model beats a larger one at equal data** in this study."
    for c in cases:
        ci = "too few seeds for an interval" if c["lo"] is None else f"95% CI of the margin {c['lo']:.3f} to {c['hi']:.3f}"
        finding += (f"\n\n- **At {_si(c['tokens'])} tokens, {c['smaller']} beats the larger {c['larger']}** by {c['margin']:.3f} "
                    f"bits/byte ({c['smaller_bpb']:.3f} vs {c['larger_bpb']:.3f}; {ci}).")  # fmt: skip
    for p in points:
        del p["_bpb"], p["_key"]
    return Section(key, title, finding, [table], [plot],
                   {"answered": True, "reference": ref, "points": points, "smaller_beats_larger": cases})  # fmt: skip


def _welch_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """Interval for mean(a) − mean(b) (Welch); None without two seeds on each side."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None, None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff = float(np.mean(a) - np.mean(b))
    if va + vb == 0:
        return diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(va + vb)
    return diff - half, diff + half


def tokenizers(res: Results) -> Section | None:
    """Only for studies that vary the tokenizer (e.g. BPE vs Unigram on one corpus): paired bits per
    byte (the one loss comparable across tokenizers), fertility, and every paired eval metric."""
    key, title = "tokenizers", "1b. Tokenizers"
    runs = res.done("val_bpb")
    if len({r.get("tokenizer") for r in runs if r.get("tokenizer") is not None}) < 2:
        return None
    groups = _pair_groups(runs, "tokenizer", companions=("dataset",))
    if not groups:
        return _unanswered(key, title, "Runs use several tokenizers, but no two done runs differ only in the tokenizer.")
    base = _baseline(groups, "bpe")
    effects = _paired(groups, base, "val_bpb")
    finding = " ".join(_diff_sentence(v, base, e) for v, e in sorted(effects.items(), key=lambda kv: str(kv[0])))
    fertility: dict[Any, list[float]] = defaultdict(list)
    for r in runs:
        if (f := _num(r, "fertility")) is not None:
            fertility[r.get("tokenizer")].append(f)
    tables = [_effects_table(f"Paired val_bpb differences vs {base} (bits/byte; negative = better than {base})", "tokenizer", effects)]
    if fertility:
        rows = [[str(t), f"{np.mean(v):.3f}"] for t, v in sorted(fertility.items(), key=lambda kv: str(kv[0]))]
        tables.append(Table("Fertility: training-split tokens per whitespace word (lower = fewer tokens per word)",
                            ["tokenizer", "fertility"], rows))  # fmt: skip
        finding += " Fertility: " + ", ".join(f"{t} {np.mean(v):.3f}" for t, v in sorted(fertility.items(), key=lambda kv: str(kv[0]))) + "."
    evals = {}
    for column in sorted(c for c in res.columns if c.startswith("eval.") and c.rsplit(".", 1)[-1] in ("bpb", "accuracy", "macro_f1")):
        for value, eff in _paired(groups, base, column).items():
            evals[f"{column[5:]} ({value} − {base})"] = eff
    if evals:
        tables.append(_effects_table(f"Paired differences of evaluation metrics vs {base} (bpb: lower is better; "
                                     "accuracy, macro_f1: higher is better)", "metric", evals))  # fmt: skip
    data = {"answered": True, "baseline": base, "effects": effects, "fertility": {str(k): float(np.mean(v)) for k, v in fertility.items()},
            "evals": evals}  # fmt: skip
    return Section(key, title, finding, tables, [_effect_plot("tokenizers", effects, base, "Tokenizers")], data)


def positions(res: Results) -> Section:
    key, title = "positions", "2. Position encodings"
    runs = res.done("val_bpb")
    if (none := _not_varied(key, title, runs, "position", "model.position")) is not None:
        return none
    groups = _pair_groups(runs, "position")
    if not groups:
        return _unanswered(key, title, "Runs use several position encodings, but no two done runs differ only in `position` "
                                       "(same model, data, optimizer and seed), so no paired comparison is possible.")  # fmt: skip
    base = _baseline(groups, "rope")
    effects = _paired(groups, base, "val_bpb")
    finding = " ".join(_diff_sentence(v, base, e) for v, e in sorted(effects.items(), key=lambda kv: str(kv[0])))
    table = _effects_table(f"Paired val_bpb differences vs {base} (bits/byte; negative = better than {base})", "encoding", effects)
    tables, figures = [table], [_effect_plot("positions", effects, base, "Position encodings")]
    data = {"answered": True, "baseline": base, "effects": effects}
    factors = sorted((float(m.group(1)), c) for c in res.columns if (m := EXTRAPOLATION.match(c)))
    if factors:
        text, table, plot, data["length_extrapolation"] = _length_extrapolation(groups, factors)
        finding, tables, figures = finding + text, [*tables, table], [*figures, plot]
    return Section(key, title, finding, tables, figures, data)


def _length_extrapolation(groups: list[dict[Any, Run]], factors: list[tuple[float, str]]) -> tuple[str, Table, Plot, dict]:
    """Bits/byte at k x the training context per encoding, averaged over the paired runs."""
    paired = {id(r): (str(v), r) for g in groups for v, r in g.items()}.values()
    extra: dict[str, dict[str, float | None]] = {}
    for value in sorted({v for v, _ in paired}):
        members = [r for v, r in paired if v == value]
        means = [[x for r in members if (x := _num(r, column)) is not None] for _, column in factors]
        extra[value] = {f"{f:g}x": float(np.mean(got)) if got else None for (f, _), got in zip(factors, means)}
    table = Table("Length extrapolation: bits/byte at k× the training context (paired runs averaged)",
                  ["encoding", *[f"{f:g}×" for f, _ in factors]],
                  [[v, *[_f(x, 4) for x in row.values()]] for v, row in extra.items()])  # fmt: skip
    fig, (ax,) = _figure()
    for value, row in extra.items():
        xs = [f for f, _ in factors if row[f"{f:g}x"] is not None]
        ax.plot(xs, [row[f"{f:g}x"] for f in xs], marker="o", label=value)
    _log_x(ax)
    ax.set(xlabel="evaluation context / training context", ylabel="bits/byte", title="Length extrapolation")
    ax.legend(title="encoding")
    caption = "Bits/byte at 1×, 2×, 4×… the training context; a missing point: cannot extrapolate."
    plot = Plot("length_extrapolation", caption, _png(fig))
    text, top = "", f"{factors[-1][0]:g}x"
    for value, row in extra.items():
        first = next((x for x in row.values() if x is not None), None)
        if row[top] is None:
            text += f" {value} has no result at {top[:-1]}× the training context (it cannot extrapolate)."
        elif first is not None:
            text += f" {value}: {first:.3f} → {row[top]:.3f} bits/byte from {factors[0][0]:g}× to {top[:-1]}× the training context."
    return text, table, plot, extra


def _curve(study_dir: Path, run_id: str) -> dict[str, list[float]] | None:
    """Train loss and val_bpb vs tokens from runs/<id>/metrics.jsonl, one point per token count
    (the last logged wins: an eval record repeats its step, a resumed run re-logs steps)."""
    from smallscale.eval.runs import read_metrics  # drops a killed run's partial last line

    path = study_dir / "runs" / run_id / "metrics.jsonl"
    if "/" in run_id or run_id in (".", "..") or not path.is_file():
        return None
    loss, val = {}, {}
    for rec in read_metrics(path):
        if _num(rec, "tokens") is None:
            continue
        if _num(rec, "loss") is not None:
            loss[rec["tokens"]] = rec["loss"]
        if _num(rec, "val_bpb") is not None:
            val[rec["tokens"]] = rec["val_bpb"]
    if not loss:
        return None
    tokens, val_tokens = sorted(loss), sorted(val)
    return {"tokens": tokens, "loss": [loss[t] for t in tokens], "val_tokens": val_tokens, "val_bpb": [val[t] for t in val_tokens]}


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, s = [], 0.0
    for i, v in enumerate(values, 1):
        s = beta * s + (1 - beta) * v
        out.append(s / (1 - beta**i))
    return out


def optimizers(res: Results, study_dir: Path) -> Section:
    key, title = "optimizers", "3. Optimizers"
    runs = res.done("val_bpb")
    if (none := _not_varied(key, title, runs, "optimizer", "optim.name")) is not None:
        return none
    groups = _pair_groups(runs, "optimizer", companions=("lr",))
    if not groups:
        return _unanswered(key, title, "Runs use several optimizers, but no two done runs differ only in `optimizer` "
                                       "(and its learning rate), so no paired comparison is possible.")  # fmt: skip
    base = _baseline(groups, "adamw")
    effects = _paired(groups, base, "val_bpb")
    finding = "Paired within model, data and seed, each optimizer at its own learning rate. "
    finding += " ".join(_diff_sentence(v, base, e) for v, e in sorted(effects.items(), key=lambda kv: str(kv[0])))
    # Tokens to a target loss: the worst final smoothed train loss among the optimizers of a group.
    reach: dict[Any, list] = defaultdict(list)
    curves = {r["run_id"]: _curve(study_dir, r["run_id"]) for g in groups for r in g.values()}
    for g in groups:
        smoothed = {v: (c["tokens"], _smooth(c["loss"])) for v, r in g.items() if (c := curves[r["run_id"]])}
        if base not in smoothed or len(smoothed) < 2:
            continue
        target = max(s[-1] for _, s in smoothed.values())
        first = {v: next(t for t, x in zip(ts, s) if x <= target) for v, (ts, s) in smoothed.items()}
        for v, tokens in first.items():
            if v != base and tokens > 0 and first[base] > 0:
                reach[v].append((tokens / first[base], g[base]["run_id"], g[v]["run_id"]))
    to_target = {v: _effect(items, ratio=True) for v, items in reach.items()}
    for v, e in sorted(to_target.items(), key=lambda kv: str(kv[0])):
        finding += f" To reach the same smoothed train loss, {v} needs {_ratio_text(e)} of {base}'s tokens."
    memory = defaultdict(list)
    for r in runs:
        if (b := _num(r, "optimizer_state_bytes")) is not None:
            memory[r.get("optimizer")].append((b, b / (_num(r, "params") or math.nan)))
    mem = {v: {"optimizer_state_bytes": float(np.mean([b for b, _ in m])), "bytes_per_param": float(np.mean([p for _, p in m]))}
           for v, m in sorted(memory.items(), key=lambda kv: str(kv[0]))}  # fmt: skip
    if mem:
        finding += " Optimizer state: " + ", ".join(f"{v} {m['bytes_per_param']:.1f} bytes/parameter" for v, m in mem.items()) + "."
    tables = [
        _effects_table(f"Final val_bpb, paired differences vs {base} (bits/byte)", "optimizer", effects),
        _effects_table(f"Tokens to the target train loss, ratio vs {base} (< 1: faster)", "optimizer", to_target, signed=False),
        Table("Optimizer state memory", ["optimizer", "state (MiB)", "bytes / parameter"],
              [[str(v), f"{m['optimizer_state_bytes'] / 2**20:.2f}", f"{m['bytes_per_param']:.2f}"] for v, m in mem.items()]),
    ]  # fmt: skip
    figures = [_effect_plot("optimizers", effects, base, "Optimizers")]
    largest = max(_num(g[base], "params") or 0 for g in groups if base in g)
    shown = [g for g in groups if base in g and (_num(g[base], "params") or 0) == largest]
    if any(curves[r["run_id"]] for g in shown for r in g.values()):
        fig, (ax_loss, ax_val) = _figure(2)
        colours = {v: f"C{i}" for i, v in enumerate(sorted({v for g in shown for v in g}, key=str))}
        for g in shown:
            for v, r in g.items():
                if c := curves[r["run_id"]]:
                    label = str(v) if g is shown[0] else None
                    ax_loss.plot(c["tokens"], _smooth(c["loss"]), color=colours[v], label=label, lw=1.2)
                    ax_val.plot(c["val_tokens"], c["val_bpb"], "o-", color=colours[v], label=label, ms=4)
        ax_loss.set(xlabel="tokens", ylabel="train loss (nats/token, EMA 0.9)", title=f"Train loss, {_size(shown[0][base])}")
        ax_val.set(xlabel="tokens", ylabel="val_bpb (bits/byte)", title="Validation bits/byte")
        ax_loss.legend(title="optimizer")
        ax_val.legend(title="optimizer")
        caption = f"Loss curves of the paired runs of the largest model ({len(shown)} group(s))."
        figures.append(Plot("optimizer_curves", caption, _png(fig)))
    data = {"answered": True, "baseline": base, "effects": effects, "tokens_to_target": to_target, "memory": mem}
    return Section(key, title, finding, tables, figures, data)


def scaling_laws(res: Results, n_boot: int, seed: int) -> Section:
    key, title = "scaling", "4. Scaling laws"
    runs = res.done("val_loss", "params", "tokens_seen")
    ref = _reference(runs)
    runs = [r for r in runs if _matches(r, ref) and _num(r, "val_loss") > 0]
    N, D, L = (np.array([_num(r, c) for r in runs]) for c in ("params", "tokens_seen", "val_loss"))
    try:
        from smallscale.study import scaling
    except ImportError:
        return _unanswered(key, title, "The scaling-law module (smallscale.study.scaling) is not available.")
    failure, notes, data = [], [], {"answered": False, "reference": ref, "n_runs": len(runs), "n_boot": n_boot, "level": 0.95}
    if len(set(zip(N, D))) >= 5 and len(set(N)) >= 2 and len(set(D)) >= 2:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # diverged resamples: shown as unbounded ends
                return _chinchilla(scaling, N, D, L, n_boot, seed, {**data, "answered": True, "method": "chinchilla"}, ref)
        except Exception as exc:  # a degenerate grid: say so and fall back to one-variable fits
            failure.append(f"The joint fit L(N, D) failed ({type(exc).__name__}: {exc}).")
    fits, fig, axes = [], *_figure(2)
    for var, other, ax in (("params", "tokens_seen", axes[0]), ("tokens_seen", "params", axes[1])):
        slices: dict[Any, list[Run]] = defaultdict(list)
        for r in runs:
            slices[_data_key(r) if var == "params" else _num(r, "params")].append(r)
        for members in slices.values():
            x, y = np.array([_num(r, var) for r in members]), np.array([_num(r, "val_loss") for r in members])
            if len(set(x)) < 3:
                continue
            irreducible = len(set(x)) >= 4  # three points cannot pin E, A and alpha together
            at = f"{_si(np.mean([_num(r, other) for r in members]))} {'tokens' if var == 'params' else 'params'}"
            entry = {"x": var, "at": at, "n_points": len(x), "irreducible": irreducible}
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    boot = scaling.bootstrap_power_law(x, y, n_boot=n_boot, seed=seed, irreducible=irreducible)
                fit = scaling.PowerLawFit(**{"E": 0.0, **boot.estimate}, loss=math.nan)  # see _chinchilla
                entry.update(fit=boot.estimate, intervals=boot.as_dict())
                lo, hi = (f"{b:.3f}" if math.isfinite(b) else _si(b) for b in boot.interval("alpha"))
                form = "L = E + A/x^α" if irreducible else "L = A/x^α (E fixed at 0: three sizes cannot determine it)"
                law = "L(N)" if var == "params" else "L(D)"
                notes.append(f"- {law} at {at}: **α = {fit.alpha:.3f} (95% CI {lo}–{hi})**, {len(set(x))} {'model' if var == 'params' else 'data'} sizes, {form}.")
                grid = np.geomspace(x.min(), x.max(), 50)
                ax.plot(x, y, "o")
                ax.plot(grid, fit.predict(grid), "-", color=ax.lines[-1].get_color(), label=f"at {at}: α={fit.alpha:.2f}")
            except Exception as exc:  # too few or degenerate points: report, do not crash the report
                entry["error"] = f"{type(exc).__name__}: {exc}"
                notes.append(f"- L({'N' if var == 'params' else 'D'}) at {at}: the fit failed ({entry['error']}).")
            fits.append(entry)
        _log_x(ax)
        ax.set(yscale="log", xlabel="parameters N" if var == "params" else "tokens D", ylabel="val_loss (nats/token)")
        if ax.lines:
            ax.legend(fontsize=8)
    data.update(method="power_laws" if fits else None, power_laws=fits, answered=bool(fits))
    if not fits:
        sizes, datas = len(set(N)), len(set(D))
        reason = (f"Too few points for any scaling fit: the joint fit needs ≥ 5 distinct (N, D) points with ≥ 2 of each, "
                  f"a one-variable fit ≥ 3 sizes; the reference variant has {sizes} model sizes and {datas} data sizes.")
        return _unanswered(key, title, " ".join([*failure, reason]), **{k: v for k, v in data.items() if k != "answered"})
    finding = "\n\n".join([*failure, "One-variable power laws on val_loss (nats/token), percentile-bootstrap intervals:", "\n".join(notes),
                           "**Small grids give wide intervals; treat these exponents as rough.**"])  # fmt: skip
    return Section(key, title, finding, figures=[Plot("scaling", "Power-law fits of val_loss (log-log).", _png(fig))], data=data)


def _chinchilla(scaling, N, D, L, n_boot: int, seed: int, data: dict[str, Any], ref: dict[str, Any]) -> Section:
    boot = scaling.bootstrap_chinchilla(N, D, L, n_boot=n_boot, seed=seed)
    # The bootstrap's full-data estimate is fit_chinchilla's result (same procedure); fitting twice costs seconds.
    fit = scaling.ChinchillaFit(**boot.estimate, loss=math.nan)
    c_max = float((6 * N * D).max())
    C = np.geomspace(float((6 * N * D).min()), 100 * c_max, 40)
    frontier = scaling.compute_optimal_intervals(boot, C)
    at = scaling.compute_optimal_intervals(boot, [c_max])
    data.update(n_points=len(set(zip(N, D))), fit=boot.estimate, intervals=boot.as_dict(), compute_optimal=frontier,
                at_study_max_compute=at, flops_convention="C = 6 N D")  # fmt: skip
    ci = lambda name: "–".join(f"{x:.3f}" if math.isfinite(x) else _si(x) for x in boot.interval(name))  # noqa: E731
    pick = lambda k: f"{_si(at[k + '_estimate'][0])} (95% CI {_si(at[k + '_lo'][0])}–{_si(at[k + '_hi'][0])})"  # noqa: E731
    finding = (f"Fitted L(N, D) = E + A/N^α + B/D^β to {len(L)} done runs ({data['n_points']} distinct (N, D) points) of val_loss "
               f"(nats/token, tokenizer {ref.get('tokenizer', '?')}): **α = {fit.alpha:.3f} (95% CI {ci('alpha')}), "
               f"β = {fit.beta:.3f} (95% CI {ci('beta')})**, E = {fit.E:.3f} nats (95% CI {ci('E')}). "
               f"At the study's largest compute, C = 6ND = {c_max:.3g} FLOPs, the compute-optimal model has N* = {pick('N_opt')} "
               f"parameters trained on D* = {pick('D_opt')} tokens, {pick('tokens_per_param')} tokens per parameter. "
               f"Intervals: percentile bootstrap over runs ({n_boot} resamples). "
               f"**A grid of {data['n_points']} points gives wide intervals; do not extrapolate far beyond it.**")  # fmt: skip
    fig, (ax_fit, ax_opt) = _figure(2)
    grid = np.geomspace(D.min() / 1.5, D.max() * 1.5, 60)
    for i, n in enumerate(sorted(set(N))):
        mask = N == n
        ax_fit.plot(D[mask], L[mask], "o", color=f"C{i}", label=f"N = {_si(n)}")
        ax_fit.plot(grid, fit.predict(n, grid), "-", color=f"C{i}")
    _log_x(ax_fit)
    ax_fit.set(xlabel="tokens D", ylabel="val_loss (nats/token)", title="Data and fitted L(N, D)")
    ax_fit.legend(fontsize=8)
    for name, colour in (("N_opt", "C0"), ("D_opt", "C1")):
        ax_opt.plot(C, frontier[f"{name}_estimate"], color=colour, label=name.replace("_opt", "*(C)"))
        ax_opt.fill_between(C, frontier[f"{name}_lo"], frontier[f"{name}_hi"], color=colour, alpha=0.2)
    ax_opt.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="parameters / tokens",
               title="Compute-optimal frontier (95% band)")
    ax_opt.legend()
    rows = [[k, f"{getattr(fit, k):.4g}", " to ".join(f"{x:.4g}" for x in boot.interval(k))] for k in ("E", "A", "B", "alpha", "beta")]
    table = Table("Chinchilla fit (val_loss in nats/token)", ["parameter", "estimate", "95% CI"], rows)
    caption = "Left: val_loss vs tokens with the fitted L(N, D). Right: N*(C), D*(C) with bootstrap bands (none where unbounded)."
    plot = Plot("scaling", caption, _png(fig))
    return Section("scaling", "4. Scaling laws", finding, [table], [plot], data)


def efficiency(res: Results, grid_kg_co2_per_kwh: float) -> Section:
    key, title = "efficiency", "5. Training efficiency"
    runs = res.done()
    if not runs:
        return _unanswered(key, title, "There are no done runs.")
    per_run = []
    for r in runs:
        j = _num(r, "energy_j")
        per_run.append({"run_id": r["run_id"], "tokens_per_s": _num(r, "tokens_per_s"), "mfu": _num(r, "mfu"),
                        "peak_mem_bytes": _num(r, "peak_mem_bytes"), "wall_s": _num(r, "wall_s"), "energy_j": j,
                        "kwh": j and j / 3.6e6, "kg_co2e": j and j / 3.6e6 * grid_kg_co2_per_kwh})  # fmt: skip
    table = Table(f"Per run (CO2e assumes {grid_kg_co2_per_kwh} kg/kWh)",
                  ["run", "device", "precision", "ckpt", "tokens/s", "MFU", "peak mem (GiB)", "wall", "energy (J)", "kWh", "kg CO2e"],
                  [[r["run_id"], _show(r.get("device")), _show(r.get("precision")), _show(r.get("grad_checkpointing")),
                    _si(p["tokens_per_s"]), "—" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%",
                    "—" if p["peak_mem_bytes"] is None else f"{p['peak_mem_bytes'] / 2**30:.2f}",
                    "—" if p["wall_s"] is None else _duration(p["wall_s"]), _si(p["energy_j"]), _f(p["kwh"], 4), _f(p["kg_co2e"], 4)]
                   for r, p in zip(runs, per_run)])  # fmt: skip
    mfus = [p["mfu"] for p in per_run if p["mfu"] is not None]
    rates = [p["tokens_per_s"] for p in per_run if p["tokens_per_s"] is not None]
    joules = [p["energy_j"] for p in per_run if p["energy_j"] is not None]
    finding = f"Across {len(runs)} done runs: median {_si(np.median(rates)) if rates else '—'} tokens/s"
    finding += f", median MFU {100 * np.median(mfus):.1f}% (FLOPs per token 6N + 12·n_layer·d_model·seq_len)." if mfus else "."
    total_kwh = sum(joules) / 3.6e6
    finding += (f" Measured energy {total_kwh:.3g} kWh over {len(joules)} runs ≈ {total_kwh * grid_kg_co2_per_kwh:.3g} kg CO2e, "
                f"**assuming a grid intensity of {grid_kg_co2_per_kwh} kg CO2e/kWh** (an assumption, not a measurement)."
                if joules else " Energy was not measured (no `energy_j`).")  # fmt: skip
    data = {"answered": True, "grid_kg_co2_per_kwh": grid_kg_co2_per_kwh, "total_kwh": total_kwh if joules else None, "runs": per_run}
    for column, preferred, label in (("precision", "fp32", "mixed precision"),
                                     ("grad_checkpointing", False, "activation checkpointing")):  # fmt: skip
        groups = _pair_groups(runs, column)
        if not groups:
            finding += f"\n\n- {label.capitalize()}: no runs differ only in `{column}`, so its effect cannot be isolated."
            continue
        base = _baseline(groups, preferred)
        ratios = {m: _paired(groups, base, m, ratio=True) for m in ("tokens_per_s", "peak_mem_bytes")}
        data[column] = {"baseline": base, **ratios}
        if not any(ratios.values()):
            finding += f"\n\n- {label.capitalize()}: the paired runs record neither tokens/s nor peak memory."
        for v in sorted({v for e in ratios.values() for v in e}, key=str):
            parts = [f"{what} {_ratio_text(ratios[m][v])}"
                     for m, what in (("tokens_per_s", "tokens/s"), ("peak_mem_bytes", "peak memory")) if v in ratios[m]]  # fmt: skip
            finding += f"\n\n- {label.capitalize()}, `{column}`={v} vs {base}: {', '.join(parts)}."
    return Section(key, title, finding, [table], data=data)


def downstream(res: Results) -> Section:
    key, title = "downstream", "6. Downstream and generation quality"
    runs = res.done()
    columns = [c for c in res.columns if c.startswith("eval.") and any(_num(r, c) is not None for r in runs)]
    if not columns:
        return _unanswered(key, title, "No done run has evaluation results (`eval.*` columns); add `evals:` to study.yaml.")
    ref = _reference(runs, VARIANT_COLUMNS)
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        variant = ", ".join(f"{c}={r.get(c)}" for c in VARIANT_COLUMNS if c in ref and r.get(c) != ref[c]) or "reference"
        groups[(_num(r, "params") or 0, _data_key(r), variant)].append(r)
    tokens = lambda k: _num(groups[k][0], "train_tokens") or _num(groups[k][0], "tokens_seen") or 0.0  # noqa: E731
    order = sorted(groups, key=lambda k: (k[0], tokens(k), k[2] != "reference", k[2]))
    rows, data_rows = [], []
    for k in order:
        members = groups[k]
        values = {c: [x for r in members if (x := _num(r, c)) is not None] for c in columns}
        rows.append([_size(members[0]), _si(_num(members[0], "train_tokens") or _num(members[0], "tokens_seen")), k[2],
                     str(len(members)), *[_pm(values[c]) for c in columns]])  # fmt: skip
        metrics = {c[5:]: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}
                   for c, v in values.items() if v}  # fmt: skip
        data_rows.append({"size": _size(members[0]), "params": k[0], "tokens": tokens(k), "variant": k[2],
                          "n_seeds": len(members), "runs": [r["run_id"] for r in members], "metrics": metrics})  # fmt: skip
    best = []
    for c in columns:
        lower = bool(LOWER_IS_BETTER.search(c))
        scored = [(row["metrics"][c[5:]]["mean"], row) for row in data_rows if c[5:] in row["metrics"]]
        value, row = (min if lower else max)(scored, key=lambda s: s[0])
        best.append(f"- `{c[5:]}` ({'lower' if lower else 'higher'} is better): "
                    f"best {row['size']} at {_si(row['tokens'])} tokens, {row['variant']} = {value:.4g}")
    finding = (f"{len(columns)} evaluation metrics over {len(order)} model-size × data × variant groups "
               f"(mean ± std across seeds; variants named by how they differ from the reference).\n\n" + "\n".join(best))  # fmt: skip
    header = ["model", "tokens", "variant", "seeds", *[c[5:] for c in columns]]
    table = Table("Evaluation metrics per model size × variant", header, rows)
    return Section(key, title, finding, [table], data={"answered": True, "reference": ref, "groups": data_rows})


def human_eval(study_dir: Path) -> Section:
    key, title = "human_eval", "7. Human evaluation"
    if not (study_dir / "human_eval.sqlite").exists():
        return _unanswered(key, title, "The study has no human evaluation (no `human_eval.sqlite`).")
    try:
        from smallscale.humaneval.results import load_summary, summary_markdown
    except ImportError:
        return _unanswered(key, title, "`human_eval.sqlite` exists but smallscale.humaneval is not available to read it.")
    summary = load_summary(study_dir)
    if summary is None:
        return _unanswered(key, title, "`human_eval.sqlite` holds no votes from invited raters yet.")
    return Section(key, title, summary_markdown(summary), data={"answered": True, "summary": summary})


# ----------------------------------------------------------------------------- rendering
CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.85em}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}
th{background:#f2f2f2}caption{caption-side:top;text-align:left;color:#555;padding:.2em 0}
img{max-width:100%}figcaption{color:#555;font-size:.9em}code{background:#f2f2f2;padding:0 .2em}"""


def _inline(text: str) -> str:
    """Escape, then the two inline Markdown forms the findings use: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _html_table(header: list[str], rows: list[list[str]], caption: str = "", markdown: bool = False) -> str:
    cell = _inline if markdown else html.escape
    head = "".join(f"<th>{cell(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _md_to_html(md: str) -> str:
    """Minimal Markdown (paragraphs, `- ` lists, pipe tables, #-headings, bold, code) to safe HTML."""
    out = []
    for block in re.split(r"\n\s*\n", md.strip()):
        lines = block.strip().splitlines()
        if len(lines) >= 2 and all(line.lstrip().startswith("|") for line in lines):
            rows = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))] for line in lines]
            rows = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            out.append(_html_table(rows[0], rows[1:], markdown=True))
        elif lines[0].startswith("- "):
            items = re.split(r"\n- ", "\n" + block.strip())[1:]
            out.append("<ul>" + "".join(f"<li>{_inline(' '.join(i.split()))}</li>" for i in items) + "</ul>")
        elif m := re.match(r"(#{1,4})\s+(.*)", lines[0]):
            out.append(f"<h{len(m.group(1)) + 2}>{_inline(m.group(2))}</h{len(m.group(1)) + 2}>")
            if lines[1:]:
                out.append(_md_to_html("\n".join(lines[1:])))
        else:
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(out)


def _md_safe(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;")


def render_markdown(name: str, description: str, sections: list[Section]) -> str:
    cell = lambda c: _md_safe(" ".join(str(c).split())).replace("|", "\\|")  # noqa: E731
    parts = [f"# Study report: {_md_safe(name)}", _md_safe(description)] if description else [f"# Study report: {_md_safe(name)}"]
    for s in sections:
        parts += [f"## {s.title}", _md_safe(s.finding_md)]
        for t in s.tables:
            lines = [f"| {' | '.join(cell(h) for h in t.header)} |", "|" + "---|" * len(t.header)]
            parts.append(f"*{cell(t.caption)}*\n\n" + "\n".join(lines + [f"| {' | '.join(cell(c) for c in row)} |" for row in t.rows]))
        parts += [f"![{p.caption}]({p.name}.png)\n\n*{p.caption}*" for p in s.figures]
    return "\n\n".join(parts) + "\n"


def render_html(name: str, description: str, sections: list[Section]) -> str:
    toc = "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a></li>' for s in sections)
    body = []
    for s in sections:
        body.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{_md_to_html(s.finding_md)}')
        body += [_html_table(t.header, t.rows, t.caption) for t in s.tables]
        body += [f'<figure><img alt="{html.escape(p.caption)}" src="data:image/png;base64,{base64.b64encode(p.png).decode()}">'
                 f"<figcaption>{html.escape(p.caption)}</figcaption></figure>" for p in s.figures]  # fmt: skip
        body.append("</section>")
    desc = f"<p>{html.escape(description)}</p>" if description else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Study report: {html.escape(name)}</title>'
            f"<style>{CSS}</style></head><body><h1>Study report: {html.escape(name)}</h1>{desc}<ol>{toc}</ol>\n"
            + "\n".join(body) + "\n</body></html>\n")  # fmt: skip


def _study_meta(study_dir: Path) -> tuple[str, str]:
    """The study's name and description: study.yaml over manifest.json, else the folder's name."""
    meta: dict[str, Any] = {}
    for filename, parse in (("manifest.json", json.loads), ("study.yaml", yaml.safe_load)):
        try:
            loaded = parse((study_dir / filename).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):  # absent or unreadable: the report still runs
            continue
        meta.update({k: v for k, v in loaded.items() if v} if isinstance(loaded, dict) else {})
    return str(meta.get("name") or study_dir.resolve().name), str(meta.get("description") or "").strip()


def write_report(study_dir: str | Path, out_dir: str | Path | None = None, n_boot: int = 200, seed: int = 0, *,
                 grid_kg_co2_per_kwh: float = 0.4) -> Path:  # fmt: skip
    """Write STUDY_DIR/report/{index.html, report.md, *.png, findings.json} and STUDY_DIR/fits.json.

    `n_boot` and `seed` drive the scaling-law bootstrap; `grid_kg_co2_per_kwh` is the assumed grid
    carbon intensity for the CO2e estimate. Returns the path of index.html."""
    study_dir = Path(study_dir)
    res = load_results(study_dir)
    name, description = _study_meta(study_dir)
    out = Path(out_dir) if out_dir is not None else study_dir / "report"
    sections = [overview(res, name), data_efficiency(res), tokenizers(res), positions(res), optimizers(res, study_dir),
                scaling_laws(res, n_boot, seed), efficiency(res, grid_kg_co2_per_kwh), downstream(res), human_eval(study_dir)]  # fmt: skip
    sections = [s for s in sections if s is not None]
    findings = {"study": {"name": name, "description": description, "n_boot": n_boot, "seed": seed}}
    for s in sections:
        findings[s.key] = {"title": s.title, "finding": s.finding_md, **s.data}
        for p in s.figures:
            atomic_write_bytes(out / f"{p.name}.png", p.png)
    atomic_write_text(study_dir / "fits.json", json.dumps(_jsonable(findings["scaling"]), indent=2) + "\n")
    atomic_write_text(out / "findings.json", json.dumps(_jsonable(findings), indent=2) + "\n")
    atomic_write_text(out / "report.md", render_markdown(name, description, sections))
    index = out / "index.html"
    atomic_write_text(index, render_html(name, description, sections))
    return index
