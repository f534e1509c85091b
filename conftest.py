"""Project-wide pytest set-up.

``pytest``              runs the test suite in tests/.
``pytest --benchmark``  runs the benchmark suite in benchmarks/ (pytest-benchmark).
"""
import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when kernels are defined (at vitkern import), so the
# CPU default must be set before any test module imports vitkern.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the benchmark suite in benchmarks/ instead of the tests",
    )
    # Options of the benchmark suite (read by benchmarks/conftest.py; see benchmarks/README.md).
    parser.addoption(
        "--vk-results-dir",
        default=None,
        help="folder for <family>.json and summary.md (default: benchmarks/results/<gpu-slug> on a GPU, "
             ".benchmarks/vitkern/cpu on CPU)",
    )
    parser.addoption(
        "--vk-grid",
        choices=("auto", "smoke", "full"),
        default="auto",
        help="benchmark grid: full on a GPU, smoke on CPU (auto), or forced",
    )
    parser.addoption(
        "--vk-rounds",
        type=int,
        default=None,
        help="timed rounds per benchmark (default: adaptive, about 0.15 s of timed calls, 20..200 rounds on a GPU)",
    )
    parser.addoption(
        "--vk-compile",
        choices=("dynamic", "static", "off"),
        default="dynamic",
        help="torch.compile peer: one dynamic-shape compile reused across shapes (default), a fresh "
             "static compile per shape and mode (slower to compile), or not run",
    )


def pytest_ignore_collect(collection_path, config):
    benchmarking = config.getoption("--benchmark")
    parts = collection_path.parts
    if "benchmarks" in parts and not benchmarking:
        return True
    if "tests" in parts and benchmarking:
        return True
    return None
