"""Naive reference implementations: the math vitkern's kernels must equal.

Plain PyTorch, written for reading, not speed. Tests evaluate these in float64
(CPU) or float32 (GPU) as the oracle, and benchmarks time them as the "naive"
baseline, so both always check against the same code.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

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
    prefix_tokens: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    pos_embed_covers_prefix: bool = True,
    keep_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Conv2d(stride = kernel = patch) -> tokens, optional prefix rows, position embedding, patch subset.

    x (B, C, H, W), weight (D, C, Ph, Pw), bias (D,). ``prefix_tokens`` (1, T, D), (B, T, D) or
    (T, D) become rows 0..T-1; ``cls_token`` (D values, timm's (1, 1, D)) is ``prefix_tokens`` with
    T = 1. ``keep_indices`` (B, K) keeps patches keep[b, j] (row-major) as rows T+j; without it
    K = N = (H/Ph)(W/Pw), all patches in order. ``pos_embed`` is (1, T+N, D) or (T+N, D) added to
    every row when ``pos_embed_covers_prefix``, else (1, N, D) or (N, D) added to the patch rows only;
    a kept patch's row gets the position row of its patch. Returns (B, T+K, D).
    """
    if cls_token is not None:
        if prefix_tokens is not None:
            raise ValueError("patch_embed_reference: give cls_token or prefix_tokens, not both")
        prefix_tokens = cls_token.reshape(1, 1, -1)
    patch = weight.shape[-2:]
    tokens = F.conv2d(x, weight, bias, stride=patch)  # (B, D, H/Ph, W/Pw): every patch
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
    B, N, D = tokens.shape
    patch_rows = torch.arange(N, device=x.device).expand(B, N)  # which patch each patch row holds
    if keep_indices is not None:
        patch_rows = keep_indices
        tokens = tokens.gather(1, keep_indices[:, :, None].expand(-1, -1, D))  # (B, K, D)
    T = 0
    if prefix_tokens is not None:
        T = prefix_tokens.shape[-2]
        prefix = prefix_tokens if prefix_tokens.dim() == 3 else prefix_tokens[None]  # (T, D) -> (1, T, D)
        prefix = prefix.expand(B, T, D)
        tokens = torch.cat([prefix, tokens], dim=1)  # (B, T+K, D)
    if pos_embed is not None:
        pos = pos_embed.reshape(1, -1, D).expand(B, -1, D)
        if pos_embed_covers_prefix:  # pos row t for prefix row t, pos row T+n for patch n
            rows = torch.cat([torch.arange(T, device=x.device).expand(B, T), T + patch_rows], dim=1)
            tokens = tokens + pos.gather(1, rows[:, :, None].expand(-1, -1, D))
        else:  # timm's no_embed_class: pos row n for patch n, nothing on the prefix rows
            patch_pos = pos.gather(1, patch_rows[:, :, None].expand(-1, -1, D))
            tokens = torch.cat([tokens[:, :T], tokens[:, T:] + patch_pos], dim=1)
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
