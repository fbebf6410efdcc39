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
BOOTSTRAP_FROM = 30  # pairs: from this many on a percentile bootstrap, below it Student-t over seeds
FDR_LEVEL = 0.05  # Benjamini–Hochberg false discovery rate across the contrasts of one section
MIN_STEPS = 200  # optimizer steps: below this a finding describes early training
ONE_SEED = "one seed — not a finding"


def compare(values: list[float], level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> dict[str, Any]:
    """A paired comparison from its per-pair differences: n, the mean difference, its interval, the
    two-sided p against no difference, whether the interval excludes zero, and the method.

    Fewer than BOOTSTRAP_FROM pairs: Student-t (interval and one-sample t-test); from there a
    percentile bootstrap of the mean (p: twice the share of resampled means on the far side of zero).
    One pair has no interval: `note` says "one seed — not a finding"."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n, mean = len(x), float(x.mean())
    out: dict[str, Any] = {"n": n, "mean": mean, "lo": None, "hi": None, "p": None, "excludes_zero": None, "method": None,
                           "note": ONE_SEED if n < 2 else None}  # fmt: skip
    if n < 2:
        return out
    if n < BOOTSTRAP_FROM:
        se = float(x.std(ddof=1)) / math.sqrt(n)
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1)) if se > 0 else float(mean == 0)
        out.update(lo=mean - half, hi=mean + half, p=p, method=f"Student-t over {n} pairs")
    else:
        means = x[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(axis=1)
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        far = min(int((means <= 0).sum()), int((means >= 0).sum()))
        out.update(lo=float(lo), hi=float(hi), p=min(1.0, 2 * (far + 1) / (n_boot + 1)), method=f"bootstrap over {n} pairs")
    out["excludes_zero"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def fdr(effects: list[dict[str, Any]]) -> int:
    """Benjamini–Hochberg across a section's contrasts: sets `q` (the adjusted p) on each that has a p,
    and `fdr_m` (how many were tested together); returns that number."""
    from scipy.stats import false_discovery_control

    tested = [e for e in effects if e.get("p") is not None]
    if tested:
        for e, q in zip(tested, false_discovery_control([e["p"] for e in tested], method="bh"), strict=True):
            e.update(q=float(q), fdr_m=len(tested))
    return len(tested)


def _significant(eff: dict[str, Any]) -> bool:
    """Nothing blocks it (`blocked`: e.g. an untuned learning rate), its interval excludes zero and,
    where the section tested several contrasts, BH keeps it."""
    return not eff.get("blocked") and bool(eff.get("excludes_zero")) and eff.get("q", eff.get("p", 1.0)) <= FDR_LEVEL


def _fdr_note(m: int) -> str:
    return (f" Multiple comparisons: the {m} contrasts of this section are controlled together (Benjamini–Hochberg, "
            f"false discovery rate {FDR_LEVEL:.0%}); q is the adjusted p, and a difference is a finding only when its "
            "interval excludes zero and q ≤ 0.05." if m > 1 else "")  # fmt: skip


def _effect(items: list[tuple[float, str, str]], ratio: bool = False) -> dict[str, Any]:
    """Summary of paired (value, baseline_run, other_run) by `compare`; ratios in log space (their
    interval is then geometric, and `excludes_zero` means it excludes ×1)."""
    values = [math.log(v) if ratio else v for v, _, _ in items]
    c = compare(values)
    if ratio:
        c.update({k: math.exp(c[k]) for k in ("mean", "lo", "hi") if c[k] is not None})
    return {"n_pairs": c.pop("n"), **c, "pairs": [{"baseline": b, "other": o, "value": v} for v, b, o in items]}


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


def _stats_text(eff: dict[str, Any], ratio: bool = False) -> str:
    """n, interval, whether it excludes no-difference, and q: e.g. `95% CI +0.02 to +0.09, n = 3
    pairs, excludes 0; BH q = 0.04`; one pair: `n = 1 pair: one seed — not a finding`."""
    if eff["lo"] is None:
        return f"n = 1 pair: {ONE_SEED}"
    ci = f"95% CI ×{eff['lo']:.2f}–×{eff['hi']:.2f}" if ratio else f"95% CI {eff['lo']:+.3f} to {eff['hi']:+.3f}"
    null = "×1" if ratio else "0"
    text = f"{ci}, n = {eff['n_pairs']} pairs, {'excludes' if eff['excludes_zero'] else 'includes'} {null}"
    return text + (f"; BH q = {eff['q']:.2g}" if eff.get("fdr_m", 1) > 1 else "")


def _diff_sentence(other: Any, base: Any, eff: dict[str, Any], unit: str = "bits/byte") -> str:
    """One sentence for a lower-is-better paired difference other − base, with its n, interval and
    verdict; `eff["blocked"]` names why it cannot be a finding whatever the interval (an untuned lr)."""
    diff = f"{other} − {base} = {eff['mean']:+.3f} {unit} ({_stats_text(eff)})"
    if eff.get("blocked"):
        return f"{diff}: **not a finding** ({eff['blocked']})."
    if eff["lo"] is None:
        return f"{diff}."
    if _significant(eff):
        winner, loser = (base, other) if eff["mean"] > 0 else (other, base)
        return f"**{winner} beats {loser} by {abs(eff['mean']):.3f} {unit}**: {diff}."
    if eff["excludes_zero"]:
        return f"**Not a finding after the false-discovery control**: {diff}."
    return f"**No clear difference between {other} and {base}**: {diff}."


def _ratio_text(eff: dict[str, Any]) -> str:
    return f"×{eff['mean']:.2f} ({_stats_text(eff, ratio=True)})"


def _regime(runs: list[Run]) -> tuple[str, dict[str, Any]]:
    """The regime a set of runs measured: tokens per parameter and optimizer steps, with a warning
    when any has fewer than MIN_STEPS steps (early training: warmup and the first fast fall of the
    loss dominate, and rankings there often change with longer training)."""
    per_param = [t / p for r in runs if (t := _num(r, "tokens_seen")) and (p := _num(r, "params"))]
    steps = [s for r in runs if (s := _num(r, "steps")) is not None]
    span = lambda xs, f: f(min(xs)) if f(min(xs)) == f(max(xs)) else f"{f(min(xs))}–{f(max(xs))}"  # noqa: E731
    text = "Regime: " + (f"{span(per_param, lambda x: f'{x:.2g}')} training tokens per parameter" if per_param else
                         "tokens per parameter unknown")  # fmt: skip
    text += f", {span(steps, lambda x: f'{x:.0f}')} optimizer steps" if steps else ", optimizer steps not recorded"
    text += f" ({len(runs)} runs)."
    early = bool(steps) and min(steps) < MIN_STEPS
    if early:
        text += (f" **Warning: early training** — runs of fewer than {MIN_STEPS} optimizer steps (as few as {min(steps):.0f}); "
                 "a finding here may not hold for longer training.")  # fmt: skip
    data = {"tokens_per_param": [min(per_param), max(per_param)] if per_param else None,
            "steps": [min(steps), max(steps)] if steps else None, "early_training": early, "min_steps": MIN_STEPS}  # fmt: skip
    return text, data


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
    """One row per contrast: n, mean (or ratio), interval, whether it excludes no difference, BH q, verdict."""
    fmt = (lambda x: f"{x:+.4f}") if signed else (lambda x: f"{x:.3f}")  # noqa: E731
    rows = [[str(v), str(e["n_pairs"]), fmt(e["mean"]), "—" if e["lo"] is None else f"{fmt(e['lo'])} to {fmt(e['hi'])}",
             "—" if e["excludes_zero"] is None else ("yes" if e["excludes_zero"] else "no"),
             f"{e['q']:.2g}" if "q" in e else "—", "finding" if _significant(e) else ONE_SEED if e["lo"] is None else "not a finding"]
            for v, e in sorted(effects.items(), key=lambda kv: str(kv[0]))]  # fmt: skip
    null = "0" if signed else "×1"
    return Table(caption, [label, "pairs", "mean" if signed else "ratio", "95% CI", f"excludes {null}", "q (BH)", "verdict"], rows)


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
    regime, regime_data = _regime(res.done())
    finding += "\n\n" + regime
    data = {"answered": True, "n_runs": len(res.rows), "by_status": dict(counts), "total_wall_s": wall_s,
            "failed": [{"run_id": r["run_id"], "error": r.get("error")} for r in failed], "regime": regime_data}  # fmt: skip
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
    cases, contrasts = [], []
    by_data: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        by_data[p["_key"]].append(p)
    for group in by_data.values():
        for i, small in enumerate(group):
            for large in group[i + 1 :]:
                contrasts.append(welch(large["_bpb"], small["_bpb"]))  # every size pair at equal data is tested
                if small["val_bpb_mean"] < large["val_bpb_mean"]:
                    c = contrasts[-1]
                    cases.append({"smaller": small["size"], "larger": large["size"], "smaller_params": small["params"],
                                  "larger_params": large["params"], "tokens": small["train_tokens"] or small["tokens_seen"],
                                  "smaller_bpb": small["val_bpb_mean"], "larger_bpb": large["val_bpb_mean"],
                                  "margin": c["mean"], "n_seeds": [small["n_seeds"], large["n_seeds"]], "stats": c})  # fmt: skip
    n_tested = fdr(contrasts)
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
        st = c["stats"]
        if st["lo"] is None:
            ci, verdict = f"{c['n_seeds'][0]} and {c['n_seeds'][1]} seeds: {ONE_SEED}", False
        else:
            ci = (f"95% Welch CI of the margin {st['lo']:+.3f} to {st['hi']:+.3f}, {c['n_seeds'][0]} and {c['n_seeds'][1]} seeds, "
                  f"{'excludes' if st['excludes_zero'] else 'includes'} 0" + (f"; BH q = {st['q']:.2g}" if n_tested > 1 else ""))  # fmt: skip
            verdict = _significant(st)
        text = f"At {_si(c['tokens'])} tokens, {c['smaller']} beats the larger {c['larger']}"
        finding += (f"\n\n- {f'**{text}**' if verdict else text} by {c['margin']:.3f} bits/byte ({c['smaller_bpb']:.3f} vs "
                    f"{c['larger_bpb']:.3f}; {ci}){'' if verdict or st['lo'] is None else ': not a finding'}.")  # fmt: skip
    regime, regime_data = _regime(runs)
    finding += _fdr_note(n_tested) + "\n\n" + regime
    for p in points:
        del p["_bpb"], p["_key"]
    return Section(key, title, finding, [table], [plot], {"answered": True, "reference": ref, "points": points,
                                                          "smaller_beats_larger": cases, "regime": regime_data})  # fmt: skip


WORTH = 0.1  # repetition "stops paying" when one more epoch is worth less than this share of fresh data
MUENNIGHOFF_R_STAR = 15.4  # their fit over 400+ runs (Muennighoff et al. 2023), for scale


def _unique(run: Run) -> float | None:
    return _num(run, "unique_tokens") or _num(run, "token_budget")


def _epochs(run: Run) -> float | None:
    u, d = _unique(run), _num(run, "tokens_seen")
    return d / u if u and d else None


def _unidentified(boot, u: np.ndarray, d: np.ndarray, y: np.ndarray) -> tuple[str | None, tuple[float, float] | None, dict]:
    """Whether the study pins R*: None if it does, else the end of the search range (0.1 to 1e4) it
    cannot be told from ("lower" | "upper"); the bootstrap interval; and the sensitivity check.

    Two tests. The bootstrap interval must be clear of both ends. And the runs must be able to see
    R*: moving it to either end (E, B and β held) must move some run's fitted loss by more than twice
    the fit's RMS log residual. The second catches a flat direction, where the resampled fits (each
    started at the full-data optimum) stay put and give a narrow interval around an arbitrary value."""
    from smallscale.study.data_constrained import _R_BOUNDS

    ends = dict(zip(("lower", "upper"), np.exp(_R_BOUNDS), strict=True))
    log_fit = np.log(boot.fit.predict(u, d))
    scatter = float(np.sqrt(np.mean((log_fit - np.log(y)) ** 2)))
    moved = {side: float(np.abs(np.log(dataclasses.replace(boot.fit, R_star=r).predict(u, d)) - log_fit).max())
             for side, r in ends.items()}  # fmt: skip
    check = {"rms_log_residual": scatter, "max_log_change_at": moved}
    interval = boot.interval("R_star") if boot.samples["R_star"].size >= 2 else None
    if boot.fit.r_star_at_bound or interval is None:
        return ("upper" if boot.fit.R_star > 1 else "lower"), interval, check
    if interval[0] <= ends["lower"] * 1.01 or moved["lower"] <= 2 * scatter:
        return "lower", interval, check
    if interval[1] >= ends["upper"] / 1.01 or moved["upper"] <= 2 * scatter:
        return "upper", interval, check
    return None, interval, check


def _repetition_fit(runs: list[Run], n_boot: int, seed: int) -> dict[str, Any]:
    """The data-constrained fit of one model size's runs: R* with its interval, epochs until an
    epoch is worth < WORTH of fresh data, and whether this study identifies R* at all."""
    from smallscale.study.data_constrained import bootstrap_repetition, epochs_until_worthless

    u, d, y = (np.array([f(r) for r in runs]) for f in (_unique, lambda r: _num(r, "tokens_seen"), lambda r: _num(r, "val_loss")))
    repeated_u = {x for x, e in zip(u, d / u) if e > 1.01}
    out: dict[str, Any] = {"n_runs": len(runs), "unique_tokens": sorted(set(u.tolist())), "repeated_at": sorted(repeated_u),
                           "max_epochs": float((d / u).max())}  # fmt: skip
    if len(runs) < 5 or not repeated_u:
        out["reason"] = f"{len(runs)} runs, {'none' if not repeated_u else len(repeated_u)} repeating data: it needs ≥ 5 runs, some repeating their data"
        return out
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        boot = bootstrap_repetition(u, d, y, n_boot=n_boot, seed=seed)
    bound, interval, check = _unidentified(boot, u, d, y)
    out.update(fit=dataclasses.asdict(boot.fit), R_star=boot.fit.R_star, R_star_interval=interval, identified=bound is None,
               sensitivity=check,
               epochs_until_worthless=epochs_until_worthless(boot.fit.R_star, WORTH),
               epochs_interval=None if interval is None else [epochs_until_worthless(x, WORTH) for x in interval],
               n_boot=int(boot.samples["R_star"].size), _fit=boot.fit)  # fmt: skip
    seen = (f"the runs cannot tell it from R* = {'1e4' if bound == 'upper' else '0.1'} (fitted losses move by at most "
            f"{100 * check['max_log_change_at'].get(bound or 'upper', 0):.2g}%, residual scatter {100 * check['rms_log_residual']:.2g}%)")  # fmt: skip
    if bound == "upper":
        out["reason"] = (f"{seen}: up to {out['max_epochs']:.3g} epochs, repetition shows no measurable loss of value against "
                         "fresh data; add more epochs")  # fmt: skip
    elif bound == "lower":
        out["reason"] = f"{seen}: the repeated epochs are worth almost nothing, or the runs are too noisy to tell; add more seeds"
    return out


def _sweet_spots(runs: list[Run], n_boot: int, seed: int) -> dict[str, Any]:
    """Smallest single-epoch budget within 1% and 5% of the best loss (data_constrained.sweet_spot)."""
    from smallscale.study.data_constrained import sweet_spot

    single = [r for r in runs if (e := _epochs(r)) is not None and e <= 1.01]
    budgets = sorted({_unique(r) for r in single})
    if len(budgets) < 4:  # E, A and alpha from three budgets leave no degrees of freedom (scaling_laws)
        return {"budgets": budgets, "reason": f"{len(budgets)} single-epoch budgets; a sweet spot needs ≥ 4"}
    d, y = np.array([_unique(r) for r in single]), np.array([_num(r, "val_loss") for r in single])
    out: dict[str, Any] = {"budgets": budgets, "best_loss": float(y.min()), "best_tokens": float(d[int(np.argmin(y))])}
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            out.update({f"within_{p:g}": sweet_spot(d, y, p / 100, n_boot=n_boot, seed=seed) for p in (1, 5)})
    except Exception as exc:  # a degenerate power-law fit: say so, keep the report
        out["reason"] = f"the power-law fit failed ({type(exc).__name__}: {exc})"
    return out


def _span(interval: list[float] | tuple[float, float] | None) -> str:
    return "—" if interval is None else f"{interval[0]:.3g}–{interval[1]:.3g}"


def _spot_text(spot: dict[str, float]) -> str:
    if not math.isfinite(spot["tokens"]):
        return "not reached (the fitted floor is above it)"
    return f"{_si(spot['tokens'])} tokens (95% CI {_si(spot['lo'])}–{_si(spot['hi'])})"


def repetition(res: Results, n_boot: int, seed: int) -> Section | None:
    """Limited data (Muennighoff et al. 2023): per model size, L = E + B/D'^β with D' the effective
    data of U unique tokens seen for `epochs` passes (smallscale.study.data_constrained), fitted to the
    reference variant's runs in val_loss (nats/token); R* with its bootstrap interval and the epochs
    after which one more is worth < 10% of fresh data; and the data sweet spot of the single-epoch
    runs. Only for studies that repeat data or have ≥ 4 single-epoch budgets of one size."""
    key, title = "repetition", "1c. Limited data: unique tokens vs repetition"
    runs = res.done("val_loss", "params", "tokens_seen")
    ref = _reference(runs)
    runs = [r for r in runs if _matches(r, ref) and _unique(r) and _num(r, "val_loss") > 0]
    by_size: dict[float, list[Run]] = defaultdict(list)
    for r in runs:
        by_size[_num(r, "params")].append(r)
    single_budgets = {p: {_unique(r) for r in rs if _epochs(r) <= 1.01} for p, rs in by_size.items()}
    if not any(_epochs(r) > 1.01 for r in runs) and max((len(b) for b in single_budgets.values()), default=0) < 4:
        return None  # the study neither repeats data nor varies it enough for a sweet spot
    sizes = []
    for params, members in sorted(by_size.items()):
        sizes.append({"size": _size(members[0]), "params": params, "fit": _repetition_fit(members, n_boot, seed),
                      "sweet_spot": _sweet_spots(members, n_boot, seed), "_runs": members})  # fmt: skip
    lines, rows = [], []
    for s in sizes:
        f, sp = s["fit"], s["sweet_spot"]
        if "R_star" not in f:
            fit_text = f"R* not fitted ({f['reason']})"
        elif f["identified"]:
            (lo, hi), (elo, ehi) = f["R_star_interval"], f["epochs_interval"]
            fit_text = (f"**R* = {f['R_star']:.3g} (95% CI {lo:.3g}–{hi:.3g})**: the k-th repeated epoch is worth e^(−k/R*) of fresh "
                        f"data, so **repetition stops paying after {f['epochs_until_worthless']:.3g} epochs (95% CI {elo:.3g}–{ehi:.3g})**, "
                        f"where one more epoch is worth < {WORTH:.0%} of new data")  # fmt: skip
        else:
            shown = "" if f["R_star_interval"] is None else f" (95% CI {f['R_star_interval'][0]:.3g}–{f['R_star_interval'][1]:.3g})"
            fit_text = f"R* = {f['R_star']:.3g}{shown}: **not identified by this study** ({f['reason']})"
        if "within_1" in sp:
            spot_text = (f"sweet spot (single epoch): within 1% of the best loss ({sp['best_loss']:.3f} nats at {_si(sp['best_tokens'])} "
                         f"tokens) from {_spot_text(sp['within_1'])}, within 5% from {_spot_text(sp['within_5'])}")  # fmt: skip
        else:
            spot_text = f"no sweet spot ({sp['reason']})"
        lines.append(f"- **{s['size']}** ({f['n_runs']} runs; U = {', '.join(_si(x) for x in f['unique_tokens'])}): {fit_text}; {spot_text}.")
        rows.append([s["size"], str(f["n_runs"]), _f(f.get("R_star"), 3), _span(f.get("R_star_interval")),
                     _f(f.get("epochs_until_worthless"), 3), _span(f.get("epochs_interval")), "yes" if f.get("identified") else "no",
                     *[_spot_text(sp[p]) if p in sp else "—" for p in ("within_1", "within_5")]])  # fmt: skip
    regime, regime_data = _regime(runs)
    finding = (f"Data-constrained scaling (Muennighoff et al. 2023): D' = U + U·R*·(1 − e^(−R/R*)) effective tokens from U unique "
               f"tokens repeated R = epochs − 1 times, L = E + B/D'^β fitted per model size to val_loss (nats/token; reference "
               f"variant; Huber on log residuals), intervals from {n_boot} bootstrap resamples of runs. R* is the number of "
               f"repetitions at which an epoch's worth has fallen to 1/e; Muennighoff et al. found R* ≈ {MUENNIGHOFF_R_STAR} "
               f"(an epoch worth < 10% of fresh data after ≈ 36 epochs). The sweet spot is the smallest data budget whose fitted "
               f"single-epoch loss is within 1% (5%) of the best loss the study reached at that size.\n\n" + "\n".join(lines)
               + "\n\n" + regime)  # fmt: skip
    table = Table("Per model size: R* and the epoch after which repetition stops paying (< 10% of fresh data), and the data sweet spot",
                  ["model", "runs", "R*", "R* 95% CI", "epochs until < 10%", "95% CI", "identified", "sweet spot 1%", "sweet spot 5%"], rows)  # fmt: skip
    run_rows = [[s["size"], _si(_unique(r)), f"{_epochs(r):.2f}", _si(_num(r, "tokens_seen")), _f(_num(r, "val_loss"), 4),
                 _f(float(s["fit"]["_fit"].predict(_unique(r), _num(r, "tokens_seen"))), 4) if "_fit" in s["fit"] else "—"]
                for s in sizes for r in sorted(s["_runs"], key=lambda r: (_unique(r), _epochs(r)))]  # fmt: skip
    runs_table = Table("Runs (reference variant): unique tokens U, epochs, val_loss and the fitted law",
                       ["model", "U", "epochs", "tokens seen", "val_loss", "fitted"], run_rows)  # fmt: skip
    figure = _repetition_plot(sizes)
    for s in sizes:
        s["fit"].pop("_fit", None)
        del s["_runs"]
    data = {"answered": any(s["fit"].get("identified") or "within_1" in s["sweet_spot"] for s in sizes), "reference": ref,
            "worth": WORTH, "sizes": sizes, "regime": regime_data}  # fmt: skip
    return Section(key, title, finding, [table, runs_table], [figure], data)


def _repetition_plot(sizes: list[dict[str, Any]]) -> Plot:
    """val_loss vs epochs per unique-token budget U, one panel per size, with the fitted law."""
    fig, axes = _figure(min(len(sizes), 4))
    for ax, s in zip(axes, sizes):
        budgets = sorted({_unique(r) for r in s["_runs"]})
        for i, u in enumerate(budgets):
            members = sorted((r for r in s["_runs"] if _unique(r) == u), key=_epochs)
            xs = [_epochs(r) for r in members]
            ax.plot(xs, [_num(r, "val_loss") for r in members], "o", color=f"C{i}", label=f"U = {_si(u)}")
            if "_fit" in s["fit"] and max(xs) > 1.01:
                grid = np.geomspace(1.0, max(xs), 40)
                ax.plot(grid, s["fit"]["_fit"].predict(u, u * grid), "-", color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="epochs over U", ylabel="val_loss (nats/token)", title=s["size"])
        ax.legend(fontsize=8)
    caption = "val_loss vs epochs for each unique-token budget U (points: runs; lines: the fitted data-constrained law)."
    return Plot("repetition", caption, _png(fig))


def welch(a: list[float], b: list[float], level: float = 0.95) -> dict[str, Any]:
    """mean(a) − mean(b) of unpaired samples with its Welch interval and p (keys as `compare`);
    no interval or p without two values on each side."""
    from scipy import stats

    diff = float(np.mean(a) - np.mean(b))
    out: dict[str, Any] = {"mean": diff, "lo": None, "hi": None, "p": None, "excludes_zero": None, "n": [len(a), len(b)]}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    if va + vb == 0:
        lo = hi = diff
        p = float(diff == 0)
    else:
        dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        half = float(stats.t.ppf(0.5 + level / 2, dof)) * math.sqrt(va + vb)
        lo, hi, p = diff - half, diff + half, float(2 * stats.t.sf(abs(diff) / math.sqrt(va + vb), dof))
    return {**out, "lo": lo, "hi": hi, "p": p, "excludes_zero": bool(lo > 0 or hi < 0)}


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
    evals = {}
    for column in sorted(c for c in res.columns if c.startswith("eval.") and c.rsplit(".", 1)[-1] in ("bpb", "accuracy", "macro_f1")):
        for value, eff in _paired(groups, base, column).items():
            evals[f"{column[5:]} ({value} − {base})"] = eff
    n_tested = fdr([*effects.values(), *evals.values()])
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
    regime, regime_data = _regime([r for g in groups for r in g.values()])
    finding += _fdr_note(n_tested) + "\n\n" + regime
    if evals:
        tables.append(_effects_table(f"Paired differences of evaluation metrics vs {base} (bpb: lower is better; "
                                     "accuracy, macro_f1: higher is better)", "metric", evals))  # fmt: skip
    data = {"answered": True, "baseline": base, "effects": effects, "fertility": {str(k): float(np.mean(v)) for k, v in fertility.items()},
            "evals": evals, "regime": regime_data}  # fmt: skip
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
    n_tested = fdr(list(effects.values()))
    regime, regime_data = _regime([r for g in groups for r in g.values()])
    finding = " ".join(_diff_sentence(v, base, e) for v, e in sorted(effects.items(), key=lambda kv: str(kv[0]))) + _fdr_note(n_tested)
    table = _effects_table(f"Paired val_bpb differences vs {base} (bits/byte; negative = better than {base})", "encoding", effects)
    tables, figures = [table], [_effect_plot("positions", effects, base, "Position encodings")]
    data = {"answered": True, "baseline": base, "effects": effects, "regime": regime_data}
    factors = sorted((float(m.group(1)), c) for c in res.columns if (m := EXTRAPOLATION.match(c)))
    if factors:
        text, table, plot, data["length_extrapolation"] = _length_extrapolation(groups, factors)
        finding, tables, figures = finding + text, [*tables, table], [*figures, plot]
    return Section(key, title, finding + "\n\n" + regime, tables, figures, data)


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


def lr_sweeps(runs: list[Run]) -> dict[Any, list[dict[str, Any]]]:
    """Per optimizer, the learning-rate sweeps in the study: groups of done runs equal in every config
    column but `lr` and `seed`, with at least two learning rates. Each: its setting, the swept lrs,
    mean val_bpb per lr (over seeds), the best lr, and `edge`: "low" or "high" when the best is the
    smallest or largest lr swept (the optimum may lie beyond it), None when it lies inside."""
    key_columns = [c for c in CONFIG_COLUMNS if c not in ("lr", "seed")]
    groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if (lr := _num(r, "lr")) is not None and (bpb := _num(r, "val_bpb")) is not None:
            groups[tuple(r.get(c) for c in key_columns)][lr].append(bpb)
    sweeps: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for key, by_lr in groups.items():
        if len(by_lr) < 2:
            continue
        setting = dict(zip(key_columns, key, strict=True))
        lrs = sorted(by_lr)
        bpb = [float(np.mean(by_lr[lr])) for lr in lrs]
        best = lrs[int(np.argmin(bpb))]
        sweeps[setting["optimizer"]].append({"setting": {c: setting[c] for c in ("preset", "train_tokens", "token_budget")},
                                             "lrs": lrs, "val_bpb": bpb, "n_seeds": min(len(v) for v in by_lr.values()),
                                             "best_lr": best, "edge": "low" if best == lrs[0] else "high" if best == lrs[-1] else None})  # fmt: skip
    return sweeps


NOT_TUNED = "lr not tuned in this study"


def _tuning(optimizer: Any, sweeps: list[dict[str, Any]]) -> str | None:
    """Why `optimizer`'s comparisons cannot be findings (None when its lr was tuned, best inside)."""
    if not sweeps:
        return NOT_TUNED
    edges = [s for s in sweeps if s["edge"]]
    if edges:
        s = edges[0]
        return (f"best lr {s['best_lr']:g} at the {s['edge']} edge of its sweep ({', '.join(f'{x:g}' for x in s['lrs'])}): "
                f"the optimum may lie {'lower' if s['edge'] == 'low' else 'higher'}")  # fmt: skip
    return None


def _blocked(tuning: dict[Any, str | None], *optimizers: Any) -> str | None:
    """Why a comparison of `optimizers` is not a finding: e.g. `lr not tuned in this study for adamw, lamb`."""
    untuned = [str(o) for o in optimizers if tuning[o] == NOT_TUNED]
    edges = [f"{o}: {tuning[o]}" for o in optimizers if tuning[o] and tuning[o] != NOT_TUNED]
    reasons = ([f"{NOT_TUNED} for {', '.join(untuned)}"] if untuned else []) + edges
    return "; ".join(reasons) or None


def optimizers(res: Results, study_dir: Path) -> Section:
    """Optimizers paired within model, data and seed, each at its own lr. A difference is a finding
    only when every optimizer in it had its lr tuned in the study with the best lr inside its sweep
    (`lr_sweeps`): an untuned rival loses for want of tuning. With a sweep, each optimizer is compared
    at its best lr."""
    key, title = "optimizers", "3. Optimizers"
    runs = res.done("val_bpb")
    if (none := _not_varied(key, title, runs, "optimizer", "optim.name")) is not None:
        return none
    sweeps = lr_sweeps(runs)
    best_lr = {opt: s[0]["best_lr"] for opt, s in sweeps.items() if len({x["best_lr"] for x in s}) == 1}
    runs = [r for r in runs if r.get("optimizer") not in best_lr or _num(r, "lr") == best_lr[r.get("optimizer")]]
    groups = _pair_groups(runs, "optimizer", companions=("lr",))
    if not groups:
        return _unanswered(key, title, "Runs use several optimizers, but no two done runs differ only in `optimizer` "
                                       "(and its learning rate), so no paired comparison is possible.")  # fmt: skip
    base = _baseline(groups, "adamw")
    effects = _paired(groups, base, "val_bpb")
    tuning = {opt: _tuning(opt, sweeps.get(opt, [])) for opt in sorted({v for g in groups for v in g}, key=str)}
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
    for v, e in [*effects.items(), *to_target.items()]:
        if blocked := _blocked(tuning, base, v):
            e["blocked"] = blocked
    n_tested = fdr([*effects.values(), *to_target.values()])
    finding = "Paired within model, data and seed, each optimizer at its own learning rate. "
    finding += " ".join(_diff_sentence(v, base, e) for v, e in sorted(effects.items(), key=lambda kv: str(kv[0])))
    for v, e in sorted(to_target.items(), key=lambda kv: str(kv[0])):
        verdict = f": **not a finding** ({e['blocked']})" if e.get("blocked") else "" if _significant(e) or e["lo"] is None else \
            ": not a finding (the interval includes ×1 or BH does not keep it)"  # fmt: skip
        finding += f" To reach the same smoothed train loss, {v} needs {_ratio_text(e)} of {base}'s tokens{verdict}."
    tuned = [f"{opt}: {reason or 'tuned, best lr inside its sweep'}" for opt, reason in tuning.items()]
    finding += ("\n\nLearning rates (a comparison is a finding only when each optimizer's lr was swept in this study and its "
                "best lr lies inside the sweep): " + "; ".join(tuned) + "." + _fdr_note(n_tested))  # fmt: skip
    memory = defaultdict(list)
    for r in runs:
        if (b := _num(r, "optimizer_state_bytes")) is not None:
            memory[r.get("optimizer")].append((b, b / (_num(r, "params") or math.nan)))
    mem = {v: {"optimizer_state_bytes": float(np.mean([b for b, _ in m])), "bytes_per_param": float(np.mean([p for _, p in m]))}
           for v, m in sorted(memory.items(), key=lambda kv: str(kv[0]))}  # fmt: skip
    if mem:
        finding += " Optimizer state: " + ", ".join(f"{v} {m['bytes_per_param']:.1f} bytes/parameter" for v, m in mem.items()) + "."
    regime, regime_data = _regime([r for g in groups for r in g.values()])
    finding += "\n\n" + regime
    sweep_rows = [[str(opt), f"{s['setting']['preset']}, {_si(s['setting']['train_tokens'])} tokens", str(s["n_seeds"]),
                   ", ".join(f"{lr:g}: {b:.3f}" for lr, b in zip(s["lrs"], s["val_bpb"])), f"{s['best_lr']:g}",
                   f"{s['edge']} edge" if s["edge"] else "inside"]
                  for opt, found in sorted(sweeps.items(), key=lambda kv: str(kv[0])) for s in found]  # fmt: skip
    tables = [
        _effects_table(f"Final val_bpb, paired differences vs {base} (bits/byte)", "optimizer", effects),
        _effects_table(f"Tokens to the target train loss, ratio vs {base} (< 1: faster)", "optimizer", to_target, signed=False),
        Table("Learning-rate sweeps found in the study (runs differing only in optim.lr; val_bpb averaged over seeds)",
              ["optimizer", "setting", "seeds", "lr: val_bpb", "best lr", "best lies"], sweep_rows),
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
    data = {"answered": True, "baseline": base, "effects": effects, "tokens_to_target": to_target, "memory": mem,
            "lr_sweeps": sweeps, "lr_tuning": tuning, "regime": regime_data}  # fmt: skip
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
        except DegenerateFit as exc:
            failure.append(f"The joint fit L(N, D) is not reported: {exc}.")
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


# Exponents of published language-model scaling laws lie in 0.05-0.8 (Kaplan et al. 2020, Hoffmann
# et al. 2022, Besiroglu et al. 2024); a fit beyond this bound, or with an infinite coefficient, has
# not separated N from D (e.g. one model size dominates the grid) and is no law to report.
MAX_SCALING_EXPONENT = 2.0


class DegenerateFit(ValueError):
    pass


def _check_chinchilla(estimate: dict[str, float]) -> None:
    """Raise DegenerateFit for a joint fit that is no law: a non-finite parameter or an exponent
    outside (0, MAX_SCALING_EXPONENT]."""
    bad = [k for k in ("E", "A", "B", "alpha", "beta") if not math.isfinite(estimate[k])]
    exponents_ok = all(0 < estimate[k] <= MAX_SCALING_EXPONENT for k in ("alpha", "beta") if k not in bad)
    if bad or not exponents_ok:
        shown = ", ".join(f"{k} = {estimate[k]:.3g}" for k in ("alpha", "beta", "A", "B", "E"))
        raise DegenerateFit(f"the estimate is degenerate ({shown}; exponents of a scaling law lie in (0, "
                            f"{MAX_SCALING_EXPONENT:g}], coefficients are finite): this grid cannot separate model size from data")


def _chinchilla(scaling, N, D, L, n_boot: int, seed: int, data: dict[str, Any], ref: dict[str, Any]) -> Section:
    _check_chinchilla(dataclasses.asdict(scaling.fit_chinchilla(N, D, L)))  # before the bootstrap: a degenerate fit costs no resamples
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


def efficiency(res: Results) -> Section:
    key, title = "efficiency", "5. Training efficiency"
    runs = res.done()
    if not runs:
        return _unanswered(key, title, "There are no done runs.")
    per_run = []
    for r in runs:
        j = _num(r, "energy_j")
        per_run.append({"run_id": r["run_id"], "tokens_per_s": _num(r, "tokens_per_s"), "mfu": _num(r, "mfu"),
                        "peak_mem_bytes": _num(r, "peak_mem_bytes"), "wall_s": _num(r, "wall_s"),
                        "energy_kwh": _num(r, "energy_kwh"), "co2_kg": _num(r, "co2_kg"),
                        "energy_gpu_kwh": _num(r, "energy_gpu_kwh"), "energy_j": j, "nvml_gpu_kwh": j and j / 3.6e6,
                        "energy_method": r.get("energy_method")})  # fmt: skip
    table = Table("Per run (energy and CO2 of training as CodeCarbon measured it; GPU energy also from the board's NVML counter)",
                  ["run", "device", "precision", "ckpt", "tokens/s", "MFU", "peak mem (GiB)", "wall", "kWh", "kg CO2eq",
                   "GPU kWh (NVML)", "GPU kWh (CodeCarbon)"],
                  [[r["run_id"], _show(r.get("device")), _show(r.get("precision")), _show(r.get("grad_checkpointing")),
                    _si(p["tokens_per_s"]), "—" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%",
                    "—" if p["peak_mem_bytes"] is None else f"{p['peak_mem_bytes'] / 2**30:.2f}",
                    "—" if p["wall_s"] is None else _duration(p["wall_s"]), _si(p["energy_kwh"]), _si(p["co2_kg"]),
                    _si(p["nvml_gpu_kwh"]), _si(p["energy_gpu_kwh"])]
                   for r, p in zip(runs, per_run)])  # fmt: skip
    mfus = [p["mfu"] for p in per_run if p["mfu"] is not None]
    rates = [p["tokens_per_s"] for p in per_run if p["tokens_per_s"] is not None]
    finding = f"Across {len(runs)} done runs: median {_si(np.median(rates)) if rates else '—'} tokens/s"
    finding += f", median MFU {100 * np.median(mfus):.1f}% (FLOPs per token 6N + 12·n_layer·d_model·seq_len)." if mfus else "."
    energy, data_energy = _energy_finding(runs, per_run)
    finding += energy
    data = {"answered": True, **data_energy, "runs": per_run}
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


def _energy_finding(runs: list[Run], per_run: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The energy and CO2 sentences of the efficiency section (CodeCarbon's figures, the method
    named; the NVML GPU counter beside CodeCarbon's GPU part where both exist) and their data."""
    measured = [(r, p) for r, p in zip(runs, per_run, strict=True) if p["energy_kwh"] is not None and p["co2_kg"] is not None]
    nvml = [p for p in per_run if p["nvml_gpu_kwh"] is not None]
    data: dict[str, Any] = {"total_kwh": None, "total_co2_kg": None, "energy_methods": {}, "grids": {},
                            "nvml_gpu_kwh": sum(p["nvml_gpu_kwh"] for p in nvml) if nvml else None}  # fmt: skip
    if measured:
        total_kwh, total_co2 = sum(p["energy_kwh"] for _, p in measured), sum(p["co2_kg"] for _, p in measured)
        methods = Counter(str(p["energy_method"]) for _, p in measured)
        grids = Counter(f"{_si(_num(r, 'carbon_intensity_g_per_kwh'))} g CO2eq/kWh ({r.get('energy_country') or 'world average'})"
                        for r, _ in measured)  # fmt: skip
        data.update(total_kwh=total_kwh, total_co2_kg=total_co2, energy_methods=dict(methods), grids=dict(grids))
        text = (f" **Training used {total_kwh:.3g} kWh ≈ {total_co2:.3g} kg CO2eq** over {len(measured)} runs, as CodeCarbon "
                f"measured it (carbon intensity of the grid from CodeCarbon's data: {'; '.join(grids)}). Method: "
                + "; ".join(f"{m} ({n} runs)" for m, n in methods.items()) + ". Evaluations are measured too, in each eval result.")  # fmt: skip
        both = [p for _, p in measured if p["nvml_gpu_kwh"] is not None and p["energy_gpu_kwh"] is not None]
        if both:
            text += (f" GPU energy over {len(both)} runs: {sum(p['nvml_gpu_kwh'] for p in both):.3g} kWh by the board's NVML "
                     f"counter, {sum(p['energy_gpu_kwh'] for p in both):.3g} kWh by CodeCarbon.")  # fmt: skip
        return text, data
    if nvml:
        return (f" GPU energy by the board's NVML counter: {data['nvml_gpu_kwh']:.3g} kWh over {len(nvml)} runs; CO2 was not "
                "measured (no run has CodeCarbon figures: pip install 'smallscale[energy]').", data)  # fmt: skip
    return " Energy was not measured (no run has CodeCarbon figures or an NVML GPU energy counter).", data


# Downstream metrics: what each column measures, which way is better, and its role. Quality metrics
# are ranked; diagnostics (counts, standard errors, chance levels, descriptions of the samples) are
# shown but never ranked. The first pattern matching the column name wins; unknown: a diagnostic.
METRIC_ROLES: tuple[tuple[re.Pattern, str, str, str], ...] = tuple((re.compile(p), d, r, w) for p, d, r, w in (
    (r"\.(n|n_\w+|tokens|bytes|documents)$", "none", "count", "how many examples (tokens, bytes) were scored"),
    (r"_stderr$", "none", "diagnostic", "standard error of the metric beside it"),
    (r"\.(chance|majority_accuracy)$", "none", "diagnostic", "the accuracy of guessing (uniformly, or the majority class)"),
    (r"\.ratio_\d+(\.\d+)?x$", "none", "diagnostic", "loss at k× the training context over loss at 1× (< 1: uses the longer context)"),
    (r"\.(bpb|loss|nll|ppl|perplexity)(_\d+(\.\d+)?x)?$", "lower", "quality", "held-out loss (bits per byte, nats or perplexity)"),
    (r"\.(acc|acc_norm|acc_bytes|accuracy)$", "higher", "quality", "share of examples answered correctly"),
    (r"\.(macro_f1|f1|exact_match)$", "higher", "quality", "F1 / exact match against the gold answers"),
    (r"\.(chrf|chrfpp)$", "higher", "quality", "character n-gram F-score against the true continuation (same length: "
                                               "see eval/tasks/generation.py)"),
    (r"\.bleu$", "higher", "quality", "word 1-4-gram precision against the true continuation (near 0 for short free text)"),
    (r"\.(distinct_1|distinct_2)$", "none", "diagnostic", "variety of the samples: unique / all word n-grams"),
    (r"\.self_bleu$", "none", "diagnostic", "how alike the samples are (BLEU of each against the others)"),
    (r"\.repetition_4$", "none", "diagnostic", "share of a sample's word 4-grams that repeat (loops)"),
    (r"\.(eos_probability|eos_fraction|mean_new_tokens)$", "none", "diagnostic", "how soon the model wanted to end the text"),
))  # fmt: skip
ACCURACY = re.compile(r"^eval\.([^.]+)\.(acc|acc_norm|acc_bytes|accuracy)$")
# Chance accuracy by task where the result does not record it (eval.<task>.chance wins): a BLiMP pair
# is a 2-way choice; the multiple-choice tasks have 4 (HellaSwag) or 2 (PIQA, WinoGrande) options.
CHANCE = {"blimp": 0.5, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5}


def metric_role(column: str) -> tuple[str, str, str]:
    """(direction: higher | lower | none, role: quality | diagnostic | count, what it measures)."""
    for pattern, direction, role, what in METRIC_ROLES:
        if pattern.search(column):
            return direction, role, what
    return "none", "diagnostic", "direction not declared: not ranked"


def accuracy_interval(acc: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of an accuracy over n examples (scipy's binomtest)."""
    from scipy.stats import binomtest

    ci = binomtest(round(acc * n), n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _examples(run: Run, task: str, acc: float) -> int | None:
    """Examples behind an accuracy: eval.<task>.n, else from its standard error (n = p(1 − p)/se²)."""
    if (n := _num(run, f"eval.{task}.n")) is not None:
        return int(n)
    se = next((x for m in ("acc", "accuracy") if (x := _num(run, f"eval.{task}.{m}_stderr"))), None)
    return round(acc * (1 - acc) / se**2) if se and 0 < acc < 1 else None


def downstream(res: Results) -> Section:
    """Every eval metric per model size × data × variant; quality metrics ranked in their declared
    direction (METRIC_ROLES), diagnostics shown unranked, accuracies against their chance level."""
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
    roles = {c: metric_role(c) for c in columns}
    rows, data_rows, chance_rows = [], [], []
    for k in order:
        members = groups[k]
        values = {c: [x for r in members if (x := _num(r, c)) is not None] for c in columns}
        rows.append([_size(members[0]), _si(_num(members[0], "train_tokens") or _num(members[0], "tokens_seen")), k[2],
                     str(len(members)), *[_pm(values[c], 0 if roles[c][1] == "count" else 3) for c in columns]])  # fmt: skip
        metrics = {c[5:]: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v),
                           "direction": roles[c][0], "role": roles[c][1]}
                   for c, v in values.items() if v}  # fmt: skip
        for c in columns:
            if (m := ACCURACY.match(c)) and values[c]:
                task, acc = m.group(1), float(np.mean(values[c]))
                chance = _num(members[0], f"eval.{task}.chance") or CHANCE.get(task)
                n = _examples(members[0], task, acc)
                entry = metrics[c[5:]]
                entry.update(chance=chance, n_examples=n)
                if chance is None or n is None:
                    continue
                lo, hi = accuracy_interval(acc, n)
                entry.update(lo=lo, hi=hi, verdict="at chance" if lo <= chance <= hi else "above chance" if lo > chance else "below chance")
                chance_rows.append([_size(members[0]), _si(tokens(k)), k[2], c[5:], str(len(members)), f"{acc:.3f}", f"{lo:.3f}–{hi:.3f}",
                                    str(n), f"{chance:.3g}", entry["verdict"]])  # fmt: skip
        data_rows.append({"size": _size(members[0]), "params": k[0], "tokens": tokens(k), "variant": k[2],
                          "n_seeds": len(members), "runs": [r["run_id"] for r in members], "metrics": metrics})  # fmt: skip
    best, diagnostics = [], defaultdict(list)
    for c in columns:
        direction, role, what = roles[c]
        if role != "quality":
            diagnostics[what].append(f"`{c[5:]}`")
            continue
        scored = [(row["metrics"][c[5:]]["mean"], row) for row in data_rows if c[5:] in row["metrics"]]
        value, row = (min if direction == "lower" else max)(scored, key=lambda s: s[0])
        entry = row["metrics"][c[5:]]
        details = f"{row['n_seeds']} seed{'s' if row['n_seeds'] > 1 else ''}"
        if "verdict" in entry:
            details += f"; Wilson 95% CI {entry['lo']:.3f}–{entry['hi']:.3f} over {entry['n_examples']} examples, chance {entry['chance']:.3g}: {entry['verdict']}"
        line = f"- `{c[5:]}` ({direction} is better; {what}): best {row['size']} at {_si(row['tokens'])} tokens, {row['variant']} = {value:.4g} ({details})."
        at_chance = [r for r in data_rows if r["metrics"].get(c[5:], {}).get("verdict") == "at chance"]
        if at_chance:
            line += (f" **At chance** (the interval covers {entry['chance']:.3g}): "
                     + ("every model." if len(at_chance) == len(scored) else f"{len(at_chance)} of {len(scored)} groups."))  # fmt: skip
        best.append(line)
    finding = (f"{len(columns)} evaluation metrics over {len(order)} model-size × data × variant groups (mean ± std across seeds; "
               f"variants named by how they differ from the reference). Each metric declares its direction and role: "
               f"{len(best)} quality metrics are ranked below; the best is descriptive (one group's mean; differences between "
               f"groups are not tested here, see the paired sections).\n\n" + "\n".join(best))  # fmt: skip
    if diagnostics:
        finding += "\n\nDiagnostics, shown in the table but not ranked: " + "; ".join(f"{', '.join(cs)} ({what})" for what, cs in diagnostics.items()) + "."
    regime, regime_data = _regime(runs)
    finding += "\n\n" + regime
    header = ["model", "tokens", "variant", "seeds", *[f"{c[5:]} ({ {'higher': '↑', 'lower': '↓'}.get(roles[c][0], 'diag.')})" for c in columns]]
    tables = [Table("Evaluation metrics per model size × variant (↑ / ↓: higher / lower is better; diag.: diagnostic, not ranked)",
                    header, rows)]  # fmt: skip
    if chance_rows:
        tables.append(Table("Accuracies against chance: Wilson 95% interval over the examples (seeds averaged)",
                            ["model", "tokens", "variant", "metric", "seeds", "accuracy", "95% CI", "examples", "chance", "verdict"],
                            chance_rows))  # fmt: skip
    roles_data = {c[5:]: {"direction": d, "role": r, "measures": w} for c, (d, r, w) in roles.items()}
    return Section(key, title, finding, tables, data={"answered": True, "reference": ref, "groups": data_rows, "metric_roles": roles_data,
                                                      "regime": regime_data})  # fmt: skip


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


Composition = dict[str, dict[str, dict[str, Any]]]  # dataset -> source name -> {weight, source, domain, language}
SOURCE_BPB = re.compile(r"^eval\.heldout_sources\.(.+)\.bpb$")
TRANSFER_DOWNSTREAM = re.compile(r"^eval\.(afrisenti|masakhanews)\w*\.(accuracy|macro_f1)$")


def _domain(source: str) -> str:
    """The corpus a source or an evaluation text comes from: `builtin:wikitext2-test` -> `wikitext2`,
    `builtin:flores-swh-devtest` -> `flores-swh`; any other source is its own domain."""
    name = source.removeprefix("builtin:")
    for suffix in ("-devtest", "-test", "-dev"):
        name = name.removesuffix(suffix)
    return name


def _language(source: str) -> str | None:
    from smallscale.data.builtins import BUILTINS

    entry = BUILTINS.get(source.removeprefix("builtin:")) if source.startswith("builtin:") else None
    return entry.language if entry else None


def dataset_compositions(study_dir: Path) -> Composition:
    """What each dataset of the study is made of, from its manifest: a mixture's sources with their
    weights (`data mix`), or a plain dataset as one source named after the dataset."""
    try:
        runs = json.loads((study_dir / "manifest.json").read_text(encoding="utf-8"))["runs"]
        paths = {r["dataset"]: Path(r["config"]["data"]["path"]) for r in runs}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out: Composition = {}
    for dataset, path in paths.items():
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
            mixture = manifest.get("mixture")
            sources = ({n: (s["source"], float(s["weight"])) for n, s in mixture["sources"].items()} if mixture
                       else {dataset: (str(manifest["source"]), 1.0)})  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # an unreadable manifest: the dataset takes no part in these sections
        out[dataset] = {n: {"weight": w, "source": s, "domain": _domain(s), "language": _language(s)} for n, (s, w) in sources.items()}
    return out


def _ci_text(eff: dict[str, Any], unit: str = "bits/byte") -> str:
    value = f"{eff['mean']:+.3f}" + (f" {unit}" if unit else "")
    if eff["lo"] is None:
        return f"{value} (one seed — not a finding)"
    return f"{value} (95% CI {eff['lo']:+.3f} to {eff['hi']:+.3f}, {eff['n_pairs']} pairs)"


def _sign(eff: dict[str, Any]) -> int:
    """-1 / +1 when the 95% interval lies below / above zero, 0 when it holds zero or there is none."""
    if eff["lo"] is None:
        return 0
    return -1 if eff["hi"] < 0 else 1 if eff["lo"] > 0 else 0


def _mean_of(run: Run, columns: list[str]) -> float | None:
    values = [_num(run, c) for c in columns]
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def _bars_plot(name: str, title: str, labels: list[str], series: dict[str, list[dict[str, Any]]], ylabel: str) -> Plot:
    """Grouped bars (one group per label, one bar per series) with 95% intervals and a zero line."""
    fig, (ax,) = _figure()
    width = 0.8 / max(1, len(series))
    for j, (what, effects) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
        means = [e["mean"] for e in effects]
        err = [[m - (e["lo"] if e["lo"] is not None else m) for e, m in zip(effects, means)],
               [(e["hi"] if e["hi"] is not None else m) - m for e, m in zip(effects, means)]]  # fmt: skip
        ax.bar(xs, means, width=width, yerr=err, capsize=4, label=what, color=f"C{j}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return Plot(name, f"{title}; bars: mean paired difference with its 95% t-interval (none from one seed).", _png(fig))


def _bpb_effect(members: list[tuple[Run, Run]], tasks: list[str]) -> dict[str, Any] | None:
    """Paired difference (diverse − narrow) of the mean bits/byte over `tasks`; None without tasks."""
    cols = [f"eval.{t}.bpb" for t in tasks]
    return _effect([(_mean_of(rb, cols) - _mean_of(ra, cols), ra["run_id"], rb["run_id"]) for ra, rb in members]) if tasks else None


def diversity(res: Results, datasets: Composition) -> Section | None:
    """H1: at equal tokens, model and seed, does a more diverse mixture (a strict superset of a
    narrower one's sources) score better out of domain, and at what in-domain cost?

    Out of domain: the mean bits/byte over the raw-text tasks whose corpus neither run trained on
    (`_domain` of the task's text and of every source) in a language the narrow run saw; a task in a
    language only the diverse run saw measures coverage, not generalisation, and is reported apart.
    In-domain: the mean held-out bits/byte of the narrow run's sources (`heldout_sources`), which both
    runs saw. Paired by seed: Student-t over pairs."""
    from smallscale.eval.tasks.perplexity import TEXT_TASKS

    key, title = "diversity", "8. Diverse vs narrow data (H1)"
    if not any(len(sources) > 1 for sources in datasets.values()):
        return None  # the study mixes no sources
    pairs: dict[tuple[str, str], list[tuple[Run, Run]]] = defaultdict(list)
    for g in _pair_groups([r for r in res.done() if r.get("dataset") in datasets], "dataset"):
        for a, ra in g.items():
            for b, rb in g.items():
                if set(datasets[a]) < set(datasets[b]):
                    pairs[(a, b)].append((ra, rb))
    if not pairs:
        return _unanswered(key, title, "No two done runs differ only in their dataset with one dataset's sources a strict subset "
                                       "of the other's (same model, tokens and seed); add nested mixtures, e.g. 1, 2 and 4 sources.")  # fmt: skip
    ci = lambda e: "—" if e is None or e["lo"] is None else f"{e['lo']:+.3f} to {e['hi']:+.3f}"  # noqa: E731
    rows, task_rows, comparisons, lines = [], [], [], []
    for (a, b), members in sorted(pairs.items(), key=lambda kv: (len(datasets[kv[0][1]]), kv[0])):
        seen = {s["domain"] for s in (*datasets[a].values(), *datasets[b].values())}
        languages = {s["language"] for s in datasets[a].values()} - {None}
        unseen = [t for t, spec in TEXT_TASKS.items() if _domain(spec["source"]) not in seen
                  and all(_num(r, f"eval.{t}.bpb") is not None for pair in members for r in pair)]  # fmt: skip
        ood_tasks = [t for t in unseen if _language(TEXT_TASKS[t]["source"]) in languages]
        new_language = [t for t in unseen if t not in ood_tasks]
        ood, coverage = _bpb_effect(members, ood_tasks), _bpb_effect(members, new_language)
        in_cols = [f"eval.heldout_sources.{s}.bpb" for s in sorted(datasets[a])]
        usable = [(ra, rb) for ra, rb in members if _mean_of(ra, in_cols) is not None and _mean_of(rb, in_cols) is not None]
        cost = _effect([(_mean_of(rb, in_cols) - _mean_of(ra, in_cols), ra["run_id"], rb["run_id"]) for ra, rb in usable]) if usable else None
        per_task = {t: _bpb_effect(members, [t]) for t in unseen}
        label = f"{b} ({len(datasets[b])}) vs {a} ({len(datasets[a])})"
        comparisons.append({"narrow": a, "diverse": b, "narrow_sources": sorted(datasets[a]), "diverse_sources": sorted(datasets[b]),
                            "ood_tasks": ood_tasks, "ood": ood, "new_language_tasks": new_language, "new_language": coverage,
                            "in_domain": cost, "per_task": per_task, "label": label})  # fmt: skip
        rows.append([a, b, f"{len(datasets[a])} → {len(datasets[b])}", str(len(members)), ", ".join(ood_tasks) or "none",
                     _f(ood and ood["mean"]), ci(ood), _f(cost and cost["mean"]), ci(cost)])  # fmt: skip
        task_rows += [[a, b, t, "yes" if t in ood_tasks else f"no (new to {a})", f"{e['mean']:+.3f}", ci(e)] for t, e in per_task.items()]
        cost_text = ("in-domain not measured (add `heldout_sources` to `evals`)" if cost is None else
                     f"in-domain cost on {', '.join(sorted(datasets[a]))} held-out text {_ci_text(cost)}")  # fmt: skip
        cover_text = "" if coverage is None else f"; on text in a language {a} never saw ({', '.join(new_language)}) {_ci_text(coverage)}"
        if ood is None:
            lines.append(f"- **{label}**: no raw-text task outside both runs' sources is in a language {a} saw; add one to `evals` "
                         f"(`wikitext2`, `flores_*`, `swahili_nt`); {cost_text}{cover_text}.")  # fmt: skip
            continue
        verdict = {-1: "**the diverse mixture generalises better out of domain**", 1: "**the diverse mixture is worse out of domain**",
                   0: "no clear out-of-domain difference"}[_sign(ood)]  # fmt: skip
        lines.append(f"- **{label}**: {verdict}: out of domain ({', '.join(ood_tasks)}) {b} − {a} = {_ci_text(ood)}; {cost_text}{cover_text}.")
    judged = [c for c in comparisons if c["ood"] is not None and c["ood"]["lo"] is not None]
    better = [c for c in judged if _sign(c["ood"]) < 0]
    costly = [c for c in better if c["in_domain"] is not None and _sign(c["in_domain"]) > 0]
    if not judged:
        head = "**Not a finding**: every comparison has one seed (or no out-of-domain task), so no interval is possible; add seeds."
    else:
        head = (f"H1 (at equal tokens, a more diverse mixture generalises better out of domain): the 95% interval of the "
                f"out-of-domain difference lies below zero in **{len(better)} of {len(judged)}** comparisons with seeds"
                + (f", {len(costly)} of them at a significant in-domain cost." if better else "."))  # fmt: skip
    finding = head + "\n\n" + "\n".join(lines) + ("\n\nOut of domain: mean bits/byte over the raw-text tasks whose corpus neither "
               "run trained on, in a language the narrow run saw; in-domain: mean held-out bits/byte of the narrow run's sources. "
               "Differences are diverse − narrow (negative: the diverse mixture is better), paired by seed at equal model and tokens.")  # fmt: skip
    tables = [Table("Diverse − narrow, paired at equal model, tokens and seed (bits/byte; negative = diverse better)",
                    ["narrow", "diverse", "sources", "pairs", "out-of-domain tasks", "OOD Δ", "OOD 95% CI", "in-domain Δ", "in-domain 95% CI"],
                    rows)]  # fmt: skip
    if task_rows:
        tables.append(Table("Per task outside both runs' sources (bits/byte; tasks in a language new to the narrow run are not in the OOD mean)",
                            ["narrow", "diverse", "task", "in OOD mean", "Δ", "95% CI"], task_rows))  # fmt: skip
    with_ood = [c for c in comparisons if c["ood"] is not None]
    figures = []
    if with_ood:
        nan = {"mean": float("nan"), "lo": None, "hi": None}
        figures.append(_bars_plot("diversity", "Diverse − narrow (bits/byte)", [f"{c['diverse']} − {c['narrow']}" for c in with_ood],
                                  {"out of domain": [c["ood"] for c in with_ood],
                                   "in-domain (narrow's sources)": [c["in_domain"] or nan for c in with_ood]}, "Δ bits/byte"))  # fmt: skip
    data = {"answered": bool(judged), "comparisons": [{k: v for k, v in c.items() if k != "label"} for c in comparisons],
            "datasets": {d: {n: s["weight"] for n, s in src.items()} for d, src in datasets.items()}}  # fmt: skip
    return Section(key, title, finding, tables, figures, data)


def transfer(res: Results, datasets: Composition) -> Section | None:
    """English -> Swahili transfer: runs on Swahili alone against runs on the same Swahili sources plus
    English ones at equal tokens (so less Swahili), by English share: FLORES-200 swh, the Swahili
    sources' held-out text, and the AfriSenti / MasakhaNEWS metrics the study evaluated."""
    key, title = "transfer", "9. English → Swahili transfer"
    langs = {d: {n: s["language"] for n, s in src.items()} for d, src in datasets.items()}
    swahili = {d for d, ls in langs.items() if "sw" in ls.values() and set(ls.values()) <= {"sw", "en"}}
    if not swahili:
        return None  # the study trains on no Swahili
    share = {d: sum(s["weight"] for s in datasets[d].values() if s["language"] == "en") for d in swahili}
    sw_sources = {d: {n for n, lang in langs[d].items() if lang == "sw"} for d in swahili}
    runs = [r for r in res.done() if r.get("dataset") in swahili]
    metrics = {"eval.flores_swh.bpb": "FLORES swh bpb"}
    metrics.update({c: c[5:] for c in res.columns if TRANSFER_DOWNSTREAM.match(c)})
    items: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for g in _pair_groups(runs, "dataset"):
        for base, rb in g.items():
            for other, ro in g.items():
                if share[base] != 0 or share[other] == 0 or sw_sources[other] != sw_sources[base]:
                    continue
                in_cols = [f"eval.heldout_sources.{s}.bpb" for s in sorted(sw_sources[base])]
                values = {**{label: (_num(ro, m), _num(rb, m)) for m, label in metrics.items()},
                          "in-domain Swahili bpb": (_mean_of(ro, in_cols), _mean_of(rb, in_cols))}  # fmt: skip
                for label, (x, y) in values.items():
                    if x is not None and y is not None:
                        items[(base, other)][label].append((x - y, rb["run_id"], ro["run_id"]))
    if not items:
        return _unanswered(key, title, "No two done runs differ only in adding English to the same Swahili sources (same model, "
                                       "tokens and seed); add a Swahili-only mixture and Swahili + English mixtures.")  # fmt: skip
    effects = {pair: {m: _effect(v) for m, v in per.items()} for pair, per in sorted(items.items(), key=lambda kv: (share[kv[0][1]], kv[0]))}
    lines, rows = [], []
    for (base, other), per in effects.items():
        parts = []
        for m, eff in per.items():
            lower = bool(LOWER_IS_BETTER.search(m))
            verdict = {-1 if lower else 1: " (**English helps**)", 1 if lower else -1: " (**English hurts**)"}.get(_sign(eff), "")
            parts.append(f"{m} {_ci_text(eff, 'bits/byte' if lower else '')}{verdict}")
            rows.append([other, base, f"{100 * share[other]:.0f}%", m, str(eff["n_pairs"]), f"{eff['mean']:+.4f}",
                         "—" if eff["lo"] is None else f"{eff['lo']:+.4f} to {eff['hi']:+.4f}"])  # fmt: skip
        lines.append(f"- **{other}** (English {100 * share[other]:.0f}%, Swahili {100 * (1 - share[other]):.0f}% of the tokens) vs "
                     f"**{base}** (Swahili alone): " + "; ".join(parts) + ".")  # fmt: skip
    flores = {pair: per.get("FLORES swh bpb") for pair, per in effects.items()}
    head = ("English added at equal tokens, paired by seed (differences: with English − Swahili alone; bits/byte: lower is "
            "better, accuracy and macro-F1: higher is better). With equal tokens, every English token replaces a Swahili one, "
            "so a gain means transfer outweighs the Swahili data given up.")  # fmt: skip
    if all(e is None or e["lo"] is None for e in flores.values()):
        head += " **Not a finding** for FLORES swh: one seed (or no FLORES result) per comparison."
    table = Table("With English − Swahili alone, paired at equal model, tokens and seed",
                  ["with English", "Swahili alone", "English share", "metric", "pairs", "Δ", "95% CI"], rows)  # fmt: skip
    means = []
    for d in sorted(swahili, key=lambda d: (share[d], d)):
        members = [r for r in runs if r.get("dataset") == d]
        values = [[x for r in members if (x := _num(r, m)) is not None] for m in metrics]
        means.append([d, f"{100 * share[d]:.0f}%", str(len(members)), *[_pm(v) for v in values]])
    table_means = Table("Per dataset (mean ± std over seeds)", ["dataset", "English share", "runs", *metrics.values()], means)
    figures = []
    shown = {pair: e for pair, e in flores.items() if e is not None}
    if shown:
        figures.append(_bars_plot("transfer", "FLORES swh: with English − Swahili alone",
                                  [f"{o} ({100 * share[o]:.0f}% en)" for _, o in shown], {"FLORES swh bpb": list(shown.values())},
                                  "Δ bits/byte"))  # fmt: skip
    data = {"answered": any(e is not None and e["lo"] is not None for e in flores.values()), "english_share": share,
            "comparisons": [{"swahili_only": b, "with_english": o, "english_share": share[o], "effects": per}
                            for (b, o), per in effects.items()]}  # fmt: skip
    return Section(key, title, head + "\n\n" + "\n".join(lines), [table, table_means], figures, data)


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


def write_report(study_dir: str | Path, out_dir: str | Path | None = None, n_boot: int = 200, seed: int = 0) -> Path:
    """Write STUDY_DIR/report/{index.html, report.md, *.png, findings.json} and STUDY_DIR/fits.json.

    `n_boot` and `seed` drive the scaling-law bootstrap. Returns the path of index.html."""
    study_dir = Path(study_dir)
    res = load_results(study_dir)
    name, description = _study_meta(study_dir)
    out = Path(out_dir) if out_dir is not None else study_dir / "report"
    sections = [overview(res, name), data_efficiency(res), tokenizers(res), repetition(res, n_boot, seed), positions(res),
                optimizers(res, study_dir),
                scaling_laws(res, n_boot, seed), efficiency(res), downstream(res), human_eval(study_dir)]  # fmt: skip
    compositions = dataset_compositions(study_dir)
    sections += [diversity(res, compositions), transfer(res, compositions)]
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
