"""vitkern.nn.SRAttention: a drop-in for timm ``pvt_v2.Attention`` (PVT v2 spatial-reduction attention).

Parity with timm (same state_dict -> same output and every gradient: input and every
parameter), structure (attributes, submodules, state_dict keys, signature), NaN poisoning,
determinism, dropout, bad input and torch.compile(fullgraph=True).

Reference: timm's module in float64 (its default, fused SDPA path). backend="torch" runs in
float64, backend="triton" in float32 (on CPU in Triton's interpreter).

The k half of ``kv.bias`` has a gradient that is zero in exact arithmetic (a bias added to
every key shifts each score row by a constant, which the softmax cancels): it is checked as
"zero to within the tolerance of the largest gradient", not by relative error.
"""
import copy
import inspect

import pytest
import torch
from torch import nn

from helpers import assert_close, nan_padded, assert_drop_in_signature
from vitkern import ops
from vitkern.nn import SRAttention
from vitkern.testing import poison_outputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIGH = torch.float32 if DEVICE.type == "cuda" else torch.float64
BACKENDS = [pytest.param("torch", HIGH, id="torch-f64"), pytest.param("triton", torch.float32, id="triton-f32")]

pvt_v2 = pytest.importorskip("timm.models.pvt_v2")

pytestmark = pytest.mark.timm


# ----------------------------------------------------------------------------- helpers
def _randomise(module: nn.Module) -> None:
    """Every parameter random: biases and the LayerNorm affine O(1) (timm starts them at 0/1), the
    matrices and conv kernels at about their init scale so the softmax stays unsaturated."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * (p.shape[1] * p[0, 0].numel()) ** -0.5)
            elif name.startswith("norm.") and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))


def _pair(kwargs, backend, dtype):
    """A randomised timm pvt_v2.Attention in HIGH precision and a vitkern one loaded (strict) from it."""
    ref = pvt_v2.Attention(**kwargs).to(DEVICE, HIGH)
    _randomise(ref)
    mod = SRAttention(**kwargs, backend=backend).to(DEVICE, dtype)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), mod.eval()


def _run(module, x, feat_size, grad):
    """Forward + backward with a given upstream gradient; returns (out, {name: grad}).
    feat_size None: the module takes x alone (a wrapper that reads the grid from x's shape)."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x) if feat_size is None else module(x, feat_size)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({f"param {n.removeprefix('_orig_mod.')}": p.grad for n, p in module.named_parameters()})
    return out, grads


def _split_kv_bias(g):
    """kv.bias = [k | v]: its k half's gradient is analytically zero, so it is checked apart."""
    g = dict(g)
    kv = g.pop("param kv.bias", None)
    if kv is not None:
        C = kv.shape[0] // 2
        g["param kv.bias[k]"], g["param kv.bias[v]"] = kv[:C], kv[C:]
    return g


def _assert_grads_close(g, g_ref):
    g, g_ref = _split_kv_bias(g), _split_kv_bias(g_ref)
    assert g.keys() == g_ref.keys()
    scale = max(gr.double().norm().item() for gr in g_ref.values())
    for name, gr in g_ref.items():
        assert g[name] is not None, f"{name}: no gradient"
        if name == "param kv.bias[k]":
            assert gr.double().norm().item() <= 1e-12 * scale, "kv.bias[k]: the reference gradient is not ~0"
            assert not torch.isnan(g[name]).any(), f"{name}: NaN"
            err = g[name].double().norm().item() / scale
            assert err <= 1e-5, f"grad {name}: should be ~0, norm {err:.3e} of the largest gradient's"
            continue
        assert gr.abs().max() > 0, f"grad {name}: the timm gradient is zero (the check cannot fail)"
        assert_close(f"grad {name}", g[name], gr, grad=True)


def _compare_with_timm(kwargs, grid, backend, dtype, batch=2, strided=False):
    ref, mod = _pair(kwargs, backend, dtype)
    x = torch.randn(batch, grid[0] * grid[1], kwargs["dim"], dtype=HIGH, device=DEVICE)
    with torch.no_grad():
        grad = torch.randn_like(ref(x, grid))  # random upstream gradient, never .sum()
    out_ref, g_ref = _run(ref, x, grid, grad)
    x_lo = x.to(dtype)
    if strided:  # a strided view into a NaN-filled buffer: any out-of-bounds read shows up as NaN
        x_lo = nan_padded(x_lo)
    with poison_outputs():  # any element a kernel forgets to write shows up as NaN
        out, g = _run(mod, x_lo, grid, grad)
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_close("output", out, out_ref)
    _assert_grads_close(g, g_ref)
    return out


# (id, constructor kwargs, grid, batch)
CASES = [
    ("sr1-h1-hd32-5x7", dict(dim=32, num_heads=1), (5, 7), 2),
    ("sr1-h2-hd32-qkv_bias_false", dict(dim=64, num_heads=2, qkv_bias=False), (6, 8), 2),
    ("sr2-h2-hd32-6x8", dict(dim=64, num_heads=2, sr_ratio=2), (6, 8), 2),
    ("sr2-h2-odd-7x9-qkv_bias_false", dict(dim=16, num_heads=2, sr_ratio=2, qkv_bias=False), (7, 9), 2),
    ("sr2-h8-8x8", dict(dim=64, num_heads=8, sr_ratio=2), (8, 8), 2),
    ("sr4-h5-9x14", dict(dim=40, num_heads=5, sr_ratio=4), (9, 14), 2),
    ("sr8-h1-hd64-17x19-b1", dict(dim=64, num_heads=1, sr_ratio=8), (17, 19), 1),
    ("linear-h2-9x14", dict(dim=32, num_heads=2, sr_ratio=4, linear_attn=True), (9, 14), 2),
    ("linear-h1-5x6-b1", dict(dim=16, num_heads=1, linear_attn=True), (5, 6), 1),
    ("linear-qkv_bias_false-7x7", dict(dim=16, num_heads=2, linear_attn=True, qkv_bias=False), (7, 7), 2),
]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("kwargs,grid,batch", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_matches_timm(kwargs, grid, batch, backend, dtype):
    _compare_with_timm(kwargs, grid, backend, dtype, batch=batch)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("kwargs,grid", [
    pytest.param(dict(dim=16, num_heads=2), (5, 6), id="sr1"),
    pytest.param(dict(dim=16, num_heads=2, sr_ratio=2), (5, 6), id="sr2"),
    pytest.param(dict(dim=16, num_heads=2, linear_attn=True), (5, 6), id="linear"),
])
def test_strided_nan_padded_input_matches_timm(kwargs, grid, backend, dtype):
    """x as a non-contiguous view into a NaN-filled buffer (reads outside it would give NaN)."""
    _compare_with_timm(kwargs, grid, backend, dtype, strided=True)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="fp16 through Triton's interpreter (CPU); GPU suites cover it")
def test_triton_float16_within_the_flashattention_rule():
    """fp16: error vs the float64 timm result at most 2x (forward) / 3x (gradients) that of timm in fp16."""
    kwargs, grid = dict(dim=32, num_heads=2, sr_ratio=2), (6, 8)
    ref, mod = _pair(kwargs, "triton", torch.float16)
    ref16 = pvt_v2.Attention(**kwargs).to(DEVICE, torch.float16).eval()
    ref16.load_state_dict(ref.state_dict())
    x = torch.randn(2, 48, 32, dtype=HIGH, device=DEVICE)
    grad = torch.randn(2, 48, 32, dtype=HIGH, device=DEVICE)
    out_ref, g_ref = _run(ref, x, grid, grad)
    out16, g16 = _run(ref16, x.half(), grid, grad)
    with poison_outputs():
        out, g = _run(mod, x.half(), grid, grad)
    assert out.dtype == torch.float16
    assert_close("output", out, out_ref, out16)
    g, g_ref, g16 = _split_kv_bias(g), _split_kv_bias(g_ref), _split_kv_bias(g16)
    for name in g_ref:
        if name == "param kv.bias[k]":
            continue
        assert_close(f"grad {name}", g[name], g_ref[name], g16[name], grad=True)


# ----------------------------------------------------------------------------- structure
STRUCTURE_CASES = [c[1] for c in CASES] + [
    dict(dim=32, num_heads=4, sr_ratio=2, attn_drop=0.1, proj_drop=0.2),
    dict(dim=32, num_heads=4, sr_ratio=8, linear_attn=True, qkv_bias=False, attn_drop=0.3),
]


@pytest.mark.parametrize("kwargs", STRUCTURE_CASES)
def test_same_attributes_and_state_dict_as_timm(kwargs):
    ref = pvt_v2.Attention(**kwargs)
    mod = SRAttention(**kwargs)
    for attr in ("dim", "num_heads", "head_dim", "scale"):
        assert getattr(mod, attr) == getattr(ref, attr), attr
    assert mod.fused_attn is True
    assert (mod.sr_ratio, mod.linear_attn) == (kwargs.get("sr_ratio", 1), kwargs.get("linear_attn", False))
    for name in ("q", "kv", "attn_drop", "proj", "proj_drop", "pool", "sr", "norm", "act"):
        a, b = getattr(mod, name), getattr(ref, name)
        assert type(a) is type(b), name
    assert [n for n, _ in mod.named_children()] == [n for n, _ in ref.named_children()]
    assert [repr(m) for m in mod.children()] == [repr(m) for m in ref.children()]  # sizes, bias, eps, kernel ...
    if ref.norm is not None:
        assert mod.norm.eps == ref.norm.eps == 1e-5
    assert mod.attn_drop.p == ref.attn_drop.p and mod.proj_drop.p == ref.proj_drop.p
    assert [(k, v.shape) for k, v in mod.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    # both directions, strict
    _randomise(ref)
    mod.load_state_dict(ref.state_dict(), strict=True)
    _randomise(mod)
    ref.load_state_dict(mod.state_dict(), strict=True)
    for k, v in mod.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k


def test_defaults_and_signature():
    assert_drop_in_signature(SRAttention, pvt_v2.Attention, methods=())
    assert list(inspect.signature(SRAttention.forward).parameters) == \
        list(inspect.signature(pvt_v2.Attention.forward).parameters)
    m = SRAttention(512, device="meta")
    assert (m.num_heads, m.head_dim, m.q.weight.shape, m.kv.weight.shape, m.q.bias.shape) == \
        (8, 64, (512, 512), (1024, 512), (512,))
    assert m.sr is m.norm is m.pool is m.act is None
    assert SRAttention(32, 2, 4, backend="torch", dtype=torch.float64).sr.weight.dtype == torch.float64


def test_forward_calls_the_op_with_the_module_weights(monkeypatch):
    """forward is ops.sr_attention on the module's own parameters; dropout_p = attn_drop.p only in training."""
    calls = []
    real = ops.sr_attention

    def spy(x, feat_size, **kw):
        calls.append((x, feat_size, kw))
        return real(x, feat_size, **kw)

    monkeypatch.setattr(ops, "sr_attention", spy)
    mod = SRAttention(32, num_heads=4, sr_ratio=2, attn_drop=0.25, backend="torch").to(DEVICE).eval()
    x = torch.randn(2, 48, 32, device=DEVICE)
    mod(x, [6, 8])
    (x_seen, feat, kw), = calls
    assert x_seen is x and tuple(feat) == (6, 8)
    expected = dict(num_heads=4, q_weight=mod.q.weight, q_bias=mod.q.bias, kv_weight=mod.kv.weight,
                    kv_bias=mod.kv.bias, proj_weight=mod.proj.weight, proj_bias=mod.proj.bias,
                    sr_weight=mod.sr.weight, sr_bias=mod.sr.bias, norm_weight=mod.norm.weight,
                    norm_bias=mod.norm.bias)
    for name, t in expected.items():
        assert kw[name] is t, name
    assert (kw["sr_ratio"], kw["linear_attn"], kw["norm_eps"], kw["scale"], kw["dropout_p"], kw["backend"]) == \
        (2, False, 1e-5, mod.scale, 0.0, "torch")
    calls.clear()
    mod.train()(x, (6, 8))
    assert calls[0][2]["dropout_p"] == 0.25
    calls.clear()
    SRAttention(32, num_heads=4, backend="torch").to(DEVICE)(x, (6, 8))
    kw = calls[0][2]
    assert kw["sr_weight"] is kw["sr_bias"] is kw["norm_weight"] is kw["norm_bias"] is None
    assert (kw["sr_ratio"], kw["linear_attn"]) == (1, False)


# ----------------------------------------------------------------------------- determinism
def test_triton_is_deterministic():
    """Two runs give bit-identical outputs and gradients."""
    _, mod = _pair(dict(dim=32, num_heads=2, sr_ratio=4), "triton", torch.float32)
    x = torch.randn(2, 9 * 14, 32, device=DEVICE)
    grad = torch.randn(2, 9 * 14, 32, device=DEVICE)
    out_a, g_a = _run(mod, x, (9, 14), grad)
    out_b, g_b = _run(mod, x, (9, 14), grad)
    assert torch.equal(out_a, out_b)
    for name in g_a:
        assert torch.equal(g_a[name], g_b[name]), name


# ----------------------------------------------------------------------------- dropout
def _train_pair(backend, dtype, attn_drop=0.3, proj_drop=0.0, **kw):
    kwargs = dict(dim=32, num_heads=2, sr_ratio=2, attn_drop=attn_drop, proj_drop=proj_drop, **kw)
    ref, mod = _pair(kwargs, backend, dtype)
    return ref.train(), mod.train()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_dropout_reproducible_under_seed_and_off_in_eval(backend, dtype):
    ref, mod = _train_pair(backend, dtype, attn_drop=0.3, proj_drop=0.1)
    x = torch.randn(2, 48, 32, dtype=HIGH, device=DEVICE)
    torch.manual_seed(123)
    a = mod(x.to(dtype), (6, 8))
    torch.manual_seed(123)
    b = mod(x.to(dtype), (6, 8))
    c = mod(x.to(dtype), (6, 8))  # a different draw
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    mod.eval(), ref.eval()
    out = mod(x.to(dtype), (6, 8))
    assert not torch.allclose(a.double(), out.double(), atol=1e-3)
    assert_close("eval output", out, ref(x, (6, 8)))
    assert torch.equal(out, mod(x.to(dtype), (6, 8)))


def test_dropout_torch_backend_equals_timm_unfused_under_the_same_seed():
    """backend="torch" drops the probabilities with F.dropout like timm's unfused path: the same seed gives
    the same masks, so outputs and gradients match (attn_drop and proj_drop)."""
    ref, mod = _train_pair("torch", HIGH, attn_drop=0.3, proj_drop=0.2)
    ref.fused_attn = False
    x = torch.randn(2, 48, 32, dtype=HIGH, device=DEVICE)
    grad = torch.randn(2, 48, 32, dtype=HIGH, device=DEVICE)
    torch.manual_seed(7)
    out_ref, g_ref = _run(ref, x, (6, 8), grad)
    torch.manual_seed(7)
    out, g = _run(mod, x, (6, 8), grad)
    assert_close("output", out, out_ref)
    _assert_grads_close(g, g_ref)


class _FixedMask(nn.Module):
    def __init__(self, factors):
        super().__init__()
        self.factors = factors

    def forward(self, probs):
        return probs * self.factors


@pytest.mark.parametrize("linear_attn", [False, True], ids=["sr2", "linear"])
def test_dropout_triton_equals_timm_with_the_kernels_mask(linear_attn):
    """Triton draws its Philox seed from torch's default generator; with that seed,
    ops.attention.dropout_keep_mask gives the factors, and timm's unfused math with them must match."""
    from vitkern.ops.attention import dropout_keep_mask

    p, B, N = 0.3, 2, 48
    ref, mod = _train_pair("triton", torch.float32, attn_drop=p, linear_attn=linear_attn)
    nk = 49 if linear_attn else 12
    x = torch.randn(B, N, 32, dtype=HIGH, device=DEVICE)
    grad = torch.randn(B, N, 32, dtype=HIGH, device=DEVICE)
    torch.manual_seed(11)
    out, g = _run(mod, x.float(), (6, 8), grad)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())
    keep = dropout_keep_mask(seed, (B, 2, N, nk), p, device=DEVICE).to(HIGH)
    assert 0.5 < (keep > 0).double().mean().item() < 0.9

    ref.attn_drop = _FixedMask(keep)  # timm's unfused path: attn_drop(softmax(...))
    ref.fused_attn = False
    out_ref, g_ref = _run(ref, x, (6, 8), grad)
    assert_close("output", out, out_ref)
    _assert_grads_close(g, g_ref)


# ----------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("kwargs", [pytest.param(dict(dim=32, num_heads=2), id="sr1"),
                                    pytest.param(dict(dim=32, num_heads=2, sr_ratio=2), id="sr2"),
                                    pytest.param(dict(dim=32, num_heads=2, linear_attn=True), id="linear")])
def test_empty_batch_gives_empty_output_and_zero_gradients(kwargs, backend, dtype):
    """B = 0 in, (0, N, C) out; the input gradient is empty and every parameter's is zero, as the
    reference gives. (timm's own module cannot: its reshape(B, -1, ...) is ambiguous for B = 0.)"""
    _, mod = _pair(kwargs, backend, dtype)
    ref = copy.deepcopy(mod).to(HIGH)
    ref.backend = "torch"
    x = torch.randn(0, 24, kwargs["dim"], dtype=HIGH, device=DEVICE)
    grad = torch.randn(0, 24, kwargs["dim"], dtype=HIGH, device=DEVICE)
    with pytest.raises(RuntimeError, match="ambiguous"):
        pvt_v2.Attention(**kwargs).to(DEVICE, HIGH)(x, (4, 6))
    out_ref, g_ref = _run(ref, x, (4, 6), grad)
    with poison_outputs():
        out, g = _run(mod, x.to(dtype), (4, 6), grad)
    assert out.shape == out_ref.shape == (0, 24, kwargs["dim"]) and out.dtype == dtype
    assert g.keys() == g_ref.keys()
    for name, gr in g_ref.items():
        assert g[name] is not None and g[name].shape == gr.shape, name
        assert torch.equal(g[name], gr.to(dtype)), name
        assert name == "x" or gr.numel() > 0, name


def test_converted_pvt_with_an_empty_batch_fails_where_timm_fails():
    """A converted PVT v2 model behaves as timm's: its own stage code (reshape(B, -1, C)) rejects
    B = 0 before any attention runs, with the same error, and its converted attention modules
    take the empty batch."""
    vitkern = pytest.importorskip("vitkern")
    model = pvt_v2.PyramidVisionTransformerV2(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2),
                                              sr_ratios=(4, 2), mlp_ratios=(2, 2), num_classes=5).eval()
    x = torch.randn(0, 3, 32, 32)
    with pytest.raises(RuntimeError) as timm_error:
        model(x)
    vitkern.optimize(model, backend="triton")
    attn = model.stages[0].blocks[0].attn
    assert isinstance(attn, SRAttention)
    with pytest.raises(RuntimeError) as ours:
        model(x)
    assert str(ours.value) == str(timm_error.value)
    assert attn(torch.randn(0, 64, 16), (8, 8)).shape == (0, 64, 16)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(backend):
    mod = SRAttention(32, num_heads=2, sr_ratio=4, backend=backend).to(DEVICE)
    x = torch.randn(2, 48, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"SRAttention: x must be 3-D \(B, N, C\), got shape \(48, 32\)"):
        mod(x[0], (6, 8))
    with pytest.raises(ValueError, match=r"SRAttention: x must be 3-D \(B, N, C\), got shape \(1, 2, 48, 32\)"):
        mod(x[None], (6, 8))
    with pytest.raises(ValueError, match=r"SRAttention: x has 16 channels .*dim=32"):
        mod(x[..., :16], (6, 8))
    with pytest.raises(TypeError, match="SRAttention: x must be a torch.Tensor, got list"):
        mod([[1.0] * 32], (1, 1))
    with pytest.raises(ValueError, match=r"SRAttention: feat_size \(7, 8\) gives H\*W = 56 tokens but x has N = 48"):
        mod(x, (7, 8))
    with pytest.raises(ValueError, match=r"SRAttention: feat_size must be an \(H, W\) pair, got 48"):
        mod(x, 48)
    with pytest.raises(ValueError, match=r"SRAttention: feat_size must be an \(H, W\) pair, got \(2, 4, 6\)"):
        mod(x, (2, 4, 6))
    with pytest.raises(ValueError, match=r"SRAttention: feat_size must be an \(H, W\) pair of positive ints, "
                                         r"got \(6.0, 8\)"):
        mod(x, (6.0, 8))
    with pytest.raises(ValueError, match=r"SRAttention: feat_size must be an \(H, W\) pair of positive ints, "
                                         r"got \(0, 8\)"):
        mod(x[:, :0], (0, 8))
    with pytest.raises(ValueError, match=r"at least sr_ratio = 4 in each dimension, got \(2, 24\)"):
        mod(x, (2, 24))
    with pytest.raises(TypeError, match=r"q_weight.dtype is torch.float32 but x.dtype is torch.float64"):
        mod(x.double(), (6, 8))


def test_feat_size_accepts_any_integer_pair():
    """A list, a tuple, a torch.Size, numpy or 0-d tensor integers: all the same grid."""
    np = pytest.importorskip("numpy")
    mod = SRAttention(16, num_heads=2, sr_ratio=2, backend="torch").to(DEVICE)
    x = torch.randn(1, 48, 16, device=DEVICE)
    out = mod(x, (6, 8))
    for feat in ([6, 8], torch.Size([6, 8]), (np.int64(6), np.int32(8)), (torch.tensor(6), torch.tensor(8))):
        assert torch.equal(mod(x, feat), out), feat


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="SRAttention: dim=30 must be divisible by num_heads=4"):
        SRAttention(30, num_heads=4)
    with pytest.raises(ValueError, match=r"SRAttention: backend must be one of .* got 'flash'"):
        SRAttention(32, backend="flash")
    with pytest.raises(ValueError, match="SRAttention: num_heads must be a positive int, got 0"):
        SRAttention(32, num_heads=0)
    with pytest.raises(ValueError, match="SRAttention: sr_ratio must be an int >= 1, got 0"):
        SRAttention(32, num_heads=4, sr_ratio=0)
    with pytest.raises(ValueError, match="SRAttention: dim must be a positive int, got 32.0"):
        SRAttention(32.0)


def test_bad_input_is_rejected_by_timm_too():
    """Where we raise, timm fails too (assert / RuntimeError)."""
    x = torch.randn(2, 48, 32)
    for kwargs, args in [(dict(sr_ratio=2), (x, (7, 8))), (dict(sr_ratio=2), (x[0], (6, 8))),
                         (dict(), (x[..., :16], (6, 8))), (dict(sr_ratio=4), (x, (2, 24)))]:
        with pytest.raises((AssertionError, RuntimeError, ValueError)):
            pvt_v2.Attention(32, num_heads=2, **kwargs)(*args)
        with pytest.raises(ValueError):
            SRAttention(32, num_heads=2, **kwargs)(*args)
    with pytest.raises(AssertionError):
        pvt_v2.Attention(30, num_heads=4)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's float64 refusal is a CPU matter")
def test_triton_refuses_float64_with_a_reason():
    mod = SRAttention(16, num_heads=2, sr_ratio=2, backend="triton").double()
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16, got torch.float64"):
        mod(torch.randn(1, 16, 16, dtype=torch.float64), (4, 4))


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("kwargs,grid", [
    pytest.param(dict(dim=32, num_heads=2, sr_ratio=2), (6, 8), id="sr2"),
    pytest.param(dict(dim=32, num_heads=2, linear_attn=True), (6, 8), id="linear"),
])
def test_compile_fullgraph_matches_eager(kwargs, grid):
    """No graph break through the module, the custom ops (forward and backward), the views."""
    mod = SRAttention(**kwargs, backend="triton").to(DEVICE).eval()
    _randomise(mod)
    x = torch.randn(2, grid[0] * grid[1], 32, device=DEVICE)
    grad = torch.randn_like(x)
    out_eager, g_eager = _run(mod, x, grid, grad)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out_c, g_c = _run(compiled, x, grid, grad)
    torch.testing.assert_close(out_c, out_eager, rtol=1e-6, atol=1e-6)
    assert g_c.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_c[name], g_eager[name], rtol=1e-6, atol=1e-6, msg=name)


class _GridWrapper(nn.Module):
    """How timm's PVT stage calls the block: feat_size taken from the (B, H, W, C) activations' shape."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        B, H, W, C = x.shape
        return self.attn(x.flatten(1, 2), (H, W))


def test_compile_dynamic_shapes_feat_size_from_the_shape():
    """feat_size built from (symbolic) shapes under dynamic=True compiles without graph breaks; other grids
    give the eager result."""
    mod = SRAttention(16, num_heads=2, sr_ratio=2, backend="triton").to(DEVICE)
    _randomise(mod)
    wrapped = _GridWrapper(mod)
    torch._dynamo.reset()
    compiled = torch.compile(wrapped, fullgraph=True, backend="aot_eager", dynamic=True)
    for grid in [(6, 8), (8, 5)]:
        x = torch.randn(2, *grid, 16, device=DEVICE)
        grad = torch.randn(2, grid[0] * grid[1], 16, device=DEVICE)
        out_eager, g_eager = _run(wrapped, x, None, grad)
        out_c, g_c = _run(compiled, x, None, grad)
        torch.testing.assert_close(out_c, out_eager, rtol=1e-6, atol=1e-6)
        for name in g_eager:
            torch.testing.assert_close(g_c[name], g_eager[name], rtol=1e-6, atol=1e-6, msg=name)
