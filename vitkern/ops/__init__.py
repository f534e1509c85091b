"""Functional ops. Each takes ``backend="auto" | "cuda" | "triton" | "torch"``."""
from vitkern.ops.patch_embed import patch_embed

__all__ = ["patch_embed"]
