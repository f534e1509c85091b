"""vitkern.ops.sr_attention and patch_embed_layernorm (Triton) against vitkern.reference.

sr_attention_reference itself is proven equal to timm's pvt_v2.Attention in
tests/test_reference_timm.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.backends import BackendUnavailableError
from vitkern.ops import patch_embed_layernorm, sr_attention
from vitkern.reference import patch_embed_reference, sr_attention_reference
from vitkern.testing import poison_outputs

from helpers import assert_close, nan_padded, use_gpu_tiles

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HIGH = torch.float32 if ON_GPU else torch.float64
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def _params(C, sr_ratio, linear_attn, qkv_bias, dtype):
    def rnd(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(*shape, device=DEVICE)).to(dtype)

    p = dict(q_weight=rnd(C, C, scale=C ** -0.5), q_bias=rnd(C) if qkv_bias else None,
             kv_weight=rnd(2 * C, C, scale=C ** -0.5), kv_bias=rnd(2 * C) if qkv_bias else None,
             proj_weight=rnd(C, C, scale=C ** -0.5), proj_bias=rnd(C))
    if linear_attn or sr_ratio > 1:
        k = 1 if linear_attn else sr_ratio
        p.update(sr_weight=rnd(C, C, k, k, scale=(C * k * k) ** -0.5), sr_bias=rnd(C),
                 norm_weight=rnd(C, scale=0.2, offset=1.0), norm_bias=rnd(C, scale=0.2))
    return p


def _run(fn, x, params, feat, heads, sr_ratio, linear_attn, grad_out):
    names = ["x"] + [n for n, t in params.items() if t is not None]
    out = fn(x, feat, num_heads=heads, sr_ratio=sr_ratio, linear_attn=linear_attn, **params)
    grads = torch.autograd.grad(out, [x] + [params[n] for n in names[1:]], grad_out)
    return out, dict(zip(names, grads))


def _leaves(x, params, dtype=None, pad=False):
    def leaf(t):
        t = t.detach() if dtype is None else t.detach().to(dtype)
        return (nan_padded(t) if pad else t.clone()).requires_grad_(True)
    return leaf(x), {n: (leaf(t) if t is not None else None) for n, t in params.items()}


def _triton(*args, **kw):
    return sr_attention(*args, backend="triton", **kw)


# (B, H, W, C, heads, sr_ratio, linear_attn, qkv_bias)
CASES = [
    pytest.param(2, 8, 8, 64, 2, 4, False, True, id="8x8-sr4-d32"),
    pytest.param(1, 9, 14, 64, 1, 4, False, True, id="9x14-sr4-floor-d64"),
    pytest.param(2, 7, 9, 32, 1, 2, False, True, id="7x9-sr2"),
    pytest.param(1, 17, 19, 64, 2, 8, False, False, id="17x19-sr8-nobias"),
    pytest.param(1, 6, 6, 40, 5, 1, False, True, id="sr1-heads5"),
    pytest.param(1, 9, 14, 64, 2, 1, True, True, id="linear-9x14"),
    pytest.param(2, 5, 6, 32, 2, 1, True, True, id="linear-grid-below-7"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,W,C,heads,sr_ratio,linear_attn,qkv_bias", CASES)
def test_forward_and_every_gradient_match_reference(B, H, W, C, heads, sr_ratio, linear_attn, qkv_bias, dtype):
    params = _params(C, sr_ratio, linear_attn, qkv_bias, dtype)
    x = torch.randn(B, H * W, C, device=DEVICE).to(dtype)
    g = torch.randn(B, H * W, C, device=DEVICE).to(dtype)
    with poison_outputs():
        out, grads = _run(_triton, *_leaves(x, params, pad=True), (H, W), heads, sr_ratio, linear_attn, g)
    ref_out, ref_grads = _run(sr_attention_reference, *_leaves(x, params, HIGH), (H, W), heads, sr_ratio,
                              linear_attn, g.to(HIGH))
    same_out, same_grads = (None, {}) if dtype == torch.float32 else \
        _run(sr_attention_reference, *_leaves(x, params), (H, W), heads, sr_ratio, linear_attn, g)
    assert_close("out", out, ref_out, same_out)
    C2 = C
    for name, grad in grads.items():
        if name == "kv_bias":  # the k half's true gradient is 0: softmax ignores a per-row constant
            k_half = grad[:C2].double().abs().max().item()
            assert k_half <= 1e-3 * ref_grads[name][C2:].abs().max().item(), f"dk_bias not ~0: {k_half:.2e}"
            assert_close("dv_bias", grad[C2:], ref_grads[name][C2:], same_grads.get(name, [None] * 0)[C2:]
                         if name in same_grads else None, grad=True)
            continue
        assert_close(f"d{name}", grad, ref_grads[name], same_grads.get(name), grad=True)


def test_token_grid_is_read_in_place_and_its_gradient_needs_no_copy():
    """The spatial reduction reads x (B, N, C) as a (B, C, H, W) view; dx comes back in x's layout."""
    B, H, W, C = 1, 8, 8, 32
    params = _params(C, 4, False, True, torch.float32)
    x = torch.randn(B, H * W, C, device=DEVICE, requires_grad=True)
    image = x.unflatten(1, (H, W)).permute(0, 3, 1, 2)
    out = patch_embed_layernorm(image, params["sr_weight"], params["sr_bias"], params["norm_weight"],
                                params["norm_bias"])
    (dx,) = torch.autograd.grad(out, [x], torch.randn_like(out))
    assert dx.stride() == x.stride()


@pytest.fixture
def gpu_tiles(monkeypatch):
    import importlib
    use_gpu_tiles(monkeypatch, importlib.import_module("vitkern.ops.patch_embed"), "_gemm_config", "_backward_tiles")


# The norm needs whole rows; rows over 256 (PVTv2-b2 stage 3: 320) take 32x512 tiles, 32-deep k steps.
@pytest.mark.parametrize("D,tiles", [(40, "interpreter"), (96, "interpreter"), (320, "gpu")],
                         ids=["d40", "d96-wider-than-a-gemm-tile", "d320-gpu-tiles"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patch_embed_layernorm_matches_conv_then_layernorm(dtype, D, tiles, request):
    if tiles == "gpu":
        request.getfixturevalue("gpu_tiles")
    B, C, H, W, P = 2, 24, 12, 16, 4
    base = dict(x=torch.randn(B, C, H, W), w=torch.randn(D, C, P, P) * (C * P * P) ** -0.5, b=torch.randn(D),
                lw=1 + 0.2 * torch.randn(D), lb=0.2 * torch.randn(D))
    base = {n: t.to(DEVICE, dtype) for n, t in base.items()}
    g = torch.randn(B, (H // P) * (W // P), D, device=DEVICE).to(dtype)

    def run(fn, dt, pad=False):
        ins = {n: (nan_padded(t.to(dt)) if pad else t.to(dt).clone()).requires_grad_(True) for n, t in base.items()}
        out = fn(**ins)
        return out, torch.autograd.grad(out, list(ins.values()), g.to(dt))

    def reference(x, w, b, lw, lb):
        return F.layer_norm(patch_embed_reference(x, w, b), (D,), lw, lb, 1e-5)

    with poison_outputs():
        out, grads = run(lambda x, w, b, lw, lb: patch_embed_layernorm(x, w, b, lw, lb), dtype, pad=True)
    ref_out, ref_grads = run(reference, HIGH)
    same_out, same_grads = run(reference, dtype) if dtype != torch.float32 else (None, [None] * 5)
    assert_close("out", out, ref_out, same_out)
    for name, a, r, s in zip(["dx", "dweight", "dbias", "dln_weight", "dln_bias"], grads, ref_grads, same_grads):
        assert_close(name, a, r, s, grad=True)


def test_deterministic_bit_for_bit():
    params = _params(64, 4, False, True, torch.float32)
    x = torch.randn(2, 64, 64, device=DEVICE)
    g = torch.randn(2, 64, 64, device=DEVICE)
    runs = [_run(_triton, *_leaves(x, params), (8, 8), 2, 4, False, g) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


def test_layernorm_weight_and_bias_strides_are_taken():
    """The SR LayerNorm's weight and bias, every other element of a NaN buffer, were read as if
    contiguous."""
    B, H, W, C, heads, sr = 2, 8, 8, 32, 2, 4
    params = _params(C, sr, False, True, torch.float32)
    x = torch.randn(B, H * W, C, device=DEVICE)
    g = torch.randn(B, H * W, C, device=DEVICE)

    def strided(t):
        buf = torch.full((2 * t.numel() + 1,), float("nan"), dtype=t.dtype, device=t.device)
        return buf[1::2].copy_(t.detach()).requires_grad_(True)

    xk, pk = _leaves(x, params)
    pk.update(norm_weight=strided(pk["norm_weight"]), norm_bias=strided(pk["norm_bias"]))
    assert pk["norm_weight"].stride() == (2,)
    out, grads = _run(_triton, xk, pk, (H, W), heads, sr, False, g)
    ref_out, ref_grads = _run(sr_attention_reference, *_leaves(x, params, HIGH), (H, W), heads, sr, False, g.to(HIGH))
    assert_close("out", out, ref_out)
    for name in grads:
        assert_close(f"d{name}", grads[name], ref_grads[name], grad=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("sr_ratio,linear_attn", [(2, False), (1, True), (1, False)], ids=["sr2", "linear", "sr1"])
def test_empty_batch_gives_empty_output_and_zero_weight_gradients(sr_ratio, linear_attn, backend):
    """As timm's module: B = 0 in, (0, N, C) out; dx empty, every weight gradient zero."""
    C, heads, feat = 32, 2, (4, 6)
    params = _params(C, sr_ratio, linear_attn, True, torch.float32)
    x = torch.randn(0, 24, C, device=DEVICE)
    g = torch.randn(0, 24, C, device=DEVICE)
    fn = lambda *a, **k: sr_attention(*a, backend=backend, **k)  # noqa: E731
    with poison_outputs():
        out, grads = _run(fn, *_leaves(x, params), feat, heads, sr_ratio, linear_attn, g)
    ref_out, ref_grads = _run(sr_attention_reference, *_leaves(x, params, HIGH), feat, heads, sr_ratio,
                              linear_attn, g.to(HIGH))
    assert out.shape == ref_out.shape == (0, 24, C)
    assert set(grads) == set(ref_grads)
    for name in grads:
        expected = x if name == "x" else params[name]
        assert grads[name].shape == expected.shape and grads[name].dtype == expected.dtype, name
        assert torch.equal(grads[name], ref_grads[name].float()), name


@pytest.mark.parametrize("batch", [2, 0], ids=["b2", "empty-batch"])
def test_patch_embed_layernorm_empty_batch(batch):
    """The fused patchify + LayerNorm op itself: empty in, empty out, zero gradients, fake consistent."""
    params = _params(32, 2, False, True, torch.float32)
    image = torch.randn(batch, 32, 4, 6, device=DEVICE)
    torch.library.opcheck(torch.ops.vitkern.patch_embed_layernorm_fwd.default,
                          (image.requires_grad_(), params["sr_weight"].requires_grad_(), params["sr_bias"],
                           params["norm_weight"], params["norm_bias"], 1e-5))
    ins = [t.detach().clone().requires_grad_(True) for t in (image, params["sr_weight"], params["sr_bias"],
                                                               params["norm_weight"], params["norm_bias"])]
    with poison_outputs():
        out = patch_embed_layernorm(*ins)
    ref_ins = [t.detach().double().requires_grad_(True) for t in ins]
    ref = F.layer_norm(patch_embed_reference(*ref_ins[:3]), (32,), ref_ins[3], ref_ins[4], 1e-5)
    g = torch.randn_like(out)
    assert out.shape == ref.shape == (batch, 6, 32)
    grads = torch.autograd.grad(out, ins, g)
    ref_grads = torch.autograd.grad(ref, ref_ins, g.double())
    for name, a, r in zip(["dx", "dweight", "dbias", "dln_weight", "dln_bias"], grads, ref_grads):
        if batch:
            assert_close(name, a, r, grad=True)
        else:
            assert torch.equal(a, r.float()), name


@pytest.mark.gpu
@pytest.mark.parametrize("grid,C,heads,sr", [((56, 56), 64, 1, 8), ((28, 28), 128, 2, 4), ((14, 14), 320, 5, 2),
                                              ((7, 7), 512, 8, 1), ((128, 128), 64, 1, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pvt_v2_b2_stages_on_gpu(grid, C, heads, sr, dtype):
    B = 4
    params = _params(C, sr, False, True, dtype)
    x = torch.randn(B, grid[0] * grid[1], C, device=DEVICE).to(dtype)
    g = torch.randn_like(x)
    with poison_outputs():
        out, grads = _run(_triton, *_leaves(x, params), grid, heads, sr, False, g)
    ref_out, ref_grads = _run(sr_attention_reference, *_leaves(x, params, HIGH), grid, heads, sr, False, g.to(HIGH))
    same_out, same_grads = _run(sr_attention_reference, *_leaves(x, params), grid, heads, sr, False, g)
    assert_close("out", out, ref_out, same_out)
    for name in grads:
        if name != "kv_bias":
            assert_close(f"d{name}", grads[name], ref_grads[name], same_grads[name], grad=True)


# --------------------------------------------------------------------------- #
# Bad input and backends
# --------------------------------------------------------------------------- #
def test_bad_input_raises_clear_error():
    params = _params(32, 2, False, True, torch.float32)
    x = torch.randn(1, 16, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"feat_size: expected H\*W == N = 16"):
        sr_attention(x, (4, 5), num_heads=2, sr_ratio=2, **params)
    with pytest.raises(ValueError, match=r"num_heads: expected a positive divisor of C = 32"):
        sr_attention(x, (4, 4), num_heads=3, sr_ratio=2, **params)
    with pytest.raises(ValueError, match=r"x: expected rank 3"):
        sr_attention(x[0], (4, 4), num_heads=2, sr_ratio=2, **params)
    with pytest.raises(TypeError, match=r"kv_bias.dtype is torch.float16"):
        sr_attention(x, (4, 4), num_heads=2, sr_ratio=2, **{**params, "kv_bias": params["kv_bias"].half()})
    with pytest.raises(ValueError, match=r"sr_weight: expected shape \(32, 32, 2, 2\)"):
        sr_attention(x, (4, 4), num_heads=2, sr_ratio=2, **{**params, "sr_weight": torch.randn(32, 32, 3, 3)})
    with pytest.raises(ValueError, match=r"ln_weight must have shape \(8,\)"):
        patch_embed_layernorm(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 4, 4), None, torch.ones(7), torch.zeros(8))


def test_forced_backend_that_cannot_run_says_why():
    params = _params(32, 2, False, True, torch.float64)
    x = torch.randn(1, 16, 32, device=DEVICE, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match=r"float32, float16 or bfloat16, got torch.float64"):
        sr_attention(x, (4, 4), num_heads=2, sr_ratio=2, backend="triton", **params)
    assert sr_attention(x, (4, 4), num_heads=2, sr_ratio=2, **params).dtype == torch.float64  # auto: reference
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run this call: vitkern._C"):
        sr_attention(x.float(), (4, 4), num_heads=2, sr_ratio=2, backend="cuda",
                     **{n: t.float() if t is not None else None for n, t in params.items()})
    reasons = vitkern.backends.explain("sr_attention", x, (4, 4), num_heads=2, sr_ratio=2, **params)
    assert set(reasons) == {"cuda", "triton", "torch"} and reasons["torch"] is None and reasons["triton"]


def test_custom_op_passes_opcheck_and_compiles():
    params = _params(32, 2, False, True, torch.float32)
    image = torch.randn(2, 32, 8, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkern.patch_embed_layernorm_fwd.default,
                          (image, params["sr_weight"].requires_grad_(), params["sr_bias"], params["norm_weight"],
                           params["norm_bias"], 1e-5))
    x = torch.randn(2, 64, 32, device=DEVICE)
    g = torch.randn(2, 64, 32, device=DEVICE)
    compiled = torch.compile(_triton, fullgraph=True, backend="aot_eager")
    eager = _run(_triton, *_leaves(x, params), (8, 8), 2, 2, False, g)
    comp = _run(compiled, *_leaves(x, params), (8, 8), 2, 2, False, g)
    assert torch.equal(eager[0], comp[0])
    for name in eager[1]:
        assert torch.equal(eager[1][name], comp[1][name]), name
