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


def pytest_ignore_collect(collection_path, config):
    benchmarking = config.getoption("--benchmark")
    parts = collection_path.parts
    if "benchmarks" in parts and not benchmarking:
        return True
    if "tests" in parts and benchmarking:
        return True
    return None
