"""Timing and peak memory of one config per backend on the current device.

* GPU: warm-up calls, then ``rounds`` calls each timed with CUDA events (median reported);
  peak memory = ``torch.cuda.max_memory_allocated()`` during the timed calls minus what was
  allocated before them (weights, input): the activations and workspaces of one call.
* CPU: host clock around each call (median). PyTorch keeps no allocator statistics for
  CPU tensors, so peak memory comes from one extra, untimed call under
  :class:`PeakTensorMemory`, which follows every tensor storage created during the call
  until it dies (the same quantity as on the GPU, minus kernels' internal scratch).

Each backend's extra call also runs under ``FlopCounterMode``: ``counted_gflops`` is what
the counter sees on this device (0 for CPU SDPA, which it does not count - the analytic
table comes from the meta-device count instead).
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vitkern._timing import synchronize, time_ms
from vitkern.profiler.specs import Built, Config, ModelUnavailable, build

__all__ = ["Measurement", "PeakTensorMemory", "Progress", "measure_config", "time_callable"]


@dataclass
class Measurement:
    backend: str
    status: str                     # "ok" | "n/a" | "skipped" | "oom" | "error"
    reason: str = ""
    ms: Optional[float] = None      # median wall time of one call (whole batch)
    ms_min: Optional[float] = None
    ms_max: Optional[float] = None
    spread: Optional[float] = None  # (max - min) / median of the timed calls: how noisy the figure is
    img_per_s: Optional[float] = None
    peak_mib: Optional[float] = None
    counted_gflops: Optional[float] = None  # FlopCounterMode on this device, per image
    rounds: int = 0
    speedup: Optional[float] = None  # naive ms / this ms

    def to_dict(self) -> dict:
        return asdict(self)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (any device).

    Storages are tracked through weak references, so tensors kept alive by autograd for the
    backward pass count until autograd frees them.
    """

    def __init__(self):
        super().__init__()
        self._live = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        out = func(*args, **(kwargs or {}))
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._live:
                    self._live[key] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class Progress:
    """tqdm on stderr when installed, else a small hand-written bar."""

    def __init__(self, total: int, desc: str = "measuring", enabled: bool = True):
        self.total, self.n, self.enabled, self._bar = max(total, 0), 0, enabled and total > 0, None
        self._desc = desc
        self._t0 = time.perf_counter()
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, desc=desc, file=sys.stderr, unit="run", dynamic_ncols=True,
                             leave=True)
        except ImportError:
            self._draw("")

    def set_label(self, label: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)
        else:
            self._draw(label)

    def update(self, label: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
        else:
            self._draw(label)

    def _draw(self, label: str) -> None:
        width = 24
        filled = int(width * self.n / self.total) if self.total else width
        elapsed = time.perf_counter() - self._t0
        sys.stderr.write(f"\r{self._desc}: [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} "
                         f"{elapsed:5.0f}s {label[:40]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


def time_callable(step: Callable[[], None], device: torch.device, warmup: int, rounds: int) -> List[float]:
    """Milliseconds of ``rounds`` calls of ``step`` after ``warmup`` calls (CUDA events on a GPU)."""
    return time_ms(step, device, warmup, rounds)


def _make_step(fn: Callable, model: torch.nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    if not backward:
        model.eval()

        def step():
            with torch.inference_mode():
                fn(x)
        return step

    model.train()
    grad = {}

    def step():
        model.zero_grad(set_to_none=True)
        out = fn(x)
        if "g" not in grad:  # a fixed random upstream gradient
            grad["g"] = torch.randn_like(out)
        out.backward(grad["g"])
    return step


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_config(config: Config, backends: Iterable[str], *, device: torch.device, dtype: torch.dtype,
                   batch: int, backward: bool, warmup: int, rounds: int,
                   progress: Optional[Progress] = None) -> List[Measurement]:
    """Time ``config`` with each backend (in the order naive, sdpa, vitkern). Never raises for a
    backend that cannot run or fails: its row says why."""
    backends = list(backends)
    results: List[Measurement] = []

    def tick(label):
        if progress is not None:
            progress.update(label)

    try:
        built: Built = build(config, device, dtype)
    except ModelUnavailable as exc:
        for b in backends:
            results.append(Measurement(b, "skipped", str(exc)))
            tick(f"{config.name} {config.resolution} {b}")
        return results
    x = torch.randn(batch, built.in_chans, config.resolution, config.resolution, device=device, dtype=dtype)
    for backend in backends:
        label = f"{config.name} {config.resolution} {backend}"
        if progress is not None:
            progress.set_label(label)
        fn = built.prepare(backend, device)
        if isinstance(fn, str):
            status = "skipped" if fn.startswith("skipped") else "n/a"
            reason = fn.split(": ", 1)[1] if fn.startswith(("skipped: ", "n/a: ")) else fn
            results.append(Measurement(backend, status, reason))
            tick(label)
            continue
        failed = None
        try:
            results.append(_measure_one(fn, built.model, x, backend, device, backward, warmup, rounds, batch))
        except Exception as exc:  # noqa: BLE001 - one failing backend must not stop the run
            if _is_oom(exc):
                failed = Measurement(backend, "oom", f"out of memory at batch {batch}")
            else:
                lines = str(exc).strip().splitlines() or [""]
                failed = Measurement(backend, "error", f"{type(exc).__name__}: {lines[0]}")
        if failed is not None:  # outside the except block: the traceback's tensors are gone now
            results.append(failed)
            built.model.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tick(label)
    naive = next((m for m in results if m.backend == "naive" and m.status == "ok"), None)
    for m in results:
        if naive is not None and m.status == "ok" and m.ms:
            m.speedup = naive.ms / m.ms
    del built, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _measure_one(fn, model, x, backend, device, backward, warmup, rounds, batch) -> Measurement:
    from vitkern.profiler.counting import flop_counter
    step = _make_step(fn, model, x, backward)
    counter = flop_counter()
    if device.type == "cuda":
        with counter:
            step()  # also the first warm-up call
        synchronize(device)
        model.zero_grad(set_to_none=True)  # each timed step starts without gradients
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        times = time_callable(step, device, max(warmup - 1, 0), rounds)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        times = time_callable(step, device, warmup, rounds)
        tracker = PeakTensorMemory()
        with counter, tracker:
            step()
        peak = tracker.peak / 2**20
    model.zero_grad(set_to_none=True)
    med = statistics.median(times)
    flops = counter.get_total_flops()
    return Measurement(backend, "ok", ms=med, ms_min=min(times), ms_max=max(times),
                       spread=(max(times) - min(times)) / med if med > 0 else 0.0, img_per_s=batch / (med / 1e3), peak_mib=peak,
                       counted_gflops=flops / batch / 1e9 if flops else 0.0, rounds=len(times))
