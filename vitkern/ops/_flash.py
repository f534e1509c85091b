"""The flash-attention core shared by the attention and window-attention kernels.

Each op file keeps what is its own (how a program finds its tokens, how scores get their bias,
where results go); the steps below are the same math in both and live here once:

- the online-softmax step and its end (running max / sum / accumulator; rows whose keys are all
  -inf give output 0 and lse +inf, so the backward recomputes probabilities 0 and gradients 0);
- the backward's probabilities recomputed from the scores and the row logsumexp;
- the dQ step with the exact delta correction (rowsum(dS) = 0), the dK/dV step and dS alone;
- dropout: a Philox draw per (program row, query, key) keyed by the element's flat index, and the
  seed plumbing and mask helpers built on it;
- (rows, head_dim) tile loads and stores at int64 row offsets.

Scores here are in base 2 (already multiplied by log2(e)), so exponentials are exp2.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from vitkern._triton import cdiv, tl, triton

__all__ = ["LOG2E", "dropout_args", "dropout_keep_mask", "new_dropout_seed", "seed_value"]

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- #
# Tiles
# --------------------------------------------------------------------------- #
@triton.jit
def load_tile(ptr, row_off, chan, dims, s_d, row_ok, HEAD_DIM: tl.constexpr):
    """(rows, head_dim) tile of channels chan + dims at int64 row offsets ``row_off``; zeros where a
    row is not ``row_ok`` or past HEAD_DIM. (The channel offset stays inside the int64 column index:
    moving it into the base pointer costs the window dS kernel a spill on sm_80 under Triton 3.6.)"""
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    return tl.load(ptr + row_off[:, None] + (chan + dims[None, :]).to(tl.int64) * s_d, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, tile, row_off, chan, dims, s_d, row_ok, HEAD_DIM: tl.constexpr):
    """The inverse of :func:`load_tile`, cast to the destination's dtype."""
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(ptr + row_off[:, None] + (chan + dims[None, :]).to(tl.int64) * s_d, tile.to(ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def load_row_stats(lse_ptr, delta_ptr, offs, row_ok):
    """The backward's per-row lse and delta (0 for rows past the end)."""
    lse = tl.load(lse_ptr + offs, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + offs, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def row_delta(o, do):
    """delta = rowsum(dO ∘ O), the softmax backward's row term, in fp32."""
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


# --------------------------------------------------------------------------- #
# Dropout
# --------------------------------------------------------------------------- #
@triton.jit
def keep_scale(seed, bh, q_idx, k_idx, NQ, NK, dropout_p, inv_keep):
    """Dropout factor per (query, key): 0 where dropped, 1/(1-p) where kept.

    The Philox offset is the element's flat index in (programs' rows · Nq, Nk) — (B·h, Nq, Nk) for
    attention, (B·nW·h, n, n) for windows — so the forward, every backward kernel and
    :func:`dropout_keep_mask` draw the same numbers.
    """
    offs = (bh * NQ + q_idx[:, None]) * NK + k_idx[None, :]
    keep = tl.rand(seed, offs) >= dropout_p
    return tl.where(keep, inv_keep, 0.0)


@triton.jit
def _dropout_mask_kernel(out_ptr, seed, NQ, NK, dropout_p, inv_keep, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout factors the kernels use, for tests: out[bh, i, j] in {0, 1/(1-p)}."""
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        z = keep_scale(seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep)
        ok = (rows < NQ)[:, None] & (cols < NK)[None, :]
        tl.store(out_ptr + (bh * NQ + rows[:, None].to(tl.int64)) * NK + cols[None, :], z, mask=ok)


def seed_value(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None and seed.numel() else 0


def dropout_args(dropout_p: float, seed: Optional[Tensor]) -> Tuple[int, float, float]:
    """(seed, p, 1/(1-p)) for the kernels; unused (HAS_DROPOUT is off) when p == 0."""
    return seed_value(seed), float(dropout_p), 1.0 / (1.0 - float(dropout_p))


def new_dropout_seed(dropout_p: float) -> Optional[Tensor]:
    # Drawn from torch's default CPU generator: dropout is reproducible under torch.manual_seed.
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0 else None


def dropout_keep_mask(seed: int, shape, dropout_p: float, device="cpu") -> Tensor:
    """The dropout factors (0 or 1/(1-p)) the Triton kernels apply for ``seed``, shape (B, h, Nq, Nk).

    For tests: with it, the reference ``softmax(...) * mask @ v`` reproduces a dropout run exactly.
    """
    B, H, NQ, NK = shape
    out = torch.empty((B, H, NQ, NK), dtype=torch.float32, device=device)
    _dropout_mask_kernel[(B * H, cdiv(NQ, 64))](out, int(seed), NQ, NK, float(dropout_p),
                                                1.0 / (1.0 - float(dropout_p)), BLOCK_M=64, BLOCK_N=64)
    return out


# --------------------------------------------------------------------------- #
# Forward: online softmax
# --------------------------------------------------------------------------- #
@triton.jit
def softmax_init(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(running row max (base 2), running row sum of exp2(s - max), output accumulator)."""
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    return m_i, l_i, acc


@triton.jit
def softmax_step(s, m_i, l_i, seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep, HAS_DROPOUT: tl.constexpr):
    """One key block of the online softmax: (p, alpha, m_i, l_i) with p the block's (dropped)
    probabilities against the new running max and alpha the factor that rescales the accumulator.

    The caller then does acc = acc * alpha[:, None] + p v.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose keys so far are all -inf (masked) keeps m = -inf; subtract 0 instead so exp2
    # gives 0 rather than exp2(-inf - -inf) = NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:  # the normaliser l_i keeps the undropped probabilities
        p = p * keep_scale(seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep)
    return p, alpha, m_new, l_i


@triton.jit
def softmax_out(acc, l_i):
    """The output tile. A row whose every key is masked (l = 0) gets 0, as SDPA gives, not 0/0.

    Store it before calling :func:`softmax_lse`: computing the lse while the accumulator is still
    live costs registers (18 more in attention's d64 forward on sm_80 under Triton 3.6)."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@triton.jit
def softmax_lse(m_i, l_i):
    """The base-2 row logsumexp. For a row whose every key is masked it is +inf, which makes every
    recomputed probability exp2(s - lse) 0 in the backward, so its gradients are 0 too (not NaN
    spread into every key's dK, dV)."""
    return tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_i))


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #
@triton.jit
def recompute_p(s, lse, valid):
    """The forward's softmax probabilities from the scores (base 2) and the row lse; 0 off ``valid``."""
    return tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)


@triton.jit
def dscore(p, do, v, delta, seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep, HAS_DROPOUT: tl.constexpr):
    """dS = P ∘ (dO vᵀ ∘ Z - delta), Z the dropout factors (none without dropout)."""
    dp = tl.dot(do, tl.trans(v))
    if HAS_DROPOUT:
        dp = dp * keep_scale(seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep)
    return p * (dp - delta[:, None])


@triton.jit
def dq_init(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ kernels' accumulators: (dS K, P K, rowsum(dS), rowsum(P))."""
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    pk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ds_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return dq, pk, ds_sum, p_sum


@triton.jit
def dq_step(dq, pk, ds_sum, p_sum, p, k, v, do, delta, seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep,
            HAS_DROPOUT: tl.constexpr):
    """One key block of dQ, also summing what :func:`dq_finish` needs for the exact delta."""
    ds = dscore(p, do, v, delta, seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep, HAS_DROPOUT)
    dq += tl.dot(ds.to(k.dtype), k)
    pk += tl.dot(p.to(k.dtype), k)
    ds_sum += tl.sum(ds, 1)
    p_sum += tl.sum(p, 1)
    return dq, pk, ds_sum, p_sum


@triton.jit
def dq_finish(dq, pk, ds_sum, p_sum, delta, sm_scale):
    """(dq, corrected delta) once a dQ program has seen every key of its rows.

    delta = rowsum(dO∘O) carries O's rounding, which near-uniform attention (similar keys) amplifies
    into the gradients (exact softmax calculus has rowsum(dS) = 0). The dQ program measures
    rowsum(dS), corrects its own dq by that error times (P K), and stores the corrected delta for
    the kernels that run after it (dK/dV, bias or table gradients).
    """
    # The delta that makes rowsum(dS) = 0 for these very probabilities: delta + rowsum(dS) / rowsum(P).
    correction = tl.where(p_sum > 0, ds_sum / tl.where(p_sum > 0, p_sum, 1.0), 0.0)  # no 0/0 on empty rows
    dq = (dq - correction[:, None] * pk) * sm_scale
    return dq, delta + correction


@triton.jit
def dkdv_step(dk, dv, p, q, do, v, delta, seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep,
              HAS_DROPOUT: tl.constexpr):
    """One query block of dK (unscaled) and dV; one Philox draw serves both."""
    p_kept = p  # what the forward multiplied v by
    if HAS_DROPOUT:
        z = keep_scale(seed, bh, rows, cols, NQ, NK, dropout_p, inv_keep)
        p_kept = p * z
    dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do)
    dp = tl.dot(do, tl.trans(v))
    if HAS_DROPOUT:
        dp = dp * z
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv
