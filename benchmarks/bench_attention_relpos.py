"""Relative-position attention benchmarks (module level): timm's BEiT and MaxxViT (MaxViT,
CoAtNet) attention modules beside vitkern's drop-ins on the fused attention op.

Modules (forward + backward: gradients for x and every parameter, incl. the bias table, from a
random upstream gradient; ``torch.autograd.grad``, no ``.grad`` accumulation timed):

* ``beit``: ``timm.models.beit.Attention(dim, heads, qkv_bias=True, window_size=grid)``, x (B, N, C)
  with N = grid + 1 (class token) vs :class:`vitkern.nn.BeitAttention`;
* ``maxvit_cl``: ``timm.models.maxxvit.AttentionCl(dim, dim_head=32, rel_pos_cls=RelPosBias 7x7)``
  on MaxViT's partitioned windows, x (B·windows, 7, 7, C) vs :class:`vitkern.nn.MaxxVitAttentionCl`;
* ``coatnet_2d``: ``timm.models.maxxvit.Attention2d(dim, dim_head=32, rel_pos_cls=RelPosBias)`` on
  CoAtNet's NCHW feature map, x (B, C, H, W) vs :class:`vitkern.nn.MaxxVitAttention2d`.

Implementations: ``naive`` (the timm module with ``fused_attn=False``: q·kᵀ + bias -> softmax -> ·v),
``timm_sdpa`` (timm's default fused path: the bias as SDPA's ``attn_mask``), ``vitkern_triton``
(the drop-in, ``backend="triton"``, loaded strictly with the timm module's state_dict).

Grid (GPU, bf16):

* BEiT-B/16 (768, 12 heads) at 224 (14x14 + 1 = 197 tokens, B = 64) and 384 (24x24 + 1 = 577, B = 16);
* MaxViT-T window attention (7x7 = 49 tokens): stage 2 (128 channels, 4 heads, 28x28 map: 16
  windows per image, B = 64 images -> 1024 windows) and stage 4 (512, 16 heads, 7x7 map, 1 window,
  B = 256);
* CoAtNet-0 transformer stages: stage 3 (384 channels, 12 heads, 14x14 = 196 tokens, B = 64) and
  stage 4 (768, 24 heads, 7x7 = 49, B = 128).

Equality first for every implementation: output and every gradient against the ``naive`` timm
module on upcast inputs and weights (fp32 with TF32 off on the GPU, float64 on CPU), within 2x
(forward) / 3x (gradients) the error of the bf16 naive module (``vitkern.testing.assert_close``).

FLOPs: the qkv and proj projections (2·B·N·C_in·C_out each forward, twice that backward) plus the
attention (4·B·h·N²·d forward, 10·B·h·N²·d backward). Minimum bytes: each stage's own minimum
(projections and attention as separate GEMMs in every implementation): forward x, weights, qkv
(written and read), attention output (written and read), out, and the (1, h, N, N) gathered bias
(written and read); backward dout, the saved activations, weights, the bias again and every
gradient written once.

CPU (no GPU): a smoke grid (tiny shapes, fp32) of the eager timm rows; the vitkern rows are
skipped with the reason and checked for equality under TRITON_INTERPRET=1
(``test_vitkern_relpos_interpreter_equality``).

GPU time (estimate, H100, cold Triton cache): 6 shapes x 3 implementations = 18 rows of ~0.2 s
each plus the Triton JIT of the attention kernels with a bias (head dims 32 and 64, ~10-20 s) and
the references: ~30-40 s.
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from functools import partial
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import floors
import harness
from vitkern.ops.attention import attention_flops

FAMILY = "attention_relpos"
MODE = harness.FWD_BWD  # a training step: forward + backward
IMPLS: Dict[str, str] = {"naive": "naive", "timm_sdpa": "peer", "vitkern_triton": "vitkern"}
KINDS = {"vitkern_triton": "triton"}


@dataclasses.dataclass(frozen=True)
class RelPosCase:
    name: str
    kind: str  # "beit" | "maxvit_cl" | "coatnet_2d"
    B: int  # batch of the attention call (MaxViT: images x windows)
    dim: int
    heads: int
    window: Tuple[int, int]  # the bias table's grid (BEiT adds the class token)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def N(self) -> int:
        area = self.window[0] * self.window[1]
        return area + 1 if self.kind == "beit" else area

    def x_shape(self) -> Tuple[int, ...]:
        if self.kind == "beit":
            return (self.B, self.N, self.dim)
        if self.kind == "maxvit_cl":
            return (self.B, *self.window, self.dim)
        return (self.B, self.dim, *self.window)

    def shape(self) -> Dict[str, object]:
        return dict(kind=self.kind, B=self.B, N=self.N, dim=self.dim, heads=self.heads, head_dim=self.head_dim,
                    window=list(self.window))


def full_grid() -> List[RelPosCase]:
    return [
        RelPosCase("beit_b16_224_bs64", "beit", 64, 768, 12, (14, 14)),
        RelPosCase("beit_b16_384_bs16", "beit", 16, 768, 12, (24, 24)),
        RelPosCase("maxvit_t_s2_win7_bs64x16", "maxvit_cl", 1024, 128, 4, (7, 7)),
        RelPosCase("maxvit_t_s4_win7_bs256", "maxvit_cl", 256, 512, 16, (7, 7)),
        RelPosCase("coatnet_0_s3_14x14_bs64", "coatnet_2d", 64, 384, 12, (14, 14)),
        RelPosCase("coatnet_0_s4_7x7_bs128", "coatnet_2d", 128, 768, 24, (7, 7)),
    ]


def smoke_grid() -> List[RelPosCase]:
    return [
        RelPosCase("tiny_beit_3x3_bs2", "beit", 2, 32, 2, (3, 3)),
        RelPosCase("tiny_maxvit_3x3_bs4", "maxvit_cl", 4, 32, 2, (3, 3)),
        RelPosCase("tiny_coatnet_3x3_bs2", "coatnet_2d", 2, 32, 2, (3, 3)),
    ]


def pytest_generate_tests(metafunc):
    harness.parametrize(metafunc, "relpos_point", harness.grid(metafunc.config, full_grid, smoke_grid), [MODE], IMPLS)


# --------------------------------------------------------------------------- #
# FLOPs and minimum bytes
# --------------------------------------------------------------------------- #
def flops(case: RelPosCase, mode=MODE) -> int:
    tokens = case.B * case.N
    linears = 2 * tokens * case.dim * 3 * case.dim + 2 * tokens * case.dim * case.dim
    attn = attention_flops(case.B, case.heads, case.N, case.N, case.head_dim)
    if not mode.backward:
        return linears + attn
    return 3 * linears + attn + attention_flops(case.B, case.heads, case.N, case.N, case.head_dim, backward=True)


def min_bytes(case: RelPosCase, mode=MODE, elem: int = 2) -> int:
    act = case.B * case.N * case.dim  # x, attention output, out: one activation each
    weights = 4 * case.dim * case.dim
    bias = case.heads * case.N * case.N  # the gathered (1, h, N, N) bias
    fwd = act + weights + 2 * 3 * act + 2 * act + act + 2 * bias
    if not mode.backward:
        return fwd * elem
    # dout, o, W_proj -> do, dW_proj; q, k, v, o, do, bias -> dqkv, dbias; dqkv, x, W_qkv -> dx, dW_qkv
    bwd = (act + act + weights // 4 + act + weights // 4) + (3 * act + 2 * act + bias + 3 * act + bias) \
        + (3 * act + act + 3 * weights // 4 + act + 3 * weights // 4)
    return (fwd + bwd) * elem


# --------------------------------------------------------------------------- #
# Modules
# --------------------------------------------------------------------------- #
def _timm_and_vitkern(case: RelPosCase) -> Tuple[Callable[[], torch.nn.Module], type, dict]:
    """(timm module factory, vitkern class, constructor kwargs); ImportError without timm."""
    from timm.layers.pos_embed_rel import RelPosBias
    from timm.models import beit, maxxvit

    import vitkern.nn as vk_nn

    if case.kind == "beit":
        return (lambda: beit.Attention(case.dim, num_heads=case.heads, qkv_bias=True, window_size=case.window),
                vk_nn.BeitAttention, dict(dim=case.dim, num_heads=case.heads, qkv_bias=True, window_size=case.window))
    cls, vk = ((maxxvit.AttentionCl, vk_nn.MaxxVitAttentionCl) if case.kind == "maxvit_cl"
               else (maxxvit.Attention2d, vk_nn.MaxxVitAttention2d))
    kw = dict(dim=case.dim, dim_head=case.head_dim, rel_pos_cls=partial(RelPosBias, window_size=case.window))
    return (lambda: cls(**kw)), vk, kw


class ModuleSet:
    """timm (unfused, SDPA, upcast reference) and vitkern modules sharing one set of random weights."""

    def __init__(self, case: RelPosCase, device: torch.device, dtype: torch.dtype):
        make, self.vk_cls, self.kwargs = _timm_and_vitkern(case)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(harness.seed_of(FAMILY, case.name))
        base = make()
        with torch.no_grad():  # the bias tables start at zero / ~0.02 in timm: make them matter
            for name, p in base.named_parameters():
                if "bias" in name:
                    p.normal_(0.0, 0.5)
        torch.random.set_rng_state(gen_state)
        base = base.to(device=device, dtype=dtype).eval()
        self.naive = copy.deepcopy(base)
        self.naive.fused_attn = False
        self.sdpa = copy.deepcopy(base)
        self.sdpa.fused_attn = True
        self.high = copy.deepcopy(base).to(harness.high_dtype(device))
        self.high.fused_attn = False
        self.state_dict = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.device, self.dtype = device, dtype

    def vitkern(self) -> torch.nn.Module:
        mod = self.vk_cls(**self.kwargs, backend="triton").to(device=self.device, dtype=self.dtype).eval()
        mod.load_state_dict(self.state_dict, strict=True)  # same keys and shapes as timm
        return mod


def _grad_keys(module: torch.nn.Module) -> List[str]:
    return ["dx"] + [f"d{n}" for n, _ in module.named_parameters()]


class CaseState:
    """Rotated (x, upstream grad) sets and the references for one case."""

    def __init__(self, case: RelPosCase, ms: ModuleSet, device: torch.device, dtype: torch.dtype):
        gen = harness.seeded_generator(device, FAMILY, case.name, "x")

        def make():
            return {"x": torch.randn(case.x_shape(), generator=gen, device=device, dtype=dtype).requires_grad_(True),
                    "grad": torch.randn(case.x_shape(), generator=gen, device=device, dtype=dtype)}

        first = make()
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device)
        self.sets = [first] + [make() for _ in range(copies - 1)]
        self.grad_keys = _grad_keys(ms.high)
        self.ref_high = self._reference(ms.high, first, harness.high_dtype(device))
        self.ref_same = self._reference(ms.naive, first, None) if harness.needs_same_dtype_reference(dtype) else None

    def _reference(self, module, s, high):
        x = s["x"].detach()
        x = (x.to(high) if high is not None else x).requires_grad_(True)
        grad = s["grad"].to(high) if high is not None else s["grad"]
        with harness.exact_fp32() if high is not None else nullcontext():
            out = module(x)
            grads = torch.autograd.grad(out, [x] + list(module.parameters()), grad)
        return {"out": out.detach(), **{k: g.detach() for k, g in zip(self.grad_keys, grads)}}


_SETS: Dict[tuple, ModuleSet] = {}
_STATE = harness.Slot()


def _note_floors(case: RelPosCase, ms: ModuleSet) -> None:
    def naive():
        module = floors.meta_module(ms.naive)
        x = floors.meta(case.x_shape(), True)
        harness.grad_step(module, (x,), floors.meta(x.shape), module.parameters())()

    harness.note_floors(FAMILY, case.name, MODE, {**case.shape(), "level": "module"},
                        kernel=lambda elem: (flops(case), min_bytes(case, MODE, elem)), naive=naive)


# --------------------------------------------------------------------------- #
# The benchmark
# --------------------------------------------------------------------------- #
def test_attention_relpos_module(benchmark, vk_settings, vk_ceilings, relpos_point):
    case, mode, impl = relpos_point
    settings = vk_settings
    common = harness.row_id(FAMILY, case.name, impl, IMPLS[impl], settings, mode, {**case.shape(), "level": "module"})
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    key = (case, str(settings.device), settings.dtype)
    try:
        if key not in _SETS:
            _SETS[key] = ModuleSet(case, settings.device, settings.dtype)
    except ImportError as exc:
        harness.skip(common, f"timm or vitkern.nn's relative-position modules are not importable: "
                             f"{harness.first_line(exc)}")
    ms = _SETS[key]
    _note_floors(case, ms)
    reason = harness.skip_reason(KINDS.get(impl), settings)
    if reason:
        harness.skip(common, reason)
    state = _STATE.get(key, lambda: CaseState(case, ms, settings.device, settings.dtype))
    module = {"naive": lambda: ms.naive, "timm_sdpa": lambda: ms.sdpa, "vitkern_triton": ms.vitkern}[impl]()
    keys = _grad_keys(module)
    step = harness.x_step(module, list(module.parameters()), True)

    def check(out, grads):
        assert keys == state.grad_keys, f"{impl}: parameters differ from timm's: {keys} vs {state.grad_keys}"
        return harness.check_equal(impl, out, grads, keys, state.ref_high, state.ref_same)

    harness.equal_then_time(benchmark, settings, vk_ceilings, common, step, state.sets, check,
                            flops=flops(case), min_bytes=min_bytes(case, mode, harness.element_size(settings.dtype)),
                            extra={"level": "module", "wrt": [k[1:] for k in keys]})


@pytest.mark.parametrize("case", smoke_grid(), ids=lambda c: c.name)
def test_vitkern_relpos_interpreter_equality(case):
    """The drop-in (backend="triton", fp32) with timm's weights vs the float64 timm module: out, dx, dW."""
    harness.skip_unless_interpreter(lambda: _timm_and_vitkern(case))
    ms = ModuleSet(case, torch.device("cpu"), torch.float32)
    state = CaseState(case, ms, torch.device("cpu"), torch.float32)
    module = ms.vitkern()
    s = state.sets[0]
    out = module(s["x"])
    grads = torch.autograd.grad(out, [s["x"]] + list(module.parameters()), s["grad"])
    assert _grad_keys(module) == state.grad_keys
    harness.check_equal("vitkern relpos (interpreter)", out, grads, state.grad_keys, state.ref_high, state.ref_same)
