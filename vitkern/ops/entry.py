"""The public ops as registered ``torch.ops.vitkern.*`` entries, for TorchScript and FX graphs.

``torch.jit.script`` cannot compile the Python wrappers (:func:`vitkern.ops.attention` and the
others: dataclasses, backend registry, error messages), and a graph recorded by ``torch.fx``
cannot hold a Python function if it is to be scripted later. Each wrapper is therefore also
registered as an op whose schema carries the wrapper's own arguments (``backend`` included) and
whose implementation (CompositeImplicitAutograd, so autograd records what it calls) is the
wrapper itself: a scripted or FX-traced module calls ``torch.ops.vitkern.<name>`` and gets the
same validation, the same backend choice and the same numbers as the eager module, and the same
gradients. The kernels behind it are the opaque custom ops (``vitkern::attention_fwd`` and so on)
that ``torch.compile`` and ``torch.export`` see; eager modules keep calling the Python wrappers
directly, which is what dynamo traces.
"""
from typing import List, Optional

import torch
from torch import Tensor

from vitkern.ops.attention import attention, attention_packed
from vitkern.ops.patch_embed import patch_embed
from vitkern.ops.sr_attention import sr_attention
from vitkern.ops.window_attention import window_attention

__all__ = ["ENTRY_OPS"]

_LIB = torch.library.Library("vitkern", "FRAGMENT")


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, attn_bias: Optional[Tensor] = None,
               dropout_p: float = 0.0, is_causal: bool = False, backend: str = "auto") -> Tensor:
    return attention(q, k, v, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, is_causal=is_causal,
                     backend=backend)


def _attention_packed(qkv: Tensor, num_heads: int, scale: Optional[float] = None,
                      attn_bias: Optional[Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                      backend: str = "auto") -> Tensor:
    return attention_packed(qkv, num_heads, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p,
                            is_causal=is_causal, backend=backend)


def _patch_embed(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, cls_token: Optional[Tensor] = None,
                 prefix_tokens: Optional[List[Tensor]] = None, pos_embed: Optional[Tensor] = None,
                 pos_embed_covers_prefix: bool = True, keep_indices: Optional[Tensor] = None,
                 backend: str = "auto") -> Tensor:
    return patch_embed(x, weight, bias, cls_token=cls_token, prefix_tokens=prefix_tokens, pos_embed=pos_embed,
                       pos_embed_covers_prefix=pos_embed_covers_prefix, keep_indices=keep_indices, backend=backend)


def _window_attention(qkv: Tensor, rel_pos_bias_table: Tensor, num_heads: int, window_size: List[int],
                      shift_size: List[int] = (0, 0), scale: Optional[float] = None,
                      qkv_bias: Optional[Tensor] = None, mask_value: float = -100.0, dropout_p: float = 0.0,
                      logit_scale: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    return window_attention(qkv, rel_pos_bias_table, num_heads=num_heads, window_size=tuple(window_size),
                            shift_size=tuple(shift_size), scale=scale, qkv_bias=qkv_bias, mask_value=mask_value,
                            dropout_p=dropout_p, logit_scale=logit_scale, backend=backend)


def _sr_attention(x: Tensor, feat_size: List[int], num_heads: int, q_weight: Tensor, q_bias: Optional[Tensor],
                  kv_weight: Tensor, kv_bias: Optional[Tensor], proj_weight: Tensor, proj_bias: Optional[Tensor],
                  sr_weight: Optional[Tensor] = None, sr_bias: Optional[Tensor] = None,
                  norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, sr_ratio: int = 1,
                  linear_attn: bool = False, norm_eps: float = 1e-5, scale: Optional[float] = None,
                  dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    return sr_attention(x, tuple(feat_size), num_heads=num_heads, q_weight=q_weight, q_bias=q_bias,
                        kv_weight=kv_weight, kv_bias=kv_bias, proj_weight=proj_weight, proj_bias=proj_bias,
                        sr_weight=sr_weight, sr_bias=sr_bias, norm_weight=norm_weight, norm_bias=norm_bias,
                        sr_ratio=sr_ratio, linear_attn=linear_attn, norm_eps=norm_eps, scale=scale,
                        dropout_p=dropout_p, backend=backend)


# name -> (schema, implementation). Defaults as the Python wrappers' (the dispatcher passes the
# implementation only the arguments the caller gave, so it repeats them).
ENTRY_OPS = {
    "attention": (
        "attention(Tensor q, Tensor k, Tensor v, *, float? scale=None, Tensor? attn_bias=None, "
        "float dropout_p=0.0, bool is_causal=False, str backend='auto') -> Tensor", _attention),
    "attention_packed": (
        "attention_packed(Tensor qkv, int num_heads, *, float? scale=None, Tensor? attn_bias=None, "
        "float dropout_p=0.0, bool is_causal=False, str backend='auto') -> Tensor", _attention_packed),
    "patch_embed": (
        "patch_embed(Tensor x, Tensor weight, Tensor? bias=None, *, Tensor? cls_token=None, "
        "Tensor[]? prefix_tokens=None, Tensor? pos_embed=None, bool pos_embed_covers_prefix=True, "
        "Tensor? keep_indices=None, str backend='auto') -> Tensor", _patch_embed),
    "window_attention": (
        "window_attention(Tensor qkv, Tensor rel_pos_bias_table, *, int num_heads, int[2] window_size, "
        "int[2] shift_size=[0, 0], float? scale=None, Tensor? qkv_bias=None, float mask_value=-100.0, "
        "float dropout_p=0.0, Tensor? logit_scale=None, str backend='auto') -> Tensor", _window_attention),
    "sr_attention": (
        "sr_attention(Tensor x, int[2] feat_size, *, int num_heads, Tensor q_weight, Tensor? q_bias, "
        "Tensor kv_weight, Tensor? kv_bias, Tensor proj_weight, Tensor? proj_bias, Tensor? sr_weight=None, "
        "Tensor? sr_bias=None, Tensor? norm_weight=None, Tensor? norm_bias=None, int sr_ratio=1, "
        "bool linear_attn=False, float norm_eps=1e-05, float? scale=None, float dropout_p=0.0, "
        "str backend='auto') -> Tensor", _sr_attention),
}

for _name, (_schema, _impl) in ENTRY_OPS.items():
    _LIB.define(_schema)
    _LIB.impl(_name, _impl, "CompositeImplicitAutograd")
