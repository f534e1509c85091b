"""vitkern.ops.window_attention (Triton) against vitkern.reference.window_attention_reference.

The reference itself is proven equal to timm's SwinTransformerBlock in
tests/test_reference_timm.py. CPU: Triton's interpreter, fp32 and fp16, tiny grids.
GPU: the same plus bf16 and Swin-T stage shapes.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import vitkern
from vitkern.backends import BackendUnavailableError
from vitkern.ops import window_attention
from vitkern.reference import window_attention_reference
from vitkern.testing import poison_outputs

from helpers import assert_close, nan_padded

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


def _inputs(B, H, W, C, heads, window, shift, with_bias, dtype):
    mh, mw = (window, window) if isinstance(window, int) else window
    return dict(
        qkv=torch.randn(B, H, W, 3 * C, device=DEVICE).to(dtype),
        table=torch.randn((2 * mh - 1) * (2 * mw - 1), heads, device=DEVICE).to(dtype),
        qkv_bias=torch.randn(3 * C, device=DEVICE).to(dtype) if with_bias else None,
    )


def _run(fn, ins, heads, window, shift, grad_out, **kw):
    out = fn(ins["qkv"], ins["table"], num_heads=heads, window_size=window, shift_size=shift,
             qkv_bias=ins["qkv_bias"], **kw)
    names = [n for n in ("qkv", "table", "qkv_bias") if ins[n] is not None]
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


def _check(B, H, W, C, heads, window, shift, with_bias, dtype):
    base = _inputs(B, H, W, C, heads, window, shift, with_bias, dtype)
    grad_out = torch.randn(B, H, W, C, device=DEVICE).to(dtype)
    # NaN around every input catches out-of-bounds reads; poisoned outputs catch unwritten elements.
    with poison_outputs():
        out, grads = _run(_triton, _leaves(base, pad=True), heads, window, shift, grad_out)
    ref_out, ref_grads = _run(window_attention_reference, _leaves(base, HIGH), heads, window, shift,
                              grad_out.to(HIGH))
    same_out, same_grads = (None, {}) if dtype == torch.float32 else \
        _run(window_attention_reference, _leaves(base), heads, window, shift, grad_out)
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


def test_gpu_tiling_path_with_several_blocks_per_window(monkeypatch):
    """On the GPU, windows span several query and key blocks (e.g. 144 tokens in 16s); force it here."""
    monkeypatch.setattr(wa, "_tiles", wa._gpu_tiles)
    assert wa._gpu_tiles(4 * 9) == (16, 16)  # 36 tokens: three 16-token blocks each way
    _check(1, 6, 11, 32, 2, (4, 9), (2, 4), True, torch.float32)


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
    (lambda a: None, {"window_size": "7"}, r"window_attention: window_size: expected an int or an \(h, w\) pair of ints, got '7'"),
    (lambda a: a.update(qkv=torch.randn(0, 14, 14, 96)), {}, r"empty dimension"),
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
    reasons = vitkern.backends.explain("window_attention", args["qkv"], args["table"], None, 2, (7, 7), (0, 0))
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
