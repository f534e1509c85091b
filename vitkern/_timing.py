"""Timing, environment and commit facts shared by the benchmarks and the profiler.

One timing loop (:func:`time_ms`: CUDA events around every call on a GPU, the host clock
on CPU), one environment record (:func:`environment`) and one git-commit helper
(:func:`git_commit`), so ``benchmarks/harness.py`` and ``vitkern.profiler`` time and label
their results the same way.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["synchronize", "time_one", "time_ms", "median_ms", "dist_version", "cpu_name", "device_name", "device_slug",
           "git_commit", "commit_label", "environment", "DEFAULT_L2_BYTES", "l2_cache_bytes"]

_PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100's L2, assumed when the device does not say


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: bracketed by CUDA events and waited for on a GPU (the
    device's time), the host clock on CPU. The result is dropped before returning."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, rounds: int) -> List[float]:
    """Milliseconds of each of ``rounds`` calls of ``fn`` (:func:`time_one`) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return [time_one(fn, device) for _ in range(rounds)]


def median_ms(fn: Callable[[], Any], device: torch.device, rounds: int, warmup: int) -> float:
    return float(statistics.median(time_ms(fn, device, warmup, rounds)))


def dist_version(name: str) -> Optional[str]:
    """Installed version of distribution ``name`` (e.g. 'pytest-benchmark'), None if absent."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed, or broken metadata
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' on CPU."""
    if device.type != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return slug or "cuda"


def l2_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(_PACKAGE_DIR), *args],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on the machine
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> Dict[str, Any]:
    """The commit measured: ``$VITKERN_COMMIT`` if set (copies without .git), else git's HEAD.

    ``{"commit": full hash or "unknown", "dirty": bool or None, "source": where it came from}``.
    """
    env_commit = os.environ.get("VITKERN_COMMIT")
    if env_commit:
        return {"commit": env_commit, "dirty": None, "source": "VITKERN_COMMIT"}
    head = _git("rev-parse", "HEAD")
    if not head:
        return {"commit": "unknown", "dirty": None, "source": "git (no repository or no commit)"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(status) if status is not None else None, "source": "git"}


def commit_label(info: Dict[str, Any], short: int = 7) -> Optional[str]:
    """'abc1234' or 'abc1234+dirty' from :func:`git_commit`'s record; None when unknown."""
    commit = info.get("commit")
    if not commit or commit == "unknown":
        return None
    label = commit[:short] if info.get("source") == "git" else commit
    return label + ("+dirty" if info.get("dirty") else "")


def _vitkern_version() -> Optional[str]:
    try:
        import vitkern

        return vitkern.__version__
    except Exception:  # noqa: BLE001 - a partial import while vitkern itself is being set up
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Date, device, versions and commit of a measurement (keys shared by every vitkern result file)."""
    env: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "triton": dist_version("triton") or dist_version("pytorch-triton"),
        "timm": dist_version("timm"),
        "torchvision": dist_version("torchvision"),
        "vitkern": _vitkern_version(),
        **git_commit(),
    }
    try:
        if torch.backends.cudnn.is_available():
            env["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - a build without cuDNN
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   total_memory_gib=round(props.total_memory / 2 ** 30, 1), l2_cache_bytes=l2_cache_bytes(device))
    else:
        env.update(cpu_threads=torch.get_num_threads())
    return env
