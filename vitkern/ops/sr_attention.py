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

Layout: custom op (patchify + LayerNorm) with fake and autograd -> validation and
backend predicates -> the public ops.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern import backends
from vitkern.ops.attention import MAX_HEAD_DIM, attention
from vitkern.ops.patch_embed import _launch_forward, _validate as _validate_patch_embed
from vitkern.reference import check_sr_attention_args, sr_attention_reference

__all__ = ["sr_attention", "patch_embed_layernorm"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NORM_DIM = 1024  # the LayerNorm epilogue keeps whole rows of the GEMM tile in registers


# --------------------------------------------------------------------------- #
# Patchify GEMM with a LayerNorm epilogue
# --------------------------------------------------------------------------- #
@torch.library.custom_op("vitkern::patch_embed_layernorm_fwd", mutates_args=())
def _patch_embed_layernorm_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (LayerNorm(tokens), tokens before the norm in fp32, row mean, row 1/std)."""
    return _launch_forward(x, weight, bias, None, None, norm=(ln_weight, ln_bias, eps))


@_patch_embed_layernorm_fwd.register_fake
def _(x, weight, bias, ln_weight, ln_bias, eps):
    B, _, H, W = x.shape
    D, _, PH, PW = weight.shape
    T = (H // PH) * (W // PW)
    f32 = dict(dtype=torch.float32)
    return x.new_empty((B, T, D)), x.new_empty((B, T, D), **f32), x.new_empty((B, T), **f32), \
        x.new_empty((B, T), **f32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, eps = inputs
    _, pre, mean, rstd = output
    ctx.save_for_backward(x, weight, ln_weight, pre, mean, rstd)
    ctx.dtypes = (bias.dtype if bias is not None else None, ln_weight.dtype, ln_bias.dtype)
    ctx.mark_non_differentiable(pre, mean, rstd)


def _backward(ctx, dout, _dpre, _dmean, _drstd):
    x, weight, ln_weight, pre, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b, need_lnw, need_lnb, _ = ctx.needs_input_grad
    bias_dtype, lnw_dtype, lnb_dtype = ctx.dtypes
    # LayerNorm backward on the small reduced tokens (B, Nk, D), in fp32.
    dout32 = dout.float()
    xhat = (pre - mean[..., None]) * rstd[..., None]
    g = dout32 * ln_weight.float()
    dpre = rstd[..., None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dln_w = (dout32 * xhat).sum((0, 1)).to(lnw_dtype) if need_lnw else None
    dln_b = dout32.sum((0, 1)).to(lnb_dtype) if need_lnb else None
    dx = dweight = dbias = None
    if need_x or need_w or need_b:
        dx, dweight, token_sums = torch.ops.vitkern.patch_embed_bwd(
            dpre.to(x.dtype), x, weight, False, need_x, need_w, need_b)
        dbias = token_sums.sum(0).to(bias_dtype) if need_b else None
    return (dx if need_x else None, dweight if need_w else None, dbias, dln_w, dln_b, None)


_patch_embed_layernorm_fwd.register_autograd(_backward, setup_context=_setup_context)


try:  # FlopCounterMode: the GEMM (the LayerNorm is O(tokens·D), not counted, as for nn.LayerNorm)
    from torch.utils.flop_counter import register_flop_formula

    from vitkern.ops.patch_embed import patch_embed_flops

    @register_flop_formula(torch.ops.vitkern.patch_embed_layernorm_fwd)
    def _fwd_flops(x_shape, weight_shape, *args, **kwargs):
        return patch_embed_flops(x_shape, weight_shape)
except ImportError:  # pragma: no cover
    pass


def patch_embed_layernorm(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor, eps: float = 1e-5,
) -> Tensor:
    """LayerNorm(Conv2d(x, weight, bias, stride=patch) as (B, N, D) tokens), one Triton kernel.

    x (B, C, H, W) with any strides and H, W divisible by the patch; weight (D, C, Ph, Pw);
    ln_weight, ln_bias (D,). Triton backend only (it is the building block of :func:`sr_attention`).
    """
    _validate_patch_embed(x, weight, bias, None, None)
    D = weight.shape[0]
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (D,):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"patch_embed_layernorm: {name} must have shape ({D},), got {got}")
        if t.device != x.device:
            raise ValueError(f"patch_embed_layernorm: {name} is on {t.device} but x is on {x.device}")
    reason = _why_not_norm_kernel(x, D)
    if reason is not None:
        raise backends.BackendUnavailableError(f"patch_embed_layernorm: {reason}")
    out, _, _, _ = torch.ops.vitkern.patch_embed_layernorm_fwd(x, weight, bias, ln_weight, ln_bias, float(eps))
    return out


def _why_not_norm_kernel(x: Tensor, dim: int) -> Optional[str]:
    if x.dtype not in _KERNEL_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16, got {x.dtype} (use backend='torch')"
    if dim > MAX_NORM_DIM:
        return f"the LayerNorm epilogue handles up to {MAX_NORM_DIM} channels, got {dim}"
    return backends.triton_reason([x], x.dtype)


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


def _why_not_triton(x, params, num_heads, sr_ratio, linear_attn) -> Optional[str]:
    C = x.shape[-1]
    if C // num_heads > MAX_HEAD_DIM:
        return f"head_dim {C // num_heads} is larger than the Triton kernels support ({MAX_HEAD_DIM})"
    if linear_attn or sr_ratio > 1:
        return _why_not_norm_kernel(x, C)
    if x.dtype not in _KERNEL_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16, got {x.dtype} (use backend='torch')"
    return backends.triton_reason([x], x.dtype)


def _why_not_cuda(x, params, num_heads, sr_ratio, linear_attn) -> Optional[str]:
    return backends.cuda_extension_reason("sr_attention", [x])


_BACKENDS = backends.register(
    "sr_attention",
    {"cuda": _why_not_cuda, "triton": _why_not_triton, "torch": lambda *a, **kw: None},
    gpu_auto_order=("triton", "torch"),
)


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
    params = _params(q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias,
                     norm_weight, norm_bias)
    x, params = _autocast(x, params)
    _validate(x, params)
    B, N, C, H, W = check_sr_attention_args(
        x, feat_size, num_heads=num_heads, q_weight=q_weight, kv_weight=kv_weight, proj_weight=proj_weight,
        sr_weight=sr_weight, norm_weight=norm_weight, sr_ratio=sr_ratio, linear_attn=linear_attn)
    chosen = _BACKENDS.select(backend, [x], x, params, num_heads, sr_ratio, linear_attn)
    # An empty batch has nothing to fuse: the reference's torch ops give the empty output and zero
    # weight gradients, as the timm module does, and no kernel is launched on a zero-size grid.
    if chosen == "torch" or B == 0:
        return sr_attention_reference(x, (H, W), num_heads=num_heads, sr_ratio=sr_ratio, linear_attn=linear_attn,
                                      norm_eps=norm_eps, scale=scale, dropout_p=dropout_p, **params)
    p = params
    heads, head_dim = num_heads, C // num_heads
    q = F.linear(x, p["q_weight"], p["q_bias"])  # (B, N, C)
    if linear_attn or sr_ratio > 1:
        image = x.unflatten(1, (H, W)).permute(0, 3, 1, 2)  # (B, C, H, W) view of the tokens
        norm_bias = p["norm_bias"] if p["norm_bias"] is not None else torch.zeros_like(p["norm_weight"])
        if linear_attn:
            image = F.adaptive_avg_pool2d(image, 7)
        else:
            image = image[:, :, : H // sr_ratio * sr_ratio, : W // sr_ratio * sr_ratio]  # Conv2d floors
        src = patch_embed_layernorm(image, p["sr_weight"], p["sr_bias"], p["norm_weight"], norm_bias, norm_eps)
        if linear_attn:
            src = F.gelu(src)
    else:
        src = x
    kv = F.linear(src, p["kv_weight"], p["kv_bias"])  # (B, Nk, 2C) = [k | v]
    kv = kv.unflatten(-1, (2, heads, head_dim))
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, h, Nk, d) views
    out = attention(q.unflatten(-1, (heads, head_dim)).transpose(1, 2), k, v, scale=scale, dropout_p=dropout_p,
                    backend="triton")
    out = out.transpose(1, 2).reshape(B, N, C)  # a view: the kernel wrote (B, N, h, d)
    return F.linear(out, p["proj_weight"], p["proj_bias"])
