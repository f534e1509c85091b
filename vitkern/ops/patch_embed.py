"""Fused patchify-projection: image -> (B, T+K, D) tokens in one kernel.

out[b, T+j, :] = W @ patch(b, n) + bias + pos[S + n]    (patch rows; n = keep[b, j], or j: K = N)
out[b, t,   :] = prefix[b or 0, t] + pos[t]              (prefix rows t < T: CLS, distillation, registers)

The prefix may come as two tensors (timm's separate cls_token and reg_token / dist_token), each read in
place through its own pointer and batch stride. Under autocast x, weight and bias are 16-bit while the
prefix and pos_embed may stay fp32: the output has their promoted dtype (as timm's cat / add give), and
the backward GEMMs cast the wider upstream gradient to x's dtype per tile before tl.dot.

S = T when pos_embed covers the prefix rows; S = 0 and no pos on prefix rows when it covers only the
patches (timm's no_embed_class). The forward is one implicit GEMM: rows are the output tokens
b*(T+K)+t, so a tile of rows is a contiguous block of the output; each patch row looks up its patch
(keep[b, j] with kept patches: only those are read and multiplied), gathers its C*Ph*Pw pixels straight
from the image through its strides (no unfolded patch tensor), accumulates in fp32, and the epilogue adds
bias, the prefix rows and the position embedding before the single store. Prefix rows load no pixels.

Backward, with no unfolded tensor either, through the same row -> patch map:
* dx  = dout_patches @ W, stored through the same patch arithmetic (stride ==
  kernel, so patches do not overlap and every pixel of a kept patch is written once; the
  rest of dx is zeroed first unless every patch is kept);
* dW  = dout_patchesᵀ @ patches, the patches gathered from x in place; the M
  reduction is split across programs into fp32 partials summed in a fixed order
  (deterministic, no atomics);
* dpos = Σ_b dout in position-row order, reduced in-kernel over b in a fixed order; with kept
  patches it reads dout[b, T + inv[b, n]] through a host-built inverse map (inv = -1: not kept),
  so no atomics either; dbias and a shared prefix's gradient are sums of the same rows, a per-image
  prefix's gradient is dout's prefix rows.

Layout of this file: Triton kernels -> launchers -> torch.library custom ops with
fake and autograd registrations -> backend predicates -> the public op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vitkern import _triton, backends, configs
from vitkern._memory import new_output, new_output_like
from vitkern._triton import cdiv, next_power_of_2, tl, triton
from vitkern.reference import patch_embed_reference

__all__ = ["patch_embed", "patch_embed_layernorm", "patch_embed_flops"]

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # float64: torch backend only
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #
# Every address is int64: an index is cast before it meets a stride, because a stride
# near 2^31 (a huge batch or a strided view) would wrap an int32 product silently. The one
# exception, a patch's (i, j) offset, stays int32 only where the launcher proved it fits.
@triton.jit
def _split_k(ks, PH: tl.constexpr, PW: tl.constexpr):
    """k -> (c, i, j), flattened as in the Conv2d weight (int32: no stride involved yet)."""
    c = ks // (PH * PW)
    ij = ks % (PH * PW)
    return c, ij // PW, ij % PW


@triton.jit
def _pixel_offset(c, i, j, s_c, s_h, s_w, WIDE: tl.constexpr):
    """Offset of pixel (c, i, j) within a patch (or of weight element [., c, i, j]). The (i, j) part
    stays int32 (it is in the hot loop) unless the launcher found a patch spanning 2^31 elements."""
    if WIDE:
        return c.to(tl.int64) * s_c + (i.to(tl.int64) * s_h + j.to(tl.int64) * s_w)
    return c.to(tl.int64) * s_c + (i * s_h + j * s_w)


@triton.jit
def _patch_origin(b, n, GRID_W, s_b, step_h, step_w):
    """Offset of the top-left pixel of patch n (row-major on the grid) of image b. The launcher passes
    the patch steps Ph*s_h and Pw*s_w (exact Python ints: Triton makes them int64 when they need it),
    which costs fewer registers than forming them in int64 here."""
    n = n.to(tl.int64)
    return b.to(tl.int64) * s_b + (n // GRID_W) * step_h + (n % GRID_W) * step_w


@triton.jit
def _kept_patch(b, j, keep_ptr, skeep_b, skeep_j, ok, HAS_KEEP: tl.constexpr):
    """The patch (row-major on the grid) that patch row j of image b holds: keep[b, j], or j itself."""
    if HAS_KEEP:
        return tl.load(keep_ptr + b * skeep_b + j.to(tl.int64) * skeep_j, mask=ok, other=0)
    return j


@triton.jit
def _prefix_tile(ptr, b, t, lo, hi, s_b, s_t, s_d, cols64, row_ok, col_ok):
    """Rows lo <= t < hi of the tile read prefix[b (or 0: s_b = 0), t - lo] in fp32; other rows get 0."""
    mine = row_ok & (t >= lo) & (t < hi)
    tok = tl.load(ptr + b[:, None] * s_b + (t - lo)[:, None] * s_t + cols64[None, :] * s_d,
                  mask=mine[:, None] & col_ok[None, :], other=0.0)
    return tok.to(tl.float32)


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, prefix_ptr, prefix2_ptr, pos_ptr, keep_ptr, out_ptr,
    ln_w_ptr, ln_b_ptr, pre_ptr, mean_ptr, rstd_ptr, eps,
    M, D, K, TOKENS, PREFIX, PREFIX1, POS_SHIFT, GRID_W,
    sx_b, sx_c, sx_h, sx_w, sx_ph, sx_pw,
    sw_d, sw_c, sw_h, sw_w,
    spre_b, spre_t, spre_d, spre2_b, spre2_t,
    spos_t, spos_d,
    skeep_b, skeep_j,
    PH: tl.constexpr, PW: tl.constexpr, WIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PREFIX: tl.constexpr, ONE_SHARED_PREFIX: tl.constexpr,
    HAS_PREFIX2: tl.constexpr, HAS_POS: tl.constexpr, POS_ON_PREFIX: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # output token rows b*TOKENS + t
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # embedding channels d
    row_ok = rows < M
    col_ok = cols < D

    b = rows // TOKENS
    t = rows % TOKENS
    is_patch = row_ok & (t >= PREFIX)
    n = _kept_patch(b, tl.where(is_patch, t - PREFIX, 0), keep_ptr, skeep_b, skeep_j, is_patch, HAS_KEEP)
    row_base = _patch_origin(b, n, GRID_W, sx_b, sx_ph, sx_pw)
    cols64 = cols.to(tl.int64)
    w_cols = cols64 * sw_d

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        c, i, j = _split_k(ks, PH, PW)
        x_off = _pixel_offset(c, i, j, sx_c, sx_h, sx_w, WIDE)
        a = tl.load(x_ptr + row_base[:, None] + x_off[None, :],
                    mask=is_patch[:, None] & k_ok[None, :], other=0.0)
        w_off = _pixel_offset(c, i, j, sw_c, sw_h, sw_w, WIDE)
        w = tl.load(w_ptr + w_off[:, None] + w_cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, w)

    # Epilogue: bias on patch rows, the prefix tokens on prefix rows (spre_b = 0 when the batch shares
    # them), the position embedding's row of each token: t on prefix rows, POS_SHIFT + patch on patch rows.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    # Rows t < PREFIX1 from the first prefix tensor, the next ones (to PREFIX) from the second.
    if ONE_SHARED_PREFIX:  # the first is one row for the batch (a CLS token): a (D,) vector, not a gathered tile
        cls = tl.load(prefix_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where((t < PREFIX1)[:, None], cls[None, :], 0.0)
    elif HAS_PREFIX:
        acc += _prefix_tile(prefix_ptr, b, t, 0, PREFIX1, spre_b, spre_t, spre_d, cols64, row_ok, col_ok)
    if HAS_PREFIX2:
        acc += _prefix_tile(prefix2_ptr, b, t, PREFIX1, PREFIX, spre2_b, spre2_t, spre_d, cols64, row_ok, col_ok)
    if HAS_POS:
        pos_ok = is_patch
        if POS_ON_PREFIX:
            pos_ok = row_ok
        pos_row = tl.where(is_patch, n + POS_SHIFT, t)
        pos = tl.load(pos_ptr + pos_row[:, None] * spos_t + cols64[None, :] * spos_d,
                      mask=pos_ok[:, None] & col_ok[None, :], other=0.0)
        acc += pos.to(tl.float32)
    out_off = rows[:, None] * D + cols[None, :]
    if HAS_NORM:  # LayerNorm over D: the launcher gives each program whole rows (BLOCK_N >= D)
        tl.store(pre_ptr + out_off, acc, mask=row_ok[:, None] & col_ok[None, :])  # fp32, for the backward
        mean = tl.sum(tl.where(col_ok[None, :], acc, 0.0), 1) / D
        centred = tl.where(col_ok[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
        ln_w = tl.load(ln_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = centred * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _patch_embed_dx_kernel(
    g_ptr, w_ptr, keep_ptr, dx_ptr,
    MP, D, K, KEPT, PREFIX, GRID_W,
    sg_b, sg_t, sg_d,
    sw_d, sw_c, sw_h, sw_w,
    skeep_b, skeep_j,
    sdx_b, sdx_c, sdx_h, sdx_w, sdx_ph, sdx_pw,
    PH: tl.constexpr, PW: tl.constexpr, WIDE: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dpatch[m, k] = sum_d dout[patch row m, d] * W[d, k], stored into dx's pixels of m's patch."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # patch rows b*KEPT + j
    ks = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < MP
    k_ok = ks < K
    b = rows // KEPT
    jr = rows % KEPT
    g_row = b * sg_b + (jr + PREFIX) * sg_t
    c, i, j = _split_k(ks, PH, PW)
    w_k = _pixel_offset(c, i, j, sw_c, sw_h, sw_w, WIDE)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        ds = d0 + tl.arange(0, BLOCK_K)
        d_ok = ds < D
        g = tl.load(g_ptr + g_row[:, None] + ds[None, :].to(tl.int64) * sg_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ds[:, None].to(tl.int64) * sw_d + w_k[None, :],
                    mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(g.to(w.dtype), w)  # grad_out may be wider than x under autocast (fp32 over bf16)

    n = _kept_patch(b, jr, keep_ptr, skeep_b, skeep_j, row_ok, HAS_KEEP)
    dx_row = _patch_origin(b, n, GRID_W, sdx_b, sdx_ph, sdx_pw)
    dx_k = _pixel_offset(c, i, j, sdx_c, sdx_h, sdx_w, WIDE)
    tl.store(dx_ptr + dx_row[:, None] + dx_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed_dw_kernel(
    g_ptr, x_ptr, keep_ptr, partial_ptr,
    MP, D, K, KEPT, PREFIX, GRID_W, ROWS_PER_SPLIT,
    sg_b, sg_t, sg_d,
    sx_b, sx_c, sx_h, sx_w, sx_ph, sx_pw,
    skeep_b, skeep_j,
    PH: tl.constexpr, PW: tl.constexpr, WIDE: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[s, d, k] = sum over split s's patch rows m of dout[m, d] * patch[m, k]."""
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    ds = pid_d * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = ds < D
    k_ok = ks < K
    c, i, j = _split_k(ks, PH, PW)
    x_k = _pixel_offset(c, i, j, sx_c, sx_h, sx_w, WIDE)
    g_d = ds.to(tl.int64) * sg_d

    row_start = split.to(tl.int64) * ROWS_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, ROWS_PER_SPLIT, BLOCK_K):
        rows = row_start + m0 + tl.arange(0, BLOCK_K)
        row_ok = rows < MP
        b = rows // KEPT
        jr = rows % KEPT
        g_row = b * sg_b + (jr + PREFIX) * sg_t
        g_t = tl.load(g_ptr + g_d[:, None] + g_row[None, :],
                      mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        n = _kept_patch(b, jr, keep_ptr, skeep_b, skeep_j, row_ok, HAS_KEEP)
        x_row = _patch_origin(b, n, GRID_W, sx_b, sx_ph, sx_pw)
        a = tl.load(x_ptr + x_row[:, None] + x_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(g_t.to(a.dtype), a)  # (as in the dx kernel)

    out_off = split.to(tl.int64) * D * K + ds[:, None].to(tl.int64) * K + ks[None, :]
    tl.store(partial_ptr + out_off, acc, mask=d_ok[:, None] & k_ok[None, :])


@triton.jit
def _sum_over_batch_kernel(
    g_ptr, inv_ptr, out_ptr, BATCH, ROWS, PREFIX, D,
    sg_b, sg_t, sg_d, sinv_b, sinv_n,
    HAS_INV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r, d] = sum_b dout[b, src(b, r), d] in fp32, b in order (deterministic, no atomics).
    src is r itself, or with kept patches r for prefix rows r < PREFIX and PREFIX + inv[b, r - PREFIX]
    for position row r of patch r - PREFIX (skipped where image b did not keep it: inv = -1)."""
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = ts < ROWS
    d_ok = (ds < D)[None, :]
    cols = ds[None, :].to(tl.int64) * sg_d
    src = ts.to(tl.int64)
    is_patch = t_ok & (ts >= PREFIX)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for _ in range(0, BATCH):
        ok = t_ok
        if HAS_INV:
            j = tl.load(inv_ptr + (ts - PREFIX).to(tl.int64) * sinv_n, mask=is_patch, other=-1)
            src = tl.where(is_patch, PREFIX + j, ts)
            ok = t_ok & ((ts < PREFIX) | (j >= 0))
            inv_ptr += sinv_b
        acc += tl.load(g_ptr + src[:, None] * sg_t + cols, mask=ok[:, None] & d_ok, other=0.0).to(tl.float32)
        g_ptr += sg_b  # stepping the pointer: the batch offset never passes through an int32 product
    tl.store(out_ptr + ts[:, None].to(tl.int64) * D + ds[None, :], acc, mask=t_ok[:, None] & d_ok)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def _gemm_config(dtype: torch.dtype, m: int, n: int, k: int) -> dict:
    """Tile sizes. The interpreter runs one numpy op per tile op, so big tiles are
    cheapest there; on the GPU, 128x128 tiles with 64-deep k steps for 16-bit inputs."""
    def fit(block, size, floor=16):
        return max(floor, min(block, next_power_of_2(size)))

    if _triton.INTERPRET:
        return dict(BLOCK_M=fit(64, m), BLOCK_N=fit(64, n), BLOCK_K=fit(64, k), num_warps=4)
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=fit(128, m), BLOCK_N=fit(128, n), BLOCK_K=fit(block_k, k),
                num_warps=8, num_stages=3)


def _backward_tiles(cfg: dict) -> dict:
    """dx and dW gather or scatter patches with index arithmetic beside the tiles: 128x128 tiles
    with 3 stages spill there (8-244 B, `python -m vitkern.tools.compile_report`); 64-wide tiles
    with 2 stages do not."""
    if _triton.INTERPRET:
        return cfg
    return dict(cfg, BLOCK_N=min(cfg["BLOCK_N"], 64), num_stages=2)


def _gathered_tiles(cfg: dict, dtype: torch.dtype, two_prefixes: bool = False) -> dict:
    """Forward tiles with kept patches or a prefix: in fp32, 128x128 tiles spill 28-96 B there (kept:
    sm_80 under Triton 3.6; a prefix tile, or ViT-B's one CLS row: sm_90a under 3.8;
    `python -m vitkern.tools.compile_report`); 128x64 with 2 stages do not. 16-bit tiles stay, except with a second prefix tensor (CLS + register tokens:
    12-304 B of spills at 128x128, 3 stages, under both Triton versions)."""
    if _triton.INTERPRET or (dtype != torch.float32 and not two_prefixes):
        return cfg
    return dict(cfg, BLOCK_N=min(cfg["BLOCK_N"], 64), num_stages=2)


def _tuned(group: str, cfg: dict, dtype: torch.dtype, d: int, k: int) -> dict:
    """``cfg`` with a tuned table entry (vitkern.configs) for ``patch_embed.<group>`` laid over it,
    where one exists. The class is the op's (D, K = C*Ph*Pw): M is the batch's, timed at the
    benchmark batch."""
    tuned = configs.lookup(f"patch_embed.{group}", f"{str(dtype).replace('torch.', '')}|D{d}|K{k}")
    return dict(cfg, **tuned) if tuned else cfg


def _wide(ph: int, pw: int, *tensors: Tensor) -> bool:
    """Whether i*s_h + j*s_w over a patch can leave int32 for one of the 4-D tensors (see _pixel_offset)."""
    return any((ph - 1) * t.stride(2) + (pw - 1) * t.stride(3) >= 2**31 for t in tensors)


def _image_strides(x: Tensor, ph: int, pw: int) -> tuple:
    """x's four strides, then the patch steps Ph*s_h, Pw*s_w (see _patch_origin)."""
    return (*x.stride(), ph * x.stride(2), pw * x.stride(3))


def _or(dummy: Tensor, *tensors: Optional[Tensor]) -> list:
    """The tensors, with ``dummy`` as the placeholder pointer for absent ones (never read)."""
    return [t if t is not None else dummy for t in tensors]


def _launch_forward(x, weight, bias, prefix_tokens, pos_embed, pos_embed_covers_prefix=True, keep_indices=None,
                    prefix_tokens2=None, norm=None):
    """Returns out; with ``norm = (ln_weight, ln_bias, eps)`` returns (out, pre-norm fp32, mean, rstd)."""
    B, C, H, W = x.shape
    D, _, PH, PW = weight.shape
    grid_w = W // PW
    prefix, tokens = _token_count(x.shape, weight.shape, prefix_tokens, keep_indices, prefix_tokens2)
    M, K = B * tokens, C * PH * PW
    out = new_output((B, tokens, D), dtype=_out_dtype(x, prefix_tokens, prefix_tokens2, pos_embed), device=x.device)
    pos2d = pos_embed.reshape(-1, D) if pos_embed is not None else None
    # The kernel reads bias and the LayerNorm affine as contiguous (D,) vectors and the prefix as a
    # contiguous (PB, T, D) block: a strided or expanded one is copied here (a few rows of D values;
    # unit strides in the epilogue cost fewer registers). spre_b = 0 shares the prefix across the batch;
    # one shared row (a CLS token) is read as a (D,) vector (a gathered tile spilled 96 B in fp32 on sm_90a).
    bias = bias.contiguous() if bias is not None else None
    # A second prefix tensor (timm's register or distillation tokens after its CLS token) is its own pointer
    # with its own batch stride: rows PREFIX1.. of the prefix, read in place (no cat on the host).
    pre_tok, pre2 = (t.contiguous() if t is not None and t.shape[1] > 0 else None
                     for t in (prefix_tokens, prefix_tokens2))
    if pre_tok is None:
        pre_tok, pre2 = pre2, None
    has_prefix = pre_tok is not None
    batch_stride = lambda t: t.stride(0) if t.shape[0] > 1 else 0  # noqa: E731  (0: shared by the batch)
    pre_strides = (batch_stride(pre_tok), D, 1) if has_prefix else (0, 0, 0)
    pre_strides += (batch_stride(pre2), D) if pre2 is not None else (0, 0)
    prefix1 = pre_tok.shape[1] if has_prefix else 0
    # timm's CLS token, first: one (D,) vector (two gathered prefix tiles spilled 80-364 B in 16-bit)
    one_shared = has_prefix and tuple(pre_tok.shape[:2]) == (1, 1)
    gathered_prefix = has_prefix and (not one_shared or pre2 is not None)  # a prefix tile (not only a vector)
    keep_strides = keep_indices.stride() if keep_indices is not None else (0, 0)
    cfg = _gemm_config(x.dtype, M, D, K)
    dummy = weight  # placeholder pointer for absent optional inputs (never read)
    norm_args = (dummy, dummy, dummy, dummy, dummy, 0.0)
    if norm is not None:
        ln_weight, ln_bias, eps = norm
        pre = new_output((B, tokens, D), dtype=torch.float32, device=x.device)
        mean = new_output((B, tokens), dtype=torch.float32, device=x.device)
        rstd = new_output((B, tokens), dtype=torch.float32, device=x.device)
        norm_args = (ln_weight.contiguous(), ln_bias.contiguous(), pre, mean, rstd, float(eps))
        # Whole rows per program for the row statistics; fewer rows and shallower k steps when rows
        # are long (32x512 tiles with 64-deep k steps spill 8-20 B under Triton 3.8, 32-deep ones
        # 168-440 B under 3.6 at PH=2; 16-deep ones none under either).
        cfg["BLOCK_N"] = max(16, next_power_of_2(D))
        if cfg["BLOCK_N"] > 256:
            cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 32), BLOCK_K=min(cfg["BLOCK_K"], 16))
        else:
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 64)
        cfg = _tuned("fwd_norm", cfg, x.dtype, D, K)  # BLOCK_N stays the whole row: entries omit it
    else:
        cfg = _tuned("fwd", cfg, x.dtype, D, K)
        if keep_indices is not None or gathered_prefix or (has_prefix and x.dtype == torch.float32):
            cfg = _gathered_tiles(cfg, x.dtype, pre2 is not None)
    if M == 0:  # empty batch: nothing to compute, no zero-size grid to launch
        return out if norm is None else (out, pre, mean, rstd)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(D, cfg["BLOCK_N"]))
    _patch_embed_fwd_kernel[grid](
        x, weight, *_or(dummy, bias, pre_tok, pre2, pos2d, keep_indices),
        out, *norm_args,
        M, D, K, tokens, prefix, prefix1, prefix if pos_embed_covers_prefix else 0, grid_w,
        *_image_strides(x, PH, PW), *weight.stride(), *pre_strides,
        *(pos2d.stride() if pos2d is not None else (0, 0)), *keep_strides,
        PH=PH, PW=PW, WIDE=_wide(PH, PW, x, weight),
        HAS_BIAS=bias is not None, HAS_PREFIX=has_prefix,
        ONE_SHARED_PREFIX=one_shared, HAS_PREFIX2=pre2 is not None, HAS_POS=pos_embed is not None,
        POS_ON_PREFIX=pos_embed_covers_prefix, HAS_KEEP=keep_indices is not None, HAS_NORM=norm is not None,
        **cfg,
    )
    return out if norm is None else (out, pre, mean, rstd)


def _dw_splits(d_tiles: int, k_tiles: int, row_tiles: int, device: torch.device) -> int:
    """Split the M reduction of dW until the grid covers the GPU about twice."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_tiles, cdiv(target, d_tiles * k_tiles)))


def _launch_backward(grad_out, x, weight, prefix, need_dx, need_dweight, need_row_sums, keep_indices=None,
                     inverse_indices=None):
    B, C, H, W = x.shape
    D, _, PH, PW = weight.shape
    grid_h, grid_w = H // PH, W // PW
    num_patches = grid_h * grid_w
    kept = keep_indices.shape[1] if keep_indices is not None else num_patches
    MP, K = B * kept, C * PH * PW  # patch rows: only the kept patches
    f32 = dict(dtype=torch.float32, device=x.device)
    keep_args = (keep_indices if keep_indices is not None else weight,
                 *(keep_indices.stride() if keep_indices is not None else (0, 0)))

    dx = x.new_empty(0)  # unrequested results are distinct empty tensors (outputs must not alias)
    # Pixels beyond the last full patch (possible only for a cropped view), and of patches not kept,
    # get no gradient: zeros first unless the stores cover every pixel (distinct kept indices, K = N).
    covered = (grid_h * PH == H) and (grid_w * PW == W) and kept == num_patches
    if need_dx:
        # dx in x's memory format (e.g. the channels-last strides of a token grid viewed as an image),
        # so autograd maps it back through the view without a copy.
        dx = new_output_like(x) if covered else torch.zeros_like(x)
    if need_dx and MP > 0:  # (an empty batch or K = 0: no zero-size grid to launch)
        cfg = _tuned("dx", _backward_tiles(_gemm_config(x.dtype, MP, K, D)), x.dtype, D, K)
        grid = (cdiv(MP, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_N"]))
        _patch_embed_dx_kernel[grid](
            grad_out, weight, keep_args[0], dx,
            MP, D, K, kept, prefix, grid_w,
            *grad_out.stride(), *weight.stride(), *keep_args[1:], *_image_strides(dx, PH, PW),
            PH=PH, PW=PW, WIDE=_wide(PH, PW, weight, dx), HAS_KEEP=keep_indices is not None, **cfg,
        )

    dweight = x.new_empty(0)
    if need_dweight and MP == 0:  # a sum over no patches
        dweight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    elif need_dweight:
        cfg = _tuned("dw", _backward_tiles(_gemm_config(x.dtype, D, K, MP)), x.dtype, D, K)
        d_tiles, k_tiles = cdiv(D, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_N"])
        row_tiles = cdiv(MP, cfg["BLOCK_K"])
        splits = _dw_splits(d_tiles, k_tiles, row_tiles, x.device)
        rows_per_split = cdiv(row_tiles, splits) * cfg["BLOCK_K"]
        splits = cdiv(MP, rows_per_split)
        partial = new_output((splits, D, K), **f32)
        _patch_embed_dw_kernel[(d_tiles, k_tiles, splits)](
            grad_out, x, keep_args[0], partial,
            MP, D, K, kept, prefix, grid_w, rows_per_split,
            *grad_out.stride(), *_image_strides(x, PH, PW), *keep_args[1:],
            PH=PH, PW=PW, WIDE=_wide(PH, PW, x), HAS_KEEP=keep_indices is not None, **cfg,
        )
        summed = partial.sum(0) if splits > 1 else partial[0]  # fixed order: deterministic
        dweight = summed.to(weight.dtype).reshape(weight.shape)

    rows = prefix + num_patches  # position-embedding rows
    row_sums = x.new_empty(0, dtype=torch.float32)
    if need_row_sums and B == 0:  # a sum over no images
        row_sums = torch.zeros((rows, D), **f32)
    elif need_row_sums:
        inv = inverse_indices
        if keep_indices is not None and inv is None:
            inv = _inverse_indices(keep_indices, num_patches)
        row_sums = new_output((rows, D), **f32)
        block_t, block_d = 16, min(128, next_power_of_2(D))
        _sum_over_batch_kernel[(cdiv(rows, block_t), cdiv(D, block_d))](
            grad_out, inv if inv is not None else weight, row_sums, B, rows, prefix, D,
            *grad_out.stride(), *(inv.stride() if inv is not None else (0, 0)),
            HAS_INV=inv is not None, BLOCK_T=block_t, BLOCK_D=block_d,
        )
    return dx, dweight, row_sums


# --------------------------------------------------------------------------- #
# torch.library custom ops: opaque to torch.compile, counted by FlopCounterMode
# --------------------------------------------------------------------------- #
# Two optional prefix tensors, not a Tensor[]: the kernel has exactly two prefix pointers, so the schema
# says so (a longer list would have no kernel to run it); each gets its own slot in the autograd result and
# in the fake's dtype promotion; prefix_tokens2 comes last, so existing positional calls stay valid.
@torch.library.custom_op("vitkern::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], prefix_tokens: Optional[Tensor], pos_embed: Optional[Tensor],
    pos_embed_covers_prefix: bool = True, keep_indices: Optional[Tensor] = None,
    prefix_tokens2: Optional[Tensor] = None,
) -> Tensor:
    """(B, T+K, D) tokens; prefix_tokens (1 or B, T1, D) then prefix_tokens2 (1 or B, T2, D) as rows
    0..T1+T2-1, keep_indices (B, K) int64 (see patch_embed). The output dtype promotes x's with the
    prefix and pos_embed dtypes (they differ from x's only under autocast)."""
    return _launch_forward(x, weight, bias, prefix_tokens, pos_embed, pos_embed_covers_prefix, keep_indices,
                           prefix_tokens2)


def _token_count(x_shape, weight_shape, prefix_tokens, keep_indices, prefix_tokens2=None) -> Tuple[int, int]:
    """(T, T + K): prefix rows, and rows in all (K = N without keep_indices)."""
    _, _, H, W = x_shape
    _, _, PH, PW = weight_shape
    prefix = sum(t.shape[1] for t in (prefix_tokens, prefix_tokens2) if t is not None)
    kept = keep_indices.shape[1] if keep_indices is not None else (H // PH) * (W // PW)
    return prefix, prefix + kept


def _out_dtype(x: Tensor, *others: Optional[Tensor]) -> torch.dtype:
    """What timm's conv output + cat(prefix) + pos_embed gives: x's dtype promoted with the others'."""
    dtype = x.dtype
    for t in others:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@_patch_embed_fwd.register_fake
def _patch_embed_fwd_fake(x, weight, bias, prefix_tokens, pos_embed, pos_embed_covers_prefix=True,
                          keep_indices=None, prefix_tokens2=None):
    _, tokens = _token_count(x.shape, weight.shape, prefix_tokens, keep_indices, prefix_tokens2)
    return x.new_empty((x.shape[0], tokens, weight.shape[0]),
                       dtype=_out_dtype(x, prefix_tokens, prefix_tokens2, pos_embed))


@torch.library.custom_op("vitkern::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd(
    grad_out: Tensor, x: Tensor, weight: Tensor, prefix: int,
    need_dx: bool, need_dweight: bool, need_row_sums: bool,
    keep_indices: Optional[Tensor] = None, inverse_indices: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, row_sums); unrequested ones are empty. row_sums (prefix + N, D) fp32 is
    Σ_b dout in position-embedding row order: row t < prefix sums dout[:, t]; row prefix + n sums
    dout[b, prefix + j] over the images b that kept patch n as row j (inverse_indices[b, n] = j, or
    -1 where not kept; every image without keep_indices)."""
    return _launch_backward(grad_out, x, weight, prefix, need_dx, need_dweight, need_row_sums,
                            keep_indices, inverse_indices)


@_patch_embed_bwd.register_fake
def _patch_embed_bwd_fake(grad_out, x, weight, prefix, need_dx, need_dweight, need_row_sums,
                          keep_indices=None, inverse_indices=None):
    _, _, H, W = x.shape
    D, _, PH, PW = weight.shape
    return (
        torch.empty_like(x) if need_dx else x.new_empty(0),
        weight.new_empty(weight.shape if need_dweight else 0),
        x.new_empty((prefix + (H // PH) * (W // PW), D) if need_row_sums else 0, dtype=torch.float32),
    )


def _patch_embed_fwd_setup_context(ctx, inputs, output):
    x, weight, bias, prefix_tokens, pos_embed, covers, keep, prefix_tokens2 = inputs
    ctx.save_for_backward(x, weight, keep)
    ctx.covers = covers
    ctx.meta = {name: (tuple(t.shape), t.dtype) if t is not None else None
                for name, t in (("bias", bias), ("prefix", prefix_tokens), ("pos", pos_embed),
                                ("prefix2", prefix_tokens2))}


def _inverse_indices(keep: Tensor, num_patches: int) -> Tensor:
    """inv[b, n] = j where keep[b, j] = n, else -1: (B, N) int64, so the dpos sum over the batch reads
    each image's kept row in a fixed order (no atomics)."""
    inv = torch.full((keep.shape[0], num_patches), -1, dtype=torch.int64, device=keep.device)
    return inv.scatter_(1, keep, torch.arange(keep.shape[1], device=keep.device).expand_as(keep))


def _patch_embed_fwd_backward(ctx, grad_out):
    x, weight, keep = ctx.saved_tensors
    given = len(ctx.needs_input_grad)  # the arguments the call passed (trailing defaults are not listed)
    need_x, need_w, need_b, need_prefix, need_pos, _, _, need_prefix2 = (*ctx.needs_input_grad, False, False, False)[:8]
    bias_meta, pos_meta = ctx.meta["bias"], ctx.meta["pos"]
    # each prefix tensor: (needed, its first row, its meta); a per-image one's gradient is dout's rows,
    # a shared one's the batch sum of them
    T, parts = 0, []
    for need, meta in ((need_prefix, ctx.meta["prefix"]), (need_prefix2, ctx.meta["prefix2"])):
        parts.append((need, T, meta))
        T += meta[0][1] if meta is not None else 0
    need_sums = need_b or need_pos or any(need and meta[0][0] == 1 for need, _, meta in parts)
    inv = None
    if keep is not None and need_sums:
        _, _, H, W = x.shape
        inv = _inverse_indices(keep, (H // weight.shape[2]) * (W // weight.shape[3]))
    dx, dweight, row_sums = torch.ops.vitkern.patch_embed_bwd(
        grad_out, x, weight, T, need_x, need_w, need_sums, keep, inv)
    dbias = dpos = None
    if need_b:
        dbias = row_sums[T:].sum(0).to(bias_meta[1])
    dprefix = []
    for need, lo, meta in parts:
        if not need:
            dprefix.append(None)
            continue
        (pb, t, _), dtype = meta
        rows = grad_out[:, lo:lo + t] if pb != 1 else row_sums[lo:lo + t]
        dprefix.append(rows.to(dtype).reshape(meta[0]))
    if need_pos:
        shape, dtype = pos_meta
        dpos = (row_sums if ctx.covers else row_sums[T:]).to(dtype).reshape(shape)
    return (dx if need_x else None, dweight if need_w else None, dbias, dprefix[0], dpos, None, None,
            dprefix[1])[:given]


_patch_embed_fwd.register_autograd(_patch_embed_fwd_backward, setup_context=_patch_embed_fwd_setup_context)


def patch_embed_flops(x_shape: Sequence[int], weight_shape: Sequence[int], kept: Optional[int] = None) -> int:
    """Multiply-adds x 2 of the projection GEMM: 2 * B * N * D * C * Ph * Pw, N the patches multiplied
    (``kept`` per image with keep_indices, else all (H/Ph)(W/Pw))."""
    B, C, H, W = x_shape
    D, _, PH, PW = weight_shape
    n = (H // PH) * (W // PW) if kept is None else kept
    return 2 * B * n * D * C * PH * PW


def _kept(keep_shape) -> Optional[int]:
    return keep_shape[1] if keep_shape is not None else None


# FlopCounterMode learns our ops' cost (only the kept patches are multiplied).
@register_flop_formula(torch.ops.vitkern.patch_embed_fwd)
def _fwd_flops(x_shape, weight_shape, bias_shape=None, prefix_shape=None, pos_shape=None, covers=True,
               keep_shape=None, *args, out_shape=None, **kwargs):
    return patch_embed_flops(x_shape, weight_shape, _kept(keep_shape))


@register_flop_formula(torch.ops.vitkern.patch_embed_bwd)
def _bwd_flops(grad_shape, x_shape, weight_shape, prefix, need_dx, need_dweight, need_row_sums=False,
               keep_shape=None, *args, **kwargs):
    return patch_embed_flops(x_shape, weight_shape, _kept(keep_shape)) * (int(need_dx) + int(need_dweight))


# --------------------------------------------------------------------------- #
# Validation, backend predicates, public op
# --------------------------------------------------------------------------- #
def _shape(t) -> str:
    return "None" if t is None else f"{tuple(t.shape)}"


MAX_PREFIX_TOKENS = 64  # CLS + distillation + register tokens stay far below; the kernels loop over none of them


def _validate(x, weight, bias, prefix_tokens, pos_embed, pos_embed_covers_prefix=True, keep_indices=None,
              prefix_tokens2=None, autocast=False) -> None:
    """Cheap host checks. The prefix tensors are already (PB, T, D) (cls_token reshaped by _prepare);
    ``autocast``: x, weight and bias were cast to the autocast dtype, the prefix and pos_embed keep theirs."""
    if not isinstance(x, Tensor):
        raise TypeError(f"patch_embed: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"patch_embed: weight must be a torch.Tensor, got {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"patch_embed: x must be 4-D (B, C, H, W), got shape {_shape(x)}")
    if weight.dim() != 4:
        raise ValueError(f"patch_embed: weight must be 4-D (D, C, Ph, Pw) as in Conv2d, got shape {_shape(weight)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"patch_embed: x.dtype must be one of float64/float32/float16/bfloat16, got {x.dtype}")
    B, C, H, W = x.shape
    D, Cw, PH, PW = weight.shape
    if H == 0 or W == 0:  # (an empty batch B = 0 is fine: empty tokens out, as Conv2d)
        raise ValueError(f"patch_embed: x must have H >= 1 and W >= 1 (B, C, H, W), got shape {_shape(x)}")
    if Cw != C:
        raise ValueError(f"patch_embed: weight has {Cw} input channels (shape {_shape(weight)}) but x has C={C}")
    if D == 0 or PH == 0 or PW == 0:
        raise ValueError(f"patch_embed: weight shape {_shape(weight)} has a zero dimension")
    if H % PH or W % PW:
        raise ValueError(f"patch_embed: image size (H, W)=({H}, {W}) must be divisible by the patch size "
                         f"({PH}, {PW}); pad the image (timm: dynamic_img_pad=True) or crop it first")
    two = prefix_tokens2 is not None
    named = {"weight": weight, "bias": bias, "prefix_tokens[0]" if two else "prefix_tokens": prefix_tokens,
             "prefix_tokens[1]": prefix_tokens2, "pos_embed": pos_embed}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"patch_embed: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"patch_embed: {name} is on {t.device} but x is on {x.device}")
        if autocast and name not in ("weight", "bias"):  # kept in its dtype, promoted with x's in the output
            if t.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"patch_embed: {name}.dtype must be one of float64/float32/float16/bfloat16, "
                                f"got {t.dtype}")
        elif t.dtype != x.dtype:
            raise TypeError(f"patch_embed: {name}.dtype is {t.dtype} but x.dtype is {x.dtype}; cast them to "
                            f"one dtype (or run under torch.autocast)")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"patch_embed: bias must have shape ({D},), got {_shape(bias)}")
    T = 0
    for name, t in list(named.items())[2:4]:
        if t is None:
            continue
        PB, Ti, Dp = t.shape
        T += Ti
        if Dp != D or PB not in (1, B) or T > MAX_PREFIX_TOKENS:
            raise ValueError(f"patch_embed: {name} must have shape (1, T, {D}), ({B}, T, {D}) or (T, {D}) "
                             f"with T <= {MAX_PREFIX_TOKENS} prefix rows in all, got {_shape(t)}")
    if not isinstance(pos_embed_covers_prefix, bool):
        raise TypeError(f"patch_embed: pos_embed_covers_prefix must be a bool, got "
                        f"{type(pos_embed_covers_prefix).__name__}")
    N = (H // PH) * (W // PW)
    if keep_indices is not None:
        _validate_keep(keep_indices, x, N)
    if pos_embed is not None:
        rows = T + N if pos_embed_covers_prefix else N
        if tuple(pos_embed.shape) not in ((1, rows, D), (rows, D)):
            what = (f"{T} prefix + {N} patch rows (pos_embed_covers_prefix=True)" if pos_embed_covers_prefix
                    else f"{N} patch rows (pos_embed_covers_prefix=False)")
            raise ValueError(f"patch_embed: pos_embed must have shape (1, {rows}, {D}) for {what}, "
                             f"got {_shape(pos_embed)}")


def _validate_keep(keep: Tensor, x: Tensor, num_patches: int) -> None:
    """dtype, shape and device on the host; range and distinctness from one sort of the (B, K) indices
    (a repeated index would make the dx kernel store one patch twice and the dpos map lose a row).
    Eagerly that costs one device sync; under torch.compile the same checks run as an async assert."""
    B = x.shape[0]
    if not isinstance(keep, Tensor):
        raise TypeError(f"patch_embed: keep_indices must be a torch.Tensor or None, got {type(keep).__name__}")
    if keep.dtype != torch.int64:
        raise TypeError(f"patch_embed: keep_indices.dtype must be torch.int64, got {keep.dtype}")
    if keep.dim() != 2 or keep.shape[0] != B or keep.shape[1] > num_patches:
        raise ValueError(f"patch_embed: keep_indices must have shape ({B}, K) with K <= N={num_patches} patches, "
                         f"got {_shape(keep)}")
    if keep.device != x.device:
        raise ValueError(f"patch_embed: keep_indices is on {keep.device} but x is on {x.device}")
    if keep.numel() == 0 or keep.is_meta:  # meta tensors (shape checks, FLOP counting) hold no values
        return
    ordered = keep.sort(dim=1).values
    lo, hi = ordered[:, 0].min(), ordered[:, -1].max()
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any()
    message = (f"patch_embed: keep_indices must hold distinct patch indices in [0, {num_patches}) per row "
               f"(row-major patch order)")
    if torch.compiler.is_compiling():
        torch._assert_async((lo >= 0) & (hi < num_patches) & ~repeated, message)
        return
    lo, hi, repeated = torch.stack([lo, hi, repeated.long()]).tolist()
    if lo < 0 or hi >= num_patches or repeated:
        got = f"min {lo}, max {hi}" + (", a repeated index" if repeated else "")
        raise ValueError(f"{message}; got {got}")


@dataclass
class _Call:
    """One validated patch_embed call, as the predicates and launchers read it."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    prefix_tokens: Optional[Tensor]  # (1 or B, T1, D); cls_token lands here as (1, 1, D)
    pos_embed: Optional[Tensor]
    pos_embed_covers_prefix: bool = True
    keep_indices: Optional[Tensor] = None
    prefix_tokens2: Optional[Tensor] = None  # (1 or B, T2, D): rows T1.. (a second tensor of a sequence)


def _as_prefix(cls_token, prefix_tokens, D: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """cls_token / prefix_tokens -> at most two (PB, T, D) prefix tensors (views: gradients reach the
    caller's tensors). A sequence of more than two is joined into one here (expanded to the batch where
    any of them is per-image); the kernel reads two in place."""
    if cls_token is not None and prefix_tokens is not None:
        raise ValueError("patch_embed: give cls_token or prefix_tokens, not both (cls_token=t means "
                         "prefix_tokens=t with one token)")
    if cls_token is not None:
        if not isinstance(cls_token, Tensor):
            raise TypeError(f"patch_embed: cls_token must be a torch.Tensor or None, got {type(cls_token).__name__}")
        if cls_token.numel() != D:
            raise ValueError(f"patch_embed: cls_token must hold D={D} values, e.g. shape (1, 1, {D}); "
                             f"got {_shape(cls_token)}")
        return cls_token.reshape(1, 1, D), None
    if prefix_tokens is None:
        return None, None
    many = isinstance(prefix_tokens, (list, tuple))
    seq = list(prefix_tokens) if many else [prefix_tokens]
    out = []
    for i, t in enumerate(seq):
        name = f"prefix_tokens[{i}]" if many else "prefix_tokens"
        if not isinstance(t, Tensor):
            raise TypeError(f"patch_embed: {name} must be a torch.Tensor"
                            f"{'' if many else ', a list/tuple of tensors or None'}, got {type(t).__name__}")
        if t.dim() not in (2, 3):
            raise ValueError(f"patch_embed: {name} must be (1, T, {D}), (B, T, {D}) or (T, {D}), "
                             f"got shape {_shape(t)}")
        out.append(t.unsqueeze(0) if t.dim() == 2 else t)
    if len(out) > 2:  # the kernel has two prefix pointers: join the rest on the host
        pb = max(t.shape[0] for t in out)
        out = [torch.cat([t.expand(pb, -1, -1) if t.shape[0] == 1 else t for t in out], dim=1)]
    return (out + [None, None])[0], (out + [None, None])[1]


def _prepare(x, weight, bias=None, *, cls_token=None, prefix_tokens=None, pos_embed=None,
             pos_embed_covers_prefix=True, keep_indices=None) -> _Call:
    """patch_embed()'s public boundary: autocast (x, weight, bias only), then validate."""
    autocast = backends.autocast_dtype(x) is not None
    x, weight, bias = _autocast([x, weight, bias])
    prefix2 = None
    if isinstance(weight, Tensor) and weight.dim() == 4:
        prefix_tokens, prefix2 = _as_prefix(cls_token, prefix_tokens, weight.shape[0])
    elif cls_token is not None or prefix_tokens is not None:  # weight's own error first
        prefix_tokens = cls_token if cls_token is not None else prefix_tokens
    _validate(x, weight, bias, prefix_tokens, pos_embed, pos_embed_covers_prefix, keep_indices, prefix2, autocast)
    return _Call(x, weight, bias, prefix_tokens, pos_embed, pos_embed_covers_prefix, keep_indices, prefix2)


def _tensors(call: _Call) -> list:
    return [call.x, call.weight, call.bias, call.prefix_tokens, call.pos_embed, call.prefix_tokens2]


def _why_not_triton(call: _Call) -> Optional[str]:
    tensors = [t for t in _tensors(call) if t is not None]
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # x's first; others only under autocast
        if dtype not in _KERNEL_DTYPES:
            return f"the Triton kernels take float32, float16 or bfloat16, got {dtype} (use backend='torch')"
        reason = backends.triton_reason(tensors + [call.keep_indices], dtype)
        if reason is not None:
            return reason
    return None


def _why_not_cuda_arguments(call: _Call) -> Optional[str]:
    """The arguments beyond one shared CLS token and a full position embedding (not in the CUDA kernel yet)."""
    who = "the CUDA kernel"
    prefix = call.prefix_tokens
    if call.prefix_tokens2 is not None:
        return f"{who} reads one prefix tensor so far, got two in prefix_tokens (use backend='torch')"
    if any(t is not None and t.dtype != call.x.dtype for t in _tensors(call)):
        return (f"{who} takes one dtype so far, got prefix or pos_embed dtypes other than x's "
                f"{call.x.dtype} under autocast (use backend='torch')")
    if prefix is not None and prefix.shape[1] != 1:
        return (f"{who} handles at most one prefix token (a CLS token) so far, got prefix_tokens of shape "
                f"{_shape(prefix)} (use backend='torch')")
    if prefix is not None and prefix.shape[0] != 1:
        return (f"{who} handles only a prefix shared by the batch ((1, T, D)) so far, got prefix_tokens of "
                f"shape {_shape(prefix)} (use backend='torch')")
    if not call.pos_embed_covers_prefix and call.pos_embed is not None:
        return (f"{who} handles only a pos_embed covering every row so far, got pos_embed_covers_prefix=False "
                f"(use backend='torch')")
    if call.keep_indices is not None:
        return f"{who} does not handle keep_indices yet (use backend='torch')"
    return None


def _why_not_cuda(call: _Call) -> Optional[str]:
    x = call.x
    tensors = _tensors(call)
    reason = backends.cuda_extension_reason("patch_embed", tensors + [call.keep_indices],
                                            function="patch_embed_forward")
    if reason is not None:
        return reason
    if x.dtype not in _KERNEL_DTYPES:
        return f"the CUDA kernel takes float32, float16 or bfloat16, got {x.dtype}"
    reason = _why_not_cuda_arguments(call)
    if reason is not None:
        return reason
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ("the CUDA patch_embed kernel is forward-only so far (no backward yet); "
                "use backend='triton' when gradients are needed")
    return None


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_forward(x, weight, bias, cls_token, pos_embed) -> Tensor:
    # cls_token: None or the (1, 1, D) prefix (the predicate refuses longer or per-image ones)
    """The compiled kernel (csrc/patch_embed.cu): pointers, sizes, strides and the current stream."""
    from vitkern import _C

    B, C, H, W = x.shape
    D, _, PH, PW = weight.shape
    tokens = (1 if cls_token is not None else 0) + (H // PH) * (W // PW)
    out = new_output((B, tokens, D), dtype=x.dtype, device=x.device)
    if B == 0:  # empty batch: no zero-size grid to launch
        return out
    bias = bias.contiguous() if bias is not None else None  # read as bias[d]
    cls = cls_token.reshape(D).contiguous() if cls_token is not None else None
    pos2d = pos_embed.reshape(tokens, D) if pos_embed is not None else None
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    with torch.cuda.device(x.device):
        _C.patch_embed_forward(
            ptr(x), ptr(weight), ptr(bias), ptr(cls), ptr(pos2d), ptr(out), _DTYPE_CODES[x.dtype],
            list(x.shape), list(x.stride()), list(weight.shape), list(weight.stride()),
            list(pos2d.stride()) if pos2d is not None else [0, 0],
            bias is not None, cls is not None, pos2d is not None, torch.cuda.current_stream(x.device).cuda_stream)
    return out


# The CUDA kernel is registered but not in auto's order: it is forward-only and unmeasured on a GPU.
_BACKENDS = backends.register("patch_embed", prepare=_prepare,
                              predicates={"cuda": _why_not_cuda, "triton": _why_not_triton,
                                          "torch": backends.available})


def _autocast(tensors):
    """Cast like Conv2d does under autocast: our custom op has no autocast rule."""
    dtype = backends.autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    cls_token: Optional[Tensor] = None,
    prefix_tokens: Union[Tensor, Sequence[Tensor], None] = None,
    pos_embed: Optional[Tensor] = None,
    pos_embed_covers_prefix: bool = True,
    keep_indices: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Patchify-projection: ``Conv2d(stride=patch)`` -> tokens (+ prefix rows, + position embedding),
    optionally of a subset of the patches (MAE's visible ones).

    Args:
        x: image (B, C, H, W), any strides; H and W divisible by the patch size.
        weight: (D, C, Ph, Pw), as ``Conv2d.weight``.
        bias: (D,) or None.
        cls_token: D values (timm's (1, 1, D)) prepended as row 0, or None; the same as
            ``prefix_tokens`` with T = 1 (giving both is an error).
        prefix_tokens: (1, T, D) shared by the batch, (B, T, D) per image, or (T, D): rows 0..T-1
            (timm's order: CLS, then distillation or register tokens), T <= MAX_PREFIX_TOKENS; or a
            list/tuple of such tensors, written one after the other (timm's separate cls_token and
            reg_token / dist_token parameters): the kernel reads up to two of them in place, more are
            joined into one first (a torch.cat of their rows). Each gets its own gradient.
        pos_embed: (1, T+N, D) or (T+N, D) added to every row when ``pos_embed_covers_prefix``, else
            (1, N, D) or (N, D) added to the patch rows only (timm's ``no_embed_class``); or None.
        keep_indices: (B, K) int64 patch indices (row-major, each in [0, N), distinct per row), or None
            for every patch in order. Row T+j holds patch keep[b, j] with its position row; only the
            kept patches are read and multiplied, and x's gradient is zero elsewhere. The range and
            distinctness are checked (one sort of the indices and one device sync per call).
        backend: "auto" | "cuda" | "triton" | "torch" (see :mod:`vitkern.backends`).

    Under ``torch.autocast``, x, weight and bias are cast to the autocast dtype (as Conv2d's are) and
    the prefix tokens and pos_embed keep theirs, so the output dtype is what timm's conv output, cat and
    add give: ``torch.promote_types`` of the autocast dtype and theirs (float32 for float32 parameters).
    Outside autocast every floating-point input must have x's dtype.

    Returns:
        (B, T+K, D) tokens, N = (H/Ph)(W/Pw), K = N without keep_indices; in x's dtype (promoted as
        above under autocast). Differentiable w.r.t. every floating-point input.
    """
    c = _prepare(x, weight, bias, cls_token=cls_token, prefix_tokens=prefix_tokens, pos_embed=pos_embed,
                 pos_embed_covers_prefix=pos_embed_covers_prefix, keep_indices=keep_indices)
    chosen = _BACKENDS.select(backend, c)
    if chosen == "triton":
        return torch.ops.vitkern.patch_embed_fwd(c.x, c.weight, c.bias, c.prefix_tokens, c.pos_embed,
                                                 c.pos_embed_covers_prefix, c.keep_indices, c.prefix_tokens2)
    if chosen == "cuda":  # forward only: the predicate refuses calls that need gradients
        return _cuda_forward(c.x, c.weight, c.bias, c.prefix_tokens, c.pos_embed)
    prefix = c.prefix_tokens if c.prefix_tokens2 is None else [c.prefix_tokens, c.prefix_tokens2]
    return patch_embed_reference(c.x, c.weight, c.bias, prefix_tokens=prefix, pos_embed=c.pos_embed,
                                 pos_embed_covers_prefix=c.pos_embed_covers_prefix, keep_indices=c.keep_indices)


# --------------------------------------------------------------------------- #
# Patchify GEMM with a LayerNorm epilogue (PVT's spatial reduction, vitkern.ops.sr_attention)
# --------------------------------------------------------------------------- #
MAX_NORM_DIM = 1024  # the LayerNorm epilogue keeps whole rows of the GEMM tile in registers


@torch.library.custom_op("vitkern::patch_embed_layernorm_fwd", mutates_args=())
def _patch_embed_layernorm_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (LayerNorm(tokens), tokens before the norm in fp32, row mean, row 1/std)."""
    return _launch_forward(x, weight, bias, None, None, norm=(ln_weight, ln_bias, eps))


@_patch_embed_layernorm_fwd.register_fake
def _patch_embed_layernorm_fwd_fake(x, weight, bias, ln_weight, ln_bias, eps):
    B, _, H, W = x.shape
    D, _, PH, PW = weight.shape
    T = (H // PH) * (W // PW)
    f32 = dict(dtype=torch.float32)
    return x.new_empty((B, T, D)), x.new_empty((B, T, D), **f32), x.new_empty((B, T), **f32), \
        x.new_empty((B, T), **f32)


def _patch_embed_layernorm_fwd_setup_context(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, eps = inputs
    _, pre, mean, rstd = output
    ctx.save_for_backward(x, weight, ln_weight, pre, mean, rstd)
    ctx.dtypes = (bias.dtype if bias is not None else None, ln_weight.dtype, ln_bias.dtype)
    ctx.mark_non_differentiable(pre, mean, rstd)


def _patch_embed_layernorm_fwd_backward(ctx, dout, _dpre, _dmean, _drstd):
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
            dpre.to(x.dtype), x, weight, 0, need_x, need_w, need_b)
        dbias = token_sums.sum(0).to(bias_dtype) if need_b else None
    return (dx if need_x else None, dweight if need_w else None, dbias, dln_w, dln_b, None)


_patch_embed_layernorm_fwd.register_autograd(
    _patch_embed_layernorm_fwd_backward, setup_context=_patch_embed_layernorm_fwd_setup_context)


# FlopCounterMode: the GEMM (the LayerNorm is O(tokens·D), not counted, as for nn.LayerNorm)
@register_flop_formula(torch.ops.vitkern.patch_embed_layernorm_fwd)
def _layernorm_fwd_flops(x_shape, weight_shape, *args, **kwargs):
    return patch_embed_flops(x_shape, weight_shape)


def patch_embed_layernorm(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor, eps: float = 1e-5,
) -> Tensor:
    """LayerNorm(Conv2d(x, weight, bias, stride=patch) as (B, N, D) tokens), one Triton kernel.

    x (B, C, H, W) with any strides and H, W divisible by the patch; weight (D, C, Ph, Pw);
    ln_weight, ln_bias (D,). Triton backend only (it is the building block of :func:`sr_attention`).
    """
    _validate(x, weight, bias, None, None)
    D = weight.shape[0]
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (D,):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"patch_embed_layernorm: {name} must have shape ({D},), got {got}")
        if t.device != x.device:
            raise ValueError(f"patch_embed_layernorm: {name} is on {t.device} but x is on {x.device}")
    reason = why_not_norm_kernel(x, D)
    if reason is not None:
        raise backends.BackendUnavailableError(f"patch_embed_layernorm: {reason}")
    out, _, _, _ = torch.ops.vitkern.patch_embed_layernorm_fwd(x, weight, bias, ln_weight, ln_bias, float(eps))
    return out


def why_not_norm_kernel(x: Tensor, dim: int) -> Optional[str]:
    """Why the LayerNorm-epilogue kernel cannot run on ``x`` with ``dim`` output channels, or None."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16, got {x.dtype} (use backend='torch')"
    if dim > MAX_NORM_DIM:
        return f"the LayerNorm epilogue handles up to {MAX_NORM_DIM} channels, got {dim}"
    return backends.triton_reason([x], x.dtype)
