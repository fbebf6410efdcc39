"""Votes -> win rates, Bradley-Terry scores and agreement; written as JSON, Markdown, HTML and a plot.

Conventions (stated again in every output):
- A vote on (A, B) is a win for one side (answers a, b) or no preference (tie, both bad). Win rate =
  (wins + half the no-preference votes) / votes, with a Wilson 95% interval; Bradley-Terry counts a
  no-preference vote as half a win each way, with one virtual tie per system against a fixed anchor
  (so a system that never wins still gets a finite score), and a 95% percentile bootstrap over votes.
- Agreement is over comparisons (prompt + system pair, whatever the shown order), each rater's
  answer made order-free (first system better, second better, tie, both bad): Krippendorff's alpha
  (nominal) over comparisons rated by at least two raters, and Cohen's kappa for every pair of
  raters on the comparisons they share (reported alone as `cohen_kappa` when there are two raters).
- Only invited raters count, identified by rater id (names may repeat). Votes from before invites
  (a database from an older smallscale, rater id NULL) came from whoever typed a name, so one person
  may stand behind many names: they are left out of everything by default, and of the agreement
  statistics always; `include_uninvited` counts them in win rates and Bradley-Terry. The number left
  out is reported.
"""

from __future__ import annotations

import html
import io
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

from smallscale.errors import UserError
from smallscale.humaneval.items import DB_NAME
from smallscale.humaneval.stats import (
    Z95,
    bootstrap_bradley_terry,
    cohen_kappa,
    krippendorff_alpha_nominal,
    wilson_interval,
)
from smallscale.humaneval.store import Vote, read_votes
from smallscale.io import atomic_write_bytes, atomic_write_json, atomic_write_text

DEFAULT_N_BOOT = 1000
BT_PRIOR = 1.0  # virtual ties per system against the anchor
MIN_SHARED_FOR_KAPPA = 2  # comparisons two raters must share for a kappa
LEFT_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "bad": 0.5}  # what the left system scores
OUT_DIR_NAME = "human_eval"


def order_free_answer(vote: Vote) -> str:
    """The answer relative to the sorted system pair: 'first', 'second', 'tie' or 'both bad'."""
    if vote.answer in ("tie", "bad"):
        return "tie" if vote.answer == "tie" else "both bad"
    winner = vote.system_left if vote.answer == "a" else vote.system_right
    return "first" if winner == min(vote.system_left, vote.system_right) else "second"


def agreement(votes: list[Vote]) -> dict:
    """Krippendorff's alpha over comparisons and Cohen's kappa per pair of raters (see module docstring),
    from the invited raters' votes only: the others are skipped here, whatever the caller passes."""
    invited = [v for v in votes if v.invited]
    labels = {v.rater_id: v.rater for v in invited}
    units: dict[tuple[str, str, str], dict[int, str]] = defaultdict(dict)  # comparison -> rater id -> answer
    for v in invited:
        lo, hi = sorted((v.system_left, v.system_right))
        units[v.item_id, lo, hi].setdefault(v.rater_id, order_free_answer(v))
    multi = [unit for unit in units.values() if len(unit) >= 2]
    raters = sorted(labels)
    pairs = []
    for r1, r2 in combinations(raters, 2):
        shared = [unit for unit in multi if r1 in unit and r2 in unit]
        if len(shared) >= MIN_SHARED_FOR_KAPPA:
            kappa = cohen_kappa([u[r1] for u in shared], [u[r2] for u in shared])
            pairs.append({"raters": [labels[r1], labels[r2]], "n_shared": len(shared), "kappa": kappa})
    return {
        "krippendorff_alpha": krippendorff_alpha_nominal([list(unit.values()) for unit in multi]),
        "n_comparisons_multiply_rated": len(multi),
        "n_pairable_values": sum(len(unit) for unit in multi),
        "cohen_kappa": pairs[0]["kappa"] if len(raters) == 2 and pairs else None,
        "kappa_pairs": pairs,
    }


def summarize(votes: list[Vote], n_boot: int = DEFAULT_N_BOOT, seed: int = 0, include_uninvited: bool = False) -> dict | None:
    """Everything `results` reports, as plain JSON-able data; None if no vote counts (see module docstring)."""
    if n_boot < 1:
        raise UserError(f"--n-boot must be >= 1, got {n_boot}")
    n_uninvited = sum(not v.invited for v in votes)
    counted = votes if include_uninvited else [v for v in votes if v.invited]
    if not counted:
        return None
    systems = sorted({v.system_left for v in counted} | {v.system_right for v in counted})
    index = {s: i for i, s in enumerate(systems)}
    first = np.array([index[v.system_left] for v in counted])
    second = np.array([index[v.system_right] for v in counted])
    left_score = np.array([LEFT_SCORE[v.answer] for v in counted])
    scores, resampled = bootstrap_bradley_terry(first, second, left_score, len(systems), n_boot, seed, prior=BT_PRIOR)
    bt_low, bt_high = np.percentile(resampled, [2.5, 97.5], axis=0)

    counts = {s: Counter() for s in systems}  # won / lost / tie / both bad, per system
    pair_counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for v in counted:
        lo, hi = sorted((v.system_left, v.system_right))
        if v.answer in ("tie", "bad"):
            outcome = "tie" if v.answer == "tie" else "both bad"
            counts[lo][outcome] += 1
            counts[hi][outcome] += 1
            pair_counts[lo, hi][outcome] += 1
        else:
            winner, loser = (v.system_left, v.system_right) if v.answer == "a" else (v.system_right, v.system_left)
            counts[winner]["won"] += 1
            counts[loser]["lost"] += 1
            pair_counts[lo, hi]["first won" if winner == lo else "second won"] += 1
    rows = []
    for s in systems:
        c = counts[s]
        n = c["won"] + c["lost"] + c["tie"] + c["both bad"]
        win_rate = (c["won"] + 0.5 * (c["tie"] + c["both bad"])) / n
        i = index[s]
        rows.append({
            "system": s,
            "votes": n,
            "won": c["won"],
            "lost": c["lost"],
            "tie": c["tie"],
            "both_bad": c["both bad"],
            "win_rate": win_rate,
            "win_rate_ci95": list(wilson_interval(win_rate * n, n, Z95)),
            "bt_score": float(scores[i]),
            "bt_ci95": [float(bt_low[i]), float(bt_high[i])],
        })
    rows.sort(key=lambda r: (-r["bt_score"], r["system"]))
    return {
        "n_votes": len(counted),
        "n_raters": len({v.rater_id for v in counted if v.invited}),
        "n_votes_uninvited": n_uninvited,
        "uninvited_counted": include_uninvited,
        "n_items": len({v.item_id for v in counted}),
        "n_comparisons": len({(v.item_id, *sorted((v.system_left, v.system_right))) for v in counted}),
        "n_systems": len(systems),
        "answers": {a: sum(v.answer == a for v in counted) for a in LEFT_SCORE},
        "systems": rows,
        "pairwise": [
            {"first": lo, "second": hi, "first_won": c["first won"], "second_won": c["second won"], "tie": c["tie"], "both_bad": c["both bad"]}
            for (lo, hi), c in sorted(pair_counts.items())
        ],
        "agreement": agreement(votes),
        "method": {
            "win_rate": "(wins + (ties + both bad) / 2) / votes; Wilson 95% interval",
            "bt_score": "Bradley-Terry log-strength, mean 0 over systems, P(i beats j) = 1 / (1 + exp(s_j - s_i)); "
            f"ties and both-bad as half wins; {BT_PRIOR:g} virtual tie per system against a unit-strength anchor; "
            "MM fit (Hunter 2004)",
            "bt_ci95": f"2.5-97.5 percentiles over {n_boot} bootstrap resamples of the votes (seed {seed})",
            "agreement": "per comparison (prompt + system pair), answers as first/second better, tie, both bad; "
            "Krippendorff's alpha (nominal) and Cohen's kappa per rater pair; invited raters only",
            "uninvited": _uninvited_text(n_uninvited, include_uninvited),
            "n_boot": n_boot,
            "seed": seed,
        },
    }


def _uninvited_text(n_uninvited: int, counted: bool) -> str:
    if n_uninvited == 0:
        return "every vote is from an invited rater"
    where = "counted in win rates and Bradley-Terry scores but left out of agreement" if counted else "left out of every number"
    return f"{n_uninvited} vote(s) from before rater invites (no rater id: whoever typed a name) are {where}"


def load_summary(study_dir: str | Path) -> dict | None:
    """The human-eval summary of a study (default settings: invited raters only), or None without a
    vote database or votes from invited raters."""
    db = Path(study_dir) / DB_NAME
    if not db.is_file():
        return None
    return summarize(read_votes(db))


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _fmt3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


TABLE_HEADER = ("system", "votes", "win rate [95% CI]", "BT score [95% CI]", "won", "lost", "tie", "both bad")


def _table_rows(summary: dict) -> list[tuple[str, ...]]:
    rows = []
    for r in summary["systems"]:
        win_rate = f"{_fmt(r['win_rate'])} [{_fmt(r['win_rate_ci95'][0])}, {_fmt(r['win_rate_ci95'][1])}]"
        bt = f"{_fmt(r['bt_score'], True)} [{_fmt(r['bt_ci95'][0], True)}, {_fmt(r['bt_ci95'][1], True)}]"
        counts = (str(r[key]) for key in ("won", "lost", "tie", "both_bad"))
        rows.append((r["system"], str(r["votes"]), win_rate, bt, *counts))
    return rows


def _counts_line(summary: dict) -> str:
    uninvited = summary["n_votes_uninvited"]
    of_them = f" ({uninvited} from before invites)" if summary["uninvited_counted"] and uninvited else ""
    return (
        f"{summary['n_votes']} votes{of_them} from {summary['n_raters']} invited rater(s) on {summary['n_items']} prompt(s) "
        f"({summary['n_comparisons']} distinct comparisons of {summary['n_systems']} systems)."
    )


def _intro_lines(summary: dict) -> list[str]:
    """The counts, and what happened to votes from before invites if there are any."""
    lines = [_counts_line(summary)]
    if summary["n_votes_uninvited"]:
        lines.append(summary["method"]["uninvited"] + ".")
    return lines


def _agreement_lines(summary: dict) -> list[str]:
    agree = summary["agreement"]
    alpha = _fmt3(agree["krippendorff_alpha"])
    n_multi = agree["n_comparisons_multiply_rated"]
    lines = [f"Krippendorff's α (nominal): {alpha} over {n_multi} comparison(s) rated by two or more raters."]
    if agree["cohen_kappa"] is not None:
        pair = agree["kappa_pairs"][0]
        lines.append(f"Cohen's κ ({pair['raters'][0]} vs {pair['raters'][1]}): {_fmt3(pair['kappa'])} on {pair['n_shared']} shared comparisons.")
    elif agree["kappa_pairs"]:
        shown = ", ".join(f"{p['raters'][0]}–{p['raters'][1]} {_fmt3(p['kappa'])} (n={p['n_shared']})" for p in agree["kappa_pairs"][:10])
        more = f" and {len(agree['kappa_pairs']) - 10} more pairs" if len(agree["kappa_pairs"]) > 10 else ""
        lines.append(f"Cohen's κ per rater pair: {shown}{more}.")
    else:
        lines.append(f"Cohen's κ: n/a (no two raters share {MIN_SHARED_FOR_KAPPA} or more comparisons).")
    return lines


def _method_line(summary: dict) -> str:
    return (
        "Win rate counts ties and both-bad as half a win (Wilson 95% interval). BT score: Bradley–Terry log-strength, "
        "mean 0, P(i beats j) = 1 / (1 + exp(s_j − s_i)), ties as half wins, 95% bootstrap interval over votes "
        f"({summary['method']['n_boot']} resamples, seed {summary['method']['seed']})."
    )


def summary_markdown(summary: dict) -> str:
    """A Markdown section body: counts, the per-system table, agreement, and how to read them."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [*_intro_lines(summary), "", "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in _table_rows(summary)]
    lines += ["", *_agreement_lines(summary), "", _method_line(summary), ""]
    return "\n".join(lines)


def summary_html(summary: dict, plot_name: str | None) -> str:
    """A standalone HTML page with the same content as the Markdown (all text escaped)."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _table_rows(summary))
    paragraphs = "".join(f"<p>{esc(line)}</p>" for line in _agreement_lines(summary))
    plot = f'<p><img src="{esc(plot_name)}" alt="win rates and Bradley-Terry scores"></p>' if plot_name else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Human evaluation</title>'
        "<style>body{font:15px/1.5 system-ui,sans-serif;margin:2rem}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}td:first-child{text-align:left}</style>"
        f"</head><body><h1>Human evaluation</h1>{''.join(f'<p>{esc(line)}</p>' for line in _intro_lines(summary))}"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{paragraphs}"
        f"<p>{esc(_method_line(summary))}</p>{plot}</body></html>\n"
    )


def plot_png(summary: dict) -> bytes:
    """Win rates and BT scores with their 95% intervals, one row per system (best at the top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["systems"][::-1]
    names = [r["system"] for r in rows]
    y = np.arange(len(rows))
    fig, (ax_win, ax_bt) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.45 * len(rows)), sharey=True)
    for ax, key, ci_key, ref, label in (
        (ax_win, "win_rate", "win_rate_ci95", 0.5, "win rate (ties = half), Wilson 95% CI"),
        (ax_bt, "bt_score", "bt_ci95", 0.0, "Bradley–Terry score, bootstrap 95% CI"),
    ):
        values = np.array([r[key] for r in rows])
        low = np.array([r[ci_key][0] for r in rows])
        high = np.array([r[ci_key][1] for r in rows])
        ax.errorbar(values, y, xerr=[values - low, high - values], fmt="o", capsize=4)
        ax.axvline(ref, color="0.7", lw=1, ls="--")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    ax_win.set_xlim(0, 1)
    ax_win.set_yticks(y, names)
    fig.suptitle(_counts_line(summary), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_results(summary: dict, out_dir: str | Path) -> list[Path]:
    """results.json, results.md, results.html and results.png in out_dir, each written atomically."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"results.{ext}" for ext in ("json", "md", "html", "png")]
    atomic_write_json(paths[0], summary)
    atomic_write_text(paths[1], "# Human evaluation\n\n" + summary_markdown(summary))
    atomic_write_text(paths[2], summary_html(summary, paths[3].name))
    atomic_write_bytes(paths[3], plot_png(summary))
    return paths


def resolve_db(path: str | Path) -> tuple[Path, Path]:
    """(vote database, default output folder) for a study dir or a database file."""
    path = Path(path)
    if path.is_dir():
        db = path / DB_NAME
        if not db.is_file():
            raise UserError(f"{str(path)!r} has no {DB_NAME}; collect votes with `smallscale human-eval serve {path}` first")
        return db, path / OUT_DIR_NAME
    if path.is_file():
        return path, path.parent / OUT_DIR_NAME
    raise UserError(f"{str(path)!r} does not exist; give a study dir or a {DB_NAME} file")


def results_for(path: str | Path, out: str | Path | None, n_boot: int, seed: int, include_uninvited: bool = False) -> tuple[dict, list[Path]]:
    """Summarize the votes behind `path` and write the result files; UserError without votes that count."""
    db, default_out = resolve_db(path)
    votes = read_votes(db)
    summary = summarize(votes, n_boot=n_boot, seed=seed, include_uninvited=include_uninvited)
    if summary is None and votes:
        raise UserError(
            f"{str(db)!r} has {len(votes)} vote(s), all from before rater invites (no rater id), which results leave out; "
            "add --include-uninvited to count them in win rates and Bradley-Terry scores"
        )
    if summary is None:
        raise UserError(f"{str(db)!r} has no votes yet; invite raters with `smallscale human-eval invite` and collect some with `serve`")
    return summary, write_results(summary, out if out is not None else default_out)
