"""vitkern.ops.attention / attention_packed (Triton) against vitkern.reference.attention_reference.

CPU: Triton's interpreter, fp32 and fp16, tiny shapes. GPU: the same tests on CUDA
tensors plus bf16 and the ViT sequence lengths.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.backends import BackendUnavailableError
from vitkern.ops import attention, attention_packed
from vitkern.ops.attention import dropout_keep_mask
from vitkern.reference import attention_reference
from vitkern.testing import poison_outputs

from helpers import FP32_RTOL, TF32_RTOL, assert_close, nan_padded, rel_err, use_gpu_tiles

attention_module = importlib.import_module("vitkern.ops.attention")  # the module, not the function it exports
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HIGH = torch.float32 if ON_GPU else torch.float64
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# (B, h, Nq, Nk, d, bias shape or None, bias needs grad)
CASES = [
    pytest.param(2, 3, 50, 50, 64, None, False, id="n50-d64"),
    pytest.param(1, 2, 197, 197, 80, None, False, id="n197-d80"),
    pytest.param(2, 2, 77, 13, 32, (2, 1, 77, 13), True, id="nq77-nk13-bias-bcast-heads"),
    pytest.param(1, 1, 1, 3, 16, None, False, id="nq1-nk3"),
    pytest.param(2, 2, 5, 70, 96, (2, 2, 5, 70), True, id="nq5-nk70-d96-full-bias"),
    pytest.param(1, 2, 65, 129, 128, (65, 129), False, id="d128-bias-2d-nograd"),
    pytest.param(3, 1, 33, 45, 16, (1, 1, 1, 45), True, id="key-bias-bcast-b3"),
]


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,NQ,NK,D,bias_shape,bias_grad", CASES)
def test_forward_and_every_gradient_match_reference(B, H, NQ, NK, D, bias_shape, bias_grad, dtype):
    base = [_rand((B, H, NQ, D), dtype), _rand((B, H, NK, D), dtype), _rand((B, H, NK, D), dtype)]
    bias = _rand(bias_shape, dtype) if bias_shape else None
    grad_out = _rand((B, H, NQ, D), dtype)

    # NaN around every input catches out-of-bounds reads; poisoned outputs catch unwritten elements.
    q, k, v = (nan_padded(t).requires_grad_(True) for t in base)
    b = nan_padded(bias).requires_grad_(bias_grad) if bias is not None else None
    leaves = [q, k, v] + ([b] if bias_grad else [])
    with poison_outputs():
        out = attention(q, k, v, attn_bias=b, backend="triton")
        grads = _grads(out, leaves, grad_out)

    def reference(dt):
        ins = [t.detach().to(dt).requires_grad_(True) for t in base]
        rb = bias.detach().to(dt).requires_grad_(bias_grad) if bias is not None else None
        ref = attention_reference(*ins, attn_bias=rb)
        return ref, _grads(ref, ins + ([rb] if bias_grad else []), grad_out.to(dt))

    ref_out, ref_grads = reference(HIGH)
    same_out, same_grads = reference(dtype) if dtype != torch.float32 else (None, [None] * len(ref_grads))
    assert out.shape == (B, H, NQ, D) and out.dtype == dtype
    assert_close("out", out, ref_out, same_out)
    for name, g, rg, sg in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads, same_grads):
        assert_close(name, g, rg, sg, grad=True)


@pytest.fixture
def gpu_tiles(monkeypatch):
    use_gpu_tiles(monkeypatch, attention_module, "_fwd_config", "_bwd_configs", "_dbias_config")


# Tiles the GPU launches get that the interpreter's 64x64 tiles do not cover: 128x32 forward and 32x32
# dQ and dK/dV (d32 with bias), 64x32 forward (d>64 with bias), 64x64 dQ with 32x64 dK/dV (16-bit
# d>64); fp32 takes 32x64 for both.
GPU_TILE_CASES = [
    pytest.param(1, 2, 45, 70, 80, None, False, id="nq45-nk70-d80"),
    pytest.param(2, 2, 45, 70, 32, (1, 2, 45, 70), True, id="nq45-nk70-d32-bias-bcast-batch"),
    pytest.param(1, 2, 70, 45, 96, (1, 1, 70, 45), True, id="nq70-nk45-d96-bias-bcast-heads"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,NQ,NK,D,bias_shape,bias_grad", GPU_TILE_CASES)
def test_gpu_tiles_match_reference(B, H, NQ, NK, D, bias_shape, bias_grad, dtype, gpu_tiles):
    test_forward_and_every_gradient_match_reference(B, H, NQ, NK, D, bias_shape, bias_grad, dtype)


def test_views_of_packed_qkv_are_read_in_place():
    B, N, H, D = 2, 50, 3, 32
    qkv = _rand((B, N, 3 * H * D), torch.float32)
    q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # strided views, unit stride on d
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="triton")
    ref = attention_reference(q.double(), k.double(), v.double())
    assert_close("out", out, ref)
    # The output is a (B, h, N, d) view of a (B, N, h, d) buffer: merging heads costs no copy.
    merged = out.transpose(1, 2).reshape(B, N, H * D)
    assert merged.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_entry_point_matches_reference(dtype, bias):
    B, N, H, D = 2, 37, 2, 48
    qkv_base = _rand((B, N, 3 * H * D), dtype)
    bias_base = _rand((1, H, N, N), dtype) if bias else None
    grad_out = _rand((B, N, H * D), dtype)
    qkv = nan_padded(qkv_base).requires_grad_(True)  # strided over (B, N), unit stride on channels
    b = bias_base.clone().requires_grad_(True) if bias else None
    with poison_outputs():
        out = attention_packed(qkv, H, attn_bias=b, backend="triton")
        grads = _grads(out, [qkv] + ([b] if bias else []), grad_out)
    assert out.shape == (B, N, H * D) and out.is_contiguous()

    def reference(dt):
        t = qkv_base.detach().to(dt).requires_grad_(True)
        rb = bias_base.detach().to(dt).requires_grad_(True) if bias else None
        q, k, v = t.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        ref = attention_reference(q, k, v, attn_bias=rb).transpose(1, 2).reshape(B, N, H * D)
        return ref, _grads(ref, [t] + ([rb] if bias else []), grad_out.to(dt))

    ref_out, ref_grads = reference(HIGH)
    same_out, same_grads = reference(dtype) if dtype != torch.float32 else (None, [None, None])
    assert_close("out", out, ref_out, same_out)
    for name, g, rg, sg in zip(["dqkv", "dbias"], grads, ref_grads, same_grads):
        assert_close(name, g, rg, sg, grad=True)


def test_single_key_returns_v_and_zero_score_gradients():
    """With one key softmax is exactly 1: out = v, dv = dout, and dq = dk = 0 (up to rounding)."""
    q, k, v = (_rand((2, 2, n, 16), torch.float32).requires_grad_(True) for n in (1, 1, 1))
    g = _rand((2, 2, 1, 16), torch.float32)
    out = attention(q, k, v, backend="triton")
    dq, dk, dv = _grads(out, [q, k, v], g)
    torch.testing.assert_close(out, v.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dv, g, rtol=1e-6, atol=1e-6)
    scale = g.abs().max() * v.abs().max() * k.abs().max()
    assert dq.abs().max() <= 1e-6 * scale and dk.abs().max() <= 1e-6 * scale


def test_rows_whose_first_key_blocks_are_all_masked():
    """-inf bias over the first 70 keys of some rows: the online softmax must not produce NaN."""
    B, H, N, D = 1, 2, 100, 32
    bias = torch.zeros(N, N, device=DEVICE)
    bias[::2, :70] = float("-inf")
    q, k, v = (_rand((B, H, N, D), torch.float32).requires_grad_(True) for _ in range(3))
    g = _rand((B, H, N, D), torch.float32)
    out = attention(q, k, v, attn_bias=bias, backend="triton")
    grads = _grads(out, [q, k, v], g)
    hi = [t.detach().to(HIGH).requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*hi, attn_bias=bias.to(HIGH))
    for name, a, r in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *_grads(ref, hi, g.to(HIGH))]):
        assert_close(name, a, r, grad=name != "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_near_uniform_attention_keeps_dq_accurate(dtype):
    """Nearly identical keys make dP ≈ delta: delta's rounding must not be amplified into dq."""
    B, H, NQ, NK, D = 1, 2, 60, 49, 32
    k_mean = torch.randn(1, 1, 1, D, device=DEVICE) * 3
    base = [_rand((B, H, NQ, D), dtype), (k_mean + 0.05 * torch.randn(B, H, NK, D, device=DEVICE)).to(dtype),
            _rand((B, H, NK, D), dtype)]
    g = _rand((B, H, NQ, D), dtype)
    ins = [t.clone().requires_grad_(True) for t in base]
    out = attention(*ins, backend="triton")
    grads = _grads(out, ins, g)
    hi = [t.to(HIGH).requires_grad_(True) for t in base]
    ref = attention_reference(*hi)
    ref_grads = _grads(ref, hi, g.to(HIGH))
    lo = [t.clone().requires_grad_(True) for t in base]
    same = attention_reference(*lo) if dtype != torch.float32 else None
    same_grads = _grads(same, lo, g) if same is not None else [None] * 3
    for name, a, r, sg in zip(["dq", "dk", "dv"], grads, ref_grads, same_grads):
        assert_close(name, a, r, sg, grad=True)


def test_near_constant_values_keep_dk_and_dbias_as_accurate_as_pytorch():
    """Nearly identical values make dP ≈ delta: the dK/dV and d(bias) kernels must use the delta the dQ
    kernel corrected, or their fp32 error exceeds PyTorch's own fp32 backward."""
    B, H, NQ, NK, D = 2, 2, 60, 49, 32
    v_mean = torch.randn(1, 1, 1, D, device=DEVICE) * 3
    base = [_rand((B, H, NQ, D), torch.float32), _rand((B, H, NK, D), torch.float32),
            v_mean + 0.02 * torch.randn(B, H, NK, D, device=DEVICE), _rand((1, H, NQ, NK), torch.float32)]
    g = _rand((B, H, NQ, D), torch.float32)

    def grads(fn, dtype):
        ins = [t.to(dtype).requires_grad_(True) for t in base]
        return _grads(fn(*ins[:3], attn_bias=ins[3]), ins, g.to(dtype))

    ours = grads(lambda *a, **kw: attention(*a, backend="triton", **kw), torch.float32)
    exact = grads(attention_reference, HIGH)
    pytorch = grads(attention_reference, torch.float32)
    for name, a, r, t in zip(["dq", "dk", "dv", "dbias"], ours, exact, pytorch):
        budget = max(rel_err(t, r), FP32_RTOL) if not ON_GPU else TF32_RTOL
        assert rel_err(a, r) <= budget, f"{name}: {rel_err(a, r):.2e} > {budget:.2e}"


def test_custom_scale_and_long_sequence():
    B, H, N, D = 1, 1, 577, 16
    q, k, v = (_rand((B, H, N, D), torch.float32).requires_grad_(True) for _ in range(3))
    g = torch.randn(B, H, N, D, device=DEVICE)
    out = attention(q, k, v, scale=0.3, backend="triton")
    grads = _grads(out, [q, k, v], g)
    hi = [t.detach().to(HIGH).requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*hi, scale=0.3)
    for name, a, r in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *_grads(ref, hi, g.to(HIGH))]):
        assert_close(name, a, r, grad=name != "out")


def test_expanded_upstream_gradient_from_sum():
    q, k, v = (_rand((2, 2, 20, 32), torch.float32).requires_grad_(True) for _ in range(3))
    attention(q, k, v, backend="triton").sum().backward()
    hi = [t.detach().to(HIGH).requires_grad_(True) for t in (q, k, v)]
    attention_reference(*hi).sum().backward()
    for name, a, r in zip("qkv", (q, k, v), hi):
        assert_close(f"d{name}", a.grad, r.grad, grad=True)
    qkv = _rand((2, 20, 3 * 64), torch.float32).requires_grad_(True)
    attention_packed(qkv, 2, backend="triton").sum().backward()
    t = qkv.detach().to(HIGH).requires_grad_(True)
    qq, kk, vv = t.view(2, 20, 3, 2, 32).permute(2, 0, 3, 1, 4)
    attention_reference(qq, kk, vv).sum().backward()
    assert_close("dqkv", qkv.grad, t.grad, grad=True)


def test_deterministic_bit_for_bit():
    q, k, v = (_rand((2, 3, 70, 32), torch.float32) for _ in range(3))
    bias = _rand((1, 3, 70, 70), torch.float32)
    g = _rand((2, 3, 70, 32), torch.float32)
    runs = []
    for _ in range(2):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = attention(*ins[:3], attn_bias=ins[3], backend="triton")
        runs.append([out, *_grads(out, ins, g)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- #
# Dropout: in-kernel random numbers
# --------------------------------------------------------------------------- #
def _dropout_reference(q, k, v, bias, mask, is_causal=False):
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    return (scores.softmax(-1) * mask) @ v


@pytest.mark.parametrize("with_bias,is_causal,tiles", [(False, False, "interpreter"), (True, False, "interpreter"),
                                                       (True, True, "interpreter"), (True, False, "gpu"),
                                                       (True, True, "gpu")])
def test_dropout_equals_reference_with_the_kernels_mask(with_bias, is_causal, tiles, request):
    if tiles == "gpu":  # d32 with bias and dropout: 128x32 forward, 32x32 dK/dV tiles
        request.getfixturevalue("gpu_tiles")
    B, H, NQ, NK, D, p = 2, 2, 45, 70, 32, 0.3
    ins = [_rand((B, H, n, D), torch.float32).requires_grad_(True) for n in (NQ, NK, NK)]
    bias = _rand((1, H, NQ, NK), torch.float32).requires_grad_(True) if with_bias else None
    g = _rand((B, H, NQ, D), torch.float32)
    torch.manual_seed(1234)
    out = attention(*ins, attn_bias=bias, dropout_p=p, is_causal=is_causal, backend="triton")
    leaves = ins + ([bias] if with_bias else [])
    grads = _grads(out, leaves, g)
    torch.manual_seed(1234)  # the op draws its seed from torch's default generator
    seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())
    mask = dropout_keep_mask(seed, (B, H, NQ, NK), p, device=DEVICE).to(HIGH)
    torch.testing.assert_close(mask.unique(), torch.tensor([0.0, 1 / (1 - p)], dtype=HIGH, device=DEVICE))
    hi = [t.detach().to(HIGH).requires_grad_(True) for t in leaves]
    ref = _dropout_reference(hi[0], hi[1], hi[2], hi[3] if with_bias else None, mask, is_causal)
    assert_close("out", out, ref)
    for name, a, r in zip(["dq", "dk", "dv", "dbias"], grads, _grads(ref, hi, g.to(HIGH))):
        assert_close(name, a, r, grad=True)


def test_dropout_reproducible_under_seed_and_varies_without():
    q, k, v = (_rand((1, 2, 40, 16), torch.float32) for _ in range(3))
    torch.manual_seed(7)
    a = attention(q, k, v, dropout_p=0.5, backend="triton")
    torch.manual_seed(7)
    b = attention(q, k, v, dropout_p=0.5, backend="triton")
    c = attention(q, k, v, dropout_p=0.5, backend="triton")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_unbiased_scaling(p):
    n = 256 * 256 * 2
    mask = dropout_keep_mask(99, (1, 2, 256, 256), p, device=DEVICE)
    keep = (mask > 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep - (1 - p)) < 5 * sigma, f"keep rate {keep:.4f} vs {1 - p}"
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / (1 - p)  # E[mask] = 1: unbiased
    # Different (batch·head) and query rows draw different numbers.
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0, 0], mask[0, 0, 1])


def test_dropout_output_is_unbiased():
    """Averaged over seeds, dropout's output tends to the dropout-free output."""
    q, k, v = (_rand((1, 1, 8, 16), torch.float32) for _ in range(3))
    exact = attention_reference(q.double(), k.double(), v.double())
    runs = torch.stack([attention(q, k, v, dropout_p=0.3, backend="triton").double() for _ in range(200)])
    err = (runs.mean(0) - exact).abs()
    stderr = runs.std(0) / math.sqrt(runs.shape[0])
    assert (err < 5 * stderr + 1e-6).all(), f"max error {err.max():.3e} vs 5 stderr {5 * stderr.max():.3e}"


# --------------------------------------------------------------------------- #
# GPU: bf16 and the ViT sequence lengths
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.parametrize("n,d", [(197, 64), (577, 64), (1025, 64), (257, 80), (50, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_vit_lengths_on_gpu(n, d, dtype):
    B, H = 4, 6
    base = [_rand((B, H, n, d), dtype) for _ in range(3)]
    g = _rand((B, H, n, d), dtype)
    ins = [t.clone().requires_grad_(True) for t in base]
    with poison_outputs():
        out = attention(*ins, backend="triton")
        grads = _grads(out, ins, g)
    hi = [t.float().requires_grad_(True) for t in base]
    lo = [t.clone().requires_grad_(True) for t in base]
    ref, same = attention_reference(*hi), attention_reference(*lo)
    ref_grads, same_grads = _grads(ref, hi, g.float()), _grads(same, lo, g)
    assert_close("out", out, ref, same)
    for name, a, r, s in zip(["dq", "dk", "dv"], grads, ref_grads, same_grads):
        assert_close(name, a, r, s, grad=True)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def _qkv(nq=8, nk=8, d=16):
    return dict(q=torch.randn(2, 2, nq, d), k=torch.randn(2, 2, nk, d), v=torch.randn(2, 2, nk, d))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(q=torch.randn(2, 8, 16)), r"q must be 4-D"),
    (lambda a: a.update(k=torch.randn(2, 3, 8, 16)), r"must share \(B, heads\)"),
    (lambda a: a.update(v=torch.randn(2, 2, 8, 32)), r"head_dim 16 like q"),
    (lambda a: a.update(v=torch.randn(2, 2, 9, 16)), r"same number of keys"),
    (lambda a: a.update(k=torch.randn(2, 2, 8, 16, dtype=torch.float16)), r"k.dtype is torch.float16"),
    (lambda a: a.update(v=torch.randn(2, 2, 8, 16, device="meta")), r"v is on meta"),
    (lambda a: a.update(q=torch.randint(0, 3, (2, 2, 8, 16))), r"q.dtype must be one of"),
    (lambda a: a.update(is_causal=1), r"is_causal must be a bool, got 1"),
    (lambda a: a.update(attn_bias=torch.zeros(2, 2, 8, 8, dtype=torch.bool)), r"additive floating-point"),
    (lambda a: a.update(attn_bias=torch.randn(3, 8, 8)), r"attn_bias must broadcast to"),
    (lambda a: a.update(dropout_p=1.0), r"dropout_p must be a float in \[0, 1\)"),
])
def test_bad_input_raises_clear_error(change, match, backend):
    args = _qkv()
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), backend=backend, **args)


def test_packed_bad_input():
    with pytest.raises(ValueError, match=r"qkv must be a 3-D tensor"):
        attention_packed(torch.randn(2, 3, 4, 5), 2)
    with pytest.raises(ValueError, match=r"must be 3\*num_heads\*head_dim; got num_heads=5"):
        attention_packed(torch.randn(2, 10, 96), 5)


def test_forced_backend_that_cannot_run_says_why():
    args = _qkv(d=160)
    with pytest.raises(BackendUnavailableError, match=r"head_dim 160 is larger than the Triton kernels support"):
        attention(**args, backend="triton")
    assert attention(**args).shape == (2, 2, 8, 160)  # auto falls back to the reference
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run this call: vitkern._C"):
        attention(**_qkv(), backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"float32, float16 or bfloat16, got torch.float64"):
        attention(**{n: t.double() for n, t in _qkv().items()}, backend="triton")
    reasons = vitkern.backends.explain("attention", *_qkv().values())
    assert reasons["torch"] is None and reasons["cuda"]


def test_autocast_casts_like_sdpa():
    args = {n: t.to(DEVICE) for n, t in _qkv().items()}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = attention(**args, backend="torch")
    assert out.dtype == torch.bfloat16


# --------------------------------------------------------------------------- #
# torch.library registration
# --------------------------------------------------------------------------- #
def test_custom_ops_pass_opcheck():
    q, k, v = (_rand((2, 2, 20, 16), torch.float32).requires_grad_(True) for _ in range(3))
    bias = _rand((1, 2, 20, 20), torch.float32).requires_grad_(True)
    torch.library.opcheck(torch.ops.vitkern.attention_fwd.default, (q, k, v, bias, 0.25, 0.0, None))
    qkv = _rand((2, 20, 96), torch.float32).requires_grad_(True)
    torch.library.opcheck(torch.ops.vitkern.attention_packed_fwd.default, (qkv, 2, None, 0.25, 0.0, None))
    seed = torch.tensor([3])
    torch.library.opcheck(torch.ops.vitkern.attention_packed_fwd.default, (qkv, 2, bias, 0.25, 0.2, seed))


def test_torch_compile_fullgraph_forward_and_backward():
    qkv = _rand((2, 20, 96), torch.float32)
    bias = _rand((1, 2, 20, 20), torch.float32)

    def fn(t, b):
        return attention_packed(t, 2, attn_bias=b, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    g = _rand((2, 20, 32), torch.float32)
    results = []
    for f in (fn, compiled):
        ins = [qkv.clone().requires_grad_(True), bias.clone().requires_grad_(True)]
        out = f(*ins)
        results.append([out, *_grads(out, ins, g)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_flop_counter_counts_the_custom_ops_on_meta():
    from torch.utils.flop_counter import FlopCounterMode

    B, N, H, D = 8, 197, 12, 64
    qkv = torch.randn(B, N, 3 * H * D, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out, _ = torch.ops.vitkern.attention_packed_fwd(qkv, H, None, D ** -0.5, 0.0, None)
    assert counter.get_total_flops() == 4 * B * H * N * N * D
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    assert counter.get_total_flops() == 10 * B * H * N * N * D


# --------------------------------------------------------------------------- #
# int64 address arithmetic
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(ON_GPU, reason="the >2^31-element extent lives in a sparse file mapping (CPU interpreter)")
def test_head_dim_stride_whose_products_pass_int32(tmp_path):
    """q, k, v with a head-dim stride of 2^28: (d-1)·stride passes 2^31, so int32 offsets wrap.

    The views live in a sparse file mapping (untouched pages cost nothing) that starts 2^31
    elements before them, so a wrapped offset reads zeros instead of crashing."""
    B, H, N, D, s_d, start = 1, 2, 5, 16, 2 ** 28, 2 ** 31
    size = start + (D - 1) * s_d + 3 * B * H * N
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(size * 4)
    try:
        _check_in_sparse_mapping(torch.from_file(str(path), shared=True, size=size, dtype=torch.float32),
                                 B, H, N, D, s_d, start)
    finally:
        path.unlink()  # sparse, but its apparent size is 25 GB


def _check_in_sparse_mapping(big, B, H, N, D, s_d, start):
    base = [_rand((B, H, N, D), torch.float32) for _ in range(3)]
    views = []
    for i, t in enumerate(base):  # q, k, v interleaved along the token axis, d strided by 2^28
        view = big.as_strided((B, H, N, D), (H * N, N, 1, s_d), start + i * B * H * N)
        view.copy_(t)
        views.append(view.requires_grad_(True))
    g = _rand((B, H, N, D), torch.float32)
    out = attention(*views, backend="triton")
    grads = _grads(out, views, g)
    hi = [t.to(HIGH).requires_grad_(True) for t in base]
    ref = attention_reference(*hi)
    for name, a, r in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *_grads(ref, hi, g.to(HIGH))]):
        assert_close(name, a, r, grad=name != "out")


# --------------------------------------------------------------------------- #
# Empty inputs: what SDPA does
# --------------------------------------------------------------------------- #
@pytest.fixture
def no_kernel_launch(monkeypatch):
    """Fail on any launch of this module's kernels (a zero-size grid must never be launched)."""
    class _NoLaunch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            raise AssertionError(f"{self.name} launched with grid {grid}")

    names = [n for n in dir(attention_module) if n.startswith("_attn_") and n.endswith("_kernel")]
    assert len(names) == 5, names
    for name in names:
        monkeypatch.setattr(attention_module, name, _NoLaunch(name))


EMPTY = [  # (B, h, Nq, Nk, d)
    pytest.param(0, 2, 5, 5, 16, id="batch0"),
    pytest.param(2, 0, 5, 5, 16, id="heads0"),
    pytest.param(2, 2, 0, 5, 16, id="nq0"),
    pytest.param(2, 2, 5, 0, 16, id="nk0"),
    pytest.param(2, 2, 5, 5, 0, id="d0"),
]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,H,NQ,NK,D", EMPTY)
def test_empty_inputs_give_what_sdpa_gives(B, H, NQ, NK, D, backend, bias, is_causal, no_kernel_launch):
    """Empty in, empty out (zeros when there are no keys), forward and backward, no kernel launch."""
    base = [_rand((B, H, NQ, D), torch.float32), _rand((B, H, NK, D), torch.float32),
            _rand((B, H, NK, D), torch.float32), _rand((1, H, NQ, NK), torch.float32)]
    g = _rand((B, H, NQ, D), torch.float32)

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_(True) for t in base]
        out = fn(*ins[:3], attn_bias=ins[3] if bias else None)
        return [out, *torch.autograd.grad(out, ins[:3] + ins[3:] * bias, g.to(dtype), allow_unused=True)]

    causal = {"is_causal": True} if is_causal else {}
    ours = run(lambda *a, **kw: attention(*a, backend=backend, **causal, **kw), torch.float32)
    # SDPA itself: a bias and is_causal do not combine there, and with a bias its CPU kernel is the
    # math one; with the causal mask as a bias the expected values are the same.
    causal_bias = torch.zeros(NQ, NK, dtype=HIGH, device=DEVICE).masked_fill(
        torch.ones(NQ, NK, dtype=torch.bool, device=DEVICE).triu(1), float("-inf")) if is_causal else None

    def sdpa(q, k, v, attn_bias=None):
        mask = attn_bias if causal_bias is None else (causal_bias if attn_bias is None else attn_bias + causal_bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    expected = run(sdpa, HIGH)
    if bias and expected[4] is None:  # SDPA's B = 0 / h = 0 shortcut drops the bias from the graph
        expected[4] = torch.zeros_like(base[3], dtype=HIGH)
    for name, a, e in zip(["out", "dq", "dk", "dv", "dbias"], ours, expected):
        assert a.shape == e.shape, f"{name}: {tuple(a.shape)} vs SDPA's {tuple(e.shape)}"
        assert torch.equal(a.double(), e.double()), name  # empty, or exactly 0 (no keys)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,N,H,D", [(0, 7, 2, 16), (2, 0, 2, 16), (2, 7, 2, 0)], ids=["batch0", "n0", "d0"])
def test_packed_empty_inputs(B, N, H, D, backend, no_kernel_launch):
    qkv = _rand((B, N, 3 * H * D), torch.float32).requires_grad_(True)
    bias = _rand((1, H, N, N), torch.float32).requires_grad_(True)
    for causal in ({}, {"is_causal": True}):
        out = attention_packed(qkv, H, attn_bias=bias, backend=backend, **causal)
        assert out.shape == (B, N, H * D)
        dqkv, dbias = torch.autograd.grad(out, [qkv, bias], torch.randn_like(out))
        assert dqkv.shape == qkv.shape and dbias.shape == bias.shape
        assert not dqkv.any() and not dbias.any()


def test_empty_inputs_pass_opcheck():
    """The custom ops' real kernels (no launch) and fake implementations agree on empty inputs."""
    bias = _rand((1, 2, 5, 5), torch.float32).requires_grad_(True)
    for shape_q, shape_k in [((0, 2, 5, 16), (0, 2, 5, 16)), ((2, 2, 5, 16), (2, 2, 0, 16))]:
        q = _rand(shape_q, torch.float32).requires_grad_(True)
        k, v = (_rand(shape_k, torch.float32).requires_grad_(True) for _ in range(2))
        b = bias[:, :, :, : shape_k[2]]
        torch.library.opcheck(torch.ops.vitkern.attention_fwd.default, (q, k, v, b, 0.25, 0.0, None, True))
        out, lse = torch.ops.vitkern.attention_fwd(q, k, v, b, 0.25, 0.0, None, True)
        bwd_args = [t.detach() for t in (torch.randn_like(out).transpose(1, 2), q, k, v, out.transpose(1, 2), lse, b)]
        torch.library.opcheck(torch.ops.vitkern.attention_bwd.default, (*bwd_args, 0.25, 0.0, None, True, True))
    qkv = _rand((0, 5, 96), torch.float32).requires_grad_(True)
    torch.library.opcheck(torch.ops.vitkern.attention_packed_fwd.default, (qkv, 2, None, 0.25, 0.0, None, True))


# --------------------------------------------------------------------------- #
# Bias gradient in the bias's own shape
# --------------------------------------------------------------------------- #
BIAS_PATTERNS = [(2, 3, 70, 75), (1, 3, 70, 75), (2, 1, 70, 75), (70, 75), (2, 1, 1, 75), (1, 3, 1, 75),
                 (75,), (2, 3, 70, 1), (1, 3, 70, 1), (70, 1), (2, 1, 1, 1), (1, 1, 1, 1), (2, 3, 1, 1)]


def _assert_bias_grad(name, actual, expected, full_grad, bias_shape):
    """A bias broadcast over the keys shifts whole score rows, which softmax ignores: its exact
    gradient is 0, so it must be 0 to within fp32 rounding of the dS it sums."""
    shape4 = (1,) * (4 - len(bias_shape)) + tuple(bias_shape)
    if shape4[3] == 1 and full_grad.shape[-1] > 1:
        dims = [i for i in range(4) if shape4[i] == 1]
        scale = full_grad.abs().sum(dim=dims).norm().item()
        assert expected.abs().max().item() <= 1e-12 * scale, f"{name}: the reference gradient is not ~0"
        assert actual.shape == expected.shape and not torch.isnan(actual).any()
        err = actual.double().norm().item() / scale
        assert err <= FP32_RTOL, f"{name}: should be ~0, norm {err:.3e} of the summed |dS|"
    else:
        assert_close(name, actual, expected, grad=True)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bias_shape", BIAS_PATTERNS, ids=lambda s: "x".join(map(str, s)))
def test_bias_gradient_for_every_broadcast_pattern(bias_shape, is_causal):
    B, H, NQ, NK, D = 2, 3, 70, 75, 16
    base = [_rand((B, H, NQ, D), torch.float32), _rand((B, H, NK, D), torch.float32),
            _rand((B, H, NK, D), torch.float32)]
    bias = _rand(bias_shape, torch.float32)
    g = _rand((B, H, NQ, D), torch.float32)
    ins = [t.clone().requires_grad_(True) for t in base] + [bias.clone().requires_grad_(True)]
    with poison_outputs():
        out = attention(*ins[:3], attn_bias=ins[3], backend="triton", **({"is_causal": True} if is_causal else {}))
        grads = _grads(out, ins, g)
    hi = [t.to(HIGH).requires_grad_(True) for t in base] + [bias.to(HIGH).requires_grad_(True)]
    ref = attention_reference(*hi[:3], attn_bias=hi[3], is_causal=is_causal)
    ref_grads = _grads(ref, hi, g.to(HIGH))
    full = bias.to(HIGH).expand(B, H, NQ, NK).clone().requires_grad_(True)
    (full_grad,) = _grads(attention_reference(*hi[:3], attn_bias=full, is_causal=is_causal), [full], g.to(HIGH))
    assert_close("out", out, ref)
    for name, a, r in zip(["dq", "dk", "dv"], grads, ref_grads):
        assert_close(name, a, r, grad=True)
    assert grads[3].shape == bias.shape and grads[3].dtype == bias.dtype
    _assert_bias_grad("dbias", grads[3], ref_grads[3], full_grad, bias_shape)


@pytest.mark.parametrize("bias_shape", [(2, 1, 1, 75), (1, 3, 70, 1), (1, 1, 1, 1)], ids=str)
def test_broadcast_bias_gradient_allocates_no_query_by_key_buffer(bias_shape, monkeypatch):
    """The launchers allocate through new_output: nothing of Nq x Nk may be among the allocations."""
    B, H, NQ, NK, D = 2, 3, 70, 75, 16
    shapes = []
    real = attention_module.new_output

    def recording(shape, **kw):
        shapes.append(tuple(shape))
        return real(shape, **kw)

    monkeypatch.setattr(attention_module, "new_output", recording)
    ins = [_rand((B, H, n, D), torch.float32).requires_grad_(True) for n in (NQ, NK, NK)]
    bias = _rand(bias_shape, torch.float32).requires_grad_(True)
    out = attention(*ins, attn_bias=bias, backend="triton")
    _grads(out, ins + [bias], torch.randn_like(out))
    assert bias_shape in shapes, shapes  # d(bias) is allocated in the bias's own shape
    assert all(s[-2:] != (NQ, NK) for s in shapes), shapes
    assert max(math.prod(s) for s in shapes) <= B * H * NK * D, shapes  # nothing larger than k itself


# --------------------------------------------------------------------------- #
# Causal attention: masked in the kernels, fully masked key blocks skipped
# --------------------------------------------------------------------------- #
CAUSAL_CASES = [  # (B, h, Nq, Nk, d, bias shape or None)
    pytest.param(2, 2, 1, 1, 16, None, id="n1"),
    pytest.param(2, 2, 50, 50, 32, None, id="n50"),
    pytest.param(1, 1, 197, 197, 16, (1, 1, 197, 197), id="n197-b1-bias"),
    pytest.param(2, 2, 50, 77, 16, (2, 1, 1, 77), id="nq50-nk77-key-bias"),
    pytest.param(2, 1, 77, 50, 32, (2, 1, 77, 50), id="nq77-nk50-bias"),
    pytest.param(1, 2, 1, 3, 16, None, id="nq1-nk3"),
    pytest.param(1, 2, 3, 1, 16, None, id="nq3-nk1"),
    pytest.param(1, 2, 130, 70, 16, (70,), id="nq130-nk70-1d-bias"),
]


def test_causal_reference_is_sdpa():
    """The reference's is_causal is SDPA's (top-left aligned for Nq != Nk)."""
    for nq, nk in [(1, 1), (5, 7), (7, 5), (1, 4), (4, 1), (50, 50)]:
        q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (nq, nk, nk))
        torch.testing.assert_close(attention_reference(q, k, v, is_causal=True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,NQ,NK,D,bias_shape", CAUSAL_CASES)
def test_causal_forward_and_every_gradient_match_reference(B, H, NQ, NK, D, bias_shape, dtype):
    base = [_rand((B, H, NQ, D), dtype), _rand((B, H, NK, D), dtype), _rand((B, H, NK, D), dtype)]
    bias = _rand(bias_shape, dtype) if bias_shape else None
    g = _rand((B, H, NQ, D), dtype)
    leaves = [nan_padded(t).requires_grad_(True) for t in base]
    b = nan_padded(bias).requires_grad_(True) if bias is not None else None
    with poison_outputs():
        out = attention(*leaves, attn_bias=b, is_causal=True, backend="triton")
        grads = _grads(out, leaves + ([b] if b is not None else []), g)

    def reference(dt):
        ins = [t.to(dt).requires_grad_(True) for t in base]
        rb = bias.to(dt).requires_grad_(True) if bias is not None else None
        ref = attention_reference(*ins, attn_bias=rb, is_causal=True)
        return ref, _grads(ref, ins + ([rb] if rb is not None else []), g.to(dt))

    ref_out, ref_grads = reference(HIGH)
    same_out, same_grads = reference(dtype) if dtype != torch.float32 else (None, [None] * len(ref_grads))
    assert_close("out", out, ref_out, same_out)  # also: no NaN, so no row is ever fully masked
    for name, a, r, sg in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads, same_grads):
        assert_close(name, a, r, sg, grad=True)


def test_causal_packed_matches_reference():
    B, N, H, D = 2, 37, 2, 16
    qkv_base = _rand((B, N, 3 * H * D), torch.float32)
    bias_base = _rand((1, H, N, N), torch.float32)
    g = _rand((B, N, H * D), torch.float32)
    qkv, b = qkv_base.clone().requires_grad_(True), bias_base.clone().requires_grad_(True)
    with poison_outputs():
        out = attention_packed(qkv, H, attn_bias=b, is_causal=True, backend="triton")
        grads = _grads(out, [qkv, b], g)
    t, rb = qkv_base.to(HIGH).requires_grad_(True), bias_base.to(HIGH).requires_grad_(True)
    q, k, v = t.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    ref = attention_reference(q, k, v, attn_bias=rb, is_causal=True).transpose(1, 2).reshape(B, N, H * D)
    assert_close("out", out, ref)
    for name, a, r in zip(["dqkv", "dbias"], grads, _grads(ref, [t, rb], g.to(HIGH))):
        assert_close(name, a, r, grad=True)


@pytest.mark.parametrize("bias", [False, True])
def test_causal_never_reads_key_blocks_past_the_diagonal(bias):
    """Keys at or past the end of the last query block's tiles are NaN: a kernel that loads any
    fully masked key block (instead of skipping it) gets NaN into its dot products."""
    D = 16
    fwd, (dq, dkdv) = attention_module._fwd_config(D), attention_module._bwd_configs(D)
    frontier = max(fwd["BLOCK_M"], *(c[b] for c in (dq, dkdv) for b in ("BLOCK_M", "BLOCK_N")))  # powers of 2
    B, H, NQ, NK = 1, 2, frontier, frontier + 37
    base = [_rand((B, H, NQ, D), torch.float32), _rand((B, H, NK, D), torch.float32),
            _rand((B, H, NK, D), torch.float32)]
    bias_base = _rand((H, NQ, NK), torch.float32)
    poisoned = [base[0], *(t.clone() for t in base[1:])]
    for t in poisoned[1:]:
        t[:, :, NQ:] = float("nan")  # keys no query can see
    ins = [t.clone().requires_grad_(True) for t in poisoned]
    b = bias_base.clone().requires_grad_(True) if bias else None
    g = _rand((B, H, NQ, D), torch.float32)
    out = attention(*ins, attn_bias=b, is_causal=True, backend="triton")
    grads = _grads(out, ins + ([b] if bias else []), g)
    hi = [t[:, :, :NQ].to(HIGH).requires_grad_(True) if i else t.to(HIGH).requires_grad_(True)
          for i, t in enumerate(base)]
    hb = bias_base[:, :, :NQ].to(HIGH).requires_grad_(True) if bias else None
    ref = attention_reference(*hi, attn_bias=hb, is_causal=True)
    ref_grads = _grads(ref, hi + ([hb] if bias else []), g.to(HIGH))
    assert_close("out", out, ref)
    assert_close("dq", grads[0], ref_grads[0], grad=True)
    for name, a, r in zip(["dk", "dv", "dbias"], grads[1:], ref_grads[1:]):
        assert torch.equal(a[..., NQ:, :] if name != "dbias" else a[..., NQ:], torch.zeros_like(
            a[..., NQ:, :] if name != "dbias" else a[..., NQ:])), f"{name}: unseen keys get a gradient"
        assert_close(name, a[..., :NQ, :] if name != "dbias" else a[..., :NQ], r, grad=True)


@pytest.mark.parametrize("is_causal", [False, True])
def test_rows_with_every_key_masked_give_zeros_like_sdpa(is_causal):
    """Causal alone always leaves key 0 visible; a -inf bias can still hide a whole row. SDPA then
    returns 0 for that row and gradients 0 from it; a NaN there would spread into every key's dK, dV."""
    B, H, NQ, NK, D = 1, 2, 100, 90, 16
    bias = _rand((H, NQ, NK), torch.float32)
    bias[:, 3] = float("-inf")  # rows hidden by the bias alone
    bias[1, 70] = float("-inf")
    bias[:, 80, :2] = float("-inf")  # with is_causal, row 80 still sees keys 2..80
    if is_causal:
        bias[0, :5, 0] = float("-inf")  # rows 0 (sees only key 0) is hidden, rows 1..4 are not
    base = [_rand((B, H, NQ, D), torch.float32), _rand((B, H, NK, D), torch.float32),
            _rand((B, H, NK, D), torch.float32), bias]
    g = _rand((B, H, NQ, D), torch.float32)
    ins = [t.clone().requires_grad_(True) for t in base]
    with poison_outputs():
        out = attention(*ins[:3], attn_bias=ins[3], backend="triton", **({"is_causal": True} if is_causal else {}))
        grads = _grads(out, ins, g)
    hi = [t.to(HIGH).requires_grad_(True) for t in base]
    mask = hi[3]
    if is_causal:
        mask = mask.masked_fill(torch.ones(NQ, NK, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    ref = F.scaled_dot_product_attention(*hi[:3], attn_mask=mask)
    ref_grads = _grads(ref, hi, g.to(HIGH))
    assert not ref[0, 0, 3].any() and not ref_grads[0][0, 0, 3].any()  # SDPA: zeros, not NaN
    assert_close("out", out, ref)
    for name, a, r in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads):
        assert_close(name, a, r, grad=True)
