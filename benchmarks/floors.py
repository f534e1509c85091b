"""Static floors: the fastest a benchmark case could run on an H200 / H100, for vitkern and for naive.

A floor is ``max(FLOPs / matmul peak, bytes / memory bandwidth)``: the time the larger of the
two resources needs at full speed. Two costs per (case, mode):

* **vitkern**: the fused kernel's FLOPs (the backward recomputes the scores, so attention
  counts 4 + 10 matmul passes) and its minimum bytes (each input read once, each output
  written once; the bench file's ``flops`` / ``min_bytes``);
* **naive**: what the naive reference's own op sequence must move, counted by running it on
  the meta device under :class:`TrafficCounter` (every op that is not a view reads its
  inputs once and writes its outputs once: the N×N scores and probabilities, the rolled and
  padded copies, the mask and bias tensors, the backward's dS), with torch's per-op FLOP formulas.

``floor_naive / floor_vitkern`` is the best speedup over naive that physics allows on that
card; the summary prints it beside the measured speedup. The naive count assumes no reuse
between ops through L2 (true when a tensor is larger than the 50-60 MB L2, as the scores
are at the GPU grid's batches).

Device figures (bf16):

* H200: measured on one H200 (about 4.3 TB/s device-to-device copy, read + write counted;
  about 790 TFLOP/s for a large bf16 matmul);
* H100 SXM5: NVIDIA's datasheet, 3.35 TB/s HBM3 and 989.4 TFLOP/s dense bf16 tensor-core
  throughput (the datasheet's 1,979 TFLOP/s assumes 2:4 sparsity, which no kernel here uses).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: Floors assume the GPU grid's dtype, also when the rows ran on CPU in fp32.
FLOOR_DTYPE = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str
    bytes_per_s: float
    flops_per_s: float
    source: str


H200 = DeviceSpec("H200", 4.3e12, 790e12, "measured on an H200: ~4.3 TB/s copy, ~790 TFLOP/s bf16 matmul")
H100 = DeviceSpec("H100", 3.35e12, 989.4e12, "H100 SXM5 datasheet: 3.35 TB/s HBM3, 989.4 TFLOP/s dense bf16")
DEVICES: Tuple[DeviceSpec, ...] = (H200, H100)


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int

    def floor_s(self, spec: DeviceSpec) -> float:
        return max(self.flops / spec.flops_per_s, self.bytes / spec.bytes_per_s)

    def bound(self, spec: DeviceSpec) -> str:
        """Which resource sets the floor: 'compute' or 'memory'."""
        return "compute" if self.flops / spec.flops_per_s >= self.bytes / spec.bytes_per_s else "memory"


def case_floors(kernel: Cost, naive: Cost, devices: Iterable[DeviceSpec] = DEVICES) -> Dict[str, Any]:
    """The record the harness stores per (case, mode): both costs, and per device both floors and
    ``speedup_bound`` = floor_naive / floor_vitkern."""
    out: Dict[str, Any] = {"dtype": str(FLOOR_DTYPE).replace("torch.", ""),
                           "vitkern": dataclasses.asdict(kernel), "naive": dataclasses.asdict(naive), "devices": {}}
    for spec in devices:
        k, n = kernel.floor_s(spec), naive.floor_s(spec)
        out["devices"][spec.name] = {
            "vitkern_us": k * 1e6, "naive_us": n * 1e6, "speedup_bound": n / k if k > 0 else None,
            "vitkern_bound": kernel.bound(spec), "naive_bound": naive.bound(spec),
        }
    return out


# --------------------------------------------------------------------------- #
# Counting what an eager op sequence moves
# --------------------------------------------------------------------------- #
def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses: an expanded (stride 0) dimension is read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _is_view(func) -> bool:
    """An op whose every result aliases an input without writing it (view, permute, expand, ...)."""
    returns = func._schema.returns
    if not returns:
        return False
    return all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


#: Ops that allocate without touching memory, or only return metadata.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh",
         "sym_size", "sym_stride", "sym_numel", "is_same_size", "_local_scalar_dense"}


#: In-place ops that overwrite their first argument without reading it.
_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_"}


class TrafficCounter(TorchDispatchMode):
    """Bytes an eager op sequence moves at least: every non-view op reads each tensor input once
    (its distinct elements) and writes each output once; and its FLOPs, by torch's own per-op
    formulas (``torch.utils.flop_counter``, without ``FlopCounterMode``'s module hooks, which
    ``torch.autograd.grad`` does not support). ``by_op`` keeps the bytes per op."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.flops = 0
        self.by_op: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        name = func.__name__.split(".")[0]
        if _is_view(func) or name in _FREE:
            return out
        read = args[1:] if name in _WRITE_ONLY else args
        # in-place ops count their target as read (an input) and written (the output)
        moved = sum(distinct_bytes(t) for t in tree_leaves((read, kwargs)) if isinstance(t, torch.Tensor))
        moved += sum(distinct_bytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.bytes += moved
        self.by_op[name] = self.by_op.get(name, 0) + moved
        return out


def count(fn: Callable[[], Any]) -> Tuple[Cost, Dict[str, int]]:
    """FLOPs and bytes (:class:`TrafficCounter`) of ``fn()``, forward and any backward it runs;
    call it on meta tensors so nothing is computed or allocated."""
    traffic = TrafficCounter()
    with traffic:
        fn()
    return Cost(traffic.flops, traffic.bytes), dict(traffic.by_op)


def meta(shape, requires_grad: bool = False, dtype: torch.dtype = FLOOR_DTYPE) -> torch.Tensor:
    """A meta tensor of ``shape`` (nothing allocated) in the floors' dtype."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta").requires_grad_(requires_grad)


def meta_like(t: Optional[torch.Tensor], requires_grad: Optional[bool] = None) -> Optional[torch.Tensor]:
    """:func:`meta` of ``t``'s shape with ``t``'s requires_grad (or the one given); None stays None."""
    if t is None:
        return None
    return meta(t.shape, t.requires_grad if requires_grad is None else requires_grad)


def meta_module(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` on the meta device in :data:`FLOOR_DTYPE` (the original is untouched)."""
    import copy

    return copy.deepcopy(module).to(device="meta", dtype=FLOOR_DTYPE)
