"""Energy and carbon of training and evaluation, measured with CodeCarbon's offline tracker.

`EnergyMeter` runs CodeCarbon's `OfflineEmissionsTracker` (no network: the grid's carbon intensity
comes from CodeCarbon's own table of countries) around a training run (trainer.py) and around each
evaluation task (eval/tasks/registry.py), and gives the fields that summary.json and
eval/<task>.json record:

    energy_kwh                  CPU + GPU + RAM energy in kWh, and its parts energy_{cpu,gpu,ram}_kwh
                                (energy_gpu_kwh null where CodeCarbon tracked no GPU)
    co2_kg                      kg CO2eq: energy_kwh x carbon_intensity_g_per_kwh / 1000
    carbon_intensity_g_per_kwh  the grid's intensity CodeCarbon used, for energy_country
    energy_method               how each part was measured, e.g. "CPU: RAPL; GPU: NVML; RAM: CodeCarbon's
                                power model", or why nothing was

CodeCarbon measures the CPU through RAPL where /sys/class/powercap is readable, else models it as
its TDP (from CodeCarbon's table, or 4 W per thread for a CPU it does not know) times the process's
CPU load; GPUs through NVML; RAM with a power model of the memory in use. It tracks this process
and its children ("process" mode), so other users of a shared machine are not counted; a GPU is
counted whole. The trainer's NVML energy counter (`energy_j`, telemetry.py) stays as the GPU's own
figure; the report shows both.

CodeCarbon is an optional extra (`pip install 'smallscale[energy]'`) and is imported only here, when
a meter starts. The country is `train.energy.country` of the run config (ISO 3166-1 alpha-3, e.g.
GBR); unset, CodeCarbon uses its world average (475 g CO2eq/kWh). Nothing here ever stops a run: a
meter that fails warns and records why.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Self

from pydantic import Field, field_validator

from smallscale.config import Strict
from smallscale.errors import UserError

INSTALL_HINT = "pip install 'smallscale[energy]'"
EMISSIONS_FILE = "emissions.csv"  # CodeCarbon's own log, one row per measured block, next to its results


class EnergyConfig(Strict):
    measure: bool = Field(True, description="measure energy and CO2 with CodeCarbon (when installed)")
    country: str | None = Field(
        None, description="ISO 3166-1 alpha-3 code of the country whose grid powers the machine (GBR, USA, FRA, ...); "
        "null: CodeCarbon's world-average carbon intensity",
    )  # fmt: skip
    region: str | None = Field(None, description="a US state or Canadian province (e.g. california) for its own grid mix")

    @field_validator("country")
    @classmethod
    def _known_country(cls, code: str | None) -> str | None:
        if code is None:
            return None
        code = code.upper()
        known = _country_table()
        if (known is None and not (len(code) == 3 and code.isalpha())) or (known is not None and code not in known):
            raise ValueError(f"country {code!r} is not an ISO 3166-1 alpha-3 code CodeCarbon knows; use e.g. GBR, USA, FRA, DEU")
        return code


def _country_table() -> dict[str, Any] | None:
    """CodeCarbon's per-country energy mix (None without CodeCarbon)."""
    try:
        from codecarbon.input import DataSource
    except ImportError:
        return None
    return DataSource().get_global_energy_mix_data()


@dataclasses.dataclass
class Reading:
    """Energy in kWh by part, and the CO2 it emitted in kg."""

    cpu_kwh: float = 0.0
    gpu_kwh: float = 0.0
    ram_kwh: float = 0.0
    co2_kg: float = 0.0

    def __add__(self, other: Reading) -> Reading:
        return Reading(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    @property
    def kwh(self) -> float:
        return self.cpu_kwh + self.gpu_kwh + self.ram_kwh

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Reading:
        """A reading from `as_dict` (a checkpoint's state); an empty reading for None."""
        return cls(**{f.name: float(data[f.name]) for f in dataclasses.fields(cls)}) if data else cls()

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def not_measured(why: str) -> dict[str, Any]:
    """The energy fields of a block of work that was not measured, saying why."""
    return {"energy_kwh": None, "energy_cpu_kwh": None, "energy_gpu_kwh": None, "energy_ram_kwh": None, "co2_kg": None,
            "carbon_intensity_g_per_kwh": None, "energy_country": None, "energy_method": f"not measured: {why}"}  # fmt: skip


def _quiet_codecarbon() -> None:
    # CodeCarbon logs its setup at INFO and its fallbacks at WARNING on every start; the method it
    # chose is recorded in energy_method instead.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)


class EnergyMeter:
    """CodeCarbon around a block of work, in laps: `lap()` gives the total so far (a checkpoint
    records it, and a resumed run starts from it as `before`), `stop()` the fields for its results.

        meter = EnergyMeter(cfg.train.energy, run_dir)
        meter.start()
        ...
        summary.update(meter.stop())

    or `with EnergyMeter(cfg, folder) as meter: ...`, then `meter.fields`.
    """

    def __init__(self, cfg: EnergyConfig, output_dir: str | Path, before: Reading | None = None) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.before = before or Reading()
        self._tracker: Any = None
        self._laps = Reading()
        self._method = ""
        self._gpu_tracked = False
        self._why_not = "the meter was not started"
        self.fields: dict[str, Any] = {}  # what `stop` gave, when used as a context manager

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.fields = self.stop()

    def start(self) -> None:
        if not self.cfg.measure:
            self._why_not = "train.energy.measure is false"
            return
        try:
            import codecarbon  # noqa: F401
        except ImportError:
            self._why_not = f"CodeCarbon is not installed ({INSTALL_HINT})"
            return
        _quiet_codecarbon()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._tracker = self._started_tracker()
        except Exception as exc:  # CodeCarbon probes hardware in many ways; none of it may stop a run
            self._fail("start", exc)
            return
        self._method = describe_method(self._tracker)
        # a machine without a GPU has no GPU energy (null), not a measured 0 kWh
        self._gpu_tracked = any(type(part).__name__ in ("GPU", "AppleSiliconChip") for part in getattr(self._tracker, "_hardware", []))

    def _started_tracker(self) -> Any:
        from codecarbon import OfflineEmissionsTracker

        tracker = OfflineEmissionsTracker(
            project_name="smallscale", country_iso_code=self.cfg.country, region=self.cfg.region,
            output_dir=str(self.output_dir), output_file=EMISSIONS_FILE, log_level="error", tracking_mode="process",
            allow_multiple_runs=True,  # a study's pool runs several at once
        )  # fmt: skip
        tracker.start()  # the first start in a process probes the hardware (~2 s); later ones reuse it
        return tracker

    def lap(self) -> Reading:
        """The reading so far, `before` included (what a checkpoint records). Each lap is one
        CodeCarbon run: one row of EMISSIONS_FILE."""
        if self._tracker is not None:
            try:
                self._end_lap()
                self._tracker = self._started_tracker()
            except Exception as exc:
                self._fail("lap", exc)
        return self.before + self._laps

    def _end_lap(self) -> None:
        tracker, self._tracker = self._tracker, None
        tracker.stop()
        self._laps += _reading(tracker.final_emissions_data)

    def stop(self) -> dict[str, Any]:
        """Stop measuring; the energy fields for summary.json or an eval result."""
        if self._tracker is None:
            return not_measured(self._why_not)
        try:
            self._end_lap()
        except Exception as exc:
            self._fail("stop", exc)
            return not_measured(self._why_not)
        total = self.before + self._laps
        fields: dict[str, Any] = {"energy_kwh": total.kwh, "energy_cpu_kwh": total.cpu_kwh,
                                  "energy_gpu_kwh": total.gpu_kwh if self._gpu_tracked else None,
                                  "energy_ram_kwh": total.ram_kwh, "co2_kg": total.co2_kg}  # fmt: skip
        # what CodeCarbon applied for the country (and region); its table, not a measurement
        fields["carbon_intensity_g_per_kwh"] = 1000 * total.co2_kg / total.kwh if total.kwh > 0 else None
        fields["energy_country"] = self.cfg.country
        fields["energy_method"] = self._method
        return fields

    def close(self) -> None:
        """Stop CodeCarbon's threads (idempotent; what an error path calls)."""
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            try:
                tracker.stop()
            except Exception as exc:
                warnings.warn(f"CodeCarbon failed to stop ({type(exc).__name__}: {exc})", stacklevel=2)

    def _fail(self, stage: str, exc: Exception) -> None:
        warnings.warn(f"CodeCarbon failed at {stage} ({type(exc).__name__}: {exc}); energy is not measured", stacklevel=3)
        self._why_not = f"CodeCarbon failed at {stage}: {type(exc).__name__}: {exc}"
        self.close()


def _reading(data: Any) -> Reading:
    """A Reading from CodeCarbon's EmissionsData (energies in kWh, emissions in kg)."""
    return Reading(float(data.cpu_energy), float(data.gpu_energy), float(data.ram_energy), float(data.emissions))


# CodeCarbon's CPU modes, in words (codecarbon.external.hardware.CPU._mode).
_CPU_MODES = {
    "intel_rapl": "RAPL",
    "windows_emi": "RAPL (Windows Energy Meter Interface)",
    "intel_power_gadget": "Intel Power Gadget",
    "cpu_load": "TDP x CPU load model",
    "constant": "TDP constant",
}


def describe_method(tracker: Any) -> str:
    """How the tracker measures each part, e.g. "CodeCarbon 3.3.2: CPU: TDP x CPU load model (8 W);
    GPU: none; RAM: CodeCarbon's power model". Reads the hardware list CodeCarbon chose at start
    (not public API: a version that changes it reads as 'unknown')."""
    import codecarbon

    cpu, gpu = "unknown", "none"
    for part in getattr(tracker, "_hardware", []):
        kind = type(part).__name__
        if kind == "CPU":
            mode = getattr(part, "_mode", "unknown")
            cpu = _CPU_MODES.get(mode, mode)
            if mode in ("cpu_load", "constant") and getattr(part, "_tdp", None):
                cpu += f" ({part._tdp:g} W)"
        elif kind == "AppleSiliconChip":
            cpu = gpu = "powermetrics"
        elif kind == "Raspberry":
            cpu = "Raspberry Pi PMIC"
        elif kind == "GPU":
            gpu = "NVML" if _nvidia() else "AMD SMI"
    return f"CodeCarbon {codecarbon.__version__}: CPU: {cpu}; GPU: {gpu}; RAM: CodeCarbon's power model"


def _nvidia() -> bool:
    from codecarbon.core.gpu import is_nvidia_system

    return bool(is_nvidia_system())


def carbon_intensity_g_per_kwh(country: str | None, region: str | None = None) -> float:
    """g CO2eq per kWh of the grid of `country` (and `region`) as CodeCarbon computes it offline (its
    world average for None). UserError without CodeCarbon."""
    try:
        from codecarbon.core.emissions import Emissions
        from codecarbon.core.units import Energy
        from codecarbon.external.geography import GeoMetadata
        from codecarbon.input import DataSource
    except ImportError:
        raise UserError(f"carbon intensities come from CodeCarbon, which is not installed; {INSTALL_HINT}") from None
    _quiet_codecarbon()
    geo = GeoMetadata(country_iso_code=country, region=region)
    return 1000.0 * Emissions(DataSource()).get_private_infra_emissions(Energy(kWh=1.0), geo)


def machine_watts() -> tuple[float, str]:
    """This machine's power draw at full load as CodeCarbon models it: CPU TDP + RAM + each visible
    GPU's NVML power limit; and that sum in words. UserError without CodeCarbon."""
    try:
        from codecarbon.core import cpu
        from codecarbon.core.util import count_physical_cpus
        from codecarbon.external.ram import RAM
    except ImportError:
        raise UserError(f"the machine's power model comes from CodeCarbon, which is not installed; {INSTALL_HINT} or pass --watts") from None
    _quiet_codecarbon()
    tdp = cpu.TDP()
    cpu_w = float(tdp.tdp or 0) * count_physical_cpus()
    ram_w = RAM(tracking_mode="machine").total_power().W
    parts = [f"CPU {cpu_w:g} W (TDP, {tdp.model})", f"RAM {ram_w:g} W"]
    gpu_w = _gpu_power_limits_w()
    if gpu_w:
        parts.append(f"{len(gpu_w)} GPU(s) {sum(gpu_w):g} W (NVML power limit)")
    return cpu_w + ram_w + sum(gpu_w), " + ".join(parts)


def _gpu_power_limits_w() -> list[float]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library, no driver, no GPU: no GPU power to add
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return [pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0 for h in handles]  # mW
    finally:
        pynvml.nvmlShutdown()


def run_energy_config(run_dir: str | Path) -> EnergyConfig:
    """`train.energy` of the run's config.yaml (defaults where it has none): how its evaluations are
    measured too."""
    from smallscale.config import read_yaml, validate

    path = Path(run_dir) / "config.yaml"
    data = read_yaml(path) if path.exists() else {}
    section = ((data or {}).get("train") or {}).get("energy") or {}
    return validate(EnergyConfig, section, source=f"{path} train.energy")
