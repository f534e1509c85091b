"""Seeded random draws for tests/test_fuzz.py: sizes, tensor layouts, and the compare-with-reference loop.

Every draw is a pure function of (VITKERN_FUZZ_SEED, op, case index), so a failing case id reruns the
same inputs: ``pytest tests/test_fuzz.py -k "attention-017"``.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
from typing import Callable, Dict, Optional

import torch

from vitkern.testing import poison_outputs

from helpers import FORWARD_FACTOR, FP32_RTOL, GRAD_FACTOR, TF32_RTOL, assert_close, nan_padded

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HIGH = torch.float32 if ON_GPU else torch.float64
# The interpreter computes bf16 wrongly, so bf16 is drawn only on a GPU.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_GPU else ())

SEED = int(os.environ.get("VITKERN_FUZZ_SEED", "0"))
_EXAMPLES = os.environ.get("VITKERN_FUZZ_EXAMPLES")
CASE_TIMEOUT_S = float(os.environ.get("VITKERN_FUZZ_TIMEOUT", "120"))


def examples(ci_count: int, share: int = 1) -> int:
    """Draws: ``ci_count`` in CI; with VITKERN_FUZZ_EXAMPLES=N, N // ``share`` (at least ``ci_count``)."""
    return max(ci_count, int(_EXAMPLES) // share) if _EXAMPLES else ci_count


def rng_for(op: str, index: int) -> random.Random:
    return random.Random(f"{SEED}:{op}:{index}")  # str seeds hash with sha512: stable across runs


class Draw:
    """A case's random source; ``record`` keeps what was drawn, for the failure message."""

    def __init__(self, op: str, index: int):
        self.rng = rng_for(op, index)
        self.gen = torch.Generator().manual_seed(self.rng.getrandbits(62))
        self.drawn: Dict[str, object] = {}

    def record(self, **kw):
        self.drawn.update(kw)
        return kw[next(iter(kw))] if len(kw) == 1 else None

    def randn(self, *shape, dtype=torch.float32, scale=1.0, offset=0.0) -> torch.Tensor:
        """Values drawn on the CPU (the same on any device), then moved and cast."""
        t = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale + offset
        return t.to(device=DEVICE, dtype=dtype)

    def size(self, lo: int, hi: int, edges=()) -> int:
        """Uniform in [lo, hi], or (30%) one of ``edges``: sizes at tile boundaries."""
        if edges and self.rng.random() < 0.3:
            return self.rng.choice(edges)
        return self.rng.randint(lo, hi)

    def batch(self, hi: int) -> int:
        """Mostly 1..hi; 6% an empty batch (the replaced modules return empty outputs for it)."""
        return 0 if self.rng.random() < 0.06 else self.rng.randint(1, hi)

    def dtype(self) -> torch.dtype:
        return self.rng.choice(DTYPES)


# --------------------------------------------------------------------------- #
# Layouts: the same shape (and, except for "expanded", the same values) with other strides
# --------------------------------------------------------------------------- #
LAYOUTS = ("contiguous", "offset", "sliced", "permuted", "expanded")


def lay_out(t: torch.Tensor, kind: str, rng: random.Random, expand_dims=None) -> torch.Tensor:
    """``t`` re-laid-out as ``kind``; gaps around and between elements hold NaN, so a read through a
    wrong stride or past the view shows up as NaN.

    offset:   a view into a larger NaN buffer (storage offset, every stride larger);
    sliced:   every 2nd or 3rd element along one dimension of a NaN buffer;
    permuted: stored in a random dimension order (transposed, channels-last, ...);
    expanded: constant along one dimension, stored once (stride 0), as ``expand`` or the
              gradient of ``sum()`` gives. This changes the values: the reference is fed the result.
              ``expand_dims`` limits the dimensions (tokens that are all equal make attention's score
              gradients 0 by the math, which a relative comparison cannot check).
    """
    if t.dim() == 0 or kind == "contiguous":
        return t.clone()
    if kind == "offset":
        return nan_padded(t, pad=rng.randint(1, 3))
    if kind == "sliced":
        dim, step = rng.randrange(t.dim()), rng.randint(2, 3)
        shape = list(t.shape)
        shape[dim] *= step
        big = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
        index = [slice(None)] * t.dim()
        index[dim] = slice(rng.randrange(step), None, step)
        view = big[tuple(index)]
        view.copy_(t)
        return view
    if kind == "permuted":
        order = list(range(t.dim()))
        rng.shuffle(order)
        return t.permute(order).contiguous().permute([order.index(d) for d in range(t.dim())])
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "expanded":
        dims = [d for d in (range(t.dim()) if expand_dims is None else expand_dims) if t.shape[d] > 1]
        if not dims:
            return t.clone()
        d = rng.choice(dims)
        return t.narrow(d, 0, 1).clone().expand(t.shape)
    raise ValueError(kind)


HUGE_STRIDE = 2**30 + 1  # fits int32, but batch 2 starts at element 2^31 + 2: int32 addresses wrap


def huge_batch_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` (batch >= 3) with a batch stride of 2^30 + 1 elements. The buffer is never filled, so the
    OS maps only the pages of the view (on a GPU it is real memory: 2^31 elements)."""
    assert t.shape[0] >= 3
    inner = t[0].contiguous()
    big = torch.empty((t.shape[0] - 1) * HUGE_STRIDE + inner.numel(), dtype=t.dtype, device=t.device)
    view = big.as_strided(t.shape, (HUGE_STRIDE, *inner.stride()))
    view.copy_(t)
    return view


def draw_layout(d: Draw, name: str, t: torch.Tensor, kinds=LAYOUTS, p_contiguous=0.35,
                expand_dims=None) -> torch.Tensor:
    kind = "contiguous" if d.rng.random() < p_contiguous else d.rng.choice(kinds)
    d.drawn[f"{name}_layout"] = kind
    return lay_out(t, kind, d.rng, expand_dims)


def upstream_grad(d: Draw, shape, dtype) -> torch.Tensor:
    """A random upstream gradient, sometimes strided or stride-0 (as ``out.sum()`` gives)."""
    g = d.randn(*shape, dtype=dtype)
    if d.rng.random() < 0.1 and g.numel():
        d.drawn["grad_layout"] = "scalar_expanded"
        return g.reshape(-1)[:1].reshape([1] * g.dim()).expand(g.shape)
    return draw_layout(d, "grad", g, p_contiguous=0.5)


# --------------------------------------------------------------------------- #
# Running a case
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def time_limit(seconds: float = CASE_TIMEOUT_S):
    """A hang becomes a TimeoutError (the interpreter runs Python code, so SIGALRM interrupts it)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"fuzz case ran over {seconds:.0f} s (VITKERN_FUZZ_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def reported(d: Draw):
    """Any failure carries the draw, so it can be read (and reduced) without rerunning."""
    try:
        with time_limit():
            yield
    except BaseException as exc:  # noqa: BLE001 - re-raised with the draw attached
        exc.add_note("fuzz draw: " + ", ".join(f"{k}={v}" for k, v in d.drawn.items()))
        raise


def leaves(inputs: Dict[str, Optional[torch.Tensor]], needs: Dict[str, bool], dtype=None):
    """Copies of ``inputs`` (contiguous, in ``dtype`` when given) or the inputs themselves, with
    requires_grad as drawn. Non-tensors pass through."""
    out = {}
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():  # (index tensors stay as they are)
            out[name] = t
            continue
        t = t.detach() if dtype is None else t.detach().to(dtype).contiguous()
        out[name] = t.requires_grad_(needs.get(name, False))
    return out


def _grads(out, ins, names, grad_out):
    if not names:
        return {}
    if not out.requires_grad:  # e.g. only qkv_bias needs one and no window has padding: it is unused
        return {n: torch.zeros_like(ins[n]) for n in names}
    grads = torch.autograd.grad(out, [ins[n] for n in names], grad_out, allow_unused=True)
    # Unused means a zero gradient (e.g. the reference uses qkv_bias only for padding tokens).
    return {n: torch.zeros_like(ins[n]) if g is None else g for n, g in zip(names, grads)}


def assert_zero_close(name, actual, ref_high, ref_same, scale: float, grad=True):
    """For a gradient that is exactly 0 in exact arithmetic (a sum that cancels, e.g. the gradient of a
    bias broadcast over keys): the policy's budgets, with errors measured relative to ``scale``, the
    size of what was summed, instead of the (zero) result."""
    assert actual.shape == ref_high.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref_high.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in output"
    diff = lambda t: (t.detach().double().cpu() - ref_high.detach().double().cpu()).norm().item() / scale  # noqa
    err = diff(actual)
    if actual.dtype in (torch.float32, torch.float64):
        budget = TF32_RTOL if (actual.is_cuda and actual.dtype == torch.float32) else FP32_RTOL
    else:
        factor = GRAD_FACTOR if grad else FORWARD_FACTOR
        budget = max(factor * diff(ref_same), torch.finfo(actual.dtype).eps / 4)
    assert err <= budget, f"{name}: error {err:.3e} relative to the summed size > budget {budget:.3e}"


def check_against_reference(d: Draw, op: Callable, reference: Callable, inputs, needs, grad_out, dtype,
                            zero_scales: Optional[Callable] = None, rerun: bool = False):
    """Runs ``op(**inputs)`` (NaN-poisoned outputs) and ``reference`` on float64 (GPU: float32) and
    same-dtype copies; compares the output and the gradient of every input that needs one.

    ``zero_scales(ref_inputs) -> {name: scale}`` names gradients that are 0 by the math (see
    :func:`assert_zero_close`). ``rerun``: run the op again and require bit-for-bit equal results.
    """
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and needs.get(n)]
    ins = leaves(inputs, needs)

    def run_op():
        torch.manual_seed(d.drawn.get("torch_seed", 0))  # the ops draw their dropout seed from it
        with poison_outputs():
            out = op(**ins)
            return out, _grads(out, ins, names, grad_out)

    def run_ref(dt):
        torch.manual_seed(d.drawn.get("torch_seed", 0))
        r = leaves(inputs, needs, dt)
        out = reference(**r)
        return out, _grads(out, r, names, grad_out.to(dt)), r

    out, grads = run_op()
    ref_out, ref_grads, ref_ins = run_ref(HIGH)
    low = dtype not in (torch.float32, torch.float64)
    same_out, same_grads, _ = run_ref(dtype) if low else (None, {}, None)
    assert out.dtype == dtype, f"out: dtype {out.dtype} != {dtype}"
    assert_close("out", out, ref_out, same_out)
    scales = zero_scales(ref_ins) if zero_scales else {}
    for name in names:
        if name in scales:
            assert_zero_close(f"d{name}", grads[name], ref_grads[name], same_grads.get(name), scales[name])
        else:
            assert_close(f"d{name}", grads[name], ref_grads[name], same_grads.get(name), grad=True)
    if rerun:
        again, again_grads = run_op()
        assert torch.equal(out, again), "out: not bit-for-bit equal when run twice"
        for name in names:
            assert torch.equal(grads[name], again_grads[name]), f"d{name}: not bit-for-bit equal when run twice"


def dropout_reference_patch(mask_fn: Callable[[tuple], torch.Tensor]):
    """Inside this context the reference's attention dropout multiplies by ``mask_fn(probs.shape)``:
    the kernels' own keep mask (``dropout_keep_mask``), so a dropout run is compared exactly."""
    import unittest.mock

    import torch.nn.functional as F

    import vitkern.reference

    class _Functional:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def dropout(probs, p=0.5, training=True, inplace=False):
            return probs * mask_fn(tuple(probs.shape)).to(probs.dtype)

    return unittest.mock.patch.object(vitkern.reference, "F", _Functional())


def log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))
