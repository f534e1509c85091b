"""Fused global attention (FlashAttention-style), forward and backward.

out = softmax(q kᵀ · scale + attn_bias [+ causal mask]) v, any Nq and Nk (0 included).

Forward: one program per (batch·head, block of queries) walks the keys in blocks
with an online softmax (running max and sum), so the Nq×Nk scores never reach
device memory; it stores the output and the row logsumexp. Keys past Nk are
set to -inf before the row max. Dropout keeps each probability with a Philox
draw keyed by (seed, element index), recomputed identically in the backward.

Backward (deterministic: every output element is reduced by one program in a
fixed order, no atomics):
  1. delta = rowsum(dO ∘ O)                        (one small kernel)
  2. dQ: one program per query block, looping over key blocks; on the way it sums the
     delta that makes rowsum(dS) = 0 exactly (see _attn_bwd_dq_kernel), corrects dq and stores it
  3. dK, dV: one program per key block, looping over query blocks
  4. only when the bias needs a gradient: d(bias) per tile of the bias's own shape,
     dS recomputed and summed over every dimension the bias is broadcast over (batch,
     heads, queries, keys), so the gradient buffer is the size of the bias
Causal (IS_CAUSAL, top-left aligned as SDPA): the mask is applied to the score tile
and the loops stop (or start) at the diagonal, so fully masked key blocks are never
read. The flag is a constexpr: the non-causal kernels are unchanged.
Steps 2-4 each recompute q kᵀ; that costs FLOPs but needs no atomics.

Layouts: every kernel takes (batch, head, token, dim) strides, so views of a
packed qkv Linear output (B, N, 3·h·d) are read in place and the output is written
straight into (B, N, h·d) for the proj Linear (see :func:`attention_packed`).

The online softmax, the backward's recomputed probabilities, the dQ / dK,dV / dS steps, dropout and
the tile loads are ``ops/_flash.py``'s, shared with the window-attention kernels.

Layout of this file: Triton kernels -> launchers -> torch.library custom ops with
fake and autograd registrations -> backend predicates -> the public ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

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
from vitkern.ops._flash import dropout_keep_mask, new_dropout_seed  # public here, as before the core moved
from vitkern.reference import attention_reference

__all__ = ["attention", "attention_packed", "attention_flops", "dropout_keep_mask"]

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # float64: torch only
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _load_rows(base, rows, dims, s_n, s_d, n_rows, HEAD_DIM: tl.constexpr):
    """A (rows, head_dim) tile of one (batch, head), zeros outside the tensor."""
    return load_tile(base, rows.to(tl.int64) * s_n, 0, dims, s_d, rows < n_rows, HEAD_DIM)


@triton.jit
def _store_rows(base, tile, rows, dims, s_n, s_d, n_rows, HEAD_DIM: tl.constexpr):
    store_tile(base, tile, rows.to(tl.int64) * s_n, 0, dims, s_d, rows < n_rows, HEAD_DIM)


@triton.jit
def _scores_log2(q, k, bias_base, rows, cols, NQ, NK, sbias_m, sbias_n, qk_scale, HAS_BIAS: tl.constexpr):
    """(q kᵀ · scale + bias) · log2(e): scores in base 2, so softmax uses exp2."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if HAS_BIAS:
        ok = (rows < NQ)[:, None] & (cols < NK)[None, :]
        bias = tl.load(bias_base + rows[:, None].to(tl.int64) * sbias_m + cols[None, :].to(tl.int64) * sbias_n,
                       mask=ok, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _causal_mask(s, rows, cols):
    """SDPA's is_causal, top-left aligned for any Nq, Nk: query i sees keys j <= i."""
    return tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))


@triton.jit
def _causal_key_end(NK, q_block, BLOCK_M: tl.constexpr):
    """End of the keys the query block q_block can see under the causal mask: later blocks are skipped."""
    return tl.minimum(NK, (q_block + 1) * BLOCK_M)


@triton.jit
def _causal_query_start(k_start, BLOCK_M: tl.constexpr):
    """First query block (its first row) that sees any key >= k_start under the causal mask."""
    return (k_start // BLOCK_M) * BLOCK_M


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr,
    NQ, NK, HEADS, qk_scale, seed, dropout_p, inv_keep,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sbias_b, sbias_h, sbias_m, sbias_n,
    so_b, so_h, so_n, so_d,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr = False,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HEADS
    h = bh % HEADS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    bias_base = bias_ptr + b * sbias_b + h * sbias_h
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, rows, dims, sq_n, sq_d, NQ, HEAD_DIM)

    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_D)
    key_end = NK
    if IS_CAUSAL:
        key_end = _causal_key_end(NK, tl.program_id(1), BLOCK_M)
    for start in range(0, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, dims, sk_n, sk_d, NK, HEAD_DIM)
        s = _scores_log2(q, k, bias_base, rows, cols, NQ, NK, sbias_m, sbias_n, qk_scale, HAS_BIAS)
        s = tl.where((cols < NK)[None, :], s, float("-inf"))  # padded keys out before the row max
        if IS_CAUSAL:
            s = _causal_mask(s, rows, cols)
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i, seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep,
                                          HAS_DROPOUT)
        v = _load_rows(v_base, cols, dims, sv_n, sv_d, NK, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    _store_rows(out_ptr + b * so_b + h * so_h, softmax_out(acc, l_i), rows, dims, so_n, so_d, NQ, HEAD_DIM)
    tl.store(lse_ptr + bh * NQ + rows, softmax_lse(m_i, l_i), mask=rows < NQ)


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr, NQ, HEADS,
    so_b, so_h, so_n, so_d,
    sdo_b, sdo_h, sdo_n, sdo_d,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[bh, i] = sum_d dO[i, d] * O[i, d] (the softmax backward's row term)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HEADS
    h = bh % HEADS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    o = _load_rows(out_ptr + b * so_b + h * so_h, rows, dims, so_n, so_d, NQ, HEAD_DIM)
    do = _load_rows(dout_ptr + b * sdo_b + h * sdo_h, rows, dims, sdo_n, sdo_d, NQ, HEAD_DIM)
    tl.store(delta_ptr + bh * NQ + rows, row_delta(o, do), mask=rows < NQ)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    NQ, NK, HEADS, qk_scale, sm_scale, seed, dropout_p, inv_keep,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sbias_b, sbias_h, sbias_m, sbias_n,
    sdo_b, sdo_h, sdo_n, sdo_d,
    sdk_b, sdk_h, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_n, sdv_d,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr = False,
):
    """dK, dV of one key block, summed over all query blocks in order."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HEADS
    h = bh % HEADS
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = dout_ptr + b * sdo_b + h * sdo_h
    bias_base = bias_ptr + b * sbias_b + h * sbias_h
    k = _load_rows(k_ptr + b * sk_b + h * sk_h, cols, dims, sk_n, sk_d, NK, HEAD_DIM)
    v = _load_rows(v_ptr + b * sv_b + h * sv_h, cols, dims, sv_n, sv_d, NK, HEAD_DIM)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    query_start = 0
    if IS_CAUSAL:
        query_start = _causal_query_start(tl.program_id(1) * BLOCK_N, BLOCK_M)
    for start in range(query_start, NQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < NQ
        q = _load_rows(q_base, rows, dims, sq_n, sq_d, NQ, HEAD_DIM)
        do = _load_rows(do_base, rows, dims, sdo_n, sdo_d, NQ, HEAD_DIM)
        lse, delta = load_row_stats(lse_ptr, delta_ptr, bh * NQ + rows, row_ok)
        s = _scores_log2(q, k, bias_base, rows, cols, NQ, NK, sbias_m, sbias_n, qk_scale, HAS_BIAS)
        if IS_CAUSAL:
            s = _causal_mask(s, rows, cols)
        p = recompute_p(s, lse, row_ok[:, None] & (cols < NK)[None, :])
        dk, dv = dkdv_step(dk, dv, p, q, do, v, delta, seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep,
                           HAS_DROPOUT)

    _store_rows(dk_ptr + b * sdk_b + h * sdk_h, dk * sm_scale, cols, dims, sdk_n, sdk_d, NK, HEAD_DIM)
    _store_rows(dv_ptr + b * sdv_b + h * sdv_h, dv, cols, dims, sdv_n, sdv_d, NK, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    NQ, NK, HEADS, qk_scale, sm_scale, seed, dropout_p, inv_keep,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sbias_b, sbias_h, sbias_m, sbias_n,
    sdo_b, sdo_h, sdo_n, sdo_d,
    sdq_b, sdq_h, sdq_n, sdq_d,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr = False,
):
    """dQ of one query block, summed over all key blocks in order."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HEADS
    h = bh % HEADS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    bias_base = bias_ptr + b * sbias_b + h * sbias_h
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, rows, dims, sq_n, sq_d, NQ, HEAD_DIM)
    do = _load_rows(dout_ptr + b * sdo_b + h * sdo_h, rows, dims, sdo_n, sdo_d, NQ, HEAD_DIM)
    lse, delta = load_row_stats(lse_ptr, delta_ptr, bh * NQ + rows, row_ok)

    # This program sees every key of its rows, so it also corrects delta (see dq_finish) for the
    # dK/dV and d(bias) kernels, which run after it.
    dq, pk, ds_sum, p_sum = dq_init(BLOCK_M, BLOCK_D)
    key_end = NK
    if IS_CAUSAL:
        key_end = _causal_key_end(NK, tl.program_id(1), BLOCK_M)
    for start in range(0, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, dims, sk_n, sk_d, NK, HEAD_DIM)
        v = _load_rows(v_base, cols, dims, sv_n, sv_d, NK, HEAD_DIM)
        s = _scores_log2(q, k, bias_base, rows, cols, NQ, NK, sbias_m, sbias_n, qk_scale, HAS_BIAS)
        if IS_CAUSAL:
            s = _causal_mask(s, rows, cols)
        p = recompute_p(s, lse, row_ok[:, None] & (cols < NK)[None, :])
        dq, pk, ds_sum, p_sum = dq_step(dq, pk, ds_sum, p_sum, p, k, v, do, delta, seed, bh, rows, cols, NQ, NK,
                                        dropout_p, inv_keep, HAS_DROPOUT)

    dq, delta = dq_finish(dq, pk, ds_sum, p_sum, delta, sm_scale)
    _store_rows(dq_ptr + b * sdq_b + h * sdq_h, dq, rows, dims, sdq_n, sdq_d, NQ, HEAD_DIM)
    tl.store(delta_ptr + bh * NQ + rows, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dbias_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dbias_ptr,
    NQ, NK, HEADS, BATCH, BIAS_HEADS, qk_scale, seed, dropout_p, inv_keep,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sbias_b, sbias_h, sbias_m, sbias_n,
    sdo_b, sdo_h, sdo_n, sdo_d,
    HEAD_DIM: tl.constexpr, HAS_DROPOUT: tl.constexpr, SUM_BATCH: tl.constexpr, SUM_HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SUM_ROWS: tl.constexpr = False, SUM_COLS: tl.constexpr = False, IS_CAUSAL: tl.constexpr = False,
):
    """d(bias) = dS summed over every dimension the bias is broadcast over, straight into the bias's shape.

    One program per (bias batch, bias head, query block, key block) of the bias's own shape: a bias
    broadcast over queries (SUM_ROWS) or keys (SUM_COLS) has one block along that dimension, and its
    program walks all of them. For each (batch, head, query block, key block) it covers, in a fixed
    order, it recomputes dS and adds it to one tile, reduced along rows / keys at the end:
    deterministic, and no (B, h, Nq, Nk) or (b', h', Nq, Nk) buffer.
    """
    pid = tl.program_id(0)
    bias_b = pid // BIAS_HEADS
    bias_h = pid % BIAS_HEADS
    own_rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    own_cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    b_lo = 0 if SUM_BATCH else bias_b
    b_hi = BATCH if SUM_BATCH else bias_b + 1
    h_lo = 0 if SUM_HEADS else bias_h
    h_hi = HEADS if SUM_HEADS else bias_h + 1
    # One iteration (this program's block) along a dimension the bias has, all blocks along a broadcast one.
    m_lo = 0 if SUM_ROWS else tl.program_id(1) * BLOCK_M
    m_hi = NQ if SUM_ROWS else m_lo + 1
    n_lo = 0 if SUM_COLS else tl.program_id(2) * BLOCK_N
    n_hi = NK if SUM_COLS else n_lo + 1
    if IS_CAUSAL:
        if not SUM_COLS:  # query blocks that see none of this key block contribute nothing
            m_lo = tl.maximum(m_lo, _causal_query_start(n_lo, BLOCK_M))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        for h in range(h_lo, h_hi):
            b64 = tl.cast(b, tl.int64)
            h64 = tl.cast(h, tl.int64)
            bh = b64 * HEADS + h64
            for m_start in range(m_lo, m_hi, BLOCK_M):
                rows = m_start + tl.arange(0, BLOCK_M)
                row_ok = rows < NQ
                q = _load_rows(q_ptr + b64 * sq_b + h64 * sq_h, rows, dims, sq_n, sq_d, NQ, HEAD_DIM)
                do = _load_rows(dout_ptr + b64 * sdo_b + h64 * sdo_h, rows, dims, sdo_n, sdo_d, NQ, HEAD_DIM)
                lse, delta = load_row_stats(lse_ptr, delta_ptr, bh * NQ + rows, row_ok)
                n_end = n_hi
                if IS_CAUSAL:
                    n_end = tl.minimum(n_hi, m_start + BLOCK_M)  # key blocks past the diagonal are skipped
                for n_start in range(n_lo, n_end, BLOCK_N):
                    cols = n_start + tl.arange(0, BLOCK_N)
                    valid = row_ok[:, None] & (cols < NK)[None, :]
                    k = _load_rows(k_ptr + b64 * sk_b + h64 * sk_h, cols, dims, sk_n, sk_d, NK, HEAD_DIM)
                    v = _load_rows(v_ptr + b64 * sv_b + h64 * sv_h, cols, dims, sv_n, sv_d, NK, HEAD_DIM)
                    s = _scores_log2(q, k, bias_ptr + b64 * sbias_b + h64 * sbias_h, rows, cols, NQ, NK,
                                     sbias_m, sbias_n, qk_scale, True)
                    if IS_CAUSAL:
                        s = _causal_mask(s, rows, cols)
                    p = recompute_p(s, lse, valid)
                    acc += dscore(p, do, v, delta, seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep,
                                  HAS_DROPOUT)  # 0 outside the tensor and where masked
    pid64 = tl.cast(pid, tl.int64)
    if SUM_ROWS and SUM_COLS:  # dbias (b', h', 1, 1)
        tl.store(dbias_ptr + pid64, tl.sum(tl.sum(acc, 1), 0))
    elif SUM_ROWS:  # dbias (b', h', 1, Nk)
        tl.store(dbias_ptr + pid64 * NK + own_cols, tl.sum(acc, 0), mask=own_cols < NK)
    elif SUM_COLS:  # dbias (b', h', Nq, 1)
        tl.store(dbias_ptr + pid64 * NQ + own_rows, tl.sum(acc, 1), mask=own_rows < NQ)
    else:  # dbias (b', h', Nq, Nk)
        out = dbias_ptr + (pid64 * NQ + own_rows[:, None].to(tl.int64)) * NK + own_cols[None, :]
        tl.store(out, acc, mask=(own_rows < NQ)[:, None] & (own_cols < NK)[None, :])


# --------------------------------------------------------------------------- #
# Launchers. q, k, v, out and grads are (B, h, N, d) views with any strides.
# --------------------------------------------------------------------------- #
def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _shape_class(dtype: torch.dtype, head_dim: int, has_bias: bool, has_dropout: bool) -> str:
    """The key of a tuned-config table entry (vitkern.configs): what the tiles depend on."""
    return f"{str(dtype).replace('torch.', '')}|d{head_dim}|bias{int(has_bias)}|dropout{int(has_dropout)}"


# GPU tiles, chosen with `python -m vitkern.tools.compile_report` (no spills in 16-bit kernels,
# <= 64 B in fp32 ones, shared memory within sm_80's 163 KB and sm_90a's 227 KB per block):
# the bias tile and the dropout bits are live beside the accumulators, so kernels with them get
# more warps or a narrower key block; fp32 tiles take twice the registers and shared memory.
def _fwd_config(head_dim: int, dtype: torch.dtype = torch.bfloat16, has_bias: bool = False,
                has_dropout: bool = False) -> dict:
    if _triton.INTERPRET:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    tuned = configs.lookup("attention.fwd", _shape_class(dtype, head_dim, has_bias, has_dropout))
    if tuned:
        return tuned
    heavy = has_bias or has_dropout
    if head_dim <= 64:
        # 4 warps spill 4 B on sm_80 under Triton 3.6; at d32 the bias tile and dropout bits beside
        # 64 keys spill 160-220 B with any warp count, 32 keys none.
        return dict(BLOCK_M=128, BLOCK_N=32 if heavy and head_dim <= 32 else 64, num_warps=8, num_stages=3)
    if heavy:  # 128x32 with a bias or dropout spills 16-32 B at d80/d96 under Triton 3.6; 64x32 none
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    # fp32 128x64 at d128: 229 KB of shared memory
    return dict(BLOCK_M=128, BLOCK_N=32 if dtype == torch.float32 else 64, num_warps=8, num_stages=2)


def _bwd_configs(head_dim: int, dtype: torch.dtype = torch.bfloat16, has_bias: bool = False,
                 has_dropout: bool = False) -> Tuple[dict, dict]:
    """Tiles of the dQ kernel and of the dK/dV kernel (BLOCK_M queries, BLOCK_N keys).

    A tuned entry ("attention.bwd") applies to both."""
    if _triton.INTERPRET:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
        return cfg, cfg
    tuned = configs.lookup("attention.bwd", _shape_class(dtype, head_dim, has_bias, has_dropout))
    if tuned:
        return tuned, tuned
    # 32 query rows with 8 warps spill nothing anywhere; 64x64 tiles spill in dQ with bias and dropout
    # (300-900 B), in fp32 dQ on sm_80 (500 B at d64), in 16-bit d64 dK/dV on sm_80 (8 B), and fp32
    # d128 dK/dV needs 192 KB of shared memory (over sm_80's 163 KB).
    narrow = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)
    if has_bias or has_dropout:  # dK/dV over 64 keys spills 116 B at d64 on sm_80 under Triton 3.6; 32 do not
        # and so does dQ over 64 keys at d32 (48-92 B under 3.6)
        return (dict(narrow, BLOCK_N=32) if head_dim <= 32 else narrow), dict(narrow, BLOCK_N=32)
    if dtype == torch.float32:
        return narrow, narrow
    if head_dim <= 64:  # 64-row dQ: wgmma on sm_90a, no spill
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2), narrow
    # 64-row dK/dV at d128 spills 104 B on sm_90a under Triton 3.6 (255 registers under 3.8); 32 rows do not.
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1), narrow


def _dbias_config(head_dim: int, dtype: torch.dtype = torch.bfloat16, has_dropout: bool = False) -> dict:
    """Tiles of the d(bias) kernel: it holds q, dO (BLOCK_M x d) and k, v (BLOCK_N x d) at once."""
    if _triton.INTERPRET:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    tuned = configs.lookup("attention.dbias", _shape_class(dtype, head_dim, True, has_dropout))
    if tuned:
        return tuned
    # One stage: Triton's default 3 needs 400 KB of shared memory at fp32 d128. 32 query rows
    # at d > 64 spill (16-72 B bf16, 80 B fp32 on sm_80); 16 do not.
    return dict(BLOCK_M=16 if head_dim > 64 else 32, BLOCK_N=64, num_warps=8, num_stages=1)


def _bias_strides(bias: Optional[Tensor], shape4) -> Tuple[int, int, int, int]:
    """Strides of the bias broadcast to (B, h, Nq, Nk): 0 along broadcast dimensions."""
    if bias is None:
        return (0, 0, 0, 0)
    return tuple(bias.expand(shape4).stride())


def _is_empty(q: Tensor, k: Tensor) -> bool:
    """Nothing to compute (SDPA returns empty, or zeros when Nk = 0): no zero-size launch."""
    return q.numel() == 0 or k.shape[2] == 0


def _launch_fwd(q, k, v, bias, scale, dropout_p, seed, out, is_causal: bool = False) -> Tensor:
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    lse = new_output((B, H, NQ), dtype=torch.float32, device=q.device)
    if _is_empty(q, k):  # no keys: out = 0 and lse = log(0), as SDPA and the reference give
        out.zero_()
        lse.fill_(float("-inf"))
        return lse
    cfg = _fwd_config(D, q.dtype, bias is not None, dropout_p > 0)
    grid = (B * H, cdiv(NQ, cfg["BLOCK_M"]))
    _attn_fwd_kernel[grid](
        q, k, v, bias if bias is not None else q, out, lse,
        NQ, NK, H, scale * _LOG2E, *dropout_args(dropout_p, seed),
        *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias, (B, H, NQ, NK)), *out.stride(),
        HEAD_DIM=D, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, BLOCK_D=_block_d(D),
        IS_CAUSAL=is_causal, **cfg,
    )
    return lse


def _launch_bwd(dout, q, k, v, out, lse, bias, scale, dropout_p, seed, dq, dk, dv, bias_grad: bool,
                is_causal: bool = False):
    """Fills dq, dk, dv (views). With bias_grad, returns d(bias) in fp32, shaped (b', h', Nq', Nk')
    with 1 wherever the bias is broadcast (over batch, heads, queries or keys: reduced in-kernel)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    if _is_empty(q, k):  # every gradient is empty, or zero (no keys: the output is constant 0)
        for t in (dq, dk, dv):
            t.zero_()
        return new_output(_dbias_shape(bias, B, H, NQ, NK), dtype=torch.float32, device=q.device).zero_() \
            if bias_grad else None
    dq_cfg, dkdv_cfg = _bwd_configs(D, q.dtype, bias is not None, dropout_p > 0)
    block_d = _block_d(D)
    delta = new_output((B, H, NQ), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(B * H, cdiv(NQ, dq_cfg["BLOCK_M"]))](
        out, dout, delta, NQ, H, *out.stride(), *dout.stride(),
        HEAD_DIM=D, BLOCK_M=dq_cfg["BLOCK_M"], BLOCK_D=block_d,
    )
    drop = dropout_args(dropout_p, seed)
    bias_strides = _bias_strides(bias, (B, H, NQ, NK))
    scalars = (qk_scale := scale * _LOG2E, scale, *drop)
    strides = (*q.stride(), *k.stride(), *v.stride(), *bias_strides, *dout.stride())
    flags = dict(HEAD_DIM=D, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, BLOCK_D=block_d,
                 IS_CAUSAL=is_causal)
    bias_arg = bias if bias is not None else q
    # dQ first: it replaces delta by the corrected one that the dK/dV and d(bias) kernels then use.
    _attn_bwd_dq_kernel[(B * H, cdiv(NQ, dq_cfg["BLOCK_M"]))](
        q, k, v, bias_arg, dout, lse, delta, dq, NQ, NK, H, *scalars, *strides, *dq.stride(), **flags, **dq_cfg,
    )
    _attn_bwd_dkdv_kernel[(B * H, cdiv(NK, dkdv_cfg["BLOCK_N"]))](
        q, k, v, bias_arg, dout, lse, delta, dk, dv, NQ, NK, H, *scalars, *strides, *dk.stride(), *dv.stride(),
        **flags, **dkdv_cfg,
    )
    if not bias_grad:
        return None
    bias_batch, bias_heads, bias_nq, bias_nk = shape = _dbias_shape(bias, B, H, NQ, NK)
    dbias = new_output(shape, dtype=torch.float32, device=q.device)
    cfg = _dbias_config(D, q.dtype, dropout_p > 0)
    grid = (bias_batch * bias_heads, cdiv(bias_nq, cfg["BLOCK_M"]), cdiv(bias_nk, cfg["BLOCK_N"]))
    _attn_bwd_dbias_kernel[grid](
        q, k, v, bias, dout, lse, delta, dbias, NQ, NK, H, B, bias_heads, qk_scale, *drop, *strides,
        HEAD_DIM=D, HAS_DROPOUT=dropout_p > 0, SUM_BATCH=bias_batch == 1, SUM_HEADS=bias_heads == 1,
        BLOCK_D=block_d, SUM_ROWS=bias_nq == 1, SUM_COLS=bias_nk == 1, IS_CAUSAL=is_causal, **cfg,
    )
    return dbias


def _dbias_shape(bias: Tensor, B: int, H: int, NQ: int, NK: int) -> Tuple[int, int, int, int]:
    """The bias's own shape as 4-D: the kernel reduces over every dimension it is broadcast along."""
    shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    return tuple(n if s != 1 else 1 for s, n in zip(shape4, (B, H, NQ, NK)))


def _reduce_bias_grad(dbias: Tensor, bias: Tensor) -> Tensor:
    """The kernel's gradient is already reduced to the bias's shape: reshape and cast."""
    return dbias.reshape(bias.shape).to(bias.dtype)


# --------------------------------------------------------------------------- #
# torch.library custom ops
# --------------------------------------------------------------------------- #
def _split_heads(t: Tensor, num_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3·h·d) -> three (B, h, N, d) views, no copy."""
    B, N, C3 = t.shape
    d = C3 // (3 * num_heads)
    qkv = t.view(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


@torch.library.custom_op("vitkern::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], scale: float, dropout_p: float,
    seed: Optional[Tensor], is_causal: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Returns (out laid out as (B, Nq, h, d) — the caller views it as (B, h, Nq, d) — and lse)."""
    B, H, NQ, D = q.shape
    out = new_output((B, NQ, H, D), dtype=q.dtype, device=q.device)
    lse = _launch_fwd(q, k, v, attn_bias, scale, dropout_p, seed, out.transpose(1, 2), is_causal)
    return out, lse


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, attn_bias, scale, dropout_p, seed, is_causal=False):
    B, H, NQ, D = q.shape
    return q.new_empty((B, NQ, H, D)), q.new_empty((B, H, NQ), dtype=torch.float32)


@torch.library.custom_op("vitkern::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_bias: Optional[Tensor],
    scale: float, dropout_p: float, seed: Optional[Tensor], bias_grad: bool, is_causal: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is fp32 in the bias's own 4-D shape when bias_grad, else empty."""
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    dbias = _launch_bwd(dout, q, k, v, out, lse, attn_bias, scale, dropout_p, seed, dq, dk, dv, bias_grad,
                        is_causal)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0, dtype=torch.float32)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, attn_bias, scale, dropout_p, seed, bias_grad, is_causal=False):
    B, H, NQ, _ = q.shape
    dbias_shape = _dbias_shape(attn_bias, B, H, NQ, k.shape[2]) if bias_grad else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(dbias_shape, dtype=torch.float32))


def _attention_fwd_setup_context(ctx, inputs, output):
    q, k, v, attn_bias, scale, dropout_p, seed, is_causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_bias, seed)
    ctx.scale, ctx.dropout_p, ctx.is_causal = scale, dropout_p, is_causal
    ctx.mark_non_differentiable(lse)


def _attention_fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_bias, seed = ctx.saved_tensors
    bias_grad = attn_bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.vitkern.attention_bwd(
        dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, attn_bias, ctx.scale, ctx.dropout_p, seed,
        bias_grad, ctx.is_causal)
    dbias = _reduce_bias_grad(dbias, attn_bias) if bias_grad else None
    return dq, dk, dv, dbias, None, None, None, None


_attention_fwd.register_autograd(_attention_fwd_backward, setup_context=_attention_fwd_setup_context)


@torch.library.custom_op("vitkern::attention_packed_fwd", mutates_args=())
def _attention_packed_fwd(
    qkv: Tensor, num_heads: int, attn_bias: Optional[Tensor], scale: float, dropout_p: float,
    seed: Optional[Tensor], is_causal: bool = False,
) -> Tuple[Tensor, Tensor]:
    """qkv (B, N, 3·h·d) -> (out (B, N, h·d), lse (B, h, N))."""
    q, k, v = _split_heads(qkv, num_heads)
    B, H, N, D = q.shape
    out = new_output((B, N, H * D), dtype=qkv.dtype, device=qkv.device)
    lse = _launch_fwd(q, k, v, attn_bias, scale, dropout_p, seed, out.view(B, N, H, D).transpose(1, 2),
                      is_causal)
    return out, lse


@_attention_packed_fwd.register_fake
def _attention_packed_fwd_fake(qkv, num_heads, attn_bias, scale, dropout_p, seed, is_causal=False):
    B, N, C3 = qkv.shape
    return qkv.new_empty((B, N, C3 // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op("vitkern::attention_packed_bwd", mutates_args=())
def _attention_packed_bwd(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, attn_bias: Optional[Tensor],
    scale: float, dropout_p: float, seed: Optional[Tensor], bias_grad: bool, is_causal: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Returns (dqkv (B, N, 3·h·d) written in place by the kernels, dbias as in attention_bwd)."""
    q, k, v = _split_heads(qkv, num_heads)
    B, H, N, D = q.shape
    dqkv = new_output(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = _split_heads(dqkv, num_heads)
    as_heads = lambda t: t.view(B, N, H, D).transpose(1, 2)  # noqa: E731
    dbias = _launch_bwd(as_heads(dout), q, k, v, as_heads(out), lse, attn_bias, scale, dropout_p, seed,
                        dq, dk, dv, bias_grad, is_causal)
    return dqkv, dbias if dbias is not None else qkv.new_empty(0, dtype=torch.float32)


@_attention_packed_bwd.register_fake
def _attention_packed_bwd_fake(dout, qkv, out, lse, num_heads, attn_bias, scale, dropout_p, seed, bias_grad,
                               is_causal=False):
    B, N, _ = qkv.shape
    dbias_shape = _dbias_shape(attn_bias, B, num_heads, N, N) if bias_grad else (0,)
    return qkv.new_empty(qkv.shape), qkv.new_empty(dbias_shape, dtype=torch.float32)


def _attention_packed_fwd_setup_context(ctx, inputs, output):
    qkv, num_heads, attn_bias, scale, dropout_p, seed, is_causal = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, attn_bias, seed)
    ctx.num_heads, ctx.scale, ctx.dropout_p, ctx.is_causal = num_heads, scale, dropout_p, is_causal
    ctx.mark_non_differentiable(lse)


def _attention_packed_fwd_backward(ctx, dout, _dlse):
    qkv, out, lse, attn_bias, seed = ctx.saved_tensors
    bias_grad = attn_bias is not None and ctx.needs_input_grad[2]
    dqkv, dbias = torch.ops.vitkern.attention_packed_bwd(
        dout.contiguous() if dout.stride(-1) != 1 else dout, qkv, out, lse, ctx.num_heads, attn_bias,
        ctx.scale, ctx.dropout_p, seed, bias_grad, ctx.is_causal)
    dbias = _reduce_bias_grad(dbias, attn_bias) if bias_grad else None
    return dqkv, None, dbias, None, None, None, None


_attention_packed_fwd.register_autograd(
    _attention_packed_fwd_backward, setup_context=_attention_packed_fwd_setup_context)


def attention_flops(batch: int, heads: int, nq: int, nk: int, head_dim: int, backward: bool = False) -> int:
    """Matmul FLOPs: forward q·kᵀ and p·v (4·B·h·Nq·Nk·d); backward the usual 5 matmuls (10·...)."""
    per = batch * heads * nq * nk * head_dim
    return 10 * per if backward else 4 * per


@register_flop_formula(torch.ops.vitkern.attention_fwd)
def _fwd_flops(q_shape, k_shape, *args, **kwargs):
    B, H, NQ, D = q_shape
    return attention_flops(B, H, NQ, k_shape[2], D)


@register_flop_formula(torch.ops.vitkern.attention_bwd)
def _bwd_flops(dout_shape, q_shape, k_shape, *args, **kwargs):
    B, H, NQ, D = q_shape
    return attention_flops(B, H, NQ, k_shape[2], D, backward=True)


@register_flop_formula(torch.ops.vitkern.attention_packed_fwd)
def _packed_fwd_flops(qkv_shape, num_heads, *args, **kwargs):
    B, N, C3 = qkv_shape
    return attention_flops(B, num_heads, N, N, C3 // (3 * num_heads))


@register_flop_formula(torch.ops.vitkern.attention_packed_bwd)
def _packed_bwd_flops(dout_shape, qkv_shape, saved_out_shape, lse_shape, num_heads, *args, **kwargs):
    B, N, C3 = qkv_shape
    return attention_flops(B, num_heads, N, N, C3 // (3 * num_heads), backward=True)


# --------------------------------------------------------------------------- #
# Validation, backend predicates, public ops
# --------------------------------------------------------------------------- #
def _validate(q, k, v, attn_bias, dropout_p, op="attention", is_causal=False) -> None:
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: is_causal must be a bool, got {is_causal!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, heads, N, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name}.dtype must be one of float64/float32/float16/bfloat16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name}.dtype is {t.dtype} but q.dtype is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    B, H, NQ, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"{op}: q, k, v must share (B, heads) = {(B, H)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"{op}: k and v must have head_dim {D} like q; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: k and v must have the same number of keys; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if attn_bias is not None:
        if not isinstance(attn_bias, Tensor):
            raise TypeError(f"{op}: attn_bias must be a torch.Tensor or None, got {type(attn_bias).__name__}")
        if not attn_bias.is_floating_point():
            raise TypeError(f"{op}: attn_bias must be an additive floating-point bias, got {attn_bias.dtype}; "
                            f"turn a boolean mask into one with torch.where(mask, 0.0, float('-inf'))")
        if attn_bias.device != q.device:
            raise ValueError(f"{op}: attn_bias is on {attn_bias.device} but q is on {q.device}")
        full = (B, H, NQ, k.shape[2])
        try:
            torch.broadcast_shapes(attn_bias.shape, full)
            ok = attn_bias.dim() <= 4 and torch.broadcast_shapes(attn_bias.shape, full) == full
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: attn_bias must broadcast to (B, heads, Nq, Nk) = {full}, "
                             f"got shape {tuple(attn_bias.shape)}")


@dataclass
class _Call:
    """One validated attention call, as the predicates and launchers read it. ``qkv`` and
    ``num_heads`` are set for :func:`attention_packed` (q, k, v are then views of qkv)."""
    q: Tensor
    k: Tensor
    v: Tensor
    attn_bias: Optional[Tensor]
    scale: float
    dropout_p: float
    is_causal: bool
    qkv: Optional[Tensor] = None
    num_heads: int = 0


def _prepare(q, k, v, *, scale=None, attn_bias=None, dropout_p=0.0, is_causal=False) -> _Call:
    """attention()'s public boundary: autocast, validate, default the scale."""
    q, k, v, attn_bias = _autocast([q, k, v, attn_bias])
    _validate(q, k, v, attn_bias, dropout_p, is_causal=is_causal)
    scale = _default_scale(q) if scale is None else float(scale)
    return _Call(q, k, v, attn_bias, scale, float(dropout_p), is_causal)


def _prepare_packed(qkv, num_heads, *, scale=None, attn_bias=None, dropout_p=0.0, is_causal=False) -> _Call:
    """attention_packed()'s public boundary: check the packed layout, autocast, split into views, validate."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 3:
        got = tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__
        raise ValueError(f"attention_packed: qkv must be a 3-D tensor (B, N, 3*heads*head_dim), got {got}")
    if not isinstance(num_heads, int) or num_heads <= 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"attention_packed: qkv's last dimension {qkv.shape[-1]} must be 3*num_heads*head_dim; "
                         f"got num_heads={num_heads!r}")
    if qkv.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"attention_packed: qkv.dtype must be one of float64/float32/float16/bfloat16, "
                        f"got {qkv.dtype}")
    (qkv,) = _autocast([qkv])
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()  # splitting the channels into (3, h, d) views needs unit stride there
    q, k, v = _split_heads(qkv, num_heads)
    _validate(q, k, v, attn_bias, dropout_p, op="attention_packed", is_causal=is_causal)
    scale = _default_scale(q) if scale is None else float(scale)
    return _Call(q, k, v, attn_bias, scale, float(dropout_p), is_causal, qkv=qkv, num_heads=num_heads)


def _why_not_triton(call: _Call) -> Optional[str]:
    q, attn_bias = call.q, call.attn_bias
    if q.dtype not in _KERNEL_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16, got {q.dtype} (use backend='torch')"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is larger than the Triton kernels support ({MAX_HEAD_DIM})"
    if attn_bias is not None and attn_bias.dtype not in _KERNEL_DTYPES:
        return f"the Triton kernels take a float32/float16/bfloat16 attn_bias, got {attn_bias.dtype}"
    return backends.triton_reason([q, call.k, call.v, attn_bias], q.dtype)


_BACKENDS = backends.register("attention", prepare=_prepare,
                              predicates={"triton": _why_not_triton, "torch": backends.available})
_PACKED_BACKENDS = backends.register("attention_packed", prepare=_prepare_packed,
                                     predicates={"triton": _why_not_triton, "torch": backends.available})


def _autocast(tensors: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Cast q, k, v like SDPA does under autocast (our custom ops have no autocast rule)."""
    dtype = backends.autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and i < 3 else t
            for i, t in enumerate(tensors)]


def _default_scale(q: Tensor) -> float:
    # SDPA's 1/sqrt(d); with d = 0 the output is empty and any finite scale gives it.
    return q.shape[-1] ** -0.5 if q.shape[-1] else 1.0


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention, as ``F.scaled_dot_product_attention``.

    Args:
        q: (B, h, Nq, d); k, v: (B, h, Nk, d). Any strides (views of a packed qkv are read in place).
            Any size may be 0: empty in, empty out (and zeros when Nk = 0), as SDPA.
        scale: multiplies q·kᵀ; default d ** -0.5.
        attn_bias: additive float bias broadcastable to (B, h, Nq, Nk), or None. Differentiable.
        dropout_p: attention-probability dropout, applied whenever > 0 (pass 0 in eval, as SDPA).
            Random numbers come from a seed drawn from torch's default generator.
        is_causal: query i attends to keys j <= i (top-left aligned when Nq != Nk, as SDPA's
            ``is_causal``). The kernels mask in place and skip key blocks past the diagonal.
            Unlike SDPA, it combines with ``attn_bias`` (the bias is added, then the mask applied).
        backend: "auto" | "cuda" | "triton" | "torch".

    Returns:
        (B, h, Nq, d). The Triton backend returns it as a view of a (B, Nq, h, d) buffer,
        so ``out.transpose(1, 2).reshape(B, Nq, h * d)`` costs no copy.
    """
    c = _prepare(q, k, v, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, is_causal=is_causal)
    chosen = _BACKENDS.select(backend, c)
    if chosen == "triton":
        out, _ = torch.ops.vitkern.attention_fwd(c.q, c.k, c.v, c.attn_bias, c.scale, c.dropout_p,
                                                 new_dropout_seed(c.dropout_p), c.is_causal)
        return out.transpose(1, 2)
    return attention_reference(c.q, c.k, c.v, scale=c.scale, attn_bias=c.attn_bias, dropout_p=c.dropout_p,
                               is_causal=c.is_causal)


def attention_packed(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Self-attention straight from a qkv Linear's output to the proj Linear's input.

    qkv (B, N, 3·h·d) laid out [q | k | v], heads contiguous inside each (timm's
    ``Attention.qkv``); returns (B, N, h·d). The Triton path reads q, k, v in place and
    writes the output, and in the backward dqkv, in these layouts: no permute or copy.
    Other arguments as :func:`attention`.
    """
    c = _prepare_packed(qkv, num_heads, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, is_causal=is_causal)
    chosen = _PACKED_BACKENDS.select(backend, c)
    if chosen == "triton":
        out, _ = torch.ops.vitkern.attention_packed_fwd(c.qkv, c.num_heads, c.attn_bias, c.scale, c.dropout_p,
                                                        new_dropout_seed(c.dropout_p), c.is_causal)
        return out
    B, N, _ = c.qkv.shape
    out = attention_reference(c.q, c.k, c.v, scale=c.scale, attn_bias=c.attn_bias, dropout_p=c.dropout_p,
                              is_causal=c.is_causal)
    return out.transpose(1, 2).reshape(B, N, c.qkv.shape[-1] // 3)  # not -1: B or N may be 0
