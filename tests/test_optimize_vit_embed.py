"""vitkern.optimize on timm VisionTransformer / VisionTransformerDistilled: the whole embedding in one op.

For tiny timm ViTs in every embedding configuration the conversion covers (class token or not,
register tokens, ``no_embed_class``, no position embedding, ``dynamic_img_size`` at other image
sizes (timm's position-embedding resampling) and with ``dynamic_img_pad``, ``pos_drop`` in
training, a bias-free patch projection) and for DeiT's distilled model:

* output and every gradient (input, every parameter; random upstream gradient) equal timm's,
  float64 on the torch backend within 1e-10 relative; float32 on the Triton backend (interpreter)
  and on ``backend="auto"`` against timm's float64 result (helpers.assert_close);
* the embedding is one ``vitkern.ops.patch_embed`` call: outside it the forward runs no add and
  no ``aten.cat`` over the batch's tokens (recorded with a TorchDispatchMode up to the first
  block); the only cats are the (1, T, D) join of timm's separate token parameters (CLS with
  register or distillation tokens) into the op's one prefix, and timm's own resampling of the
  position embedding; with only a CLS token there is none. The same holds for timm's
  vit_base_patch16_224, vit_small_patch16_224 with 4 register tokens and
  deit_base_distilled_patch16_224 (built on the meta device). On the Triton backend the whole
  forward runs exactly one ``vitkern::patch_embed_fwd`` and no other cat (these three models
  too, with one block at 32x32); forward_intermediates and timm's FX feature extraction use
  the same one call;
* the model object, state_dict keys, Parameter objects and token attributes stay; no_weight_decay,
  forward_features (grad checkpointing, masks) / forward_head / forward_intermediates (prefix
  tokens included), features_only, set_distilled_training, set_input_size, deepcopy and
  pickling keep working; the converted classes compile under torch.jit.script (on timm's
  embedding); ``model.patch_embed(img)`` alone
  still gives the patch tokens;
* configurations the op cannot fuse keep timm's embedding and are reported with the reason.
"""
import copy
import io
import types
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_close, rel_err
from test_optimize import _optimize  # optimize(), failing on any skip
import vitkern
import vitkern.nn as vnn
from vitkern.convert import OptimizeWarning, convert
from vitkern.testing import randomise_parameters

timm = pytest.importorskip("timm")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from vitkern.models import timm_vit  # noqa: E402

pytestmark = pytest.mark.timm

TORCH_RTOL = 1e-10  # float64 torch backend vs timm in float64


def _vit(cls=VisionTransformer, **kw):
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
          "num_classes": 5, **kw}
    return cls(**kw)


# id -> (builder, input (H, W)); the default image is 32x32 (a 4x4 grid)
VARIANTS = {
    "cls": (lambda: _vit(), (32, 32)),
    "gap-no-class-token": (lambda: _vit(class_token=False, global_pool="avg"), (32, 32)),
    "cls-reg2": (lambda: _vit(reg_tokens=2), (32, 32)),
    "reg2-no-class-token": (lambda: _vit(class_token=False, reg_tokens=2, global_pool="avg"), (32, 32)),
    "cls-reg3-no-embed-class": (lambda: _vit(reg_tokens=3, no_embed_class=True), (32, 32)),
    "no-embed-class-pre-norm": (lambda: _vit(no_embed_class=True, pre_norm=True), (32, 32)),  # proj bias=False
    "no-pos-embed": (lambda: _vit(pos_embed="none", reg_tokens=1), (32, 32)),
    "no-pos-no-prefix": (lambda: _vit(pos_embed="none", class_token=False, global_pool="avg"), (32, 32)),
    "dynamic": (lambda: _vit(dynamic_img_size=True), (40, 24)),  # 5x3 grid: pos_embed resampled from 4x4
    "dynamic-native-size": (lambda: _vit(dynamic_img_size=True, reg_tokens=1), (32, 32)),
    "dynamic-pad": (lambda: _vit(dynamic_img_size=True, dynamic_img_pad=True), (36, 18)),  # padded to 40x24
    "dynamic-no-embed-class-reg": (lambda: _vit(dynamic_img_size=True, no_embed_class=True, reg_tokens=1),
                                   (24, 40)),
    "img-not-divisible": (lambda: _vit(img_size=35), (35, 35)),  # timm's conv ignores the last 3 rows/cols
    "distilled": (lambda: _vit(VisionTransformerDistilled), (32, 32)),
    # (timm's VisionTransformerDistilled with no_embed_class=True makes a pos_embed its own forward refuses)
    "distilled-dynamic": (lambda: _vit(VisionTransformerDistilled, dynamic_img_size=True), (40, 24)),
}
TOKEN_PARAMS = ("cls_token", "reg_token", "dist_token", "pos_embed")


def _randomise(model):
    randomise_parameters(model)
    with torch.no_grad():  # tokens and position embedding O(1), like the patch tokens (a wrong row shows)
        for name in TOKEN_PARAMS:
            p = getattr(model, name, None)
            if p is not None:
                p.copy_(0.5 * torch.randn_like(p))
    return model


_REF = {}


def _reference(vid):
    """(float64 timm model in eval mode, input (2, 3, H, W)) - built once per variant."""
    if vid not in _REF:
        torch.manual_seed(3)
        model = _randomise(VARIANTS[vid][0]()).double().eval()
        x = torch.randn(2, 3, *VARIANTS[vid][1], dtype=torch.float64)
        _REF[vid] = (model, x)
    return _REF[vid]


def _run(model, x, g=None, fn=None):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = (fn or model)(x)
    if g is None:
        g = torch.randn_like(out)  # random upstream gradient, never .sum()
    out.backward(g.to(out.dtype))
    grads = {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return out, grads, g


def _compare(out, grads, out_ref, grads_ref, dtype):
    assert list(grads) == list(grads_ref)
    if dtype == torch.float64:
        assert rel_err(out, out_ref) <= TORCH_RTOL, rel_err(out, out_ref)
    else:
        assert_close("output", out, out_ref)
    for name, gr in grads_ref.items():
        got = grads[name]
        if gr is None:  # timm itself gives none (e.g. a parameter its forward does not use)
            assert got is None, name
            continue
        assert got is not None, f"{name}: no gradient"
        assert gr.norm() > 0, f"{name}: zero reference gradient (the test could not see a wrong one)"
        if dtype == torch.float64:
            assert rel_err(got, gr) <= TORCH_RTOL, (name, rel_err(got, gr))
        else:
            assert_close(f"grad {name}", got, gr, grad=True)


def _check_parity(vid, backend, dtype, fn=None):
    ref, x = _reference(vid)
    _check_parity_model(ref, x, fn, backend=backend, dtype=dtype)


def _check_parity_model(ref, x, fn=None, *, backend="torch", dtype=torch.float64):
    """optimize(copy of ref) in dtype: fn(model, x) (default model(x)) and every gradient equal timm's."""
    out_ref, grads_ref, g = _run(ref, x, fn=fn and (lambda t: fn(ref, t)))
    model = copy.deepcopy(ref).to(dtype)
    _optimize(model, backend=backend)
    assert type(model) is timm_vit.CONVERTED[type(ref)]
    out, grads, _ = _run(model, x.to(dtype), g, fn=fn and (lambda t: fn(model, t)))
    assert out.dtype == dtype
    _compare(out, grads, out_ref, grads_ref, dtype)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("vid", list(VARIANTS))
def test_output_and_every_gradient_equal_timm_torch_float64(vid):
    _check_parity(vid, "torch", torch.float64)


@pytest.mark.parametrize("vid", ["cls", "cls-reg3-no-embed-class", "dynamic-pad", "distilled"])
def test_forward_features_and_head_equal_timm(vid):
    _check_parity(vid, "torch", torch.float64, fn=lambda m, t: m.forward_head(m.forward_features(t), pre_logits=True))


def test_training_with_pos_drop_equals_timm_with_the_same_seed():
    """pos_drop (p > 0, training) runs on the op's output: same dropout draws as timm's on its sum; then
    timm's PatchDropout, with the same draws too."""
    torch.manual_seed(3)
    ref = _randomise(_vit(pos_drop_rate=0.5, patch_drop_rate=0.5, reg_tokens=1)).double().train()
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(11)
    out_ref, grads_ref, g = _run(ref, x)
    torch.manual_seed(11)
    out, grads, _ = _run(model, x, g)
    _compare(out, grads, out_ref, grads_ref, torch.float64)
    torch.manual_seed(12)  # and it does drop: another seed gives another output
    assert not torch.allclose(model(x), out)
    # timm applies pos_drop only with a position embedding
    no_pos = _randomise(_vit(pos_drop_rate=0.5, pos_embed="none")).double().train()
    want = no_pos(x)
    _optimize(no_pos, backend="torch")
    assert rel_err(no_pos(x), want) <= TORCH_RTOL


@pytest.mark.parametrize("vid", ["cls", "gap-no-class-token", "cls-reg2", "cls-reg3-no-embed-class",
                                 "no-embed-class-pre-norm", "no-pos-embed", "dynamic", "dynamic-pad",
                                 "dynamic-no-embed-class-reg", "img-not-divisible", "distilled", "distilled-dynamic"])
def test_output_and_every_gradient_triton_float32(vid):
    _check_parity(vid, "triton", torch.float32)


@pytest.mark.parametrize("vid", ["cls-reg2", "distilled"])
def test_output_and_every_gradient_auto_float32(vid):
    _check_parity(vid, "auto", torch.float32)


# ----------------------------------------------------------------------------- one op
class _Recorder(TorchDispatchMode):
    """The aten ops run, except inside vitkern.ops.patch_embed (whose calls are counted)."""

    def __init__(self):
        super().__init__()
        self.ops, self.calls, self.inside = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append((func, args))
        return func(*args, **(kwargs or {}))


def _record_embedding(model, x, monkeypatch, fn=None):
    """Run model(x) (or fn(x)), recording the aten ops from the start up to the first block."""
    rec = _Recorder()
    real = vitkern.ops.patch_embed

    def counted(*args, **kwargs):
        rec.calls.append(kwargs)
        rec.inside += 1
        try:
            return real(*args, **kwargs)
        finally:
            rec.inside -= 1

    monkeypatch.setattr(vitkern.ops, "patch_embed", counted)
    active = []

    def stop_recording(*_):
        if active:
            active.pop().__exit__(None, None, None)

    hook = model.blocks[0].register_forward_pre_hook(stop_recording)
    try:
        with torch.no_grad():
            active.append(rec.__enter__())
            (fn or model)(x)
    finally:
        stop_recording()
        hook.remove()
    return rec


def _assert_one_op(model, rec, batch):
    assert len(rec.calls) == 1, f"{len(rec.calls)} patch_embed calls"
    call = rec.calls[0]
    tokens = type(model)._prefix_tokens(model)  # the token parameters timm writes before the patches
    assert (call["prefix_tokens"] is not None) == bool(tokens)
    assert (call["pos_embed"] is not None) == (model.pos_embed is not None)
    assert call["pos_embed_covers_prefix"] == (not model.no_embed_class)
    names = [str(func) for func, _ in rec.ops]
    assert not any("add" in n for n in names), names  # no separate position-embedding add
    cats = [args[0] for func, args in rec.ops if func is torch.ops.aten.cat.default]
    # never a cat over the batch's tokens: only (1, k, D) rows derived from parameters (the token parameters
    # joined into the op's one prefix; timm's resampling joining the position embedding's prefix rows back)
    assert batch > 1 and all(t.shape[0] == 1 for ts in cats for t in ts), [[tuple(t.shape) for t in ts] for ts in cats]
    joins = [ts for ts in cats if [id(t) for t in ts] == [id(t) for t in tokens]]
    assert len(joins) == (len(tokens) > 1)
    resampled = model.dynamic_img_size and model.pos_embed is not None and not model.no_embed_class
    assert len(cats) - len(joins) <= resampled, "a cat other than the prefix join and timm's resampling"
    return cats


@pytest.mark.parametrize("vid", list(VARIANTS))
def test_embedding_is_one_patch_embed_call(vid, monkeypatch):
    ref, x = _reference(vid)
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")
    rec = _record_embedding(model, x, monkeypatch)
    cats = _assert_one_op(model, rec, x.shape[0])
    if not model.dynamic_img_size:  # no resampling: only the prefix join, when timm has two token parameters
        assert len(cats) == (len(type(model)._prefix_tokens(model)) > 1)
    rec = _record_embedding(model, x, monkeypatch, fn=lambda t: model.forward_intermediates(t, indices=1))
    assert len(_assert_one_op(model, rec, x.shape[0])) == len(cats)  # forward_intermediates: the same fused embedding
    timm_rec = _record_embedding(ref, x, monkeypatch)  # the recorder sees timm's cat and add
    names = [str(f) for f, _ in timm_rec.ops]
    assert any("add" in n for n in names) == (ref.pos_embed is not None), names
    assert any("cat" in n for n in names) == (ref.num_prefix_tokens > 0 or ref.pos_embed is None), names


def _named(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw)


NAMED = {
    "vit_base_patch16_224": {},
    "vit_small_patch16_224.reg4": {"reg_tokens": 4},  # timm 1.0.31 has no .reg4 tag: the config it names
    "deit_base_distilled_patch16_224": {},
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_models_run_the_embedding_as_one_op(name, monkeypatch):
    model = _named(name.split(".")[0], **NAMED[name]).eval()
    report = convert(model, backend="torch")
    assert ("", f"{type(model).__mro__[2].__module__}.{type(model).__mro__[2].__qualname__}",
            f"vitkern.models.timm_vit.{type(model).__name__}") in report.converted
    assert not report.skipped
    x = torch.empty(2, 3, 224, 224, device="meta")
    rec = _record_embedding(model, x, monkeypatch)
    cats = _assert_one_op(model, rec, 2)
    assert len(cats) == (0 if name == "vit_base_patch16_224" else 1)


@pytest.mark.parametrize("vid", ["cls", "cls-reg2", "distilled", *NAMED])
def test_triton_forward_runs_no_cat_and_one_kernel_op(vid):
    """On the Triton backend the op is opaque: the whole forward's aten ops hold no cat of tokens (the named
    timm models with one block at 32x32, on CPU in the interpreter)."""
    if vid in NAMED:
        torch.manual_seed(0)
        model = timm.create_model(vid.split(".")[0], pretrained=False, img_size=32, depth=1, **NAMED[vid]).eval()
        x = torch.randn(2, 3, 32, 32)
    else:
        ref, x = _reference(vid)
        model = copy.deepcopy(ref).float()
    _optimize(model, backend="triton")
    rec = _Recorder()
    with torch.no_grad(), rec:
        model(x.float())
    names = [str(f) for f, _ in rec.ops]
    assert sum(n.startswith("vitkern.patch_embed_fwd") for n in names) == 1, names
    cats = [args for f, args in rec.ops if f is torch.ops.aten.cat.default]
    assert all(all(t.shape[0] == 1 for t in a[0]) for a in cats), names  # at most the (1, k, D) prefix join
    assert len(cats) == (vid not in ("cls", "vit_base_patch16_224"))


# ----------------------------------------------------------------------------- the model stays timm's
def test_conversion_keeps_object_state_dict_parameters_and_attributes():
    ref, x = _reference("cls-reg2")
    model = copy.deepcopy(ref)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    tokens = {n: getattr(model, n) for n in ("cls_token", "reg_token", "pos_embed")}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before optimize()
    assert _optimize(model, backend="torch") is model
    assert isinstance(model, VisionTransformer) and model.backend == "torch"
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters()) and list(dict(model.named_parameters())) == list(params)
    assert all(getattr(model, n) is t for n, t in tokens.items())
    assert model.no_weight_decay() == ref.no_weight_decay()
    assert model.num_prefix_tokens == 3 and model.has_class_token
    # an optimizer built before keeps training it: one step equals timm's
    ref_copy = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref_copy.parameters(), lr=0.1)
    g = torch.randn(2, 5, dtype=torch.float64)
    for m, o in ((ref_copy, opt_ref), (model, opt)):
        o.zero_grad()
        m(x).backward(g)
        o.step()
    for (n, a), b in zip(model.state_dict().items(), ref_copy.state_dict().values()):
        assert rel_err(a, b) <= TORCH_RTOL, n


def test_patch_embed_alone_still_gives_patch_tokens():
    for vid in ("cls", "dynamic"):
        ref, x = _reference(vid)
        model = copy.deepcopy(ref)
        _optimize(model, backend="torch")
        assert type(model.patch_embed) is vnn.PatchEmbed
        out, want = model.patch_embed(x), ref.patch_embed(x)
        assert out.shape == want.shape and rel_err(out, want) <= TORCH_RTOL


@pytest.mark.parametrize("vid", ["cls-reg2", "dynamic-pad", "distilled"])
@pytest.mark.parametrize("kwargs", [
    {},
    {"indices": [0], "return_prefix_tokens": True, "output_fmt": "NLC"},
    {"indices": 1, "norm": True, "stop_early": True, "intermediates_only": True},
    {"output_dict": True, "return_prefix_tokens": True},
], ids=["default", "prefix-nlc", "norm-only", "dict"])
def test_forward_intermediates_equal_timm(vid, kwargs):
    ref, x = _reference(vid)
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")

    def flat(out):  # every tensor of the (nested) result, in order
        if isinstance(out, torch.Tensor):
            return [out]
        if isinstance(out, dict):
            return [t for k in sorted(out) for t in flat(out[k])]
        return [t for o in out for t in flat(o)]

    got, want = flat(model.forward_intermediates(x, **kwargs)), flat(ref.forward_intermediates(x, **kwargs))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) <= TORCH_RTOL
    if kwargs.get("return_prefix_tokens") and not kwargs.get("output_dict"):
        assert all(isinstance(o, tuple) for o in model.forward_intermediates(x, **kwargs)[1])
    layers = model.get_intermediate_layers(x, 1, return_prefix_tokens=True)
    assert all(rel_err(a, b) <= TORCH_RTOL for a, b in zip(flat(layers), flat(ref.get_intermediate_layers(
        x, 1, return_prefix_tokens=True))))


def test_forward_intermediates_gradients_equal_timm():
    _check_parity("cls-reg3-no-embed-class", "torch", torch.float64,
                  fn=lambda m, t: torch.cat([y.flatten(1) for y in m.forward_intermediates(t, intermediates_only=True)], 1))


def test_features_only_model_is_converted_and_equals_timm():
    kw = {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 2, "features_only": True, "out_indices": (0, 1)}
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", reg_tokens=2, **kw).double().eval()
    randomise_parameters(ref)
    model = copy.deepcopy(ref)
    report = convert(model, backend="torch")
    assert ("model", "timm.models.vision_transformer.VisionTransformer",
            "vitkern.models.timm_vit.VisionTransformer") in report.converted
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got, want = model(x), ref(x)
    assert len(got) == len(want) == 2
    assert all(a.shape == b.shape and rel_err(a, b) <= TORCH_RTOL for a, b in zip(got, want))


def test_distilled_training_returns_both_heads():
    ref, x = _reference("distilled")
    ref, model = copy.deepcopy(ref), copy.deepcopy(ref)
    _optimize(model, backend="torch")
    for m in (ref, model):
        m.set_distilled_training(True)
        m.train()
    got, want = model(x), ref(x)
    assert isinstance(got, tuple) and len(got) == 2
    assert all(rel_err(a, b) <= TORCH_RTOL for a, b in zip(got, want))


def test_deepcopy_and_pickle_keep_the_fused_model():
    ref, x = _reference("distilled-dynamic")
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert type(clone) is timm_vit.VisionTransformerDistilled and clone.backend == "torch"
        assert rel_err(clone(x), ref(x)) <= TORCH_RTOL


def test_optimize_twice_and_backend_switch():
    ref, x = _reference("cls")
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")
    report = convert(model, backend="auto")
    assert not report.converted and model.backend == "auto" and "<root>" in report.backend_set
    assert rel_err(model(x), ref(x)) <= TORCH_RTOL


def test_verbose_reports_the_embedding(capsys):
    ref, _ = _reference("distilled")
    _optimize(copy.deepcopy(ref), backend="torch", verbose=True)
    out = capsys.readouterr().out
    assert ("<root>: timm.models.deit.VisionTransformerDistilled -> "
            "vitkern.models.timm_vit.VisionTransformerDistilled") in out
    assert "vitkern.models.timm_vit.VisionTransformerDistilled x1" in out


# ----------------------------------------------------------------------------- not fused, and reported
class _MyViT(VisionTransformer):
    pass


def _padded_proj(m):  # a patch conv vitkern.nn.PatchEmbed cannot take (the grid stays 4x4)
    m.patch_embed.proj = torch.nn.Conv2d(3, 32, 8, stride=8, padding=1)
    return m


def _hooked(m):  # a hook on the patch module expects to see (and may change) the patch tokens
    m.patch_embed.register_forward_hook(lambda mod, args, out: 2 * out)
    return m


def _replaced_forward_features(m):  # the same function, bound on the instance
    m.forward_features = types.MethodType(VisionTransformer.forward_features, m)
    return m


UNFUSED = {
    "embed-norm": (lambda: _vit(embed_norm_layer="layernorm"), "patch_embed.norm is LayerNorm"),
    "subclass": (lambda: _vit(_MyViT), "subclass of timm.models.vision_transformer.VisionTransformer"),
    "patch-embed-not-converted": (lambda: _padded_proj(_vit()),
                                  "patch_embed is timm.layers.patch_embed.PatchEmbed, not vitkern.nn.PatchEmbed"),
    "instance-override": (lambda: _replaced_forward_features(_vit()), "forward_features was replaced on the instance"),
    "patch-embed-hook": (lambda: _hooked(_vit()), "patch_embed has hooks"),
    "too-many-prefix-tokens": (lambda: _vit(reg_tokens=64), "65 prefix tokens; the fused op writes at most 64"),
}


@pytest.mark.parametrize("case", list(UNFUSED))
def test_unfusable_configurations_keep_timms_embedding_and_are_reported(case):
    build, reason = UNFUSED[case]
    torch.manual_seed(0)
    model = _randomise(build()).double().eval()
    ref = copy.deepcopy(model)
    cls = type(model)
    with pytest.warns(OptimizeWarning, match="embedding left on timm's path"):
        vitkern.optimize(model, backend="torch")
    report = convert(copy.deepcopy(ref), backend="torch")
    entries = [r for p, c, r in report.skipped if p == ""]
    assert len(entries) == 1 and reason in entries[0], report.skipped
    assert type(model) is cls
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert rel_err(model(x), ref(x)) <= TORCH_RTOL


def test_bad_input_names_the_sizes():
    ref, _ = _reference("cls")
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")
    with pytest.raises(ValueError, match=r"\(H, W\)=\(24, 32\) does not match patch_embed.img_size=\(32, 32\)"):
        model(torch.randn(1, 3, 24, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight has 3 input channels .* x has C=4"):
        model(torch.randn(1, 4, 32, 32, dtype=torch.float64))
    ref, _ = _reference("dynamic")  # strict_img_size=False: sizes not divisible by the patch are refused
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")
    with pytest.raises(ValueError, match=r"\(H, W\)=\(36, 32\) must be divisible by the patch size \(8, 8\)"):
        model(torch.randn(1, 3, 36, 32, dtype=torch.float64))


# ----------------------------------------------------------------------------- FX and TorchScript
@pytest.mark.parametrize("vid", ["cls-reg2", "dynamic", "distilled"])
def test_timm_fx_feature_extraction_keeps_the_embedding_one_call(vid):
    from timm.models import create_feature_extractor

    ref, x = _reference(vid)
    model = copy.deepcopy(ref)
    _optimize(model, backend="torch")
    nodes = ["blocks.0", "norm"]
    ours, theirs = create_feature_extractor(model, return_nodes=nodes), create_feature_extractor(ref, return_nodes=nodes)
    calls = [n.target for n in ours.graph.nodes if n.op == "call_function"]
    assert calls.count(timm_vit.vit_embedding) == 1 and torch.cat not in calls, calls
    got, want = ours(x), theirs(x)
    assert all(rel_err(got[k], want[k]) <= TORCH_RTOL for k in nodes)


@pytest.mark.parametrize("cls", [VisionTransformer, VisionTransformerDistilled])
def test_converted_classes_script_with_timms_embedding(cls):
    """The converted classes' own methods compile under torch.jit.script, where they run timm's embedding
    (patch module, then _pos_embed). Checked with timm's own child modules: scripting a model optimize()
    converted also needs vitkern's drop-in modules to be scriptable."""
    torch.manual_seed(0)
    ref = _randomise(_vit(cls, reg_tokens=int(cls is VisionTransformer))).double().eval()
    model = copy.deepcopy(ref)
    model.__class__, model.backend = timm_vit.CONVERTED[cls], "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert rel_err(scripted(x), ref(x)) <= TORCH_RTOL
    assert rel_err(model(x), ref(x)) <= TORCH_RTOL  # and eagerly the fused path (timm's children)


@pytest.mark.parametrize("how", ["grad-checkpointing", "is-causal", "attn-mask"])
def test_forward_features_block_paths_equal_timm(how):
    """forward_features' other block paths (timm's checkpoint_seq; masks passed to every block)."""
    ref, x = _reference("cls-reg2")
    ref = copy.deepcopy(ref)
    n = ref.patch_embed.num_patches + ref.num_prefix_tokens
    mask = torch.randn(n, n, dtype=torch.float64)
    kwargs = {"is-causal": {"is_causal": True}, "attn-mask": {"attn_mask": mask}}.get(how, {})
    if how == "grad-checkpointing":
        ref.set_grad_checkpointing(True)
    _check_parity_model(ref, x, fn=lambda m, t: m.forward_features(t, **kwargs))



@pytest.mark.parametrize("vid", ["cls-reg2", "distilled"])
def test_set_input_size_after_conversion_equals_timm(vid):
    """timm's set_input_size resamples pos_embed into a new Parameter and resizes the patch grid: the fused
    embedding reads both at each call."""
    ref, _ = _reference(vid)
    ref, model = copy.deepcopy(ref), copy.deepcopy(ref)
    _optimize(model, backend="torch")
    for m in (ref, model):
        m.set_input_size(img_size=(40, 24))
    x = torch.randn(2, 3, 40, 24, dtype=torch.float64)
    assert model.pos_embed.shape == ref.pos_embed.shape == (1, 15 + ref.num_prefix_tokens, 32)
    assert rel_err(model(x), ref(x)) <= TORCH_RTOL
