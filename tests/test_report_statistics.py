"""Reviewer-grade statistics in the study report: paired comparisons (n, interval, p, whether the
interval excludes zero; one seed is not a finding), Benjamini–Hochberg across a section's contrasts,
the regime line, optimizer comparisons only with tuned learning rates, and downstream metrics with
declared directions and roles, accuracies against chance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from smallscale.study.report import (
    ONE_SEED,
    accuracy_interval,
    compare,
    downstream,
    fdr,
    load_results,
    lr_sweeps,
    metric_role,
    optimizers,
    positions,
)
from tests.test_report import make_run, write_study


# ----------------------------------------------------------------------------- compare
def test_one_pair_has_no_interval_and_is_not_a_finding():
    one = compare([0.03])
    assert (one["n"], one["mean"], one["lo"], one["hi"], one["p"], one["excludes_zero"]) == (1, 0.03, None, None, None, None)
    assert one["note"] == ONE_SEED == "one seed — not a finding"


def test_few_pairs_get_a_student_t_interval_and_its_p():
    c = compare([0.01, 0.02, 0.06])
    half = stats.t.ppf(0.975, 2) * np.std([0.01, 0.02, 0.06], ddof=1) / math.sqrt(3)
    assert c["mean"] == pytest.approx(0.03) and (c["lo"], c["hi"]) == pytest.approx((0.03 - half, 0.03 + half))
    assert c["p"] == pytest.approx(stats.ttest_1samp([0.01, 0.02, 0.06], 0.0).pvalue)
    assert c["excludes_zero"] is False and c["method"] == "Student-t over 3 pairs"  # half-width 0.066 > 0.03
    assert compare([0.05, 0.051, 0.049])["excludes_zero"] is True


def test_many_pairs_get_a_bootstrap_interval_close_to_the_t_interval():
    x = np.random.default_rng(0).normal(0.1, 0.2, 200)
    c = compare(x.tolist())
    half = 1.96 * x.std(ddof=1) / math.sqrt(200)
    assert c["method"] == "bootstrap over 200 pairs"
    assert c["lo"] == pytest.approx(x.mean() - half, abs=0.01) and c["hi"] == pytest.approx(x.mean() + half, abs=0.01)
    assert c["excludes_zero"] and c["p"] < 0.01


# ----------------------------------------------------------------------------- Benjamini–Hochberg
def test_fdr_matches_hand_computed_benjamini_hochberg():
    # sorted p 0.01, 0.03, 0.04 -> p·m/rank 0.03, 0.045, 0.04 -> monotone from the top: 0.03, 0.04, 0.04
    effects = [{"p": 0.01}, {"p": 0.04}, {"p": 0.03}, {"p": None}]
    assert fdr(effects) == 3
    assert [e.get("q") for e in effects] == pytest.approx([0.03, 0.04, 0.04, None])
    assert all(e["fdr_m"] == 3 for e in effects[:3]) and "q" not in effects[3]


def test_fdr_rejects_what_the_benjamini_hochberg_paper_rejects():
    # Benjamini & Hochberg (1995), section 4: 15 p-values, q = 0.05 rejects the four smallest.
    p = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719, 0.6528, 0.7590, 1.0]
    effects = [{"p": x} for x in p]
    fdr(effects)
    assert [e["q"] <= 0.05 for e in effects] == [True] * 4 + [False] * 11


def planted_differences(mean: float, p: float) -> list[float]:
    """Three paired differences with this mean whose one-sample t-test gives exactly this p."""
    spread = mean * math.sqrt(3) / stats.t.isf(p / 2, 2)  # the std of (-a, 0, +a) is a
    return [mean - spread, mean, mean + spread]


def position_study(tmp_path, deltas: dict[str, list[float]], steps: float = 500.0):
    rows = []
    for seed in range(3):
        rows.append(make_run("m", 8e6, seed=seed, steps=steps))
        for position, values in deltas.items():
            rows.append(make_run("m", 8e6, position=position, seed=seed, delta_bpb=values[seed], steps=steps))
    return load_results(write_study(tmp_path / "study", rows))


def test_a_section_with_several_contrasts_controls_the_false_discovery_rate(tmp_path):
    # alibi alone would be a finding (p = 0.04); among three contrasts BH raises its q to 0.06.
    res = position_study(tmp_path, {"learned": planted_differences(0.05, 0.001), "alibi": planted_differences(0.02, 0.04),
                                    "nope": planted_differences(0.01, 0.5)})  # fmt: skip
    section = positions(res)
    alibi, learned = section.data["effects"]["alibi"], section.data["effects"]["learned"]
    assert alibi["p"] == pytest.approx(0.04) and alibi["excludes_zero"] and alibi["q"] == pytest.approx(0.06)
    assert learned["q"] == pytest.approx(0.003)
    assert "**rope beats learned by 0.050 bits/byte**" in section.finding_md
    assert "**Not a finding after the false-discovery control**: alibi − rope = +0.020 bits/byte" in section.finding_md
    assert "the 3 contrasts of this section are controlled together (Benjamini–Hochberg" in section.finding_md
    assert "**No clear difference between nope and rope**" in section.finding_md


def test_every_comparison_states_n_its_interval_and_whether_it_excludes_zero(tmp_path):
    section = positions(position_study(tmp_path, {"learned": planted_differences(0.05, 0.001)}))
    lo, hi = section.data["effects"]["learned"]["lo"], section.data["effects"]["learned"]["hi"]
    assert f"learned − rope = +0.050 bits/byte (95% CI {lo:+.3f} to {hi:+.3f}, n = 3 pairs, excludes 0)" in section.finding_md
    assert "Benjamini" not in section.finding_md  # one contrast: nothing to control


# ----------------------------------------------------------------------------- regime
def test_the_regime_is_named_and_short_runs_are_warned_about(tmp_path):
    short = positions(position_study(tmp_path / "short", {"learned": planted_differences(0.05, 0.001)}, steps=48))
    assert "Regime: 2 training tokens per parameter, 48 optimizer steps (6 runs)." in short.finding_md
    assert "**Warning: early training** — runs of fewer than 200 optimizer steps (as few as 48)" in short.finding_md
    assert short.data["regime"] == {"tokens_per_param": [2.0, 2.0], "steps": [48.0, 48.0], "early_training": True, "min_steps": 200}
    long = positions(position_study(tmp_path / "long", {"learned": planted_differences(0.05, 0.001)}, steps=2000))
    assert "2000 optimizer steps" in long.finding_md and "Warning" not in long.finding_md


# ----------------------------------------------------------------------------- optimizers and their lrs
def optimizer_study(tmp_path, lion_lrs: dict[float, float]):
    """adamw swept at 5e-4, 1e-3 (best), 2e-3; lion at `lion_lrs` (lr -> val_bpb offset), 3 seeds at its best lr."""
    rows = []
    for lr, worse in ((5e-4, 0.04), (1e-3, 0.0), (2e-3, 0.03)):
        rows.append(make_run("l", 8e6, lr=lr, delta_bpb=worse))
    best = min(lion_lrs, key=lion_lrs.get)
    for lr, worse in lion_lrs.items():
        if lr != best:
            rows.append(make_run("l", 8e6, optimizer="lion", lr=lr, delta_bpb=worse))
    for seed in range(3):
        if seed:
            rows.append(make_run("l", 8e6, seed=seed, lr=1e-3))
        rows.append(make_run("l", 8e6, optimizer="lion", seed=seed, lr=best, delta_bpb=-0.03 + 0.002 * (seed - 1)))
    for r in rows:
        r["run_id"] = f"{r['run_id']}-lr{r['lr']:g}"
    return write_study(tmp_path / "study", rows)


def test_lr_sweeps_are_found_with_where_the_best_lr_lies(tmp_path):
    res = load_results(optimizer_study(tmp_path, {1e-4: 0.05, 3e-4: 0.0}))
    sweeps = lr_sweeps(res.done("val_bpb"))
    adamw = next(s for s in sweeps["adamw"] if len(s["lrs"]) == 3)
    assert adamw["lrs"] == [5e-4, 1e-3, 2e-3] and adamw["best_lr"] == 1e-3 and adamw["edge"] is None
    assert [(s["lrs"], s["best_lr"], s["edge"]) for s in sweeps["lion"]] == [([1e-4, 3e-4], 3e-4, "high")]


def test_an_optimizer_whose_best_lr_is_at_the_edge_of_its_sweep_is_not_a_finding(tmp_path):
    study = optimizer_study(tmp_path, {1e-4: 0.05, 3e-4: 0.0})
    section = optimizers(load_results(study), study)
    lion = section.data["effects"]["lion"]
    assert lion["n_pairs"] == 3 and lion["mean"] == pytest.approx(-0.03) and lion["excludes_zero"]
    assert "lion − adamw = -0.030 bits/byte" in section.finding_md
    assert "**not a finding** (lion: best lr 0.0003 at the high edge of its sweep (0.0001, 0.0003): the optimum may lie higher)" in section.finding_md
    assert "beats" not in section.finding_md


def test_optimizers_tuned_inside_their_sweeps_give_a_finding(tmp_path):
    study = optimizer_study(tmp_path, {1e-4: 0.05, 3e-4: 0.0, 1e-3: 0.02})
    section = optimizers(load_results(study), study)
    assert "**lion beats adamw by 0.030 bits/byte**" in section.finding_md
    assert section.data["lr_tuning"] == {"adamw": None, "lion": None}


def test_an_optimizer_comparison_without_an_lr_sweep_says_lr_not_tuned(tmp_path):
    rows = [make_run("l", 8e6, seed=s) for s in range(3)] + [make_run("l", 8e6, optimizer="lion", seed=s, delta_bpb=-0.03 + 0.001 * s) for s in range(3)]
    study = write_study(tmp_path / "study", rows)
    section = optimizers(load_results(study), study)
    assert "**not a finding** (lr not tuned in this study for adamw, lion)" in section.finding_md


# ----------------------------------------------------------------------------- downstream
@pytest.mark.parametrize(("column", "direction", "role"), [
    ("eval.blimp.acc", "higher", "quality"), ("eval.hellaswag.acc_norm", "higher", "quality"),
    ("eval.heldout.bpb", "lower", "quality"), ("eval.length_extrapolation.bpb_4x", "lower", "quality"),
    ("eval.generation.chrf", "higher", "quality"), ("eval.blimp.n_sentences", "none", "count"),
    ("eval.generation.n_eligible", "none", "count"), ("eval.blimp.n", "none", "count"),
    ("eval.generation.eos_probability", "none", "diagnostic"), ("eval.generation.distinct_2", "none", "diagnostic"),
    ("eval.hellaswag.acc_stderr", "none", "diagnostic"), ("eval.hellaswag.chance", "none", "diagnostic"),
    ("eval.mystery.score", "none", "diagnostic"),
])  # fmt: skip
def test_every_metric_declares_its_direction_and_role(column, direction, role):
    assert metric_role(column)[:2] == (direction, role)


def test_accuracy_interval_is_wilson():
    lo, hi = accuracy_interval(0.6, 100)  # Wilson: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z = stats.norm.ppf(0.975)
    centre, half = (0.6 + z**2 / 200) / (1 + z**2 / 100), z * math.sqrt(0.24 / 100 + z**2 / 40000) / (1 + z**2 / 100)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))


def test_downstream_ranks_quality_only_and_shows_accuracies_against_chance(tmp_path):
    rows = []
    for preset, blimp, hellaswag in (("s", 0.51, 0.26), ("m", 0.58, 0.40)):
        rows.append(make_run(preset, 8e6, steps=1000, **{"eval.blimp.acc": blimp, "eval.blimp.n": 670, "eval.blimp.n_sentences": 1340,
                                                         "eval.hellaswag.acc_norm": hellaswag, "eval.hellaswag.n": 500,
                                                         "eval.hellaswag.chance": 0.25, "eval.generation.eos_probability": 0.1}))  # fmt: skip
    section = downstream(load_results(write_study(tmp_path / "study", rows)))
    finding = section.finding_md
    assert "`blimp.acc` (higher is better" in finding and "best m (4M) at 8M tokens" in finding
    assert "`blimp.n_sentences`" not in finding.split("Diagnostics")[0]  # a count is never ranked
    assert "`blimp.n`, `blimp.n_sentences`, `hellaswag.n` (how many examples" in finding and "`generation.eos_probability`" in finding
    groups = {g["size"]: g["metrics"] for g in section.data["groups"]}
    assert groups["s (1M)"]["blimp.acc"]["verdict"] == "at chance"  # 0.51 over 670 pairs: 0.47-0.55
    assert groups["m (4M)"]["blimp.acc"]["verdict"] == "above chance"
    assert groups["s (1M)"]["hellaswag.acc_norm"]["chance"] == 0.25 and groups["s (1M)"]["hellaswag.acc_norm"]["verdict"] == "at chance"
    assert "**At chance** (the interval covers 0.5): 1 of 2 groups." in finding
    chance = next(t for t in section.tables if t.caption.startswith("Accuracies against chance"))
    assert ["s (1M)", "8M", "reference", "blimp.acc", "1", "0.510", "0.473–0.548", "670", "0.5", "at chance"] in chance.rows


def test_the_smaller_beats_larger_case_with_one_seed_is_not_a_finding(tmp_path):
    rows = [make_run("m", 2e6), make_run("l", 2e6, delta_bpb=0.1)]
    from smallscale.study.report import data_efficiency

    section = data_efficiency(load_results(write_study(tmp_path / "study", rows)))
    assert "m (4M) beats the larger l (16M)" in section.finding_md and "1 and 1 seeds: one seed — not a finding" in section.finding_md
    assert "**At" not in section.finding_md
