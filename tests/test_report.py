"""Study report: a synthetic study with planted effects, and the report must find each of them.

Planted: val_loss from L(N, D) = 1.8 + 40/N^0.34 + 60/D^0.28 (nats, 4 bytes per token) on 3 sizes
x 3 data sizes; the largest model undertrained at the smallest budget (+0.15 nats), so the middle
one beats it; learned positions worse than rope by exactly 0.05 bits/byte on 3 seeds; lion ahead of
adamw (faster curves, -0.03 bits/byte, half the optimizer state); fp32 at half the bf16 throughput;
one failed run whose id and error carry HTML.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest

from smallscale.errors import UserError
from smallscale.study.report import write_report

SIZES = {"s": (1e6, 2, 64), "m": (4e6, 4, 128), "l": (16e6, 8, 256)}  # preset: params, n_layer, d_model
BUDGETS = (2e6, 8e6, 32e6)
BYTES_PER_TOKEN = 4.0
FAILED_ID = "xl-32M-<i>"
FAILED_ERROR = "CUDA out of memory <script>alert(1)</script>"


def law(n: float, d: float) -> float:
    return 1.8 + 40 / n**0.34 + 60 / d**0.28


def bpb(loss: float) -> float:
    return loss / (math.log(2) * BYTES_PER_TOKEN)


def make_run(preset, tokens, *, position="rope", optimizer="adamw", precision="bf16", seed=0, delta_bpb=0.0, **extra):
    params, n_layer, d_model = SIZES[preset]
    loss = law(params, tokens) + (0.15 if (preset, tokens) == ("l", 2e6) else 0.0) + 0.003 * seed
    loss += delta_bpb * math.log(2) * BYTES_PER_TOKEN
    rate = 2e5 / params * 1e6 * (0.5 if precision == "fp32" else 1.0)
    row = {
        "run_id": f"{preset}-{tokens / 1e6:g}M-{position}-{optimizer}-{precision}-s{seed}", "status": "done", "error": "",
        "axis.model": preset, "axis.tokens": tokens, "axis.seed": seed,
        "dataset": "synth", "tokenizer": "bpe", "preset": preset, "n_layer": n_layer, "d_model": d_model, "n_head": n_layer,
        "seq_len": 256, "position": position, "optimizer": optimizer, "lr": 3e-4 if optimizer == "lion" else 1e-3,
        "schedule": "cosine", "precision": precision, "grad_checkpointing": "false", "compile": 0, "seed": seed,
        "token_budget": tokens, "train_tokens": tokens,
        "params": params, "non_embedding_params": params * 0.8, "tokens_seen": tokens, "flops": 6 * params * tokens,
        "epochs": 1.0, "val_loss": loss, "val_bpb": bpb(loss), "val_ppl": math.exp(loss), "wall_s": tokens / rate,
        "tokens_per_s": rate, "mfu": 0.3, "peak_mem_bytes": params * 40 * (1.6 if precision == "fp32" else 1.0),
        "optimizer_state_bytes": params * (4 if optimizer == "lion" else 8), "energy_j": 300 * tokens / rate,
        "gpu_util": 0.9, "device": "NVIDIA H100", "eval.heldout.bpb": bpb(loss),
        "eval.blimp.accuracy": 0.5 + 0.1 * math.log10(params / 1e5),
    }  # fmt: skip
    row.update(extra)
    return row


def write_curve(run_dir: Path, final_loss: float, tau: float, final_bpb: float) -> None:
    records = []
    for i in range(1, 41):
        tokens = 8e6 * i / 40
        wiggle = 0.01 * math.sin(7 * i)
        records.append({"step": i, "tokens": tokens, "loss": final_loss + 2.5 * math.exp(-tokens / tau) + wiggle, "lr": 1e-3})
        if i % 10 == 0:
            records.append({"step": i, "tokens": tokens, "loss": records[-1]["loss"], "val_loss": final_loss,
                            "val_bpb": final_bpb + 0.2 * math.exp(-tokens / tau), "val_ppl": 1.0})  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in records) + '\n{"step": 41, "tok'  # a killed run's partial last line
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")


def write_study(root: Path, rows: list[dict], name: str = "synthetic") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.yaml").write_text(f"name: {name}\ndescription: A study with planted effects.\n", encoding="utf-8")
    manifest = {"name": name, "runs": [{"id": r["run_id"], "axes": {k[5:]: v for k, v in r.items() if k.startswith("axis.")},
                                        "config": {}, "evals": ["heldout", "blimp"]} for r in rows]}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (root / "results.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if r.get(k) is None else r[k] for k in columns} for r in rows)
    return root


def synthetic_rows() -> list[dict]:
    rows = [make_run(p, d) for p in SIZES for d in BUDGETS]
    for seed, noise in zip((0, 1, 2), (0.002, -0.001, -0.001)):  # learned = rope + 0.05 exactly on average
        rope = next((r for r in rows if r["run_id"] == f"m-8M-rope-adamw-bf16-s{seed}"), None)
        if rope is None:
            rope = make_run("m", 8e6, seed=seed)
            rows.append(rope)
        learned = make_run("m", 8e6, position="learned", seed=seed, delta_bpb=0.05 + noise)
        rope.update({"eval.length_extrapolation.bpb_1x": rope["val_bpb"], "eval.length_extrapolation.bpb_2x": rope["val_bpb"] + 0.02,
                     "eval.length_extrapolation.bpb_4x": rope["val_bpb"] + 0.06})  # fmt: skip
        learned["eval.length_extrapolation.bpb_1x"] = learned["val_bpb"]
        rows.append(learned)
    rows.append(make_run("l", 8e6, seed=1))
    rows += [make_run("l", 8e6, optimizer="lion", seed=s, delta_bpb=-0.03) for s in (0, 1)]
    rows += [make_run(p, 2e6, precision="fp32") for p in ("s", "m")]
    rows.append({"run_id": FAILED_ID, "status": "failed", "error": FAILED_ERROR, "preset": "xl", "axis.model": "xl"})
    return rows


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = write_study(tmp_path_factory.mktemp("report") / "study", synthetic_rows())
    for row in synthetic_rows():
        if row["preset"] == "l" and row["train_tokens"] == 8e6 and row["precision"] == "bf16":
            tau = 1.0e6 if row["optimizer"] == "lion" else 1.5e6
            write_curve(root / "runs" / row["run_id"], row["val_loss"], tau, row["val_bpb"])
    write_report(root, n_boot=4, seed=0)  # the scaling bootstrap costs ~0.6 s per resample
    return root


@pytest.fixture(scope="module")
def findings(study) -> dict:
    return json.loads((study / "report" / "findings.json").read_text(encoding="utf-8"))


def test_report_files_are_written_and_html_is_self_contained(study):
    report = study / "report"
    html = (report / "index.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert {"data_efficiency.png", "positions.png", "length_extrapolation.png", "optimizers.png", "optimizer_curves.png", "scaling.png"} <= set(pngs)
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)|url\(|@import|<script""", html, re.I)
    markdown = (report / "report.md").read_text(encoding="utf-8")
    assert all(f"]({name})" in markdown for name in pngs)
    assert (study / "fits.json").is_file()


def test_position_effect_is_recovered_with_its_interval(findings):
    pos = findings["positions"]
    assert pos["baseline"] == "rope"
    effect = pos["effects"]["learned"]
    assert effect["n_pairs"] == 3
    assert effect["mean"] == pytest.approx(0.05, abs=1e-9)
    assert effect["lo"] < 0.05 < effect["hi"] and effect["hi"] - effect["lo"] < 0.02
    assert "**rope beats learned by 0.050 bits/byte**: learned − rope = +0.050 bits/byte (95% CI" in pos["finding"]
    assert "n = 3 pairs, excludes 0)" in pos["finding"]
    assert pos["length_extrapolation"]["learned"]["4x"] is None
    assert pos["length_extrapolation"]["rope"]["4x"] - pos["length_extrapolation"]["rope"]["1x"] == pytest.approx(0.06)


def test_the_planted_smaller_beats_larger_case_is_stated(findings):
    cases = findings["data_efficiency"]["smaller_beats_larger"]
    assert [(c["smaller"], c["larger"], c["tokens"]) for c in cases] == [("m (4M)", "l (16M)", 2e6)]
    assert "m (4M) beats the larger l (16M) by " in findings["data_efficiency"]["finding"]
    assert "1 and 1 seeds: one seed — not a finding" in findings["data_efficiency"]["finding"]  # the planted case has one seed
    assert findings["data_efficiency"]["reference"]["position"] == "rope"


def test_lion_beats_adamw_on_loss_speed_and_memory(findings):
    opt = findings["optimizers"]
    assert opt["baseline"] == "adamw"
    assert opt["effects"]["lion"]["n_pairs"] == 2
    assert opt["effects"]["lion"]["mean"] == pytest.approx(-0.03, abs=1e-9)
    assert opt["tokens_to_target"]["lion"]["mean"] < 0.9  # planted: lion's curve decays 1.5x faster
    assert opt["memory"]["adamw"]["bytes_per_param"] == pytest.approx(8)
    assert opt["memory"]["lion"]["bytes_per_param"] == pytest.approx(4)
    # no lr sweep in the study: the planted advantage is reported, but not as a finding
    assert opt["lr_tuning"] == {"adamw": "lr not tuned in this study", "lion": "lr not tuned in this study"}
    assert "**not a finding** (lr not tuned in this study for adamw, lion)" in opt["finding"]


def test_scaling_fit_has_intervals_and_is_written_to_fits_json(study, findings):
    fits = json.loads((study / "fits.json").read_text(encoding="utf-8"))
    assert fits["method"] == "chinchilla" and fits == findings["scaling"]
    for name, planted in (("alpha", 0.34), ("beta", 0.28)):
        interval = fits["intervals"][name]
        assert interval["lo"] <= fits["fit"][name] <= interval["hi"]
        assert fits["fit"][name] == pytest.approx(planted, abs=0.1)  # Huber fit ignores the planted outlier
    assert len(fits["compute_optimal"]["N_opt_estimate"]) == len(fits["compute_optimal"]["C"])


def test_efficiency_pairs_precision_and_says_co2_was_not_measured_without_codecarbon(findings):
    eff = findings["efficiency"]
    assert eff["precision"]["baseline"] == "fp32"
    assert eff["precision"]["tokens_per_s"]["bf16"]["mean"] == pytest.approx(2.0)
    assert eff["precision"]["peak_mem_bytes"]["bf16"]["mean"] == pytest.approx(1 / 1.6)
    # the planted runs have the NVML GPU counter (energy_j) but no CodeCarbon figures: no CO2 is invented
    assert "CO2 was not measured (no run has CodeCarbon figures" in eff["finding"] and eff["total_co2_kg"] is None
    assert "activation checkpointing: no runs differ only in `grad_checkpointing`" in eff["finding"].lower()


def test_downstream_table_has_every_eval_column(findings):
    groups = findings["downstream"]["groups"]
    assert {"heldout.bpb", "blimp.accuracy", "length_extrapolation.bpb_4x"} <= {k for g in groups for k in g["metrics"]}
    learned = next(g for g in groups if g["variant"] == "position=learned")
    assert learned["n_seeds"] == 3 and learned["metrics"]["blimp.accuracy"]["std"] == 0.0


def test_failed_run_is_listed_and_untrusted_text_is_escaped(study, findings):
    assert findings["overview"]["by_status"] == {"done": 19, "failed": 1}
    assert findings["overview"]["failed"] == [{"run_id": FAILED_ID, "error": FAILED_ERROR}]
    html = (study / "report" / "index.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "xl-32M-&lt;i&gt;" in html and "<i>" not in html
    assert "<script>" not in (study / "report" / "report.md").read_text(encoding="utf-8")


def test_questions_the_study_cannot_answer_say_so(tmp_path):
    root = write_study(tmp_path / "small", [make_run("s", 2e6), make_run("m", 2e6)])
    write_report(root, n_boot=5)
    found = json.loads((root / "report" / "findings.json").read_text(encoding="utf-8"))
    assert found["data_efficiency"]["answered"] and not found["data_efficiency"]["smaller_beats_larger"]
    for key, phrase in (("positions", "does not vary `position`"), ("optimizers", "does not vary `optimizer`"),
                        ("scaling", "Too few points"), ("human_eval", "no human evaluation")):  # fmt: skip
        assert not found[key]["answered"]
        assert phrase.lower() in found[key]["finding"].lower()
    assert "Not answered by this study" in (root / "report" / "index.html").read_text(encoding="utf-8")


def test_human_eval_summary_is_rendered_as_a_safe_table(tmp_path, monkeypatch):
    root = write_study(tmp_path / "he", [make_run("s", 2e6)])
    (root / "human_eval.sqlite").write_bytes(b"")
    fake = types.ModuleType("smallscale.humaneval.results")
    fake.load_summary = lambda study_dir: {"votes": 3}
    fake.summary_markdown = lambda summary: "Win rates:\n\n| model | wins |\n|---|---|\n| <b>a</b> | 3 |"
    monkeypatch.setitem(sys.modules, "smallscale.humaneval", types.ModuleType("smallscale.humaneval"))
    monkeypatch.setitem(sys.modules, "smallscale.humaneval.results", fake)
    html = write_report(root, n_boot=5).read_text(encoding="utf-8")
    assert "<td>&lt;b&gt;a&lt;/b&gt;</td><td>3</td>" in html
    assert json.loads((root / "report" / "findings.json").read_text())["human_eval"]["summary"] == {"votes": 3}


def test_a_folder_without_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a study directory"):
        write_report(tmp_path)
    (tmp_path / "study.yaml").write_text("name: x\n", encoding="utf-8")
    with pytest.raises(UserError, match="no results table"):
        write_report(tmp_path)


def test_a_single_pair_reports_its_difference_without_an_interval(tmp_path):
    rows = [make_run("s", 2e6), make_run("s", 2e6, position="alibi", delta_bpb=-0.02), make_run("m", 2e6)]
    write_report(write_study(tmp_path / "one", rows), n_boot=5)
    pos = json.loads((tmp_path / "one" / "report" / "findings.json").read_text(encoding="utf-8"))["positions"]
    assert pos["effects"]["alibi"]["n_pairs"] == 1 and pos["effects"]["alibi"]["lo"] is None
    assert "alibi − rope = -0.020 bits/byte (n = 1 pair: one seed — not a finding)." in pos["finding"]
    assert "beats" not in pos["finding"]


def test_without_a_joint_grid_the_report_fits_one_variable_power_laws(tmp_path):
    root = write_study(tmp_path / "d", [make_run("m", d) for d in (1e6, 2e6, 8e6, 32e6)])
    write_report(root, n_boot=2)
    fits = json.loads((root / "fits.json").read_text(encoding="utf-8"))
    assert fits["method"] == "power_laws" and [f["x"] for f in fits["power_laws"]] == ["tokens_seen"]
    assert fits["power_laws"][0]["fit"]["alpha"] == pytest.approx(0.28, abs=0.01)  # the planted beta
    assert "L(D) at 4M params: **α = 0.280" in fits["finding"]


def test_tokenizer_section_pairs_bpe_and_unigram_with_fertility(tmp_path):
    # Unigram planted 0.02 bits/byte worse than BPE on every size, with higher fertility; the
    # datasets differ by name (one per tokenizer), which must not break the pairing.
    rows = []
    for preset in ("s", "m"):
        for seed in (0, 1):
            rows.append(make_run(preset, 8e6, seed=seed, dataset="sw-bpe", fertility=1.4, **{"eval.flores_swh.bpb": 2.0}))
            uni = make_run(preset, 8e6, seed=seed, dataset="sw-unigram", tokenizer="unigram", fertility=1.6,
                           delta_bpb=0.02 + 0.001 * seed, **{"eval.flores_swh.bpb": 2.1})  # fmt: skip
            uni["run_id"] += "-unigram"
            rows.append(uni)
    root = write_study(tmp_path / "tok", rows)
    write_report(root, n_boot=0)
    tok = json.loads((root / "report" / "findings.json").read_text())["tokenizers"]
    assert tok["baseline"] == "bpe" and tok["effects"]["unigram"]["n_pairs"] == 4
    assert tok["effects"]["unigram"]["mean"] == pytest.approx(0.0205, abs=1e-3)
    assert tok["effects"]["unigram"]["lo"] > 0  # the interval excludes no difference
    assert tok["fertility"] == {"bpe": pytest.approx(1.4), "unigram": pytest.approx(1.6)}
    assert tok["evals"]["flores_swh.bpb (unigram − bpe)"]["mean"] == pytest.approx(0.1)
    assert "bpe beats unigram" in tok["finding"]
    # a study with one tokenizer has no such section
    assert "tokenizers" not in json.loads((write_report(write_study(tmp_path / "one", rows[::2]), n_boot=0).parent / "findings.json").read_text())


def test_a_joint_scaling_fit_that_separates_nothing_is_not_reported_as_a_law():
    # the quickstart's reference runs (cpu-500k, cpu-2m, cpu-6m x 49k, 98k, 295k tokens; AMD EPYC
    # Zen 5, bf16): cpu-2m ties cpu-6m at 295k, and the Huber fit sends alpha to ~4000 with A = inf
    import dataclasses

    import numpy as np

    from smallscale.study import scaling
    from smallscale.study.report import DegenerateFit, _check_chinchilla

    N = [308e3] * 3 + [1.564e6] * 3 + [5.21e6] * 3
    D = [49152, 98304, 294912] * 3
    bpb = [3.1781, 2.8920, 2.5661, 2.8326, 2.6442, 2.3369, 2.7246, 2.6416, 2.3405]
    with np.errstate(over="ignore"):
        fit = scaling.fit_chinchilla(N, D, [b * math.log(2) * 3.34 for b in bpb])
    assert fit.alpha > 100 or not math.isfinite(fit.A)
    with pytest.raises(DegenerateFit, match="cannot separate model size from data"):
        _check_chinchilla(dataclasses.asdict(fit))
    _check_chinchilla({"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28})  # Hoffmann et al.'s law passes
