"""Energy and CO2 of one stage execution, measured by codecarbon's offline tracker (no network).

codecarbon reads power counters where the machine has them (Intel RAPL for the CPU, NVML for NVIDIA GPUs) and
otherwise estimates: the CPU from its TDP times the process's load, RAM from its size. Which of these it used is
part of the reading (``power_source``), so a number estimated from a TDP table is never shown as if a counter had
measured it. Emissions are the energy times the grid's carbon intensity: codecarbon's table for the configured
country (and region), or the intensity the config gives.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Optional

MEASURE_EVERY_S = 15  # codecarbon's default sampling interval; its thread sleeps in between

# codecarbon's CPU modes, as a user should read them
CPU_MODES = {
    "intel_rapl": "RAPL counters",
    "intel_power_gadget": "Intel Power Gadget counters",
    "windows_emi": "Windows EMI counters",
    "cpu_load": "TDP x load estimate (no power counters)",
    "constant": "constant TDP estimate (no power counters)",
}


@dataclass
class EnergyReading:
    """What one execution used. ``measured`` is False when no component had a power counter (all estimated)."""

    kwh: float
    co2_kg: float
    duration_s: float
    power_source: str
    measured: bool
    country: str
    carbon_intensity_g_per_kwh: Optional[float]  # None: codecarbon's figure for the country

    def as_dict(self) -> dict:
        return asdict(self)

    def plus(self, earlier: Mapping[str, float]) -> "EnergyReading":
        """This reading with an earlier execution's (its ``energy/*`` metrics) added: a resumed run's total."""
        if not earlier:
            return self
        return replace(self, kwh=self.kwh + earlier.get("energy/kwh", 0.0),
                       co2_kg=self.co2_kg + earlier.get("energy/co2_kg", 0.0),
                       duration_s=self.duration_s + earlier.get("energy/duration_s", 0.0))

    def metrics(self) -> dict[str, float]:
        return {"energy/kwh": self.kwh, "energy/co2_kg": self.co2_kg, "energy/duration_s": self.duration_s}

    def tags(self) -> dict[str, str]:
        return {"energy.power_source": self.power_source,
                "energy.measured": "counters" if self.measured else "estimated (no power counters)",
                "energy.country": self.country}


def power_source(hardware: list) -> tuple[str, bool]:
    """How codecarbon gets each component's power (its hardware objects), and whether any is a real counter."""
    parts, measured = [], False
    for unit in hardware:
        kind = type(unit).__name__
        if kind == "CPU":
            mode = getattr(unit, "_mode", None)
            parts.append(f"CPU: {CPU_MODES.get(mode, mode or 'unknown')}")
            measured |= mode in ("intel_rapl", "intel_power_gadget", "windows_emi")
        elif kind == "GPU":
            parts.append("GPU: NVML counters")
            measured = True
        elif kind == "RAM":
            parts.append("RAM: estimate from its size")
        else:
            parts.append(kind)
    return "; ".join(parts) or "none", measured


class EnergyMeter:
    """Start codecarbon's tracker now; ``stop()`` returns the reading (None when codecarbon failed to start)."""

    def __init__(self, country: str, region: Optional[str] = None, carbon_intensity: Optional[float] = None):
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its import sets INFO: it would log every start

        self.country, self.carbon_intensity = country, carbon_intensity
        options = {"force_carbon_intensity_g_co2e_kwh": carbon_intensity} if carbon_intensity is not None else {}
        self._tracker = OfflineEmissionsTracker(
            country_iso_code=country, region=region, save_to_file=False, log_level="error",
            measure_power_secs=MEASURE_EVERY_S, tracking_mode="process", allow_multiple_runs=True, **options)
        self._tracker.start()

    def stop(self) -> Optional[EnergyReading]:
        try:
            self._tracker.stop()
        except Exception as e:  # noqa: BLE001 - a failed measurement must not fail the stage
            print(f"energy: codecarbon failed to stop ({type(e).__name__}: {e}); no reading", file=sys.stderr)
        data = getattr(self._tracker, "final_emissions_data", None)  # set by a stop that worked
        if data is None:
            return None
        source, measured = power_source(getattr(self._tracker, "_hardware", []))
        return EnergyReading(kwh=float(data.energy_consumed), co2_kg=float(data.emissions),
                             duration_s=float(data.duration), power_source=source, measured=measured,
                             country=self.country, carbon_intensity_g_per_kwh=self.carbon_intensity)


def total(readings: list[dict]) -> dict[str, float]:
    """Sum of manifests' ``energy`` entries (None entries: stages run with energy off are left out)."""
    present = [r for r in readings if r]
    return {"kwh": sum(r["kwh"] for r in present), "co2_kg": sum(r["co2_kg"] for r in present),
            "duration_s": sum(r["duration_s"] for r in present), "runs": len(present)}


def lineage(manifests: Mapping[str, dict]) -> list[dict]:
    """The given manifests and everything upstream of them (read from their input folders), once each, every
    stage after the stages it read: the pipeline that produced what a stage read. An upstream manifest that is
    gone or unreadable is left out (a stage since cleaned away)."""
    found: dict[str, dict] = {}
    seen: set[str] = set()

    def visit(manifest: dict) -> None:
        key = f"{manifest.get('stage')}:{manifest.get('mlflow_run_id')}:{manifest.get('finished_at')}"
        if key in seen:
            return
        seen.add(key)
        for _, upstream in sorted(manifest.get("inputs", {}).items()):
            path = Path(upstream["dir"]) / "manifest.json" if upstream.get("dir") else None
            try:
                visit(json.loads(path.read_text())) if path and path.is_file() else None
            except (OSError, json.JSONDecodeError):
                continue
        found[key] = manifest

    for _, manifest in sorted(manifests.items()):
        visit(manifest)
    return list(found.values())


def energy_table(manifests: list[dict]) -> str:
    """A markdown table of each stage's energy and emissions, with the total; estimates are said to be."""
    fmt = lambda x: f"{x:.3g}"  # noqa: E731 - estimates carry no more digits than that
    rows = ["| stage | kWh | kg CO2e | seconds | power |", "|---|---:|---:|---:|---|"]
    for m in manifests:
        e = m.get("energy")
        rows.append(f"| {m.get('stage')} | " + (f"{fmt(e['kwh'])} | {fmt(e['co2_kg'])} | {e['duration_s']:.0f} | "
                                                f"{e['power_source']} |" if e else "not measured | | | |"))
    t = total([m.get("energy") for m in manifests])
    rows.append(f"| **total** ({t['runs']} runs) | {fmt(t['kwh'])} | {fmt(t['co2_kg'])} | {t['duration_s']:.0f} | |")
    estimated = any(m.get("energy") and not m["energy"].get("measured") for m in manifests)
    note = ("\nEstimated, not measured: without power counters codecarbon takes the CPU's power from its TDP times "
            "the process's load, and the RAM's from its size.\n" if estimated else "")
    return "\n".join(rows) + "\n" + note
