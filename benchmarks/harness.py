"""The benchmark scaffold shared by every kernel family (``benchmarks/bench_<family>.py``).

A family file holds only its cases, its implementations (naive, peers, vitkern) and how to
build their inputs and references; this module does the rest:

* the grid and its parametrisation: :class:`Mode` (``FWD``, ``FWD_BWD``), :func:`grid`
  (full on a GPU, smoke on CPU), :func:`points` (case outermost, implementation innermost, so
  one (case, mode)'s inputs and references serve every implementation), :class:`Slot` (one
  such state alive at a time, so GPU memory stays bounded);
* skips: :func:`skip_reason` (what cannot run here: Triton timings under the interpreter,
  ``torch.compile`` and FlexAttention on CPU, ``--vk-compile=off``), :func:`skip` (recorded
  and skipped), :func:`skip_unless_interpreter` for the CPU equality tests;
* the protocol, :func:`equal_then_time`: the first call (which also compiles, outside the
  timing), equality of the output and every gradient with the reference under
  :mod:`vitkern.testing`'s rule (:func:`check_equal`), then :func:`time_call` (warm-up, CUDA
  events around every call, inputs rotated over copies exceeding 2x L2 so L2 does not
  flatter, median) and the peak memory of one call, recorded by :func:`record`;
* the static floors (:func:`note_floors`, ``floors.py``): per (case, mode) vitkern's and
  naive's FLOPs and minimum bytes and their floor times on an H200 / H100;
* the card's measured ceilings (:func:`measure_ceilings`, GPU only) for the roofline fraction;
* results: ``<results_dir>/<family>.json`` and ``summary.md`` (:func:`write_results`).

On a CPU-only machine the same code runs (host clock instead of CUDA events, no peak memory,
no ceilings), so the smoke grid exercises everything but the CUDA calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
import torch

import floors as _floors
from vitkern import _timing, _triton
from vitkern.testing import assert_close, rel_err  # noqa: F401 - the policy, re-exported for bench files

SCHEMA = "vitkern-bench/1"

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
    return _timing.device_name(device or bench_device())


def device_slug(device: Optional[torch.device] = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' on CPU."""
    return _timing.device_slug(device or bench_device())


def l2_cache_bytes(device: Optional[torch.device] = None) -> int:
    return _timing.l2_cache_bytes(device or bench_device())


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


synchronize = _timing.synchronize


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

    def __call__(self) -> None:
        args = self.arg_sets[self.calls % len(self.arg_sets)]
        self.calls += 1
        self.samples_ms.append(_timing.time_one(lambda: self.step(args), self.device))


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


#: Why the CPU smoke run has no ceilings (and so no roofline fraction).
CPU_CEILINGS_NOTE = ("not measured on CPU: the smoke shapes live in the CPU's caches, so a DRAM-sized copy "
                     "understates the bandwidth they see, and a matmul on a shared 2-core host is no stable peak; "
                     "fractions against such figures came out above 100 %")


def measure_ceilings(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Ceilings:
    """The card's measured ceilings: a 1 GiB device-to-device copy and an 8192^3 matmul.

    Medians of 10 CUDA-event-timed repetitions after 3 warm-ups; random data (power draw
    depends on it). GPU only: raises ValueError with :data:`CPU_CEILINGS_NOTE` on CPU.
    """
    device = device or bench_device()
    if device.type != "cuda":
        raise ValueError(CPU_CEILINGS_NOTE)
    dtype = dtype or bench_dtype(device)
    copy_bytes, n, reps, warmup = 1 << 30, 8192, 10, 3

    src = torch.rand(copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t_copy = _timing.median_ms(lambda: dst.copy_(src), device, reps, warmup)
    del src, dst

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    t_mm = _timing.median_ms(lambda: torch.mm(a, b, out=c), device, reps, warmup)
    del a, b, c
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
# Grid scaffolding
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Mode:
    """``name`` goes into the results, ``id`` into test ids; ``dx``: the input's gradient too
    (patch_embed times the image gradient separately, every other family always has it)."""

    name: str
    id: str
    backward: bool
    dx: bool = True


FWD = Mode("fwd", "fwd", backward=False, dx=False)
FWD_BWD = Mode("fwd+bwd", "fwd_bwd", backward=True)
MODES = (FWD, FWD_BWD)


def grid(config, full: Callable[[], List[Any]], smoke: Callable[[], List[Any]]) -> List[Any]:
    """The family's full grid on a GPU (or ``--vk-grid full``), its smoke grid otherwise."""
    return full() if grid_choice(config) == "full" else smoke()


def points(cases: Sequence[Any], modes: Sequence[Mode], impls: Iterable[str], prefix: str = ""):
    """(case, mode, impl) triples, case outermost and implementation innermost, and their test ids
    ``<prefix><case>-<mode>-<impl>``: one (case, mode)'s inputs and references serve every
    implementation before the next is built."""
    impls = list(impls)
    pts = [(c, m, i) for c in cases for m in modes for i in impls]
    return pts, [f"{prefix}{c.name}-{m.id}-{i}" for c, m, i in pts]


def parametrize(metafunc, fixture: str, cases: Sequence[Any], modes: Sequence[Mode], impls: Iterable[str],
                prefix: str = "") -> None:
    """Parametrise ``fixture`` (when the test uses it) with :func:`points`."""
    if fixture in metafunc.fixturenames:
        pts, ids = points(cases, modes, impls, prefix)
        metafunc.parametrize(fixture, pts, ids=ids)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Slot:
    """Holds one value (a case's inputs and references) at a time: asking for another key drops
    the old value, frees its memory, then builds the new one."""

    def __init__(self):
        self.key: Any = None
        self.value: Any = None

    def get(self, key, build: Callable[[], Any]):
        if self.key != key:
            self.clear()
            self.value = build()
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None
        free_memory()


def high_dtype(device: torch.device) -> torch.dtype:
    """The reference's dtype: fp32 (with TF32 off, see :func:`exact_fp32`) on a GPU, float64 on CPU."""
    return torch.float32 if device.type == "cuda" else torch.float64


def needs_same_dtype_reference(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def seed_of(*parts: Any) -> int:
    """A seed from a case's identity, so every run draws the same inputs and weights."""
    import zlib

    return zlib.crc32("/".join(str(p) for p in parts).encode())


def seeded_generator(device: torch.device, *parts: Any) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed_of(*parts))
    return gen


# --------------------------------------------------------------------------- #
# Skips
# --------------------------------------------------------------------------- #
#: What cannot run without a GPU, per kind of implementation.
NO_GPU = {
    "triton": ("no CUDA GPU: Triton kernels run on CPU only under TRITON_INTERPRET=1, whose timings are "
               "meaningless; equality is checked by the *_interpreter_equality tests"),
    "compile": "no CUDA GPU: torch.compile on CPU takes minutes per shape and is not the comparison of interest",
    "flex": ("no CUDA GPU: FlexAttention's fused kernels come from torch.compile (Triton) and it has no CPU "
             "backward; compiling on CPU takes minutes per shape and is not the comparison of interest"),
}


def skip_reason(kind: Optional[str], settings) -> Optional[str]:
    """Why an implementation of ``kind`` ('triton' | 'compile' | 'flex' | None) cannot run here."""
    if kind is None:
        return None
    if settings.device.type != "cuda":
        return NO_GPU[kind]
    if kind in ("compile", "flex") and settings.compile == "off":
        return "--vk-compile=off"
    return None


def skip(common: Dict[str, Any], reason: str):
    """Record the row as skipped with ``reason`` and skip the test."""
    record_skip(**common, reason=reason)
    pytest.skip(reason)


def skip_unless_interpreter(needs: Callable[[], None] = lambda: None) -> None:
    """For the CPU equality tests of vitkern's kernels: skip on a GPU (the timed rows check equality
    there), without TRITON_INTERPRET, or when ``needs()`` raises ImportError (timm, FlexAttention)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU every timed vitkern_triton case checks its own equality")
    if not _triton.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before vitkern was imported")
    try:
        needs()
    except ImportError as exc:
        pytest.skip(f"missing: {exc}")


def row_id(family: str, case: str, impl: str, role: str, settings, mode: Mode,
           shape: Dict[str, Any]) -> Dict[str, Any]:
    """The identity of one result row (the ``common`` keyword arguments of record / record_skip)."""
    return dict(family=family, case=case, impl=impl, role=role, dtype=settings.dtype, mode=mode.name,
                shape=dict(shape))


# --------------------------------------------------------------------------- #
# The protocol: equality first, then timing
# --------------------------------------------------------------------------- #
def check_equal(impl: str, out: torch.Tensor, grads: Sequence[torch.Tensor], keys: Sequence[str],
                ref_high: Dict[str, torch.Tensor], ref_same: Optional[Dict[str, torch.Tensor]],
                special: Optional[Dict[str, Callable[[str, torch.Tensor], Dict[str, float]]]] = None
                ) -> Dict[str, float]:
    """The output and each gradient (``keys[i]`` names ``grads[i]``) against the high-precision
    reference, within the budget of :func:`vitkern.testing.assert_close`; a key in ``special`` is
    checked by its own function instead (returning its errors). Returns every error."""
    same = ref_same or {}
    errors = {"out": assert_close(f"{impl} out", out, ref_high["out"], same.get("out"))}
    for key, g in zip(keys, grads):
        if special and key in special:
            errors.update(special[key](impl, g))
            continue
        errors[key] = assert_close(f"{impl} {key}", g, ref_high[key], same.get(key), grad=True)
    return errors


class FirstCallFailed(Exception):
    """The first call of a peer that may legitimately fail (a compile) raised; ``__cause__`` says why."""


def equal_then_time(benchmark, settings, ceilings, common: Dict[str, Any], step: Callable[[Any], Any],
                    arg_sets: Sequence[Any], check: Callable[[Any, Any], Dict[str, float]], *,
                    flops: float, min_bytes: float, extra: Optional[Dict[str, Any]] = None,
                    may_fail: bool = False) -> Dict[str, Any]:
    """One row: ``step(arg_sets[0])`` (which also compiles / JITs / autotunes, outside the timing),
    ``check(out, grads)`` (equality; a failure is recorded and re-raised), then the timing over the
    rotated ``arg_sets``, the peak memory of one call, and :func:`record`.

    An exception of the first call is recorded as a failure and re-raised, or with ``may_fail``
    (a peer that may not compile) raised as :class:`FirstCallFailed` for the caller to record.
    """
    t0 = time.perf_counter()
    try:
        out, grads = step(arg_sets[0])
    except Exception as exc:
        if may_fail:
            raise FirstCallFailed(first_line(exc)) from exc
        record_failure(**common, reason=first_line(exc))
        raise
    first_call_s = time.perf_counter() - t0
    try:
        errors = check(out, grads)
    except AssertionError as exc:
        record_failure(**common, reason=f"equality: {exc}")
        raise
    del out, grads
    timing = time_call(benchmark, step, arg_sets, settings.timing, settings.device)
    peak = peak_memory_bytes(step, arg_sets[0], settings.device)
    return record(benchmark, **common, timing=timing, flops=flops, min_bytes=min_bytes, peak_mem_bytes=peak,
                  ceilings=ceilings, errors=errors,
                  extra={"first_call_s": round(first_call_s, 3), **(extra or {})})


def x_step(fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor], backward: bool,
           *args: Any) -> Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, Sequence[torch.Tensor]]]:
    """The timed call of a module-level row, on an argument set ``{"x": ..., "grad": ...}``:
    ``fn(x, *args)`` under ``torch.no_grad()`` (inference), or with ``backward`` forward +
    ``torch.autograd.grad`` for x and ``params`` (no ``.grad`` accumulation is timed)."""
    params = list(params)
    if not backward:
        def step(a):
            with torch.no_grad():
                return fn(a["x"], *args), ()
    else:
        def step(a):
            out = fn(a["x"], *args)
            return out, torch.autograd.grad(out, [a["x"]] + params, a["grad"])
    return step


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- #
# Static floors (floors.py): once per (family, case, mode)
# --------------------------------------------------------------------------- #
#: (family, case, mode) -> floors record (floors.case_floors plus the case's shape).
FLOORS: Dict[Tuple[str, str, str], Dict[str, Any]] = {}


def note_floors(family: str, case: str, mode: Mode, shape: Dict[str, Any], *,
                kernel: Callable[[int], Tuple[int, int]], naive: Callable[[], Any]) -> None:
    """Record the static floors of one (case, mode), once: ``kernel(elem)`` gives vitkern's
    (FLOPs, minimum bytes) at element size ``elem``; ``naive()`` runs the naive reference (forward,
    and the backward the mode times) on meta tensors built with :func:`floors.meta_like` /
    :func:`floors.meta_module`. Any error is recorded in place of the naive cost."""
    key = (family, case, mode.name)
    if key in FLOORS:
        return
    k_flops, k_bytes = kernel(element_size(_floors.FLOOR_DTYPE))
    kernel_cost = _floors.Cost(int(k_flops), int(k_bytes))
    try:
        naive_cost, by_op = _floors.count(naive)
    except Exception as exc:  # noqa: BLE001 - an op without a meta kernel: say so, keep the kernel floor
        FLOORS[key] = {"family": family, "case": case, "mode": mode.name, "shape": dict(shape),
                       "vitkern": dataclasses.asdict(kernel_cost), "naive_error": first_line(exc)}
        return
    rec = _floors.case_floors(kernel_cost, naive_cost)
    rec.update(family=family, case=case, mode=mode.name, shape=dict(shape), naive_bytes_by_op=by_op)
    FLOORS[key] = rec


def grad_step(fn: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
              grad: Optional[torch.Tensor], params: Iterable[torch.Tensor] = ()) -> Callable[[], Any]:
    """``fn(*inputs)`` and, with ``grad``, ``torch.autograd.grad`` for the inputs and ``params`` that
    require grad (as the timed steps do): the naive call whose cost :func:`note_floors` counts."""
    def run():
        out = fn(*inputs)
        if grad is not None:
            wrt = [t for t in list(inputs) + list(params) if t is not None and t.requires_grad]
            torch.autograd.grad(out, wrt, grad, allow_unused=True)
    return run


# --------------------------------------------------------------------------- #
# Results collector
# --------------------------------------------------------------------------- #
ROLES = ("naive", "peer", "vitkern")
#: Families whose summary also compares peak memory with the naive row's ("peak vs naive" = this
#: row's peak / the naive row's peak of the same case and mode; < 1 = less memory). The Swin
#: issue's target is vitkern's peak memory against timm's naive path; PVT's issue asks for peak
#: memory too (its naive path materialises the N x Nk score matrix); the whole-model issue's memory target
#: is "no model uses more peak memory than timm eager" (the models family's naive row).
PEAK_RATIO_FAMILIES = ("window_attention", "sr_attention", "models")


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
def environment(device: Optional[torch.device] = None) -> Dict[str, Any]:
    device = device or bench_device()
    env = _timing.environment(device)
    env.update(device=env["device_name"], pytest_benchmark=_timing.dist_version("pytest-benchmark"),
               triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
               run_id=os.environ.get("VK_BENCH_RUN_ID") or None,
               cudnn_benchmark=bool(torch.backends.cudnn.benchmark))
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
            "ceilings_note": SESSION.get("ceilings_note"),
            "settings": SESSION.get("settings"),
            "floor_devices": [dataclasses.asdict(d) for d in _floors.DEVICES],
            "floors": [f for f in FLOORS.values() if f["family"] == family],
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


def _fmt_sig(value: Optional[float], digits: int = 3) -> str:
    """``digits`` significant digits (CPU rates are tiny; a fixed 0.1 would print 0.0)."""
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _fmt_roof(frac: Optional[float]) -> str:
    """A fraction over 100 % means the ceiling or the floor is wrong: flagged, not hidden."""
    return _fmt_pct(frac) + (" (!)" if frac is not None and frac > 1.0 else "")


def _floor_of(floors_by_key: Dict[Any, Dict[str, Any]], case: str, mode: str, device: str):
    rec = floors_by_key.get((case, mode))
    if not rec or "devices" not in rec:
        return None
    return rec["devices"].get(device)


def floors_table(floors: List[Dict[str, Any]], rows: Optional[List[Dict[str, Any]]] = None) -> List[str]:
    """One markdown row per (case, mode): FLOPs and bytes of vitkern and naive, floors on each device,
    and with ``rows`` the measured speedup of the best vitkern row over naive beside the bounds."""
    names = [d.name for d in _floors.DEVICES]
    measured: Dict[Tuple[str, str], Optional[float]] = {}
    for g in analyse(rows or []):
        measured[(g["case"], g["mode"])] = _speedups(g["best_ours"], g)[0] if g["best_ours"] else None
    lines = ["| case | mode | GFLOP vitkern / naive | MB vitkern / naive | "
             + " | ".join(f"{n} floor µs vitkern / naive | {n} bound ×" for n in names)
             + (" | measured vs naive |" if rows is not None else " |"),
             "|---|---|---:|---:|" + "---:|---:|" * len(names) + ("---:|" if rows is not None else "")]
    for rec in floors:
        k = rec["vitkern"]
        tail = f" {_fmt_x(measured.get((rec['case'], rec['mode'])))} |" if rows is not None else ""
        if "naive" not in rec:
            lines.append(f"| {rec['case']} | {rec['mode']} | {k['flops'] / 1e9:.3g} / – | {k['bytes'] / 1e6:.3g} / – | "
                         + " | ".join("– | –" for _ in names) + f" |{tail} (naive not counted: {rec.get('naive_error')})")
            continue
        n = rec["naive"]
        cells = []
        for name in names:
            d = rec["devices"][name]
            cells.append(f"{_fmt_sig(d['vitkern_us'])} / {_fmt_sig(d['naive_us'])} | {_fmt_x(d['speedup_bound'])}")
        lines.append(f"| {rec['case']} | {rec['mode']} | {k['flops'] / 1e9:.3g} / {n['flops'] / 1e9:.3g} | "
                     f"{k['bytes'] / 1e6:.3g} / {n['bytes'] / 1e6:.3g} | " + " | ".join(cells) + " |" + tail)
    return lines


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


#: The whole-model issue's training-step targets (speedup of the best vitkern row over timm eager and
#: over timm + torch.compile, same run), by timm model name; MAE's eager target is against the reference MAE.
MODEL_TARGETS = {"swin_tiny_patch4_window7_224": (1.5, 1.15), "pvt_v2_b2": (1.4, 1.1),
                 "vit_base_patch16_224": (1.1, 1.0), "mae_vit_base_patch16": (1.3, None)}


def _target_cell(measured: Optional[float], target: Optional[float]) -> str:
    if target is None:
        return _fmt_x(measured)
    if measured is None:
        return f"– (target {target:g}×)"
    return f"{_fmt_x(measured)} ({'meets' if measured >= target else 'misses'} {target:g}×)"


def models_lines(groups: List[Dict[str, Any]]) -> List[str]:
    """The models family's overview: images/s per implementation, the best vitkern row against timm
    eager and timm + compile beside the issue's targets, and every vitkern row whose peak memory is
    above timm eager's (the issue's memory target)."""
    impls = ("timm_eager", "timm_compile", "vitkern", "vitkern_compile")
    lines = ["Images/s per implementation; best vitkern against timm eager and timm + torch.compile (targets "
             "of the training step in brackets):", "",
             "| case | mode | " + " | ".join(f"{i} img/s" for i in impls) + " | vitkern vs eager | vitkern vs compile |",
             "|---|---|" + "---:|" * (len(impls) + 2)]
    over = []
    for g in groups:
        by_impl = {r["impl"]: r for r in g["rows"] if r.get("status") == "ok"}
        cells = [_fmt_sig(by_impl[i].get("images_per_s")) if i in by_impl else "–" for i in impls]
        ours, eager, comp = g["best_ours"], by_impl.get("timm_eager"), by_impl.get("timm_compile")
        vs_eager = eager["median_ms"] / ours["median_ms"] if ours and eager else None
        vs_comp = comp["median_ms"] / ours["median_ms"] if ours and comp else None
        model = (g["rows"][0].get("shape") or {}).get("model")
        targets = MODEL_TARGETS.get(model, (None, None)) if g["mode"] == "train" else (None, None)
        lines.append(f"| {g['case']} | {g['mode']} | " + " | ".join(cells)
                     + f" | {_target_cell(vs_eager, targets[0])} | {_target_cell(vs_comp, targets[1])} |")
        for impl in ("vitkern", "vitkern_compile"):
            row = by_impl.get(impl)
            ratio = _peak_ratio(row, g)
            if ratio is not None and ratio > 1.0:
                over.append(f"- **{g['case']} {g['mode']} {impl}**: peak {_fmt_mib(row['peak_mem_bytes'])} MiB, "
                            f"{ratio:.2f}× timm eager's {_fmt_mib(eager['peak_mem_bytes'])} MiB")
    lines.append("")
    if over:
        lines += ["Memory target missed (vitkern above timm eager's peak memory):", ""] + over + [""]
    elif any(r.get("peak_mem_bytes") for g in groups for r in g["rows"]):
        lines += ["Memory target: no vitkern row above timm eager's peak memory.", ""]
    return lines


def render_summary(docs: List[Dict[str, Any]], env: Dict[str, Any]) -> str:
    lines = ["# vitkern benchmark summary", ""]
    lines += _env_lines(env)
    ceil = SESSION.get("ceilings") or next((d.get("ceilings") for d in docs if d.get("ceilings")), None)
    if ceil:
        lines.append(f"- measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write, "
                     f"{ceil['copy_bytes'] >> 20} MiB), {ceil['dtype']} matmul "
                     f"{ceil['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s ({ceil['matmul_n']}³)")
    else:
        note = SESSION.get("ceilings_note") or next((d.get("ceilings_note") for d in docs if d.get("ceilings_note")),
                                                    None) or SESSION.get("ceilings_error") or "not measured"
        lines.append(f"- ceilings: {note}; so no roofline fraction (the static floors below are the card's figures)")
    lines.append("- static floors (bf16): " + "; ".join(f"{d.name} {d.bytes_per_s / 1e12:g} TB/s and "
                                                        f"{d.flops_per_s / 1e12:g} TFLOP/s ({d.source})"
                                                        for d in _floors.DEVICES))
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
        "error (output and gradients) against the high-precision reference. *floor* = max(FLOPs / peak FLOP/s, "
        "minimum bytes / bandwidth) on that card, for vitkern's fused kernel and for the naive reference's op "
        "sequence (its N×N scores, copies and masks counted on the meta device); *bound* = floor naive ÷ floor "
        "vitkern, the largest speedup over naive physics allows, beside the measured *vs naive*.",
        "",
    ]
    for doc in sorted(docs, key=lambda d: d.get("family", "")):
        family = doc.get("family")
        fam_env = doc.get("environment", {})
        lines += [f"## {family}", ""]
        if not same_run(fam_env, env):
            lines += ["Measured in an earlier run:"] + _env_lines(fam_env) + [""]
        groups = analyse(doc.get("rows", []))
        floors_by_key = {(f["case"], f["mode"]): f for f in doc.get("floors") or []}
        first_dev = _floors.DEVICES[0].name
        peak_ratio = family in PEAK_RATIO_FAMILIES
        if peak_ratio:
            lines += ["*peak vs naive* = peak memory of that row ÷ the naive row's (same case and mode; "
                      "< 1 = less memory).", ""]
        # Overview: one line per (case, mode).
        lines += [
            f"| case | mode | naive ms | best peer | peer ms | vitkern | vitkern ms | vs naive | bound ({first_dev}) | "
            "vs best peer | roofline |"
            + (" naive peak MiB | vitkern peak MiB | peak vs naive |" if peak_ratio else ""),
            "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if peak_ratio else ""),
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
                f"{_fmt_x((_floor_of(floors_by_key, g['case'], g['mode'], first_dev) or {}).get('speedup_bound'))} | "
                f"{_fmt_x(vs_peer)} | {_fmt_roof(ours.get('roofline_fraction')) if ours else '–'} |"
                + (f" {_fmt_mib(naive.get('peak_mem_bytes')) if naive else '–'} | "
                   f"{_fmt_mib(ours.get('peak_mem_bytes')) if ours else '–'} | {_fmt_x(_peak_ratio(ours, g))} |"
                   if peak_ratio else ""))
        lines.append("")
        if floors_by_key:
            lines += ["Static floors (bf16, whatever dtype the rows ran in) beside the measured speedup of the best "
                      "vitkern row:", ""] + floors_table(list(floors_by_key.values()), doc.get("rows", [])) + [""]
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
        if family == "models":
            lines += models_lines(groups)
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
                        f"{_fmt_x(vs_peer)} | {_fmt_roof(row.get('roofline_fraction'))} | "
                        f"{_fmt_sig(tf)} | {_fmt_sig(gb)} | "
                        f"{_fmt_mib(row.get('peak_mem_bytes'))} | "
                        + (f"{_fmt_x(_peak_ratio(row, g))} | " if peak_ratio else "")
                        + f"{'–' if err is None else f'{err:.2e}'} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
