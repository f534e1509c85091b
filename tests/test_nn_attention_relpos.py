"""vitkern.nn.BeitAttention / MaxxVitAttentionCl / MaxxVitAttention2d: drop-ins for timm's
beit.Attention and maxxvit.AttentionCl / Attention2d, and vitkern.optimize on tiny BEiT,
CoAtNet and MaxViT models.

Parity with timm (same state_dict -> same output and every gradient: input, shared bias, every
parameter incl. the relative-position bias tables): the reference is timm's module (fused SDPA
path) in float64; backend="torch" in float64 within 1e-10 relative, backend="triton" in float32
(CPU: Triton's interpreter) within helpers.assert_close of the float64 result. Random upstream
gradients, odd token counts, batch 1 and 2.
"""
import copy
import warnings
from functools import partial

import pytest
import torch

from helpers import assert_close, assert_drop_in_signature, rel_err
import vitkern
from vitkern import ops
from vitkern.convert import OptimizeWarning
from vitkern.nn import BeitAttention, MaxxVitAttention2d, MaxxVitAttentionCl, PatchEmbed
from vitkern.testing import poison_outputs, randomise_parameters

timm = pytest.importorskip("timm")
from timm.layers.pos_embed_rel import RelPosBias, RelPosBiasTf, RelPosMlp  # noqa: E402
from timm.models import beit, maxxvit  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIGH = torch.float32 if DEVICE.type == "cuda" else torch.float64
BACKENDS = [pytest.param("torch", HIGH, id="torch-f64"), pytest.param("triton", torch.float32, id="triton-f32")]
TORCH_RTOL = 1e-10


# ----------------------------------------------------------------------------- helpers
def _close(name, got, ref, grad=False):
    if got.dtype == torch.float64:
        err = rel_err(got, ref)
        assert err <= TORCH_RTOL, f"{name}: relative error {err:.3e} > {TORCH_RTOL}"
    else:
        assert_close(name, got, ref, grad=grad)


def _run(module, x, grad=None, shared=None):
    """Forward + backward with a random (or the given) upstream gradient: (out, {name: grad}, upstream)."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    kw = {}
    if shared is not None:
        shared = shared.detach().clone().requires_grad_(True)
        kw[_SHARED_ARG[type(module)]] = shared
    out = module(x, **kw)
    grad = torch.randn_like(out) if grad is None else grad  # never .sum()
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad}
    if shared is not None:
        grads["shared"] = shared.grad
    grads.update({f"param {n}": p.grad for n, p in module.named_parameters()})
    return out, grads, grad


_SHARED_ARG = {beit.Attention: "shared_rel_pos_bias", BeitAttention: "shared_rel_pos_bias",
               maxxvit.AttentionCl: "shared_rel_pos", MaxxVitAttentionCl: "shared_rel_pos",
               maxxvit.Attention2d: "shared_rel_pos", MaxxVitAttention2d: "shared_rel_pos"}


def _compare(ref_cls, cls, kwargs, x_shape, backend, dtype, shared_shape=None):
    torch.manual_seed(0)
    ref = ref_cls(**kwargs).to(DEVICE, HIGH).eval()
    randomise_parameters(ref)
    mod = cls(**kwargs, backend=backend).to(DEVICE, dtype).eval()
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(x_shape, dtype=HIGH, device=DEVICE)
    shared = torch.randn(shared_shape, dtype=HIGH, device=DEVICE) if shared_shape else None
    out_ref, g_ref, grad = _run(ref, x, None, shared)
    with poison_outputs():
        out, g, _ = _run(mod, x.to(dtype), grad, shared.to(dtype) if shared is not None else None)
    assert out.dtype == dtype and out.shape == out_ref.shape
    _close("output", out, out_ref)
    _assert_grads_close(g, g_ref)
    return ref, mod


def _assert_grads_close(g, g_ref):
    """Every gradient within tolerance; one that is zero in exact arithmetic (a bias added to a whole
    score row, e.g. RelPosMlp's last bias, cancels in the softmax) is compared near zero against the
    largest gradient instead, where a relative error means nothing."""
    assert list(g) == list(g_ref)
    scale = max(t.norm().item() for t in g_ref.values())
    for name, gr in g_ref.items():
        assert g[name] is not None, f"{name}: no gradient"
        if gr.norm().item() <= 1e-9 * scale:
            assert g[name].norm().item() <= 1e-6 * scale, f"{name}: should be ~0"
        else:
            _close(f"grad {name}", g[name], gr, grad=True)


# ----------------------------------------------------------------------------- BEiT parity
# (id, kwargs, (B, N), shared bias shape or None); N = Wh·Ww + 1 (class token)
BEIT_CASES = [
    ("win3x4-qkv_bias-b2", dict(dim=32, num_heads=2, qkv_bias=True, window_size=(3, 4)), (2, 13), None),
    ("win2x3-shared-b1", dict(dim=32, num_heads=4, qkv_bias=True, window_size=(2, 3)), (1, 7), (4, 7, 7)),
    ("shared-only-b2", dict(dim=24, num_heads=2, qkv_bias=True), (2, 9), (2, 9, 9)),
    ("qkv_bias_separate-head_dim12", dict(dim=24, num_heads=2, qkv_bias=True, qkv_bias_separate=True,
                                          window_size=(3, 3), attn_head_dim=12), (2, 10), None),
    ("no-qkv_bias-win3x1", dict(dim=16, num_heads=2, window_size=(3, 1)), (2, 4), None),
    ("no-bias-at-all", dict(dim=16, num_heads=2), (1, 5), None),
]


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("kwargs,xs,shared", [pytest.param(*c[1:], id=c[0]) for c in BEIT_CASES])
def test_beit_matches_timm(kwargs, xs, shared, backend, dtype):
    _compare(beit.Attention, BeitAttention, kwargs, (*xs, kwargs["dim"]), backend, dtype, shared)


def test_beit_relative_position_index_and_buffers_equal_timms():
    for ws in [(3, 4), (2, 2), (1, 5), (7, 7)]:
        ref = beit.Attention(32, num_heads=2, qkv_bias=True, window_size=ws)
        mod = BeitAttention(32, num_heads=2, qkv_bias=True, window_size=ws)
        assert torch.equal(mod.relative_position_index, ref.relative_position_index), ws
        assert torch.equal(mod.relative_position_index, beit.gen_relative_position_index(ws)), ws
        assert torch.equal(mod.k_bias, ref.k_bias) and mod.num_relative_distance == ref.num_relative_distance
        assert torch.equal(mod._get_rel_pos_bias(), ref._get_rel_pos_bias())


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolation
def test_beit_set_window_size_matches_timm():
    torch.manual_seed(3)
    ref = beit.Attention(16, num_heads=2, qkv_bias=True, window_size=(3, 3)).double().eval()
    randomise_parameters(ref)
    mod = BeitAttention(16, num_heads=2, qkv_bias=True, window_size=(3, 3), backend="torch").double().eval()
    mod.load_state_dict(ref.state_dict())
    for m in (ref, mod):
        m.set_window_size((4, 2))
    assert mod.window_size == (4, 2) and mod.num_relative_distance == ref.num_relative_distance
    assert torch.equal(mod.relative_position_bias_table, ref.relative_position_bias_table)
    assert torch.equal(mod.relative_position_index, ref.relative_position_index)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert rel_err(mod(x), ref(x)) <= TORCH_RTOL


def test_beit_bias_reaches_the_op_as_a_per_head_bias(monkeypatch):
    """The qkv output goes to attention_packed as is, with a (1, h, N, N) bias (never B x h x N x N scores)."""
    calls = []
    real = ops.attention_packed
    monkeypatch.setattr(ops, "attention_packed",
                        lambda qkv, h, **kw: calls.append((qkv.shape, h, kw)) or real(qkv, h, **kw))
    mod = BeitAttention(16, num_heads=2, qkv_bias=True, window_size=(2, 2), attn_drop=0.25, backend="torch").eval()
    mod(torch.randn(3, 5, 16))
    (shape, h, kw), = calls
    assert shape == (3, 5, 48) and h == 2 and kw["attn_bias"].shape == (1, 2, 5, 5) and kw["dropout_p"] == 0.0
    assert kw["attn_bias"].requires_grad and kw["scale"] == mod.scale
    mod.train()(torch.randn(3, 5, 16))
    assert calls[1][2]["dropout_p"] == 0.25


# ----------------------------------------------------------------------------- MaxxViT parity
REL_POS = {
    "bias": RelPosBias,
    "bias_tf": RelPosBiasTf,
    "mlp": partial(RelPosMlp, hidden_dim=16),
}
# (id, kwargs without rel_pos_cls, rel_pos kind or "shared" or None, window)
MAXX_CASES = [
    ("head_first-bias", dict(dim=16, dim_head=8), "bias"),
    ("head_first-bias_tf", dict(dim=16, dim_head=8), "bias_tf"),
    ("head_first-mlp", dict(dim=16, dim_head=8), "mlp"),
    ("channels_first-bias", dict(dim=16, dim_head=8, head_first=False), "bias"),
    ("shared-only", dict(dim=16, dim_head=4), "shared"),
    ("no-bias-expand", dict(dim=16, dim_out=24, dim_head=8, bias=False), None),
]


def _maxx_kwargs(kwargs, rel, window):
    kw = dict(kwargs)
    if rel in REL_POS:
        kw["rel_pos_cls"] = partial(REL_POS[rel], window_size=window)
    return kw


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("batch,window", [(2, (3, 3)), (1, (3, 2))], ids=["b2-3x3", "b1-3x2"])
@pytest.mark.parametrize("kwargs,rel", [pytest.param(*c[1:], id=c[0]) for c in MAXX_CASES])
def test_maxxvit_cl_matches_timm(kwargs, rel, batch, window, backend, dtype):
    kw = _maxx_kwargs(kwargs, rel, window)
    n = window[0] * window[1]
    heads = (kw.get("dim_out", 16) if kw.get("dim_out", 16) > kw["dim"] else kw["dim"]) // kw["dim_head"]
    _compare(maxxvit.AttentionCl, MaxxVitAttentionCl, kw, (batch, *window, kw["dim"]), backend, dtype,
             (batch, heads, n, n) if rel == "shared" else None)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("batch,window", [(2, (3, 3)), (1, (3, 2))], ids=["b2-3x3", "b1-3x2"])
@pytest.mark.parametrize("kwargs,rel", [pytest.param(*c[1:], id=c[0]) for c in MAXX_CASES])
def test_maxxvit_2d_matches_timm(kwargs, rel, batch, window, backend, dtype):
    kw = _maxx_kwargs(kwargs, rel, window)
    n = window[0] * window[1]
    heads = kw.get("dim_out", kw["dim"]) // kw["dim_head"]  # Attention2d expands first whenever dim_out is given
    _compare(maxxvit.Attention2d, MaxxVitAttention2d, kw, (batch, kw["dim"], *window), backend, dtype,
             (1, heads, n, n) if rel == "shared" else None)


def test_maxxvit_cl_accepts_any_token_rank_as_timm():
    """(B, N, C) as well as (B, H, W, C): timm flattens everything between B and C."""
    kw = dict(dim=16, dim_head=8)
    ref = maxxvit.AttentionCl(**kw).double()
    randomise_parameters(ref)
    mod = MaxxVitAttentionCl(**kw, backend="torch").double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    assert rel_err(mod(x), ref(x)) <= TORCH_RTOL


# ----------------------------------------------------------------------------- dropout, compile
DROPOUT = [
    (beit.Attention, BeitAttention, dict(dim=16, num_heads=2, qkv_bias=True, window_size=(2, 3), attn_drop=0.3,
                                         proj_drop=0.2), (2, 7, 16)),
    (maxxvit.AttentionCl, MaxxVitAttentionCl, dict(dim=16, dim_head=8, attn_drop=0.3, proj_drop=0.2,
                                                   rel_pos_cls=partial(RelPosBias, window_size=(3, 3))), (2, 3, 3, 16)),
    (maxxvit.Attention2d, MaxxVitAttention2d, dict(dim=16, dim_head=8, attn_drop=0.3, proj_drop=0.2,
                                                   rel_pos_cls=partial(RelPosBias, window_size=(3, 3))), (2, 16, 3, 3)),
]


@pytest.mark.parametrize("ref_cls,cls,kwargs,x_shape", DROPOUT, ids=["beit", "cl", "2d"])
def test_training_dropout_torch_backend_equals_timm_unfused_under_the_same_seed(ref_cls, cls, kwargs, x_shape):
    """attn_drop.p reaches the op in training mode: the torch backend drops the (B, h, N, N)
    probabilities with F.dropout, as timm's unfused path, so the same seed gives the same masks."""
    torch.manual_seed(0)
    ref = ref_cls(**kwargs).double().train()
    randomise_parameters(ref)
    ref.fused_attn = False
    mod = cls(**kwargs, backend="torch").double().train()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(x_shape, dtype=torch.float64)
    torch.manual_seed(7)
    out_ref, g_ref, grad = _run(ref, x)
    torch.manual_seed(7)
    out, g, _ = _run(mod, x, grad)
    _close("output", out, out_ref)
    _assert_grads_close(g, g_ref)
    with torch.no_grad():
        assert not torch.allclose(mod(x), mod.eval()(x))  # dropout did act in training mode


@pytest.mark.parametrize("ref_cls,cls,kwargs,x_shape", DROPOUT, ids=["beit", "cl", "2d"])
def test_compile_fullgraph_matches_eager(ref_cls, cls, kwargs, x_shape):
    """No graph break through the bias gather, the strided views and the custom ops (forward and backward)."""
    mod = cls(**kwargs, backend="triton").eval()
    randomise_parameters(mod)
    x = torch.randn(x_shape)
    out_eager, g_eager, grad = _run(mod, x)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    mod.zero_grad(set_to_none=True)  # fresh .grad tensors: the eager ones are kept in g_eager
    x = x.detach().clone().requires_grad_(True)
    out_c = compiled(x)
    out_c.backward(grad)
    torch.testing.assert_close(out_c, out_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, g_eager["x"], rtol=1e-6, atol=1e-6)
    for n, p in mod.named_parameters():
        torch.testing.assert_close(p.grad, g_eager[f"param {n}"], rtol=1e-6, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- structure
STRUCT = [
    (beit.Attention, BeitAttention, dict(dim=32, num_heads=2, qkv_bias=True, window_size=(3, 4), attn_drop=0.1)),
    (beit.Attention, BeitAttention, dict(dim=32, num_heads=4)),
    (maxxvit.AttentionCl, MaxxVitAttentionCl, dict(dim=16, dim_head=8, rel_pos_cls=partial(RelPosBias,
                                                                                         window_size=(2, 2)))),
    (maxxvit.AttentionCl, MaxxVitAttentionCl, dict(dim=16, dim_out=32, dim_head=8, head_first=False)),
    (maxxvit.Attention2d, MaxxVitAttention2d, dict(dim=16, dim_head=8, rel_pos_cls=partial(RelPosBiasTf,
                                                                                         window_size=(2, 3)))),
    (maxxvit.Attention2d, MaxxVitAttention2d, dict(dim=16, dim_out=24, dim_head=4, expand_first=False,
                                                   bias=False, proj_drop=0.2)),
]


@pytest.mark.parametrize("ref_cls,cls,kwargs", STRUCT)
def test_same_attributes_buffers_and_state_dict_as_timm(ref_cls, cls, kwargs):
    ref, mod = ref_cls(**kwargs), cls(**kwargs)
    attrs = ("num_heads", "scale", "fused_attn") + (
        ("qkv_bias_separate", "window_size") if cls is BeitAttention else ("dim_head", "head_first"))
    for attr in attrs:
        if attr != "fused_attn":
            assert getattr(mod, attr) == getattr(ref, attr), attr
    assert mod.fused_attn is True
    assert [(n, type(m)) for n, m in mod.named_modules()][1:] == [(n, type(m)) for n, m in ref.named_modules()][1:]
    assert {k: (v.shape, v.dtype) for k, v in mod.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in ref.state_dict().items()}
    assert list(mod.state_dict()) == list(ref.state_dict())
    buffers = dict(ref.named_buffers())
    assert list(dict(mod.named_buffers())) == list(buffers)
    for name, b in mod.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert mod.attn_drop.p == ref.attn_drop.p and mod.proj_drop.p == ref.proj_drop.p
    # strict both ways
    randomise_parameters(mod)
    ref.load_state_dict(mod.state_dict(), strict=True)
    randomise_parameters(ref)
    mod.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(mod.state_dict()[k], v), k


@pytest.mark.parametrize("cls,ref_cls", [(BeitAttention, beit.Attention), (MaxxVitAttentionCl, maxxvit.AttentionCl),
                                         (MaxxVitAttention2d, maxxvit.Attention2d)])
def test_drop_in_signature(cls, ref_cls):
    assert_drop_in_signature(cls, ref_cls)


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    mod = BeitAttention(16, num_heads=2, window_size=(2, 2), backend="torch")
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        mod([[0.0] * 16])
    with pytest.raises(ValueError, match=r"x must be 3-D \(B, N, C\) .*dim = 16, got shape \(2, 5, 8\)"):
        mod(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"x has N = 6 tokens .*window_size=\(2, 2\) \+ 1 class token = 5"):
        mod(torch.randn(2, 6, 16))
    with pytest.raises(TypeError, match="shared_rel_pos_bias must be a floating-point tensor or None, got torch.int64"):
        mod(torch.randn(2, 5, 16), shared_rel_pos_bias=torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attn_bias must broadcast to .*\(2, 2, 5, 5\).*\(3, 5, 5\)"):
        BeitAttention(16, num_heads=2, backend="torch")(torch.randn(2, 5, 16), shared_rel_pos_bias=torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        BeitAttention(16, num_heads=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        BeitAttention(16, backend="flash")

    cl = MaxxVitAttentionCl(16, dim_head=8, backend="torch")
    with pytest.raises(ValueError, match=r"x has 8 channels \(shape \(2, 3, 8\)\) .*dim=16"):
        cl(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"x must be \(B, \.\.\., C\), got shape \(16,\)"):
        cl(torch.randn(16))
    with pytest.raises(TypeError, match="shared_rel_pos must be a floating-point tensor or None, got str"):
        cl(torch.randn(2, 3, 16), shared_rel_pos="bias")
    with pytest.raises(ValueError, match="attention dim 16 must be a positive multiple of dim_head, got dim_head=5"):
        MaxxVitAttentionCl(16, dim_head=5)

    nchw = MaxxVitAttention2d(16, dim_head=8, backend="torch")
    with pytest.raises(ValueError, match=r"x must be 4-D \(B, C, H, W\) with C = dim = 16, got shape \(2, 8, 3, 3\)"):
        nchw(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match=r"x must be 4-D \(B, C, H, W\), got shape \(2, 16, 9\)"):
        nchw(torch.randn(2, 16, 9))
    with pytest.raises(ValueError, match="attention dim 16 must be a positive multiple of dim_head, got dim_head=0"):
        MaxxVitAttention2d(16, dim_head=0)


# ----------------------------------------------------------------------------- converted models
def _beit(**kw):
    base = dict(img_size=24, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    base.update(kw)
    return beit.Beit(**base)


def _maxxvit(block_type, img_size=24, **tcfg):
    transformer = maxxvit.MaxxVitTransformerCfg(dim_head=8, window_size=(2, 2), expand_ratio=2.0, **tcfg)
    cfg = maxxvit.MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=block_type, stem_width=8,
                             conv_cfg=maxxvit.MaxxVitConvCfg(expand_ratio=2.0), transformer_cfg=transformer)
    return maxxvit.MaxxVit(cfg, img_size=img_size, num_classes=5)


# id -> (builder, {vitkern class: number expected})
MODELS = {
    "beit-relpos": (lambda: _beit(), {BeitAttention: 2, PatchEmbed: 1}),  # 3x3 patches: N = 10
    "beit-shared-abs": (lambda: _beit(use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                      qkv_bias=False, global_pool="token"), {BeitAttention: 2, PatchEmbed: 1}),
    "coatnet": (lambda: _maxxvit(("C", "T")), {MaxxVitAttention2d: 1}),  # stage 2 is 3x3 (N = 9)
    # 32x32: stages of 8x8 and 4x4 tokens, 2x2 windows and grids; block + grid attention per M block
    "maxvit": (lambda: _maxxvit(("M", "M"), 32), {MaxxVitAttentionCl: 4}),
    "maxvit-nchw-tf": (lambda: _maxxvit(("M", "M"), 32, use_nchw_attn=True, rel_pos_type="bias_tf"),
                       {MaxxVitAttention2d: 4}),
    "maxvit-mlp-cl": (lambda: _maxxvit(("C", "M"), 32, rel_pos_type="mlp", rel_pos_dim=16, head_first=False),
                      {MaxxVitAttentionCl: 2}),
    # ParallelPartitionAttention: block and grid attention side by side, each dim -> dim / 2
    "maxvit-parallel": (lambda: _maxxvit(("PM", "PM"), 32), {MaxxVitAttentionCl: 4}),
}


_REF = {}


def _reference(model_id):
    if model_id not in _REF:
        torch.manual_seed(1)
        model = MODELS[model_id][0]().double().eval()
        randomise_parameters(model)
        size = 32 if model_id.startswith("maxvit") else 24
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        out, grads, g = _run(model, x)
        _REF[model_id] = (model, x, g, out, grads)
    return _REF[model_id]


def _optimize(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizeWarning)  # nothing skipped
        return vitkern.optimize(model, **kw)


@pytest.mark.parametrize("model_id", list(MODELS))
def test_optimize_converts_the_attention_and_shares_the_parameters(model_id):
    ref, *_ = _reference(model_id)
    model = copy.deepcopy(ref)
    before = dict(model.named_modules())
    params = dict(model.named_parameters())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert _optimize(model, backend="torch") is model
    after = dict(model.named_modules())
    assert list(after) == list(before)
    counts = {}
    for name, m in after.items():
        if type(m) in MODELS[model_id][1]:
            counts[type(m)] = counts.get(type(m), 0) + 1
            assert m.backend == "torch"
            if type(m) is not PatchEmbed:
                assert m.scale == before[name].scale and m.num_heads == before[name].num_heads
        else:
            assert m is before[name], f"{name} ({type(m).__name__}) was changed"
    assert counts == MODELS[model_id][1]
    assert not any(type(m) in (beit.Attention, maxxvit.AttentionCl, maxxvit.Attention2d) for m in model.modules())
    assert list(model.state_dict()) == list(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert all(p is params[n] for n, p in model.named_parameters()) and list(dict(model.named_parameters())) == \
        list(params)


def _check_model_parity(model_id, backend, dtype):
    ref, x, g, out_ref, grads_ref = _reference(model_id)
    model = copy.deepcopy(ref).to(dtype)
    _optimize(model, backend=backend)
    out, grads, _ = _run(model, x.to(dtype), g)
    _close("output", out, out_ref)
    _assert_grads_close(grads, grads_ref)


@pytest.mark.parametrize("model_id", list(MODELS))
def test_converted_model_output_and_every_gradient_equal_timm_float64(model_id):
    _check_model_parity(model_id, "torch", torch.float64)


@pytest.mark.parametrize("model_id", ["beit-relpos", "coatnet", "maxvit"])
def test_converted_model_triton_float32(model_id):
    _check_model_parity(model_id, "triton", torch.float32)


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolation
def test_converted_beit_set_input_size_still_works():
    torch.manual_seed(2)
    ref = _beit().double().eval()
    randomise_parameters(ref)
    model = _optimize(copy.deepcopy(ref), backend="torch")
    for m in (ref, model):
        m.set_input_size(img_size=(32, 24))
    x = torch.randn(1, 3, 32, 24, dtype=torch.float64)
    assert rel_err(model(x), ref(x)) <= TORCH_RTOL
