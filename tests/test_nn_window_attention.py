"""vitkern.nn.SwinTransformerBlock: a drop-in for timm's swin_transformer.SwinTransformerBlock.

Parity with timm (same state_dict, loaded strictly both ways -> same output and every gradient:
input and every parameter, random upstream gradient), timm's window rules (small grid,
non-divisible and non-square grids, always_partition, dynamic_mask, set_input_size), the
fused-op call, training (attention dropout in the fused op; drop_path), empty batches,
bad input and torch.compile(fullgraph=True).

Reference: timm's block in float64. backend="torch" runs in float64, backend="triton" in
float32 (on CPU in Triton's interpreter).
"""
import functools
import inspect

import pytest
import torch
from torch import nn

from helpers import assert_close, assert_drop_in_signature
from vitkern import ops
from vitkern.nn import SwinTransformerBlock
from vitkern.nn.window_attention import DropPath, WindowAttention
from vitkern.ops.window_attention import window_dropout_keep_mask
from vitkern.reference import window_attention_reference
from vitkern.testing import poison_outputs

timm = pytest.importorskip("timm")
from timm.models import swin_transformer as timm_swin  # noqa: E402

pytestmark = pytest.mark.timm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIGH = torch.float32 if DEVICE.type == "cuda" else torch.float64
BACKENDS = [pytest.param("torch", HIGH, id="torch-f64"), pytest.param("triton", torch.float32, id="triton-f32")]


# ----------------------------------------------------------------------------- helpers
def _randomise(module: nn.Module) -> nn.Module:
    """O(1) random biases, norm affines and bias table (timm starts them at 0 / 1 / ~0.02);
    weight matrices keep their init so the softmax stays unsaturated."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return module


def _pair(kwargs, backend, dtype):
    """A randomised timm block in HIGH precision and a vitkern one loaded (strict) from its state_dict."""
    ref = _randomise(timm_swin.SwinTransformerBlock(**kwargs).to(DEVICE, HIGH))
    mod = SwinTransformerBlock(**kwargs, backend=backend).to(DEVICE, dtype)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), mod.eval()


def _run(module, x, grad):
    """Forward + backward with a given upstream gradient; returns (out, {name: grad})."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({f"param {n.removeprefix('_orig_mod.')}": p.grad for n, p in module.named_parameters()})
    return out, grads


def _assert_all_close(out, g, out_ref, g_ref):
    assert out.shape == out_ref.shape
    assert_close("output", out, out_ref)
    assert g.keys() == g_ref.keys()
    for name, gr in g_ref.items():
        assert g[name] is not None, f"{name}: no gradient"
        assert gr.abs().max() > 0, f"{name}: timm's gradient is zero (the check could not fail)"
        assert_close(f"grad {name}", g[name], gr, grad=True)


def _compare_with_timm(kwargs, backend, dtype, grid=None, batch=2, setup=None):
    ref, mod = _pair(kwargs, backend, dtype)
    if setup is not None:
        setup(ref)
        setup(mod)
        mod.load_state_dict(ref.state_dict(), strict=True)
    H, W = grid or kwargs["input_resolution"]
    x = torch.randn(batch, H, W, kwargs["dim"], dtype=HIGH, device=DEVICE)
    grad = torch.randn(batch, H, W, kwargs["dim"], dtype=HIGH, device=DEVICE)  # never .sum()
    out_ref, g_ref = _run(ref, x, grad)
    with poison_outputs():  # any element a kernel forgets to write shows up as NaN
        out, g = _run(mod, x.to(dtype), grad)
    assert out.dtype == dtype
    _assert_all_close(out, g, out_ref, g_ref)
    return ref, mod


def _kw(res, window=7, shift=0, dim=16, heads=2, **extra):
    return dict(dim=dim, input_resolution=res, num_heads=heads, window_size=window, shift_size=shift, **extra)


# (id, constructor kwargs, input grid (None: input_resolution), batch, effective (window, shift))
CASES = [
    ("14x14-w7-s0-b1", _kw((14, 14), 7, 0), None, 1, ((7, 7), (0, 0))),
    ("14x14-w7-s3", _kw((14, 14), 7, 3), None, 2, ((7, 7), (3, 3))),
    ("10x13-w7-s3-nondivisible", _kw((10, 13), 7, 3), None, 2, ((7, 7), (3, 3))),
    ("13x18-w12-s6-b1", _kw((13, 18), 12, 6), None, 1, ((12, 12), (6, 6))),
    ("5x13-w7-s3-small-grid", _kw((5, 13), 7, 3), None, 1, ((5, 7), (0, 3))),
    ("6x5-w7-s3-one-window", _kw((6, 5), 7, 3), None, 1, ((6, 5), (0, 0))),
    ("10x13-qkv_bias=False", _kw((10, 13), 7, 3, qkv_bias=False), None, 1, ((7, 7), (3, 3))),
    ("5x13-always_partition", _kw((5, 13), 7, 3, always_partition=True), None, 1, ((7, 7), (3, 3))),
    ("dynamic_mask-14x14-on-10x13", _kw((14, 14), 7, 3, dynamic_mask=True), (10, 13), 2, ((7, 7), (3, 3))),
    ("stale-mask-same-padding-14x14-on-13x12", _kw((14, 14), 7, 3), (13, 12), 1, ((7, 7), (3, 3))),
    ("unshifted-14x14-on-9x20", _kw((14, 14), 7, 0), (9, 20), 1, ((7, 7), (0, 0))),
    ("rect-window-6x4-s3x2-b1", _kw((10, 9), (6, 4), (3, 2)), None, 1, ((6, 4), (3, 2))),
    ("head_dim12-mlp2-silu-ln1e-6", _kw((10, 13), 7, 3, dim=16, heads=2, head_dim=12, mlp_ratio=2.0,
                                        act_layer=nn.SiLU, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)),
     None, 1, ((7, 7), (3, 3))),
    ("dim32-heads4-b1", _kw((14, 14), 7, 3, dim=32, heads=4), None, 1, ((7, 7), (3, 3))),
]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("kwargs,grid,batch,expected", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_matches_timm(kwargs, grid, batch, expected, backend, dtype):
    ref, mod = _compare_with_timm(kwargs, backend, dtype, grid=grid, batch=batch)
    assert (mod.window_size, mod.shift_size) == expected == (tuple(ref.window_size), tuple(ref.shift_size))


@pytest.mark.filterwarnings("ignore::UserWarning")  # from timm's bias-table interpolation
@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("feat,window,always,expected", [
    pytest.param((10, 13), (7, 7), None, ((7, 7), (3, 3)), id="to-10x13-w7"),
    pytest.param((5, 13), 7, None, ((5, 7), (0, 3)), id="to-5x13-w7-small-grid"),
    pytest.param((6, 6), (6, 6), True, ((6, 6), (3, 3)), id="to-6x6-w6-always_partition-resized-table"),
])
def test_set_input_size_then_forward(feat, window, always, expected, backend, dtype):
    """set_input_size on both blocks (timm resamples the bias table when the window changes)."""
    kwargs = _kw((14, 14), 7, 3)
    setup = lambda m: m.set_input_size(feat, window, always_partition=always)  # noqa: E731
    ref, mod = _compare_with_timm(kwargs, backend, dtype, grid=feat, batch=1, setup=setup)
    assert (mod.window_size, mod.shift_size) == expected == (tuple(ref.window_size), tuple(ref.shift_size))
    assert mod.input_resolution == ref.input_resolution and mod.window_area == ref.window_area
    assert mod.attn.window_size == ref.attn.window_size
    assert torch.equal(mod.attn.relative_position_index, ref.attn.relative_position_index)
    if always:  # the window changed: both resampled the table the same way
        fresh_ref = _randomise(timm_swin.SwinTransformerBlock(**kwargs).to(DEVICE, HIGH))
        fresh = SwinTransformerBlock(**kwargs, backend=backend).to(DEVICE, HIGH)
        fresh.load_state_dict(fresh_ref.state_dict())
        setup(fresh_ref), setup(fresh)
        table = fresh.attn.relative_position_bias_table
        assert table.shape == (11 * 11, 2) and isinstance(table, nn.Parameter)
        torch.testing.assert_close(table, fresh_ref.attn.relative_position_bias_table, rtol=0, atol=0)


# ----------------------------------------------------------------------------- structure
STRUCTURE_CASES = [c[1] for c in CASES] + [
    _kw((56, 56), 7, 3, dim=96, heads=3, attn_drop=0.1, proj_drop=0.2, drop_path=0.3),
    _kw((7, 7), 7, 3),
    _kw((3, 20), (4, 6), (2, 3)),
]


@pytest.mark.parametrize("kwargs", STRUCTURE_CASES)
def test_same_attributes_buffers_and_state_dict_as_timm(kwargs):
    ref = timm_swin.SwinTransformerBlock(**kwargs)
    mod = SwinTransformerBlock(**kwargs)
    for attr in ("dim", "input_resolution", "window_size", "shift_size", "target_shift_size", "window_area",
                 "always_partition", "dynamic_mask", "mlp_ratio"):
        assert getattr(mod, attr) == getattr(ref, attr), attr
    for attr in ("dim", "window_size", "window_area", "num_heads", "scale", "fused_attn"):
        assert getattr(mod.attn, attr) == getattr(ref.attn, attr), f"attn.{attr}"
    for name in ("norm1", "norm2", "drop_path1", "drop_path2", "mlp.act", "mlp.drop1", "mlp.norm", "mlp.drop2",
                 "attn.attn_drop", "attn.proj_drop", "attn.softmax"):
        a, b = mod.get_submodule(name), ref.get_submodule(name)
        assert type(a).__name__ == type(b).__name__, name
    assert mod.attn.attn_drop.p == ref.attn.attn_drop.p and mod.attn.proj_drop.p == ref.attn.proj_drop.p
    assert mod.mlp.drop1.p == ref.mlp.drop1.p and mod.mlp.drop2.p == ref.mlp.drop2.p
    if isinstance(ref.drop_path1, nn.Module) and hasattr(ref.drop_path1, "drop_prob"):
        assert mod.drop_path1.drop_prob == ref.drop_path1.drop_prob
        assert mod.drop_path1.extra_repr() == ref.drop_path1.extra_repr()
    # buffers: relative_position_index (non-persistent, equal); attn_mask non-persistent (vitkern keeps None)
    assert torch.equal(mod.attn.relative_position_index, ref.attn.relative_position_index)
    assert "attn_mask" in mod._buffers and mod.attn_mask is None
    assert mod._non_persistent_buffers_set == ref._non_persistent_buffers_set == {"attn_mask"}
    assert mod.attn._non_persistent_buffers_set == ref.attn._non_persistent_buffers_set
    # parameters and state_dict: same names, order and shapes; strict loading both ways
    assert [(n, p.shape) for n, p in mod.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert {k: v.shape for k, v in mod.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    _randomise(mod)
    ref.load_state_dict(mod.state_dict(), strict=True)
    mod2 = SwinTransformerBlock(**kwargs)
    mod2.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("kwargs,x_grid", [
    (_kw((14, 14), 7, 3), None), (_kw((10, 13), 7, 3), None), (_kw((5, 13), 7, 3), None),
    (_kw((10, 9), (6, 4), (3, 2)), None), (_kw((14, 14), 7, 0), None), (_kw((14, 14), 7, 3), (21, 14)),
])
def test_get_attn_mask_equals_timm(kwargs, x_grid):
    ref = timm_swin.SwinTransformerBlock(**kwargs).double()
    mod = SwinTransformerBlock(**kwargs).double()
    m_ref, m = ref.get_attn_mask(device="cpu", dtype=torch.float64), mod.get_attn_mask(device="cpu",
                                                                                      dtype=torch.float64)
    assert (m is None) == (m_ref is None) == (not any(ref.shift_size))
    if m is not None:
        assert torch.equal(m, m_ref) and m.dtype == m_ref.dtype
        assert torch.equal(m_ref, ref.attn_mask)
    if x_grid is not None:
        x = torch.zeros(1, *x_grid, 1, dtype=torch.float32)
        assert torch.equal(mod.get_attn_mask(x), ref.get_attn_mask(x))


def test_defaults_and_signature():
    assert_drop_in_signature(SwinTransformerBlock, timm_swin.SwinTransformerBlock, methods=())
    for method in ("forward", "set_input_size", "get_attn_mask"):
        assert (list(inspect.signature(getattr(SwinTransformerBlock, method)).parameters)
                == list(inspect.signature(getattr(timm_swin.SwinTransformerBlock, method)).parameters)), method
    assert_drop_in_signature(WindowAttention, timm_swin.WindowAttention)
    m = SwinTransformerBlock(96, (56, 56), 3, device="meta")
    r = timm_swin.SwinTransformerBlock(96, (56, 56), 3, device="meta")
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in r.state_dict().items()}
    assert m.attn.qkv.weight.is_meta and m.backend == "auto"


def test_block_calls_the_fused_op_on_the_qkv_grid(monkeypatch):
    """qkv Linear output (B, H, W, 3C) goes to ops.window_attention as is, with the block's effective
    window/shift, timm's scale, the table parameter and the qkv bias; in eval even with attn_drop > 0."""
    calls = []
    real = ops.window_attention

    def spy(qkv, table, **kw):
        calls.append((qkv, table, kw))
        return real(qkv, table, **kw)

    monkeypatch.setattr(ops, "window_attention", spy)
    mod = SwinTransformerBlock(16, (5, 13), num_heads=2, window_size=7, shift_size=3, attn_drop=0.2,
                               backend="torch").to(DEVICE).eval()
    qkv_out = []
    mod.attn.qkv.register_forward_hook(lambda m, i, o: qkv_out.append(o))
    mod(torch.randn(2, 5, 13, 16, device=DEVICE))
    ((qkv, table, kw),) = calls
    assert qkv is qkv_out[0] and qkv.shape == (2, 5, 13, 48)
    assert table is mod.attn.relative_position_bias_table
    assert kw == dict(num_heads=2, window_size=(5, 7), shift_size=(0, 3), scale=mod.attn.scale,
                      qkv_bias=mod.attn.qkv.bias, dropout_p=0.0, backend="torch")
    # training with attention dropout: the same fused op, with the dropout probability
    calls.clear()
    mod.train()(torch.randn(2, 5, 13, 16, device=DEVICE))
    assert len(calls) == 1 and calls[0][2]["dropout_p"] == 0.2


# ----------------------------------------------------------------------------- training
def _train_pair(backend, dtype, res=(10, 13), **extra):
    ref, mod = _pair(_kw(res, 7, 3, **extra), backend, dtype)
    ref.attn.fused_attn = False  # timm's unfused attention (its default): F.dropout on the probabilities
    return ref.train(), mod.train()


def _seeded_run(module, x, grad, seed):
    torch.manual_seed(seed)
    return _run(module, x, grad)


def test_attention_dropout_training_equals_timm_under_the_same_seed():
    """backend="torch": the reference drops timm's attn_drop elements in timm's order, so the same seed
    gives the same masks (attention, drop_path) -> same output and gradients. (proj_drop, also the mlp's
    dropout, stays 0: it is drawn on the grid, not on timm's padded windows, so its numbers differ.)"""
    ref, mod = _train_pair("torch", HIGH, attn_drop=0.3, drop_path=0.5)
    x = torch.randn(4, 10, 13, 16, dtype=HIGH, device=DEVICE)
    grad = torch.randn_like(x)
    out_ref, g_ref = _seeded_run(ref, x, grad, 5)
    out, g = _seeded_run(mod, x, grad, 5)
    _assert_all_close(out, g, out_ref, g_ref)
    out2, _ = _seeded_run(mod, x, grad, 6)
    assert not torch.allclose(out, out2)  # dropout is live
    mod.eval(), ref.eval()
    assert_close("eval output", mod(x), ref(x))


def test_attention_dropout_training_runs_the_fused_kernels(monkeypatch):
    """backend="triton", training, attn_drop > 0: the kernels' dropout; equals the block whose attention is
    the float64 reference with the kernels' mask (forward and every gradient)."""
    kwargs = _kw((10, 13), 7, 3, attn_drop=0.3)
    ref, mod = _pair(kwargs, "triton", torch.float32)
    hi = SwinTransformerBlock(**kwargs, backend="torch").to(DEVICE, HIGH)
    hi.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 10, 13, 16, dtype=HIGH, device=DEVICE)
    grad = torch.randn_like(x)
    with poison_outputs():
        out, g = _seeded_run(mod.train(), x.to(torch.float32), grad, 11)
    torch.manual_seed(11)  # the op's seed is the block's first random draw (no proj_drop, no drop_path)
    seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())
    mask = window_dropout_keep_mask(seed, 2, (10, 13), 2, (7, 7), 0.3, device=DEVICE).to(HIGH)

    def with_mask(qkv, table, *, dropout_p, backend, **kw):
        assert dropout_p == 0.3
        return window_attention_reference(qkv, table, dropout_mask=mask, **kw)

    monkeypatch.setattr(ops, "window_attention", with_mask)
    out_ref, g_ref = _run(hi.train(), x, grad)
    _assert_all_close(out, g, out_ref, g_ref)
    monkeypatch.undo()
    mod.eval()
    assert not torch.allclose(out, mod(x.to(torch.float32)))  # dropout was live


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_empty_batch_empty_in_empty_out(backend, dtype):
    """B = 0: an empty output and empty / zero gradients (timm raises a reshape error here)."""
    ref, mod = _pair(_kw((10, 13), 7, 3), backend, dtype)
    x = torch.randn(0, 10, 13, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="reshape"):
        ref(x.detach().to(HIGH))
    out = mod(x)
    assert out.shape == (0, 10, 13, 16) and out.dtype == dtype
    out.backward(torch.randn_like(out))
    assert x.grad.shape == x.shape
    for name, p in mod.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_drop_path_training_uses_the_fused_op_and_equals_timm(backend, dtype):
    """attn_drop == 0: the fused op runs in training too; DropPath draws as timm's."""
    ref, mod = _train_pair(backend, dtype, res=(7, 9), drop_path=0.5)
    x = torch.randn(4, 7, 9, 16, dtype=HIGH, device=DEVICE)
    grad = torch.randn_like(x)
    out_ref, g_ref = _seeded_run(ref, x, grad, 3)
    out, g = _seeded_run(mod, x.to(dtype), grad, 3)
    _assert_all_close(out, g, out_ref, g_ref)
    ref.eval()
    assert not torch.allclose(out_ref, ref(x))  # some samples were dropped / rescaled


def test_proj_drop_training_is_live_and_reproducible():
    """proj_drop with the fused op: dropout on the grid (timm drops per window: same law, other layout)."""
    _, mod = _train_pair("torch", HIGH, proj_drop=0.3)
    x = torch.randn(2, 10, 13, 16, dtype=HIGH, device=DEVICE)
    torch.manual_seed(1)
    a = mod(x)
    torch.manual_seed(1)
    assert torch.equal(a, mod(x))
    assert not torch.allclose(a, mod.eval()(x))


# ----------------------------------------------------------------------------- bad input
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"dim=30 must be divisible by num_heads=4.*head_dim"):
        SwinTransformerBlock(30, (14, 14), num_heads=4)
    assert SwinTransformerBlock(30, (14, 14), num_heads=4, head_dim=7).attn.qkv.out_features == 84  # timm's layout
    with pytest.raises(ValueError, match=r"shift_size must satisfy 0 <= shift_size < window_size.*\(7, 7\)"):
        SwinTransformerBlock(16, (14, 14), num_heads=2, window_size=7, shift_size=7)
    with pytest.raises(ValueError, match=r"shift_size must satisfy.*\(3, 9\)"):
        SwinTransformerBlock(16, (14, 14), num_heads=2, window_size=7, shift_size=(3, 9))
    with pytest.raises(ValueError, match="shift_size must be an int or an .* pair of ints >= 0, got -1"):
        SwinTransformerBlock(16, (14, 14), num_heads=2, shift_size=-1)
    with pytest.raises(ValueError, match="window_size must be an int or an .* pair of positive ints, got 0"):
        SwinTransformerBlock(16, (14, 14), num_heads=2, window_size=0)
    with pytest.raises(ValueError, match="input_resolution must be an int or an .* got \\(14, 14, 3\\)"):
        SwinTransformerBlock(16, (14, 14, 3), num_heads=2)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        SwinTransformerBlock(16, (14, 14), num_heads=0)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'flash'"):
        SwinTransformerBlock(16, (14, 14), num_heads=2, backend="flash")
    # a grid no larger than the window is not shifted, so a large shift is fine there (as in timm)
    assert SwinTransformerBlock(16, (5, 5), num_heads=2, window_size=7, shift_size=7).shift_size == (0, 0)
    # set_input_size validates too, and leaves the block unchanged when it raises
    blk = SwinTransformerBlock(16, (14, 14), num_heads=2, window_size=7, shift_size=3)
    with pytest.raises(ValueError, match="feat_size must be an int or an"):
        blk.set_input_size((14,), (7, 7))
    with pytest.raises(ValueError, match="window_size must be an int or an .* got \\(0, 7\\)"):
        blk.set_input_size((14, 14), (0, 7))
    assert (blk.input_resolution, blk.window_size, blk.shift_size) == ((14, 14), (7, 7), (3, 3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(backend):
    mod = SwinTransformerBlock(16, (14, 14), num_heads=2, window_size=7, shift_size=3, backend=backend).to(DEVICE)
    with pytest.raises(ValueError, match=r"4-D \(B, H, W, C\), got shape \(2, 196, 16\)"):
        mod(torch.randn(2, 196, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"x has 8 channels .*dim=16"):
        mod(torch.randn(2, 14, 14, 8, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mod([[1.0] * 16])
    with pytest.raises(ValueError, match=r"21x14 token grid .*input_resolution=\(14, 14\).*dynamic_mask=True"):
        mod(torch.randn(2, 21, 14, 16, device=DEVICE))


def test_grid_mismatch_is_an_error_where_timm_fails_or_is_silently_wrong():
    """With a shift and dynamic_mask=False timm uses the mask of input_resolution (8 windows here). A grid
    with 12 windows breaks timm for batch 1 but runs with a batch of 2 (24 = 3 x 8 windows), and a transposed
    grid (8 windows) always runs: both with the wrong mask. vitkern raises in every such case."""
    kwargs = _kw((14, 28), 7, 3)
    ref = _randomise(timm_swin.SwinTransformerBlock(**kwargs).double()).eval()
    mod = SwinTransformerBlock(**kwargs, backend="torch").double().eval()
    mod.load_state_dict(ref.state_dict())
    with pytest.raises(RuntimeError):
        ref(torch.randn(1, 21, 28, 16, dtype=torch.float64))
    assert ref(torch.randn(2, 21, 28, 16, dtype=torch.float64)).shape == (2, 21, 28, 16)
    for batch in (1, 2):
        with pytest.raises(ValueError, match="input_resolution"):
            mod(torch.randn(batch, 21, 28, 16, dtype=torch.float64))
    x = torch.randn(2, 28, 14, 16, dtype=torch.float64)
    stale = ref(x)
    dyn = _randomise(timm_swin.SwinTransformerBlock(**kwargs, dynamic_mask=True).double()).eval()
    dyn.load_state_dict(ref.state_dict())
    assert not torch.allclose(stale, dyn(x))  # timm's stale mask gives a different (wrong) answer
    with pytest.raises(ValueError, match="28x14 token grid"):
        mod(x)
    mod.set_input_size((28, 14), (7, 7))
    assert_close("after set_input_size", mod(x), dyn(x))


def test_imports_without_timm_window_change_needs_it(monkeypatch):
    """vitkern's block needs timm only to resample the bias table for a new window."""
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("no timm here")
        return real_import(name, *args, **kwargs)

    blk = SwinTransformerBlock(16, (14, 14), num_heads=2, window_size=7, shift_size=3)
    monkeypatch.setattr(builtins, "__import__", no_timm)
    blk.set_input_size((10, 13), (7, 7))  # same window: no timm needed
    with pytest.raises(ImportError, match="resize_rel_pos_bias_table.*pip install timm"):
        blk.set_input_size((10, 13), (5, 5))


def test_drop_path_module_matches_timm():
    from timm.layers import DropPath as TimmDropPath

    x = torch.randn(8, 3, 4)
    a, b = DropPath(0.4).train(), TimmDropPath(0.4).train()
    torch.manual_seed(2)
    ya = a(x)
    torch.manual_seed(2)
    assert torch.equal(ya, b(x))
    assert torch.equal(a.eval()(x), x)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_compile_fullgraph_matches_eager(backend, dtype):
    """No graph break through the input checks, the op (custom op for triton) forward and backward."""
    kwargs = _kw((10, 13), 7, 3)
    _, mod = _pair(kwargs, backend, dtype)
    x = torch.randn(1, 10, 13, 16, dtype=dtype, device=DEVICE)
    grad = torch.randn_like(x)
    out_eager, g_eager = _run(mod, x, grad)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out_c, g_c = _run(compiled, x, grad)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_c, out_eager, **tol)
    assert g_c.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_c[name], g_eager[name], **tol, msg=name)


# ----------------------------------------------------------------------------- WindowAttention's windows API
@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_window_attention_windows_interface_matches_timm(backend, dtype, with_mask):
    """WindowAttention.forward on already-partitioned windows (timm's interface) runs the fused
    attention op and equals timm's WindowAttention, with and without a shift mask."""
    torch.manual_seed(3)
    win, heads, dim, B, nW = (3, 4), 2, 16, 2, 3
    ref = _randomise(timm_swin.WindowAttention(dim, heads, window_size=win).to(DEVICE, HIGH)).eval()
    mod = WindowAttention(dim, heads, window_size=win, backend=backend).to(DEVICE, dtype).eval()
    mod.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(B * nW, win[0] * win[1], dim, device=DEVICE, dtype=HIGH)
    mask = None
    if with_mask:  # timm's shift mask: 0 or -100 per window pair
        mask = torch.where(torch.rand(nW, x.shape[1], x.shape[1], device=DEVICE) < 0.3, -100.0, 0.0).to(HIGH)
    out_ref = ref(x, mask)
    grad = torch.randn_like(out_ref)
    xr = x.clone().requires_grad_(True)
    ref(xr, mask).backward(grad)
    g_ref = {"x": xr.grad, **{n: p.grad for n, p in ref.named_parameters()}}
    xm = x.to(dtype).requires_grad_(True)
    out = mod(xm, None if mask is None else mask.to(dtype))
    out.backward(grad.to(dtype))
    g = {"x": xm.grad, **{n: p.grad for n, p in mod.named_parameters()}}
    _assert_all_close(out, g, out_ref, g_ref)


def test_window_attention_windows_interface_bad_input():
    mod = WindowAttention(16, 2, window_size=3)
    with pytest.raises(ValueError, match=r"x must be \(B\*nW, N=9, C=16\) windows, got shape \(2, 8, 16\)"):
        mod(torch.randn(2, 8, 16))
    with pytest.raises(ValueError, match=r"mask must be \(nW, 9, 9\) with B\*nW=4 a multiple of nW"):
        mod(torch.randn(4, 9, 16), torch.zeros(3, 9, 9))
