"""Shared machinery for vitkern's pytest-benchmark suites (every kernel family).

A benchmark file (``benchmarks/bench_<family>.py``) uses this module to

* time a call on the GPU honestly: :func:`time_call` runs a step through
  ``benchmark.pedantic`` with warm-up rounds, CUDA events around every call and a
  synchronisation inside the timed call, and rotates among several copies of the
  inputs whose total size exceeds twice the L2 cache (:func:`rotation_count`), so
  no round reads inputs that the previous one left in L2; the median is reported;
* measure the peak memory of one call (:func:`peak_memory_bytes`);
* compare against the card's real ceilings (:func:`measure_ceilings`, measured once per
  session by the ``vk_ceilings`` fixture: a large device-to-device copy and a large
  bf16 matmul) through the roofline fraction (:func:`roofline_fraction`);
* check equality with the naive reference under the test suite's rule
  (:func:`load_test_helpers` loads ``tests/helpers.py``, whose ``assert_close`` is used as is);
* record one row per (case, implementation, mode) (:func:`record`, :func:`record_skip`,
  :func:`record_failure`) in ``benchmark.extra_info`` and in :data:`RESULTS`;
  ``benchmarks/conftest.py`` writes them at session end with :func:`write_results`:
  ``<results_dir>/<family>.json`` and ``<results_dir>/summary.md``.

On a CPU-only machine the same code runs (host clock instead of CUDA events, no peak
memory), so the smoke grid exercises everything but the CUDA calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "vitkern-bench/1"
DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100's L2, assumed when the device does not say

#: Every row recorded in this process (all families), in recording order.
RESULTS: List[Dict[str, Any]] = []
#: Session-wide facts that the writer puts next to the rows (ceilings, settings).
SESSION: Dict[str, Any] = {}


# --------------------------------------------------------------------------- #
# Device facts
# --------------------------------------------------------------------------- #
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype(device: Optional[torch.device] = None) -> torch.dtype:
    """bf16 on the GPU (what ViTs train in); fp32 on CPU (the smoke grid)."""
    device = device or bench_device()
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def device_name(device: Optional[torch.device] = None) -> str:
    device = device or bench_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(device: Optional[torch.device] = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' on CPU."""
    device = device or bench_device()
    if device.type != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return slug or "cuda"


def l2_cache_bytes(device: Optional[torch.device] = None) -> int:
    device = device or bench_device()
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def rotation_count(bytes_per_set: int, device: Optional[torch.device] = None,
                   factor: float = 2.0, max_sets: int = 64) -> int:
    """How many input copies to rotate so that together they exceed ``factor`` x L2."""
    need = factor * l2_cache_bytes(device)
    return int(max(1, min(max_sets, math.ceil(need / max(1, bytes_per_set)))))


def grid_choice(config) -> str:
    """'full' or 'smoke' from --vk-grid (auto: full on a GPU, smoke on CPU). Usable at collection."""
    grid = config.getoption("--vk-grid", default="auto") or "auto"
    if grid == "auto":
        return "full" if torch.cuda.is_available() else "smoke"
    return grid


def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message', cut to ``limit`` characters (for skip/failure reasons)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:limit]


def time_left_s() -> Optional[float]:
    """Seconds left before ``$VK_BENCH_DEADLINE`` (a Unix time), or None when it is not set.

    ``scripts/gpu_check.sh`` sets it for each family's capped pytest run (the moment its
    SIGINT will come), so a bench file can record expensive rows it cannot finish (e.g.
    compiles) as skipped with that reason instead of being cut off silently.
    """
    raw = os.environ.get("VK_BENCH_DEADLINE")
    if not raw:
        return None
    try:
        return float(raw) - time.time()
    except ValueError:
        return None


def raise_recompile_limit(limit: int = 64) -> None:
    """Let one ``torch.compile``'d peer be reused across a family's shapes and modes.

    Dynamo's default recompile limit (8 per code object) is below what a grid needs, and
    past it dynamo silently runs eager, which would time the wrong thing: raise the limit
    and make hitting it an error (the peer is then recorded as skipped with the reason).
    """
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        try:
            if getattr(cfg, name) < limit:
                setattr(cfg, name, limit)
        except Exception:  # noqa: BLE001 - name absent in this torch
            pass
    try:
        cfg.fail_on_recompile_limit_hit = True
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- #
# Numerics helpers
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def exact_fp32():
    """fp32 convolutions and matmuls in full precision (no TF32) and no cuDNN autotuning.

    Used around the high-precision reference on the GPU: cuDNN runs fp32 convolutions in
    TF32 by default, which would make the "fp32" oracle barely better than bf16. Uses the
    long-standing ``allow_tf32`` flags (present in torch 2.4 ... 2.14), warnings silenced;
    a flag that cannot be read or set is left alone.
    """
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module, attr, value in ((torch.backends.cuda.matmul, "allow_tf32", False),
                                    (torch.backends.cudnn, "allow_tf32", False),
                                    (torch.backends.cudnn, "benchmark", False)):
            try:
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
            except Exception:  # noqa: BLE001 - a torch that rejects the old flag: keep its default
                pass
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for module, attr, value in reversed(saved):
                try:
                    setattr(module, attr, value)
                except Exception:  # noqa: BLE001
                    pass


def _rel_err_on_device(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """tests/helpers.rel_err, computed where the tensors live (float64) instead of on the CPU.

    The benchmarks compare tensors of up to 200 M elements; copying each to the host in
    float64 would dominate the run. Same formula: ||a - e|| / ||e||.
    """
    a = actual.detach()
    e = expected.detach()
    if e.device != a.device:
        e = e.to(a.device)
    a = a.to(torch.float64)
    e = e.to(torch.float64)
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


_HELPERS = None


def load_test_helpers():
    """tests/helpers.py (the correctness policy's ``assert_close``), loaded from the repo path.

    Loaded under a private module name so its ``rel_err`` can be computed on the device
    (see :func:`_rel_err_on_device`) without touching the copy the test suite imports;
    ``assert_close``'s budget logic (2x forward / 3x gradients of the same-dtype
    reference's error, fp32 rtol) is used unchanged.
    """
    global _HELPERS
    if _HELPERS is None:
        path = REPO_ROOT / "tests" / "helpers.py"
        spec = importlib.util.spec_from_file_location("_vitkern_bench_test_helpers", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.rel_err = _rel_err_on_device
        _HELPERS = module
    return _HELPERS


def assert_close(name, actual, reference_high, reference_same_dtype=None, *, grad=False) -> float:
    return load_test_helpers().assert_close(name, actual, reference_high, reference_same_dtype, grad=grad)


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #
class RotatingTimer:
    """The target handed to ``benchmark.pedantic``: one call of ``step`` per invocation.

    Each invocation takes the next argument set (round robin), and on CUDA records an event
    before and after the call and synchronises on the second one, so pytest-benchmark's
    host clock sees the whole GPU execution and :attr:`samples_ms` holds the device time
    of every call. Outputs are dropped at once, so memory does not pile up across rounds.
    """

    def __init__(self, step: Callable[[Any], Any], arg_sets: Sequence[Any], device: torch.device):
        if not arg_sets:
            raise ValueError("RotatingTimer needs at least one argument set")
        self.step = step
        self.arg_sets = list(arg_sets)
        self.device = device
        self.cuda = device.type == "cuda"
        self.calls = 0
        self.samples_ms: List[float] = []
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self) -> None:
        args = self.arg_sets[self.calls % len(self.arg_sets)]
        self.calls += 1
        if self.cuda:
            self._start.record()
            out = self.step(args)
            self._end.record()
            self._end.synchronize()
            self.samples_ms.append(self._start.elapsed_time(self._end))
        else:
            t0 = time.perf_counter()
            out = self.step(args)
            self.samples_ms.append((time.perf_counter() - t0) * 1e3)
        del out


@dataclasses.dataclass
class TimingSettings:
    """How many rounds to time. ``rounds=None``: adaptive, about ``target_s`` of timed calls."""

    rounds: Optional[int] = None
    warmup_rounds: int = 3
    pre_calls: int = 3
    target_s: float = 0.15
    min_rounds: int = 20
    max_rounds: int = 200

    @classmethod
    def for_device(cls, device: torch.device, rounds: Optional[int] = None) -> "TimingSettings":
        if device.type == "cuda":
            return cls(rounds=rounds)
        # CPU smoke runs: a few rounds prove the machinery; the times mean little.
        return cls(rounds=rounds, warmup_rounds=1, pre_calls=1, target_s=0.1, min_rounds=3, max_rounds=15)


@dataclasses.dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    min_ms: float
    rounds: int
    copies: int
    host_median_ms: Optional[float]
    clock: str  # "cuda-events" or "host"

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _quantiles(samples: Sequence[float]):
    if len(samples) >= 2:
        q = statistics.quantiles(samples, n=4, method="inclusive")
        return q[0], q[2]
    return samples[0], samples[0]


def time_call(benchmark, step: Callable[[Any], Any], arg_sets: Sequence[Any],
              settings: TimingSettings, device: Optional[torch.device] = None) -> Timing:
    """Time ``step(arg_set)`` with pytest-benchmark, rotating through ``arg_sets``.

    ``settings.pre_calls`` untimed calls first (they also estimate one call's time for the
    adaptive round count), then ``benchmark.pedantic`` with ``settings.warmup_rounds``
    warm-up rounds and the timed rounds, one call each. Returns the median of the timed
    calls' device times (CUDA events) on the GPU, of the host times on CPU.
    """
    device = device or bench_device()
    timer = RotatingTimer(step, arg_sets, device)
    for _ in range(max(1, settings.pre_calls)):
        timer()
    estimate_ms = statistics.median(timer.samples_ms)
    if settings.rounds:
        rounds = int(settings.rounds)
    else:
        want = int(settings.target_s * 1e3 / max(estimate_ms, 1e-3))
        rounds = max(settings.min_rounds, min(settings.max_rounds, want))
    first = len(timer.samples_ms)
    benchmark.pedantic(timer, rounds=rounds, warmup_rounds=settings.warmup_rounds, iterations=1)
    timed = timer.samples_ms[first:]
    if getattr(benchmark, "enabled", True) and len(timed) > settings.warmup_rounds:
        # pedantic runs the warm-up rounds, then the timed rounds (then, with
        # --benchmark-cprofile, profiled calls that are not timed).
        timed = timed[settings.warmup_rounds:settings.warmup_rounds + rounds]
    if not timed:  # --benchmark-disable and friends: fall back to the pre-calls
        timed = timer.samples_ms
    host_median = None
    try:
        host_median = float(benchmark.stats.stats.median) * 1e3
    except Exception:  # noqa: BLE001 - disabled benchmark: no stats
        pass
    q1, q3 = _quantiles(timed)
    return Timing(
        median_ms=float(statistics.median(timed)),
        iqr_ms=float(q3 - q1),
        min_ms=float(min(timed)),
        rounds=len(timed),
        copies=len(timer.arg_sets),
        host_median_ms=host_median,
        clock="cuda-events" if timer.cuda else "host",
    )


def median_time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> float:
    """Median device time of ``fn()`` (CUDA events per call), host time on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(samples))


def peak_memory_bytes(step: Callable[[Any], Any], args: Any,
                      device: Optional[torch.device] = None) -> Optional[int]:
    """Peak memory allocated during one call of ``step(args)``, above what was held before.

    Counts everything the call allocates through PyTorch's caching allocator (outputs,
    saved activations, gradients, workspaces). None on CPU.
    """
    device = device or bench_device()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step(args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(max(0, peak))


# --------------------------------------------------------------------------- #
# Ceilings and roofline
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class Ceilings:
    device: str
    dtype: str  # dtype of the matmul ceiling
    copy_bytes_per_s: float  # bytes read + written per second, large device copy
    matmul_flops_per_s: float  # large square matmul, random data
    copy_bytes: int
    matmul_n: int
    reps: int

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def measure_ceilings(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Ceilings:
    """The card's measured ceilings: a 1 GiB device-to-device copy and an 8192^3 matmul.

    Medians of 10 CUDA-event-timed repetitions after 3 warm-ups; random data (power draw
    depends on it). On CPU, smaller sizes (128 MiB, 1024^3) so the smoke run stays fast.
    """
    device = device or bench_device()
    dtype = dtype or bench_dtype(device)
    cuda = device.type == "cuda"
    copy_bytes = (1 << 30) if cuda else (128 << 20)
    n = 8192 if cuda else 1024
    reps, warmup = (10, 3) if cuda else (5, 1)

    src = torch.rand(copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t_copy = median_time_ms(lambda: dst.copy_(src), device, reps, warmup)
    del src, dst

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    t_mm = median_time_ms(lambda: torch.mm(a, b, out=c), device, reps, warmup)
    del a, b, c
    if cuda:
        torch.cuda.empty_cache()
    return Ceilings(
        device=device_name(device),
        dtype=dtype_name(dtype),
        copy_bytes_per_s=2 * copy_bytes / (t_copy * 1e-3),
        matmul_flops_per_s=2 * n ** 3 / (t_mm * 1e-3),
        copy_bytes=copy_bytes,
        matmul_n=n,
        reps=reps,
    )


def roofline_time_s(flops: float, min_bytes: float, ceilings: Optional[Ceilings]) -> Optional[float]:
    if ceilings is None:
        return None
    return max(flops / ceilings.matmul_flops_per_s, min_bytes / ceilings.copy_bytes_per_s)


def roofline_fraction(flops: float, min_bytes: float, seconds: float,
                      ceilings: Optional[Ceilings]) -> Optional[float]:
    """max(FLOPs / peak FLOP/s, bytes / peak bytes/s) / measured time: 1.0 = at the roofline."""
    floor = roofline_time_s(flops, min_bytes, ceilings)
    if floor is None or not seconds or seconds <= 0:
        return None
    return floor / seconds


# --------------------------------------------------------------------------- #
# Results collector
# --------------------------------------------------------------------------- #
ROLES = ("naive", "peer", "vitkern")
#: Families whose summary also compares peak memory with the naive row's ("peak vs naive" = this
#: row's peak / the naive row's peak of the same case and mode; < 1 = less memory). The Swin
#: issue's target is vitkern's peak memory against timm's naive path; PVT's issue asks for peak
#: memory too (its naive path materialises the N x Nk score matrix).
PEAK_RATIO_FAMILIES = ("swin", "pvt")


def _base_row(family, case, impl, role, dtype, mode, shape) -> Dict[str, Any]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return {
        "family": family,
        "case": case,
        "impl": impl,
        "role": role,
        "dtype": dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype),
        "mode": mode,
        "shape": dict(shape or {}),
    }


def record(benchmark, *, family: str, case: str, impl: str, role: str, dtype, mode: str,
           timing: Timing, flops: float, min_bytes: float, peak_mem_bytes: Optional[int],
           ceilings: Optional[Ceilings], shape: Optional[Dict[str, Any]] = None,
           errors: Optional[Dict[str, float]] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One timed row: into ``benchmark.extra_info`` (pytest-benchmark's JSON) and :data:`RESULTS`."""
    row = _base_row(family, case, impl, role, dtype, mode, shape)
    seconds = timing.median_ms * 1e-3
    floor = roofline_time_s(flops, min_bytes, ceilings)
    row.update(
        status="ok",
        median_ms=timing.median_ms,
        timing=timing.as_dict(),
        flops=int(flops),
        min_bytes=int(min_bytes),
        tflops_per_s=flops / seconds / 1e12 if seconds else None,
        gbytes_per_s=min_bytes / seconds / 1e9 if seconds else None,
        roofline_ms=floor * 1e3 if floor is not None else None,
        roofline_fraction=roofline_fraction(flops, min_bytes, seconds, ceilings),
        peak_mem_bytes=peak_mem_bytes,
        errors=dict(errors or {}),
    )
    if extra:
        row.update(extra)
    RESULTS.append(row)
    if benchmark is not None:
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "timing"})
        benchmark.extra_info["clock"] = timing.clock
    return row


def record_skip(*, family: str, case: str, impl: str, role: str, dtype, mode: str, reason: str,
                shape: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    row = _base_row(family, case, impl, role, dtype, mode, shape)
    row.update(status="skipped", reason=str(reason))
    RESULTS.append(row)
    return row


def record_failure(*, family: str, case: str, impl: str, role: str, dtype, mode: str, reason: str,
                   shape: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    row = _base_row(family, case, impl, role, dtype, mode, shape)
    row.update(status="failed", reason=str(reason)[:2000])
    RESULTS.append(row)
    return row


# --------------------------------------------------------------------------- #
# Environment
# --------------------------------------------------------------------------- #
def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except Exception:  # noqa: BLE001 - no git on the machine
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> Dict[str, Any]:
    """The commit measured: $VITKERN_COMMIT if set (copies without .git), else git's HEAD."""
    env_commit = os.environ.get("VITKERN_COMMIT")
    if env_commit:
        return {"commit": env_commit, "dirty": None, "source": "VITKERN_COMMIT"}
    head = _git("rev-parse", "HEAD")
    if head is None:
        return {"commit": "unknown", "dirty": None, "source": "git (no repository or no commit)"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(status) if status is not None else None, "source": "git"}


def environment(device: Optional[torch.device] = None) -> Dict[str, Any]:
    device = device or bench_device()
    env: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "device_slug": device_slug(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "triton": _dist_version("triton") or _dist_version("pytorch-triton"),
        "pytest_benchmark": _dist_version("pytest-benchmark"),
        "timm": _dist_version("timm"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "run_id": os.environ.get("VK_BENCH_RUN_ID") or None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        **git_commit(),
    }
    try:
        if torch.backends.cudnn.is_available():
            env["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            total_memory_gib=round(props.total_memory / 2 ** 30, 1),
            l2_cache_bytes=l2_cache_bytes(device),
        )
    else:
        env.update(cpu_threads=torch.get_num_threads())
    return env


# --------------------------------------------------------------------------- #
# Writing results
# --------------------------------------------------------------------------- #
def default_results_dir(rootpath: Path, device: Optional[torch.device] = None) -> Path:
    """benchmarks/results/<device-slug> on a GPU; .benchmarks/vitkern/cpu (git-ignored) on CPU."""
    device = device or bench_device()
    if device.type == "cuda":
        return Path(rootpath) / "benchmarks" / "results" / device_slug(device)
    return Path(rootpath) / ".benchmarks" / "vitkern" / "cpu"


def resolve_results_dir(option: Optional[str], rootpath: Path) -> Path:
    if option:
        path = Path(option).expanduser()
        return path if path.is_absolute() else Path.cwd() / path
    return default_results_dir(rootpath)


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def write_results(results_dir: Path, rows: Optional[List[Dict[str, Any]]] = None,
                  env: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Write ``<family>.json`` for every family in ``rows`` and rebuild ``summary.md``.

    A family's JSON is replaced as a whole by this run's rows. ``summary.md`` is rebuilt
    from every vitkern JSON in the folder, so families measured in earlier runs keep
    their section (each section names the date and commit it was measured at).
    """
    rows = RESULTS if rows is None else rows
    env = env or environment()
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    families: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    for family, family_rows in families.items():
        doc = {
            "schema": SCHEMA,
            "family": family,
            "environment": env,
            "ceilings": SESSION.get("ceilings"),
            "settings": SESSION.get("settings"),
            "rows": family_rows,
        }
        path = results_dir / f"{family}.json"
        path.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n", encoding="utf-8")
        written.append(path)
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - not ours / unreadable
            continue
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
            docs.append(doc)
    summary = results_dir / "summary.md"
    summary.write_text(render_summary(docs, env), encoding="utf-8")
    written.append(summary)
    return written


# ---- summary rendering ---------------------------------------------------- #
def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "–"
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def _fmt_x(ratio: Optional[float]) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def _fmt_pct(frac: Optional[float]) -> str:
    return "–" if frac is None else f"{100 * frac:.1f}%"


def _fmt_mib(nbytes: Optional[int]) -> str:
    return "–" if nbytes is None else f"{nbytes / 2 ** 20:.1f}"


def _shape_str(shape: Dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _group_key(row):
    return (row["case"], row["mode"])


def analyse(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (case, mode): naive time, best peer, best vitkern, speedups. Rows keep their order."""
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    out = []
    for (case, mode), members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        naive = next((r for r in ok if r["role"] == "naive"), None)
        peers = [r for r in ok if r["role"] == "peer"]
        ours = [r for r in ok if r["role"] == "vitkern"]
        best_peer = min(peers, key=lambda r: r["median_ms"]) if peers else None
        best_ours = min(ours, key=lambda r: r["median_ms"]) if ours else None
        out.append(dict(case=case, mode=mode, rows=members, naive=naive, best_peer=best_peer,
                        best_ours=best_ours, shape=members[0].get("shape", {}),
                        dtype=members[0].get("dtype")))
    return out


def _peak_ratio(row: Optional[Dict[str, Any]], group) -> Optional[float]:
    """This row's peak memory / the naive row's (same case and mode); None if either is unknown."""
    naive = group["naive"]
    if not row or not naive or not row.get("peak_mem_bytes") or not naive.get("peak_mem_bytes"):
        return None
    return row["peak_mem_bytes"] / naive["peak_mem_bytes"]


def _speedups(row, group):
    naive, peer = group["naive"], group["best_peer"]
    t = row.get("median_ms")
    vs_naive = naive["median_ms"] / t if (naive and t) else None
    vs_peer = peer["median_ms"] / t if (peer and t) else None
    return vs_naive, vs_peer


def _env_lines(env: Dict[str, Any]) -> List[str]:
    commit = env.get("commit", "unknown")
    if env.get("dirty"):
        commit += " (+ uncommitted changes)"
    return [
        f"- device: **{env.get('device')}**"
        + (f" (sm_{str(env.get('capability', '')).replace('.', '')}, {env.get('sm_count')} SMs, "
           f"{env.get('total_memory_gib')} GiB, L2 {env.get('l2_cache_bytes', 0) // 2 ** 20} MiB)"
           if env.get("capability") else ""),
        f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
        f"cuDNN {env.get('cudnn')}, python {env.get('python')}, pytest-benchmark {env.get('pytest_benchmark')}",
        f"- commit {commit}; measured {env.get('date_utc')}",
    ]


def same_run(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two family JSONs' environments come from one run.

    One pytest session writes one environment for all its families. Separate pytest
    invocations (scripts/gpu_check.sh runs one per family, each under its own time cap)
    count as one run when they share ``$VK_BENCH_RUN_ID``, the commit and the device.
    """
    keys = ("commit", "device")
    if a.get("run_id") and a.get("run_id") == b.get("run_id"):
        return all(a.get(k) == b.get(k) for k in keys)
    return all(a.get(k) == b.get(k) for k in keys + ("date_utc",))


def render_summary(docs: List[Dict[str, Any]], env: Dict[str, Any]) -> str:
    lines = ["# vitkern benchmark summary", ""]
    lines += _env_lines(env)
    ceil = SESSION.get("ceilings") or next((d.get("ceilings") for d in docs if d.get("ceilings")), None)
    if ceil:
        lines.append(f"- measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write, "
                     f"{ceil['copy_bytes'] >> 20} MiB), {ceil['dtype']} matmul "
                     f"{ceil['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s ({ceil['matmul_n']}³)")
    if env.get("device_slug") == "cpu":
        lines += ["- **CPU smoke run**: host-clock times of a tiny fp32 grid; they say nothing about GPU speed.",
                  "", "Times are medians of host-clock timings of one call each.", ""]
    else:
        lines += ["", "Times are medians over timed rounds of one call each, CUDA events around every call and a "
                  "synchronisation inside it, after warm-up; inputs rotate over copies that together exceed 2× L2.", ""]
    lines += [
        "*vs naive* / *vs best peer* = that time ÷ this row's time (> 1 = faster; best peer = fastest non-naive, "
        "non-vitkern implementation). *roofline* = max(FLOPs / matmul ceiling, minimum bytes / copy ceiling) ÷ time. "
        "*peak MiB* = memory allocated by one call above what was held before. *max rel err* = the largest relative "
        "error (output and gradients) against the high-precision reference.",
        "",
    ]
    for doc in sorted(docs, key=lambda d: d.get("family", "")):
        family = doc.get("family")
        fam_env = doc.get("environment", {})
        lines += [f"## {family}", ""]
        if not same_run(fam_env, env):
            lines += ["Measured in an earlier run:"] + _env_lines(fam_env) + [""]
        groups = analyse(doc.get("rows", []))
        peak_ratio = family in PEAK_RATIO_FAMILIES
        if peak_ratio:
            lines += ["*peak vs naive* = peak memory of that row ÷ the naive row's (same case and mode; "
                      "< 1 = less memory).", ""]
        # Overview: one line per (case, mode).
        lines += [
            "| case | mode | naive ms | best peer | peer ms | vitkern | vitkern ms | vs naive | vs best peer | roofline |"
            + (" naive peak MiB | vitkern peak MiB | peak vs naive |" if peak_ratio else ""),
            "|---|---|---:|---|---:|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if peak_ratio else ""),
        ]
        for g in groups:
            ours, peer, naive = g["best_ours"], g["best_peer"], g["naive"]
            vs_naive, vs_peer = _speedups(ours, g) if ours else (None, None)
            if ours is None:
                ours_name = next((r.get("status") for r in g["rows"]
                                  if r["role"] == "vitkern" and r.get("status") != "ok"), "not run")
            else:
                ours_name = ours["impl"]
            lines.append(
                f"| {g['case']} | {g['mode']} | {_fmt_ms(naive['median_ms']) if naive else '–'} | "
                f"{peer['impl'] if peer else '–'} | {_fmt_ms(peer['median_ms']) if peer else '–'} | "
                f"{ours_name} | {_fmt_ms(ours['median_ms']) if ours else '–'} | {_fmt_x(vs_naive)} | "
                f"{_fmt_x(vs_peer)} | {_fmt_pct(ours.get('roofline_fraction')) if ours else '–'} |"
                + (f" {_fmt_mib(naive.get('peak_mem_bytes')) if naive else '–'} | "
                   f"{_fmt_mib(ours.get('peak_mem_bytes')) if ours else '–'} | {_fmt_x(_peak_ratio(ours, g))} |"
                   if peak_ratio else ""))
        lines.append("")
        not_timed: Dict[str, List[str]] = {}
        for row in doc.get("rows", []):
            if row.get("status") != "ok":
                key = f"{row['impl']} {row.get('status')}: {row.get('reason', '')}"
                not_timed.setdefault(key, []).append(f"{row['case']} {row['mode']}")
        if not_timed:
            lines += ["Not timed:", ""]
            for key, where in not_timed.items():
                lines.append(f"- {key} ({len(where)} case{'s' if len(where) > 1 else ''})")
            lines.append("")
        # Detail: one table per case, every implementation and mode.
        cases: Dict[str, List[Dict[str, Any]]] = {}
        for g in groups:
            cases.setdefault(g["case"], []).append(g)
        for case, case_groups in cases.items():
            first = case_groups[0]
            lines += [f"### {family} · {case}", "",
                      f"{_shape_str(first['shape'])} · {first['dtype']}", "",
                      "| mode | impl | ms | vs naive | vs best peer | roofline | TFLOP/s | GB/s (min bytes) | peak MiB | "
                      + ("peak vs naive | " if peak_ratio else "") + "max rel err |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peak_ratio else "") + "---|"]
            for g in case_groups:
                for row in g["rows"]:
                    if row.get("status") != "ok":
                        lines.append(f"| {g['mode']} | {row['impl']} | {row.get('status')} | | | | | | | |"
                                     + (" |" if peak_ratio else ""))
                        continue
                    vs_naive, vs_peer = _speedups(row, g)
                    errs = row.get("errors") or {}
                    err = max(errs.values()) if errs else None
                    tf = row.get("tflops_per_s")
                    gb = row.get("gbytes_per_s")
                    lines.append(
                        f"| {g['mode']} | {row['impl']} | {_fmt_ms(row['median_ms'])} | {_fmt_x(vs_naive)} | "
                        f"{_fmt_x(vs_peer)} | {_fmt_pct(row.get('roofline_fraction'))} | "
                        f"{'–' if tf is None else f'{tf:.1f}'} | {'–' if gb is None else f'{gb:.0f}'} | "
                        f"{_fmt_mib(row.get('peak_mem_bytes'))} | "
                        + (f"{_fmt_x(_peak_ratio(row, g))} | " if peak_ratio else "")
                        + f"{'–' if err is None else f'{err:.2e}'} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
