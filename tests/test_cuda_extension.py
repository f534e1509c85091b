"""The compiled CUDA backend vitkern._C (csrc/): build, import, clear errors, and (on a GPU) results.

CI has nvcc but no GPU: it builds the extension (VITKERN_BUILD_CUDA=1) and sets
VITKERN_EXPECT_CUDA_EXTENSION=1, so a missing build fails here instead of skipping.
"""
import os

import pytest
import torch

from vitkern.backends import BackendUnavailableError
from vitkern.ops import patch_embed
from vitkern.reference import patch_embed_reference
from vitkern.testing import poison_outputs

from helpers import assert_close, nan_padded

if os.environ.get("VITKERN_EXPECT_CUDA_EXTENSION") == "1":
    from vitkern import _C  # must have been built
else:
    _C = pytest.importorskip("vitkern._C", reason="vitkern._C is not built (no nvcc at install time)")

ON_GPU = torch.cuda.is_available() and _C.device_count() > 0


def _call(**overrides):
    args = dict(x=1, weight=2, bias=0, cls_token=0, pos_embed=0, out=3, dtype=0, x_shape=[1, 3, 16, 16],
                x_strides=[768, 256, 16, 1], w_shape=[8, 3, 16, 16], w_strides=[768, 256, 16, 1],
                pos_strides=[0, 0], has_bias=False, has_cls=False, has_pos=False, stream=0)
    args.update(overrides)
    return _C.patch_embed_forward(**args)


def test_imports_and_reports_devices():
    assert isinstance(_C.device_count(), int) and _C.device_count() >= 0
    assert _C.runtime_version() >= 12000


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_without_a_gpu_a_call_raises_a_clear_error_instead_of_crashing():
    with pytest.raises(RuntimeError, match=r"vitkern._C: no CUDA device is available"):
        _call()


@pytest.mark.parametrize("overrides,match", [
    (dict(x_shape=[1, 3, 15, 16]), r"not divisible by the patch"),
    (dict(w_shape=[8, 4, 16, 16]), r"weight has 4 input channels but x has 3"),
    (dict(dtype=7), r"dtype code must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 7"),
    (dict(x_strides=[1, 2]), r"x_strides must have 4 strides, got 2"),
    (dict(x_shape=[0, 3, 16, 16]), r"batch must be >= 1, got 0"),
])
def test_bad_sizes_are_value_errors_before_any_launch(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_cuda_backend_on_cpu_tensors_says_why():
    x, w = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 16, 16)
    with pytest.raises(BackendUnavailableError, match=r"vitkern._C kernels need CUDA tensors"):
        patch_embed(x, w, backend="cuda")


# --------------------------------------------------------------------------- #
# GPU: results against the reference (skipped without a GPU)
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,C,H,W,P,D,cls_pos", [(2, 3, 224, 224, 16, 768, True), (3, 1, 32, 48, 8, 40, True),
                                               (2, 3, 56, 28, 4, 96, False), (1, 5, 28, 42, 14, 1000, True)])
def test_forward_matches_reference_on_gpu(B, C, H, W, P, D, cls_pos, dtype):
    dev = torch.device("cuda")
    tokens = (H // P) * (W // P) + int(cls_pos)
    base = dict(x=torch.randn(B, C, H, W, device=dev), weight=torch.randn(D, C, P, P, device=dev) * (C * P * P) ** -0.5,
                bias=torch.randn(D, device=dev), cls_token=torch.randn(1, 1, D, device=dev) if cls_pos else None,
                pos_embed=torch.randn(1, tokens, D, device=dev) if cls_pos else None)
    low = {n: (nan_padded(t.to(dtype)) if t is not None else None) for n, t in base.items()}
    with poison_outputs():
        out = patch_embed(low.pop("x"), low.pop("weight"), low.pop("bias"), backend="cuda", **low)
    same = {n: (t.to(dtype) if t is not None else None) for n, t in base.items()}
    ref = patch_embed_reference(base["x"], base["weight"], base["bias"], cls_token=base["cls_token"],
                                pos_embed=base["pos_embed"])
    ref_same = patch_embed_reference(same["x"], same["weight"], same["bias"], cls_token=same["cls_token"],
                                     pos_embed=same["pos_embed"]) if dtype != torch.float32 else None
    assert_close("out", out, ref, ref_same)
    again = patch_embed(same["x"], same["weight"], same["bias"], cls_token=same["cls_token"],
                        pos_embed=same["pos_embed"], backend="cuda")
    assert torch.equal(again, patch_embed(same["x"], same["weight"], same["bias"], cls_token=same["cls_token"],
                                          pos_embed=same["pos_embed"], backend="cuda"))


@pytest.mark.gpu
def test_cuda_backend_refuses_calls_that_need_gradients():
    x = torch.randn(1, 3, 32, 32, device="cuda")
    w = torch.randn(8, 3, 16, 16, device="cuda", requires_grad=True)
    with pytest.raises(BackendUnavailableError, match=r"forward-only so far"):
        patch_embed(x, w, backend="cuda")
    with torch.no_grad():
        assert patch_embed(x, w, backend="cuda").shape == (1, 4, 8)
