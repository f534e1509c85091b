"""vitkern.nn.PatchEmbed: a drop-in for timm.layers.PatchEmbed.

Parity with timm (same state_dict -> same output and every gradient), the timm
behaviours it must reproduce (strict / dynamic-pad / floor / output formats / norm),
bad input, set_input_size, and torch.compile(fullgraph=True).

Reference: timm's module in float64. backend="triton" runs in float32 (on CPU in
Triton's interpreter), backend="torch" in float32 and float64.
"""
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import assert_close
from vitkern import ops
from vitkern.nn import PatchEmbed
from vitkern.testing import poison_outputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- helpers
def _randomise(module: nn.Module) -> None:
    """Every parameter random and non-zero-mean (LayerNorm starts at 1/0, conv bias near 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 0.1)


def _run(module, x, grad):
    """Forward, then backward with the given upstream gradient; returns (out, {name: grad})."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({f"param {n.removeprefix('_orig_mod.')}": p.grad for n, p in module.named_parameters()})
    return out, grads


def _timm_pair(kwargs, backend, dtype, direction="timm->vitkern"):
    """A randomised timm PatchEmbed in float64 and a vitkern one with the same weights in ``dtype``."""
    timm_layers = pytest.importorskip("timm.layers")
    if direction == "timm->vitkern":
        ref = timm_layers.PatchEmbed(**kwargs).to(DEVICE, torch.float64)
        _randomise(ref)
        mod = PatchEmbed(**kwargs, backend=backend).to(DEVICE, dtype)
        assert list(mod.state_dict()) == list(ref.state_dict())
        mod.load_state_dict(ref.state_dict(), strict=True)
    else:
        mod = PatchEmbed(**kwargs, backend=backend).to(DEVICE, dtype)
        _randomise(mod)
        ref = timm_layers.PatchEmbed(**kwargs).to(DEVICE)
        assert list(mod.state_dict()) == list(ref.state_dict())
        ref.load_state_dict(mod.state_dict(), strict=True)
        ref = ref.to(torch.float64)
    return ref, mod


def _compare_with_timm(kwargs, in_hw, backend, dtype, batch=2, direction="timm->vitkern"):
    ref, mod = _timm_pair(kwargs, backend, dtype, direction)
    x64 = torch.randn(batch, kwargs.get("in_chans", 3), *in_hw, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        grad = torch.randn_like(ref(x64))  # random upstream gradient, never out.sum()
    out_ref, grads_ref = _run(ref, x64, grad)
    with poison_outputs():  # any element a kernel forgets to write shows up as NaN
        out, grads = _run(mod, x64.to(dtype), grad)
    assert out.dtype == dtype
    assert_close("output", out, out_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():
        assert grads[name] is not None, f"{name}: no gradient"
        assert_close(f"grad {name}", grads[name], g_ref, grad=True)
    return ref, mod, out


# (id, constructor kwargs, input (H, W), batch)
CASES = [
    ("nonsquare-p16-c3-d24", dict(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=24), (32, 48), 2),
    ("p8-c1-d40-nobias", dict(img_size=(16, 24), patch_size=8, in_chans=1, embed_dim=40, bias=False), (16, 24), 2),
    ("rect-patch-4x8", dict(img_size=(12, 16), patch_size=(4, 8), in_chans=3, embed_dim=24), (12, 16), 2),
    ("layernorm", dict(img_size=(16, 24), patch_size=8, embed_dim=40, norm_layer=nn.LayerNorm), (16, 24), 2),
    ("flatten-false-nchw", dict(img_size=(16, 24), patch_size=8, embed_dim=24, flatten=False), (16, 24), 2),
    ("nhwc-layernorm", dict(img_size=(16, 24), patch_size=8, embed_dim=24, output_fmt="NHWC",
                            norm_layer=nn.LayerNorm), (16, 24), 2),
    ("nlc", dict(img_size=(16, 24), patch_size=8, embed_dim=24, output_fmt="NLC"), (16, 24), 2),
    ("ncl", dict(img_size=(16, 24), patch_size=8, embed_dim=24, output_fmt="NCL"), (16, 24), 2),
    ("not-strict-other-size", dict(img_size=(32, 32), patch_size=8, embed_dim=24, strict_img_size=False),
     (16, 40), 2),
    ("dynamic-pad-strict", dict(img_size=(20, 37), patch_size=8, embed_dim=24, dynamic_img_pad=True), (20, 37), 2),
    ("dynamic-pad-not-strict-nhwc", dict(img_size=(32, 32), patch_size=8, embed_dim=24, dynamic_img_pad=True,
                                         strict_img_size=False, output_fmt="NHWC"), (13, 27), 2),
    ("floor-strict", dict(img_size=(36, 50), patch_size=16, embed_dim=24), (36, 50), 2),
    ("img-size-none-floor", dict(img_size=None, patch_size=8, embed_dim=24), (19, 30), 2),
    ("batch1", dict(img_size=(16, 24), patch_size=8, embed_dim=40), (16, 24), 1),
]
CASE_IDS = [c[0] for c in CASES]

BACKEND_DTYPES = [
    pytest.param("triton", torch.float32, id="triton-fp32"),
    pytest.param("torch", torch.float32, id="torch-fp32"),
    pytest.param("torch", torch.float64, id="torch-fp64"),
]


# ----------------------------------------------------------------------------- timm parity
@pytest.mark.timm
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_timm(case, backend, dtype):
    _, kwargs, in_hw, batch = case
    _compare_with_timm(kwargs, in_hw, backend, dtype, batch=batch)


@pytest.mark.timm
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES[:2])
def test_state_dict_vitkern_into_timm(backend, dtype):
    """The other direction: vitkern's randomised weights loaded into timm (strict)."""
    kwargs = dict(img_size=(16, 24), patch_size=8, embed_dim=40, norm_layer=nn.LayerNorm)
    _compare_with_timm(kwargs, (16, 24), backend, dtype, direction="vitkern->timm")


@pytest.mark.timm
def test_attributes_match_timm():
    timm_layers = pytest.importorskip("timm.layers")
    for kwargs in [c[1] for c in CASES] + [{}]:
        ref, mod = timm_layers.PatchEmbed(**kwargs), PatchEmbed(**kwargs)
        for attr in ("patch_size", "img_size", "grid_size", "num_patches", "flatten", "output_fmt",
                     "strict_img_size", "dynamic_img_pad"):
            assert getattr(mod, attr) == getattr(ref, attr), (attr, kwargs)
        assert isinstance(mod.proj, nn.Conv2d) and type(mod.norm) is type(ref.norm)
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding"):
            assert getattr(mod.proj, a) == getattr(ref.proj, a)
        assert (mod.proj.bias is None) == (ref.proj.bias is None)
        assert {k: v.shape for k, v in mod.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert mod.feat_ratio() == ref.feat_ratio() and mod.feat_ratio(False) == ref.feat_ratio(False)
        for hw in [(13, 27), (32, 48)]:
            assert mod.dynamic_feat_size(hw) == ref.dynamic_feat_size(hw)


def test_defaults_and_signature():
    import inspect

    params = inspect.signature(PatchEmbed.__init__).parameters
    expected = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                    output_fmt=None, bias=True, strict_img_size=True, dynamic_img_pad=False, device=None,
                    dtype=None)
    assert list(params)[1:len(expected) + 1] == list(expected)
    for name, default in expected.items():
        assert params[name].default == default, name
        assert params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params["backend"].kind is inspect.Parameter.KEYWORD_ONLY and params["backend"].default == "auto"
    m = PatchEmbed(device="meta")  # timm's defaults: ViT-B/16 at 224
    assert (m.img_size, m.grid_size, m.num_patches) == ((224, 224), (14, 14), 196)
    assert m.proj.weight.shape == (768, 3, 16, 16)


@pytest.mark.timm
def test_floor_case_ignores_trailing_pixels_without_copy(monkeypatch):
    """img_size not divisible by the patch under strict_img_size: timm's Conv2d drops the trailing
    pixels. They must be neither read (NaN there stays out of the output) nor copied, and get zero grad."""
    kwargs = dict(img_size=(20, 21), patch_size=8, embed_dim=24)
    ref, mod = _timm_pair(kwargs, "triton", torch.float32)
    x = torch.randn(2, 3, 20, 21, dtype=torch.float64, device=DEVICE)
    x[..., 16:, :] = float("nan")
    x[..., :, 16:] = float("nan")

    seen = {}
    real_op = ops.patch_embed

    def spy(img, *args, **kwargs):
        seen["x"] = img
        return real_op(img, *args, **kwargs)

    monkeypatch.setattr(ops, "patch_embed", spy)
    grad = torch.randn(2, 4, 24, dtype=torch.float64, device=DEVICE)
    out_ref, g_ref = _run(ref, x, grad)
    out, g = _run(mod, x.float(), grad)
    assert seen["x"].shape == (2, 3, 16, 16)
    assert seen["x"].stride() == (3 * 20 * 21, 20 * 21, 21, 1)  # a view into the 20x21 input, not a copy
    assert_close("output", out, out_ref)
    for name in g_ref:
        if name != "x":
            assert_close(f"grad {name}", g[name], g_ref[name], grad=True)
    assert torch.all(g["x"][..., 16:, :] == 0) and torch.all(g["x"][..., :, 16:] == 0)
    assert_close("grad x", g["x"][..., :16, :16], g_ref["x"][..., :16, :16], grad=True)


@pytest.mark.timm
def test_strided_input():
    """A non-contiguous (channels-last, sliced) input, read in place through its strides."""
    kwargs = dict(img_size=(16, 24), patch_size=8, embed_dim=24)
    ref, mod = _timm_pair(kwargs, "triton", torch.float32)
    base = torch.randn(2, 3, 20, 30, dtype=torch.float64, device=DEVICE).to(memory_format=torch.channels_last)
    x = base[..., 2:18, 3:27]
    assert not x.is_contiguous()
    grad = torch.randn(2, 6, 24, dtype=torch.float64, device=DEVICE)
    out_ref, g_ref = _run(ref, x, grad)
    out, g = _run(mod, x.float(), grad)  # _run's clone keeps the channels-last strides
    assert_close("output", out, out_ref)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], grad=True)


# ----------------------------------------------------------------------------- set_input_size
@pytest.mark.timm
def test_set_input_size_matches_timm():
    kwargs = dict(img_size=(32, 48), patch_size=16, embed_dim=24)
    ref, mod = _timm_pair(kwargs, "triton", torch.float32)
    for m in (ref, mod):
        m.set_input_size(img_size=(16, 24), patch_size=8)
    for attr in ("patch_size", "img_size", "grid_size", "num_patches"):
        assert getattr(mod, attr) == getattr(ref, attr), attr
    assert isinstance(mod.proj, nn.Conv2d) and mod.proj.weight.shape == (24, 3, 8, 8)
    # timm resamples in float32, so compare against the float64 module's resampled weights at fp32 level
    assert_close("resampled proj.weight", mod.proj.weight, ref.proj.weight)
    mod.load_state_dict(ref.state_dict())  # then the same forward/backward as timm at the new size
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64, device=DEVICE)
    grad = torch.randn(2, 6, 24, dtype=torch.float64, device=DEVICE)
    out_ref, g_ref = _run(ref, x, grad)
    out, g = _run(mod, x.float(), grad)
    assert_close("output", out, out_ref)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], grad=True)
    # image size only
    ref.set_input_size(img_size=40)
    mod.set_input_size(img_size=40)
    assert (mod.img_size, mod.grid_size, mod.num_patches) == (ref.img_size, ref.grid_size, ref.num_patches)


def test_set_input_size_without_timm_raises(monkeypatch):
    mod = PatchEmbed(img_size=32, patch_size=16, embed_dim=8)
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.layers", None)
    with pytest.raises(ImportError, match="resample.*timm"):
        mod.set_input_size(patch_size=8)
    assert mod.patch_size == (16, 16) and mod.proj.weight.shape == (8, 3, 16, 16)  # unchanged
    mod.set_input_size(img_size=48)  # no resampling: works without timm
    assert mod.grid_size == (3, 3)


def test_imports_without_timm():
    code = ("import sys; sys.modules['timm'] = None\n"
            "import vitkern.nn, torch\n"
            "m = vitkern.nn.PatchEmbed(img_size=16, patch_size=8, embed_dim=8, backend='torch')\n"
            "assert m(torch.randn(1, 3, 16, 16)).shape == (1, 4, 8)\n"
            "assert 'timm' not in [k for k, v in sys.modules.items() if v is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


# ----------------------------------------------------------------------------- empty batch
@pytest.mark.timm
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES[:2])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("layernorm", "nhwc-layernorm", "floor-strict",
                                                                "dynamic-pad-strict")], ids=lambda c: c[0])
def test_empty_batch_matches_timm(case, backend, dtype):
    """B = 0 as timm's module: an empty output of the right shape, an empty input gradient and
    zero parameter gradients (compared with timm's)."""
    _, kwargs, in_hw, _ = case
    _, _, out = _compare_with_timm(kwargs, in_hw, backend, dtype, batch=0)
    assert out.shape[0] == 0 and out.dim() >= 3


@pytest.mark.timm
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_converted_timm_vit_with_an_empty_batch_gives_empty_logits(backend):
    """A timm ViT converted by vitkern.optimize returns (0, num_classes) for a batch of 0, as timm's
    does, with zero parameter gradients (timm's in float64 as the reference)."""
    import copy

    import vitkern
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_classes=5).to(DEVICE, torch.float64).eval()
    _randomise(ref)
    model = vitkern.optimize(copy.deepcopy(ref).float(), backend=backend)
    assert isinstance(model.patch_embed, PatchEmbed)
    x = torch.randn(0, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    grad = torch.randn(0, 5, dtype=torch.float64, device=DEVICE)
    out_ref, g_ref = _run(ref, x, grad)
    with poison_outputs():
        out, g = _run(model, x.float(), grad)
    assert out.shape == out_ref.shape == (0, 5)
    assert g.keys() == g_ref.keys()
    for name, gr in g_ref.items():
        assert g[name] is not None and g[name].shape == gr.shape, name
        assert torch.equal(g[name], gr.float()), name


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    strict = PatchEmbed(img_size=(16, 24), patch_size=8, embed_dim=8, backend="torch")
    with pytest.raises(ValueError, match=r"\(H, W\)=\(16, 16\).*img_size=\(16, 24\).*strict_img_size"):
        strict(torch.randn(1, 3, 16, 16))
    loose = PatchEmbed(img_size=(16, 24), patch_size=8, embed_dim=8, strict_img_size=False, backend="torch")
    with pytest.raises(ValueError, match=r"\(H, W\)=\(16, 20\).*divisible by patch_size=\(8, 8\).*dynamic_img_pad"):
        loose(torch.randn(1, 3, 16, 20))
    with pytest.raises(ValueError, match=r"x has 1 channels.*in_chans=3"):
        strict(torch.randn(1, 1, 16, 24))
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\), got shape \(3, 16, 24\)"):
        strict(torch.randn(3, 16, 24))
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cudnn'"):
        PatchEmbed(backend="cudnn")


@pytest.mark.timm
def test_bad_input_is_rejected_by_timm_too():
    """We raise ValueError exactly where timm fails (AssertionError / RuntimeError)."""
    timm_layers = pytest.importorskip("timm.layers")
    for kwargs, shape in [(dict(img_size=(16, 24), patch_size=8, embed_dim=8), (1, 3, 16, 16)),
                          (dict(img_size=(16, 24), patch_size=8, embed_dim=8, strict_img_size=False), (1, 3, 16, 20)),
                          (dict(img_size=(16, 24), patch_size=8, embed_dim=8), (1, 1, 16, 24))]:
        x = torch.randn(shape)
        with pytest.raises((AssertionError, RuntimeError)):
            timm_layers.PatchEmbed(**kwargs)(x)
        with pytest.raises(ValueError):
            PatchEmbed(**kwargs, backend="torch")(x)


# ----------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_matches_eager():
    """fullgraph=True: no graph breaks through padding, the custom op, the NHWC view and LayerNorm."""
    backend = "triton"
    mod = PatchEmbed(img_size=(32, 32), patch_size=8, embed_dim=24, norm_layer=nn.LayerNorm, output_fmt="NHWC",
                     strict_img_size=False, dynamic_img_pad=True, backend=backend).to(DEVICE)
    _randomise(mod)
    x = torch.randn(2, 3, 13, 19, device=DEVICE)
    grad = torch.randn(2, 2, 3, 24, device=DEVICE)
    out_eager, g_eager = _run(mod, x, grad)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True)
    out_c, g_c = _run(compiled, x, grad)
    torch.testing.assert_close(out_c, out_eager, rtol=1e-5, atol=1e-5)
    assert g_c.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_c[name], g_eager[name], rtol=1e-5, atol=1e-5, msg=name)
