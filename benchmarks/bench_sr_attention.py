"""PVT v2 spatial-reduction attention benchmarks: ``vitkern.nn.SRAttention`` (on
``vitkern.ops.sr_attention``) against timm's ``pvt_v2.Attention`` and the peers a user would pick.

Grid (GPU, bf16), PVTv2-b2 (embed dims 64 / 128 / 320 / 512, heads 1 / 2 / 5 / 8, head dim 64,
sr ratios 8 / 4 / 2 / 1):

* every stage at 224, batch 128: grids 56², 28², 14², 7²; the keys are reduced to 7² = 49 in
  every stage (sr 8 / 4 / 2 conv + LayerNorm; stage 4 has sr 1: its 49 tokens are the keys);
* stage 1 at 512², batch 8: grid 128², sr 8 -> 16² = 256 keys;
* stage 1 at 800×1333 (detection), batch 8: grid 200×333 as the issue states it (timm's
  7×7 / stride 4 / pad 3 stem gives 200×334; both floor to the same keys), sr 8 -> 25×41 = 1025
  keys: 333 is not divisible by 8 and Conv2d drops the trailing columns;
* beyond the issue, one case of the linear variant PVTv2-b2-li at 224 (stage 1, batch 128: the
  56² grid average-pooled to 7², 1×1 ``sr`` conv, LayerNorm, GELU), last, so a time cap cuts it
  first.

Case ids: ``<model>_<resolution>_s<stage>_<H>x<W>_sr<r>|linear_bs<B>``. Modes ``fwd``
(inference, under ``torch.no_grad()``) and ``fwd+bwd`` (a random upstream gradient,
``torch.autograd.grad`` for x and every parameter: q, kv, proj and, where keys are reduced, sr
and norm; no ``.grad`` accumulation is timed). Implementations, timed in the same run on the
same module weights (``forward(x, feat_size)``, the whole module: q / kv / proj Linears,
spatial reduction, attention):

* ``naive``: timm ``pvt_v2.Attention`` with ``fused_attn = False`` (q·kᵀ -> softmax -> ·v);
* ``timm_sdpa``: the same module with ``fused_attn = True`` (``F.scaled_dot_product_attention``,
  timm's default);
* ``compile_timm``: ``torch.compile`` of the ``timm_sdpa`` module, compiled before the timing:
  ``--vk-compile dynamic`` (default) one ``dynamic=True`` compile per module configuration
  (dims / heads / sr; the three stage-1 shapes share one) and mode, with a static compile of the
  shape if the dynamic one fails; ``static`` a fresh static compile per shape and mode; ``off``
  not run. These rows run after every other row of the family (``test_sr_attention_compile``,
  configuration by configuration, stage 1 first), and when ``$VK_BENCH_DEADLINE`` (set by
  ``scripts/gpu_check.sh``) leaves too little time for a compile they are recorded as skipped
  with that reason; a compile that fails is recorded as skipped with its error (not retried for
  the same configuration and mode);
* ``vitkern_triton``: ``vitkern.nn.SRAttention(..., backend="triton")`` loaded (strict) with the
  timm module's state_dict. If that module is not importable or cannot be built, the row runs
  ``vitkern.ops.sr_attention(..., backend="triton")`` on the timm module's weights instead (the
  same op the module calls); the row's ``vitkern_impl`` says which, ``vitkern_module_reason`` why.

Equality first, for every implementation: output and every gradient against the timm module in
fp32 with TF32 off (float64 on CPU) holding the same (bf16-representable) weights, within 2x
(forward) / 3x (gradients) the error of the bf16 naive module (``vitkern.testing.assert_close``).
The k half of ``kv.bias`` has an exactly-zero true gradient (a bias added to every key shifts a
score row by a constant, which the softmax cancels), so it is checked as near zero, not by
relative error: ‖dk_bias‖ / (the largest reference gradient norm) at most 3x the bf16 naive
module's (at least a quarter of bf16's eps; fp32 1e-5); its v half is compared as usual. The errors are
recorded as ``dkv.bias[k]`` / ``dkv.bias[v]``. Weights are random at about their init scale,
biases and the LayerNorm affine O(1) (timm starts them at 0 / 1, which would leave some
gradients untested); inputs and upstream gradients are fresh ``randn``.

FLOPs: the q, kv and proj Linears (2·B·N·C² + 2·B·Nk·C·2C + 2·B·N·C²), the ``sr`` conv
(2·B·Nk·C·C·r², r = 1 for the linear variant's 1×1 conv, none for sr 1) and the attention
``attention_flops(B, h, N, Nk, d)`` (4·B·h·N·Nk·d); fwd+bwd adds twice the Linears and the conv
(input and weight gradients) and the attention backward (10·B·h·N·Nk·d). Minimum bytes (bf16
elements x 2): the fully fused floor, forward read x, write out, read every weight; backward
adds read dout and x, write dx, read every weight and write its gradient. Peak memory of one
call is recorded for every row; ``summary.md`` adds "peak vs naive" for this family.

CPU (no GPU): a smoke grid (B = 2, 8×8 grid, C = 64, 1 head, fp32: sr 4, and the linear variant)
of ``naive`` and ``timm_sdpa``; ``compile_timm`` and ``vitkern_triton`` are recorded as skipped
with the reason, and vitkern (the module, and the op on the module's weights) is checked for
equality under TRITON_INTERPRET=1 on one tiny case (``test_vitkern_interpreter_equality``).

GPU time (estimate, H100, cold Triton / inductor caches, default settings):
  7 shapes x 2 modes x 3 implementations = 42 timed rows before the compiles, each ~0.15 s of
  timed calls (20..200 rounds) + ~8 untimed calls (the slowest, naive fwd+bwd at 800×1333,
  ~10-20 ms per call) -> ~15 s; inputs and fp32 references (TF32 off) per (shape, mode), twice
  (the compile rows rebuild them) ~10 s; Triton JIT of vitkern's patchify + LayerNorm and
  attention kernels (4 reduction kinds x fwd / bwd) ~20-40 s; session start (CUDA, ceilings,
  timm) ~10 s = ~1-1.3 min. compile_timm: 5 configurations x 2 modes = 10 dynamic compiles
  (~8-15 s forward, ~15-30 s forward + backward) ~2.5-3.5 min. Whole family without a cap
  ~4-5 min (``pytest --benchmark benchmarks/bench_sr_attention.py``); ``scripts/gpu_check.sh`` caps it
  at VK_BENCH_TIMEOUT_SR_ATTENTION=100 s (scaled to its share of the budget) plus what earlier steps
  left, so compile_timm typically covers stage 1 (all three resolutions) and the rest is
  recorded as skipped for the time cap. ``--vk-compile static`` makes 14 compiles.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import floors
import harness
from vitkern import testing
from vitkern.ops.attention import attention_flops

FAMILY = "sr_attention"


# --------------------------------------------------------------------------- #
# Grid
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class PvtCase:
    name: str
    B: int
    H: int
    W: int
    dim: int
    heads: int
    sr_ratio: int
    linear_attn: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def N(self) -> int:
        return self.H * self.W

    @property
    def key_grid(self) -> Tuple[int, int]:
        """The grid of the keys: 7×7 (linear), floor(H / r) × floor(W / r) (sr > 1, Conv2d floors), or H × W."""
        if self.linear_attn:
            return 7, 7
        if self.sr_ratio > 1:
            return self.H // self.sr_ratio, self.W // self.sr_ratio
        return self.H, self.W

    @property
    def Nk(self) -> int:
        hk, wk = self.key_grid
        return hk * wk

    @property
    def conv_kernel(self) -> int:
        """The ``sr`` conv's kernel size (1 for the linear variant), 0 when there is no conv."""
        if self.linear_attn:
            return 1
        return self.sr_ratio if self.sr_ratio > 1 else 0

    @property
    def config(self) -> Tuple[int, int, int, bool]:
        """What the module's weights depend on (cases with the same config share one module set)."""
        return self.dim, self.heads, self.sr_ratio, self.linear_attn

    @property
    def feat_size(self) -> Tuple[int, int]:
        return self.H, self.W

    def shape(self) -> Dict[str, object]:
        hk, wk = self.key_grid
        return dict(B=self.B, H=self.H, W=self.W, N=self.N, C=self.dim, heads=self.heads, head_dim=self.head_dim,
                    sr_ratio=self.sr_ratio, linear_attn=self.linear_attn, keys=f"{hk}x{wk}", Nk=self.Nk)


# PVTv2-b2 (timm pvt_v2_b2): dims, heads and sr ratios per stage.
B2_DIMS, B2_HEADS, B2_SR = (64, 128, 320, 512), (1, 2, 5, 8), (8, 4, 2, 1)
FULL_BATCH, HIRES_BATCH = 128, 8


def _b2_case(model: str, res: str, stage: int, H: int, W: int, B: int, linear: bool = False) -> PvtCase:
    i = stage - 1
    tag = "linear" if linear else f"sr{B2_SR[i]}"
    return PvtCase(f"{model}_{res}_s{stage}_{H}x{W}_{tag}_bs{B}", B, H, W, B2_DIMS[i], B2_HEADS[i], B2_SR[i], linear)


def full_grid() -> List[PvtCase]:
    cases = [_b2_case("pvt_v2_b2", "224", s, 56 // 2 ** (s - 1), 56 // 2 ** (s - 1), FULL_BATCH) for s in (1, 2, 3, 4)]
    cases.append(_b2_case("pvt_v2_b2", "512", 1, 128, 128, HIRES_BATCH))
    cases.append(_b2_case("pvt_v2_b2", "800x1333", 1, 200, 333, HIRES_BATCH))
    cases.append(_b2_case("pvt_v2_b2_li", "224", 1, 56, 56, FULL_BATCH, linear=True))  # beyond the issue: last
    return cases


def smoke_grid() -> List[PvtCase]:
    return [PvtCase("tiny_8x8_sr4_bs2", 2, 8, 8, 64, 1, 4, False),
            PvtCase("tiny_8x8_linear_bs2", 2, 8, 8, 64, 1, 4, True)]


Mode = harness.Mode
MODES = harness.MODES

IMPLS: Dict[str, str] = {"naive": "naive", "timm_sdpa": "peer", "vitkern_triton": "vitkern"}
COMPILE_IMPLS: Dict[str, str] = {"compile_timm": "peer"}
#: implementations that cannot run everywhere -> their kind (harness.skip_reason)
KINDS = {"vitkern_triton": "triton", "compile_timm": "compile"}


def pytest_generate_tests(metafunc):
    cases = harness.grid(metafunc.config, full_grid, smoke_grid)
    harness.parametrize(metafunc, "sr_point", cases, MODES, IMPLS)
    if "sr_compile_point" in metafunc.fixturenames:
        # configuration outermost (one dynamic compile per configuration and mode serves all its
        # shapes), fwd+bwd (training) before fwd, stage 1 first.
        configs: List[tuple] = []
        for c in cases:
            if c.config not in configs:
                configs.append(c.config)
        points = [(c, m, i) for cfg in configs for m in reversed(MODES) for c in cases if c.config == cfg
                  for i in COMPILE_IMPLS]
        metafunc.parametrize("sr_compile_point", points, ids=[f"{c.name}-{m.id}-{i}" for c, m, i in points])


# --------------------------------------------------------------------------- #
# FLOPs and minimum bytes
# --------------------------------------------------------------------------- #
def attn_flops(case: PvtCase, mode: Mode) -> int:
    args = (case.B, case.heads, case.N, case.Nk, case.head_dim)
    fwd = attention_flops(*args)
    return fwd + attention_flops(*args, backward=True) if mode.backward else fwd


def dense_flops(case: PvtCase) -> int:
    """Forward FLOPs of the q, kv, proj Linears and the sr conv."""
    B, N, Nk, C, r = case.B, case.N, case.Nk, case.dim, case.conv_kernel
    linears = 2 * B * N * C * C + 2 * B * Nk * C * 2 * C + 2 * B * N * C * C
    conv = 2 * B * Nk * C * C * r * r  # r = 0: no conv (sr 1)
    return linears + conv


def flops(case: PvtCase, mode: Mode) -> int:
    dense = dense_flops(case)
    return (3 * dense if mode.backward else dense) + attn_flops(case, mode)


def weight_elems(case: PvtCase) -> int:
    C, r = case.dim, case.conv_kernel
    total = (C * C + C) + (2 * C * C + 2 * C) + (C * C + C)  # q, kv, proj (with biases)
    if r:
        total += C * C * r * r + C + 2 * C  # sr conv (+ bias), LayerNorm affine
    return total


def min_bytes(case: PvtCase, mode: Mode, elem: int) -> int:
    """Fully fused floor: forward read x, write out, read the weights; backward read dout and x,
    write dx, read the weights and write their gradients."""
    tok = case.B * case.N * case.dim
    w = weight_elems(case)
    total = 2 * tok + w
    if mode.backward:
        total += 3 * tok + 2 * w
    return total * elem


# --------------------------------------------------------------------------- #
# timm modules (one set per configuration) and vitkern, imported lazily
# --------------------------------------------------------------------------- #
def _timm_attention_cls():
    from timm.models.pvt_v2 import Attention

    return Attention


def _sr_attention_op() -> Callable:
    ops = importlib.import_module("vitkern.ops")
    fn = getattr(ops, "sr_attention", None)
    if fn is None or not callable(fn):
        fn = getattr(importlib.import_module("vitkern.ops.sr_attention"), "sr_attention")
    return fn


def vitkern_op_fn(op: Callable, m: torch.nn.Module, sr_ratio: int, linear_attn: bool) -> Callable:
    """``vitkern.ops.sr_attention(backend="triton")`` on the weights of timm module ``m``."""
    reduced = m.sr is not None

    def fn(x, feat_size):
        return op(x, feat_size, num_heads=m.num_heads, q_weight=m.q.weight, q_bias=m.q.bias,
                  kv_weight=m.kv.weight, kv_bias=m.kv.bias, proj_weight=m.proj.weight, proj_bias=m.proj.bias,
                  sr_weight=m.sr.weight if reduced else None, sr_bias=m.sr.bias if reduced else None,
                  norm_weight=m.norm.weight if reduced else None, norm_bias=m.norm.bias if reduced else None,
                  sr_ratio=sr_ratio if (reduced and not linear_attn) else 1, linear_attn=linear_attn,
                  norm_eps=m.norm.eps if reduced else 1e-5, scale=m.scale, dropout_p=0.0, backend="triton")
    return fn


class PvtModules:
    """The modules compared for one configuration, sharing one set of (bf16-representable) weights."""

    def __init__(self, config: Tuple[int, int, int, bool], device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype = config, device, dtype
        dim, heads, sr_ratio, linear_attn = config
        cls = _timm_attention_cls()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(harness.seed_of(FAMILY, "modules", config))
            base = cls(dim, num_heads=heads, sr_ratio=sr_ratio, linear_attn=linear_attn, qkv_bias=True)
            testing.randomise_parameters(base)
        base = base.to(device=device, dtype=dtype).eval()
        self.naive = copy.deepcopy(base)
        self.naive.fused_attn = False  # timm's unfused q·kᵀ -> softmax -> ·v
        self.sdpa = copy.deepcopy(base)
        self.sdpa.fused_attn = True  # timm's default: F.scaled_dot_product_attention
        self.func = copy.deepcopy(base)  # the weights of the functional fallback (vitkern.ops.sr_attention)
        self.high = copy.deepcopy(base).to(harness.high_dtype(device))  # the same weights, upcast
        self.high.fused_attn = False
        self.state_dict = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.compiled: Optional[Callable] = None  # --vk-compile dynamic: one compile per configuration
        self._vitkern = None

    def vitkern(self) -> Tuple[Callable, torch.nn.Module, Dict[str, str]]:
        """(fn(x, feat_size), the module whose parameters fn differentiates, description).

        vitkern.nn.SRAttention(backend="triton") with timm's state_dict; if it is not importable or
        cannot be built, vitkern.ops.sr_attention(backend="triton") on the timm weights (raises
        if neither exists)."""
        if self._vitkern is None:
            dim, heads, sr_ratio, linear_attn = self.config
            why = None
            try:
                cls = importlib.import_module("vitkern.nn").SRAttention
            except Exception as exc:  # noqa: BLE001 - being written, or broken: fall back to the op
                why = f"vitkern.nn.SRAttention is not importable: {harness.first_line(exc)}"
            else:
                try:
                    mod = cls(dim, num_heads=heads, sr_ratio=sr_ratio, linear_attn=linear_attn, qkv_bias=True,
                              backend="triton")
                    mod = mod.to(device=self.device, dtype=self.dtype).eval()
                    mod.load_state_dict(self.state_dict)  # strict: same keys and shapes as timm
                except Exception as exc:  # noqa: BLE001
                    why = f"vitkern.nn.SRAttention could not be built with timm's state_dict: {harness.first_line(exc)}"
                else:
                    self._vitkern = (mod, mod, {"vitkern_impl": "vitkern.nn.SRAttention"})
            if self._vitkern is None:
                op = _sr_attention_op()
                fn = vitkern_op_fn(op, self.func, sr_ratio, linear_attn)
                self._vitkern = (fn, self.func, {"vitkern_impl": "vitkern.ops.sr_attention",
                                                 "vitkern_module_reason": why})
        return self._vitkern


_MODULES: Dict[tuple, PvtModules] = {}  # small (< 5 MB of weights each); kept so compiles are reused
_STATE = harness.Slot()  # one (case, mode) state alive at a time


def _modules(case: PvtCase, device: torch.device, dtype: torch.dtype) -> PvtModules:
    key = (case.config, str(device), dtype)
    if key not in _MODULES:
        _MODULES[key] = PvtModules(case.config, device, dtype)
    return _MODULES[key]


def _params(module: torch.nn.Module, names: Sequence[str]) -> List[torch.Tensor]:
    params = dict(module.named_parameters())
    if sorted(params) != sorted(names):
        raise AssertionError(f"parameters differ from timm's: {sorted(params)} vs {sorted(names)}")
    return [params[n] for n in names]


def _make_step(fn: Callable, feat_size, params: Sequence[torch.Tensor], backward: bool) -> Callable[[dict], tuple]:
    """One timed call of ``fn(x, feat_size)`` (see harness.x_step)."""
    return harness.x_step(fn, params, backward, feat_size)


class PvtState:
    """Rotated x / upstream-gradient copies and the two references for one (case, mode)."""

    def __init__(self, case: PvtCase, mode: Mode, mods: PvtModules):
        self.case, self.mode = case, mode
        device, dtype = mods.device, mods.dtype
        self.names = [n for n, _ in mods.high.named_parameters()]
        self.keys = ["dx"] + [f"d{n}" for n in self.names] if mode.backward else []
        gen = harness.seeded_generator(device, FAMILY, case.name, mode.name)
        first = self._make_set(gen, device, dtype)
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device)
        self.sets = [first] + [self._make_set(gen, device, dtype) for _ in range(copies - 1)]
        self.ref_high = self._reference(mods.high, first, harness.high_dtype(device))
        self.ref_same = self._reference(mods.naive, first, None) if harness.needs_same_dtype_reference(dtype) else None
        # The scale the k half of dkv.bias (exactly 0) is measured against: the largest gradient.
        self.grad_scale = max((g.double().norm().item() for k, g in self.ref_high.items() if k != "out"), default=1.0)
        self.ref_kv_bias_k = _k_half_metric(self.ref_high.get("dkv.bias"), self.grad_scale)

    def _make_set(self, gen, device, dtype) -> dict:
        c = self.case
        shape = (c.B, c.N, c.dim)
        s = {"x": torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_(self.mode.backward)}
        if self.mode.backward:
            s["grad"] = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        return s

    def _reference(self, module, s: dict, high: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        x = s["x"].detach()
        x = (x.to(high) if high is not None else x).requires_grad_(self.mode.backward)
        a = {"x": x}
        if self.mode.backward:
            a["grad"] = s["grad"].to(high) if high is not None else s["grad"]
        step = _make_step(module, self.case.feat_size, _params(module, self.names), self.mode.backward)
        with harness.exact_fp32() if high is not None else nullcontext():
            out, grads = step(a)
        result = {"out": out.detach()}
        result.update({k: g.detach() for k, g in zip(self.keys, grads)})
        return result


def _state(case: PvtCase, mode: Mode, mods: PvtModules) -> PvtState:
    return _STATE.get((case, mode, str(mods.device), mods.dtype), lambda: PvtState(case, mode, mods))


# --------------------------------------------------------------------------- #
# Equality
# --------------------------------------------------------------------------- #
def _k_half_metric(g: Optional[torch.Tensor], scale: float) -> Optional[float]:
    """‖k half of dkv.bias‖ / scale (the true value is exactly 0)."""
    if g is None:
        return None
    C = g.shape[0] // 2
    return g[:C].double().norm().item() / max(scale, 1e-300)


def _check_kv_bias(impl: str, g: torch.Tensor, state: PvtState) -> Dict[str, float]:
    """kv.bias = [k | v]: the k half's true gradient is 0 (softmax ignores a per-row constant), so
    it is checked as near zero relative to the largest gradient; the v half by relative error."""
    C = g.shape[0] // 2
    ref = state.ref_high["dkv.bias"]
    same = (state.ref_same or {}).get("dkv.bias")
    assert not torch.isnan(g).any(), f"{impl} dkv.bias: NaN"
    err_v = harness.assert_close(f"{impl} dkv.bias[v]", g[C:], ref[C:], same[C:] if same is not None else None,
                                 grad=True)
    err_k = _k_half_metric(g, state.grad_scale)
    if g.dtype in (torch.float16, torch.bfloat16):
        same_k = _k_half_metric(same, state.grad_scale) if same is not None else 0.0
        # The floor (a quarter ulp, as vitkern.testing's) matters: the naive module's own value is
        # rounding noise (~1e-4 of the largest gradient on bf16 test shapes; SDPA's 1-4x that), while a
        # wrong k half is of the order of the v half's norm (~5e-2 of the largest gradient).
        budget = max(testing.GRAD_FACTOR * same_k, torch.finfo(g.dtype).eps / 4)
        what = f"{testing.GRAD_FACTOR}x the {g.dtype} naive module's {same_k:.3e}"
    else:
        budget = testing.TF32_RTOL if (g.is_cuda and g.dtype == torch.float32) else testing.FP32_RTOL
        what = f"{g.dtype}"
    assert err_k <= budget, (f"{impl} dkv.bias[k]: should be ~0 (exactly 0 in exact arithmetic), its norm is "
                             f"{err_k:.3e} of the largest gradient's > budget {budget:.3e} ({what})")
    return {"dkv.bias[k]": err_k, "dkv.bias[v]": err_v}


def _check_equal(impl: str, out, grads, state: PvtState) -> Dict[str, float]:
    return harness.check_equal(impl, out, grads, state.keys, state.ref_high, state.ref_same,
                               special={"dkv.bias": lambda name, g: _check_kv_bias(name, g, state)})


# --------------------------------------------------------------------------- #
# torch.compile of the timm module
# --------------------------------------------------------------------------- #
#: (config, backward) pairs whose dynamic compile succeeded (the next shape reuses the graph).
_COMPILED_OK: set = set()
#: (config, backward) -> the case and error of a failed compile: not retried (each costs seconds).
_COMPILE_FAILED: Dict[tuple, str] = {}
#: Seconds a compile_timm row needs at least before the cap's deadline: a fresh compile (+ timing)...
COMPILE_MIN_LEFT_S = 30.0
#: ... or reusing a dynamic compile of the same configuration and mode.
REUSE_MIN_LEFT_S = 8.0


def _compile_candidates(compile_mode: str, mods: PvtModules, case: PvtCase, mode: Mode):
    """(how, factory) pairs to try in order; each factory returns the compiled module."""
    harness.raise_recompile_limit()  # 5 configurations x 2 modes share timm's forward code object

    def static():
        if compile_mode == "static":
            torch._dynamo.reset()  # one specialised graph per (case, mode); never near the limit
        # (a fallback in dynamic mode keeps the other configurations' dynamic graphs)
        return torch.compile(mods.sdpa, dynamic=False)

    def dynamic():
        if mods.compiled is None:
            mods.compiled = torch.compile(mods.sdpa, dynamic=True)
        return mods.compiled

    if compile_mode == "static":
        return [("static", static)]
    failed = _COMPILE_FAILED.get((case.config, mode.backward))
    if failed:
        return [(f"static (the dynamic compile failed earlier: {failed})", static)]
    return [("dynamic", dynamic), ("static (after the dynamic compile failed)", static)]


# --------------------------------------------------------------------------- #
# One row: floors, skips, equality, then timing and peak memory
# --------------------------------------------------------------------------- #
def _prepare(common: dict, case: PvtCase, mode: Mode, impl: str, settings) -> PvtModules:
    """timm's modules (or a skip if timm is missing), the case's floors, then the skip for ``impl``."""
    try:
        _timm_attention_cls()
    except ImportError as exc:
        harness.skip(common, f"timm (pvt_v2) is not installed: {harness.first_line(exc)}")
    mods = _modules(case, settings.device, settings.dtype)

    def naive():
        module = floors.meta_module(mods.naive)
        x = floors.meta((case.B, case.N, case.dim), mode.backward)
        harness.grad_step(lambda t: module(t, case.feat_size), (x,), floors.meta(x.shape) if mode.backward else None,
                          module.parameters())()

    harness.note_floors(FAMILY, case.name, mode, common["shape"], naive=naive,
                        kernel=lambda elem: (flops(case, mode), min_bytes(case, mode, elem)))
    reason = harness.skip_reason(KINDS.get(impl), settings)
    if reason:
        harness.skip(common, reason)
    return mods


def _run(benchmark, settings, ceilings, common: dict, state: PvtState, step: Callable,
         extra: Optional[dict] = None, may_fail: bool = False) -> None:
    case, mode = state.case, state.mode
    harness.equal_then_time(
        benchmark, settings, ceilings, common, step, state.sets,
        lambda out, grads: _check_equal(common["impl"], out, grads, state),
        flops=flops(case, mode), min_bytes=min_bytes(case, mode, harness.element_size(settings.dtype)),
        extra={"level": "module", "wrt": [k[1:] for k in state.keys], "attn_flops": attn_flops(case, mode),
               "dense_flops": dense_flops(case) * (3 if mode.backward else 1),
               "ref_dkv_bias_k": state.ref_kv_bias_k, **(extra or {})},
        may_fail=may_fail)


# --------------------------------------------------------------------------- #
# The benchmarks: naive / timm SDPA / vitkern on every shape first, then the compiles
# (the rows a time cap cuts)
# --------------------------------------------------------------------------- #
def test_sr_attention(benchmark, vk_settings, vk_ceilings, sr_point):
    case, mode, impl = sr_point
    settings = vk_settings
    common = harness.row_id(FAMILY, case.name, impl, IMPLS[impl], settings, mode, {**case.shape(), "level": "module"})
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    mods = _prepare(common, case, mode, impl, settings)
    extra: Dict[str, object] = {}
    if impl == "vitkern_triton":
        try:
            fn, owner, extra = mods.vitkern()
        except Exception as exc:  # noqa: BLE001 - neither the module nor the op: skip with the reason
            harness.skip(common, f"neither vitkern.nn.SRAttention nor vitkern.ops.sr_attention is usable: "
                                 f"{harness.first_line(exc)}")
    else:
        fn = owner = mods.naive if impl == "naive" else mods.sdpa
    state = _state(case, mode, mods)
    try:
        params = _params(owner, state.names) if mode.backward else []
    except AssertionError as exc:
        harness.record_failure(**common, reason=str(exc))
        raise
    _run(benchmark, settings, vk_ceilings, common, state, _make_step(fn, case.feat_size, params, mode.backward), extra)


def test_sr_attention_compile(benchmark, vk_settings, vk_ceilings, sr_compile_point):
    case, mode, impl = sr_compile_point
    settings = vk_settings
    common = harness.row_id(FAMILY, case.name, impl, COMPILE_IMPLS[impl], settings, mode,
                            {**case.shape(), "level": "module"})
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    mods = _prepare(common, case, mode, impl, settings)
    fresh = settings.compile == "static" or (case.config, mode.backward) not in _COMPILED_OK
    need = COMPILE_MIN_LEFT_S if fresh else REUSE_MIN_LEFT_S
    left = harness.time_left_s()
    if left is not None and left < need:
        harness.skip(common, f"time cap: {left:.0f} s left before $VK_BENCH_DEADLINE, a torch.compile row needs "
                             f"~{need:.0f} s (run this family without the cap for every shape)")

    state = _state(case, mode, mods)
    params = _params(mods.sdpa, state.names) if mode.backward else []
    reasons: List[str] = []
    for how, factory in _compile_candidates(settings.compile, mods, case, mode):
        try:
            # a compiled module that runs but computes something else raises AssertionError: a failure
            _run(benchmark, settings, vk_ceilings, common, state,
                 _make_step(factory(), case.feat_size, params, mode.backward), {"compile": how}, may_fail=True)
        except harness.FirstCallFailed as exc:  # the compile (or the compiled call) failed
            reasons.append(f"{how}: {exc}")
            if how == "dynamic" and not isinstance(exc.__cause__, torch.cuda.OutOfMemoryError):
                _COMPILE_FAILED[(case.config, mode.backward)] = f"{case.name}: {exc}"
            harness.free_memory()
            continue
        if how == "dynamic":
            _COMPILED_OK.add((case.config, mode.backward))
        return
    harness.skip(common, f"torch.compile failed: {'; '.join(reasons)}")


# --------------------------------------------------------------------------- #
# CPU: vitkern under the interpreter (equality only)
# --------------------------------------------------------------------------- #
TINY = PvtCase("tiny_8x8_sr4_bs1", 1, 8, 8, 64, 1, 4, False)


@pytest.mark.parametrize("which", ["module", "op"])
def test_vitkern_interpreter_equality(which):
    """vitkern (the module loaded with timm's state_dict, or the op on timm's weights), backend="triton",
    vs timm's module in float64: out, dx and every parameter gradient (dkv.bias's k half as ~0)."""
    harness.skip_unless_interpreter(_timm_attention_cls)
    device, dtype = torch.device("cpu"), torch.float32
    mods = PvtModules(TINY.config, device, dtype)
    if which == "module":
        try:
            fn, owner, info = mods.vitkern()
        except Exception as exc:  # noqa: BLE001 - neither the module nor the op
            pytest.skip(f"vitkern's SRAttention / sr_attention is not usable: {harness.first_line(exc)}")
        if info["vitkern_impl"] != "vitkern.nn.SRAttention":
            pytest.skip(info.get("vitkern_module_reason") or "vitkern.nn.SRAttention is not usable")
    else:
        try:
            fn, owner = vitkern_op_fn(_sr_attention_op(), mods.func, TINY.sr_ratio, TINY.linear_attn), mods.func
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"vitkern.ops.sr_attention is not importable: {harness.first_line(exc)}")
    state = PvtState(TINY, MODES[1], mods)
    out, grads = _make_step(fn, TINY.feat_size, _params(owner, state.names), True)(state.sets[0])
    _check_equal(f"vitkern {which} (interpreter)", out, grads, state)
