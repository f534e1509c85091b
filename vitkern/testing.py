"""The correctness policy of vitkern's tests and benchmarks (one copy for both).

* fp32: relative error vs the float64 reference below ``FP32_RTOL`` (CPU and the
  Triton interpreter) or ``TF32_RTOL`` (GPU, where fp32 dots run in tf32).
* fp16 / bf16 (the FlashAttention rule): the kernel's relative error vs the
  high-precision reference is at most ``factor`` times the error of the same-dtype
  PyTorch reference (``FORWARD_FACTOR`` = 2x forward, ``GRAD_FACTOR`` = 3x gradients).
* :func:`poison_outputs` fills every kernel output with NaN first, :func:`nan_padded`
  surrounds an input with NaN, so unwritten elements and out-of-bounds reads show.
"""
from __future__ import annotations

import inspect

import torch

from vitkern._memory import poison_outputs

__all__ = ["FP32_RTOL", "TF32_RTOL", "FORWARD_FACTOR", "GRAD_FACTOR", "rel_err", "assert_close", "nan_padded",
           "assert_drop_in_signature", "randomise_parameters", "poison_outputs"]

FP32_RTOL = 1e-5
TF32_RTOL = 1e-3
FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64, computed where ``actual`` lives.

    On the device, so the benchmarks' 100M-element comparisons need no float64 host copy.
    """
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_close(name, actual, reference_high, reference_same_dtype=None, *, grad=False):
    """Compare ``actual`` to the high-precision reference under the dtype's budget; returns the error."""
    assert actual.shape == reference_high.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference_high.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in output (unwritten or out-of-bounds read?)"
    err = rel_err(actual, reference_high)
    if actual.dtype in (torch.float32, torch.float64):
        budget = TF32_RTOL if (actual.is_cuda and actual.dtype == torch.float32) else FP32_RTOL
        assert err <= budget, f"{name}: relative error {err:.3e} > {budget:.1e} ({actual.dtype})"
        return err
    assert reference_same_dtype is not None, f"{name}: low-precision check needs the same-dtype reference"
    ref_err = rel_err(reference_same_dtype, reference_high)
    factor = GRAD_FACTOR if grad else FORWARD_FACTOR
    # A floor of a quarter ulp keeps an exact same-dtype reference from demanding exactness.
    budget = max(factor * ref_err, torch.finfo(actual.dtype).eps / 4)
    assert err <= budget, (f"{name}: relative error {err:.3e} > {factor}x the {actual.dtype} reference's "
                           f"{ref_err:.3e} (budget {budget:.3e})")
    return err


def nan_padded(t: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """The same values as ``t``, as a strided view into a NaN-filled larger buffer.

    Any read outside the view's extent (a missing mask, a wrong stride) picks up NaN.
    """
    big = torch.full([s + 2 * pad for s in t.shape], float("nan"), dtype=t.dtype, device=t.device)
    view = big[tuple(slice(pad, pad + s) for s in t.shape)]
    view.copy_(t)
    return view


def assert_drop_in_signature(ours, theirs, methods=("forward",)):
    """``ours.__init__`` takes ``theirs.__init__``'s arguments in order with the same defaults, plus a
    keyword-only ``backend="auto"``; each of ``methods`` has the same parameter names."""
    params = inspect.signature(ours.__init__).parameters
    ref = inspect.signature(theirs.__init__).parameters
    expected = [n for n in ref if n != "self"]
    assert [n for n in params if n != "self"][: len(expected)] == expected
    for name in expected:
        assert params[name].default == ref[name].default, name
        assert params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
    assert params["backend"].kind is inspect.Parameter.KEYWORD_ONLY and params["backend"].default == "auto"
    for method in methods:
        assert list(inspect.signature(getattr(ours, method)).parameters) == \
            list(inspect.signature(getattr(theirs, method)).parameters), method


def randomise_parameters(module: torch.nn.Module, norm_prefix: str = "norm.") -> None:
    """Every parameter random: matrices and conv kernels at about their init scale (the softmax stays
    unsaturated), biases and LayerNorm affines (``<norm_prefix>weight``: around 1) O(1); timm starts
    them at 0 / 1, which would leave their gradients untested."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * (p.shape[1] * p[0, 0].numel()) ** -0.5)
            elif name.startswith(norm_prefix) and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
