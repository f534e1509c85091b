"""Naive reference implementations: the math vitkern's kernels must equal.

Plain PyTorch, written for reading, not speed. Tests evaluate these in float64
(CPU) or float32 (GPU) as the oracle, and benchmarks time them as the "naive"
baseline, so both always check against the same code.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from vitkern._args import IntOrPair, pair

__all__ = [
    "patch_embed_reference",
    "attention_reference",
    "check_sr_attention_args",
    "swin_effective_window",
    "relative_position_index",
    "window_attention_reference",
    "sr_attention_reference",
]


# --------------------------------------------------------------------------- #
# Patchify-projection
# --------------------------------------------------------------------------- #
def patch_embed_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    cls_token: Optional[torch.Tensor] = None,
    prefix_tokens: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    pos_embed: Optional[torch.Tensor] = None,
    pos_embed_covers_prefix: bool = True,
    keep_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Conv2d(stride = kernel = patch) -> tokens, optional prefix rows, position embedding, patch subset.

    x (B, C, H, W), weight (D, C, Ph, Pw), bias (D,). ``prefix_tokens`` (1, T, D), (B, T, D) or
    (T, D) become rows 0..T-1; ``cls_token`` (D values, timm's (1, 1, D)) is ``prefix_tokens`` with
    T = 1; a list/tuple of such tensors is written one after the other. ``keep_indices`` (B, K) keeps patches keep[b, j] (row-major) as rows T+j; without it
    K = N = (H/Ph)(W/Pw), all patches in order. ``pos_embed`` is (1, T+N, D) or (T+N, D) added to
    every row when ``pos_embed_covers_prefix``, else (1, N, D) or (N, D) added to the patch rows only;
    a kept patch's row gets the position row of its patch. Returns (B, T+K, D), in the dtype torch's
    promotion gives the conv output, the prefix and pos_embed (x's when they share it).
    """
    if cls_token is not None:
        if prefix_tokens is not None:
            raise ValueError("patch_embed_reference: give cls_token or prefix_tokens, not both")
        prefix_tokens = cls_token.reshape(1, 1, -1)
    patch = weight.shape[-2:]
    tokens = F.conv2d(x, weight, bias, stride=patch)  # (B, D, H/Ph, W/Pw): every patch
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
    B, N, D = tokens.shape
    pos = pos_embed.reshape(1, -1, D) if pos_embed is not None else None
    if keep_indices is not None:
        tokens = tokens.gather(1, keep_indices[:, :, None].expand(-1, -1, D))  # (B, K, D)
    if pos is not None and not pos_embed_covers_prefix:  # timm's no_embed_class: add, then cat
        if keep_indices is not None:  # a kept patch's row gets its patch's position row
            pos = pos.expand(B, -1, D).gather(1, keep_indices[:, :, None].expand(-1, -1, D))
        tokens = tokens + pos
    T = 0
    if prefix_tokens is not None:
        seq = list(prefix_tokens) if isinstance(prefix_tokens, (list, tuple)) else [prefix_tokens]
        # (T, D) -> (1, T, D), then each to the batch; cat promotes to the widest dtype
        prefix = [(p if p.dim() == 3 else p[None]).expand(B, -1, D) for p in seq]
        T = sum(p.shape[1] for p in prefix)
        tokens = torch.cat([*prefix, tokens], dim=1)  # (B, T+K, D)
    if pos is not None and pos_embed_covers_prefix:  # timm's default: cat, then add
        if keep_indices is not None:  # pos row t for prefix row t, pos row T+n for patch n
            rows = torch.cat([torch.arange(T, device=x.device).expand(B, T), T + keep_indices], dim=1)
            pos = pos.expand(B, -1, D).gather(1, rows[:, :, None].expand(-1, -1, D))
        tokens = tokens + pos
    return tokens


# --------------------------------------------------------------------------- #
# Global multi-head attention
# --------------------------------------------------------------------------- #
def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + attn_bias [+ causal mask]) v.

    q (B, h, Nq, d), k and v (B, h, Nk, d); attn_bias broadcastable to
    (B, h, Nq, Nk); scale defaults to d ** -0.5, as in SDPA. dropout_p > 0 drops
    attention probabilities (and rescales the kept ones by 1/(1-p)), as SDPA does.
    is_causal: query i sees keys j <= i (top-left aligned, SDPA's ``is_causal``); unlike
    SDPA it may be combined with attn_bias.
    """
    scale = (q.shape[-1] ** -0.5 if q.shape[-1] else 1.0) if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, h, Nq, Nk)
    if attn_bias is not None:
        scores = scores + attn_bias
    if is_causal:
        nq, nk = scores.shape[-2:]
        hidden = torch.ones(nq, nk, dtype=torch.bool, device=scores.device).triu_(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


# --------------------------------------------------------------------------- #
# Shifted-window attention (Swin)
# --------------------------------------------------------------------------- #
def swin_effective_window(
    grid_size: IntOrPair,
    window_size: IntOrPair,
    shift_size: IntOrPair = 0,
    always_partition: bool = False,
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The (window, shift) a Swin block really uses on a ``grid_size`` token grid.

    The small-grid rule of timm's SwinTransformerBlock: per dimension, a grid no
    larger than the requested window is covered by a single window of the grid's
    size and is not shifted. ``always_partition=True`` keeps the requested sizes
    (the grid is then padded up to the window).
    """
    grid = pair(grid_size, "grid_size")
    window = pair(window_size, "window_size")
    shift = pair(shift_size, "shift_size")
    if always_partition:
        return window, shift
    eff_window = tuple(min(g, w) for g, w in zip(grid, window))
    eff_shift = tuple(0 if g <= w else s for g, w, s in zip(grid, eff_window, shift))
    return eff_window, eff_shift  # type: ignore[return-value]


def relative_position_index(window_size: IntOrPair, device=None) -> torch.Tensor:
    """(Mh*Mw, Mh*Mw) long tensor: row of the relative-position bias table per (query, key) pair.

    Tokens of a window are numbered row-major. For a query at (yi, xi) and a key
    at (yj, xj) the offset (yi - yj, xi - xj) lies in [-(Mh-1), Mh-1] x [-(Mw-1), Mw-1];
    shifted to start at 0 it addresses the table laid out row-major as (2Mh-1, 2Mw-1).
    """
    mh, mw = pair(window_size, "window_size")
    ys = torch.arange(mh, device=device).repeat_interleave(mw)  # row of each window token
    xs = torch.arange(mw, device=device).repeat(mh)  # column of each window token
    dy = ys[:, None] - ys[None, :] + (mh - 1)
    dx = xs[:, None] - xs[None, :] + (mw - 1)
    return dy * (2 * mw - 1) + dx


def _shift_region_labels(length: int, window: int, shift: int) -> List[int]:
    """Region label (0, 1, 2) of each position along one padded axis, as timm's mask builds it.

    timm paints the slices [0:-window], [-window:-shift], [-shift:] of the padded axis
    in that order (Python slice semantics, later slices overwrite earlier ones). With
    shift == 0 the last slice is the whole axis, so every position gets label 2 and the
    axis contributes no masking.
    """
    labels = [0] * length
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    positions = list(range(length))
    for label, (start, stop) in enumerate(bounds):
        for p in positions[start:stop]:
            labels[p] = label
    return labels


def _shift_mask(padded_hw, window, shift, mask_value, dtype, device) -> torch.Tensor:
    """(nW, Mh*Mw, Mh*Mw) additive mask: ``mask_value`` between tokens of different regions."""
    (hp, wp), (mh, mw) = padded_hw, window
    rows = torch.tensor(_shift_region_labels(hp, mh, shift[0]), device=device)
    cols = torch.tensor(_shift_region_labels(wp, mw, shift[1]), device=device)
    region = rows[:, None] * 3 + cols[None, :]  # (Hp, Wp)
    region = region.reshape(hp // mh, mh, wp // mw, mw).permute(0, 2, 1, 3).reshape(-1, mh * mw)
    different = region[:, :, None] != region[:, None, :]  # (nW, query, key)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(different, torch.full((), mask_value, dtype=dtype, device=device), zero)


def window_attention_reference(
    qkv: torch.Tensor,
    rel_pos_bias_table: torch.Tensor,
    *,
    num_heads: int,
    window_size: IntOrPair,
    shift_size: IntOrPair = 0,
    scale: Optional[float] = None,
    qkv_bias: Optional[torch.Tensor] = None,
    mask_value: float = -100.0,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Swin (shifted-)window multi-head attention, before the output projection.

    Equals timm's ``SwinTransformerBlock._attn`` with ``attn.proj`` removed, given
    ``qkv = attn.qkv(x)`` for the block's (normalised) input x of shape (B, H, W, C).

    qkv (B, H, W, 3C): per-token [q | k | v], each C = num_heads * head_dim channels,
    heads contiguous inside each. rel_pos_bias_table ((2Mh-1)(2Mw-1), num_heads).
    window_size / shift_size: int or (h, w); the *effective* sizes (see
    :func:`swin_effective_window`). qkv_bias (3C,): the qkv Linear's bias, which is
    what timm's zero-padded tokens turn into; zeros when None. Returns (B, H, W, C).

    Steps: roll the grid by -shift; pad bottom/right up to a multiple of the window
    (roll, then pad); split into windows; in each window softmax(q*scale k^T + relative
    position bias + shift mask) v, where the shift mask (``mask_value`` between tokens
    of different regions of the padded grid, regions as timm paints them) is applied
    only when some shift is non-zero and padded keys are not masked; merge windows,
    crop the padding, roll back by +shift.

    dropout_p > 0 drops attention probabilities with ``F.dropout`` on the (B, nW, heads, n, n)
    probabilities (the elements, in order, of timm's (B*nW, heads, n, n) ``attn_drop`` input).
    dropout_mask (B, nW, heads, n, n), instead, multiplies the probabilities by given factors
    (for tests: the Triton kernels' mask, :func:`vitkern.ops.window_attention.window_dropout_keep_mask`).

    logit_scale (num_heads,) or timm's (num_heads, 1, 1): Swin V2's cosine attention. It is the raw
    parameter: the scores become F.normalize(q) F.normalize(k)^T * exp(clamp(logit_scale, max=log(100)))
    per head (timm V2's ``WindowAttention``), and ``scale`` must be None. The table is then the
    final bias table (Swin V2: 16 * sigmoid(cpb_mlp(relative_coords_table)), computed by the module).
    """
    if qkv.dim() != 4:
        raise ValueError(f"qkv: expected rank 4 (B, H, W, 3C), got rank {qkv.dim()} with shape {tuple(qkv.shape)}")
    B, H, W, C3 = qkv.shape
    if C3 % 3 != 0:
        raise ValueError(f"qkv: expected last dimension 3C (a multiple of 3), got {C3}")
    C = C3 // 3
    if not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads != 0:
        raise ValueError(f"num_heads: expected a positive divisor of C = {C}, got {num_heads!r}")
    mh, mw = window = pair(window_size, "window_size")
    sh, sw = shift = pair(shift_size, "shift_size")
    if mh <= 0 or mw <= 0:
        raise ValueError(f"window_size: expected positive sizes, got {window}")
    if not (0 <= sh < mh and 0 <= sw < mw):
        raise ValueError(f"shift_size: expected 0 <= shift < window_size {window} per dimension, got {shift}")
    n = mh * mw
    table_rows = (2 * mh - 1) * (2 * mw - 1)
    if rel_pos_bias_table.dim() != 2 or tuple(rel_pos_bias_table.shape) != (table_rows, num_heads):
        raise ValueError(f"rel_pos_bias_table: expected shape ((2*{mh}-1)*(2*{mw}-1), num_heads) = "
                         f"{(table_rows, num_heads)}, got {tuple(rel_pos_bias_table.shape)}")
    if qkv_bias is not None and tuple(qkv_bias.shape) != (C3,):
        raise ValueError(f"qkv_bias: expected shape ({C3},), got {tuple(qkv_bias.shape)}")
    head_dim = C // num_heads
    if logit_scale is not None:
        if scale is not None:
            raise ValueError(f"scale: expected None with logit_scale (cosine attention has no scale), got {scale!r}")
        if tuple(logit_scale.shape) not in ((num_heads,), (num_heads, 1, 1)):
            raise ValueError(f"logit_scale: expected shape ({num_heads},) or ({num_heads}, 1, 1), "
                             f"got {tuple(logit_scale.shape)}")
    scale = head_dim ** -0.5 if scale is None else scale

    # 1. cyclic shift, then pad bottom/right with the value a zero token has after the qkv Linear.
    x = torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2)) if (sh or sw) else qkv
    pad_h, pad_w = (-H) % mh, (-W) % mw
    hp, wp = H + pad_h, W + pad_w
    fill = qkv_bias if qkv_bias is not None else qkv.new_zeros(C3)
    fill = fill.to(qkv.dtype)
    if pad_w:
        x = torch.cat([x, fill.expand(B, H, pad_w, C3)], dim=2)
    if pad_h:
        x = torch.cat([x, fill.expand(B, pad_h, wp, C3)], dim=1)

    # 2. windows: (B, nW, n, 3C), windows and tokens row-major.
    nwh, nww = hp // mh, wp // mw
    x = x.reshape(B, nwh, mh, nww, mw, C3).permute(0, 1, 3, 2, 4, 5).reshape(B, nwh * nww, n, C3)
    x = x.reshape(B, nwh * nww, n, 3, num_heads, head_dim).permute(3, 0, 1, 4, 2, 5)
    q, k, v = x[0], x[1], x[2]  # (B, nW, heads, n, d)

    # 3. attention bias: relative position (heads, n, n) + shift mask (nW, 1, n, n).
    index = relative_position_index(window, device=qkv.device)
    bias = rel_pos_bias_table[index.reshape(-1)].reshape(n, n, num_heads).permute(2, 0, 1)
    if sh or sw:
        mask = _shift_mask((hp, wp), window, shift, mask_value, bias.dtype, qkv.device)
        bias = bias + mask[:, None]
    if logit_scale is not None:
        # cosine attention: unit q and k rows, the per-head scale folded into q (a (heads, 1, 1) factor)
        head_scale = torch.clamp(logit_scale.reshape(num_heads, 1, 1), max=math.log(100.0)).exp()
        q, k, scale = F.normalize(q, dim=-1) * head_scale.to(q.dtype), F.normalize(k, dim=-1), 1.0
    if dropout_mask is None:
        out = attention_reference(q, k, v, scale=scale, attn_bias=bias, dropout_p=dropout_p)  # (B, nW, heads, n, d)
    else:
        if tuple(dropout_mask.shape) != (B, nwh * nww, num_heads, n, n):
            raise ValueError(f"dropout_mask: expected shape (B, nW, heads, n, n) = {(B, nwh * nww, num_heads, n, n)}, "
                             f"got {tuple(dropout_mask.shape)}")
        probs = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        out = (probs * dropout_mask) @ v

    # 4. merge heads and windows, crop the padding, undo the shift.
    out = out.permute(0, 1, 3, 2, 4).reshape(B, nwh, nww, mh, mw, C)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, hp, wp, C)[:, :H, :W]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out


# --------------------------------------------------------------------------- #
# Spatial-reduction attention (PVT v2)
# --------------------------------------------------------------------------- #
def check_sr_attention_args(x, feat_size, *, num_heads, q_weight, kv_weight, proj_weight, sr_weight, norm_weight,
                            sr_ratio, linear_attn, q_bias=None, kv_bias=None, proj_bias=None, sr_bias=None,
                            norm_bias=None) -> Tuple[int, int, int, int, int]:
    """Shape checks of :func:`sr_attention_reference` (shared with the fused op); returns (B, N, C, H, W)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected rank 3 (B, N, C), got rank {x.dim()} with shape {tuple(x.shape)}")
    B, N, C = x.shape
    try:
        H, W = (int(s) for s in feat_size)
    except (TypeError, ValueError):
        raise ValueError(f"feat_size: expected an (H, W) pair, got {feat_size!r}") from None
    if H * W != N:
        raise ValueError(f"feat_size: expected H*W == N = {N} tokens, got {(H, W)} (H*W = {H * W})")
    if not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads != 0:
        raise ValueError(f"num_heads: expected a positive divisor of C = {C}, got {num_heads!r}")
    if not isinstance(sr_ratio, int) or sr_ratio < 1:
        raise ValueError(f"sr_ratio: expected an int >= 1, got {sr_ratio!r}")
    for name, w, shape in (("q_weight", q_weight, (C, C)), ("kv_weight", kv_weight, (2 * C, C)),
                           ("proj_weight", proj_weight, (C, C))):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(w.shape)}")
    reduce = linear_attn or sr_ratio > 1
    if reduce:
        kernel = 1 if linear_attn else sr_ratio
        if sr_weight is None or tuple(sr_weight.shape) != (C, C, kernel, kernel):
            got = None if sr_weight is None else tuple(sr_weight.shape)
            raise ValueError(f"sr_weight: expected shape {(C, C, kernel, kernel)}, got {got}")
        if norm_weight is None:
            raise ValueError(f"norm_weight: expected shape ({C},) when keys are reduced, got None")
    for name, b, shape in (("q_bias", q_bias, (C,)), ("kv_bias", kv_bias, (2 * C,)), ("proj_bias", proj_bias, (C,)),
                           ("sr_bias", sr_bias, (C,)), ("norm_weight", norm_weight, (C,)),
                           ("norm_bias", norm_bias, (C,))):
        if b is not None and tuple(b.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(b.shape)}")
        if not linear_attn and (H < sr_ratio or W < sr_ratio):
            raise ValueError(f"feat_size: expected H, W >= sr_ratio = {sr_ratio}, got {(H, W)}")
    return B, N, C, H, W


def sr_attention_reference(
    x: torch.Tensor,
    feat_size: Sequence[int],
    *,
    num_heads: int,
    q_weight: torch.Tensor,
    q_bias: Optional[torch.Tensor],
    kv_weight: torch.Tensor,
    kv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    sr_weight: Optional[torch.Tensor] = None,
    sr_bias: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    sr_ratio: int = 1,
    linear_attn: bool = False,
    norm_eps: float = 1e-5,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """PVT v2 spatial-reduction attention, including the output projection.

    Equals timm ``pvt_v2.Attention.forward(x, feat_size)`` with the same weights
    (q: (C, C), kv: (2C, C), proj: (C, C), sr: Conv2d weight, norm: LayerNorm).

    x (B, N, C) with N = H*W tokens of the (H, W) = feat_size grid, row-major.
    Keys/values come from:
      * sr_ratio == 1 (and not linear_attn): x itself;
      * sr_ratio > 1: Conv2d(kernel = stride = sr_ratio, no padding; trailing rows and
        columns that do not fill a kernel are dropped) -> LayerNorm(norm_eps);
      * linear_attn: adaptive average pool to 7x7 -> 1x1 Conv2d -> LayerNorm -> GELU.
    kv Linear gives [k | v]; softmax(q k^T * scale) v per head; proj. Returns (B, N, C).
    """
    B, N, C, H, W = check_sr_attention_args(x, feat_size, num_heads=num_heads, q_weight=q_weight, q_bias=q_bias,
                                            kv_weight=kv_weight, kv_bias=kv_bias, proj_weight=proj_weight,
                                            proj_bias=proj_bias, sr_weight=sr_weight, sr_bias=sr_bias,
                                            norm_weight=norm_weight, norm_bias=norm_bias, sr_ratio=sr_ratio,
                                            linear_attn=linear_attn)
    reduce = linear_attn or sr_ratio > 1
    head_dim = C // num_heads

    q = F.linear(x, q_weight, q_bias).reshape(B, N, num_heads, head_dim).transpose(1, 2)
    if reduce:
        grid = x.transpose(1, 2).reshape(B, C, H, W)
        if linear_attn:
            grid = F.conv2d(F.adaptive_avg_pool2d(grid, 7), sr_weight, sr_bias)
        else:
            grid = F.conv2d(grid, sr_weight, sr_bias, stride=sr_ratio)
        src = grid.flatten(2).transpose(1, 2)  # (B, Nk, C)
        src = F.layer_norm(src, (C,), norm_weight, norm_bias, norm_eps)
        if linear_attn:
            src = F.gelu(src)
    else:
        src = x
    kv = F.linear(src, kv_weight, kv_bias)  # (B, Nk, 2C)
    kv = kv.reshape(B, kv.shape[1], 2, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # Nk explicit: B may be 0
    out = attention_reference(q, kv[0], kv[1], scale=scale, dropout_p=dropout_p)  # (B, heads, N, d)
    out = out.transpose(1, 2).reshape(B, N, C)
    return F.linear(out, proj_weight, proj_bias)


# --------------------------------------------------------------------------- #
# Masked autoencoder (MAE, He et al. 2021): helpers shared with vitkern.models.mae, and the
# reference model written from the paper's algorithm (full patchify, gather, timm blocks)
# --------------------------------------------------------------------------- #
def mae_check_config(owner: str, img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
                     decoder_depth, decoder_num_heads) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """Validates an MAE configuration; returns (img_size, patch_size, grid_size) as pairs."""
    img = pair(img_size, "img_size", owner, minimum=1)
    patch = pair(patch_size, "patch_size", owner, minimum=1)
    if img[0] % patch[0] or img[1] % patch[1]:
        raise ValueError(f"{owner}: img_size={img} must be divisible by patch_size={patch}")
    for name, value, low in (("in_chans", in_chans, 1), ("embed_dim", embed_dim, 1), ("depth", depth, 0),
                             ("num_heads", num_heads, 1), ("decoder_embed_dim", decoder_embed_dim, 1),
                             ("decoder_depth", decoder_depth, 0), ("decoder_num_heads", decoder_num_heads, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    for name, dim in (("embed_dim", embed_dim), ("decoder_embed_dim", decoder_embed_dim)):
        if dim % 4:  # half the channels encode each axis as sin and cos pairs
            raise ValueError(f"{owner}: {name} must be a multiple of 4 (2-D sin-cos position embedding), got {dim}")
    for name, dim, heads in (("num_heads", embed_dim, num_heads), ("decoder_num_heads", decoder_embed_dim,
                                                                   decoder_num_heads)):
        if dim % heads:
            raise ValueError(f"{owner}: {name}={heads} must divide its width {dim}")
    return img, patch, (img[0] // patch[0], img[1] // patch[1])


def mae_sincos_pos_embed(embed_dim: int, grid_size: IntOrPair, cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, (cls + gh*gw, embed_dim) float64 (row 0 zeros with a CLS).

    Patch n = (i, j) row-major on the (gh, gw) grid. The first half of the channels encodes the
    column j, the second half the row i (the authors' channel order); each half is
    [sin(p * w_k), cos(p * w_k)] for w_k = 10000^(-k / (embed_dim / 4)), k < embed_dim / 4.
    """
    gh, gw = pair(grid_size, "grid_size", "mae_sincos_pos_embed", minimum=1)
    if embed_dim % 4:
        raise ValueError(f"mae_sincos_pos_embed: embed_dim must be a multiple of 4, got {embed_dim}")
    quarter = embed_dim // 4
    freq = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)

    def axis(p):
        angle = p[:, None] * freq[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    emb = torch.cat([axis(cols), axis(rows)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb


def mae_len_keep(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per image: int(N * (1 - mask_ratio)), as the authors round; at least one."""
    if not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be a float in [0, 1), got {mask_ratio!r}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps int({num_patches} * (1 - {mask_ratio})) = {keep} of "
                         f"{num_patches} patches; at least one must be kept")
    return keep


def mae_masking(noise: torch.Tensor, len_keep: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Per-image random masking from noise (B, N): the ``len_keep`` patches with the smallest noise stay.

    Returns ids_keep (B, len_keep) int64 (patch indices, in ascending noise order), mask (B, N) in
    ``dtype`` (0 kept, 1 removed) and ids_restore (B, N) int64: the rank of each patch in the
    shuffled order (kept patch ids_keep[b, j] has rank j), which undoes the shuffle.
    """
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ranks = torch.arange(noise.shape[1], device=noise.device).expand_as(ids_shuffle)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, ranks)  # inverse permutation
    mask = (ids_restore >= len_keep).to(dtype)
    return ids_shuffle[:, :len_keep], mask, ids_restore


def mae_check_noise(owner: str, noise: Optional[torch.Tensor], batch: int, num_patches: int,
                    like: torch.Tensor) -> torch.Tensor:
    """The given noise (B, N), checked, or fresh uniform noise as the authors draw it."""
    if noise is None:
        return torch.rand(batch, num_patches, device=like.device)
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"{owner}: noise must be a torch.Tensor or None, got {type(noise).__name__}")
    if tuple(noise.shape) != (batch, num_patches):
        raise ValueError(f"{owner}: noise must be (B, num_patches) = {(batch, num_patches)}, got {tuple(noise.shape)}")
    if noise.device != like.device:
        raise ValueError(f"{owner}: noise must be on the images' device {like.device}, got {noise.device}")
    if noise.is_complex() or noise.dtype == torch.bool:
        raise TypeError(f"{owner}: noise must be a real tensor (its argsort picks the kept patches), got {noise.dtype}")
    return noise


def mae_check_images(owner: str, imgs, in_chans: int, img_size: Tuple[int, int]) -> None:
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"{owner}: imgs must be a torch.Tensor, got {type(imgs).__name__}")
    if imgs.dim() != 4 or tuple(imgs.shape[1:]) != (in_chans, *img_size):
        raise ValueError(f"{owner}: imgs must be (B, in_chans, H, W) = (B, {in_chans}, {img_size[0]}, {img_size[1]}), "
                         f"got shape {tuple(imgs.shape)}")


def mae_patchify(imgs: torch.Tensor, patch_size: IntOrPair) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, Ph*Pw*C), patches row-major, each flattened as (i, j, c) (the authors' order)."""
    ph, pw = pair(patch_size)
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, ph, pw, C)
    return x.reshape(B, (H // ph) * (W // pw), ph * pw * C)


def mae_unpatchify(x: torch.Tensor, patch_size: IntOrPair, grid_size: IntOrPair, in_chans: int) -> torch.Tensor:
    """Inverse of :func:`mae_patchify`: (B, gh*gw, Ph*Pw*C) -> (B, C, gh*Ph, gw*Pw)."""
    ph, pw = pair(patch_size)
    gh, gw = pair(grid_size)
    B = x.shape[0]
    x = x.reshape(B, gh, gw, ph, pw, in_chans).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, ph, gw, pw)
    return x.reshape(B, in_chans, gh * ph, gw * pw)


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: IntOrPair,
             norm_pix_loss: bool) -> torch.Tensor:
    """Mean squared error per patch, averaged over the removed patches (mask 1). With
    ``norm_pix_loss`` each target patch is normalised by its mean and unbiased variance (+1e-6).
    Nothing removed (mask_ratio 0) gives 0/0 = NaN, as the authors' formula does."""
    target = mae_patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def mae_init_weights(model: torch.nn.Module) -> None:
    """The authors' initialisation: fixed sin-cos position embeddings, the patch projection as a
    Linear (xavier-uniform over its flattened (D, C*Ph*Pw) view), CLS and mask tokens N(0, 0.02^2),
    every Linear xavier-uniform with zero bias, every LayerNorm weight 1 and bias 0 (module order)."""
    grid = model.patch_embed.grid_size
    with torch.no_grad():
        model.pos_embed.copy_(mae_sincos_pos_embed(model.pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        model.decoder_pos_embed.copy_(
            mae_sincos_pos_embed(model.decoder_pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        w = model.patch_embed.proj.weight
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        torch.nn.init.normal_(model.cls_token, std=0.02)
        torch.nn.init.normal_(model.mask_token, std=0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.LayerNorm):
                if m.weight is not None:
                    torch.nn.init.ones_(m.weight)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)


def mae_build(model, patch_embed, make_block, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
              decoder_depth, decoder_num_heads, norm_layer, norm_pix_loss) -> None:
    """The authors' modules and parameters on ``model``, in their order (so one seed gives one
    initialisation), then :func:`mae_init_weights`. ``make_block(dim, heads)`` builds a block."""
    nn = torch.nn
    model.in_chans = in_chans
    model.patch_embed = patch_embed
    n = patch_embed.num_patches
    model.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    model.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)  # fixed sin-cos
    model.blocks = nn.ModuleList([make_block(embed_dim, num_heads) for _ in range(depth)])
    model.norm = norm_layer(embed_dim)
    model.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
    model.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    model.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim), requires_grad=False)
    model.decoder_blocks = nn.ModuleList([make_block(decoder_embed_dim, decoder_num_heads)
                                          for _ in range(decoder_depth)])
    model.decoder_norm = norm_layer(decoder_embed_dim)
    ph, pw = patch_embed.patch_size
    model.decoder_pred = nn.Linear(decoder_embed_dim, ph * pw * in_chans, bias=True)  # pixels of one patch
    model.norm_pix_loss = norm_pix_loss
    mae_init_weights(model)


def mae_timm_block():
    """timm's ViT ``Block`` (imported on use: vitkern itself imports without timm)."""
    try:
        from timm.models.vision_transformer import Block
    except ImportError as exc:
        raise ImportError(f"MAE models are built from timm's Block: install timm ({exc})") from exc
    return Block


__all__ += ["MaskedAutoencoderViTReference", "mae_sincos_pos_embed", "mae_patchify", "mae_unpatchify", "mae_loss"]


class MaskedAutoencoderViTReference(torch.nn.Module):
    """MAE with a ViT encoder and a light ViT decoder, written from the paper's algorithm with timm modules.

    Constructor, parameter names and shapes as the authors' ``MaskedAutoencoderViT`` (timm
    ``PatchEmbed`` ``patch_embed.proj``, ``cls_token``, fixed (requires_grad False) sin-cos
    ``pos_embed`` / ``decoder_pos_embed``, timm ``Block`` s ``blocks`` / ``decoder_blocks``, ``norm``,
    ``decoder_embed``, ``mask_token``, ``decoder_norm``, ``decoder_pred``). ``img_size`` and
    ``patch_size`` may be (h, w) pairs. Forward, step by step:

    1. Conv2d over all N patches, + position rows 1..N;
    2. keep the ``int(N (1 - mask_ratio))`` patches of smallest noise (argsort), gather them;
    3. prepend CLS + position row 0, timm blocks, ``norm``;
    4. ``decoder_embed``, append N - K mask tokens, un-shuffle with ``ids_restore`` (gather), put
       CLS back in front, + ``decoder_pos_embed``, decoder blocks, ``decoder_norm``, ``decoder_pred``,
       drop the CLS row;
    5. loss: per-patch MSE against the patchified image (``norm_pix_loss``: normalised per patch),
       mean over the removed patches.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=torch.nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        from timm.layers import PatchEmbed
        Block = mae_timm_block()
        self.img_size, self.patch_size, grid = mae_check_config(
            type(self).__name__, img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
            decoder_depth, decoder_num_heads)
        mae_build(self, PatchEmbed(self.img_size, self.patch_size, in_chans, embed_dim),
                  lambda dim, heads: Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer),
                  in_chans, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads,
                  norm_layer, norm_pix_loss)

    def patchify(self, imgs):
        return mae_patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        return mae_unpatchify(x, self.patch_size, self.patch_embed.grid_size, self.in_chans)

    def random_masking(self, x, mask_ratio, noise=None):
        """x (B, N, D) -> (the kept tokens (B, K, D), mask (B, N), ids_restore (B, N))."""
        B, N, D = x.shape
        noise = mae_check_noise(type(self).__name__, noise, B, N, x)
        ids_keep, mask, ids_restore = mae_masking(noise, mae_len_keep(N, mask_ratio), x.dtype)
        return x.gather(1, ids_keep[:, :, None].expand(-1, -1, D)), mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        mae_check_images(type(self).__name__, imgs, self.in_chans, self.img_size)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # every patch
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        B, T, D = x.shape
        mask_tokens = self.mask_token.expand(B, ids_restore.shape[1] + 1 - T, D)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order: kept, then removed
        patches = patches.gather(1, ids_restore[:, :, None].expand(-1, -1, D))  # back to patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs, pred, mask):
        return mae_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
