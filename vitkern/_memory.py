"""Output allocation for the kernels' launchers.

Tests switch on NaN poisoning so that every element a kernel forgets to write
shows up as NaN instead of as whatever ``torch.empty`` happened to hold.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


def poisoning() -> bool:
    return getattr(_state, "poison", False)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Inside this context, every kernel output buffer starts filled with NaN."""
    previous = poisoning()
    _state.poison = enabled
    try:
        yield
    finally:
        _state.poison = previous


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if poisoning() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """Like ``torch.empty_like`` (same strides for dense tensors), NaN-filled when poisoning."""
    out = torch.empty_like(t)
    if poisoning() and t.dtype.is_floating_point:
        out.fill_(float("nan"))
    return out
