"""Energy and CO2 measured by CodeCarbon around training and evaluation: summary.json and eval
results record kWh, kg CO2eq and the method; a resumed run adds the energy of its earlier sessions;
the report uses these figures with the method named; `study plan` estimates kWh and CO2."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from smallscale.energy import (
    EnergyConfig,
    EnergyMeter,
    Reading,
    carbon_intensity_g_per_kwh,
)
from smallscale.errors import UserError
from smallscale.train.trainer import load_run_config, resume, train

TINY = ["model.preset=null", "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
        "train.steps=4", "train.global_batch_tokens=512", "train.micro_batch=16", "train.precision=fp32",
        "train.log_every_steps=2", "train.eval_batch=8", "train.eval_tokens=2000", "train.checkpoint_every_tokens=1024"]  # fmt: skip
GBR_G_PER_KWH = 237.589  # CodeCarbon 3.x's table (global_energy_mix.json, 2023 data)

codecarbon = pytest.importorskip("codecarbon", reason="CodeCarbon is not installed (pip install 'smallscale[energy]')")


@pytest.fixture(scope="module")
def measured_run(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("energy") / "run"
    train(load_run_config(None, [f"data.path={tiny_dataset}", f"out={out}", *TINY, "train.energy.country=GBR"]), progress=False)
    return out


def test_training_summary_records_codecarbon_energy_co2_and_method(measured_run):
    summary = json.loads((measured_run / "summary.json").read_text(encoding="utf-8"))
    assert summary["energy_kwh"] > 0 and summary["energy_country"] == "GBR"
    gpu_kwh = summary["energy_gpu_kwh"] or 0.0  # null where CodeCarbon tracked no GPU
    assert summary["energy_kwh"] == pytest.approx(summary["energy_cpu_kwh"] + gpu_kwh + summary["energy_ram_kwh"])
    assert (summary["energy_gpu_kwh"] is None) == summary["energy_method"].endswith("GPU: none; RAM: CodeCarbon's power model")
    assert summary["carbon_intensity_g_per_kwh"] == pytest.approx(GBR_G_PER_KWH, rel=1e-6)
    assert summary["co2_kg"] == pytest.approx(summary["energy_kwh"] * GBR_G_PER_KWH / 1000, rel=1e-6)
    assert summary["energy_method"].startswith(f"CodeCarbon {codecarbon.__version__}: CPU: ")
    assert "energy_j" in summary  # the NVML GPU counter stays (null on CPU)


def test_codecarbon_log_in_the_run_dir_adds_up_to_the_summary(measured_run):
    """One CodeCarbon row per lap (each checkpoint ends one), summing to the run's total."""
    summary = json.loads((measured_run / "summary.json").read_text(encoding="utf-8"))
    with open(measured_run / "emissions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3  # the checkpoints at steps 2 and 4 each end a lap; the end of the run the third
    assert sum(float(r["energy_consumed"]) for r in rows) == pytest.approx(summary["energy_kwh"], rel=1e-9)
    assert {r["country_iso_code"] for r in rows} == {"GBR"}


def test_checkpoint_records_the_energy_so_far(measured_run):
    states = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(measured_run.glob("checkpoints/step-*/state.json"))]
    summary = json.loads((measured_run / "summary.json").read_text(encoding="utf-8"))
    kwh = [Reading.from_dict(s["energy"]).kwh for s in states]
    assert 0 < kwh[0] < kwh[-1] <= summary["energy_kwh"]


def test_resumed_run_adds_the_energy_of_its_earlier_sessions(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(load_run_config(None, [f"data.path={tiny_dataset}", f"out={out}", *TINY, "train.energy.country=FRA"]), progress=False)
    (final,) = [p for p in out.glob("checkpoints/step-*") if p.name.endswith("4")]
    before = Reading.from_dict(json.loads((final / "state.json").read_text(encoding="utf-8"))["energy"])
    (out / "summary.json").unlink()  # killed after the last checkpoint, before summary.json
    summary = resume(out, progress=False)  # only the final evaluation runs in this session
    assert summary["energy_kwh"] > before.kwh and summary["co2_kg"] > before.co2_kg
    assert summary["energy_country"] == "FRA"


def test_eval_result_records_energy_with_the_run_country(measured_run):
    from smallscale.eval.runs import load_run
    from smallscale.eval.tasks.registry import run_task

    result = run_task("heldout", load_run(measured_run), batch_size=8)
    energy = result["energy"]
    assert energy["energy_kwh"] > 0 and energy["energy_country"] == "GBR"
    assert energy["co2_kg"] == pytest.approx(energy["energy_kwh"] * GBR_G_PER_KWH / 1000, rel=1e-6)
    assert (measured_run / "eval" / "emissions.csv").is_file()


def test_without_codecarbon_the_fields_say_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # `import codecarbon` raises ImportError
    meter = EnergyMeter(EnergyConfig(country="GBR"), tmp_path)
    meter.start()
    fields = meter.stop()
    assert fields["energy_kwh"] is None and fields["co2_kg"] is None
    assert fields["energy_method"] == "not measured: CodeCarbon is not installed (pip install 'smallscale[energy]')"


def test_measure_false_measures_nothing(tmp_path):
    with EnergyMeter(EnergyConfig(measure=False), tmp_path) as meter:
        pass
    assert meter.fields["energy_method"] == "not measured: train.energy.measure is false"
    assert not (tmp_path / "emissions.csv").exists()


def test_unknown_country_is_one_clear_config_error(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match=r"train\.energy\.country.*'XYZ' is not an ISO 3166-1 alpha-3 code CodeCarbon knows"):
        load_run_config(None, [f"data.path={tiny_dataset}", f"out={tmp_path}/r", *TINY, "train.energy.country=XYZ"])


def test_country_intensities_come_from_codecarbon_and_default_to_its_world_average():
    assert carbon_intensity_g_per_kwh("GBR") == pytest.approx(GBR_G_PER_KWH)
    assert carbon_intensity_g_per_kwh(None) == pytest.approx(475.0)  # CodeCarbon's world average
    assert carbon_intensity_g_per_kwh("FRA") < carbon_intensity_g_per_kwh("POL")  # nuclear vs coal


# ----------------------------------------------------------------------------- report and plan
def results_row(run_id: str, **extra) -> dict:
    row = {"run_id": run_id, "status": "done", "error": "", "params": 1e6, "tokens_seen": 1e6, "tokens_per_s": 1e4, "mfu": 0.2,
           "peak_mem_bytes": 2**30, "wall_s": 100.0, "device": "NVIDIA H100", "precision": "bf16", "seed": 0}  # fmt: skip
    return {**row, **extra}


def test_report_efficiency_uses_codecarbon_figures_and_names_the_method(tmp_path):
    from smallscale.study.report import write_report

    method = "CodeCarbon 3.3.2: CPU: RAPL; GPU: NVML; RAM: CodeCarbon's power model"
    rows = [results_row(f"r{i}", energy_kwh=0.5 * (i + 1), co2_kg=0.5 * (i + 1) * 0.2376, energy_gpu_kwh=0.4 * (i + 1),
                        energy_j=0.39 * (i + 1) * 3.6e6, carbon_intensity_g_per_kwh=237.6, energy_country="GBR",
                        energy_method=method, seed=i) for i in range(2)]  # fmt: skip
    (tmp_path / "study.yaml").write_text("name: energy\n", encoding="utf-8")
    with open(tmp_path / "results.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_report(tmp_path, n_boot=0)
    eff = json.loads((tmp_path / "report" / "findings.json").read_text(encoding="utf-8"))["efficiency"]
    assert eff["total_kwh"] == pytest.approx(1.5) and eff["total_co2_kg"] == pytest.approx(1.5 * 0.2376)
    assert eff["energy_methods"] == {method: 2}
    assert "**Training used 1.5 kWh ≈ 0.356 kg CO2eq** over 2 runs, as CodeCarbon measured it" in eff["finding"]
    assert "238 g CO2eq/kWh (GBR)" in eff["finding"] and f"Method: {method} (2 runs)" in eff["finding"]
    assert "GPU energy over 2 runs: 1.17 kWh by the board's NVML counter, 1.2 kWh by CodeCarbon." in eff["finding"]
    assert "0.4 kg" not in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")  # no assumed constant


def test_study_plan_estimates_kwh_and_co2_from_power_hours_and_the_country_grid(tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from smallscale.cli import app

    spec = {"name": "plan", "datasets": {"syn": {"path": str(tiny_dataset)}},
            "base": {"model": {"preset": "cpu-500k", "seq_len": 64}, "train": {"global_batch_tokens": 1024, "energy": {"country": "FRA"}}},
            "grid": {"tokens": [1_000_000, 2_000_000]}, "derive": {"train.tokens": "tokens"}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = CliRunner().invoke(app, ["study", "plan", str(tmp_path / "s.yaml"), "--flops-per-s", "1e9", "--watts", "100"])
    assert result.exit_code == 0, result.output
    flops = float(re.search(r"2 runs, ([\d.e+-]+) FLOPs", result.output)[1])
    kwh, co2 = (float(x) for x in re.search(r"≈ ([\d.e+-]+) kWh and ([\d.e+-]+) kg CO2eq", result.output).groups())
    assert kwh == pytest.approx(100 * flops / 1e9 / 3600 / 1000, rel=0.01)  # W x h; printed to 3 significant digits
    assert co2 == pytest.approx(kwh * carbon_intensity_g_per_kwh("FRA") / 1000, rel=0.01)
    assert "100 W (--watts)" in result.output and "for FRA" in " ".join(result.output.split())


def test_study_plan_with_watts_but_without_codecarbon_estimates_kwh_only(tiny_dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from smallscale import energy
    from smallscale.cli import app

    def no_codecarbon(*args):
        raise UserError("carbon intensities come from CodeCarbon, which is not installed")

    monkeypatch.setattr(energy, "carbon_intensity_g_per_kwh", no_codecarbon)
    spec = {"name": "plan", "datasets": {"syn": {"path": str(tiny_dataset)}},
            "base": {"model": {"preset": "cpu-500k", "seq_len": 64}, "train": {"global_batch_tokens": 1024}},
            "grid": {"tokens": [1_000_000]}, "derive": {"train.tokens": "tokens"}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = CliRunner().invoke(app, ["study", "plan", str(tmp_path / "s.yaml"), "--flops-per-s", "1e9", "--watts", "100"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(r"≈ [\d.e+-]+ kWh, estimated as 100 W \(--watts\) x device-hours; CO2 not estimated", text), text
