"""The drop-ins' calls into :mod:`vitkern.ops`, eager, scripted or symbolically traced.

Eager forwards call the Python ops (what ``torch.compile`` and ``torch.export`` trace). Under
``torch.jit.script`` and ``torch.fx.symbolic_trace`` the Python ops cannot be compiled or recorded,
so the same call goes to ``torch.ops.vitkern.<name>`` (:mod:`vitkern.ops.entry`: the Python op
behind a registered schema), which validates and picks the backend when the graph runs on real
tensors. TorchScript compiles only the taken branch of ``if torch.jit.is_scripting():``, so
``fx_proxy`` (which it cannot compile) is tested only inside ``if not torch.jit.is_scripting():``.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from vitkern import ops as _ops

__all__ = ["fx_proxy", "eager", "attention", "attention_packed", "patch_embed", "window_attention",
           "sr_attention"]


def fx_proxy(x) -> bool:
    """True when ``x`` is a ``torch.fx`` Proxy: the forward is being symbolically traced."""
    return isinstance(x, torch.fx.Proxy)


def eager(x: Tensor) -> bool:
    """True when the forward runs on real tensors in Python (not scripted, not FX-traced): then the
    modules check their inputs themselves. Scripted code gets False without compiling ``fx_proxy``."""
    if not torch.jit.is_scripting():
        if not fx_proxy(x):
            return True
    return False


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], attn_bias: Optional[Tensor],
              dropout_p: float, is_causal: bool, backend: str) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.vitkern.attention(q, k, v, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p,
                                           is_causal=is_causal, backend=backend)
    op = torch.ops.vitkern.attention if fx_proxy(q) else _ops.attention
    return op(q, k, v, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, is_causal=is_causal, backend=backend)


def attention_packed(qkv: Tensor, num_heads: int, scale: Optional[float], attn_bias: Optional[Tensor],
                     dropout_p: float, is_causal: bool, backend: str) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.vitkern.attention_packed(qkv, num_heads, scale=scale, attn_bias=attn_bias,
                                                  dropout_p=dropout_p, is_causal=is_causal, backend=backend)
    op = torch.ops.vitkern.attention_packed if fx_proxy(qkv) else _ops.attention_packed
    return op(qkv, num_heads, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, is_causal=is_causal,
              backend=backend)


def patch_embed(x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
                pos_embed: Optional[Tensor], backend: str, prefix_tokens: Optional[List[Tensor]] = None,
                pos_embed_covers_prefix: bool = True, keep_indices: Optional[Tensor] = None) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.vitkern.patch_embed(x, weight, bias, cls_token=cls_token, prefix_tokens=prefix_tokens,
                                             pos_embed=pos_embed, pos_embed_covers_prefix=pos_embed_covers_prefix,
                                             keep_indices=keep_indices, backend=backend)
    op = torch.ops.vitkern.patch_embed if fx_proxy(x) else _ops.patch_embed
    return op(x, weight, bias, cls_token=cls_token, prefix_tokens=prefix_tokens, pos_embed=pos_embed,
              pos_embed_covers_prefix=pos_embed_covers_prefix, keep_indices=keep_indices, backend=backend)


def window_attention(qkv: Tensor, table: Tensor, num_heads: int, window_size: Tuple[int, int],
                     shift_size: Tuple[int, int], scale: Optional[float], qkv_bias: Optional[Tensor],
                     dropout_p: float, backend: str, logit_scale: Optional[Tensor] = None) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.vitkern.window_attention(qkv, table, num_heads=num_heads,
                                                  window_size=[window_size[0], window_size[1]],
                                                  shift_size=[shift_size[0], shift_size[1]], scale=scale,
                                                  qkv_bias=qkv_bias, dropout_p=dropout_p, logit_scale=logit_scale,
                                                  backend=backend)
    op = torch.ops.vitkern.window_attention if fx_proxy(qkv) else _ops.window_attention
    if logit_scale is None:  # Swin V1: the call as it was before Swin V2's argument existed
        return op(qkv, table, num_heads=num_heads, window_size=window_size, shift_size=shift_size, scale=scale,
                  qkv_bias=qkv_bias, dropout_p=dropout_p, backend=backend)
    return op(qkv, table, num_heads=num_heads, window_size=window_size, shift_size=shift_size, scale=scale,
              qkv_bias=qkv_bias, dropout_p=dropout_p, logit_scale=logit_scale, backend=backend)


def sr_attention(x: Tensor, feat_size: List[int], num_heads: int, q_weight: Tensor, q_bias: Optional[Tensor],
                 kv_weight: Tensor, kv_bias: Optional[Tensor], proj_weight: Tensor, proj_bias: Optional[Tensor],
                 sr_weight: Optional[Tensor], sr_bias: Optional[Tensor], norm_weight: Optional[Tensor],
                 norm_bias: Optional[Tensor], sr_ratio: int, linear_attn: bool, norm_eps: float,
                 scale: Optional[float], dropout_p: float, backend: str) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.vitkern.sr_attention(
            x, feat_size, num_heads=num_heads, q_weight=q_weight, q_bias=q_bias, kv_weight=kv_weight,
            kv_bias=kv_bias, proj_weight=proj_weight, proj_bias=proj_bias, sr_weight=sr_weight, sr_bias=sr_bias,
            norm_weight=norm_weight, norm_bias=norm_bias, sr_ratio=sr_ratio, linear_attn=linear_attn,
            norm_eps=norm_eps, scale=scale, dropout_p=dropout_p, backend=backend)
    op = torch.ops.vitkern.sr_attention if fx_proxy(x) else _ops.sr_attention
    return op(x, feat_size, num_heads=num_heads, q_weight=q_weight, q_bias=q_bias, kv_weight=kv_weight,
              kv_bias=kv_bias, proj_weight=proj_weight, proj_bias=proj_bias, sr_weight=sr_weight, sr_bias=sr_bias,
              norm_weight=norm_weight, norm_bias=norm_bias, sr_ratio=sr_ratio, linear_attn=linear_attn,
              norm_eps=norm_eps, scale=scale, dropout_p=dropout_p, backend=backend)
