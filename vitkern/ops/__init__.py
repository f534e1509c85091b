"""Functional ops. Each takes ``backend="auto" | "cuda" | "triton" | "torch"``."""
from vitkern.ops.attention import attention, attention_packed
from vitkern.ops.patch_embed import patch_embed, patch_embed_layernorm
from vitkern.ops.sr_attention import sr_attention
from vitkern.ops.window_attention import window_attention
from vitkern.ops import entry as _entry  # noqa: F401,E402 - registers torch.ops.vitkern.<public op> for TorchScript/FX

__all__ = ["attention", "attention_packed", "patch_embed", "patch_embed_layernorm", "sr_attention",
           "window_attention"]
