"""Report sections on mixtures (no training): H1 diverse vs narrow data, and English -> Swahili transfer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from smallscale.study.report import dataset_compositions, diversity, load_results, transfer, write_report

SOURCES = {"shakespeare": "builtin:tinyshakespeare", "stories": "builtin:tinystories", "wiki": "builtin:wikitext2",
           "swahili": "builtin:maneno-yetu"}  # fmt: skip
DATASETS = {
    "d1": {"shakespeare": 1.0},
    "d2": {"shakespeare": 0.5, "stories": 0.5},
    "d4": {"shakespeare": 0.25, "stories": 0.25, "wiki": 0.25, "swahili": 0.25},
    "sw": {"swahili": 1.0},
    "sw-en25": {"swahili": 0.75, "wiki": 0.25},
    "sw-en50": {"swahili": 0.5, "wiki": 0.5},
}
TASKS = ("wikitext2", "tinyshakespeare", "flores_swh", "flores_eng", "swahili_nt")


def make_study(root: Path, rows: list[dict]) -> Path:
    """A study directory as `study run` leaves it: manifest.json, each dataset's manifest, results.csv."""
    runs = []
    for name, weights in DATASETS.items():
        folder = root / "data" / name
        folder.mkdir(parents=True)
        mixture = {"sources": {s: {"source": SOURCES[s], "weight": w} for s, w in weights.items()}}
        (folder / "manifest.json").write_text(json.dumps({"source": f"mixture:{name}", "mixture": mixture}))
    for row in rows:
        runs.append({"id": row["run_id"], "dataset": row["dataset"], "axes": {}, "evals": [],
                     "config": {"data": {"path": str(root / "data" / row["dataset"])}}})  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"name": "div", "runs": runs}))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return root


def run_row(dataset: str, seed: int, bpb: dict[str, float]) -> dict:
    return {"run_id": f"{dataset}-s{seed}", "status": "done", "dataset": dataset, "tokenizer": "bpe", "preset": "cpu-500k",
            "seed": seed, "token_budget": 262144, "train_tokens": 262144, **{f"eval.{k}": v for k, v in bpb.items()}}  # fmt: skip


def diversity_rows(seeds: list[int]) -> list[dict]:
    """d4 is 0.20 + 0.01*seed bits/byte better than d1 on every unseen task and 0.05 worse on Shakespeare;
    d2 is no different from d1 on unseen tasks (+-0.01 by seed)."""
    rows = []
    for seed in seeds:
        base = {f"{t}.bpb": 3.0 + 0.1 * i + 0.03 * seed for i, t in enumerate(TASKS)}
        rows.append(run_row("d1", seed, {**base, "heldout_sources.shakespeare.bpb": 2.5 + 0.02 * seed}))
        rows.append(run_row("d2", seed, {**{k: v + (0.01 if seed % 2 else -0.01) for k, v in base.items()},
                                         "heldout_sources.shakespeare.bpb": 2.52 + 0.02 * seed,
                                         "heldout_sources.stories.bpb": 2.0}))  # fmt: skip
        rows.append(run_row("d4", seed, {**{k: v - 0.20 - 0.01 * seed for k, v in base.items()},
                                         **{f"heldout_sources.{s}.bpb": 2.55 + 0.02 * seed + 0.001 * seed**2 for s in DATASETS["d4"]}}))  # fmt: skip
    return rows


def test_diverse_vs_narrow_pairs_by_seed_over_tasks_neither_run_saw(tmp_path):
    study = make_study(tmp_path, diversity_rows([0, 1, 2]))
    section = diversity(load_results(study), dataset_compositions(study))
    by_pair = {(c["narrow"], c["diverse"]): c for c in section.data["comparisons"]}
    assert set(by_pair) == {("d1", "d2"), ("d1", "d4"), ("d2", "d4")}
    # d4 trained on WikiText-2 and Maneno Yetu, d1 on Shakespeare: of the rest, only English text is out of
    # domain for d1; Swahili text is new to d1 altogether (coverage, reported apart)
    assert by_pair[("d1", "d4")]["ood_tasks"] == ["flores_eng"]
    assert by_pair[("d1", "d4")]["new_language_tasks"] == ["flores_swh", "swahili_nt"]
    assert by_pair[("d1", "d2")]["ood_tasks"] == ["wikitext2", "flores_eng"]
    ood, cost = by_pair[("d1", "d4")]["ood"], by_pair[("d1", "d4")]["in_domain"]
    assert ood["n_pairs"] == 3 and ood["mean"] == pytest.approx(-0.21) and ood["hi"] < 0
    assert cost["mean"] == pytest.approx(0.05 + 0.005 / 3) and cost["lo"] > 0  # on Shakespeare's held-out text
    assert by_pair[("d1", "d2")]["ood"]["lo"] < 0 < by_pair[("d1", "d2")]["ood"]["hi"]
    assert "the 95% interval of the out-of-domain difference lies below zero in **2 of 3** comparisons" in section.finding_md
    assert "**d4 (4) vs d1 (1)**: **the diverse mixture generalises better out of domain**" in section.finding_md
    assert "**d2 (2) vs d1 (1)**: no clear out-of-domain difference" in section.finding_md


def test_one_seed_is_not_a_finding(tmp_path):
    study = make_study(tmp_path, diversity_rows([0]))
    section = diversity(load_results(study), dataset_compositions(study))
    assert section.finding_md.startswith("**Not a finding**: every comparison has one seed")
    assert "−0.200 bits/byte (one seed — not a finding)".replace("−", "-") in section.finding_md
    assert section.data["answered"] is False


def test_a_study_without_mixtures_has_no_diversity_section(tmp_path):
    study = make_study(tmp_path, [run_row("d1", 0, {"wikitext2.bpb": 3.0})])
    assert diversity(load_results(study), dataset_compositions(study)) is None
    assert transfer(load_results(study), dataset_compositions(study)) is None  # and trains on no Swahili


def transfer_rows() -> list[dict]:
    """English at 25% helps FLORES swh by 0.10 (+-0.01 by seed); at 50% it hurts by 0.05; AfriSenti F1 +0.02 at 25%."""
    rows = []
    for seed in (0, 1, 2):
        jitter = 0.01 * (seed - 1)
        rows.append(run_row("sw", seed, {"flores_swh.bpb": 3.0 + 0.05 * seed, "heldout_sources.swahili.bpb": 2.8,
                                         "afrisenti_swa_finetune.macro_f1": 0.40 + 0.01 * seed}))  # fmt: skip
        rows.append(run_row("sw-en25", seed, {"flores_swh.bpb": 2.9 + 0.05 * seed + jitter, "heldout_sources.swahili.bpb": 2.85,
                                              "heldout_sources.wiki.bpb": 3.1, "afrisenti_swa_finetune.macro_f1": 0.42 + 0.01 * seed + jitter}))  # fmt: skip
        rows.append(run_row("sw-en50", seed, {"flores_swh.bpb": 3.05 + 0.05 * seed + jitter, "heldout_sources.swahili.bpb": 2.9,
                                              "heldout_sources.wiki.bpb": 3.0, "afrisenti_swa_finetune.macro_f1": 0.40 + 0.01 * seed}))  # fmt: skip
    return rows


def test_transfer_compares_swahili_alone_with_english_added_at_each_share(tmp_path):
    study = make_study(tmp_path, transfer_rows())
    section = transfer(load_results(study), dataset_compositions(study))
    effects = {c["with_english"]: c["effects"] for c in section.data["comparisons"] if c["swahili_only"] == "sw"}
    assert set(effects) == {"sw-en25", "sw-en50"}  # (d4 is Swahili plus English too, but has no runs here)
    assert effects["sw-en25"]["FLORES swh bpb"]["mean"] == pytest.approx(-0.10) and effects["sw-en25"]["FLORES swh bpb"]["hi"] < 0
    assert effects["sw-en50"]["FLORES swh bpb"]["mean"] == pytest.approx(0.05) and effects["sw-en50"]["FLORES swh bpb"]["lo"] > 0
    assert effects["sw-en50"]["in-domain Swahili bpb"]["mean"] == pytest.approx(0.10)
    assert effects["sw-en25"]["afrisenti_swa_finetune.macro_f1"]["mean"] == pytest.approx(0.02)
    lines = section.finding_md.splitlines()
    assert any(line.startswith("- **sw-en25** (English 25%, Swahili 75% of the tokens) vs **sw** (Swahili alone)")
               and "FLORES swh bpb -0.100 bits/byte" in line and "(**English helps**)" in line for line in lines)  # fmt: skip
    assert any(line.startswith("- **sw-en50** (English 50%") and "FLORES swh bpb +0.050 bits/byte" in line
               and "(**English hurts**)" in line for line in lines)  # fmt: skip


def test_the_report_has_both_sections(tmp_path):
    study = make_study(tmp_path, diversity_rows([0, 1]) + transfer_rows())
    write_report(study, n_boot=10)
    findings = json.loads((study / "report" / "findings.json").read_text())
    assert findings["diversity"]["title"] == "8. Diverse vs narrow data (H1)" and findings["diversity"]["answered"]
    assert findings["transfer"]["title"] == "9. English → Swahili transfer" and findings["transfer"]["answered"]
    report = (study / "report" / "report.md").read_text()
    assert "## 8. Diverse vs narrow data (H1)" in report and "## 9. English → Swahili transfer" in report
    assert (study / "report" / "diversity.png").is_file() and (study / "report" / "transfer.png").is_file()
