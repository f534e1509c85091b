"""PVT v2 spatial-reduction attention (timm ``pvt_v2.Attention``), fused where it pays.

out = proj(attention(q(x), k, v)) with k, v = kv(reduce(x)), where reduce is
  * sr_ratio > 1: the strided ``sr`` Conv2d (kernel = stride = sr_ratio) then LayerNorm;
  * linear_attn: adaptive average pool to 7x7, the 1x1 ``sr`` conv, LayerNorm, GELU;
  * otherwise the identity (keys are the tokens themselves).

The Triton path:
  * the spatial reduction is vitkern's patchify GEMM (:mod:`vitkern.ops.patch_embed`)
    reading the (B, N, C) tokens in place as a (B, C, H, W) image through strides (no
    transposed or unfolded copy; non-divisible grids are floored by a cropped view, as
    Conv2d does) with the LayerNorm (eps 1e-5) computed in the GEMM's epilogue, one
    program owning whole rows; its backward is the patchify backward kernels after a
    LayerNorm backward on the small (B, Nk, C) reduced tokens;
  * attention of the N queries over the Nk reduced keys is vitkern's fused attention
    on views: q is read from the q Linear's (B, N, C) output, k and v from the kv
    Linear's (B, Nk, 2C) output, and the output is written as (B, N, C) for ``proj``
    (no permute or contiguous copy anywhere);
  * the q, kv and proj Linears are cuBLAS GEMMs (``F.linear``).

Layout: the public boundary (:func:`_prepare`: autocast, validation, defaults, once) -> backend
predicates -> the public op, whose fused path calls the registered ops of the other two files
(``vitkern::patch_embed_layernorm_fwd``, which lives with its kernel in
:mod:`vitkern.ops.patch_embed`, and ``vitkern::attention_fwd``) without validating again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern import backends
from vitkern.ops.attention import MAX_HEAD_DIM, new_dropout_seed
from vitkern.ops.patch_embed import why_not_norm_kernel
from vitkern.reference import check_sr_attention_args, sr_attention_reference

__all__ = ["sr_attention"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- #
# Validation, backend predicates, public op
# --------------------------------------------------------------------------- #
def _params(q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias, norm_weight,
            norm_bias):
    return dict(q_weight=q_weight, q_bias=q_bias, kv_weight=kv_weight, kv_bias=kv_bias, proj_weight=proj_weight,
                proj_bias=proj_bias, sr_weight=sr_weight, sr_bias=sr_bias, norm_weight=norm_weight,
                norm_bias=norm_bias)


def _validate(x, params) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"sr_attention: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float64,) + _KERNEL_DTYPES:
        raise TypeError(f"sr_attention: x.dtype must be one of float64/float32/float16/bfloat16, got {x.dtype}")
    for name, t in params.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"sr_attention: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"sr_attention: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"sr_attention: {name}.dtype is {t.dtype} but x.dtype is {x.dtype}; cast them to one "
                            f"dtype (or run under torch.autocast)")


@dataclass
class _Call:
    """One validated sr_attention call, as the predicates and the fused path read it."""
    x: Tensor
    grid: Tuple[int, int]
    params: Dict[str, Optional[Tensor]]
    num_heads: int
    sr_ratio: int
    linear_attn: bool
    norm_eps: float
    scale: float
    dropout_p: float


def _prepare(x, feat_size, *, num_heads, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
             sr_weight=None, sr_bias=None, norm_weight=None, norm_bias=None, sr_ratio=1, linear_attn=False,
             norm_eps=1e-5, scale=None, dropout_p=0.0) -> _Call:
    """sr_attention()'s public boundary: autocast, dtypes/devices, shapes (the reference's check), scale."""
    params = _params(q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias,
                     norm_weight, norm_bias)
    x, params = _autocast(x, params)
    _validate(x, params)
    B, N, C, H, W = check_sr_attention_args(x, feat_size, num_heads=num_heads, sr_ratio=sr_ratio,
                                            linear_attn=linear_attn, **params)
    if isinstance(dropout_p, bool) or not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"sr_attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    scale = (C // num_heads) ** -0.5 if scale is None else float(scale)
    return _Call(x, (H, W), params, num_heads, sr_ratio, linear_attn, float(norm_eps), scale, float(dropout_p))


def _why_not_triton(call: _Call) -> Optional[str]:
    x = call.x
    C = x.shape[-1]
    if C // call.num_heads > MAX_HEAD_DIM:
        return f"head_dim {C // call.num_heads} is larger than the Triton kernels support ({MAX_HEAD_DIM})"
    if call.linear_attn or call.sr_ratio > 1:
        return why_not_norm_kernel(x, C)
    if x.dtype not in _KERNEL_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16, got {x.dtype} (use backend='torch')"
    return backends.triton_reason([x], x.dtype)


_BACKENDS = backends.register("sr_attention", prepare=_prepare,
                              predicates={"triton": _why_not_triton, "torch": backends.available})


def _autocast(x, params):
    """Cast like timm's Linear and Conv2d layers do under autocast (our custom ops have no autocast rule)."""
    dtype = backends.autocast_dtype(x)
    if dtype is None:
        return x, params
    cast = {n: (t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t) for n, t in params.items()}
    return x.to(dtype), cast


def sr_attention(
    x: Tensor,
    feat_size: Sequence[int],
    *,
    num_heads: int,
    q_weight: Tensor,
    q_bias: Optional[Tensor],
    kv_weight: Tensor,
    kv_bias: Optional[Tensor],
    proj_weight: Tensor,
    proj_bias: Optional[Tensor],
    sr_weight: Optional[Tensor] = None,
    sr_bias: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    sr_ratio: int = 1,
    linear_attn: bool = False,
    norm_eps: float = 1e-5,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """timm ``pvt_v2.Attention.forward(x, feat_size)`` as a function of its weights.

    Args:
        x: (B, N, C) tokens of the (H, W) = feat_size grid, row-major (N = H·W).
        num_heads: heads; C must be divisible by it.
        q_weight, q_bias: the ``q`` Linear (C, C), (C,) or None.
        kv_weight, kv_bias: the ``kv`` Linear (2C, C), (2C,) or None; output [k | v].
        proj_weight, proj_bias: the ``proj`` Linear.
        sr_weight, sr_bias: the ``sr`` Conv2d, (C, C, r, r) (r = sr_ratio; 1 for linear_attn).
        norm_weight, norm_bias: the ``norm`` LayerNorm (eps ``norm_eps``, timm: 1e-5).
        sr_ratio, linear_attn: which key reduction (see the module docstring).
        scale: attention scale, default head_dim ** -0.5.
        dropout_p: attention dropout (pass the module's p in training, 0 in eval).
        backend: "auto" | "cuda" | "triton" | "torch".

    Returns:
        (B, N, C), the module's output (after ``proj``; ``proj_drop`` is the caller's).
    """
    c = _prepare(x, feat_size, num_heads=num_heads, q_weight=q_weight, q_bias=q_bias, kv_weight=kv_weight,
                 kv_bias=kv_bias, proj_weight=proj_weight, proj_bias=proj_bias, sr_weight=sr_weight, sr_bias=sr_bias,
                 norm_weight=norm_weight, norm_bias=norm_bias, sr_ratio=sr_ratio, linear_attn=linear_attn,
                 norm_eps=norm_eps, scale=scale, dropout_p=dropout_p)
    chosen = _BACKENDS.select(backend, c)
    # An empty batch has nothing to fuse: the reference's torch ops give the empty output and zero
    # weight gradients, as the timm module does, and no kernel is launched on a zero-size grid.
    if chosen == "torch" or c.x.shape[0] == 0:
        return sr_attention_reference(c.x, c.grid, num_heads=c.num_heads, sr_ratio=c.sr_ratio,
                                      linear_attn=c.linear_attn, norm_eps=c.norm_eps, scale=c.scale,
                                      dropout_p=c.dropout_p, **c.params)
    return _fused(c)


def _fused(c: _Call) -> Tensor:
    """The Triton path, on the validated call: the registered ops, nothing validated or selected again."""
    x, p, (H, W) = c.x, c.params, c.grid
    B, N, C = x.shape
    heads, head_dim = c.num_heads, C // c.num_heads
    q = F.linear(x, p["q_weight"], p["q_bias"])  # (B, N, C)
    if c.linear_attn or c.sr_ratio > 1:
        image = x.unflatten(1, (H, W)).permute(0, 3, 1, 2)  # (B, C, H, W) view of the tokens
        norm_bias = p["norm_bias"] if p["norm_bias"] is not None else torch.zeros_like(p["norm_weight"])
        if c.linear_attn:
            image = F.adaptive_avg_pool2d(image, 7)
        else:
            r = c.sr_ratio
            image = image[:, :, : H // r * r, : W // r * r]  # Conv2d floors
        src, _, _, _ = torch.ops.vitkern.patch_embed_layernorm_fwd(image, p["sr_weight"], p["sr_bias"],
                                                                   p["norm_weight"], norm_bias, c.norm_eps)
        if c.linear_attn:
            src = F.gelu(src)
    else:
        src = x
    kv = F.linear(src, p["kv_weight"], p["kv_bias"])  # (B, Nk, 2C) = [k | v]
    kv = kv.unflatten(-1, (2, heads, head_dim))
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, h, Nk, d) views
    q = q.unflatten(-1, (heads, head_dim)).transpose(1, 2)
    out, _ = torch.ops.vitkern.attention_fwd(q, k, v, None, c.scale, c.dropout_p, new_dropout_seed(c.dropout_p),
                                             False)  # (B, N, h, d)
    return F.linear(out.reshape(B, N, C), p["proj_weight"], p["proj_bias"])
