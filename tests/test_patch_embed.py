"""vitkern.ops.patch_embed (Triton) against vitkern.reference.patch_embed_reference.

On CPU the Triton kernels run in Triton's interpreter (fp32, fp16; tiny shapes);
on a GPU the same tests run on CUDA tensors, plus bf16 and the ViT-B shapes.
"""
from __future__ import annotations

import importlib
import re

import pytest
import torch

import vitkern
from vitkern.backends import BackendUnavailableError
from vitkern.ops import patch_embed
from vitkern.reference import patch_embed_reference
from vitkern.testing import poison_outputs

from helpers import assert_close, nan_padded, rel_err, use_gpu_tiles

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HIGH = torch.float32 if ON_GPU else torch.float64  # the oracle's precision (vitkern.testing)

# (B, C, H, W, (Ph, Pw), D, with_bias, with_cls, with_pos): patch sizes 4/8/14/16/32, C = 1, 3 and
# larger, non-square images, D not a power of two, batch 1, rectangular patches.
CASES = [
    pytest.param(2, 3, 32, 48, (8, 8), 40, True, True, True, id="p8-nonsquare-cls-pos"),
    pytest.param(2, 3, 16, 12, (4, 4), 96, True, False, False, id="p4-swin-stem"),
    pytest.param(1, 3, 28, 42, (14, 14), 192, True, True, True, id="p14-b1-d192"),
    pytest.param(2, 1, 32, 64, (16, 16), 1000, True, True, False, id="p16-c1-d1000-cls-only"),
    pytest.param(1, 3, 64, 32, (32, 32), 384, True, False, True, id="p32-d384-pos-only"),
    pytest.param(2, 4, 32, 32, (16, 16), 768, False, True, True, id="p16-c4-d768-nobias"),
    pytest.param(3, 5, 12, 24, (4, 8), 20, True, True, True, id="rect-patch-c5"),
]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def _make_inputs(B, C, H, W, patch, D, with_bias, with_cls, with_pos, dtype, device=DEVICE):
    PH, PW = patch
    tokens = (H // PH) * (W // PW) + int(with_cls)
    # Scale like a trained stem so fp16 stays far from overflow.
    scale = (C * PH * PW) ** -0.5
    return dict(
        x=torch.randn(B, C, H, W, device=device).to(dtype),
        weight=(torch.randn(D, C, PH, PW, device=device) * scale).to(dtype),
        bias=torch.randn(D, device=device).to(dtype) if with_bias else None,
        cls_token=torch.randn(1, 1, D, device=device).to(dtype) if with_cls else None,
        pos_embed=torch.randn(1, tokens, D, device=device).to(dtype) if with_pos else None,
    )


def _leaves(inputs, dtype=None):
    """Fresh leaf copies (optionally cast) that require grad."""
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
        else:
            t = t.detach() if dtype is None else t.detach().to(dtype)
            out[name] = t.clone().requires_grad_(True)
    return out


def _run(fn, inputs, grad_out):
    out = fn(inputs["x"], inputs["weight"], inputs["bias"],
             cls_token=inputs["cls_token"], pos_embed=inputs["pos_embed"])
    names = [n for n, t in inputs.items() if t is not None]
    grads = torch.autograd.grad(out, [inputs[n] for n in names], grad_out)
    return out, dict(zip(names, grads))


def _triton(x, weight, bias=None, *, cls_token=None, pos_embed=None):
    return patch_embed(x, weight, bias, cls_token=cls_token, pos_embed=pos_embed, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,patch,D,with_bias,with_cls,with_pos", CASES)
def test_forward_and_every_gradient_match_reference(B, C, H, W, patch, D, with_bias, with_cls, with_pos, dtype):
    base = _make_inputs(B, C, H, W, patch, D, with_bias, with_cls, with_pos, dtype)
    # NaN around every input catches out-of-bounds reads; poisoned outputs catch unwritten elements.
    kernel_in = {n: (nan_padded(t).requires_grad_(True) if t is not None else None) for n, t in base.items()}
    tokens = (H // patch[0]) * (W // patch[1]) + int(with_cls)
    grad_out = torch.randn(B, tokens, D, device=DEVICE).to(dtype)
    with poison_outputs():
        out, grads = _run(_triton, kernel_in, grad_out)
    ref_out, ref_grads = _run(patch_embed_reference, _leaves(base, HIGH), grad_out.to(HIGH))
    same_out, same_grads = (None, {}) if dtype == torch.float32 else _run(patch_embed_reference, _leaves(base), grad_out)

    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close("out", out, ref_out, same_out)
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].shape == base[name].shape, name
        assert_close(f"d{name}", grads[name], ref_grads[name], same_grads.get(name), grad=True)


def test_strided_and_channels_last_inputs():
    inputs = _make_inputs(2, 3, 32, 48, (16, 16), 24, True, True, True, torch.float32)
    x = inputs["x"]
    layouts = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed_hw": x.transpose(2, 3).contiguous().transpose(2, 3),
        "batch_slice": torch.stack([x, torch.randn_like(x)], 1).flatten(0, 1)[::2],
    }
    ref = patch_embed_reference(**{**inputs, "x": x.double(), "weight": inputs["weight"].double(),
                                   "bias": inputs["bias"].double(), "cls_token": inputs["cls_token"].double(),
                                   "pos_embed": inputs["pos_embed"].double()})
    for name, xv in layouts.items():
        assert not xv.is_contiguous() or name == "channels_last"
        out = _triton(xv, inputs["weight"], inputs["bias"], cls_token=inputs["cls_token"],
                      pos_embed=inputs["pos_embed"])
        assert_close(f"out[{name}]", out, ref)


def test_expanded_upstream_gradient_from_sum():
    """out.sum() hands the backward a stride-0 gradient; the kernels must take strides."""
    base = _make_inputs(2, 3, 16, 16, (8, 8), 24, True, True, True, torch.float32)
    kin, rin = _leaves(base), _leaves(base, HIGH)
    _triton(kin["x"], kin["weight"], kin["bias"], cls_token=kin["cls_token"], pos_embed=kin["pos_embed"]).sum().backward()
    patch_embed_reference(rin["x"], rin["weight"], rin["bias"], cls_token=rin["cls_token"],
                          pos_embed=rin["pos_embed"]).sum().backward()
    for name in base:
        assert_close(f"d{name}", kin[name].grad, rin[name].grad, grad=True)


def test_only_requested_gradients():
    base = _make_inputs(2, 3, 16, 32, (8, 8), 24, True, True, True, torch.float32)
    x = base["x"]  # an image needs no gradient in training
    w = base["weight"].clone().requires_grad_(True)
    pos = base["pos_embed"].clone().requires_grad_(True)
    out = _triton(x, w, base["bias"], cls_token=base["cls_token"], pos_embed=pos)
    g = torch.randn_like(out)
    dw, dpos = torch.autograd.grad(out, [w, pos], g)
    rw, rpos = base["weight"].double().requires_grad_(True), base["pos_embed"].double().requires_grad_(True)
    ref = patch_embed_reference(x.double(), rw, base["bias"].double(), cls_token=base["cls_token"].double(),
                                pos_embed=rpos)
    ref_dw, ref_dpos = torch.autograd.grad(ref, [rw, rpos], g.double())
    assert_close("dweight", dw, ref_dw, grad=True)
    assert_close("dpos_embed", dpos, ref_dpos, grad=True)


def test_deterministic_bit_for_bit():
    base = _make_inputs(3, 3, 32, 32, (8, 8), 40, True, True, True, torch.float32)
    g = torch.randn(3, 17, 40, device=DEVICE)
    runs = [_run(_triton, _leaves(base), g) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


FAR = 2**31 - 8  # still an int32 stride; twice it wraps to -16 in int32


def _far_view(values, strides, guard=64):
    """A leaf equal to ``values`` with ``strides`` (some near 2^31), in a buffer of several GB of which
    only the view and the NaN guard just before it are ever written (untouched pages cost no memory):
    an offset wrapped in int32 reads NaN or zeros instead of the element."""
    span = 1 + sum((n - 1) * s for n, s in zip(values.shape, strides))
    store = torch.empty(guard + span, dtype=values.dtype, device=values.device)
    store[guard - 64:guard] = float("nan")
    view = store[guard:].as_strided(values.shape, strides)
    view.copy_(values)
    return view.detach().requires_grad_(values.requires_grad)


@pytest.mark.parametrize("far", ["grad_out", "x", "weight", "patch_rows"])
def test_offsets_are_int64(far):
    """An index times a stride must not wrap in int32: a batch stride near 2^31 read another batch
    in the bias/CLS/pos gradient sum; pixel and weight offsets (i * stride) and the patch-row offset
    (row * Ph * stride) must not wrap either. Reached cheaply with huge strides over untouched memory."""
    dtype, D = torch.float16, 8
    if far == "patch_rows":  # two patch rows: row 1 starts at Ph * 2^30 (> 2^31) elements
        base = _make_inputs(1, 1, 4, 2, (2, 2), D, True, True, True, dtype)
    else:
        base = _make_inputs(3, 2, 3, 3, (3, 3), D, True, True, True, dtype)
    B, tokens = base["x"].shape[0], base["pos_embed"].shape[1]
    g = torch.randn(B, tokens, D).to(dtype)
    kin, g_kernel = _leaves(base), g
    if far == "grad_out":
        g_kernel = _far_view(g, (FAR, D, 1))
    elif far == "x":
        kin["x"] = _far_view(kin["x"], (6, 3, FAR, 1))
    elif far == "weight":
        kin["weight"] = _far_view(kin["weight"], (6, 3, FAR, 1))
    else:  # the wrapped offset lands 2^31 elements early: inside the buffer, on untouched zeros
        kin["x"] = _far_view(kin["x"], (8, 8, 2**30 + 8, 1), guard=2**31)
    out, grads = _run(_triton, kin, g_kernel)
    ref_out, ref_grads = _run(patch_embed_reference, _leaves(base, HIGH), g.to(HIGH))
    same_out, same_grads = _run(patch_embed_reference, _leaves(base), g)
    assert_close("out", out, ref_out, same_out)
    for name in base:
        assert_close(f"d{name}", grads[name], ref_grads[name], same_grads[name], grad=True)


def test_bias_and_cls_token_strides_are_taken():
    """A strided bias (every other element of a NaN buffer) and an expanded stride-0 CLS token (one
    value broadcast to D) were read as if contiguous: a wrong answer and an out-of-bounds read."""
    base = _make_inputs(2, 3, 16, 16, (8, 8), 24, True, True, True, torch.float32)
    base["cls_token"] = torch.randn(1, 1, 1)  # the leaf; the op gets its (1, 1, D) stride-0 expansion
    g = torch.randn(2, 5, 24)

    def run(fn, inputs, grad_out, strided=False):
        args = dict(inputs)
        if strided:
            buf = torch.full((2 * 24 + 8,), float("nan"))
            args["bias"] = buf[1:49:2].copy_(inputs["bias"].detach())
            args["bias"].requires_grad_(True)
            inputs = {**inputs, "bias": args["bias"]}
        args["cls_token"] = inputs["cls_token"].expand(1, 1, 24)
        out = fn(args["x"], args["weight"], args["bias"], cls_token=args["cls_token"], pos_embed=args["pos_embed"])
        return out, dict(zip(inputs, torch.autograd.grad(out, list(inputs.values()), grad_out)))

    out, grads = run(_triton, _leaves(base), g, strided=True)
    ref_out, ref_grads = run(patch_embed_reference, _leaves(base, HIGH), g.to(HIGH))
    assert_close("out", out, ref_out)
    for name in base:
        assert grads[name].shape == base[name].shape, name
        assert_close(f"d{name}", grads[name], ref_grads[name], grad=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_cls", [True, False])
def test_empty_batch_gives_empty_tokens_and_zero_weight_gradients(backend, with_cls):
    """As Conv2d (and timm's ViT): B = 0 in, (0, T+N, D) out; dx empty, every other gradient zero."""
    base = _make_inputs(0, 3, 16, 24, (8, 8), 24, True, with_cls, True, torch.float32)
    kin, rin = _leaves(base), _leaves(base, HIGH)
    g = torch.randn(0, 6 + int(with_cls), 24)
    with poison_outputs():
        out, grads = _run(lambda *a, **k: patch_embed(*a, **k, backend=backend), kin, g)
    ref_out, ref_grads = _run(patch_embed_reference, rin, g.to(HIGH))
    assert out.shape == ref_out.shape == (0, 6 + int(with_cls), 24) and out.dtype == torch.float32
    assert set(grads) == set(ref_grads) == {n for n, t in base.items() if t is not None}
    for name in grads:
        assert grads[name].shape == base[name].shape and grads[name].dtype == base[name].dtype, name
        assert torch.equal(grads[name], ref_grads[name].float()), name
        assert name == "x" or grads[name].numel() > 0, name


@pytest.mark.gpu
@pytest.mark.parametrize("res,patch,batch", [(224, 16, 8), (384, 32, 4), (224, 4, 2)])
def test_vit_shapes_bf16_on_gpu(res, patch, batch):
    D = 96 if patch == 4 else 768
    base = _make_inputs(batch, 3, res, res, (patch, patch), D, True, patch != 4, patch != 4, torch.bfloat16)
    g = torch.randn(batch, (res // patch) ** 2 + int(patch != 4), D, device=DEVICE, dtype=torch.bfloat16)
    with poison_outputs():
        out, grads = _run(_triton, _leaves(base), g)
    ref_out, ref_grads = _run(patch_embed_reference, _leaves(base, torch.float32), g.float())
    same_out, same_grads = _run(patch_embed_reference, _leaves(base), g)
    assert_close("out", out, ref_out, same_out)
    for name in grads:
        assert_close(f"d{name}", grads[name], ref_grads[name], same_grads[name], grad=True)


# --------------------------------------------------------------------------- #
# Bad input: clear errors naming the argument
# --------------------------------------------------------------------------- #
def _ok():
    return dict(x=torch.randn(2, 3, 32, 32), weight=torch.randn(8, 3, 16, 16), bias=torch.randn(8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(x=torch.randn(3, 32, 32)), r"x must be 4-D"),
    (lambda a: a.update(weight=torch.randn(8, 3, 16)), r"weight must be 4-D"),
    (lambda a: a.update(x=torch.randn(2, 3, 30, 32)), r"divisible by the patch size"),
    (lambda a: a.update(x=torch.randn(2, 4, 32, 32)), r"weight has 3 input channels .* x has C=4"),
    (lambda a: a.update(x=torch.randn(2, 3, 0, 32)), r"x must have H >= 1 and W >= 1 .* got shape \(2, 3, 0, 32\)"),
    (lambda a: a.update(x=torch.randn(2, 3, 32, 0)), r"x must have H >= 1 and W >= 1 .* got shape \(2, 3, 32, 0\)"),
    (lambda a: a.update(x=torch.randint(0, 9, (2, 3, 32, 32))), r"x.dtype must be one of"),
    (lambda a: a.update(bias=torch.randn(8, dtype=torch.float16)), r"bias.dtype is torch.float16"),
    (lambda a: a.update(bias=torch.randn(9)), r"bias must have shape \(8,\)"),
    (lambda a: a.update(weight=torch.randn(8, 3, 16, 16, device="meta")), r"weight is on meta"),
    (lambda a: a.update(cls_token=torch.randn(1, 1, 7)), r"cls_token must hold D=8"),
    (lambda a: a.update(pos_embed=torch.randn(1, 5, 8)), r"pos_embed must have shape \(1, 4, 8\)"),
    (lambda a: a.update(x=[1, 2]), r"x must be a torch.Tensor"),
])
def test_bad_input_raises_clear_error(change, match, backend):
    args = _ok()
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        patch_embed(args.pop("x"), args.pop("weight"), args.pop("bias", None), backend=backend, **args)


def test_bad_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cudnn'"):
        patch_embed(**_ok(), backend="cudnn")


def test_forced_backend_that_cannot_run_says_why():
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run this call: vitkern._C"):
        patch_embed(**_ok(), backend="cuda")
    args = {k: v.double() for k, v in _ok().items()}
    with pytest.raises(BackendUnavailableError, match=r"Triton kernels take float32, float16 or bfloat16, got torch.float64"):
        patch_embed(**args, backend="triton")
    assert patch_embed(**args).dtype == torch.float64  # auto falls back to the reference
    if not ON_GPU:
        args = {k: v.to(torch.bfloat16) for k, v in _ok().items()}
        with pytest.raises(BackendUnavailableError, match=r"interpreter computes bfloat16 wrongly"):
            patch_embed(**args, backend="triton")


def test_auto_picks_torch_on_cpu_and_explain_lists_reasons():
    args = _ok()
    reasons = vitkern.backends.explain("patch_embed", args["x"], args["weight"], args["bias"])
    assert reasons["torch"] is None and "vitkern._C" in reasons["cuda"]
    out = patch_embed(**args)  # auto
    if not ON_GPU:
        assert "vitkern_patch_embed" not in type(out.grad_fn or object()).__name__
        assert reasons["triton"] is None  # the interpreter is on in CPU test runs
    else:
        assert out.grad_fn is None or "vitkern_patch_embed" in type(out.grad_fn).__name__


def test_autocast_casts_like_conv2d():
    args = {k: v.to(DEVICE) for k, v in _ok().items()}
    dtype = torch.bfloat16
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = patch_embed(**args, backend="torch")
    assert out.dtype == dtype


# --------------------------------------------------------------------------- #
# torch.library registration: opcheck, torch.compile, FLOP counting
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("batch", [2, 0], ids=["b2", "empty-batch"])
def test_custom_ops_pass_opcheck(batch):
    base = _leaves(_make_inputs(batch, 3, 16, 24, (8, 8), 24, True, True, True, torch.float32))
    args = (base["x"], base["weight"], base["bias"], base["cls_token"], base["pos_embed"])
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, args)
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, (*args, True, None))
    g = torch.randn(batch, 7, 24, device=DEVICE)
    plain = tuple(a.detach() for a in args[:2])
    torch.library.opcheck(torch.ops.vitkern.patch_embed_bwd.default, (g, *plain, 1, True, True, True))
    torch.library.opcheck(torch.ops.vitkern.patch_embed_bwd.default, (g, *plain, 1, False, True, False, None, None))


def test_torch_compile_fullgraph_forward_and_backward():
    base = _make_inputs(2, 3, 16, 24, (8, 8), 24, True, True, True, torch.float32)
    compiled = torch.compile(_triton, fullgraph=True, backend="aot_eager")
    kin, cin = _leaves(base), _leaves(base)
    g = torch.randn(2, 7, 24, device=DEVICE)
    eager_out, eager_grads = _run(_triton, kin, g)
    comp_out, comp_grads = _run(compiled, cin, g)
    assert torch.equal(eager_out, comp_out)
    for name in eager_grads:
        assert torch.equal(eager_grads[name], comp_grads[name]), name


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "fp16-autocast"])
def test_torch_compile_fullgraph_with_two_prefix_tensors(autocast):
    """A prefix list and autocast's mixed dtypes trace whole (the fake gives the promoted dtype)."""
    base, _ = _seq_inputs((1, 2), ("shared", "image"), True, None, torch.float32)

    def fn(*a, **k):
        with torch.autocast(DEVICE.type, dtype=torch.float16, enabled=autocast):
            return patch_embed(*a, **k, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    g = torch.randn(2, 9, 20, device=DEVICE)
    eager_out, eager_grads = _run_seq(fn, _leaves(base), g, None, True)
    comp_out, comp_grads = _run_seq(compiled, _leaves(base), g, None, True)
    assert comp_out.dtype == eager_out.dtype == torch.float32 and torch.equal(eager_out, comp_out)
    for name in eager_grads:
        assert torch.equal(eager_grads[name], comp_grads[name]), name


def test_flop_counter_counts_the_custom_ops_on_meta():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(4, 3, 224, 224, device="meta")
    w = torch.randn(768, 3, 16, 16, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = torch.ops.vitkern.patch_embed_fwd(x, w, None, None, None)
    gemm = 2 * 4 * 196 * 768 * (3 * 16 * 16)
    assert counter.get_total_flops() == gemm
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    assert counter.get_total_flops() == gemm  # dW only: the image needs no gradient


# --------------------------------------------------------------------------- #
# Prefix tokens, patch-only position embedding, kept patches (MAE)
# --------------------------------------------------------------------------- #
def _prefix_inputs(B, C, H, W, patch, D, T, per_image, covers, K, dtype, with_bias=True, device=DEVICE):
    """Inputs for T prefix rows ((B, T, D) when per_image, else (1, T, D)), a pos_embed over all rows
    (covers) or the patch rows only, and K kept patches per image (None: every patch)."""
    PH, PW = patch
    N = (H // PH) * (W // PW)
    scale = (C * PH * PW) ** -0.5
    keep = None
    if K is not None:  # a different random subset per image, in shuffled order (as MAE's argsort)
        keep = torch.stack([torch.randperm(N)[:K] for _ in range(B)]) if B else torch.zeros(0, K, dtype=torch.long)
        keep = keep.to(device)
    inputs = dict(
        x=torch.randn(B, C, H, W, device=device).to(dtype),
        weight=(torch.randn(D, C, PH, PW, device=device) * scale).to(dtype),
        bias=torch.randn(D, device=device).to(dtype) if with_bias else None,
        prefix_tokens=torch.randn(B if per_image else 1, T, D, device=device).to(dtype),
        pos_embed=torch.randn(1, N + (T if covers else 0), D, device=device).to(dtype),
    )
    return inputs, keep


def _run_prefix(fn, inputs, grad_out, keep, covers):
    out = fn(inputs["x"], inputs["weight"], inputs["bias"], prefix_tokens=inputs["prefix_tokens"],
             pos_embed=inputs["pos_embed"], pos_embed_covers_prefix=covers, keep_indices=keep)
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [inputs[n] for n in names], grad_out, allow_unused=True)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("T,per_image,covers,K", [
    (0, False, True, None), (2, False, False, None), (3, True, True, 5), (1, False, False, 1), (2, True, False, 6),
])
def test_reference_follows_the_row_by_row_definition(T, per_image, covers, K):
    """The oracle itself, against the definition written one row at a time."""
    inputs, keep = _prefix_inputs(2, 3, 8, 12, (4, 4), 5, T, per_image, covers, K, torch.float64)
    out = patch_embed_reference(inputs["x"], inputs["weight"], inputs["bias"], prefix_tokens=inputs["prefix_tokens"],
                                pos_embed=inputs["pos_embed"], pos_embed_covers_prefix=covers, keep_indices=keep)
    x, w, bias, prefix, pos = (inputs[n] for n in ("x", "weight", "bias", "prefix_tokens", "pos_embed"))
    grid_w = x.shape[3] // 4
    kept = keep.tolist() if keep is not None else [list(range(6))] * 2
    assert out.shape == (2, T + len(kept[0]), 5)
    for b in range(2):
        for t in range(T):
            want = prefix[b if per_image else 0, t] + (pos[0, t] if covers else 0)
            assert torch.allclose(out[b, t], want), (b, t)
        for j, n in enumerate(kept[b]):
            i0, j0 = (n // grid_w) * 4, (n % grid_w) * 4
            want = (w.flatten(1) @ x[b, :, i0:i0 + 4, j0:j0 + 4].flatten()) + bias + pos[0, n + (T if covers else 0)]
            assert torch.allclose(out[b, T + j], want), (b, j)


def test_cls_token_is_prefix_tokens_of_one_row():
    base = _make_inputs(2, 3, 16, 16, (8, 8), 12, True, True, True, torch.float64)
    a = patch_embed(base["x"], base["weight"], base["bias"], cls_token=base["cls_token"], pos_embed=base["pos_embed"],
                    backend="torch")
    b = patch_embed(base["x"], base["weight"], base["bias"], prefix_tokens=base["cls_token"].reshape(1, 12),
                    pos_embed=base["pos_embed"], backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(cls_token=torch.randn(1, 1, 8), prefix_tokens=torch.randn(1, 1, 8)),
     r"give cls_token or prefix_tokens, not both"),
    (lambda a: a.update(prefix_tokens=torch.randn(1, 2, 7)),
     r"prefix_tokens must have shape \(1, T, 8\), \(2, T, 8\) or \(T, 8\) .* got \(1, 2, 7\)"),
    (lambda a: a.update(prefix_tokens=torch.randn(3, 2, 8)), r"prefix_tokens must have shape .* got \(3, 2, 8\)"),
    (lambda a: a.update(prefix_tokens=torch.randn(1, 65, 8)), r"T <= 64 prefix rows in all, got \(1, 65, 8\)"),
    (lambda a: a.update(prefix_tokens=torch.randn(8)), r"prefix_tokens must be .* got shape \(8,\)"),
    (lambda a: a.update(prefix_tokens=1.0), r"prefix_tokens must be a torch.Tensor, a list/tuple of tensors or None, "
                                            r"got float"),
    (lambda a: a.update(prefix_tokens=[torch.randn(1, 1, 8), 1.0]), r"prefix_tokens\[1\] must be a torch.Tensor, got float"),
    (lambda a: a.update(prefix_tokens=[torch.randn(1, 1, 8), torch.randn(8)]), r"prefix_tokens\[1\] must be .* got shape \(8,\)"),
    (lambda a: a.update(prefix_tokens=[torch.randn(1, 1, 8), torch.randn(3, 2, 8)]),
     r"prefix_tokens\[1\] must have shape \(1, T, 8\), \(2, T, 8\) .* got \(3, 2, 8\)"),
    (lambda a: a.update(prefix_tokens=[torch.randn(1, 1, 8), torch.randn(1, 64, 8)]),
     r"prefix_tokens\[1\] must have shape .* T <= 64 prefix rows in all, got \(1, 64, 8\)"),
    (lambda a: a.update(prefix_tokens=(torch.randn(1, 1, 8), torch.randn(1, 2, 8, dtype=torch.float16))),
     r"prefix_tokens\[1\].dtype is torch.float16 but x.dtype is torch.float32"),
    (lambda a: a.update(prefix_tokens=torch.randn(1, 2, 8, dtype=torch.float16)), r"prefix_tokens.dtype is"),
    (lambda a: a.update(prefix_tokens=torch.randn(1, 2, 8), pos_embed=torch.randn(1, 4, 8)),
     r"pos_embed must have shape \(1, 6, 8\) for 2 prefix \+ 4 patch rows .* got \(1, 4, 8\)"),
    (lambda a: a.update(prefix_tokens=torch.randn(1, 2, 8), pos_embed=torch.randn(1, 6, 8),
                        pos_embed_covers_prefix=False),
     r"pos_embed must have shape \(1, 4, 8\) for 4 patch rows \(pos_embed_covers_prefix=False\), got \(1, 6, 8\)"),
    (lambda a: a.update(pos_embed_covers_prefix=1), r"pos_embed_covers_prefix must be a bool, got int"),
    (lambda a: a.update(keep_indices=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)),
     r"keep_indices.dtype must be torch.int64, got torch.int32"),
    (lambda a: a.update(keep_indices=torch.tensor([0, 1])), r"keep_indices must have shape \(2, K\) .* got \(2,\)"),
    (lambda a: a.update(keep_indices=torch.zeros(2, 5, dtype=torch.long)), r"K <= N=4 patches, got \(2, 5\)"),
    (lambda a: a.update(keep_indices=torch.tensor([[0, 1], [2, 4]])), r"distinct patch indices in \[0, 4\) .* max 4"),
    (lambda a: a.update(keep_indices=torch.tensor([[0, -1], [2, 3]])), r"in \[0, 4\) .* got min -1, max 3"),
    (lambda a: a.update(keep_indices=torch.tensor([[0, 1], [3, 3]])), r"distinct .* a repeated index"),
    (lambda a: a.update(keep_indices=torch.zeros(2, 1, dtype=torch.long, device="meta")), r"keep_indices is on meta"),
    (lambda a: a.update(keep_indices=[[0], [1]]), r"keep_indices must be a torch.Tensor or None, got list"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_prefix_pos_keep_raise_clear_errors(change, match, backend):
    args = _ok()
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        patch_embed(args.pop("x"), args.pop("weight"), args.pop("bias", None), backend=backend, **args)


def test_cuda_refuses_what_its_kernel_lacks(monkeypatch):
    """The CUDA forward takes one shared CLS row and a full pos_embed; past the extension check (not
    built here) its predicate names the argument it lacks."""
    monkeypatch.setattr(vitkern.backends, "cuda_extension_reason", lambda *a, **k: None)
    args = _ok()
    cases = [(dict(prefix_tokens=torch.randn(1, 2, 8)), r"at most one prefix token .* \(1, 2, 8\)"),
             (dict(prefix_tokens=torch.randn(2, 1, 8)), r"prefix shared by the batch .* \(2, 1, 8\)"),
             (dict(pos_embed=torch.randn(1, 4, 8), pos_embed_covers_prefix=False), r"pos_embed_covers_prefix=False"),
             (dict(keep_indices=torch.tensor([[0], [3]])), r"does not handle keep_indices")]
    for kwargs, match in cases:
        reasons = vitkern.backends.explain("patch_embed", *args.values(), **kwargs)
        assert reasons["cuda"] is not None and re.search(match, reasons["cuda"]), (kwargs, reasons["cuda"])
        assert reasons["torch"] is None and reasons["triton"] is None


# (B, C, H, W, patch, D, T, per_image, covers, K): T = 0/1/2/5, a prefix shared by the batch or per
# image, pos_embed over every row or the patch rows only, every patch (None), K = 1, odd K, K = N,
# K = 0 (prefix rows only), an empty batch.
PREFIX_CASES = [
    pytest.param(2, 3, 8, 12, (4, 4), 10, 0, False, True, None, id="T0-all-patches"),
    pytest.param(2, 3, 8, 12, (4, 4), 24, 1, False, True, 3, id="T1-K3"),
    pytest.param(3, 2, 12, 8, (4, 4), 20, 2, True, False, None, id="T2-per-image-patch-pos"),
    pytest.param(2, 3, 8, 12, (4, 4), 40, 5, False, False, 6, id="T5-K=N-patch-pos"),
    pytest.param(1, 3, 16, 16, (8, 8), 16, 2, False, True, 1, id="T2-K1-b1"),
    pytest.param(2, 1, 12, 24, (4, 8), 33, 5, True, True, 5, id="T5-per-image-K5-rect"),
    pytest.param(0, 3, 8, 8, (4, 4), 8, 2, True, True, 3, id="empty-batch-keep"),
    pytest.param(2, 3, 8, 8, (4, 4), 8, 1, False, True, 0, id="K0-prefix-only"),
]


def _strided_keep(keep, junk=-1000):
    """keep as every other column of a buffer whose other columns are out of range: a kernel that
    ignores keep's strides reads junk (a wild address, or the wrong patch)."""
    if keep is None:
        return None
    buf = torch.full((keep.shape[0], 2 * keep.shape[1]), junk, dtype=keep.dtype, device=keep.device)
    buf[:, ::2] = keep
    return buf[:, ::2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,patch,D,T,per_image,covers,K", PREFIX_CASES)
def test_prefix_pos_keep_forward_and_every_gradient_match_reference(B, C, H, W, patch, D, T, per_image, covers, K,
                                                                     dtype):
    base, keep = _prefix_inputs(B, C, H, W, patch, D, T, per_image, covers, K, dtype)
    kernel_in = {n: (nan_padded(t).requires_grad_(True) if t is not None else None) for n, t in base.items()}
    rows = T + (K if K is not None else (H // patch[0]) * (W // patch[1]))
    grad_out = torch.randn(B, rows, D, device=DEVICE).to(dtype)
    triton = lambda *a, **k: patch_embed(*a, **k, backend="triton")  # noqa: E731
    with poison_outputs():
        out, grads = _run_prefix(triton, kernel_in, grad_out, _strided_keep(keep), covers)
    ref_out, ref_grads = _run_prefix(patch_embed_reference, _leaves(base, HIGH), grad_out.to(HIGH), keep, covers)
    same_out, same_grads = (None, {}) if dtype == torch.float32 else \
        _run_prefix(patch_embed_reference, _leaves(base), grad_out, keep, covers)

    assert out.dtype == dtype and out.shape == ref_out.shape == (B, rows, D)
    assert_close("out", out, ref_out, same_out)
    assert set(grads) == set(ref_grads) == set(base)
    for name in grads:
        assert grads[name].shape == base[name].shape, name
        assert_close(f"d{name}", grads[name], ref_grads[name], same_grads.get(name), grad=True)
    if keep is not None and B > 0:  # the patches not kept get exactly zero
        dx = grads["x"].unfold(2, patch[0], patch[0]).unfold(3, patch[1], patch[1]).flatten(2, 3)  # (B, C, N, ., .)
        kept = torch.zeros(B, dx.shape[2], dtype=torch.bool)
        kept.scatter_(1, keep.cpu(), True)
        assert torch.all(dx.permute(0, 2, 1, 3, 4)[~kept.to(DEVICE)] == 0)


@pytest.mark.parametrize("T,per_image,K", [(1, False, 5), (3, True, None), (1, False, None)],
                         ids=["keep", "prefix-tile", "cls"])
def test_prefix_and_keep_with_the_gpu_tiles(monkeypatch, T, per_image, K):
    """The tiles a GPU launch picks (fp32 with kept patches or any prefix: 128x64, see _gathered_tiles),
    run by the interpreter: rows and channels over several programs, masked edges."""
    module = importlib.import_module("vitkern.ops.patch_embed")  # (vitkern.ops.patch_embed is the function)
    use_gpu_tiles(monkeypatch, module, "_gemm_config", "_backward_tiles", "_gathered_tiles")
    assert module._gathered_tiles(module._gemm_config(torch.float32, 512, 96, 48), torch.float32)["BLOCK_N"] == 64
    base, keep = _prefix_inputs(3, 3, 16, 32, (4, 4), 96, T, per_image, False, K, torch.float32)
    rows = T + (K if K is not None else 32)
    g = torch.randn(3, rows, 96, device=DEVICE)
    triton = lambda *a, **k: patch_embed(*a, **k, backend="triton")  # noqa: E731
    with poison_outputs():
        out, grads = _run_prefix(triton, _leaves(base), g, keep, False)
    ref_out, ref_grads = _run_prefix(patch_embed_reference, _leaves(base, HIGH), g.to(HIGH), keep, False)
    assert_close("out", out, ref_out)
    for name in grads:
        assert_close(f"d{name}", grads[name], ref_grads[name], grad=True)


def test_prefix_pos_keep_strided_inputs_and_deterministic():
    """Channels-last image, a prefix and pos_embed read through strides (transposed views), an
    upstream gradient with stride 0 (from .sum()); two runs agree bit for bit."""
    base, keep = _prefix_inputs(2, 3, 8, 12, (4, 4), 12, 2, True, False, 5, torch.float32)

    def strided(inputs):
        out = dict(inputs)
        out["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
        out["prefix_tokens"] = inputs["prefix_tokens"].transpose(1, 2).contiguous().transpose(1, 2)
        out["pos_embed"] = inputs["pos_embed"].transpose(1, 2).contiguous().transpose(1, 2)
        return out

    def run(fn, leaves):
        views = strided(leaves)
        out = fn(views["x"], views["weight"], views["bias"], prefix_tokens=views["prefix_tokens"],
                 pos_embed=views["pos_embed"], pos_embed_covers_prefix=False, keep_indices=keep)
        return out, torch.autograd.grad(out.sum(), list(leaves.values()))

    triton = lambda *a, **k: patch_embed(*a, **k, backend="triton")  # noqa: E731
    runs = [run(triton, _leaves(base)) for _ in range(2)]
    ref_out, ref_grads = run(patch_embed_reference, _leaves(base, HIGH))
    assert_close("out", runs[0][0], ref_out)
    for name, g, r in zip(base, runs[0][1], ref_grads):
        assert_close(f"d{name}", g, r, grad=True)
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_cls_token_and_one_shared_prefix_row_give_the_same_tokens_and_gradients():
    base = _make_inputs(2, 3, 16, 16, (8, 8), 12, True, True, True, torch.float32)
    cls = base["cls_token"].clone().requires_grad_(True)
    prefix = base["cls_token"].reshape(1, 12).clone().requires_grad_(True)
    a = _triton(base["x"], base["weight"], base["bias"], cls_token=cls, pos_embed=base["pos_embed"])
    b = patch_embed(base["x"], base["weight"], base["bias"], prefix_tokens=prefix, pos_embed=base["pos_embed"],
                    backend="triton")
    g = torch.randn_like(a)
    assert torch.equal(a, b)
    (dcls,), (dprefix,) = torch.autograd.grad(a, [cls], g), torch.autograd.grad(b, [prefix], g)
    assert dcls.shape == (1, 1, 12) and dprefix.shape == (1, 12) and torch.equal(dcls.flatten(), dprefix.flatten())


def test_custom_op_with_prefix_and_keep_passes_opcheck():
    base, keep = _prefix_inputs(2, 3, 8, 12, (4, 4), 10, 2, True, False, 3, torch.float32)
    leaves = _leaves(base)
    args = (leaves["x"], leaves["weight"], leaves["bias"], leaves["prefix_tokens"], leaves["pos_embed"], False, keep)
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, args)
    g = torch.randn(2, 5, 10, device=DEVICE)
    plain = (base["x"], base["weight"])
    torch.library.opcheck(torch.ops.vitkern.patch_embed_bwd.default, (g, *plain, 2, True, True, True, keep, None))


def test_torch_compile_fullgraph_with_keep_indices():
    base, keep = _prefix_inputs(2, 3, 8, 12, (4, 4), 10, 2, False, True, 3, torch.float32)

    def fn(x, weight, bias, *, prefix_tokens, pos_embed, pos_embed_covers_prefix, keep_indices):
        return patch_embed(x, weight, bias, prefix_tokens=prefix_tokens, pos_embed=pos_embed,
                           pos_embed_covers_prefix=pos_embed_covers_prefix, keep_indices=keep_indices,
                           backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    g = torch.randn(2, 5, 10, device=DEVICE)
    eager_out, eager_grads = _run_prefix(fn, _leaves(base), g, keep, True)
    comp_out, comp_grads = _run_prefix(compiled, _leaves(base), g, keep, True)
    assert torch.equal(eager_out, comp_out)
    for name in eager_grads:
        assert torch.equal(eager_grads[name], comp_grads[name]), name
    bad = keep.clone()
    bad[1, 0] = bad[1, 1]  # a repeated index: the compiled graph's assert fires too
    with pytest.raises(RuntimeError, match=r"distinct patch indices"):
        compiled(base["x"], base["weight"], base["bias"], prefix_tokens=base["prefix_tokens"],
                 pos_embed=base["pos_embed"], pos_embed_covers_prefix=True, keep_indices=bad)


def test_flop_counter_counts_only_kept_patches():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(4, 3, 224, 224, device="meta")
    w = torch.randn(768, 3, 16, 16, device="meta", requires_grad=True)
    keep = torch.zeros(4, 49, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = torch.ops.vitkern.patch_embed_fwd(x, w, None, torch.zeros(1, 1, 768, device="meta"), None, True, keep)
    gemm = 2 * 4 * 49 * 768 * (3 * 16 * 16)
    assert out.shape == (4, 50, 768)
    assert counter.get_total_flops() == gemm
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    assert counter.get_total_flops() == gemm  # dW over the kept patches only: the image needs no gradient


# --------------------------------------------------------------------------- #
# The prefix as a sequence of tensors (timm's separate cls_token and reg_token / dist_token)
# --------------------------------------------------------------------------- #
# (rows of each prefix tensor, their kinds: "shared" (1, t, D), "image" (B, t, D), "2d" (t, D)), covers, K
SEQ_CASES = [
    pytest.param((1,), ("shared",), True, None, id="one-in-a-list"),
    pytest.param((1, 3), ("shared", "shared"), True, None, id="cls+reg3-shared"),
    pytest.param((1, 2), ("shared", "image"), False, 4, id="cls+per-image2-patch-pos-keep"),
    pytest.param((2, 1), ("image", "2d"), True, None, id="per-image2+2d"),
    pytest.param((1, 1, 2), ("shared", "image", "2d"), True, 3, id="three-joined-keep"),
]


def _seq_inputs(rows, kinds, covers, K, dtype, B=2, D=20):
    base, keep = _prefix_inputs(B, 3, 8, 12, (4, 4), D, sum(rows), False, covers, K, dtype)
    del base["prefix_tokens"]
    for i, (t, kind) in enumerate(zip(rows, kinds)):
        shape = {"shared": (1, t, D), "image": (B, t, D), "2d": (t, D)}[kind]
        base[f"prefix{i}"] = torch.randn(*shape, device=DEVICE).to(dtype)
    return base, keep


def _run_seq(fn, inputs, grad_out, keep, covers):
    prefix = [t for n, t in inputs.items() if n.startswith("prefix")]
    out = fn(inputs["x"], inputs["weight"], inputs["bias"], prefix_tokens=prefix, pos_embed=inputs["pos_embed"],
             pos_embed_covers_prefix=covers, keep_indices=keep)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    return out, dict(zip(inputs, grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,kinds,covers,K", SEQ_CASES)
def test_prefix_sequence_forward_and_every_gradient_match_reference(rows, kinds, covers, K, dtype):
    base, keep = _seq_inputs(rows, kinds, covers, K, dtype)
    kernel_in = {n: nan_padded(t).requires_grad_(True) for n, t in base.items()}
    tokens = sum(rows) + (K if K is not None else 6)
    grad_out = torch.randn(2, tokens, 20, device=DEVICE).to(dtype)
    triton = lambda *a, **k: patch_embed(*a, **k, backend="triton")  # noqa: E731
    with poison_outputs():
        out, grads = _run_seq(triton, kernel_in, grad_out, keep, covers)
    ref_out, ref_grads = _run_seq(patch_embed_reference, _leaves(base, HIGH), grad_out.to(HIGH), keep, covers)
    same_out, same_grads = (None, {}) if dtype == torch.float32 else \
        _run_seq(patch_embed_reference, _leaves(base), grad_out, keep, covers)
    assert out.dtype == dtype and out.shape == ref_out.shape == (2, tokens, 20)
    assert_close("out", out, ref_out, same_out)
    for name in base:
        assert grads[name].shape == base[name].shape, name
        assert_close(f"d{name}", grads[name], ref_grads[name], same_grads.get(name), grad=True)


def test_two_prefix_tensors_with_the_gpu_tiles(monkeypatch):
    """A second prefix tensor takes the narrower forward tiles in 16-bit too (see _gathered_tiles); those
    tiles, run by the interpreter over several programs: CLS as a vector, the register rows as a tile."""
    module = importlib.import_module("vitkern.ops.patch_embed")
    use_gpu_tiles(monkeypatch, module, "_gemm_config", "_backward_tiles", "_gathered_tiles")
    cfg = module._gemm_config(torch.float16, 512, 96, 48)
    assert module._gathered_tiles(cfg, torch.float16) == cfg
    assert module._gathered_tiles(cfg, torch.float16, True)["BLOCK_N"] == 64
    base, _ = _seq_inputs((1, 4), ("shared", "shared"), True, None, torch.float16, B=3, D=96)
    g = torch.randn(3, 11, 96, device=DEVICE).half()
    triton = lambda *a, **k: patch_embed(*a, **k, backend="triton")  # noqa: E731
    with poison_outputs():
        out, grads = _run_seq(triton, _leaves(base), g, None, True)
    ref_out, ref_grads = _run_seq(patch_embed_reference, _leaves(base, HIGH), g.to(HIGH), None, True)
    same_out, same_grads = _run_seq(patch_embed_reference, _leaves(base), g, None, True)
    assert_close("out", out, ref_out, same_out)
    for name in grads:
        assert_close(f"d{name}", grads[name], ref_grads[name], same_grads[name], grad=True)


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("count", [2, 3])
def test_two_prefix_tensors_are_read_in_place_more_are_joined(count):
    """CLS + register tokens reach the kernel as two tensors (no aten.cat); a third is joined on the host."""
    base, _ = _seq_inputs((1, 2, 1)[:count], ("shared", "image", "shared")[:count], True, None, torch.float32)
    rec = _AtenOps()
    with rec:
        patch_embed(base["x"], base["weight"], base["bias"], pos_embed=base["pos_embed"], backend="triton",
                    prefix_tokens=[t for n, t in base.items() if n.startswith("prefix")])
    cats = [f for f, _ in rec.ops if f is torch.ops.aten.cat.default]
    calls = [args for f, args in rec.ops if f is torch.ops.vitkern.patch_embed_fwd.default]
    assert len(calls) == 1 and len(cats) == (count > 2)
    if count == 2:  # the caller's tensors themselves (contiguous already: the launcher copies nothing)
        assert calls[0][3] is base["prefix0"] and calls[0][7] is base["prefix1"]


@pytest.mark.parametrize("per_image", [False, True], ids=["shared", "per-image"])
def test_custom_op_with_two_prefix_tensors_passes_opcheck(per_image):
    base, keep = _seq_inputs((1, 3), ("shared", "image" if per_image else "shared"), False, 4, torch.float32)
    leaves = _leaves(base)
    args = (leaves["x"], leaves["weight"], leaves["bias"], leaves["prefix0"], leaves["pos_embed"], False, keep,
            leaves["prefix1"])
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, args)


# --------------------------------------------------------------------------- #
# Autocast: x, weight, bias cast; the prefix and pos_embed keep their dtype; the output promotes
# --------------------------------------------------------------------------- #
def _autocast_inputs(param_dtype=torch.float32):
    base, _ = _seq_inputs((1, 2), ("shared", "shared"), True, None, torch.float32)
    return {n: (t.to(param_dtype) if n.startswith(("prefix", "pos")) else t) for n, t in base.items()}


@pytest.mark.parametrize("params,want", [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("none", torch.bfloat16),
])
def test_bf16_autocast_output_dtype_follows_timms_promotion(params, want):
    """timm's embedding under bf16 autocast: bf16 conv output, then cat / add with its token parameters,
    which promote (float32 parameters: float32 tokens). Both backends that run on CPU give that dtype; the
    torch backend's values are that composition's exactly."""
    base = _autocast_inputs(torch.float32 if params != "bfloat16" else torch.bfloat16)
    prefix = [base["prefix0"], base["prefix1"]] if params != "none" else None
    pos = base["pos_embed"] if params != "none" else None
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = patch_embed(base["x"], base["weight"], base["bias"], prefix_tokens=prefix, pos_embed=pos,
                          backend="torch")
        conv = torch.nn.functional.conv2d(base["x"], base["weight"], base["bias"], stride=4).flatten(2).transpose(1, 2)
        timm_like = conv if prefix is None else torch.cat([*(t.expand(2, -1, -1) for t in prefix), conv], 1) + pos
    assert conv.dtype == torch.bfloat16 and timm_like.dtype == want and out.dtype == want
    assert torch.equal(out, timm_like)


def test_outside_autocast_mixed_dtypes_are_refused_naming_the_argument():
    base = _autocast_inputs(torch.float16)
    with pytest.raises(TypeError, match=r"pos_embed.dtype is torch.float16 but x.dtype is torch.float32"):
        patch_embed(base["x"], base["weight"], base["bias"], prefix_tokens=[base["prefix0"].float(), base["prefix1"].float()], pos_embed=base["pos_embed"])


def _within_factor(name, out, high, same, factor):
    """The 2x (3x for gradients) rule of vitkern.testing on outputs that are float32 but carry 16-bit error."""
    err, same_err = rel_err(out, high), rel_err(same, high)
    assert out.dtype == same.dtype and 0 < same_err and err <= factor * same_err, (name, err, same_err)


def test_triton_under_autocast_promotes_and_every_gradient_matches_reference():
    """The kernels under fp16 autocast (what CPU's interpreter computes; bf16 on a GPU is the same code):
    fp16 x / weight / bias, fp32 prefix tokens and pos_embed, a float32 output, and a float32 upstream
    gradient that the backward kernels cast to fp16 per tile. Forward and every gradient against the
    float64 reference, within 2x / 3x the torch backend's error under the same autocast."""
    base = _autocast_inputs()
    grad_out = torch.randn(2, 9, 20, device=DEVICE)

    def run(backend, inputs, g):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            return _run_seq(lambda *a, **k: patch_embed(*a, **k, backend=backend), inputs, g, None, True)

    kernel_in = {n: nan_padded(t).requires_grad_(True) for n, t in base.items()}
    with poison_outputs():
        out, grads = run("triton", kernel_in, grad_out)
    same_out, same_grads = run("torch", _leaves(base), grad_out)
    ref_out, ref_grads = _run_seq(patch_embed_reference, _leaves(_cast16(base), HIGH), grad_out.to(HIGH), None, True)
    assert out.dtype == same_out.dtype == torch.float32
    _within_factor("out", out, ref_out, same_out, vitkern.testing.FORWARD_FACTOR)
    for name in base:
        assert grads[name].dtype == same_grads[name].dtype == torch.float32, name
        _within_factor(f"d{name}", grads[name], ref_grads[name], same_grads[name], vitkern.testing.GRAD_FACTOR)


def _cast16(base):
    """The values autocast gives the conv inputs (x, weight, bias rounded to fp16), for the float64 oracle."""
    return {n: (t if n.startswith(("prefix", "pos")) else t.half().float()) for n, t in base.items()}
