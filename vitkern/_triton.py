"""Triton import shim: vitkern must import on machines without Triton.

When Triton is missing, ``triton.jit`` returns a placeholder whose launch raises,
and ``tl.constexpr`` exists so kernel signatures still evaluate. The Triton
backend's predicate reports the missing package before any launch is tried.
"""
from __future__ import annotations

import os
import types

try:  # pragma: no cover - exercised by whichever environment runs the tests
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a broken install
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton is not available ({TRITON_IMPORT_ERROR}); cannot launch {self.fn.__name__}")

    def _jit(fn=None, **_kwargs):
        if fn is None:
            return _MissingKernel
        return _MissingKernel(fn)

    triton = types.SimpleNamespace(jit=_jit)
    tl = types.SimpleNamespace(constexpr=object)

# Triton decides at kernel-definition time (our import) whether kernels run in the
# interpreter, so we record the setting as it was then.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
