"""pytest set-up of the benchmark suite (collected only with ``pytest --benchmark``).

Fixtures for every ``bench_*.py``: ``vk_settings`` (grid, rounds, compile mode),
``vk_ceilings`` (the card's measured copy bandwidth and matmul throughput, once per
session; None on CPU, where they mean nothing). At session end the rows the files recorded through :mod:`harness` are
written to ``<results dir>/<family>.json`` and ``<results dir>/summary.md``.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # bench files and this conftest share one `harness` module
    sys.path.insert(0, _HERE)

import harness  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    device: torch.device
    dtype: torch.dtype
    grid: str  # "smoke" | "full"
    compile: str  # "dynamic" | "static" | "off"
    timing: harness.TimingSettings

    def as_dict(self):
        return {"device": str(self.device), "dtype": harness.dtype_name(self.dtype), "grid": self.grid,
                "compile": self.compile, "timing": dataclasses.asdict(self.timing)}


def pytest_configure(config):
    # cuDNN caches one plan per convolution shape per process, and the first call's choice
    # wins whatever the benchmark flag says at later calls; a per-implementation setting
    # would make the naive/peer times depend on the order they ran in. So every conv-based
    # implementation (the naive reference included) runs with autotuned plans; this is
    # recorded in the results' environment ("cudnn_benchmark": true).
    torch.backends.cudnn.benchmark = True


@pytest.fixture(scope="session")
def vk_settings(request) -> BenchSettings:
    device = harness.bench_device()
    settings = BenchSettings(
        device=device,
        dtype=harness.bench_dtype(device),
        grid=harness.grid_choice(request.config),
        compile=request.config.getoption("--vk-compile", default="dynamic") or "dynamic",
        timing=harness.TimingSettings.for_device(device, request.config.getoption("--vk-rounds", default=None)),
    )
    harness.SESSION["settings"] = settings.as_dict()
    return settings


@pytest.fixture(scope="session")
def vk_ceilings() -> Optional[harness.Ceilings]:
    if harness.bench_device().type != "cuda":
        harness.SESSION["ceilings_note"] = harness.CPU_CEILINGS_NOTE
        return None
    try:
        ceilings = harness.measure_ceilings()
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: no roofline, still benchmark
        harness.SESSION["ceilings_error"] = f"{type(exc).__name__}: {exc}"
        return None
    harness.SESSION["ceilings"] = ceilings.as_dict()
    return ceilings


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionfinish(session, exitstatus):
    if not harness.RESULTS:
        return
    results_dir = harness.resolve_results_dir(session.config.getoption("--vk-results-dir", default=None),
                                              session.config.rootpath)
    try:
        written = harness.write_results(results_dir)
    except Exception as exc:  # noqa: BLE001 - report, do not hide the run's own outcome
        harness.SESSION["write_error"] = f"{type(exc).__name__}: {exc}"
        return
    harness.SESSION["written"] = [str(p) for p in written]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables, so the floors are the last thing shown
def pytest_terminal_summary(terminalreporter):
    if harness.FLOORS:
        terminalreporter.section("vitkern static floors (bf16; bound = floor naive / floor vitkern)")
        for family in dict.fromkeys(f["family"] for f in harness.FLOORS.values()):
            terminalreporter.write_line(f"{family}:")
            rows = [r for r in harness.RESULTS if r["family"] == family]
            for line in harness.floors_table([f for f in harness.FLOORS.values() if f["family"] == family], rows):
                terminalreporter.write_line(line)
    written = harness.SESSION.get("written")
    error = harness.SESSION.get("write_error")
    if not written and not error:
        return
    terminalreporter.section("vitkern benchmark results")
    if error:
        terminalreporter.write_line(f"could not write results: {error}")
    for path in written or ():
        terminalreporter.write_line(f"wrote {path}")
    if harness.SESSION.get("ceilings_error"):
        terminalreporter.write_line(f"device ceilings not measured: {harness.SESSION['ceilings_error']}")
