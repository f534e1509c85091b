"""timm's workflows on converted models: TorchScript, FX (through the drop-ins and with them as leaves),
feature extraction, ``forward_intermediates``, ``torch.export`` and ``torch.compile(fullgraph=True)``.

Tiny timm ViT, DeiT (distilled), Swin, PVTv2, BEiT and MaxViT (window + grid blocks, and a CoAtNet-style
NCHW transformer block) with random weights. Every workflow's output and every gradient (input and all
parameters, random upstream gradient) is compared with the eager converted model and with plain timm in
float64 (the oracle):

* ``backend="torch"`` in float64: the reference path (vitkern/reference.py), within 1e-10 relative of
  timm, for all six families;
* ``backend="triton"`` in float32 (Triton's interpreter on CPU) for the families whose interpreter run is
  quick (ViT, DeiT, PVTv2, BEiT; Swin for export and compile): the kernels, within the fp32 policy of
  helpers.assert_close; the export and compile graphs must hold vitkern's custom ops.
"""
import copy
import sys
import warnings

import pytest
import torch

from helpers import assert_close, rel_err
import vitkern
import vitkern.nn as vnn
from vitkern.convert import OptimizeWarning
from vitkern.ops.entry import ENTRY_OPS
from vitkern.nn.window_attention import WindowAttention as VWindowAttention

timm = pytest.importorskip("timm")
from timm.models import beit, get_notrace_functions, get_notrace_modules, maxxvit, swin_transformer_v2  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402

from test_optimize import _pvt, _randomise, _swin  # noqa: E402 - the same tiny models as optimize's tests

pytestmark = pytest.mark.timm

TORCH_RTOL = 1e-10  # float64 reference path vs timm in float64
VITKERN_MODULES = (vnn.PatchEmbed, vnn.Attention, vnn.SwinTransformerBlock, vnn.SwinTransformerV2Block,
                   VWindowAttention, vnn.SRAttention,
                   vnn.BeitAttention, vnn.MaxxVitAttentionCl, vnn.MaxxVitAttention2d)


def _vit():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=5)


def _deit():
    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                      num_classes=5)


def _beit():
    return beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
                     use_rel_pos_bias=True)


def _maxvit():
    # stage 0: MaxViT block (window + grid attention, AttentionCl); stage 1: NCHW transformer (Attention2d)
    cfg = maxxvit.MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=("M", "T"), stem_width=(8, 16),
                             transformer_cfg=maxxvit.MaxxVitTransformerCfg(dim_head=8, window_size=(2, 2),
                                                                           grid_size=(2, 2)))
    return maxxvit.MaxxVit(cfg, img_size=32, num_classes=5)


def _swinv2():
    return swin_transformer_v2.SwinTransformerV2(img_size=32, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                                                 window_size=4, num_classes=5)


MODELS = {"vit": _vit, "deit": _deit, "swin": _swin, "pvt": _pvt, "beit": _beit, "maxvit": _maxvit,
          "swinv2": _swinv2}
TRITON_MODELS = ["vit", "deit", "pvt", "beit"]  # quick in the interpreter
EXPECTED = {  # the drop-ins each converted model must hold (so every workflow runs through them)
    "vit": {vnn.PatchEmbed, vnn.Attention}, "deit": {vnn.PatchEmbed, vnn.Attention},
    "swin": {vnn.PatchEmbed, vnn.SwinTransformerBlock}, "pvt": {vnn.SRAttention},
    "beit": {vnn.PatchEmbed, vnn.BeitAttention}, "maxvit": {vnn.MaxxVitAttentionCl, vnn.MaxxVitAttention2d},
    "swinv2": {vnn.PatchEmbed, vnn.SwinTransformerV2Block},
}

_REF = {}


def _reference(model_id):
    """(plain timm model in float64, input, upstream gradient, output, {name: gradient}), built once."""
    if model_id not in _REF:
        torch.manual_seed(1)
        model = _randomise(MODELS[model_id]()).double().eval()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        out = _output(model(x.detach().requires_grad_(True)))
        g = torch.randn_like(out)
        out, grads = _run(model, x, g)
        _REF[model_id] = (model, x, g, out, grads)
    return _REF[model_id]


def _output(out):
    """One tensor from a model output: DeiT's (head, dist) pair and FX's {node: tensor} dicts concatenated."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        out = torch.cat([o.flatten(1) for o in out], 1)
    return out


def _run(fn, x, g, params=None):
    """Output and {input, parameter name: gradient} of ``fn`` (a module, or a callable with ``params``)."""
    x = x.detach().clone().requires_grad_(True)
    named = list((params if params is not None else fn).named_parameters())
    out = _output(fn(x))
    grads = torch.autograd.grad(out, [x] + [p for _, p in named], g.to(out.dtype), allow_unused=True)
    names = ["input"] + [n.replace("_orig_mod.", "") for n, _ in named]
    return out, dict(zip(names, grads))


def _converted(model_id, backend, dtype):
    ref = _reference(model_id)[0]
    model = copy.deepcopy(ref).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizeWarning)  # every attention of these models converts
        vitkern.optimize(model, backend=backend)
    assert EXPECTED[model_id] <= {type(m) for m in model.modules()}
    return model


def _compare(model_id, dtype, out, grads, eager_out, eager_grads):
    """Workflow result == eager converted result (same kernels) and == timm float64 (policy tolerance)."""
    _, _, _, ref_out, ref_grads = _reference(model_id)
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    pairs = [("output", out, eager_out, ref_out)] + [(n, grads[n], eager_grads[n], ref_grads[n]) for n in ref_grads]
    for name, got, eager, ref in pairs:
        assert (got is None) == (ref is None), f"{name}: gradient {got is None and 'missing' or 'unexpected'}"
        if ref is None:  # a parameter the output does not depend on (timm's too)
            continue
        assert rel_err(got, eager) <= (TORCH_RTOL if dtype == torch.float64 else 1e-6), name
        if dtype == torch.float64:
            assert rel_err(got, ref) <= TORCH_RTOL, f"{name}: {rel_err(got, ref):.3e}"
        else:
            assert_close(name, got, ref, grad=name != "output")


def _check(model_id, backend, dtype, workflow):
    """Run ``workflow(model, x) -> (callable, parameter owner)`` on the converted model; compare."""
    model = _converted(model_id, backend, dtype)
    _, x, g, _, _ = _reference(model_id)
    x = x.to(dtype)
    eager_out, eager_grads = _run(model, x, g)
    fn, params = workflow(model, x)
    out, grads = _run(fn, x, g, params)
    _compare(model_id, dtype, out, grads, eager_out, eager_grads)
    return fn


CASES = [(m, "torch", torch.float64) for m in MODELS] + [(m, "triton", torch.float32) for m in TRITON_MODELS]
IDS = [f"{m}-{b}" for m, b, _ in CASES]


# ----------------------------------------------------------------------------- TorchScript
def _script(model, x):
    sm = torch.jit.script(model)
    return sm, sm


@pytest.mark.parametrize("model_id,backend,dtype", CASES, ids=IDS)
def test_torchscript_forward_and_gradients_equal_eager(model_id, backend, dtype):
    sm = _check(model_id, backend, dtype, _script)
    # the scripted drop-ins call the registered ops, not Python
    assert "vitkern::" in str(sm.inlined_graph)


@pytest.mark.parametrize("model_id,backend,dtype", [("vit", "torch", torch.float64), ("vit", "triton", torch.float32),
                                                    ("swin", "torch", torch.float64)], ids=["vit-torch", "vit-triton",
                                                                                              "swin-torch"])
def test_jit_trace_forward_and_gradients_equal_eager(model_id, backend, dtype):
    def workflow(model, x):
        traced = torch.jit.trace(model, (x,), check_trace=False)
        if backend == "triton":
            assert "vitkern::" in str(traced.inlined_graph)
        return traced, traced
    _check(model_id, backend, dtype, workflow)


def test_torchscript_saves_and_loads(tmp_path):
    model = _converted("vit", "torch", torch.float64)
    _, x, _, _, _ = _reference("vit")
    torch.jit.save(torch.jit.script(model), str(tmp_path / "vit.pt"))
    loaded = torch.jit.load(str(tmp_path / "vit.pt"))
    assert rel_err(_output(loaded(x)), _output(model(x))) <= TORCH_RTOL


def _entry_args(name, dtype):
    """Small valid arguments for each registered public op (all differentiable inputs random)."""
    r = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    return {
        "attention": ((r(2, 2, 5, 8), r(2, 2, 7, 8), r(2, 2, 7, 8)), dict(attn_bias=r(1, 2, 5, 7))),
        "attention_packed": ((r(2, 5, 24), 2), dict(scale=0.3, is_causal=True)),
        "patch_embed": ((r(2, 3, 8, 12), r(6, 3, 4, 4), r(6)), dict(cls_token=r(1, 1, 6), pos_embed=r(1, 7, 6))),
        "window_attention": ((r(1, 3, 4, 24), r(9, 2)), dict(num_heads=2, window_size=[2, 2], shift_size=[1, 1],
                                                            qkv_bias=r(24))),
        "sr_attention": ((r(2, 16, 8), [4, 4]), dict(num_heads=2, q_weight=r(8, 8), q_bias=r(8), kv_weight=r(16, 8),
                                                     kv_bias=r(16), proj_weight=r(8, 8), proj_bias=r(8),
                                                     sr_weight=r(8, 8, 2, 2), sr_bias=r(8), norm_weight=r(8),
                                                     norm_bias=r(8), sr_ratio=2)),
    }[name]


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("name", sorted(ENTRY_OPS))
def test_registered_public_ops_equal_the_python_ops_and_pass_opcheck(name, backend, dtype):
    """torch.ops.vitkern.<name> (what scripted and traced modules call) is the Python op: same output and
    gradients; its schema, autograd registration and fake-tensor behaviour pass opcheck."""
    args, kwargs = _entry_args(name, dtype)
    kwargs = dict(kwargs, backend=backend)
    op = getattr(torch.ops.vitkern, name)
    out, ref = op(*args, **kwargs), getattr(vitkern.ops, name)(*args, **kwargs)
    g = torch.randn_like(ref)
    inputs = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(out, inputs, g)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    if backend == "torch":  # the kernels' own custom ops pass opcheck in their tests (and it is slow here);
        # compiling these ops is the compile tests' job
        torch.library.opcheck(op.default, args, kwargs,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------- FX
class _Tracer(torch.fx.Tracer):
    """timm's FX set-up (its leaf modules and autowrapped functions), with vitkern's modules as leaves or not."""

    def __init__(self, vitkern_leaves: bool):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        leaves = tuple(get_notrace_modules())
        self.leaves = leaves if vitkern_leaves else tuple(c for c in leaves if not issubclass(c, VITKERN_MODULES))

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _fx(vitkern_leaves):
    def workflow(model, x):
        gm = torch.fx.GraphModule(model, _Tracer(vitkern_leaves).trace(model))
        targets = {str(n.target) for n in gm.graph.nodes}
        called = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
        if vitkern_leaves:
            assert called & set(VITKERN_MODULES)
        else:  # traced through: the drop-ins' ops are graph nodes, the drop-ins are not called
            assert not called & set(VITKERN_MODULES) and any("vitkern." in t for t in targets)
        return gm, gm
    return workflow


@pytest.mark.parametrize("model_id,backend,dtype", CASES, ids=IDS)
def test_fx_traced_through_the_drop_ins_forward_and_backward(model_id, backend, dtype):
    _check(model_id, backend, dtype, _fx(vitkern_leaves=False))


@pytest.mark.parametrize("model_id", ["vit", "swin", "pvt", "beit", "maxvit", "swinv2"])
def test_fx_graph_through_the_drop_ins_scripts(model_id):
    """timm's fx_torchscript workflow: the traced graph (vitkern's ops as nodes) compiles with TorchScript."""
    def workflow(model, x):
        gm, _ = _fx(vitkern_leaves=False)(model, x)
        sm = torch.jit.script(gm)
        return sm, sm
    _check(model_id, "torch", torch.float64, workflow)


@pytest.mark.parametrize("model_id", list(MODELS))
def test_fx_with_the_drop_ins_as_leaves_forward_and_backward(model_id):
    _check(model_id, "torch", torch.float64, _fx(vitkern_leaves=True))


@pytest.mark.parametrize("model_id", ["vit", "swin", "pvt", "maxvit"])
def test_fx_feature_extractor_and_features_only(model_id):
    """timm's create_feature_extractor on the last node, and features_only=True (timm's own feature
    wrapper; FX-based for ViTs), give the eager model's features, with gradients."""
    pytest.importorskip("torchvision")
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    def workflow(model, x):
        _, nodes = get_graph_node_names(model)  # timm's tracer: its leaf modules, vitkern's among them
        fe = create_feature_extractor(model, return_nodes=[nodes[-1]])
        assert {type(m) for m in fe.modules()} & set(VITKERN_MODULES)
        return fe, fe
    _check(model_id, "torch", torch.float64, workflow)

    # features_only: the same model built by timm with feature outputs, converted, against plain timm
    torch.manual_seed(2)
    builder = {"vit": lambda **kw: timm.create_model("test_vit", img_size=32, **kw),
               "swin": lambda **kw: timm.create_model("swin_tiny_patch4_window7_224", img_size=32, depths=(1, 1),
                                                      num_heads=(1, 2), embed_dim=16, window_size=4, **kw),
               "pvt": lambda **kw: timm.create_model("pvt_v2_b0", depths=(1, 1, 1, 1), **kw),
               "maxvit": lambda **kw: timm.create_model("test_maxvit", img_size=64, **kw)}[model_id]
    ref = _randomise(builder(features_only=True)).double().eval()
    model = copy.deepcopy(ref)
    vitkern.optimize(model, backend="torch")
    assert {type(m) for m in model.modules()} & set(VITKERN_MODULES)
    size = 32 if model_id == "swin" else 64
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    feats, ref_feats = model(x), ref(x)
    assert len(feats) == len(ref_feats)
    g = [torch.randn_like(f) for f in ref_feats]
    grads = torch.autograd.grad(feats, list(model.parameters()), g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_feats, list(ref.parameters()), g, allow_unused=True)
    for a, b in zip(feats, ref_feats):
        assert rel_err(a, b) <= TORCH_RTOL
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None) and (a is None or rel_err(a, b) <= TORCH_RTOL)


@pytest.mark.parametrize("model_id", ["vit", "deit", "swin", "pvt", "beit", "maxvit"])
def test_forward_intermediates_equal_timm(model_id):
    _, x, _, _, _ = _reference(model_id)
    ref = _reference(model_id)[0]
    model = _converted(model_id, "torch", torch.float64)
    final, inter = model.forward_intermediates(x)
    final_ref, inter_ref = ref.forward_intermediates(x)
    assert rel_err(_output(final), _output(final_ref)) <= TORCH_RTOL
    assert len(inter) == len(inter_ref) > 0
    assert all(rel_err(a, b) <= TORCH_RTOL for a, b in zip(inter, inter_ref))


# ----------------------------------------------------------------------------- export and compile
def _custom_ops(graph) -> set:
    return {str(n.target).split(".")[1] for n in graph.nodes if str(n.target).startswith("vitkern.")}


EXPORT_CASES = CASES + [("swin", "triton", torch.float32)]
EXPORT_IDS = IDS + ["swin-triton"]


@pytest.mark.parametrize("model_id,backend,dtype", EXPORT_CASES, ids=EXPORT_IDS)
def test_export_runs_and_equals_eager(model_id, backend, dtype):
    def workflow(model, x):
        ep = torch.export.export(model, (x,))
        if backend == "triton":
            assert _custom_ops(ep.graph), "the exported graph holds no vitkern op"
        mod = ep.module()
        return mod, mod
    _check(model_id, backend, dtype, workflow)


@pytest.mark.parametrize("model_id,backend,dtype", EXPORT_CASES, ids=EXPORT_IDS)
def test_compile_fullgraph_one_graph_and_equals_eager(model_id, backend, dtype):
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def workflow(model, x):
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=capture)
        return compiled, compiled

    _check(model_id, backend, dtype, workflow)
    assert len(graphs) == 1
    if backend == "triton":
        fwd = {str(n.target) for n in graphs[0].graph.nodes}
        assert any("vitkern" in t for t in fwd), "dynamo's graph does not call vitkern's ops"
    torch._dynamo.reset()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
