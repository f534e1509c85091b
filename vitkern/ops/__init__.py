"""Functional ops. Each takes ``backend="auto" | "cuda" | "triton" | "torch"``."""
from vitkern.ops.attention import attention, attention_packed
from vitkern.ops.patch_embed import patch_embed
from vitkern.ops.window_attention import window_attention

__all__ = ["attention", "attention_packed", "patch_embed", "window_attention"]
