"""vitkern: fused CUDA/Triton kernels for Vision Transformers.

Submodules load on first use so that ``import vitkern`` stays cheap and works on
machines with neither a GPU nor Triton:

* :mod:`vitkern.ops`       functional ops (each with ``backend=...``)
* :mod:`vitkern.nn`        drop-in replacements for timm modules
* :mod:`vitkern.models`    the seed's d2l ViT built from vitkern's ops
* :mod:`vitkern.reference` the naive PyTorch implementations the kernels must equal
* :mod:`vitkern.backends`  backend predicates and selection
* :mod:`vitkern.convert`   :func:`vitkern.optimize` - swap vitkern's modules into a timm model in place
* :mod:`vitkern.profiler`  the attention-cost profiler behind ``vitkern profile``

``vitkern.optimize(model, backend=None, verbose=False)`` is a function (loaded from
:mod:`vitkern.convert` on first use; it never imports timm itself).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("backends", "cli", "convert", "models", "nn", "ops", "profiler", "reference", "testing", "tools")
_FUNCTIONS = {"optimize": "vitkern.convert"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"vitkern.{name}")
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(_FUNCTIONS[name]), name)
        globals()[name] = value  # cache: later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'vitkern' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FUNCTIONS))
