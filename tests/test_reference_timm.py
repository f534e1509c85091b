"""The references in vitkern/reference.py equal timm's own modules (same weights).

Forward and the gradient w.r.t. the input and every parameter the reference uses,
in float64 on CPU, relative error <= 1e-10. These pin down the oracle that every
kernel test compares against, so a reference cannot drift from the module that
vitkern's layers replace.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.layers import Attention as TimmAttention  # noqa: E402
from timm.layers import PatchEmbed as TimmPatchEmbed  # noqa: E402
from timm.models import pvt_v2, swin_transformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from tests.helpers import rel_err  # noqa: E402
from vitkern.reference import (  # noqa: E402
    attention_reference,
    patch_embed_reference,
    relative_position_index,
    sr_attention_reference,
    swin_effective_window,
    window_attention_reference,
)

pytestmark = pytest.mark.timm

RTOL = 1e-10
DT = torch.float64


def _randomise(module: nn.Module) -> nn.Module:
    """Random values for every parameter timm initialises to zeros, ones or tiny values.

    Matrices and conv kernels keep timm's (random) init so softmax stays unsaturated;
    biases, norm affines, tables, CLS and position embeddings get O(1) random values so
    that dropping or misplacing any of them fails the comparison.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return module


def _check(name, out_timm, out_ref, leaves, analytic_zero=()):
    """Forward and every gradient (random upstream gradient) within RTOL.

    ``analytic_zero`` names leaves whose gradient is zero in exact arithmetic (a bias
    added to every key shifts each score row by a constant, which softmax ignores);
    both sides must then be round-off small against the largest other gradient.
    """
    assert out_ref.shape == out_timm.shape, f"{name}: shape {tuple(out_ref.shape)} != {tuple(out_timm.shape)}"
    err = rel_err(out_ref, out_timm)
    assert err <= RTOL, f"{name} forward: relative error {err:.3e}"
    grad_out = torch.randn_like(out_timm)
    names, tensors = zip(*leaves.items())
    g_timm = torch.autograd.grad(out_timm, tensors, grad_out)
    g_ref = torch.autograd.grad(out_ref, tensors, grad_out)
    scale = max(g.norm().item() for leaf, g in zip(names, g_timm) if leaf not in analytic_zero)
    for leaf, gt, gr in zip(names, g_timm, g_ref):
        if leaf in analytic_zero:
            small = max(gt.norm().item(), gr.norm().item()) / scale
            assert small <= RTOL, f"{name} d/d{leaf}: should be ~0, is {small:.3e} of the largest gradient"
            continue
        assert gt.abs().max() > 0, f"{name} d/d{leaf}: timm gradient is zero (test cannot fail)"
        err = rel_err(gr, gt)
        assert err <= RTOL, f"{name} d/d{leaf}: relative error {err:.3e}"


# --------------------------------------------------------------------------- #
# Patch embedding
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("class_token", [True, False])
def test_patch_embed_matches_timm_vit(patch, class_token):
    vit = VisionTransformer(img_size=(32, 48), patch_size=patch, embed_dim=24, depth=1, num_heads=2,
                            class_token=class_token, global_pool="token" if class_token else "avg")
    vit = _randomise(vit.to(DT)).eval()
    x = torch.randn(2, 3, 32, 48, dtype=DT, requires_grad=True)
    out_timm = vit._pos_embed(vit.patch_embed(x))
    proj = vit.patch_embed.proj
    out_ref = patch_embed_reference(x, proj.weight, proj.bias, cls_token=vit.cls_token, pos_embed=vit.pos_embed)
    leaves = {"x": x, "proj.weight": proj.weight, "proj.bias": proj.bias, "pos_embed": vit.pos_embed}
    if class_token:
        leaves["cls_token"] = vit.cls_token
    _check("vit patch embed", out_timm, out_ref, leaves)


@pytest.mark.parametrize("patch,bias", [(8, True), ((8, 16), False)])
def test_patch_embed_matches_timm_patch_embed(patch, bias):
    pe = _randomise(TimmPatchEmbed(img_size=(32, 48), patch_size=patch, in_chans=3, embed_dim=24, bias=bias).to(DT))
    x = torch.randn(1, 3, 32, 48, dtype=DT, requires_grad=True)
    out_ref = patch_embed_reference(x, pe.proj.weight, pe.proj.bias)
    leaves = {"x": x, "proj.weight": pe.proj.weight}
    if bias:
        leaves["proj.bias"] = pe.proj.bias
    _check("PatchEmbed", pe(x), out_ref, leaves)


# --------------------------------------------------------------------------- #
# Global attention
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("n", [50, 197])
def test_attention_matches_timm(n, qk_norm, fused):
    m = TimmAttention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
    m = _randomise(m.to(DT)).eval()
    m.fused_attn = fused
    B, C, h = 2, 32, 4
    x = torch.randn(B, n, C, dtype=DT, requires_grad=True)

    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(B, n, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    out = attention_reference(q, k, v).transpose(1, 2).reshape(B, n, C)
    out_ref = F.linear(out, m.proj.weight, m.proj.bias)

    leaves = {"x": x, **dict(m.named_parameters())}
    _check(f"Attention(fused={fused})", m(x), out_ref, leaves, analytic_zero=("k_norm.bias",))


@pytest.mark.parametrize("bias_batch", [2, 1])
def test_attention_reference_with_bias_matches_sdpa(bias_batch):
    q = torch.randn(2, 3, 50, 16, dtype=DT, requires_grad=True)
    k = torch.randn(2, 3, 37, 16, dtype=DT, requires_grad=True)  # Nk != Nq
    v = torch.randn(2, 3, 37, 16, dtype=DT, requires_grad=True)
    bias = torch.randn(bias_batch, 3, 50, 37, dtype=DT, requires_grad=True)
    out_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out_ref = attention_reference(q, k, v, attn_bias=bias)
    _check("attention+bias vs SDPA", out_sdpa, out_ref, {"q": q, "k": k, "v": v, "bias": bias})


# --------------------------------------------------------------------------- #
# Shifted-window attention (Swin)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("window", [7, 12, (5, 7), (3, 4), 1])
def test_relative_position_index_matches_timm(window):
    wh, ww = (window, window) if isinstance(window, int) else window
    assert torch.equal(relative_position_index(window), swin_transformer.get_relative_position_index(wh, ww))


# (grid, requested window, requested shift, expected effective (window, shift), extra block kwargs)
SWIN_CASES = [
    ((14, 14), 7, 0, ((7, 7), (0, 0)), {}),
    ((14, 14), 7, 3, ((7, 7), (3, 3)), {}),
    ((10, 13), 7, 3, ((7, 7), (3, 3)), {}),                      # not divisible, not square
    ((24, 24), 12, 6, ((12, 12), (6, 6)), {}),
    ((13, 17), 12, 6, ((12, 12), (6, 6)), {"dynamic_mask": True}),
    ((5, 13), 7, 3, ((5, 7), (0, 3)), {}),                       # small-grid rule on H only
    ((6, 5), 7, 3, ((6, 5), (0, 0)), {}),                        # grid smaller than window: one window
    ((5, 13), 7, 3, ((7, 7), (3, 3)), {"always_partition": True}),  # window taller than the grid
    ((10, 9), (6, 4), (3, 2), ((6, 4), (3, 2)), {"qkv_bias": False}),  # rectangular window
]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("grid,window,shift,expected,kwargs", SWIN_CASES,
                         ids=[f"{g[0]}x{g[1]}-w{w}-s{s}-{'-'.join(kw) or 'plain'}" for g, w, s, _, kw in SWIN_CASES])
def test_window_attention_matches_timm_swin_block(grid, window, shift, expected, kwargs, fused):
    C, heads = 16, 2
    blk = swin_transformer.SwinTransformerBlock(C, input_resolution=grid, num_heads=heads, window_size=window,
                                                shift_size=shift, **kwargs)
    blk = _randomise(blk.to(DT)).eval()
    blk.attn.fused_attn = fused
    always = kwargs.get("always_partition", False)
    eff_window, eff_shift = swin_effective_window(grid, window, shift, always_partition=always)
    assert (eff_window, eff_shift) == expected == (tuple(blk.window_size), tuple(blk.shift_size))

    x = torch.randn(2, *grid, C, dtype=DT, requires_grad=True)
    attn = blk.attn
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    out = window_attention_reference(qkv, attn.relative_position_bias_table, num_heads=heads,
                                     window_size=eff_window, shift_size=eff_shift, qkv_bias=attn.qkv.bias)
    out_ref = F.linear(out, attn.proj.weight, attn.proj.bias)
    leaves = {"x": x, **{f"attn.{n}": p for n, p in attn.named_parameters()}}
    _check(f"Swin _attn(fused={fused})", blk._attn(x), out_ref, leaves)


def test_window_attention_mask_value_matters():
    """The shift mask is applied (a huge mask value changes a shifted result, not an unshifted one)."""
    qkv = torch.randn(1, 10, 13, 48, dtype=DT)
    table = torch.randn(13 * 13, 2, dtype=DT)
    kw = dict(num_heads=2, window_size=7)
    a = window_attention_reference(qkv, table, shift_size=3, **kw)
    b = window_attention_reference(qkv, table, shift_size=3, mask_value=float("-inf"), **kw)
    assert rel_err(a, b) < 1e-12  # -100 vs -inf: exp(-100) ~ 4e-44, far below any tolerance
    c = window_attention_reference(qkv, table, shift_size=3, mask_value=0.0, **kw)
    assert rel_err(a, c) > 1e-3


# --------------------------------------------------------------------------- #
# Spatial-reduction attention (PVT v2)
# --------------------------------------------------------------------------- #
# (dim, heads, sr_ratio, linear_attn, qkv_bias, grid)
PVT_CASES = [
    (16, 1, 1, False, True, (5, 7)),
    (16, 2, 2, False, True, (6, 8)),
    (16, 2, 2, False, False, (7, 9)),     # odd grid: conv drops the last row/column
    (16, 2, 4, False, True, (9, 14)),     # non-divisible, non-square
    (32, 2, 8, False, True, (17, 19)),
    (16, 2, 4, True, True, (9, 14)),      # linear: sr_ratio is ignored
    (16, 1, 1, True, True, (5, 6)),       # linear with a grid smaller than the 7x7 pool
]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dim,heads,sr,linear,qkv_bias,grid", PVT_CASES,
                         ids=[f"d{d}-h{h}-sr{s}-{'lin' if li else 'conv'}-{'b' if b else 'nob'}-{g[0]}x{g[1]}"
                              for d, h, s, li, b, g in PVT_CASES])
def test_sr_attention_matches_timm_pvt_v2(dim, heads, sr, linear, qkv_bias, grid, fused):
    m = pvt_v2.Attention(dim, num_heads=heads, sr_ratio=sr, linear_attn=linear, qkv_bias=qkv_bias)
    m = _randomise(m.to(DT)).eval()
    m.fused_attn = fused
    x = torch.randn(2, grid[0] * grid[1], dim, dtype=DT, requires_grad=True)
    reduced = m.sr is not None
    out_ref = sr_attention_reference(
        x, grid, num_heads=heads,
        q_weight=m.q.weight, q_bias=m.q.bias, kv_weight=m.kv.weight, kv_bias=m.kv.bias,
        proj_weight=m.proj.weight, proj_bias=m.proj.bias,
        sr_weight=m.sr.weight if reduced else None, sr_bias=m.sr.bias if reduced else None,
        norm_weight=m.norm.weight if reduced else None, norm_bias=m.norm.bias if reduced else None,
        sr_ratio=sr, linear_attn=linear,
    )
    leaves = {"x": x, **dict(m.named_parameters())}
    _check(f"pvt_v2.Attention(fused={fused})", m(x, grid), out_ref, leaves)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def _swin_args(**over):
    args = dict(qkv=torch.randn(1, 14, 14, 48), rel_pos_bias_table=torch.randn(169, 2),
                num_heads=2, window_size=7, shift_size=3)
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    ({"qkv": torch.randn(1, 196, 48)}, "qkv"),
    ({"qkv": torch.randn(1, 14, 14, 47)}, "qkv"),
    ({"num_heads": 5}, "num_heads"),
    ({"shift_size": 7}, "shift_size"),
    ({"shift_size": (0, 8)}, "shift_size"),
    ({"window_size": (7, 7, 7)}, "window_size"),
    ({"rel_pos_bias_table": torch.randn(169, 3)}, "rel_pos_bias_table"),
    ({"rel_pos_bias_table": torch.randn(144, 2)}, "rel_pos_bias_table"),
    ({"qkv_bias": torch.randn(16)}, "qkv_bias"),
])
def test_window_attention_bad_input(over, match):
    args = _swin_args(**over)
    qkv, table = args.pop("qkv"), args.pop("rel_pos_bias_table")
    with pytest.raises(ValueError, match=match):
        window_attention_reference(qkv, table, **args)


def _pvt_args(C=16, **over):
    args = dict(x=torch.randn(1, 48, C), feat_size=(6, 8), num_heads=2,
                q_weight=torch.randn(C, C), q_bias=None, kv_weight=torch.randn(2 * C, C), kv_bias=None,
                proj_weight=torch.randn(C, C), proj_bias=None,
                sr_weight=torch.randn(C, C, 2, 2), norm_weight=torch.ones(C), norm_bias=torch.zeros(C), sr_ratio=2)
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    ({"feat_size": (7, 8)}, "feat_size"),
    ({"feat_size": 48}, "feat_size"),
    ({"x": torch.randn(48, 16)}, "x"),
    ({"num_heads": 3}, "num_heads"),
    ({"sr_weight": None}, "sr_weight"),
    ({"sr_weight": torch.randn(16, 16, 4, 4)}, "sr_weight"),
    ({"kv_weight": torch.randn(16, 16)}, "kv_weight"),
    ({"sr_ratio": 0}, "sr_ratio"),
])
def test_sr_attention_bad_input(over, match):
    args = _pvt_args(**over)
    x, feat = args.pop("x"), args.pop("feat_size")
    with pytest.raises(ValueError, match=match):
        sr_attention_reference(x, feat, **args)


def test_swin_effective_window_bad_input():
    with pytest.raises(ValueError, match="window_size"):
        swin_effective_window((14, 14), "7", 3)
    with pytest.raises(ValueError, match="grid_size"):
        swin_effective_window((14, 14, 1), 7, 3)
