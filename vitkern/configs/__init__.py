"""Launch configs measured per GPU by ``python -m vitkern.tools.tune``, read by the launchers.

A table is ``vitkern/configs/<gpu-slug>.json`` (slug of ``torch.cuda.get_device_name()``, e.g.
``h200``)::

    {"gpu": "NVIDIA H200", "triton": "3.6.0", "entries": {
        "attention.fwd|bfloat16|d64|bias0|dropout0": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4,
                                                      "num_stages": 3, "ms": 0.41}}}

:func:`lookup` returns the entry's launch settings, or None (no GPU, no table for this GPU, no entry
for the shape class, or Triton's interpreter, whose tiles are chosen for numpy's cost): the
launchers then use their own heuristics. ``VITKERN_CONFIG_TABLE=path``
reads that table instead (tests, or trying a freshly tuned table before committing it).
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Optional

LAUNCH_KEYS = ("num_warps", "num_stages")


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[len("nvidia-"):] if slug.startswith("nvidia-") else slug


def table_path() -> Optional[str]:
    path = os.environ.get("VITKERN_CONFIG_TABLE")
    if path:
        return path
    import torch
    if not torch.cuda.is_available():
        return None
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), gpu_slug(torch.cuda.get_device_name()) + ".json")


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> dict:
    with open(path) as f:
        return json.load(f).get("entries", {})


def lookup(kernel: str, shape_class: str) -> Optional[dict]:
    """Tuned {BLOCK_*: .., num_warps, num_stages} for ``kernel|shape_class``, or None."""
    from vitkern import _triton
    if _triton.INTERPRET:  # a table never changes the interpreter's tiles
        return None
    path = table_path()
    if path is None or not os.path.exists(path):
        return None
    entry = _load(path, os.path.getmtime(path)).get(f"{kernel}|{shape_class}")
    if not entry:
        return None
    return {k: int(v) for k, v in entry.items() if k.startswith("BLOCK") or k in LAUNCH_KEYS}
