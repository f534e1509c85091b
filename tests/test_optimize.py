"""vitkern.optimize(model): swaps vitkern's drop-ins into timm models in place.

For tiny timm VisionTransformer (class token; avg pool with qk_norm), SwinTransformer (a shifted
block, and a stage on the small-grid rule) and PyramidVisionTransformerV2 (sr ratios 4 and 2;
linear attention), each with random weights (no downloads):

* exactly the expected modules are replaced, every other module is the very same object;
* state_dict keys (and order) unchanged, values equal, and the parameters ARE the old
  ``Parameter`` objects (so an optimizer built before optimize() keeps training the model);
* output and every gradient (input and all parameters, random upstream gradient) equal timm's:
  backend="torch" in float64 within 1e-10 relative; backend="triton" in float32 (Triton's
  interpreter on CPU) within helpers.assert_close of timm's float64 result;
* training flags (per module) preserved; hooks on a replaced module keep firing.

Plus: subclasses / attention without a drop-in / unsupported configurations are skipped and
reported (OptimizeWarning), a non-timm model is a no-op with a message (also without timm),
vitkern's own ViT is left alone (or gets the requested backend).
"""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from helpers import assert_close, rel_err
import vitkern
import vitkern.nn as vnn
from vitkern.convert import OptimizeWarning, convert
from vitkern.nn.window_attention import WindowAttention as VWindowAttention

timm = pytest.importorskip("timm")
from timm.layers import Attention as TimmAttention  # noqa: E402
from timm.layers import PatchEmbed as TimmPatchEmbed  # noqa: E402
from timm.models import pvt_v2, swin_transformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.timm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_RTOL = 1e-10  # float64 reference path vs timm in float64


# ----------------------------------------------------------------------------- tiny models
def _vit(**kw):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=5, **kw)


def _swin():
    # patch 4 on 32x32: stage 0 is 8x8 tokens with window 4 (block 1 shifted by 2); stage 1 is 4x4 tokens,
    # where the small-grid rule gives one 4x4 window and no shift
    return swin_transformer.SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                            window_size=4, mlp_ratio=2.0, num_classes=5, drop_path_rate=0.0)


def _pvt(linear=False):
    # 32x32: stage 0 is 8x8 tokens (sr 4 -> 2x2 keys), stage 1 is 4x4 (sr 2 -> 2x2 keys); linear: 7x7 pooled keys
    return pvt_v2.PyramidVisionTransformerV2(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), sr_ratios=(4, 2),
                                             mlp_ratios=(2, 2), num_classes=5, linear=linear)


SWIN_BLOCKS = ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
# id -> (builder, {path: vitkern class expected there})
MODELS = {
    "vit-cls": (lambda: _vit(),
                {"patch_embed": vnn.PatchEmbed, "blocks.0.attn": vnn.Attention, "blocks.1.attn": vnn.Attention}),
    "vit-avg-qknorm": (lambda: _vit(class_token=False, global_pool="avg", qkv_bias=True, qk_norm=True),
                       {"patch_embed": vnn.PatchEmbed, "blocks.0.attn": vnn.Attention,
                        "blocks.1.attn": vnn.Attention}),
    "swin": (_swin, {"patch_embed": vnn.PatchEmbed, **{b: vnn.SwinTransformerBlock for b in SWIN_BLOCKS}}),
    "pvt": (lambda: _pvt(), {"stages.0.blocks.0.attn": vnn.SRAttention, "stages.1.blocks.0.attn": vnn.SRAttention}),
    "pvt-linear": (lambda: _pvt(linear=True),
                   {"stages.0.blocks.0.attn": vnn.SRAttention, "stages.1.blocks.0.attn": vnn.SRAttention}),
}
SUPPORTED_TIMM = (TimmPatchEmbed, TimmAttention, swin_transformer.SwinTransformerBlock, pvt_v2.Attention)


def _randomise(model: nn.Module) -> nn.Module:
    """O(1) activations: weight matrices ~ N(0, 1/fan_in); biases, tokens, tables and norm affines random
    (timm starts them at 0 / 1 / ~0.02, which would hide mistakes)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name.endswith("weight"):
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


_REF_CACHE = {}


def _reference(model_id):
    """(float64 timm model, input, upstream grad, output, {name: grad}) - built once per model id."""
    if model_id not in _REF_CACHE:
        torch.manual_seed(1)
        model = _randomise(MODELS[model_id][0]()).double().eval()
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        out, grads, g = _run(model, x, None)
        _REF_CACHE[model_id] = (model, x, g, out, grads)
    return _REF_CACHE[model_id]


def _run(model, x, g):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    if g is None:
        g = torch.randn_like(out)  # random upstream gradient, never .sum()
    out.backward(g.to(out.dtype))
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return out, grads, g


def _optimize(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizeWarning)  # the supported models convert without any skip
        return vitkern.optimize(model, **kw)


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("model_id", list(MODELS))
def test_replaces_exactly_the_supported_modules_and_keeps_everything_else(model_id):
    ref, *_ = _reference(model_id)
    expected = MODELS[model_id][1]
    model = copy.deepcopy(ref)
    before_modules = dict(model.named_modules())
    before_params = dict(model.named_parameters())
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}

    assert _optimize(model, backend="torch") is model

    after_modules = dict(model.named_modules())
    # (a) the same module tree (names); replaced paths hold the vitkern class; everything else the same object
    assert list(after_modules) == list(before_modules)
    swin_attn = {f"{b}.attn" for b, cls in expected.items() if cls is vnn.SwinTransformerBlock}
    for name, mod in after_modules.items():
        if name in expected:
            assert type(mod) is expected[name], name
            assert mod.backend == "torch"
        elif name in swin_attn:
            assert type(mod) is VWindowAttention, name  # the block's attention container (adopts timm's children)
        else:
            assert mod is before_modules[name], f"{name} ({type(mod).__name__}) was changed"
    counts = {}
    for mod in after_modules.values():
        counts[type(mod)] = counts.get(type(mod), 0) + 1
    for cls in set(expected.values()):
        assert counts[cls] == sum(c is cls for c in expected.values()), cls.__name__
    assert not any(type(m) in SUPPORTED_TIMM for m in model.modules())
    # (b) state_dict: same keys in the same order, same values; the parameters are the very same objects
    sd = model.state_dict()
    assert list(sd) == list(before_sd)
    for k, v in before_sd.items():
        assert torch.equal(sd[k], v), k
    after_params = dict(model.named_parameters())
    assert list(after_params) == list(before_params)
    for name, p in after_params.items():
        assert p is before_params[name], f"{name} is a new Parameter"
    # attributes the forward depends on were carried over
    for name, cls in expected.items():
        old, new = before_modules[name], after_modules[name]
        if cls is vnn.SwinTransformerBlock:
            for attr in ("input_resolution", "window_size", "shift_size", "target_shift_size", "window_area",
                         "always_partition", "dynamic_mask"):
                a, b = getattr(new, attr), getattr(old, attr)
                if isinstance(b, (list, tuple)):
                    a, b = tuple(a), tuple(b)
                assert a == b, attr
            assert torch.equal(new.attn.relative_position_index, old.attn.relative_position_index)
            assert new.attn.scale == old.attn.scale
        elif cls is vnn.PatchEmbed:
            for attr in ("img_size", "grid_size", "num_patches", "patch_size", "flatten", "strict_img_size",
                         "dynamic_img_pad"):
                assert getattr(new, attr) == getattr(old, attr), attr
            assert new.output_fmt == old.output_fmt
        else:
            assert (new.num_heads, new.head_dim, new.scale) == (old.num_heads, old.head_dim, old.scale)
    if model_id == "swin":  # the cases the brief asks for really occur
        blocks = {b: model.get_submodule(b) for b in SWIN_BLOCKS}
        assert blocks["layers.0.blocks.1"].shift_size == (2, 2)
        assert blocks["layers.1.blocks.1"].target_shift_size == (2, 2)
        assert blocks["layers.1.blocks.1"].shift_size == (0, 0) and blocks["layers.1.blocks.1"].window_size == (4, 4)


# ----------------------------------------------------------------------------- parity
def _check_parity(model_id, backend, dtype):
    ref, x, g, out_ref, grads_ref = _reference(model_id)
    model = copy.deepcopy(ref).to(dtype)
    _optimize(model, backend=backend)
    out, grads, _ = _run(model, x.to(dtype), g)
    assert out.dtype == dtype
    assert list(grads) == list(grads_ref)
    # parameters whose true gradient is zero (e.g. the key part of a bias) compare against this scale
    scale = max(gr.norm().item() for gr in grads_ref.values())
    if dtype == torch.float64:
        assert rel_err(out, out_ref) <= TORCH_RTOL, rel_err(out, out_ref)
    else:
        assert_close("output", out, out_ref)
    for name, gr in grads_ref.items():
        got = grads[name]
        assert got is not None, f"{name}: no gradient"
        if gr.norm().item() <= 1e-9 * scale:  # ~zero true gradient: compare near zero
            assert got.norm().item() <= 1e-6 * scale, name
        elif dtype == torch.float64:
            assert rel_err(got, gr) <= TORCH_RTOL, (name, rel_err(got, gr))
        else:
            assert_close(f"grad {name}", got, gr, grad=True)


@pytest.mark.parametrize("model_id", list(MODELS))
def test_output_and_every_gradient_equal_timm_torch_float64(model_id):
    _check_parity(model_id, "torch", torch.float64)


@pytest.mark.parametrize("model_id", list(MODELS))
def test_output_and_every_gradient_equal_timm_triton_float32(model_id):
    _check_parity(model_id, "triton", torch.float32)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("model_id", ["vit-cls", "swin", "pvt"])
def test_training_flags_preserved_and_optimizer_built_before_keeps_working(model_id):
    ref, x, g, *_ = _reference(model_id)
    timm_model = copy.deepcopy(ref).train()
    next(iter(timm_model.children())).eval()  # mixed flags must survive too
    model = copy.deepcopy(timm_model)
    flags = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # built BEFORE optimize()
    opt_ref = torch.optim.SGD(timm_model.parameters(), lr=0.5, momentum=0.9)

    _optimize(model, backend="torch")

    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    for _ in range(2):
        for m, o in ((timm_model, opt_ref), (model, opt)):
            o.zero_grad()
            m(x).backward(g)
            o.step()
    sd, sd_ref = model.state_dict(), timm_model.state_dict()
    assert list(sd) == list(sd_ref)
    changed, initial = 0, ref.state_dict()
    for k, v in sd_ref.items():
        assert rel_err(sd[k], v) <= TORCH_RTOL, k
        changed += not torch.equal(v, initial[k])
    assert changed > 0.9 * len(sd_ref)  # the steps did update (nearly) every tensor
    # per-module train()/eval() still works on the converted model
    model.eval()
    assert not any(m.training for m in model.modules())


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's bias-table interpolation (torch.searchsorted)
def test_timm_model_methods_still_work_after_optimize():
    """Swin set_input_size (new grid and window, resampled bias tables) and ViT dynamic_img_size."""
    torch.manual_seed(2)
    swin = _randomise(_swin()).double().eval()
    opt = _optimize(copy.deepcopy(swin), backend="torch")
    for m in (swin, opt):
        m.set_input_size(img_size=(48, 32), window_size=6)
    x = torch.randn(1, 3, 48, 32, dtype=torch.float64)
    assert opt.layers[0].blocks[1].window_size == (6, 6) and opt.layers[0].blocks[1].shift_size == (3, 3)
    assert rel_err(opt(x), swin(x)) <= TORCH_RTOL
    vit = _randomise(_vit(dynamic_img_size=True)).double().eval()
    opt = _optimize(copy.deepcopy(vit), backend="torch")
    x = torch.randn(1, 3, 40, 24, dtype=torch.float64)
    assert rel_err(opt(x), vit(x)) <= TORCH_RTOL


def test_frozen_parameters_stay_frozen():
    model = _vit()
    model.patch_embed.requires_grad_(False)
    model.blocks[1].attn.qkv.weight.requires_grad_(False)
    _optimize(model)
    assert not model.patch_embed.proj.weight.requires_grad and not model.patch_embed.proj.bias.requires_grad
    assert not model.blocks[1].attn.qkv.weight.requires_grad and model.blocks[1].attn.qkv.bias.requires_grad
    assert model.blocks[0].attn.qkv.weight.requires_grad


# ----------------------------------------------------------------------------- skipped and reported
class _ScaledAttention(TimmAttention):
    """A user subclass with extra behaviour: must not be replaced."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return 2 * super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


def test_subclass_is_skipped_and_reported_rest_is_converted():
    model = _vit().eval()
    custom = _ScaledAttention(32, num_heads=2, qkv_bias=True)
    custom.load_state_dict(model.blocks[0].attn.state_dict())
    model.blocks[0].attn = custom
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    with pytest.warns(OptimizeWarning, match=r"(?s)blocks\.0\.attn.*_ScaledAttention.*subclass"):
        assert vitkern.optimize(model, backend="torch") is model
    assert model.blocks[0].attn is custom
    assert type(model.blocks[1].attn) is vnn.Attention and type(model.patch_embed) is vnn.PatchEmbed
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    report = convert(model)
    assert [s[0] for s in report.skipped] == ["blocks.0.attn"] and not report.converted


def test_attention_without_drop_in_is_skipped_and_reported():
    model = _vit(attn_layer="diff")  # timm's DiffAttention: no vitkern drop-in
    attn_types = [type(b.attn) for b in model.blocks]
    report = convert(model, backend="torch")
    assert [c[0] for c in report.converted] == ["patch_embed", ""]  # "": the ViT's embedding (fused)
    assert [(s[0], s[2]) for s in report.skipped] == [
        ("blocks.0.attn", "no vitkern drop-in for this attention module"),
        ("blocks.1.attn", "no vitkern drop-in for this attention module")]
    assert [type(b.attn) for b in model.blocks] == attn_types
    with pytest.warns(OptimizeWarning, match="DiffAttention"):
        vitkern.optimize(_vit(attn_layer="diff"))


def test_unsupported_configuration_is_skipped_with_the_reason():
    model = _vit()
    old = model.patch_embed.proj
    padded = nn.Conv2d(3, 32, kernel_size=8, stride=8, padding=1)  # not what the fused patchify computes
    model.patch_embed.proj = padded
    with pytest.warns(OptimizeWarning, match=r"(?s)patch_embed.*unsupported configuration.*padding"):
        vitkern.optimize(model)
    assert type(model.patch_embed) is TimmPatchEmbed and model.patch_embed.proj is padded
    assert all(type(b.attn) is vnn.Attention for b in model.blocks)
    assert old is not padded


def test_pvt_overlap_patch_embed_is_listed_not_warned():
    report = convert(_pvt())
    assert [p for p, _ in report.not_covered] == ["patch_embed", "stages.1.downsample"]
    assert not report.skipped
    assert "OverlapPatchEmbed" in report.summary()


def test_verbose_prints_the_summary(capsys):
    _optimize(_vit(), verbose=True)
    out = capsys.readouterr().out
    assert "converted 4 module(s)" in out and "blocks.1.attn" in out  # with the ViT's fused embedding and "vitkern.nn.PatchEmbed" in out


def test_verbose_shows_the_summary_once(capsys, caplog):
    """verbose=True prints the summary once: not again as a log record, nor as the warning's text."""
    import logging
    with caplog.at_level(logging.INFO, logger="vitkern.convert"):
        _optimize(_vit(), verbose=True)
    out = capsys.readouterr().out
    assert out.count("vitkern.optimize(") == 1
    assert not [r for r in caplog.records if "vitkern.optimize(" in r.getMessage()]

    model = nn.Sequential(nn.Linear(4, 8))
    with pytest.warns(OptimizeWarning) as record:
        vitkern.optimize(model, verbose=True)
    out = capsys.readouterr().out
    assert out.count("converted nothing") == 1
    assert all("converted nothing (" not in str(w.message) for w in record)  # the warning points at the print
    assert any("see the summary printed above" in str(w.message) for w in record)


# ----------------------------------------------------------------------------- other models
def test_non_timm_model_is_a_noop_with_a_message():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.MultiheadAttention(8, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    with pytest.warns(OptimizeWarning, match="converted nothing.*no timm PatchEmbed"):
        assert vitkern.optimize(model) is model
    assert list(model.modules()) == modules
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_without_timm_optimize_is_a_noop_with_a_message():
    code = (
        "import sys; sys.modules['timm'] = None  # makes 'import timm' fail\n"
        "import warnings, torch, vitkern\n"
        "assert callable(vitkern.optimize) and vitkern.optimize.__name__ == 'optimize'\n"
        "m = torch.nn.Linear(2, 2)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert vitkern.optimize(m) is m\n"
        "msg = str(w[0].message)\n"
        "assert 'timm is not installed' in msg and 'converted nothing' in msg, msg\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_import_vitkern_and_optimize_do_not_import_timm():
    code = (
        "import sys, torch, vitkern\n"
        "vitkern.optimize(torch.nn.Linear(2, 2), backend='torch')\n"
        "assert 'timm' not in sys.modules, 'vitkern imported timm'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_vitkern_vit_is_left_alone_or_gets_the_requested_backend():
    from vitkern.models import ViT

    model = ViT(img_size=16, patch_size=8, num_hiddens=16, mlp_num_hiddens=32, num_heads=2, num_blks=1,
                emb_dropout=0.0, blk_dropout=0.0, backend="auto")
    modules = list(model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vitkern.optimize(model) is model
    assert list(model.modules()) == modules
    assert all(m.backend == "auto" for m in model.modules() if hasattr(m, "backend"))
    report = convert(model, backend="torch")
    assert not report.converted and report.backend_set and report.model is model
    assert list(model.modules()) == modules
    assert all(m.backend == "torch" for m in model.modules() if hasattr(m, "backend"))
    with pytest.raises(ValueError, match="backend must be one of"):
        vitkern.optimize(model, backend="cuda-ish")


def test_second_call_switches_backend_of_converted_modules():
    model = _optimize(_vit())
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"auto"}
    _optimize(model, backend="torch")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"torch"}


def test_root_module_and_shared_module_and_hooks():
    attn = TimmAttention(16, num_heads=2, qkv_bias=True).double().eval()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    seen = []
    handle = attn.register_forward_hook(lambda mod, args, out: seen.append(type(mod)))
    expected = attn(x)
    new = _optimize(attn, backend="torch")  # the root itself is replaced: the replacement is returned
    assert type(new) is vnn.Attention and new.qkv is attn.qkv
    assert rel_err(new(x), expected) <= TORCH_RTOL
    assert seen == [TimmAttention, vnn.Attention]  # the hook moved along
    handle.remove()
    new(x)
    assert len(seen) == 2
    shared = TimmAttention(16, num_heads=2)
    seq = nn.Sequential(shared, nn.GELU(), shared)
    _optimize(seq)
    assert type(seq[0]) is vnn.Attention and seq[0] is seq[2]


# ----------------------------------------------------------------------------- timm workflows
@pytest.mark.parametrize("model_id", ["vit-cls", "swin", "pvt"])
def test_fx_feature_extraction_treats_drop_ins_as_leaves(model_id):
    """timm's FX feature extraction (torchvision's create_feature_extractor with timm's leaf modules)
    traces a converted model, calling each vitkern module as one leaf; outputs and input gradients
    equal the eager model's."""
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    from timm.models import get_notrace_functions, get_notrace_modules

    torch.manual_seed(0)
    model = _randomise(MODELS[model_id][0]()).eval()
    _optimize(model)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = fe.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = fe.create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    leaves = {type(m) for m in fx_model.modules()}
    assert leaves & {vnn.PatchEmbed, vnn.Attention, vnn.SwinTransformerBlock, vnn.SRAttention}
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out_fx = fx_model(x)[eval_nodes[-1]]
    out = model(x)
    assert torch.equal(out_fx, out)
    g = torch.randn_like(out)
    (gx_fx,) = torch.autograd.grad(out_fx, x, g)
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(gx_fx, gx)


def test_forward_intermediates_of_a_converted_vit_equal_timm():
    torch.manual_seed(0)
    ref = _randomise(_vit()).double().eval()
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    final_ref, inter_ref = ref.forward_intermediates(x)
    final, inter = model.forward_intermediates(x)
    assert rel_err(final, final_ref) <= TORCH_RTOL
    assert len(inter) == len(inter_ref) and all(rel_err(a, b) <= TORCH_RTOL for a, b in zip(inter, inter_ref))
