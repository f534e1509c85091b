"""Fused Swin (shifted-)window attention, forward and backward, in one pass over the grid.

Equals timm's ``SwinTransformerBlock._attn`` before ``proj`` (see
:func:`vitkern.reference.window_attention_reference`): roll by -shift, pad to a
multiple of the window, partition, per-window softmax(q·scale kᵀ + relative-position
bias + shift mask) v, reverse, crop, roll back.

None of those steps touches memory here. A program owns one (image, window, head)
and a block of its query tokens; token t of window (wy, wx) sits at
(wy·Mh + t // Mw, wx·Mw + t % Mw) of the shifted, padded grid, which is pixel
((row + shift_h) mod H, (col + shift_w) mod W) of the input when inside the grid and
a padding token otherwise. Padding tokens are zeros before the qkv Linear in timm,
so their q, k, v are the Linear's bias (``qkv_bias``); they stay unmasked keys, as in
timm, and their key/value gradients are returned as a gradient of ``qkv_bias``.
The relative-position bias is gathered from the ((2Mh-1)(2Mw-1), heads) table by
index arithmetic and the shift mask is computed from region arithmetic (timm's three
regions per axis on the padded grid, -100 between different regions). The output of
each token is written straight back to its input position. Saved for backward: the
row logsumexp only (O(tokens · heads)).

Attention dropout (``dropout_p`` > 0) is drawn in-kernel as in ``ops/attention.py``: a
Philox number per (image·window·head, query, key) from one seed, so the forward and every
backward kernel drop the same probabilities (:func:`window_dropout_keep_mask` reproduces
them for tests). With ``HAS_DROPOUT`` off the kernels contain none of it.

The flash-attention steps themselves (online softmax, probabilities recomputed in the backward,
dQ with the exact delta, dK/dV, dS, dropout, tile loads) are ``ops/_flash.py``'s, shared with
``ops/attention.py``; this file adds the window geometry, the bias gather and the shift mask.
A row whose keys are all -inf (a -inf bias table entry) gives output 0 and gradients 0.

Backward (deterministic, no atomics): delta = rowsum(dO∘O); dQ per query block (which
also replaces delta by the one that makes rowsum(dS) = 0); dK, dV per key block, plus the
padding keys' sums for d qkv_bias in one slot per padded window (only the last window row /
column holds padding, so no slot for the others); the table gradient by first summing dS over
images and windows per (head, query, key) in split partial sums, then folding those (n × n)
sums into the table by relative offset.

Cosine attention (Swin V2, ``logit_scale``; the constexpr COSINE): scores are
(q·k)/(max(|q|, eps)·max(|k|, eps))·exp(clamp(logit_scale, max=log 100)) per head. The kernels
keep q and k as loaded and scale each score by the row and column inverse norms (computed in
fp32 per tile), so no unit row is rounded to 16 bits before the dot; the backward's dots take
unit rows, and dQ / dK go back through the normalisation. d(head scale) = Σ dS∘cos is summed
per query row in the dQ kernel from the fp32 dS (with dQ's delta correction), then over rows
and windows on the host (fixed order, no atomics); the clamp and exp run in torch, so autograd
takes that gradient to the raw parameter.

Tiles: the window's n = Mh·Mw tokens are covered by power-of-two blocks chosen to waste
the least (49 tokens: 64; 144 tokens: blocks of 16, no padding).
All addresses are int64 (indices are cast before they meet a stride). An empty batch
launches nothing.
At head dim 32 a 7×7 window's attention does ~24 FLOP per byte it must move, far under the
tensor cores' ridge point, so the padded columns of 49 → 64 do not cost time; memory does.

Layout of this file: Triton kernels -> launchers -> torch.library custom ops with
fake and autograd registrations -> validation and backend predicates -> the public op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vitkern import _triton, backends, configs
from vitkern._memory import new_output
from vitkern._triton import cdiv, next_power_of_2, tl, triton
from vitkern.ops._flash import LOG2E as _LOG2E
from vitkern.ops._flash import (dkdv_step, dq_finish, dq_init, dq_step, dropout_args, dscore, load_row_stats,
                                load_tile, recompute_p, row_delta, softmax_init, softmax_lse, softmax_out,
                                softmax_step, store_tile)
from vitkern.ops._flash import dropout_keep_mask, new_dropout_seed
from vitkern._args import IntOrPair, pair
from vitkern.reference import window_attention_reference

__all__ = ["window_attention", "window_attention_flops", "window_dropout_keep_mask"]

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # float64: torch only
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
MAX_WINDOW_TOKENS = 1024
LOGIT_SCALE_MAX = math.log(100.0)  # Swin V2 (timm): the per-head score scale is exp(min(logit_scale, log 100))


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _window_tokens(t, win, H, W, SH, SW, N_WIN_W, MH: tl.constexpr, MW: tl.constexpr):
    """Token t of window ``win``: (input row, input col, inside the grid, padded row, padded col)."""
    wy = win // N_WIN_W
    wx = win % N_WIN_W
    ys = wy * MH + t // MW  # position in the rolled, padded grid
    xs = wx * MW + t % MW
    inside = (t < MH * MW) & (ys < H) & (xs < W)
    y = (ys + SH) % H  # rolling by -shift moved input pixel (y, x) to ((y - shift) mod H, ...)
    x = (xs + SW) % W
    return y, x, inside, ys, xs


@triton.jit
def _token_offsets(b, y, x, s_b, s_y, s_x):
    """int64 offsets of tokens (y, x) of image b in a (B, H, W, channels) tensor."""
    return b * s_b + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x


@triton.jit
def _program_window(H, W, SH, SW, N_WIN, N_WIN_W, HEADS, BLOCK: tl.constexpr, MH: tl.constexpr,
                    MW: tl.constexpr):
    """What a (window · head, token block) program owns: (pid, head, image, window, its block of
    tokens and their _window_tokens). pid = (image · window) · heads + head also keys lse, delta and
    the dropout stream."""
    pid = tl.program_id(0).to(tl.int64)
    head = pid % HEADS
    zw = pid // HEADS
    b = zw // N_WIN
    win = zw % N_WIN
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y, x, inside, ys, xs = _window_tokens(t, win, H, W, SH, SW, N_WIN_W, MH, MW)
    return pid, head, b, win, t, y, x, inside, ys, xs


@triton.jit
def _region(p, length, window, shift):
    """timm's shift-mask region along one axis of the padded grid (slices [:-M], [-M:-s], [-s:])."""
    label = tl.where(p < length - window, 0, tl.where(p < length - shift, 1, 2))
    return tl.where(shift == 0, 2, label)  # shift 0: the last slice [-0:] covers the whole axis


@triton.jit
def _padded_window(win, N_WIN_W, FULL_H, FULL_W):
    """(window holds padding tokens, its index among those windows), as _Geometry.pad_windows counts.

    Padding is appended after the roll, so only window rows >= FULL_H and window columns >= FULL_W
    (the last row / column, when the grid does not divide) hold it: numbered (wy, last column) for
    wy < FULL_H first, then the last row.
    """
    wy = win // N_WIN_W
    wx = win % N_WIN_W
    border = (wy >= FULL_H) | (wx >= FULL_W)
    return border, tl.where(wy < FULL_H, wy, FULL_H * (N_WIN_W - FULL_W) + wx)


@triton.jit
def _load_tokens(qkv_ptr, bias_ptr, row_off, inside, in_window, chan, dims,
                 s_c, HEAD_DIM: tl.constexpr, HAS_QKV_BIAS: tl.constexpr):
    """(tokens, head_dim) of q, k or v (channel offset ``chan``); padding tokens get the qkv bias."""
    tile = load_tile(qkv_ptr, row_off, chan, dims, s_c, inside, HEAD_DIM)
    if HAS_QKV_BIAS:
        pad = tl.load(bias_ptr + chan + dims, mask=dims < HEAD_DIM, other=0.0)
        is_pad = in_window & (inside == 0)
        tile = tl.where(is_pad[:, None], pad[None, :].to(tile.dtype), tile)
    return tile


@triton.jit
def _load_kv(qkv_ptr, bias_ptr, row_off, inside, in_window, head, C, dims, s_c, HEAD_DIM: tl.constexpr,
             HAS_QKV_BIAS: tl.constexpr):
    """k and v of window tokens (channels C + head·d and 2C + head·d of qkv)."""
    k = _load_tokens(qkv_ptr, bias_ptr, row_off, inside, in_window, C + head * HEAD_DIM, dims, s_c, HEAD_DIM,
                     HAS_QKV_BIAS)
    v = _load_tokens(qkv_ptr, bias_ptr, row_off, inside, in_window, 2 * C + head * HEAD_DIM, dims, s_c, HEAD_DIM,
                     HAS_QKV_BIAS)
    return k, v


@triton.jit
def _inv_norms(t, COSINE: tl.constexpr):
    """Cosine attention (Swin V2): 1 / max(|row|, eps) of t's rows in fp32 (F.normalize's eps 1e-12); else 1.

    The scores use q and k as loaded, scaled by these (rows of q, columns of k): unit rows rounded
    back to 16 bits before the dot would cost precision for nothing.
    """
    inv = 1.0
    if COSINE:
        tf = t.to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(tf * tf, 1)), 1e-12)
    return inv


@triton.jit
def _pair_scale(qk_scale, q_inv, k_inv, COSINE: tl.constexpr):
    """What q kᵀ is multiplied by: qk_scale, or per (query, key) qk_scale / (|q_i| |k_j|) under COSINE."""
    scale = qk_scale
    if COSINE:
        scale = (qk_scale * q_inv)[:, None] * k_inv[None, :]
    return scale


@triton.jit
def _unit_rows(t, inv, COSINE: tl.constexpr):
    """The operand of a gradient dot: t's unit rows in t's dtype under COSINE, else t."""
    if COSINE:
        t = (t.to(tl.float32) * inv[:, None]).to(t.dtype)
    return t


@triton.jit
def _unit_rows_bwd(t, inv, du, COSINE: tl.constexpr):
    """d t from du = d(t / max(|t|, eps)): (du - u·rowsum(u∘du)) / |t|, u the unit rows; a row no longer
    than eps was divided by the constant eps: du / eps. du itself when COSINE is off."""
    if COSINE:
        tf = t.to(tl.float32)
        u = tf * inv[:, None]
        proj = tl.where(tl.sqrt(tl.sum(tf * tf, 1)) > 1e-12, tl.sum(u * du, 1), 0.0)
        du = (du - u * proj[:, None]) * inv[:, None]
    return du


@triton.jit
def _head_scales(hs_ptr, head, qk_scale, sm_scale, COSINE: tl.constexpr):
    """(score scale · log2(e), score scale): the per-head exp(clamp(logit_scale)) under COSINE."""
    if COSINE:
        sm_scale = tl.load(hs_ptr + head)
        qk_scale = sm_scale * 1.4426950408889634
    return qk_scale, sm_scale


@triton.jit
def _window_scores(q, k, table_ptr, head, rows, cols, ys_q, xs_q, ys_k, xs_k, HP, WP, SH, SW,
                   st_t, st_h, qk_scale, mask_value, N_TOK,
                   MH: tl.constexpr, MW: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(q kᵀ·scale + relative-position bias + shift mask) · log2(e), keys past the window at -inf."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    dy = rows[:, None] // MW - cols[None, :] // MW + (MH - 1)
    dx = rows[:, None] % MW - cols[None, :] % MW + (MW - 1)
    pair_ok = (rows < N_TOK)[:, None] & (cols < N_TOK)[None, :]
    rel = tl.load(table_ptr + (dy * (2 * MW - 1) + dx).to(tl.int64) * st_t + head * st_h, mask=pair_ok, other=0.0)
    extra = rel.to(tl.float32)
    if HAS_SHIFT:
        region_q = _region(ys_q, HP, MH, SH) * 3 + _region(xs_q, WP, MW, SW)
        region_k = _region(ys_k, HP, MH, SH) * 3 + _region(xs_k, WP, MW, SW)
        extra += tl.where(region_q[:, None] != region_k[None, :], mask_value, 0.0)
    s += extra * 1.4426950408889634
    return tl.where((cols < N_TOK)[None, :], s, float("-inf"))


@triton.jit
def _win_fwd_kernel(
    qkv_ptr, qkv_bias_ptr, table_ptr, hs_ptr, out_ptr, lse_ptr,
    H, W, HP, WP, SH, SW, N_WIN, N_WIN_W, HEADS, C, qk_scale, mask_value, seed, dropout_p, inv_keep,
    s_b, s_y, s_x, s_c, so_b, so_y, so_x, so_c, st_t, st_h,
    MH: tl.constexpr, MW: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_DROPOUT: tl.constexpr, COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid, head, b, win, rows, y, x, inside_q, ys_q, xs_q = _program_window(H, W, SH, SW, N_WIN, N_WIN_W, HEADS,
                                                                         BLOCK_M, MH, MW)
    N_TOK = MH * MW
    dims = tl.arange(0, BLOCK_D)
    q = _load_tokens(qkv_ptr, qkv_bias_ptr, _token_offsets(b, y, x, s_b, s_y, s_x), inside_q, rows < N_TOK,
                     head * HEAD_DIM, dims, s_c, HEAD_DIM, HAS_QKV_BIAS)
    q_inv = _inv_norms(q, COSINE)
    qk_scale, _ = _head_scales(hs_ptr, head, qk_scale, qk_scale, COSINE)

    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_D)
    for start in range(0, N_TOK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        yk, xk, inside_k, ys_k, xs_k = _window_tokens(cols, win, H, W, SH, SW, N_WIN_W, MH, MW)
        k_off = _token_offsets(b, yk, xk, s_b, s_y, s_x)
        k = _load_tokens(qkv_ptr, qkv_bias_ptr, k_off, inside_k, cols < N_TOK, C + head * HEAD_DIM, dims, s_c,
                         HEAD_DIM, HAS_QKV_BIAS)
        k_inv = _inv_norms(k, COSINE)
        s = _window_scores(q, k, table_ptr, head, rows, cols, ys_q, xs_q, ys_k, xs_k, HP, WP, SH, SW,
                           st_t, st_h, _pair_scale(qk_scale, q_inv, k_inv, COSINE), mask_value, N_TOK, MH, MW,
                           HAS_SHIFT)
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i, seed, pid, rows, cols, N_TOK, N_TOK, dropout_p, inv_keep,
                                          HAS_DROPOUT)
        v = _load_tokens(qkv_ptr, qkv_bias_ptr, k_off, inside_k, cols < N_TOK, 2 * C + head * HEAD_DIM, dims,
                         s_c, HEAD_DIM, HAS_QKV_BIAS)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    store_tile(out_ptr, softmax_out(acc, l_i), _token_offsets(b, y, x, so_b, so_y, so_x), head * HEAD_DIM, dims,
               so_c, inside_q, HEAD_DIM)
    tl.store(lse_ptr + pid * N_TOK + rows, softmax_lse(m_i, l_i), mask=rows < N_TOK)


@triton.jit
def _load_dout(dout_ptr, b, y, x, inside, head, dims, sdo_b, sdo_y, sdo_x, sdo_c, HEAD_DIM: tl.constexpr):
    """dO rows of window tokens; padding tokens were cropped, so their dO is 0."""
    return load_tile(dout_ptr, _token_offsets(b, y, x, sdo_b, sdo_y, sdo_x), head * HEAD_DIM, dims, sdo_c, inside,
                     HEAD_DIM)


@triton.jit
def _win_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr,
    H, W, SH, SW, N_WIN, N_WIN_W, HEADS,
    so_b, so_y, so_x, so_c, sdo_b, sdo_y, sdo_x, sdo_c,
    MH: tl.constexpr, MW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO ∘ O) per (window, head, token); 0 for padding tokens (cropped away)."""
    pid, head, b, _, rows, y, x, inside, _, _ = _program_window(H, W, SH, SW, N_WIN, N_WIN_W, HEADS, BLOCK_M, MH, MW)
    dims = tl.arange(0, BLOCK_D)
    o = load_tile(out_ptr, _token_offsets(b, y, x, so_b, so_y, so_x), head * HEAD_DIM, dims, so_c, inside, HEAD_DIM)
    do = _load_dout(dout_ptr, b, y, x, inside, head, dims, sdo_b, sdo_y, sdo_x, sdo_c, HEAD_DIM)
    tl.store(delta_ptr + pid * (MH * MW) + rows, row_delta(o, do), mask=rows < MH * MW)


@triton.jit
def _win_bwd_dkdv_kernel(
    qkv_ptr, qkv_bias_ptr, table_ptr, hs_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, pad_grad_ptr,
    H, W, HP, WP, SH, SW, N_WIN, N_WIN_W, HEADS, C, qk_scale, sm_scale, mask_value, seed, dropout_p, inv_keep,
    FULL_H, FULL_W, N_PAD_WIN,
    s_b, s_y, s_x, s_c, sdo_b, sdo_y, sdo_x, sdo_c, sd_b, sd_y, sd_x, sd_c, st_t, st_h,
    MH: tl.constexpr, MW: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_DROPOUT: tl.constexpr, PAD_GRAD: tl.constexpr,
    COSINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block of one (image, window, head); padding keys' sums go to pad_grad."""
    pid, head, b, win, cols, yk, xk, inside_k, ys_k, xs_k = _program_window(H, W, SH, SW, N_WIN, N_WIN_W, HEADS,
                                                                           BLOCK_N, MH, MW)
    N_TOK = MH * MW
    dims = tl.arange(0, BLOCK_D)
    k, v = _load_kv(qkv_ptr, qkv_bias_ptr, _token_offsets(b, yk, xk, s_b, s_y, s_x), inside_k, cols < N_TOK, head,
                    C, dims, s_c, HEAD_DIM, HAS_QKV_BIAS)
    k_inv = _inv_norms(k, COSINE)
    qk_scale, sm_scale = _head_scales(hs_ptr, head, qk_scale, sm_scale, COSINE)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(0, N_TOK, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        y, x, inside_q, ys_q, xs_q = _window_tokens(rows, win, H, W, SH, SW, N_WIN_W, MH, MW)
        q = _load_tokens(qkv_ptr, qkv_bias_ptr, _token_offsets(b, y, x, s_b, s_y, s_x), inside_q, rows < N_TOK,
                         head * HEAD_DIM, dims, s_c, HEAD_DIM, HAS_QKV_BIAS)
        q_inv = _inv_norms(q, COSINE)
        do = _load_dout(dout_ptr, b, y, x, inside_q, head, dims, sdo_b, sdo_y, sdo_x, sdo_c, HEAD_DIM)
        lse, delta = load_row_stats(lse_ptr, delta_ptr, pid * N_TOK + rows, rows < N_TOK)
        s = _window_scores(q, k, table_ptr, head, rows, cols, ys_q, xs_q, ys_k, xs_k, HP, WP, SH, SW,
                           st_t, st_h, _pair_scale(qk_scale, q_inv, k_inv, COSINE), mask_value, N_TOK, MH, MW,
                           HAS_SHIFT)
        p = recompute_p(s, lse, (rows < N_TOK)[:, None] & (cols < N_TOK)[None, :])
        dk, dv = dkdv_step(dk, dv, p, _unit_rows(q, q_inv, COSINE), do, v, delta, seed, pid, rows, cols, N_TOK,
                           N_TOK, dropout_p, inv_keep, HAS_DROPOUT)

    dk = _unit_rows_bwd(k, k_inv, dk * sm_scale, COSINE)  # cosine: back through k / max(|k|, eps)
    d_off = _token_offsets(b, yk, xk, sd_b, sd_y, sd_x)
    store_tile(dqkv_ptr, dk, d_off, C + head * HEAD_DIM, dims, sd_c, inside_k, HEAD_DIM)
    store_tile(dqkv_ptr, dv, d_off, 2 * C + head * HEAD_DIM, dims, sd_c, inside_k, HEAD_DIM)
    if PAD_GRAD:  # padding keys are the qkv bias: their gradients belong to it
        # Only border windows hold padding, so only they own a slot (no slot per window of the grid).
        border, pad_win = _padded_window(win, N_WIN_W, FULL_H, FULL_W)
        if border:
            is_pad = ((cols < N_TOK) & (inside_k == 0))[:, None]
            slot_id = ((b * N_PAD_WIN + pad_win) * HEADS + head) * tl.num_programs(1) + tl.program_id(1)
            slot = pad_grad_ptr + slot_id * (2 * BLOCK_D) + dims
            tl.store(slot, tl.sum(tl.where(is_pad, dk, 0.0), 0))
            tl.store(slot + BLOCK_D, tl.sum(tl.where(is_pad, dv, 0.0), 0))


@triton.jit
def _win_bwd_dq_kernel(
    qkv_ptr, qkv_bias_ptr, table_ptr, hs_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, dhs_ptr,
    H, W, HP, WP, SH, SW, N_WIN, N_WIN_W, HEADS, C, qk_scale, sm_scale, mask_value, seed, dropout_p, inv_keep,
    FULL_H, FULL_W, N_PAD_WIN,
    s_b, s_y, s_x, s_c, sdo_b, sdo_y, sdo_x, sdo_c, sd_b, sd_y, sd_x, sd_c, st_t, st_h,
    MH: tl.constexpr, MW: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_DROPOUT: tl.constexpr, PAD_GRAD: tl.constexpr,
    COSINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block of one (image, window, head), written to the token's position."""
    pid, head, b, win, rows, y, x, inside_q, ys_q, xs_q = _program_window(H, W, SH, SW, N_WIN, N_WIN_W, HEADS,
                                                                         BLOCK_M, MH, MW)
    N_TOK = MH * MW
    dims = tl.arange(0, BLOCK_D)
    q = _load_tokens(qkv_ptr, qkv_bias_ptr, _token_offsets(b, y, x, s_b, s_y, s_x), inside_q, rows < N_TOK,
                     head * HEAD_DIM, dims, s_c, HEAD_DIM, HAS_QKV_BIAS)
    q_inv = _inv_norms(q, COSINE)
    qk_scale, sm_scale = _head_scales(hs_ptr, head, qk_scale, sm_scale, COSINE)
    do = _load_dout(dout_ptr, b, y, x, inside_q, head, dims, sdo_b, sdo_y, sdo_x, sdo_c, HEAD_DIM)
    lse, delta = load_row_stats(lse_ptr, delta_ptr, pid * N_TOK + rows, rows < N_TOK)

    # As attention's dQ kernel, this program also corrects delta (see dq_finish) for the dK/dV
    # and table-gradient kernels, which run after this one.
    dq, pk, ds_sum, p_sum = dq_init(BLOCK_M, BLOCK_D)
    ds_cos = tl.zeros((BLOCK_M,), dtype=tl.float32)  # cosine: rowsums of dS ∘ cos and P ∘ cos
    p_cos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N_TOK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        yk, xk, inside_k, ys_k, xs_k = _window_tokens(cols, win, H, W, SH, SW, N_WIN_W, MH, MW)
        k, v = _load_kv(qkv_ptr, qkv_bias_ptr, _token_offsets(b, yk, xk, s_b, s_y, s_x), inside_k, cols < N_TOK,
                        head, C, dims, s_c, HEAD_DIM, HAS_QKV_BIAS)
        k_inv = _inv_norms(k, COSINE)
        s = _window_scores(q, k, table_ptr, head, rows, cols, ys_q, xs_q, ys_k, xs_k, HP, WP, SH, SW,
                           st_t, st_h, _pair_scale(qk_scale, q_inv, k_inv, COSINE), mask_value, N_TOK, MH, MW,
                           HAS_SHIFT)
        p = recompute_p(s, lse, (rows < N_TOK)[:, None] & (cols < N_TOK)[None, :])
        if COSINE:
            # As dq_step on unit k rows, and d(scale) = Σ_j dS_ij cos_ij from the fp32 dS (the dots round it)
            ds = dscore(p, do, v, delta, seed, pid, rows, cols, N_TOK, N_TOK, dropout_p, inv_keep, HAS_DROPOUT)
            k_unit = _unit_rows(k, k_inv, COSINE)
            dq += tl.dot(ds.to(k.dtype), k_unit)
            pk += tl.dot(p.to(k.dtype), k_unit)
            ds_sum += tl.sum(ds, 1)
            p_sum += tl.sum(p, 1)
            cos = tl.dot(q, tl.trans(k)) * q_inv[:, None] * k_inv[None, :]
            ds_cos += tl.sum(ds * cos, 1)
            p_cos += tl.sum(p * cos, 1)
        else:
            dq, pk, ds_sum, p_sum = dq_step(dq, pk, ds_sum, p_sum, p, k, v, do, delta, seed, pid, rows, cols,
                                            N_TOK, N_TOK, dropout_p, inv_keep, HAS_DROPOUT)

    dq, delta_fixed = dq_finish(dq, pk, ds_sum, p_sum, delta, sm_scale)
    if COSINE:  # d(scale) per query row, with dq's delta correction; summed over rows and windows on the host
        tl.store(dhs_ptr + pid * N_TOK + rows, ds_cos - (delta_fixed - delta) * p_cos, mask=rows < N_TOK)
        dq = _unit_rows_bwd(q, q_inv, dq, COSINE)  # back through q / max(|q|, eps)
    tl.store(delta_ptr + pid * N_TOK + rows, delta_fixed, mask=rows < N_TOK)
    store_tile(dqkv_ptr, dq, _token_offsets(b, y, x, sd_b, sd_y, sd_x), head * HEAD_DIM, dims, sd_c, inside_q,
               HEAD_DIM)


@triton.jit
def _win_bwd_dscore_sum_kernel(
    qkv_ptr, qkv_bias_ptr, table_ptr, hs_ptr, dout_ptr, lse_ptr, delta_ptr, partial_ptr,
    H, W, HP, WP, SH, SW, N_WIN, N_WIN_W, HEADS, C, qk_scale, mask_value, seed, dropout_p, inv_keep,
    Z_TOTAL, Z_PER_SPLIT,
    s_b, s_y, s_x, s_c, sdo_b, sdo_y, sdo_x, sdo_c, st_t, st_h,
    MH: tl.constexpr, MW: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_DROPOUT: tl.constexpr, COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """partial[split, head, i, j] = Σ dS[z, head, i, j] over the split's (image · window) range z."""
    head = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    N_TOK = MH * MW
    n_col_blocks = (N_TOK + BLOCK_N - 1) // BLOCK_N
    rows = (tile // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    valid = (rows < N_TOK)[:, None] & (cols < N_TOK)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    qk_scale, _ = _head_scales(hs_ptr, head, qk_scale, qk_scale, COSINE)
    z_lo = split * Z_PER_SPLIT
    z_hi = tl.minimum(z_lo + Z_PER_SPLIT, Z_TOTAL)
    for zw in range(z_lo, z_hi):
        z = tl.cast(zw, tl.int64)  # the loop variable may be int32: b * s_b below must not wrap
        b = z // N_WIN
        win = z % N_WIN
        pid = z * HEADS + head
        y, x, inside_q, ys_q, xs_q = _window_tokens(rows, win, H, W, SH, SW, N_WIN_W, MH, MW)
        yk, xk, inside_k, ys_k, xs_k = _window_tokens(cols, win, H, W, SH, SW, N_WIN_W, MH, MW)
        q = _load_tokens(qkv_ptr, qkv_bias_ptr, _token_offsets(b, y, x, s_b, s_y, s_x), inside_q, rows < N_TOK,
                         head * HEAD_DIM, dims, s_c, HEAD_DIM, HAS_QKV_BIAS)
        k, v = _load_kv(qkv_ptr, qkv_bias_ptr, _token_offsets(b, yk, xk, s_b, s_y, s_x), inside_k, cols < N_TOK,
                        head, C, dims, s_c, HEAD_DIM, HAS_QKV_BIAS)
        q_inv = _inv_norms(q, COSINE)
        k_inv = _inv_norms(k, COSINE)
        do = _load_dout(dout_ptr, b, y, x, inside_q, head, dims, sdo_b, sdo_y, sdo_x, sdo_c, HEAD_DIM)
        lse, delta = load_row_stats(lse_ptr, delta_ptr, pid * N_TOK + rows, rows < N_TOK)
        s = _window_scores(q, k, table_ptr, head, rows, cols, ys_q, xs_q, ys_k, xs_k, HP, WP, SH, SW,
                           st_t, st_h, _pair_scale(qk_scale, q_inv, k_inv, COSINE), mask_value, N_TOK, MH, MW,
                           HAS_SHIFT)
        p = recompute_p(s, lse, valid)
        acc += dscore(p, do, v, delta, seed, pid, rows, cols, N_TOK, N_TOK, dropout_p, inv_keep, HAS_DROPOUT)
    out = partial_ptr + ((split * HEADS + head) * N_TOK + rows[:, None].to(tl.int64)) * N_TOK + cols[None, :]
    tl.store(out, acc, mask=valid)


@triton.jit
def _table_grad_kernel(
    dscore_ptr, dtable_ptr, HEADS, TABLE_ROWS,
    MH: tl.constexpr, MW: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """dtable[idx, head] = Σ dS_sum[head, i, j] over token pairs (i, j) at relative offset idx."""
    head = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dy = idx // (2 * MW - 1) - (MH - 1)  # row offset of query minus key
    dx = idx % (2 * MW - 1) - (MW - 1)
    N_TOK = MH * MW
    t = tl.arange(0, N_PAD)  # the query token; its key at the offset is (r - dy, c - dx)
    rk = (t // MW)[None, :] - dy[:, None]
    ck = (t % MW)[None, :] - dx[:, None]
    ok = (idx < TABLE_ROWS)[:, None] & (t < N_TOK)[None, :] & (rk >= 0) & (rk < MH) & (ck >= 0) & (ck < MW)
    vals = tl.load(dscore_ptr + (head * N_TOK + t[None, :]) * N_TOK + rk * MW + ck, mask=ok, other=0.0)
    tl.store(dtable_ptr + idx * HEADS + head, tl.sum(vals, 1), mask=idx < TABLE_ROWS)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def _tile(n: int) -> int:
    """The power-of-two block (16, 32 or 64) that covers n tokens with the least padding (larger on ties)."""
    best = None
    for block in (64, 32, 16):
        padded = cdiv(n, block) * block
        if best is None or padded < best[0]:
            best = (padded, block)
    return best[1]


def _tiles(n_tok: int) -> Tuple[int, int]:
    """(query block, key block). The interpreter's cost is per tile operation: one tile per window."""
    if _triton.INTERPRET:
        whole = max(16, next_power_of_2(n_tok))
        return whole, whole
    return _tile(n_tok), _tile(n_tok)


def _shape_class(dtype: torch.dtype, n_tok: int, head_dim: int, shifted: bool, cosine: bool = False) -> str:
    """The key of a tuned-config table entry (vitkern.configs): what the tiles depend on."""
    key = f"{str(dtype).replace('torch.', '')}|t{n_tok}|d{head_dim}|shift{int(shifted)}"
    return key + "|cosine" if cosine else key


class _Geometry:
    """Grid, window and shift arithmetic shared by the launchers."""

    def __init__(self, qkv: Tensor, num_heads: int, window, shift, cosine: bool = False):
        self.B, self.H, self.W, c3 = qkv.shape
        self.C = c3 // 3
        self.heads = num_heads
        self.head_dim = self.C // num_heads
        self.MH, self.MW = window
        self.SH, self.SW = shift
        self.HP = cdiv(self.H, self.MH) * self.MH
        self.WP = cdiv(self.W, self.MW) * self.MW
        self.n_win_w = self.WP // self.MW
        self.n_win = (self.HP // self.MH) * self.n_win_w
        # Window rows / columns without padding; the windows past them hold the padding tokens.
        self.full_h = self.HP // self.MH - (self.HP > self.H)
        self.full_w = self.n_win_w - (self.WP > self.W)
        self.pad_windows = self.n_win - self.full_h * self.full_w
        self.n_tok = self.MH * self.MW
        self.programs = self.B * self.n_win * num_heads
        self.block_m, self.block_n = _tiles(self.n_tok)
        self.block_d = max(16, next_power_of_2(self.head_dim))
        # GPU launch settings, from `python -m vitkern.tools.compile_report`: with 64-token tiles and
        # 4 warps the forward, dQ and d(score)-sum kernels spill 76-650 B (shift mask and bias gather
        # live beside the tiles); 8 warps and one stage spill nothing, except in the d(score) sum,
        # which holds a score tile per (query, key) block pair: it takes 32-token tiles (49 tokens
        # pad to 64 either way).
        big = self.block_m >= 64 and not _triton.INTERPRET
        self.warps, self.stages = (8, 1) if big else (4, 3)
        self.dscore_m, self.dscore_n = (32, 32) if big else (self.block_m, self.block_n)
        # Cosine attention's backward also holds the inverse norms, the unit-row operands and, in dQ, a
        # second score-sized tile (for d(scale)): at 64 queries, 32-key blocks still spill 4-32 B in dK/dV
        # or dQ (sm_80, Triton 3.6 or 3.8); 16-key blocks spill nothing (compile report, ci set).
        self.bwd_block_n = 16 if (big and cosine) else self.block_n
        # Windows over 64 tokens (Swin's 16x16) with 64x64 tiles sit at 255 registers on sm_80 once the
        # online softmax guards fully masked key blocks: 32-key blocks there (compile report, full set).
        if big and self.n_tok > 64:
            self.fwd_block_n = 32
            self.bwd_block_n = min(self.bwd_block_n, 32)
        else:
            self.fwd_block_n = self.block_n
        self.shape_class = _shape_class(qkv.dtype, self.n_tok, self.head_dim, bool(self.SH or self.SW), cosine)

    def launch(self, group: str, block_m: int, block_n: int, warps: int, stages: int) -> dict:
        """One kernel group's tiles and launch settings: a tuned table entry (vitkern.configs)
        for ``window_attention.<group>`` where one exists, else the heuristic ones given."""
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        tuned = configs.lookup(f"window_attention.{group}", self.shape_class)
        return dict(cfg, **tuned) if tuned else cfg

    def grid_args(self):
        return (self.H, self.W, self.HP, self.WP, self.SH, self.SW, self.n_win, self.n_win_w, self.heads, self.C)

    def consts(self, qkv_bias, dropout_p, head_scale):
        return dict(MH=self.MH, MW=self.MW, HEAD_DIM=self.head_dim, HAS_QKV_BIAS=qkv_bias is not None,
                    HAS_SHIFT=bool(self.SH or self.SW), HAS_DROPOUT=dropout_p > 0, COSINE=head_scale is not None,
                    BLOCK_D=self.block_d)


def _head_scale_arg(head_scale: Optional[Tensor], qkv: Tensor) -> Tensor:
    """The kernels' per-head score scale (fp32, dense), or any tensor when COSINE is off (never read)."""
    return head_scale.to(torch.float32).contiguous() if head_scale is not None else qkv


def _launch_fwd(qkv, table, qkv_bias, g: _Geometry, scale, mask_value, dropout_p, seed, head_scale=None):
    out = new_output((g.B, g.H, g.W, g.C), dtype=qkv.dtype, device=qkv.device)
    lse = new_output((g.programs, g.n_tok), dtype=torch.float32, device=qkv.device)
    if g.programs == 0:  # an empty batch: nothing to launch
        return out, lse
    bias_arg = qkv_bias.contiguous() if qkv_bias is not None else qkv  # (3C,): the kernels index it densely
    cfg = g.launch("fwd", g.block_m, g.fwd_block_n, g.warps, g.stages)
    _win_fwd_kernel[(g.programs, cdiv(g.n_tok, cfg["BLOCK_M"]))](
        qkv, bias_arg, table, _head_scale_arg(head_scale, qkv), out, lse,
        *g.grid_args(), scale * _LOG2E, float(mask_value), *dropout_args(dropout_p, seed),
        *qkv.stride(), *out.stride(), *table.stride(),
        **cfg, **g.consts(qkv_bias, dropout_p, head_scale),
    )
    return out, lse


def _dscore_splits(g: _Geometry, tiles: int, device) -> int:
    """Split the sum over images · windows until the grid covers the GPU about twice."""
    total = g.B * g.n_win
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(total, cdiv(target, g.heads * tiles)))


def _empty_grads(qkv, table, qkv_bias, need_table: bool, head_scale):
    """The gradients of an empty batch: empty dqkv, zero d(qkv_bias), d(table) and d(head_scale)."""
    f32 = dict(dtype=torch.float32, device=qkv.device)
    return (torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device),
            torch.zeros(qkv_bias.shape, **f32) if qkv_bias is not None else torch.empty(0, **f32),
            torch.zeros(table.shape, **f32) if need_table else torch.empty(0, **f32),
            torch.zeros(head_scale.shape, **f32) if head_scale is not None else torch.empty(0, **f32))


def _launch_bwd(dout, qkv, table, qkv_bias, out, lse, g: _Geometry, scale, mask_value, dropout_p, seed,
                need_table: bool, head_scale=None):
    if g.programs == 0:
        return _empty_grads(qkv, table, qkv_bias, need_table, head_scale)
    dev = qkv.device
    consts = g.consts(qkv_bias, dropout_p, head_scale)
    hs_arg = _head_scale_arg(head_scale, qkv)
    bias_arg = qkv_bias.contiguous() if qkv_bias is not None else qkv
    delta = new_output((g.programs, g.n_tok), dtype=torch.float32, device=dev)
    _win_bwd_delta_kernel[(g.programs, cdiv(g.n_tok, g.block_m))](
        out, dout, delta, g.H, g.W, g.SH, g.SW, g.n_win, g.n_win_w, g.heads, *out.stride(), *dout.stride(),
        MH=g.MH, MW=g.MW, HEAD_DIM=g.head_dim, BLOCK_M=g.block_m, BLOCK_D=g.block_d,
    )
    # Every token of the grid is in exactly one window, so the kernels write every element of dqkv.
    dqkv = new_output(qkv.shape, dtype=qkv.dtype, device=dev)
    cfg = g.launch("bwd", g.block_m, g.bwd_block_n, g.warps, g.stages)  # dQ and dK/dV: one key-block count
    key_blocks = cdiv(g.n_tok, cfg["BLOCK_N"])
    pad_grad_on = qkv_bias is not None and g.pad_windows > 0
    # One (k | v) slot per (image, padded window, head, key block); every slot is written.
    pad_grad = new_output((g.B * g.pad_windows * g.heads * key_blocks, 2, g.block_d), dtype=torch.float32,
                          device=dev) if pad_grad_on else qkv
    drop = dropout_args(dropout_p, seed)
    common = (*g.grid_args(), scale * _LOG2E, scale, float(mask_value), *drop, g.full_h, g.full_w, g.pad_windows,
              *qkv.stride(), *dout.stride(), *dqkv.stride(), *table.stride())
    blocks = dict(cfg, PAD_GRAD=pad_grad_on, **consts)
    # Cosine attention: d(head scale) per (image · window · head, query row), summed below.
    dhs_rows = new_output((g.programs, g.n_tok), dtype=torch.float32, device=dev) if head_scale is not None else qkv
    # dQ first: it replaces delta by the corrected one that the later kernels use.
    _win_bwd_dq_kernel[(g.programs, cdiv(g.n_tok, cfg["BLOCK_M"]))](
        qkv, bias_arg, table, hs_arg, dout, lse, delta, dqkv, dhs_rows, *common, **blocks)
    _win_bwd_dkdv_kernel[(g.programs, key_blocks)](
        qkv, bias_arg, table, hs_arg, dout, lse, delta, dqkv, pad_grad, *common, **blocks)
    dhead_scale = qkv.new_empty(0, dtype=torch.float32)
    if head_scale is not None:  # fixed-order sum over images · windows and query rows: deterministic
        dhead_scale = dhs_rows.view(g.B * g.n_win, g.heads, g.n_tok).sum(dim=(0, 2))

    dqkv_bias = qkv.new_empty(0, dtype=torch.float32)
    if qkv_bias is not None:  # q of padding tokens gets no gradient: their outputs are cropped
        dqkv_bias = torch.zeros(3 * g.C, dtype=torch.float32, device=dev)
        if pad_grad_on:  # fixed-order sum over images, padded windows and key blocks: deterministic
            sums = pad_grad.view(g.B * g.pad_windows, g.heads, key_blocks, 2, g.block_d).sum(dim=(0, 2))
            dqkv_bias[g.C:] = sums[..., : g.head_dim].permute(1, 0, 2).reshape(-1)  # (k | v) x (head, d)

    dtable = qkv.new_empty(0, dtype=torch.float32)
    if need_table:
        # two stages at least: one stage spills 4 B at 32x32 tiles on sm_80 (Triton 3.8, compile report)
        dscore = g.launch("dscore", g.dscore_m, g.dscore_n, 4, max(g.stages, 2))
        tiles = cdiv(g.n_tok, dscore["BLOCK_M"]) * cdiv(g.n_tok, dscore["BLOCK_N"])
        splits = _dscore_splits(g, tiles, dev)
        per_split = cdiv(g.B * g.n_win, splits)
        splits = cdiv(g.B * g.n_win, per_split)
        partial = new_output((splits, g.heads, g.n_tok, g.n_tok), dtype=torch.float32, device=dev)
        blocks.pop("PAD_GRAD")
        _win_bwd_dscore_sum_kernel[(g.heads, tiles, splits)](
            qkv, bias_arg, table, hs_arg, dout, lse, delta, partial,
            *g.grid_args(), scale * _LOG2E, float(mask_value), *drop, g.B * g.n_win, per_split,
            *qkv.stride(), *dout.stride(), *table.stride(),
            **dict(blocks, **dscore),
        )
        dscore_sum = partial.sum(0) if splits > 1 else partial[0]  # fixed order: deterministic
        rows = table.shape[0]
        dtable = new_output((rows, g.heads), dtype=torch.float32, device=dev)
        _table_grad_kernel[(g.heads, cdiv(rows, 32))](
            dscore_sum, dtable, g.heads, rows, MH=g.MH, MW=g.MW, N_PAD=next_power_of_2(g.n_tok), BLOCK=32)
    return dqkv, dqkv_bias, dtable, dhead_scale


def window_dropout_keep_mask(seed: int, batch: int, grid: Tuple[int, int], num_heads: int, window,
                             dropout_p: float, device="cpu") -> Tensor:
    """The dropout factors (0 or 1/(1-p)) the window kernels apply for ``seed``: (B, nW, heads, n, n).

    Windows of the padded grid row-major, tokens of a window row-major (as
    :func:`vitkern.reference.window_attention_reference` partitions them). The kernels key the
    Philox stream by the element's flat index in (B·nW·heads, n, n), the attention kernels' layout
    with (image·window, head) as the batch·head index, so attention's mask helper draws them.
    For tests: ``window_attention_reference(..., dropout_mask=...)`` then reproduces a dropout run.
    """
    mh, mw = window
    n_win = cdiv(grid[0], mh) * cdiv(grid[1], mw)
    n = mh * mw
    mask = dropout_keep_mask(seed, (batch * n_win, num_heads, n, n), dropout_p, device=device)
    return mask.view(batch, n_win, num_heads, n, n)


# --------------------------------------------------------------------------- #
# torch.library custom ops
# --------------------------------------------------------------------------- #
@torch.library.custom_op("vitkern::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    qkv: Tensor, table: Tensor, qkv_bias: Optional[Tensor], num_heads: int, window: Sequence[int],
    shift: Sequence[int], scale: float, mask_value: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
    head_scale: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """head_scale (heads,): cosine attention (Swin V2) with this per-head score scale; ``scale`` is then unused."""
    g = _Geometry(qkv, num_heads, tuple(window), tuple(shift), head_scale is not None)
    return _launch_fwd(qkv, table, qkv_bias, g, scale, mask_value, dropout_p, seed, head_scale)


@_window_attention_fwd.register_fake
def _window_attention_fwd_fake(qkv, table, qkv_bias, num_heads, window, shift, scale, mask_value, dropout_p=0.0,
                               seed=None, head_scale=None):
    g = _Geometry(qkv, num_heads, tuple(window), tuple(shift))
    return qkv.new_empty((g.B, g.H, g.W, g.C)), qkv.new_empty((g.programs, g.n_tok), dtype=torch.float32)


@torch.library.custom_op("vitkern::window_attention_bwd", mutates_args=())
def _window_attention_bwd(
    dout: Tensor, qkv: Tensor, table: Tensor, qkv_bias: Optional[Tensor], out: Tensor, lse: Tensor,
    num_heads: int, window: Sequence[int], shift: Sequence[int], scale: float, mask_value: float,
    need_table: bool, dropout_p: float = 0.0, seed: Optional[Tensor] = None, head_scale: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dqkv, d qkv_bias, d table, d head_scale), the last three in fp32 or empty."""
    g = _Geometry(qkv, num_heads, tuple(window), tuple(shift), head_scale is not None)
    return _launch_bwd(dout, qkv, table, qkv_bias, out, lse, g, scale, mask_value, dropout_p, seed, need_table,
                       head_scale)


@_window_attention_bwd.register_fake
def _window_attention_bwd_fake(dout, qkv, table, qkv_bias, out, lse, num_heads, window, shift, scale, mask_value,
                               need_table, dropout_p=0.0, seed=None, head_scale=None):
    f32 = dict(dtype=torch.float32)
    return (qkv.new_empty(qkv.shape), qkv.new_empty(qkv_bias.shape if qkv_bias is not None else 0, **f32),
            qkv.new_empty(table.shape if need_table else 0, **f32),
            qkv.new_empty(head_scale.shape if head_scale is not None else 0, **f32))


def _window_attention_fwd_setup_context(ctx, inputs, output):
    qkv, table, qkv_bias, num_heads, window, shift, scale, mask_value, dropout_p, seed, head_scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, table, qkv_bias, out, lse, seed, head_scale)
    ctx.args = (num_heads, tuple(window), tuple(shift), scale, mask_value)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(lse)


def _window_attention_fwd_backward(ctx, dout, _dlse):
    qkv, table, qkv_bias, out, lse, seed, head_scale = ctx.saved_tensors
    need_qkv, need_table, need_bias = ctx.needs_input_grad[:3]
    need_scale = len(ctx.needs_input_grad) > 10 and ctx.needs_input_grad[10]  # head_scale passed and needs one
    dqkv, dqkv_bias, dtable, dhead_scale = torch.ops.vitkern.window_attention_bwd(
        dout, qkv, table, qkv_bias, out, lse, *ctx.args, need_table, ctx.dropout_p, seed, head_scale)
    grads = (dqkv if need_qkv else None, dtable.to(table.dtype) if need_table else None,
             dqkv_bias.to(qkv_bias.dtype) if need_bias else None, None, None, None, None, None, None, None,
             dhead_scale.to(head_scale.dtype) if need_scale else None)
    return grads[:len(ctx.needs_input_grad)]


_window_attention_fwd.register_autograd(
    _window_attention_fwd_backward, setup_context=_window_attention_fwd_setup_context)


def window_attention_flops(batch: int, grid: Tuple[int, int], dim: int, num_heads: int, window, backward=False) -> int:
    """Matmul FLOPs over all windows of the padded grid: 4·windows·n²·C forward, 10·... backward."""
    mh, mw = window
    n_win = cdiv(grid[0], mh) * cdiv(grid[1], mw)
    per = batch * n_win * (mh * mw) ** 2 * dim
    return 10 * per if backward else 4 * per


@register_flop_formula(torch.ops.vitkern.window_attention_fwd)
def _fwd_flops(qkv_shape, table_shape, bias_shape, num_heads, window, *args, **kwargs):
    B, H, W, C3 = qkv_shape
    return window_attention_flops(B, (H, W), C3 // 3, num_heads, window)


@register_flop_formula(torch.ops.vitkern.window_attention_bwd)
def _bwd_flops(dout_shape, qkv_shape, table_shape, bias_shape, saved_out_shape, lse_shape, num_heads, window,
               *args, **kwargs):
    B, H, W, C3 = qkv_shape
    return window_attention_flops(B, (H, W), C3 // 3, num_heads, window, backward=True)


# --------------------------------------------------------------------------- #
# Validation, backend predicates, public op
# --------------------------------------------------------------------------- #
def _validate(qkv, table, qkv_bias, num_heads, window, shift, dropout_p, logit_scale=None, scale=None) -> None:
    if not isinstance(qkv, Tensor) or qkv.dim() != 4:
        got = tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__
        raise ValueError(f"window_attention: qkv must be a 4-D tensor (B, H, W, 3C), got {got}")
    if qkv.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"window_attention: qkv.dtype must be one of float64/float32/float16/bfloat16, got {qkv.dtype}")
    B, H, W, C3 = qkv.shape
    if min(H, W) == 0:  # an empty batch (B = 0) is fine: empty in, empty out
        raise ValueError(f"window_attention: qkv's token grid (H, W) must be non-empty, got shape {tuple(qkv.shape)}")
    if C3 % 3:
        raise ValueError(f"window_attention: qkv's last dimension must be 3C, got {C3}")
    C = C3 // 3
    if not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads:
        raise ValueError(f"window_attention: num_heads must be a positive divisor of C={C}, got {num_heads!r}")
    (mh, mw), (sh, sw) = window, shift
    if mh <= 0 or mw <= 0:
        raise ValueError(f"window_attention: window_size must be positive, got {window}")
    if not (0 <= sh < mh and 0 <= sw < mw):
        raise ValueError(f"window_attention: shift_size must satisfy 0 <= shift < window_size {window}, got {shift}")
    rows = (2 * mh - 1) * (2 * mw - 1)
    if not isinstance(table, Tensor) or tuple(table.shape) != (rows, num_heads):
        got = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"window_attention: rel_pos_bias_table must have shape ((2*{mh}-1)*(2*{mw}-1), num_heads) = "
                         f"{(rows, num_heads)}, got {got}")
    for name, t in (("rel_pos_bias_table", table), ("qkv_bias", qkv_bias)):
        if t is None:
            continue
        if t.device != qkv.device:
            raise ValueError(f"window_attention: {name} is on {t.device} but qkv is on {qkv.device}")
        if not t.is_floating_point():
            raise TypeError(f"window_attention: {name} must be floating point, got {t.dtype}")
    if table.dtype != qkv.dtype:  # the torch backend could not add it to the scores; no backend accepts it
        raise TypeError(f"window_attention: rel_pos_bias_table.dtype must be qkv.dtype ({qkv.dtype}), "
                        f"got {table.dtype}")
    if qkv_bias is not None and tuple(qkv_bias.shape) != (C3,):
        raise ValueError(f"window_attention: qkv_bias must have shape ({C3},), got {tuple(qkv_bias.shape)}")
    if isinstance(dropout_p, bool) or not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"window_attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if logit_scale is None:
        return
    if not isinstance(logit_scale, Tensor):
        raise TypeError(f"window_attention: logit_scale must be a tensor or None, got {type(logit_scale).__name__}")
    if tuple(logit_scale.shape) not in ((num_heads,), (num_heads, 1, 1)):
        raise ValueError(f"window_attention: logit_scale must have shape (num_heads,) = ({num_heads},) or "
                         f"(num_heads, 1, 1) = ({num_heads}, 1, 1), got {tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        raise TypeError(f"window_attention: logit_scale must be floating point, got {logit_scale.dtype}")
    if logit_scale.device != qkv.device:
        raise ValueError(f"window_attention: logit_scale is on {logit_scale.device} but qkv is on {qkv.device}")
    if scale is not None:
        raise ValueError(f"window_attention: scale must be None with logit_scale (cosine attention scales the "
                         f"scores by exp(clamp(logit_scale)) instead), got {scale!r}")


@dataclass
class _Call:
    """One validated window-attention call, as the predicates and the launch read it."""
    qkv: Tensor
    table: Tensor
    qkv_bias: Optional[Tensor]
    num_heads: int
    window: Tuple[int, int]
    shift: Tuple[int, int]
    scale: Optional[float]  # None with logit_scale
    mask_value: float
    dropout_p: float
    logit_scale: Optional[Tensor] = None


def _prepare(qkv, rel_pos_bias_table, *, num_heads, window_size, shift_size=0, scale=None, qkv_bias=None,
             mask_value=-100.0, dropout_p=0.0, logit_scale=None) -> _Call:
    """window_attention()'s public boundary: pairs normalised, autocast, validated, scale defaulted."""
    window = pair(window_size, "window_size", "window_attention")
    shift = pair(shift_size, "shift_size", "window_attention")
    dtype = backends.autocast_dtype(qkv)
    if dtype is not None:  # as timm's Linear output would be under autocast; the bias joins its dtype
        qkv = qkv.to(dtype)
        if isinstance(rel_pos_bias_table, Tensor) and rel_pos_bias_table.is_floating_point():
            rel_pos_bias_table = rel_pos_bias_table.to(dtype)
    _validate(qkv, rel_pos_bias_table, qkv_bias, num_heads, window, shift, dropout_p, logit_scale, scale)
    head_dim = qkv.shape[-1] // 3 // num_heads
    if logit_scale is None:
        scale = head_dim ** -0.5 if scale is None else float(scale)
    return _Call(qkv, rel_pos_bias_table, qkv_bias, num_heads, window, shift, scale, float(mask_value),
                 float(dropout_p), logit_scale)


def _why_not_triton(call: _Call) -> Optional[str]:
    qkv, window = call.qkv, call.window
    if qkv.dtype not in _KERNEL_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16, got {qkv.dtype} (use backend='torch')"
    head_dim = qkv.shape[-1] // 3 // call.num_heads
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is larger than the Triton kernels support ({MAX_HEAD_DIM})"
    if window[0] * window[1] > MAX_WINDOW_TOKENS:
        return f"windows of {window[0] * window[1]} tokens exceed the Triton kernels' {MAX_WINDOW_TOKENS}"
    if call.logit_scale is not None and head_dim < 3:
        # unit rows of 1 or 2 elements: the kernel's d(logit_scale) disagreed with the reference in fuzzing
        return f"cosine attention (logit_scale) at head_dim {head_dim} < 3 is not verified in the Triton kernel"
    return backends.triton_reason([qkv, call.table, call.qkv_bias, call.logit_scale], qkv.dtype)


_BACKENDS = backends.register("window_attention", prepare=_prepare,
                              predicates={"triton": _why_not_triton, "torch": backends.available})


def window_attention(
    qkv: Tensor,
    rel_pos_bias_table: Tensor,
    *,
    num_heads: int,
    window_size: IntOrPair,
    shift_size: IntOrPair = 0,
    scale: Optional[float] = None,
    qkv_bias: Optional[Tensor] = None,
    mask_value: float = -100.0,
    dropout_p: float = 0.0,
    logit_scale: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Swin (shifted-)window attention from the qkv Linear's output, before ``proj``.

    Args:
        qkv: (B, H, W, 3C), the qkv Linear applied to the (B, H, W, C) token grid, any strides.
        rel_pos_bias_table: ((2Mh-1)(2Mw-1), num_heads), timm's ``relative_position_bias_table``.
        num_heads: heads; C must be divisible by it.
        window_size, shift_size: int or (h, w), the *effective* sizes for this grid (timm's
            small-grid rule: :func:`vitkern.reference.swin_effective_window`); 0 <= shift < window.
        scale: multiplies q before q·kᵀ; default head_dim ** -0.5.
        qkv_bias: the qkv Linear's bias (3C,): what timm's zero-padded tokens become. Gets a gradient
            from the padding tokens (on top of the Linear's own). None means zeros.
        mask_value: the additive shift-mask value between regions (timm: -100).
        dropout_p: attention-probability dropout inside each window, applied whenever > 0 (pass 0
            in eval, as timm's ``attn_drop`` does). The Triton kernels draw it in-kernel from a seed
            taken from torch's default generator (:func:`window_dropout_keep_mask` reproduces it);
            the torch backend uses ``F.dropout``.
        logit_scale: Swin V2's cosine attention: the raw per-head parameter, (num_heads,) or timm's
            (num_heads, 1, 1). q and k rows are then normalised (as F.normalize, eps 1e-12) and the
            scores multiplied by exp(clamp(logit_scale, max=log 100)) per head (``scale`` must be None);
            ``rel_pos_bias_table`` is the final table (Swin V2: 16·sigmoid(cpb_mlp(coords))). Gets a
            gradient (0 for a head above the clamp, as timm's).
        backend: "auto" | "cuda" | "triton" | "torch".

    Returns:
        (B, H, W, C), each token's attention output at its own position.
    """
    c = _prepare(qkv, rel_pos_bias_table, num_heads=num_heads, window_size=window_size, shift_size=shift_size,
                 scale=scale, qkv_bias=qkv_bias, mask_value=mask_value, dropout_p=dropout_p, logit_scale=logit_scale)
    chosen = _BACKENDS.select(backend, c)
    if chosen == "triton":
        # The clamp and exp run here, in autograd: the kernels return d(head scale) and torch takes it
        # to the raw parameter (0 above the clamp, as timm's).
        head_scale = None if c.logit_scale is None else \
            torch.clamp(c.logit_scale.reshape(-1).float(), max=LOGIT_SCALE_MAX).exp()
        out, _ = torch.ops.vitkern.window_attention_fwd(c.qkv, c.table, c.qkv_bias, c.num_heads, list(c.window),
                                                        list(c.shift), 1.0 if c.scale is None else c.scale,
                                                        c.mask_value, c.dropout_p, new_dropout_seed(c.dropout_p),
                                                        head_scale)
        return out
    return window_attention_reference(c.qkv, c.table, num_heads=c.num_heads, window_size=c.window,
                                      shift_size=c.shift, scale=c.scale, qkv_bias=c.qkv_bias,
                                      mask_value=c.mask_value, dropout_p=c.dropout_p, logit_scale=c.logit_scale)
