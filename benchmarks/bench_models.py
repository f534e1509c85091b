"""Whole-model benchmarks: a training step and inference of timm models, as timm ships them and
converted by ``vitkern.optimize``, each eager and under ``torch.compile``, in one run.

Grid (GPU, bf16 autocast, fp32 weights; ``timm.create_model(name, pretrained=False,
drop_path_rate=0.0)``: random weights, nothing downloaded, no stochastic depth so the
equality check is deterministic), in this order (the issue's targets first, so a time cap
cuts the others):

=================================  =====  ===================================
case                               batch  why
=================================  =====  ===================================
swin_tiny_patch4_window7_224        128   target: >= 1.5x eager, >= 1.15x compile
pvt_v2_b2                           128   target: >= 1.4x eager, >= 1.1x compile
vit_base_patch16_224                 64   target: >= 1.1x eager, >= 1.0x compile
deit_base_distilled_patch16_224      64   two prefix tokens (CLS + distillation)
swin_base_patch4_window12_384        32   window 12
vit_large_patch16_384                16   N = 577
vit_huge_patch14_224                 32   head dim 80
mae_vit_base_patch16 (75 % masked)   64   target: >= 1.3x the reference MAE
=================================  =====  ===================================

The MAE case runs when ``vitkern.models.MaskedAutoencoderViT`` and a reference MAE in
``vitkern.reference`` (:data:`MAE_REFERENCE_NAMES`, built with the same constructor arguments)
are importable; until then each of its rows is recorded as skipped with that reason. Its
"timm" rows are the reference MAE (timm blocks), its vitkern rows ``MaskedAutoencoderViT``
loaded with the reference's state_dict (strict): its encoder patchifies only the kept patches
(``patch_embed(..., keep_indices=...)``) and runs timm Blocks on ``vitkern.nn.Attention``; the loss
is MAE's own (fixed noise).

Modes: ``train`` = one optimizer step (``zero_grad(set_to_none=True)``, forward and
cross-entropy loss on random labels under ``torch.autocast(bf16)``, ``backward``,
``AdamW.step``); ``inference`` = forward under ``torch.no_grad()`` and autocast, ``eval()``.

Implementations (all from one deep copy each of the same initial weights):
``timm_eager`` (naive: timm's default, SDPA attention), ``timm_compile`` (peer:
``torch.compile(model)``), ``vitkern`` (``vitkern.optimize(model)``), ``vitkern_compile``
(``torch.compile(vitkern.optimize(model))``). A failed compile is recorded as skipped with its
error. The compiled rows run after every eager row of the family (test
``test_models_compiled``, train mode over all cases first), and when ``$VK_BENCH_DEADLINE``
leaves less than :data:`COMPILE_MIN_LEFT_S` they are recorded as skipped with that reason.

Equality first, every row: the loss, the logits and the gradient of every parameter (train), or
the logits (inference), against the timm model with the same weights evaluated with unfused
attention (``fused_attn = False``) in high precision: fp32 with TF32 off on the GPU, float64 on
CPU, with :func:`vitkern.testing.assert_close`. On the GPU the bf16-autocast values (and the
bf16 timm eager reference the rule needs) are compared in bf16, the precision they were computed
in: within 2x (loss, logits) / 3x (gradients) the error of timm eager in bf16. On CPU, fp32 within
1e-5 of float64. Biases and LayerNorm affines get a random offset (timm starts them at 0 / 1) and
Swin's relative-position tables are drawn from N(0, 0.5^2), so a wrong index shows.

Recorded per row: median ms per step, images/s (``images_per_s``), peak memory of one step
(above the weights, gradients and optimizer state held before it), the FLOPs of the step
(timm's forward counted with ``torch.utils.flop_counter`` on the meta device; x3 for the training
step, see :func:`step_flops`) and the errors.
``summary.md`` shows images/s, the speedups against timm eager and timm + compile beside the
issue's targets, peak memory against timm eager, and flags every vitkern row that needs more
memory than timm eager. The roofline fraction uses FLOPs only (``min_bytes`` = 0: at these
batches whole models are compute-bound).

CPU (no GPU): a smoke grid of tiny configurations built with the same timm classes
(``VisionTransformer``, ``VisionTransformerDistilled``, ``SwinTransformer``,
``PyramidVisionTransformerV2``; dims 16-64, images 32-56, batch 2, fp32), ``timm_eager`` timed,
the compiled rows and vitkern's timed rows skipped with the reason, and vitkern's converted
models checked for equality under ``TRITON_INTERPRET=1`` (``test_vitkern_model_interpreter_equality``:
loss, logits and every gradient vs float64).

GPU time (estimate, H200, cold caches; not measured: no GPU has been lent to this project yet),
per case: model build + fp32 reference (TF32 off) + bf16 reference ~3-8 s; 4 eager rows (2 modes x
timm / vitkern) of 1 first call + 3 pre-calls + 3 warm-up + >= 20 timed + 1 peak call at 15-60 ms
per step ~1.5-2 s each -> ~8 s; Triton JIT of the first vitkern model of each kind ~10-20 s;
4 compiled rows at ~30-60 s of inductor compile each (ViT-H / Swin-B: up to ~90 s) -> ~2-4 min.
So the eager part of the grid ~2.5-3 min, the compiled part ~20-30 min; per case in the README.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import harness
from vitkern.testing import assert_close

FAMILY = "models"
TRAIN = harness.Mode("train", "train", backward=True)
INFER = harness.Mode("inference", "infer", backward=False)
MODES = (TRAIN, INFER)

#: eager implementations (test_models) and compiled ones (test_models_compiled) -> role
EAGER_IMPLS = {"timm_eager": "naive", "vitkern": "vitkern"}
COMPILED_IMPLS = {"timm_compile": "peer", "vitkern_compile": "vitkern"}
KINDS = {"vitkern": "triton", "timm_compile": "compile", "vitkern_compile": "compile"}
#: A whole-model compile + timing needs about this much of the time cap (see the docstring).
COMPILE_MIN_LEFT_S = 90.0
#: A case's references and eager rows need about this much.
CASE_MIN_LEFT_S = 20.0
#: Names under which vitkern.reference may define the reference MAE (a class or a constructor taking
#: MaskedAutoencoderViT's arguments).
MAE_REFERENCE_NAMES = ("MaskedAutoencoderViTReference", "MAEReference", "mae_reference")
MASK_RATIO = 0.75


# --------------------------------------------------------------------------- #
# Grid
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class ModelCase:
    name: str
    model: str  # timm name (full grid), or a label of the tiny configuration
    B: int
    img: int
    build: Callable[[], torch.nn.Module] = dataclasses.field(compare=False, repr=False)
    num_classes: int = 1000
    mae: bool = False

    def shape(self) -> Dict[str, object]:
        return dict(model=self.model, B=self.B, img=self.img, **({"mask_ratio": MASK_RATIO} if self.mae else {}))


def _timm(name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build():
        import timm
        return timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kwargs)
    return build


def _timm_class(module: str, cls: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build():
        return getattr(importlib.import_module(f"timm.models.{module}"), cls)(**kwargs)
    return build


#: The authors' mae_vit_base_patch16 recipe (LayerNorm eps 1e-6).
MAE_BASE = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
MAE_TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)


def _mae_reference(kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: mae_classes()[1](**kwargs)


def full_grid() -> List[ModelCase]:
    cases = [(name, B, img) for name, B, img in (
        ("swin_tiny_patch4_window7_224", 128, 224), ("pvt_v2_b2", 128, 224), ("vit_base_patch16_224", 64, 224),
        ("deit_base_distilled_patch16_224", 64, 224), ("swin_base_patch4_window12_384", 32, 384),
        ("vit_large_patch16_384", 16, 384), ("vit_huge_patch14_224", 32, 224))]
    grid = [ModelCase(f"{name}_bs{B}", name, B, img, _timm(name)) for name, B, img in cases]
    grid.append(ModelCase("mae_vit_base_patch16_mask75_bs64", "mae_vit_base_patch16", 64, 224,
                          _mae_reference(MAE_BASE), mae=True))
    return grid


def smoke_grid() -> List[ModelCase]:
    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return [
        ModelCase("tiny_vit_p8_32_bs2", "VisionTransformer", 2, 32,
                  _timm_class("vision_transformer", "VisionTransformer", **vit), 10),
        ModelCase("tiny_vit_hd80_p14_28_bs2", "VisionTransformer", 2, 28,  # head dim 80, as ViT-H
                  _timm_class("vision_transformer", "VisionTransformer", img_size=28, patch_size=14,
                              embed_dim=160, depth=1, num_heads=2, num_classes=10), 10),
        ModelCase("tiny_deit_distilled_p8_32_bs2", "VisionTransformerDistilled", 2, 32,
                  _timm_class("deit", "VisionTransformerDistilled", **vit), 10),
        ModelCase("tiny_swin_w7_56_bs2", "SwinTransformer", 2, 56,  # 14x14 then 7x7: shifted, then one window
                  _timm_class("swin_transformer", "SwinTransformer", img_size=56, window_size=7, embed_dim=16,
                              depths=(2, 1), num_heads=(1, 2), drop_path_rate=0.0, num_classes=10), 10),
        ModelCase("tiny_pvt_v2_64_bs2", "PyramidVisionTransformerV2", 2, 64,  # grids 16..2: >= 4 keys everywhere
                  _timm_class("pvt_v2", "PyramidVisionTransformerV2", depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32),
                              num_heads=(1, 1, 2, 2), sr_ratios=(8, 4, 2, 1), mlp_ratios=(2, 2, 2, 2),
                              num_classes=10), 10),
        ModelCase("tiny_mae_p8_32_mask75_bs2", "MaskedAutoencoderViT", 2, 32, _mae_reference(MAE_TINY), mae=True),
    ]


def _order_compiled(cases):
    """Train mode over every case first (the targets), then inference."""
    pts, ids = [], []
    for mode in MODES:
        p, i = harness.points(cases, [mode], COMPILED_IMPLS)
        pts += p
        ids += i
    return pts, ids


def pytest_generate_tests(metafunc):
    cases = harness.grid(metafunc.config, full_grid, smoke_grid)
    harness.parametrize(metafunc, "model_point", cases, MODES, EAGER_IMPLS)
    if "compiled_point" in metafunc.fixturenames:
        pts, ids = _order_compiled(cases)
        metafunc.parametrize("compiled_point", pts, ids=ids)


# --------------------------------------------------------------------------- #
# MAE (built elsewhere): importable or the reason it is not
# --------------------------------------------------------------------------- #
def mae_classes() -> Tuple[Callable[..., torch.nn.Module], Callable[..., torch.nn.Module]]:
    """(vitkern.models.MaskedAutoencoderViT, the reference MAE constructor); ImportError says what is missing."""
    try:
        from vitkern.models import MaskedAutoencoderViT
    except ImportError as exc:
        raise ImportError(f"vitkern.models.MaskedAutoencoderViT is not available yet ({harness.first_line(exc)})")
    import vitkern.reference as ref
    for name in MAE_REFERENCE_NAMES:
        if callable(getattr(ref, name, None)):
            return MaskedAutoencoderViT, getattr(ref, name)
    raise ImportError(f"no reference MAE in vitkern.reference (looked for {', '.join(MAE_REFERENCE_NAMES)})")


# --------------------------------------------------------------------------- #
# Building: the initial weights once per (case, mode), one deep copy per row
# --------------------------------------------------------------------------- #
def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Offsets on biases and LayerNorm affines (timm starts them at 0 / 1, which would leave a wrong
    gradient of theirs unseen) and N(0, 0.5²) relative-position tables (std 0.02 would hide a wrong index)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, device=p.device))
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, device=p.device))


def _set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = enabled


def to_vitkern(case: ModelCase, model: torch.nn.Module, backend: Optional[str] = None) -> torch.nn.Module:
    """The vitkern variant of a copy of the initial model: ``vitkern.optimize`` (everything converted:
    a partial conversion would not be the comparison of interest), or for MAE vitkern's model with
    the reference's weights."""
    if case.mae:
        cls = mae_classes()[0]
        kwargs = MAE_BASE if case.img == MAE_BASE["img_size"] else MAE_TINY
        ours = cls(**kwargs).to(next(model.parameters()).device)
        ours.load_state_dict(model.state_dict(), strict=True)
        if backend is not None:
            import vitkern
            vitkern.optimize(ours, backend=backend)
        return ours.train(model.training)
    import vitkern
    from vitkern.convert import OptimizeWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizeWarning)
        return vitkern.optimize(model, backend=backend)


def _loss_fn(case: ModelCase, fn: Callable, a: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits or MAE's prediction) of one batch."""
    if case.mae:
        loss, pred, _ = fn(a["x"], mask_ratio=MASK_RATIO, noise=a["noise"])
        return loss, pred
    logits = fn(a["x"])
    return F.cross_entropy(logits, a["y"]), logits


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return lambda: torch.autocast(device.type, dtype=dtype)
    return nullcontext


class ModelState:
    """The initial model, the rotated input batches and the references for one (case, mode)."""

    def __init__(self, case: ModelCase, mode: harness.Mode, device: torch.device, dtype: torch.dtype):
        self.case, self.mode, self.device, self.dtype = case, mode, device, dtype
        torch.manual_seed(harness.seed_of(FAMILY, case.name))
        gen = harness.seeded_generator(device, FAMILY, case.name)
        with torch.device(device):
            self.master = case.build()
        _perturb(self.master, gen)
        self.param_names = [n for n, _ in trainable(self.master)]
        self.keys = (["loss", "logits"] + [f"d{n}" for n in self.param_names]) if mode.backward else ["logits"]
        first = self._make_set(gen)
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device, max_sets=8)
        self.sets = [first] + [self._make_set(gen) for _ in range(copies - 1)]
        self.ref_high = self._reference(harness.high_dtype(device))
        self.ref_same = self._reference(None) if harness.needs_same_dtype_reference(dtype) else None

    def _make_set(self, gen) -> Dict[str, torch.Tensor]:
        c = self.case
        s = {"x": torch.randn(c.B, 3, c.img, c.img, generator=gen, device=self.device)}
        if c.mae:
            n = (c.img // (MAE_BASE if c.img == MAE_BASE["img_size"] else MAE_TINY)["patch_size"]) ** 2
            s["noise"] = torch.rand(c.B, n, generator=gen, device=self.device)
        else:
            s["y"] = torch.randint(0, c.num_classes, (c.B,), generator=gen, device=self.device)
        return s

    def _reference(self, high: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        """timm with unfused attention: in ``high`` precision (TF32 off), or as the timed rows run
        (autocast) for the same-dtype reference of the bf16 rule."""
        model = copy.deepcopy(self.master)
        _set_fused_attn(model, False)
        a = self.sets[0]
        if high is not None:
            model = model.to(high)
            a = {k: (v.to(high) if v.is_floating_point() else v) for k, v in a.items()}
        with harness.exact_fp32() if high is not None else nullcontext():
            out = values(self.case, self.mode, model, model, a,
                         nullcontext if high is not None else _autocast(self.device, self.dtype))
        del model
        return out


def trainable(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that trains (MAE's fixed sin-cos position embeddings do not)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def values(case: ModelCase, mode: harness.Mode, fn: Callable, model: torch.nn.Module, a: Dict[str, torch.Tensor],
           autocast: Callable) -> Dict[str, torch.Tensor]:
    """What the equality check compares: ``loss``, ``logits`` and ``d<name>`` for every trainable
    parameter (train), or ``logits`` (inference). Leaves ``.grad`` alone."""
    if not mode.backward:
        model.eval()
        with torch.no_grad(), autocast():
            return {"logits": _loss_fn(case, fn, a)[1].detach()}
    model.train()
    named = trainable(model)
    with autocast():
        loss, logits = _loss_fn(case, fn, a)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    out = {"loss": loss.detach(), "logits": logits.detach()}
    out.update({f"d{n}": torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)})
    return out


def check_values(impl: str, state: ModelState, got: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Every value against the high-precision reference (vitkern.testing's rule); bf16-autocast
    values and their same-dtype reference compared in bf16, the precision they were computed in."""
    differ = sorted(set(got) ^ set(state.keys))
    assert not differ, f"{impl}: parameters differ from timm's: {differ}"
    low = state.ref_same is not None
    errors = {}
    for key in state.keys:
        actual = got[key].to(state.dtype) if low else got[key]
        same = state.ref_same[key].to(state.dtype) if low else None
        errors[key] = assert_close(f"{impl} {key}", actual, state.ref_high[key], same, grad=key.startswith("d"))
    return errors


def _step(case: ModelCase, mode: harness.Mode, fn: Callable, model: torch.nn.Module,
          autocast: Callable) -> Callable[[Dict[str, torch.Tensor]], Tuple[Any, Sequence[torch.Tensor]]]:
    """The timed call: a whole training step (zero_grad, forward + loss, backward, AdamW step) or
    one inference batch."""
    if not mode.backward:
        model.eval()

        def infer(a):
            with torch.no_grad(), autocast():
                return _loss_fn(case, fn, a)[1], ()
        return infer
    model.train()
    params = [p for _, p in trainable(model)]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def train(a):
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = _loss_fn(case, fn, a)
        loss.backward()
        opt.step()
        return loss, ()
    return train


# --------------------------------------------------------------------------- #
# FLOPs of the step, counted once per (case, mode) on the meta device
# --------------------------------------------------------------------------- #
_FLOPS: Dict[str, int] = {}


def step_flops(case: ModelCase, mode: harness.Mode) -> int:
    """The forward's FLOPs (inference), or 3x them (training: the backward is twice the forward). Not
    the counter's own backward count: torch's formula charges a grouped convolution's weight gradient
    as if it were dense: PVTv2-b2's counted step came out 22.2 TFLOP instead of ~3.1 at batch 128."""
    if case.name not in _FLOPS:
        from torch.utils.flop_counter import FlopCounterMode
        with torch.device("meta"):
            model = case.build()
            a = {"x": torch.randn(case.B, 3, case.img, case.img), "y": torch.zeros(case.B, dtype=torch.long),
                 "noise": torch.rand(case.B, (case.img // (MAE_BASE if case.img == 224 else MAE_TINY)["patch_size"]) ** 2)}
        counter = FlopCounterMode(display=False)
        with counter:
            values(case, INFER, model, model, a, nullcontext)
        _FLOPS[case.name] = int(counter.get_total_flops())
    return _FLOPS[case.name] * (3 if mode.backward else 1)


# --------------------------------------------------------------------------- #
# The benchmarks
# --------------------------------------------------------------------------- #
_STATE = harness.Slot()


def _row(benchmark, settings, ceilings, point, compiled: bool) -> None:
    case, mode, impl = point
    role = (COMPILED_IMPLS if compiled else EAGER_IMPLS)[impl]
    common = harness.row_id(FAMILY, case.name, impl, role, settings, mode, case.shape())
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        harness.skip(common, f"timm is not installed: {harness.first_line(exc)}")
    if case.mae:
        try:
            mae_classes()
        except ImportError as exc:
            harness.skip(common, f"MAE case reserved until its model exists: {exc}")
    reason = harness.skip_reason(KINDS.get(impl), settings)
    if reason:
        harness.skip(common, reason)
    left = harness.time_left_s()
    need = COMPILE_MIN_LEFT_S if compiled else CASE_MIN_LEFT_S
    if left is not None and left < need:
        harness.skip(common, f"time cap: {left:.0f} s left before $VK_BENCH_DEADLINE, this row needs ~{need:.0f} s "
                             f"(run this family without the cap for the whole grid)")

    state = _STATE.get((case, mode, str(settings.device), settings.dtype),
                       lambda: ModelState(case, mode, settings.device, settings.dtype))
    harness.free_memory()
    model = copy.deepcopy(state.master)
    extra: Dict[str, object] = {"timm_model": case.model, "batch": case.B}
    if impl.startswith("vitkern"):
        try:
            model = to_vitkern(case, model)
        except Exception as exc:  # noqa: BLE001 - a conversion that cannot convert everything is a failure
            harness.record_failure(**common, reason=f"vitkern conversion: {harness.first_line(exc)}")
            raise
    fn = model
    if compiled:
        harness.raise_recompile_limit()
        torch._dynamo.reset()  # one fresh static compile per row: the models share no graphs
        fn = torch.compile(model, dynamic=False)
        extra["compile"] = "static"
    autocast = _autocast(settings.device, settings.dtype)
    # The compared values come from their own forward (+ backward) before any optimizer step: the
    # timed step changes the weights. This first call also compiles / JITs, outside the timing.
    try:
        got = values(case, mode, fn, model, state.sets[0], autocast)
    except Exception as exc:
        if compiled:
            harness.skip(common, f"torch.compile failed: {harness.first_line(exc)}")
        harness.record_failure(**common, reason=harness.first_line(exc))
        raise
    row = harness.equal_then_time(benchmark, settings, ceilings, common, _step(case, mode, fn, model, autocast),
                                  state.sets, lambda _out, _grads: check_values(impl, state, got),
                                  flops=step_flops(case, mode), min_bytes=0, extra=extra)
    del got, model, fn
    row["images_per_s"] = case.B / (row["median_ms"] * 1e-3)
    benchmark.extra_info["images_per_s"] = row["images_per_s"]


def test_models(benchmark, vk_settings, vk_ceilings, model_point):
    _row(benchmark, vk_settings, vk_ceilings, model_point, compiled=False)


def test_models_compiled(benchmark, vk_settings, vk_ceilings, compiled_point):
    _row(benchmark, vk_settings, vk_ceilings, compiled_point, compiled=True)


# --------------------------------------------------------------------------- #
# CPU: vitkern's converted models under the Triton interpreter, equality only
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("case", smoke_grid(), ids=lambda c: c.name)
def test_vitkern_model_interpreter_equality(case):
    """``vitkern.optimize(model, backend="triton")``: loss, logits and every parameter's gradient of a
    training step's forward and backward against the float64 timm model with the same weights (fp32)."""
    def needs():
        import timm  # noqa: F401
        if case.mae:
            mae_classes()
    harness.skip_unless_interpreter(needs)
    state = ModelState(case, TRAIN, torch.device("cpu"), torch.float32)
    model = to_vitkern(case, copy.deepcopy(state.master), backend="triton")
    converted = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("vitkern.")]
    assert converted, f"vitkern.optimize converted nothing in {case.model}"
    check_values("vitkern (interpreter)", state, values(case, TRAIN, model, model, state.sets[0], nullcontext))
