"""vitkern.ops.window_attention (Triton) against vitkern.reference.window_attention_reference.

The reference itself is proven equal to timm's SwinTransformerBlock in
tests/test_reference_timm.py. CPU: Triton's interpreter, fp32 and fp16, tiny grids.
GPU: the same plus bf16 and Swin-T stage shapes.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import vitkern
from vitkern.backends import BackendUnavailableError
from vitkern.ops import window_attention
from vitkern.ops.window_attention import window_dropout_keep_mask
from vitkern.reference import window_attention_reference
from vitkern.testing import poison_outputs

from helpers import FP32_RTOL, TF32_RTOL, assert_close, nan_padded, rel_err, use_gpu_tiles

wa = importlib.import_module("vitkern.ops.window_attention")  # the module (vitkern.ops.window_attention is the op)
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HIGH = torch.float32 if ON_GPU else torch.float64
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# (B, H, W, C, heads, window, shift, with qkv bias)
CASES = [
    pytest.param(2, 14, 14, 32, 2, 7, 0, True, id="14x14-w7-s0"),
    pytest.param(1, 14, 14, 64, 2, 7, 3, True, id="14x14-w7-s3-d32"),
    pytest.param(1, 10, 13, 32, 2, 7, 3, True, id="10x13-w7-s3-padded"),
    pytest.param(1, 13, 17, 64, 1, 12, 6, True, id="13x17-w12-s6-d64"),
    pytest.param(2, 5, 13, 32, 2, (5, 7), (0, 3), True, id="small-grid-5x13"),
    pytest.param(1, 10, 13, 32, 2, 7, 3, False, id="no-qkv-bias"),
    pytest.param(1, 9, 9, 16, 1, (3, 4), (1, 2), True, id="rect-window"),
    pytest.param(1, 16, 20, 32, 1, 8, 4, True, id="16x20-w8-s4"),
    pytest.param(1, 16, 20, 32, 1, 16, 8, True, id="16x20-w16-s8"),
]


def _inputs(B, H, W, C, heads, window, shift, with_bias, dtype, cosine=False):
    """cosine: Swin V2's logit_scale too (True: in ``dtype``; a dtype: in that one)."""
    mh, mw = (window, window) if isinstance(window, int) else window
    ins = dict(
        qkv=torch.randn(B, H, W, 3 * C, device=DEVICE).to(dtype),
        table=torch.randn((2 * mh - 1) * (2 * mw - 1), heads, device=DEVICE).to(dtype),
        qkv_bias=torch.randn(3 * C, device=DEVICE).to(dtype) if with_bias else None,
    )
    if cosine:  # raw logit scales from 1 to 5.5: the last head is above the clamp (log 100)
        scales = torch.linspace(1.0, 5.5, heads, device=DEVICE) + 0.1 * torch.rand(heads, device=DEVICE)
        ins["logit_scale"] = scales.to(dtype if cosine is True else cosine)
    return ins


def _run(fn, ins, heads, window, shift, grad_out, **kw):
    if ins.get("logit_scale") is not None:
        kw["logit_scale"] = ins["logit_scale"]
    out = fn(ins["qkv"], ins["table"], num_heads=heads, window_size=window, shift_size=shift,
             qkv_bias=ins["qkv_bias"], **kw)
    names = [n for n in ("qkv", "table", "qkv_bias", "logit_scale") if ins.get(n) is not None]
    grads = torch.autograd.grad(out, [ins[n] for n in names], grad_out, allow_unused=True)
    # An unpadded grid never reads qkv_bias: its true gradient is zero.
    return out, {n: (torch.zeros_like(ins[n]) if g is None else g) for n, g in zip(names, grads)}


def _triton(*args, **kw):
    return window_attention(*args, backend="triton", **kw)


def _leaves(base, dtype=None, pad=False):
    out = {}
    for n, t in base.items():
        if t is None:
            out[n] = None
            continue
        t = t.detach() if dtype is None else t.detach().to(dtype)
        out[n] = (nan_padded(t) if pad else t.clone()).requires_grad_(True)
    return out


def _check(B, H, W, C, heads, window, shift, with_bias, dtype, cosine=False, **kw):
    base = _inputs(B, H, W, C, heads, window, shift, with_bias, dtype, cosine)
    grad_out = torch.randn(B, H, W, C, device=DEVICE).to(dtype)
    # NaN around every input catches out-of-bounds reads; poisoned outputs catch unwritten elements.
    with poison_outputs():
        out, grads = _run(_triton, _leaves(base, pad=True), heads, window, shift, grad_out, **kw)
    ref_out, ref_grads = _run(window_attention_reference, _leaves(base, HIGH), heads, window, shift,
                              grad_out.to(HIGH), **kw)
    same_out, same_grads = (None, {}) if dtype == torch.float32 else \
        _run(window_attention_reference, _leaves(base), heads, window, shift, grad_out, **kw)
    assert out.shape == (B, H, W, C) and out.dtype == dtype
    assert_close("out", out, ref_out, same_out)
    for name in grads:
        if name == "qkv_bias" and ref_grads[name].abs().max() < 1e-20:
            # No padding, or padding tokens only behind the -100 shift mask (weights ~exp(-100)):
            # the true gradient is (numerically) zero, below fp32's normal range.
            assert grads[name].float().abs().max() < 1e-20, "qkv_bias got a gradient it should not have"
            continue
        assert_close(f"d{name}", grads[name], ref_grads[name], same_grads.get(name), grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,W,C,heads,window,shift,with_bias", CASES)
def test_forward_and_every_gradient_match_reference(B, H, W, C, heads, window, shift, with_bias, dtype):
    _check(B, H, W, C, heads, window, shift, with_bias, dtype)


def _gpu_tiles(n_tok):
    """The launchers' GPU tiles (query block, key block), which the interpreter replaces by one tile."""
    return wa._tile(n_tok), wa._tile(n_tok)


def test_gpu_tiling_path_with_several_blocks_per_window(monkeypatch):
    """On the GPU, windows span several query and key blocks (e.g. 144 tokens in 16s); force it here."""
    monkeypatch.setattr(wa, "_tiles", _gpu_tiles)
    assert _gpu_tiles(4 * 9) == (16, 16)  # 36 tokens: three 16-token blocks each way
    _check(1, 6, 11, 32, 2, (4, 9), (2, 4), True, torch.float32)


def test_minus_inf_shift_mask_with_key_blocks_wholly_masked(monkeypatch):
    """mask_value=-inf with several key blocks per window: in the bottom windows the first 16-token key
    block (window rows 0-1, grid rows 4-5) is all in another region than the queries of window row 2
    (grid row 6, inside the 7-row grid), so their running max is still -inf after it. The online
    softmax must not turn that into exp2(-inf - -inf) = NaN."""
    monkeypatch.setattr(wa, "_tiles", _gpu_tiles)
    _check(1, 7, 11, 32, 2, (4, 9), (2, 4), True, torch.float32, mask_value=float("-inf"))


@pytest.mark.parametrize("tiles", ["one-tile", "gpu-tiles"])
def test_rows_with_every_key_masked_give_zeros(tiles, monkeypatch):
    """A -inf relative-position bias masks every key of every query of one head (what the public op
    lets a row reach: a row always sees its own token through the shift mask). As attention gives
    (SDPA's rule), that head's outputs are 0 and its gradients 0, not NaN; the other head, which the
    float64 reference still computes, is unaffected."""
    if tiles == "gpu-tiles":
        monkeypatch.setattr(wa, "_tiles", _gpu_tiles)
    B, H, W, C, heads, window, shift = 1, 6, 11, 32, 2, (4, 9), (2, 4)
    d = C // heads
    base = _inputs(B, H, W, C, heads, window, shift, True, torch.float32)
    base["table"][:, 1] = float("-inf")
    grad_out = torch.randn(B, H, W, C, device=DEVICE)
    with poison_outputs():
        out, grads = _run(_triton, _leaves(base, pad=True), heads, window, shift, grad_out)
    finite = dict(base, table=base["table"].clone())
    finite["table"][:, 1] = 0.0  # the reference's softmax of an all -inf row is NaN; head 1 is not compared
    ref_out, ref_grads = _run(window_attention_reference, _leaves(finite, HIGH), heads, window, shift,
                              grad_out.to(HIGH))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    head0 = torch.cat([torch.arange(d) + i * C for i in range(3)])  # head 0's q, k, v channels
    head1 = head0 + d
    assert not out[..., d:].any() and not grads["qkv"][..., head1].any()
    assert not grads["table"][:, 1].any() and not grads["qkv_bias"][head1].any()
    assert_close("out", out[..., :d], ref_out[..., :d])
    assert_close("dqkv", grads["qkv"][..., head0], ref_grads["qkv"][..., head0], grad=True)
    assert_close("dtable", grads["table"][:, 0], ref_grads["table"][:, 0], grad=True)
    assert_close("dqkv_bias", grads["qkv_bias"][head0], ref_grads["qkv_bias"][head0], grad=True)


def test_tile_choice_wastes_least():
    assert wa._tile(49) == 64 and wa._tile(64) == 64 and wa._tile(144) == 16 and wa._tile(256) == 64


def test_expanded_upstream_gradient_from_sum():
    base = _inputs(1, 10, 13, 32, 2, 7, 3, True, torch.float32)
    kin, rin = _leaves(base), _leaves(base, HIGH)
    window_attention(kin["qkv"], kin["table"], num_heads=2, window_size=7, shift_size=3, qkv_bias=kin["qkv_bias"],
                     backend="triton").sum().backward()
    window_attention_reference(rin["qkv"], rin["table"], num_heads=2, window_size=7, shift_size=3,
                               qkv_bias=rin["qkv_bias"]).sum().backward()
    for name in base:
        assert_close(f"d{name}", kin[name].grad, rin[name].grad, grad=True)


def test_deterministic_bit_for_bit():
    base = _inputs(2, 10, 13, 32, 2, 7, 3, True, torch.float32)
    g = torch.randn(2, 10, 13, 32, device=DEVICE)
    runs = [_run(_triton, _leaves(base), 2, 7, 3, g) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("grid,C,heads,window,shift", [
    ((56, 56), 96, 3, 7, 3), ((28, 28), 192, 6, 7, 0), ((7, 7), 768, 24, 7, 0), ((24, 24), 256, 8, 12, 6),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_swin_stage_shapes_on_gpu(grid, C, heads, window, shift, dtype):
    _check(8, grid[0], grid[1], C, heads, window, shift, True, dtype)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def _ok():
    return dict(qkv=torch.randn(1, 14, 14, 96), table=torch.randn(169, 2), qkv_bias=torch.randn(96))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change,kw,match", [
    (lambda a: a.update(qkv=torch.randn(14, 14, 96)), {}, r"qkv must be a 4-D tensor"),
    (lambda a: a.update(qkv=torch.randn(1, 14, 14, 95)), {}, r"last dimension must be 3C"),
    (lambda a: None, {"num_heads": 5}, r"num_heads must be a positive divisor of C=32"),
    (lambda a: None, {"shift_size": 7}, r"shift_size must satisfy 0 <= shift < window_size"),
    (lambda a: a.update(table=torch.randn(168, 2)), {}, r"rel_pos_bias_table must have shape .* \(169, 2\)"),
    (lambda a: a.update(qkv_bias=torch.randn(95)), {}, r"qkv_bias must have shape \(96,\)"),
    (lambda a: a.update(table=torch.randn(169, 2, device="meta")), {}, r"rel_pos_bias_table is on meta"),
    (lambda a: a.update(qkv=torch.randint(0, 3, (1, 14, 14, 96))), {}, r"qkv.dtype must be one of"),
    (lambda a: None, {"window_size": "7"}, r"window_attention: window_size must be an int or an \(h, w\) pair of ints, got '7'"),
    (lambda a: a.update(qkv=torch.randn(1, 0, 14, 96)), {}, r"token grid \(H, W\) must be non-empty"),
    (lambda a: a.update(table=torch.randn(169, 2, dtype=torch.float64)), {},
     r"rel_pos_bias_table.dtype must be qkv.dtype \(torch.float32\), got torch.float64"),
    (lambda a: a.update(qkv=torch.randn(1, 14, 14, 96, dtype=torch.float16)), {},
     r"rel_pos_bias_table.dtype must be qkv.dtype \(torch.float16\), got torch.float32"),
    (lambda a: None, {"dropout_p": 1.0}, r"dropout_p must be a float in \[0, 1\), got 1.0"),
    (lambda a: None, {"logit_scale": torch.zeros(3)},
     r"logit_scale must have shape \(num_heads,\) = \(2,\) or \(num_heads, 1, 1\) = \(2, 1, 1\), got \(3,\)"),
    (lambda a: None, {"logit_scale": torch.zeros(2, dtype=torch.int64)},
     r"logit_scale must be floating point, got torch.int64"),
    (lambda a: None, {"logit_scale": torch.zeros(2, device="meta")}, r"logit_scale is on meta but qkv is on cpu"),
    (lambda a: None, {"logit_scale": torch.zeros(2), "scale": 0.5}, r"scale must be None with logit_scale"),
    (lambda a: None, {"logit_scale": [1.0, 2.0]}, r"logit_scale must be a tensor or None, got list"),
])
def test_bad_input_raises_clear_error(change, kw, match, backend):
    args = _ok()
    change(args)
    params = dict(num_heads=2, window_size=7, shift_size=3)
    params.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        window_attention(args["qkv"], args["table"], qkv_bias=args["qkv_bias"], backend=backend, **params)


def test_forced_backend_that_cannot_run_says_why():
    args = _ok()
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run this call: vitkern._C"):
        window_attention(args["qkv"], args["table"], num_heads=2, window_size=7, backend="cuda")
    dbl = {n: t.double() for n, t in args.items()}
    with pytest.raises(BackendUnavailableError, match=r"float32, float16 or bfloat16, got torch.float64"):
        window_attention(dbl["qkv"], dbl["table"], num_heads=2, window_size=7, backend="triton")
    out = window_attention(dbl["qkv"], dbl["table"], num_heads=2, window_size=7)  # auto: the reference
    assert out.dtype == torch.float64
    reasons = vitkern.backends.explain("window_attention", args["qkv"], args["table"], num_heads=2, window_size=7)
    assert reasons["torch"] is None and reasons["cuda"]


# --------------------------------------------------------------------------- #
# torch.library registration
# --------------------------------------------------------------------------- #
def test_custom_ops_pass_opcheck():
    base = _leaves(_inputs(1, 10, 13, 32, 2, 7, 3, True, torch.float32))
    torch.library.opcheck(torch.ops.vitkern.window_attention_fwd.default,
                          (base["qkv"], base["table"], base["qkv_bias"], 2, [7, 7], [3, 3], 0.25, -100.0))
    torch.library.opcheck(torch.ops.vitkern.window_attention_fwd.default,
                          (base["qkv"], base["table"], None, 2, [7, 7], [0, 0], 0.25, -100.0))
    seed = torch.tensor([1234], dtype=torch.int64)
    torch.library.opcheck(torch.ops.vitkern.window_attention_fwd.default,
                          (base["qkv"], base["table"], base["qkv_bias"], 2, [7, 7], [3, 3], 0.25, -100.0, 0.2, seed))
    empty = _leaves(_inputs(0, 10, 13, 32, 2, 7, 3, True, torch.float32))
    torch.library.opcheck(torch.ops.vitkern.window_attention_fwd.default,
                          (empty["qkv"], empty["table"], empty["qkv_bias"], 2, [7, 7], [3, 3], 0.25, -100.0))


def test_torch_compile_fullgraph_forward_and_backward():
    base = _inputs(1, 10, 13, 32, 2, 7, 3, True, torch.float32)
    g = torch.randn(1, 10, 13, 32, device=DEVICE)
    compiled = torch.compile(_triton, fullgraph=True, backend="aot_eager")
    eager = _run(_triton, _leaves(base), 2, 7, 3, g)
    comp = _run(compiled, _leaves(base), 2, 7, 3, g)
    assert torch.equal(eager[0], comp[0])
    for name in eager[1]:
        assert torch.equal(eager[1][name], comp[1][name]), name


def test_flop_counter_counts_the_custom_ops_on_meta():
    from torch.utils.flop_counter import FlopCounterMode

    qkv = torch.randn(4, 56, 56, 3 * 96, device="meta", requires_grad=True)
    table = torch.randn(169, 3, device="meta")
    with FlopCounterMode(display=False) as counter:
        out, _ = torch.ops.vitkern.window_attention_fwd(qkv, table, None, 3, [7, 7], [3, 3], 32 ** -0.5, -100.0)
    per = 4 * 64 * 49 * 49 * 96  # images x windows x n^2 x C
    assert counter.get_total_flops() == 4 * per
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    assert counter.get_total_flops() == 10 * per


# --------------------------------------------------------------------------- #
# Regressions: int64 offsets, strided qkv_bias, empty batches, padding-gradient buffer
# --------------------------------------------------------------------------- #
def _compare(ins, heads, window, shift, grad_out):
    """Triton vs the float64 reference on these leaves (forward and every gradient)."""
    out, grads = _run(_triton, ins, heads, window, shift, grad_out)
    hi = {n: (None if t is None else t.detach().to(HIGH).requires_grad_(True)) for n, t in ins.items()}
    ref_out, ref_grads = _run(window_attention_reference, hi, heads, window, shift, grad_out.to(HIGH))
    assert_close("out", out, ref_out)
    for name in grads:
        assert_close(f"d{name}", grads[name], ref_grads[name], grad=True)


def test_int64_offsets_image_stride_past_int32():
    """Image 2's offset 2 * s_b passes 2**31 although s_b itself fits in int32 (Triton passes it as i32):
    every address (the table-gradient kernel's image loop included) must be computed in int64."""
    B, H, W, C, heads = 3, 4, 6, 16, 1
    s_b = 2**30 + 1024
    storage = torch.empty(2 * s_b + H * W * 3 * C, device=DEVICE)  # untouched pages: ~no memory
    qkv = storage.as_strided((B, H, W, 3 * C), (s_b, W * 3 * C, 3 * C, 1))
    with torch.no_grad():
        qkv.copy_(torch.randn(B, H, W, 3 * C, device=DEVICE))
    ins = dict(qkv=qkv.requires_grad_(True), table=torch.randn(49, heads, device=DEVICE).requires_grad_(True),
               qkv_bias=torch.randn(3 * C, device=DEVICE).requires_grad_(True))
    _compare(ins, heads, 4, 0, torch.randn(B, H, W, C, device=DEVICE))  # no shift: padding keys count


@pytest.mark.parametrize("layout", ["stride-2", "expanded"])
def test_strided_and_expanded_qkv_bias(layout):
    """qkv_bias is read through its strides (here with NaN wherever a dense read would land)."""
    B, H, W, C, heads = 1, 9, 10, 32, 2
    if layout == "stride-2":
        buf = torch.full((2 * 3 * C,), float("nan"), device=DEVICE)
        buf[::2] = torch.randn(3 * C, device=DEVICE)
        leaf = buf[::2].requires_grad_(True)
        qkv_bias = leaf
    else:
        buf = torch.full((3 * C,), float("nan"), device=DEVICE)
        buf[0] = torch.randn(())
        leaf = buf[:1].requires_grad_(True)
        qkv_bias = leaf.expand(3 * C)  # stride 0
    qkv = torch.randn(B, H, W, 3 * C, device=DEVICE, requires_grad=True)
    table = torch.randn(169, heads, device=DEVICE, requires_grad=True)
    g = torch.randn(B, H, W, C, device=DEVICE)
    out = _triton(qkv, table, num_heads=heads, window_size=7, shift_size=3, qkv_bias=qkv_bias)
    grads = torch.autograd.grad(out, [qkv, table, leaf], g)
    hi = [t.detach().to(HIGH).requires_grad_(True) for t in (qkv, table, leaf)]
    hi_bias = hi[2] if layout == "stride-2" else hi[2].expand(3 * C)
    ref = window_attention_reference(hi[0], hi[1], num_heads=heads, window_size=7, shift_size=3, qkv_bias=hi_bias)
    assert_close("out", out, ref)
    for name, a, r in zip(["dqkv", "dtable", "dqkv_bias"], grads, torch.autograd.grad(ref, hi, g.to(HIGH))):
        assert_close(name, a, r, grad=True)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError(f"a kernel was launched for an empty batch (grid {grid})")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_empty_in_empty_out(backend, monkeypatch):
    for name in dir(wa):
        if name.endswith("_kernel"):
            monkeypatch.setattr(wa, name, _NoLaunch())
    ins = _leaves(_inputs(0, 10, 13, 32, 2, 7, 3, True, torch.float32))
    out = window_attention(ins["qkv"], ins["table"], num_heads=2, window_size=7, shift_size=3,
                           qkv_bias=ins["qkv_bias"], backend=backend)
    assert out.shape == (0, 10, 13, 32) and out.dtype == torch.float32
    out.backward(torch.randn_like(out))
    assert ins["qkv"].grad.shape == (0, 10, 13, 96)
    for name in ("table", "qkv_bias"):  # no image: no gradient, as the reference's autograd says
        assert ins[name].grad.shape == ins[name].shape and not ins[name].grad.any(), name


@pytest.mark.parametrize("B,H,W", [
    pytest.param(2, 9, 14, id="rows-padded"), pytest.param(2, 14, 9, id="cols-padded"),
    pytest.param(2, 9, 10, id="both-padded"), pytest.param(2, 14, 14, id="unpadded"),
    pytest.param(2, 16, 18, id="one-padded-column-of-windows"),
])
def test_qkv_bias_gradient_from_padding_windows(B, H, W):
    """d(qkv_bias) is summed over the padded windows only (every other window has no padding token)."""
    window = 4 if (H, W) == (16, 18) else 7
    _check(B, H, W, 32, 2, window, window // 2, True, torch.float32)


def test_padding_gradient_buffer_holds_padded_windows_only(monkeypatch):
    g = wa._Geometry(torch.empty(2, 16, 18, 96, device="meta"), 2, (4, 4), (2, 2))
    key_blocks = math.ceil(g.n_tok / g.block_n)
    shapes = []
    real = wa.new_output

    def spy(shape, **kw):
        shapes.append(tuple(shape))
        return real(shape, **kw)

    monkeypatch.setattr(wa, "new_output", spy)
    zeros = torch.zeros

    def zeros_spy(*a, **kw):  # the buffer was once zero-filled with torch.zeros
        if a and isinstance(a[0], (tuple, list)):
            shapes.append(tuple(a[0]))
        return zeros(*a, **kw)

    monkeypatch.setattr(torch, "zeros", zeros_spy)
    ins = _leaves(_inputs(2, 16, 18, 32, 2, 4, 2, True, torch.float32))
    _run(_triton, ins, 2, 4, 2, torch.randn(2, 16, 18, 32, device=DEVICE))
    slots = [s for s in shapes if len(s) == 3 and s[1:] == (2, g.block_d)]
    # 4 x 5 windows; only the last column pads (18 -> 20): 4 padded windows x 2 images x 2 heads
    assert slots == [(2 * 4 * 2 * key_blocks, 2, g.block_d)], shapes
    assert (g.n_win, g.pad_windows) == (20, 4)
    # Swin-T stage 1 at 1536 px, B = 64: 55 x 55 windows of which 109 hold padding (was a slot for all
    # 3025: 149 MB of fp32, now 5.4 MB).
    big = wa._Geometry(torch.empty(64, 384, 384, 3 * 96, device="meta"), 3, (7, 7), (3, 3))
    assert (big.n_win, big.pad_windows) == (3025, 109)


# --------------------------------------------------------------------------- #
# Attention dropout: in-kernel random numbers, as the attention kernels'
# --------------------------------------------------------------------------- #
def _seed_after(manual_seed: int) -> int:
    torch.manual_seed(manual_seed)  # the op draws its seed from torch's default generator
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())


@pytest.mark.parametrize("cosine", [False, True], ids=["dot", "cosine"])
@pytest.mark.parametrize("tiles", ["one-tile", "gpu-tiles"])
def test_dropout_equals_reference_with_the_kernels_mask(tiles, cosine, monkeypatch):
    """Forward and every gradient equal the reference that applies the kernels' mask: the forward
    and all backward kernels (dQ, dK/dV, table gradient) draw the same numbers."""
    if tiles == "gpu-tiles":  # several query and key blocks per window: block offsets enter the draws
        monkeypatch.setattr(wa, "_tiles", _gpu_tiles)
    B, H, W, C, heads, window, shift, p = 2, 6, 11, 32, 2, (4, 9), (2, 4), 0.3
    base = _inputs(B, H, W, C, heads, window, shift, True, torch.float32, cosine)
    g = torch.randn(B, H, W, C, device=DEVICE)
    kin = _leaves(base, pad=True)
    torch.manual_seed(1234)
    with poison_outputs():
        out, grads = _run(_triton, kin, heads, window, shift, g, dropout_p=p)
    mask = window_dropout_keep_mask(_seed_after(1234), B, (H, W), heads, window, p, device=DEVICE).to(HIGH)
    torch.testing.assert_close(mask.unique(), torch.tensor([0.0, 1 / (1 - p)], dtype=HIGH, device=DEVICE))
    ref_out, ref_grads = _run(window_attention_reference, _leaves(base, HIGH), heads, window, shift, g.to(HIGH),
                              dropout_mask=mask)
    assert_close("out", out, ref_out)
    for name in grads:
        assert_close(f"d{name}", grads[name], ref_grads[name], grad=True)
    no_drop = _run(window_attention_reference, _leaves(base, HIGH), heads, window, shift, g.to(HIGH))[0]
    assert (out - no_drop).abs().max() > 0.1  # dropout is live


def test_dropout_reproducible_under_seed_and_varies_without():
    base = _inputs(1, 9, 10, 32, 2, 7, 3, True, torch.float32)
    run = lambda: _triton(base["qkv"], base["table"], num_heads=2, window_size=7, shift_size=3,  # noqa: E731
                          qkv_bias=base["qkv_bias"], dropout_p=0.5)
    torch.manual_seed(7)
    a = run()
    torch.manual_seed(7)
    b = run()
    c = run()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_window_dropout_keep_rate_and_unbiased_scaling(p):
    mask = window_dropout_keep_mask(99, 2, (14, 14), 2, (7, 7), p, device=DEVICE)
    assert mask.shape == (2, 4, 2, 49, 49)
    n = mask.numel()
    keep = (mask > 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep - (1 - p)) < 5 * sigma, f"keep rate {keep:.4f} vs {1 - p}"
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / (1 - p)  # E[mask] = 1: unbiased
    # Different images, windows, heads and query rows draw different numbers.
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[0, 0], mask[0, 1])
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1]) and not torch.equal(mask[0, 0, 0, 0], mask[0, 0, 0, 1])


def test_torch_backend_dropout_is_live_and_seeded():
    base = _inputs(1, 9, 10, 32, 2, 7, 3, True, torch.float64)
    run = lambda p: window_attention(base["qkv"], base["table"], num_heads=2, window_size=7,  # noqa: E731
                                     shift_size=3, qkv_bias=base["qkv_bias"], dropout_p=p, backend="torch")
    torch.manual_seed(3)
    a = run(0.4)
    torch.manual_seed(3)
    assert torch.equal(a, run(0.4)) and not torch.allclose(a, run(0.0))


def test_autocast_casts_the_bias_table_with_qkv():
    args = _ok()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = window_attention(args["qkv"], args["table"], num_heads=2, window_size=7, shift_size=3,
                               qkv_bias=args["qkv_bias"], backend="torch")
    assert out.dtype == torch.bfloat16


# --------------------------------------------------------------------------- #
# Swin V2: cosine attention (logit_scale), q and k normalised in-kernel
# --------------------------------------------------------------------------- #
COSINE_CASES = [
    pytest.param(1, 8, 8, 32, 2, 4, 2, id="8x8-w4-s2"),
    pytest.param(1, 7, 10, 32, 2, 4, 2, id="7x10-w4-s2-padded"),
    pytest.param(2, 7, 7, 32, 2, 7, 0, id="7x7-w7-s0-b2"),
    pytest.param(1, 9, 7, 16, 1, (3, 4), (1, 2), id="rect-window-padded"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,W,C,heads,window,shift", COSINE_CASES)
def test_cosine_forward_and_every_gradient_match_reference(B, H, W, C, heads, window, shift, dtype):
    """Out, d qkv, d table, d qkv_bias and d logit_scale (through the clamp) vs the float64 reference."""
    _check(B, H, W, C, heads, window, shift, True, dtype, cosine=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_near_constant_values_keep_the_scale_gradient_accurate(dtype, monkeypatch):
    """Nearly identical values make dP ≈ delta, so dS is a small difference: d(logit_scale) must be summed
    from the dS of the delta the dQ kernel corrected (as dQ itself), or O's rounding shows in it. The
    problem is ill-conditioned: fp32 is held to PyTorch's own fp32 error (as attention's test of it)."""
    monkeypatch.setattr(wa, "_tiles", _gpu_tiles)  # two key blocks per window
    C = 32
    base = _inputs(2, 7, 10, C, 2, (4, 9), (2, 4), True, torch.float32, cosine=True)
    v_mean = 3 * torch.randn(C, device=DEVICE)
    base["qkv"][..., 2 * C:] = v_mean + 0.02 * torch.randn(2, 7, 10, C, device=DEVICE)
    base["qkv_bias"][2 * C:] = v_mean  # the padding tokens' v
    base = {n: t.to(dtype) for n, t in base.items()}
    g = torch.randn(2, 7, 10, C, device=DEVICE).to(dtype)
    out, grads = _run(_triton, _leaves(base), 2, (4, 9), (2, 4), g)
    ref_out, ref_grads = _run(window_attention_reference, _leaves(base, HIGH), 2, (4, 9), (2, 4), g.to(HIGH))
    same = _run(window_attention_reference, _leaves(base), 2, (4, 9), (2, 4), g)[1]
    for name in grads:
        if dtype == torch.float32:
            budget = max(rel_err(same[name], ref_grads[name]), TF32_RTOL if ON_GPU else FP32_RTOL)
            err = rel_err(grads[name], ref_grads[name])
            assert err <= budget, f"d{name}: {err:.2e} > {budget:.2e} (PyTorch fp32's error or the fp32 budget)"
        else:
            assert_close(f"d{name}", grads[name], ref_grads[name], same[name], grad=True)


def test_cosine_float32_logit_scale_with_16bit_qkv():
    """timm keeps logit_scale in float32 while autocast makes qkv 16-bit: the op takes it as it is."""
    _check(1, 7, 10, 32, 2, 4, 2, True, torch.float16, cosine=torch.float32)


def test_cosine_gpu_tiling_path_with_several_blocks_per_window(monkeypatch):
    monkeypatch.setattr(wa, "_tiles", _gpu_tiles)
    _check(1, 6, 11, 32, 2, (4, 9), (2, 4), True, torch.float32, cosine=True)


def test_cosine_gpu_launch_tiles_for_49_token_windows(monkeypatch):
    """The tiles a GPU launch gets for 7x7 windows: 64 queries, and 16-key blocks in the cosine backward."""
    use_gpu_tiles(monkeypatch, wa, "_Geometry")
    g = wa._Geometry(torch.empty(1, 9, 10, 96, device="meta"), 2, (7, 7), (3, 3), True)
    assert (g.block_m, g.block_n, g.bwd_block_n) == (64, 64, 16)
    _check(1, 9, 10, 32, 2, 7, 3, True, torch.float32, cosine=True)


def test_cosine_takes_timm_parameter_shape_and_clamps():
    """(heads, 1, 1) as timm's parameter and (heads,) give the same result; above log(100) the scale is 100
    and the raw parameter's gradient is 0."""
    base = _inputs(1, 7, 10, 32, 2, 4, 2, True, torch.float32, cosine=True)
    g = torch.randn(1, 7, 10, 32, device=DEVICE)
    flat = _leaves(base)
    timm_shape = _leaves(dict(base, logit_scale=base["logit_scale"].view(2, 1, 1)))
    a, ga = _run(_triton, flat, 2, 4, 2, g)
    b, gb = _run(_triton, timm_shape, 2, 4, 2, g)
    assert torch.equal(a, b) and gb["logit_scale"].shape == (2, 1, 1)
    assert torch.equal(ga["logit_scale"], gb["logit_scale"].view(2))
    assert base["logit_scale"][1] > math.log(100) and ga["logit_scale"][1] == 0 and ga["logit_scale"][0] != 0
    at_clamp = _leaves(dict(base, logit_scale=torch.tensor([base["logit_scale"][0].item(), math.log(100)])))
    assert_close("out at the clamp", _run(_triton, at_clamp, 2, 4, 2, g)[0], a)


def test_cosine_deterministic_bit_for_bit_and_empty_batch():
    base = _inputs(2, 7, 10, 32, 2, 4, 2, True, torch.float32, cosine=True)
    g = torch.randn(2, 7, 10, 32, device=DEVICE)
    runs = [_run(_triton, _leaves(base), 2, 4, 2, g) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name
    empty = _leaves(_inputs(0, 7, 10, 32, 2, 4, 2, True, torch.float32, cosine=True))
    out, grads = _run(_triton, empty, 2, 4, 2, torch.randn(0, 7, 10, 32, device=DEVICE))
    assert out.shape == (0, 7, 10, 32) and grads["logit_scale"].shape == (2,) and not grads["logit_scale"].any()


def test_cosine_custom_ops_opcheck_and_compile():
    base = _leaves(_inputs(1, 7, 10, 32, 2, 4, 2, True, torch.float32, cosine=True))
    head_scale = base["logit_scale"].detach().clamp(max=math.log(100)).exp().requires_grad_(True)
    torch.library.opcheck(torch.ops.vitkern.window_attention_fwd.default,
                          (base["qkv"], base["table"], base["qkv_bias"], 2, [4, 4], [2, 2], 1.0, -100.0, 0.0, None,
                           head_scale))
    g = torch.randn(1, 7, 10, 32, device=DEVICE)
    compiled = torch.compile(_triton, fullgraph=True, backend="aot_eager")
    eager, comp = _run(_triton, _leaves(base), 2, 4, 2, g), _run(compiled, _leaves(base), 2, 4, 2, g)
    assert torch.equal(eager[0], comp[0])
    for name in eager[1]:
        assert torch.equal(eager[1][name], comp[1][name]), name


@pytest.mark.parametrize("cosine", [False, True], ids=["swin", "cosine"])
def test_gpu_launch_tiles_for_256_token_windows(monkeypatch, cosine):
    """The tiles a GPU launch gets for 16x16 windows: 64 queries and 32-key blocks in the forward and
    backward (64x64 spilled on sm_80), the d(score) sum in 32x32 tiles; forward and every gradient."""
    use_gpu_tiles(monkeypatch, wa, "_Geometry")
    g = wa._Geometry(torch.empty(1, 18, 17, 64, device="meta"), 2, (16, 16), (8, 8), cosine)
    assert (g.block_m, g.fwd_block_n, g.bwd_block_n) == (64, 32, 16 if cosine else 32)
    _check(1, 18, 17, 32, 2, 16, 8, True, torch.float32, cosine=cosine)


def test_cosine_at_head_dim_below_3_is_refused_by_the_triton_backend():
    """Unit rows of one or two elements are not verified in the cosine kernel: the predicate says so and
    auto runs the reference."""
    qkv = torch.randn(1, 4, 4, 3 * 2, device=DEVICE)  # 2 heads of head_dim 1
    table, scale = torch.randn(9, 2, device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(Exception, match=r"head_dim 1 < 3 is not verified"):
        window_attention(qkv, table, num_heads=2, window_size=2, logit_scale=scale, backend="triton")
    ref = window_attention_reference(qkv, table, num_heads=2, window_size=2, logit_scale=scale)
    assert torch.equal(window_attention(qkv, table, num_heads=2, window_size=2, logit_scale=scale), ref)
