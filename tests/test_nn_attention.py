"""vitkern.nn.Attention: a drop-in for timm.layers.Attention.

Parity with timm (same state_dict -> same output and every gradient: input, every
parameter, a float mask), masks (float, bool, causal), dropout, bad input and
torch.compile(fullgraph=True).

Reference: timm's module in float64 (its fused SDPA path). backend="torch" runs in
float64, backend="triton" in float32 (on CPU in Triton's interpreter).
"""
import inspect

import pytest
import torch
from torch import nn

from helpers import assert_close, assert_drop_in_signature
from vitkern import ops
from vitkern.nn import Attention
from vitkern.testing import poison_outputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIGH = torch.float32 if DEVICE.type == "cuda" else torch.float64
BACKENDS = [pytest.param("torch", HIGH, id="torch-f64"), pytest.param("triton", torch.float32, id="triton-f32")]

timm_layers = pytest.importorskip("timm.layers")


# ----------------------------------------------------------------------------- helpers
def _randomise(module: nn.Module) -> None:
    """Every parameter random and non-zero-mean (LayerNorm starts at 1/0, Linear biases near 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + 0.05)


def _pair(kwargs, backend, dtype):
    """A randomised timm Attention in float64 and a vitkern one loaded (strict) from its state_dict."""
    ref = timm_layers.Attention(**kwargs).to(DEVICE, HIGH)
    _randomise(ref)
    mod = Attention(**kwargs, backend=backend).to(DEVICE, dtype)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), mod.eval()


def _run(module, x, grad, mask=None, **fwd_kwargs):
    """Forward + backward with a given upstream gradient; returns (out, {name: grad})."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    args = {}
    if mask is not None:
        mask = mask.detach().clone().requires_grad_(mask.is_floating_point())
        args["attn_mask"] = mask
    out = module(x, **args, **fwd_kwargs)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad}
    if mask is not None and mask.is_floating_point():
        grads["attn_mask"] = mask.grad
    grads.update({f"param {n.removeprefix('_orig_mod.')}": p.grad for n, p in module.named_parameters()})
    return out, grads


def _compare_with_timm(kwargs, n, backend, dtype, batch=2, mask=None, **fwd_kwargs):
    ref, mod = _pair(kwargs, backend, dtype)
    x = torch.randn(batch, n, kwargs["dim"], dtype=HIGH, device=DEVICE)
    with torch.no_grad():
        grad = torch.randn_like(ref(x, attn_mask=mask, **fwd_kwargs))  # random upstream gradient, never .sum()
    out_ref, g_ref = _run(ref, x, grad, mask, **fwd_kwargs)
    mask_lo = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
    with poison_outputs():  # any element a kernel forgets to write shows up as NaN
        out, g = _run(mod, x.to(dtype), grad, mask_lo, **fwd_kwargs)
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_close("output", out, out_ref)
    _assert_grads_close(g, g_ref)
    return out


def _assert_grads_close(g, g_ref):
    """Every gradient within tolerance. A gradient that is zero in exact arithmetic (k_norm.bias:
    adding b to every key adds q·b to a whole score row, which the softmax cancels) has no
    relative error to speak of: it must be zero to within the tolerance of the largest gradient."""
    assert g.keys() == g_ref.keys()
    scale = max(gr.double().norm().item() for gr in g_ref.values())
    for name, gr in g_ref.items():
        assert g[name] is not None, f"{name}: no gradient"
        if name == "param k_norm.bias":
            assert gr.double().norm().item() <= 1e-12 * scale, "k_norm.bias: the reference gradient is not ~0"
            err = g[name].double().norm().item() / (scale or 1.0)  # all zero for an empty input
            assert err <= 1e-5, f"grad {name}: should be ~0, norm {err:.3e} of the largest gradient's"
            continue
        assert_close(f"grad {name}", g[name], gr, grad=True)


LN = nn.LayerNorm
# (id, constructor kwargs, N, batch)
CASES = [
    ("n50-h2", dict(dim=32, num_heads=2), 50, 2),
    ("n197-h4-qkv_bias-b1", dict(dim=64, num_heads=4, qkv_bias=True), 197, 1),
    ("head_dim80", dict(dim=160, num_heads=2, qkv_bias=True), 50, 2),
    ("qk_norm-layernorm", dict(dim=32, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=LN), 50, 2),
    ("scale_norm", dict(dim=32, num_heads=2, scale_norm=True, norm_layer=LN), 50, 2),
    ("gated-qkv_bias", dict(dim=32, num_heads=2, gated=True, qkv_bias=True), 50, 2),
    ("gated-no-bias", dict(dim=32, num_heads=2, gated=True), 50, 2),
    ("dim_out24", dict(dim=32, num_heads=2, dim_out=24), 50, 2),
    ("attn_head_dim24", dict(dim=32, num_heads=2, attn_head_dim=24), 50, 2),
    ("no-proj-bias", dict(dim=32, num_heads=4, proj_bias=False), 50, 2),
    ("everything-n197", dict(dim=32, num_heads=2, attn_head_dim=20, dim_out=40, qkv_bias=True, qk_norm=True,
                             scale_norm=True, gated=True, norm_layer=LN), 197, 1),
]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("kwargs,n,batch", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_matches_timm(kwargs, n, batch, backend, dtype):
    _compare_with_timm(kwargs, n, backend, dtype, batch=batch)


def _float_mask(shape):
    return torch.randn(shape, dtype=HIGH, device=DEVICE)


def _bool_mask(shape, n):
    keep = torch.rand(shape, device=DEVICE) > 0.4
    return keep | torch.eye(n, dtype=torch.bool, device=DEVICE)  # never a fully masked row


MASKS = [
    ("float-NxN", lambda b, h, n: _float_mask((n, n))),
    ("float-Bx1xNxN", lambda b, h, n: _float_mask((b, 1, n, n))),
    ("float-BxhxNxN", lambda b, h, n: _float_mask((b, h, n, n))),
    ("bool-NxN", lambda b, h, n: _bool_mask((n, n), n)),
    ("bool-Bx1xNxN", lambda b, h, n: _bool_mask((b, 1, n, n), n)),
]


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["packed", "qk_norm"])
@pytest.mark.parametrize("make_mask", [pytest.param(m[1], id=m[0]) for m in MASKS])
def test_attn_mask_matches_timm(make_mask, qk_norm, backend, dtype):
    """A float mask is an additive bias (and gets its gradient); a bool mask keeps the True entries."""
    kwargs = dict(dim=32, num_heads=2, qkv_bias=True, qk_norm=qk_norm, norm_layer=LN if qk_norm else None)
    B, n = 2, 50
    _compare_with_timm(kwargs, n, backend, dtype, batch=B, mask=make_mask(B, 2, n))


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("n", [50, 97])
def test_is_causal_matches_timm(n, backend, dtype):
    """is_causal=True: an explicit causal additive mask, through the module's own backend."""
    _compare_with_timm(dict(dim=32, num_heads=2), n, backend, dtype, is_causal=True)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["packed", "qk_norm"])
def test_is_causal_is_the_ops_flag_not_a_dense_bias(qk_norm, monkeypatch):
    """is_causal=True reaches the op as is_causal (the kernels mask in place and skip key blocks past
    the diagonal); no N x N bias is built."""
    calls = []
    for name in ("attention_packed", "attention"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, **kw: calls.append(kw) or _real(*a, **kw))
    kwargs = dict(dim=32, num_heads=2, qk_norm=qk_norm, norm_layer=LN if qk_norm else None)
    mod = Attention(**kwargs, backend="triton").to(DEVICE).eval()
    mod(torch.randn(2, 10, 32, device=DEVICE), is_causal=True)
    assert len(calls) == 1 and calls[0]["is_causal"] is True and calls[0]["attn_bias"] is None
    _compare_with_timm(kwargs, 50, "triton", torch.float32, is_causal=True)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["packed", "qk_norm"])
@pytest.mark.parametrize("batch,n", [(0, 10), (2, 0)], ids=["batch0", "n0"])
def test_empty_input_gives_what_timm_gives(batch, n, qk_norm, backend, dtype):
    """Empty in, empty out (forward and every gradient), as timm's module (SDPA) does."""
    kwargs = dict(dim=32, num_heads=2, qkv_bias=True, qk_norm=qk_norm, norm_layer=LN if qk_norm else None)
    for is_causal in (False, True):
        out = _compare_with_timm(kwargs, n, backend, dtype, batch=batch, is_causal=is_causal)
        assert out.shape == (batch, n, 32)


@pytest.mark.parametrize("backend,dtype", [
    pytest.param("torch", HIGH, id="torch-f64"),
    pytest.param("triton", torch.float32, id="triton-f32"),
])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bool_mask_hiding_the_first_key_block(backend, dtype):
    """Rows that attend only to keys >= 64: -inf in every score of the first key tile."""
    n = 100
    keep = torch.ones(n, n, dtype=torch.bool, device=DEVICE)
    keep[::2, :70] = False  # even rows see only keys 70..99
    _compare_with_timm(dict(dim=32, num_heads=2), n, backend, dtype, mask=keep)


# ----------------------------------------------------------------------------- structure
STRUCTURE_CASES = [c[1] for c in CASES] + [dict(dim=48, num_heads=3, qk_norm=True, scale_norm=True,
                                                norm_layer=timm_layers.RmsNorm, attn_drop=0.1, proj_drop=0.2)]


@pytest.mark.parametrize("kwargs", STRUCTURE_CASES)
def test_same_attributes_and_state_dict_as_timm(kwargs):
    ref = timm_layers.Attention(**kwargs)
    mod = Attention(**kwargs)
    for attr in ("num_heads", "head_dim", "attn_dim", "scale"):
        assert getattr(mod, attr) == getattr(ref, attr), attr
    assert mod.fused_attn is True
    for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
        a, b = getattr(mod, name), getattr(ref, name)
        assert type(a) is type(b), name
    for name in ("qkv", "proj"):
        a, b = getattr(mod, name), getattr(ref, name)
        assert (a.in_features, a.out_features, a.bias is None) == (b.in_features, b.out_features, b.bias is None)
    assert mod.attn_drop.p == ref.attn_drop.p and mod.proj_drop.p == ref.proj_drop.p
    assert {k: v.shape for k, v in mod.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # and the other way round: vitkern weights load into timm (strict)
    _randomise(mod)
    ref.load_state_dict(mod.state_dict(), strict=True)


def test_defaults_and_signature():
    assert_drop_in_signature(Attention, timm_layers.Attention, methods=())
    fwd = inspect.signature(Attention.forward).parameters
    assert list(fwd) == list(inspect.signature(timm_layers.Attention.forward).parameters)
    assert fwd["attn_mask"].default is None and fwd["is_causal"].default is False
    m = Attention(768, device="meta")
    assert (m.num_heads, m.head_dim, m.qkv.weight.shape, m.qkv.bias) == (8, 96, (2304, 768), None)


def test_packed_path_calls_the_op_on_the_qkv_output(monkeypatch):
    """Without qk_norm the qkv Linear output goes to attention_packed as is (no permute/copy);
    with qk_norm, attention gets (B, h, N, d) views. dropout_p is attn_drop.p only in training."""
    calls = []
    real_packed, real_attention = ops.attention_packed, ops.attention

    def packed(qkv, num_heads, **kw):
        calls.append(("packed", qkv, num_heads, kw))
        return real_packed(qkv, num_heads, **kw)

    def attention(q, k, v, **kw):
        calls.append(("attention", (q, k, v), None, kw))
        return real_attention(q, k, v, **kw)

    monkeypatch.setattr(ops, "attention_packed", packed)
    monkeypatch.setattr(ops, "attention", attention)
    x = torch.randn(2, 10, 32, device=DEVICE)

    mod = Attention(32, num_heads=4, attn_drop=0.25, backend="triton").to(DEVICE)
    mod.qkv.register_forward_hook(lambda m, i, o: calls.append(("qkv-out", o, None, None)))
    mod.eval()(x)
    (_, qkv_out, _, _), (kind, qkv, heads, kw) = calls
    assert kind == "packed" and qkv is qkv_out and heads == 4
    assert kw == dict(scale=mod.scale, attn_bias=None, dropout_p=0.0, is_causal=False, backend="triton")
    calls.clear()
    mod.train()(x)
    assert calls[1][3]["dropout_p"] == 0.25

    calls.clear()
    mod = Attention(32, num_heads=4, qk_norm=True, norm_layer=LN, backend="triton").to(DEVICE).eval()
    mod.qkv.register_forward_hook(lambda m, i, o: calls.append(("qkv-out", o, None, None)))
    mod(x)
    (_, qkv_out, _, _), (kind, (q, k, v), _, kw) = calls
    assert kind == "attention" and q.shape == k.shape == v.shape == (2, 4, 10, 8)
    assert kw == dict(scale=mod.scale, attn_bias=None, dropout_p=0.0, is_causal=False, backend="triton")
    # v is a strided view into the qkv output (no copy); q and k are the norms' outputs
    assert v.untyped_storage().data_ptr() == qkv_out.untyped_storage().data_ptr()
    assert v.data_ptr() == qkv_out.data_ptr() + 2 * 32 * qkv_out.element_size()
    assert torch.equal(q, mod.q_norm(qkv_out.view(2, 10, 3, 4, 8)[:, :, 0]).transpose(1, 2))


# ----------------------------------------------------------------------------- dropout
def _train_pair(backend, dtype, attn_drop=0.3, proj_drop=0.0):
    kwargs = dict(dim=32, num_heads=2, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
    ref, mod = _pair(kwargs, backend, dtype)
    return ref.train(), mod.train()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_dropout_reproducible_under_seed_and_off_in_eval(backend, dtype):
    ref, mod = _train_pair(backend, dtype, attn_drop=0.3, proj_drop=0.1)
    x = torch.randn(2, 50, 32, dtype=HIGH, device=DEVICE)
    torch.manual_seed(123)
    a = mod(x.to(dtype))
    torch.manual_seed(123)
    b = mod(x.to(dtype))
    c = mod(x.to(dtype))  # a different draw
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    mod.eval(), ref.eval()
    out = mod(x.to(dtype))
    assert not torch.allclose(a.double(), out.double(), atol=1e-3)
    assert_close("eval output", out, ref(x))
    assert torch.equal(out, mod(x.to(dtype)))


def test_dropout_torch_backend_equals_timm_unfused_under_the_same_seed():
    """The torch backend drops the (B, h, N, N) probabilities with F.dropout, like timm's unfused path:
    the same seed gives the same masks, so outputs and gradients match exactly (attn_drop and proj_drop)."""
    ref, mod = _train_pair("torch", HIGH, attn_drop=0.3, proj_drop=0.2)
    ref.fused_attn = False
    x = torch.randn(2, 50, 32, dtype=HIGH, device=DEVICE)
    grad = torch.randn(2, 50, 32, dtype=HIGH, device=DEVICE)
    torch.manual_seed(7)
    out_ref, g_ref = _run(ref, x, grad)
    torch.manual_seed(7)
    out, g = _run(mod, x, grad)
    assert_close("output", out, out_ref)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], grad=True)


def test_dropout_triton_equals_reference_with_the_kernels_mask():
    """Triton: the op draws its Philox seed from torch's default generator; with that seed,
    ops.attention.dropout_keep_mask gives the factors, and timm's math with them must match."""
    from vitkern.ops.attention import dropout_keep_mask

    p, B, N = 0.3, 2, 50
    ref, mod = _train_pair("triton", torch.float32, attn_drop=p)
    x = torch.randn(B, N, 32, dtype=HIGH, device=DEVICE)
    grad = torch.randn(B, N, 32, dtype=HIGH, device=DEVICE)
    torch.manual_seed(11)
    out, g = _run(mod, x.float(), grad)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())
    keep = dropout_keep_mask(seed, (B, 2, N, N), p, device=DEVICE).to(HIGH)
    assert 0.5 < (keep > 0).double().mean().item() < 0.9

    ref.attn_drop = _FixedMask(keep)  # timm's unfused path: attn_drop(softmax(...))
    ref.fused_attn = False
    out_ref, g_ref = _run(ref, x, grad)
    assert_close("output", out, out_ref)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], grad=True)


class _FixedMask(nn.Module):
    def __init__(self, factors):
        super().__init__()
        self.factors = factors

    def forward(self, probs):
        return probs * self.factors


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(backend):
    mod = Attention(32, num_heads=2, backend=backend).to(DEVICE)
    with pytest.raises(ValueError, match=r"3-D \(B, N, C\), got shape \(10, 32\)"):
        mod(torch.randn(10, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"3-D \(B, N, C\), got shape \(1, 2, 10, 32\)"):
        mod(torch.randn(1, 2, 10, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"x has 16 channels .*dim=32"):
        mod(torch.randn(2, 10, 16, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mod([[1.0] * 32])
    x = torch.randn(2, 10, 32, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask must be None when is_causal=True"):
        mod(x, attn_mask=torch.zeros(10, 10, device=DEVICE), is_causal=True)
    with pytest.raises(TypeError, match="bool mask or a floating-point additive mask.*torch.int64"):
        mod(x, attn_mask=torch.zeros(10, 10, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"attn_bias must broadcast to .*\(2, 2, 10, 10\).*\(10, 9\)"):
        mod(x, attn_mask=torch.zeros(10, 9, device=DEVICE))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dim=30 must be divisible by num_heads=4"):
        Attention(30, num_heads=4)
    with pytest.raises(ValueError, match="norm_layer must be provided.*qk_norm=True"):
        Attention(32, num_heads=4, qk_norm=True)
    with pytest.raises(ValueError, match="norm_layer must be provided.*scale_norm=True"):
        Attention(32, num_heads=4, scale_norm=True)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'flash'"):
        Attention(32, backend="flash")
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        Attention(32, num_heads=0)
    assert Attention(30, num_heads=4, attn_head_dim=8).attn_dim == 32  # allowed with attn_head_dim, as timm


def test_bad_input_is_rejected_by_timm_too():
    """Where we raise, timm fails too (assert / RuntimeError)."""
    for build, x in [(lambda m: m(32, num_heads=2), torch.randn(2, 10, 16)),
                     (lambda m: m(32, num_heads=2), torch.randn(10, 32))]:
        with pytest.raises((AssertionError, RuntimeError, ValueError)):
            build(timm_layers.Attention)(x)
        with pytest.raises(ValueError):
            build(Attention)(x)
    with pytest.raises(AssertionError):
        timm_layers.Attention(30, num_heads=4)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("qk_norm,mask_kind", [(False, "float"), (True, "bool"), (False, "causal")],
                         ids=["packed-float_mask", "qk_norm-bool_mask", "packed-causal"])
def test_compile_fullgraph_matches_eager(qk_norm, mask_kind):
    """No graph break through the mask handling, the custom ops (forward and backward), the views."""
    mod = Attention(32, num_heads=2, qkv_bias=True, qk_norm=qk_norm, norm_layer=LN, scale_norm=qk_norm,
                    gated=qk_norm, backend="triton").to(DEVICE).eval()
    _randomise(mod)
    x = torch.randn(2, 50, 32, device=DEVICE)
    mask = {"float": torch.randn(2, 1, 50, 50, device=DEVICE), "bool": _bool_mask((2, 1, 50, 50), 50),
            "causal": None}[mask_kind]
    kw = {"is_causal": True} if mask_kind == "causal" else {}
    grad = torch.randn(2, 50, 32, device=DEVICE)
    out_eager, g_eager = _run(mod, x, grad, mask, **kw)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out_c, g_c = _run(compiled, x, grad, mask, **kw)
    torch.testing.assert_close(out_c, out_eager, rtol=1e-6, atol=1e-6)
    assert g_c.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_c[name], g_eager[name], rtol=1e-6, atol=1e-6, msg=name)
