"""Shifted-window attention (Swin) benchmarks: ``vitkern.ops.window_attention`` and
``vitkern.nn.SwinTransformerBlock`` against timm's naive path and the peers a user would pick.

Grid (GPU, bf16, batch 128, head dim 32), every stage of three models:

* Swin-T at 224: grids 56², 28², 14², 7²; dims 96 / 192 / 384 / 768, heads 3 / 6 / 12 / 24; window 7;
* Swin-B at 224: the same grids; dims 128 / 256 / 512 / 1024, heads 4 / 8 / 16 / 32; window 7;
* Swin-B at 384: grids 96², 48², 24², 12²; Swin-B's dims and heads; window 12.

Swin blocks alternate shift 0 and shift M // 2; every case is the **shifted** block (shift 3 for
window 7, 6 for window 12: the roll, the shift mask and the region bookkeeping are the hard part)
wherever the grid allows. The last stage's grid equals the window, so timm's small-grid rule
(``vitkern.reference.swin_effective_window``) makes it one unshifted window: those cases are named
``..._noshift``. Case ids: ``<model>_s<stage>_<H>x<W>_w<window>_shift<s>|noshift_bs<B>``. Cases run
stage 1, 3, 2, 4 (stage 3 is where Swin spends most of its blocks; stage 1 is the largest), so a
time cap cuts the least telling shapes.

Two levels, modes ``fwd`` (inference: ``torch.no_grad()``) and ``fwd+bwd`` (a random upstream
gradient; ``torch.autograd.grad`` for x and every parameter; no ``.grad`` accumulation is timed):

* **attention part** (``test_window_attention`` / ``test_window_attention_flex``): what timm's
  ``SwinTransformerBlock._attn(x)`` does for a (B, H, W, C) input: roll, pad, window partition,
  qkv Linear, window attention with the relative-position bias and the shift mask, proj Linear,
  window merge, crop, roll back. Gradients: x and ``attn.{qkv,proj}.{weight,bias}``,
  ``attn.relative_position_bias_table``. Implementations:

  * ``naive``: the timm block with ``attn.fused_attn = False`` (q·kᵀ -> + bias + mask -> softmax -> ·v);
  * ``timm_sdpa``: the same block with ``attn.fused_attn = True`` (bias + mask materialised per
    window and passed to ``F.scaled_dot_product_attention`` as ``attn_mask``);
  * ``vitkern_triton``: ``F.linear(x, qkv)`` -> ``vitkern.ops.window_attention(qkv, table, ...,
    qkv_bias=qkv.bias, backend="triton")`` -> ``F.linear(., proj)``: the same work as ``_attn``
    with roll / pad / partition / bias / mask / merge inside the kernel;
  * ``flex_blockmask``: the issue's "FlexAttention with a block mask and a bias score_mod", taken
    literally: roll + pad in torch (as timm), the qkv Linear on the whole grid, then ONE
    ``flex_attention`` per image over the rolled, padded grid as a row-major sequence of Hp·Wp
    tokens, with a ``BlockMask`` (built once per shape) restricting attention to tokens of the same
    window and a ``score_mod`` that adds the relative-position bias (gathered from the table by an
    index computed from q_idx / kv_idx) and the shift mask (region ids computed from the
    coordinates); no window partition copies;
  * ``flex_windows``: roll + pad + window partition in torch exactly as timm, then
    ``flex_attention`` on the (B·nW, heads, M², d) windows with the same ``score_mod`` (the
    window's position comes from the batch index), no block mask; merge, crop, roll back.

  Both FlexAttention variants run ``torch.compile(flex_attention, dynamic=False)`` (the bias
  table, window geometry and block mask differ per shape, so it compiles once per shape and
  mode, outside the timing; ``--vk-compile dynamic`` and ``static`` behave the same here,
  ``off`` skips them). They run last (``test_window_attention_flex``, inputs and references rebuilt
  per case), ``flex_blockmask`` over every case first, then ``flex_windows``, so naive, SDPA and
  vitkern are measured on every shape before the compiles spend the time cap. When
  ``$VK_BENCH_DEADLINE`` (set by ``scripts/gpu_check.sh``) leaves less than a compile's worth of
  time, the remaining FlexAttention rows are recorded as skipped with that reason; a compile that
  fails is recorded as skipped with its error (and not retried for the same variant and mode).

* **whole block** (``test_window_attention_block``): timm's ``SwinTransformerBlock.forward`` (norm1 ->
  ``_attn`` -> residual -> norm2 -> MLP -> residual) as ``naive`` (``fused_attn = False``) and
  ``timm_sdpa`` (``fused_attn = True``), against ``vitkern.nn.SwinTransformerBlock(...,
  backend="triton")`` loaded with the timm block's state_dict (strict). Gradients: x and every
  parameter. Skipped with the reason when vitkern's module or op is not importable (yet).

**Swin V2** (``test_window_attention_v2_block`` / ``test_window_attention_v2``): the same two levels for
timm's ``swin_transformer_v2.SwinTransformerV2Block`` (cosine attention with a per-head logit scale,
the continuous position-bias MLP's table, q/v biases, post-norm) on Swin-V2-T at 256 (grids 64², 32²,
16², 8²; dims 96 / 192 / 384 / 768, heads 3 / 6 / 12 / 24; window 8, shift 4): ``naive`` is timm's
block (timm V2 has no SDPA path), ``vitkern_triton`` is ``vitkern.nn.SwinTransformerV2Block`` (block)
or the qkv Linear -> ``window_attention(..., logit_scale=attn.logit_scale)`` -> proj (attention part;
the CPB MLP's table 16·sigmoid(cpb_mlp(coords)) computed in torch, as the module does). Gradients
include ``attn.logit_scale``, ``attn.q_bias`` / ``attn.v_bias`` and the ``attn.cpb_mlp`` weights.
Weights: timm's init with logit scales, q/v biases and LayerNorm affines perturbed. CPU: the smoke
case ``tiny_v2_14x14_w7_shift3_bs2`` (naive rows; vitkern rows skipped with the reason). GPU: 4 shapes
x 2 modes x 2 levels x 2 implementations = 32 more timed cases (estimate ~15-25 s with their references).

Equality first, for every implementation: output and every gradient against timm's unfused
block holding the same (bf16-representable) weights upcast to fp32 (TF32 off) on the GPU,
float64 on CPU, within 2x (forward) / 3x (gradients) the error of the bf16 naive path
(``vitkern.testing.assert_close``). Weights are timm's init with the relative-position bias table
drawn from N(0, 0.5²) (timm's 0.02 would hide a wrong bias index inside bf16 noise) and
LayerNorm affine parameters perturbed; inputs and upstream gradients are fresh ``randn``.

FLOPs: the Linears (2·T·C·3C + 2·T·C·C for the attention part, plus 2·2·T·C·4C for the MLP;
backward twice that) + window attention ``attention_flops(B·nW, heads, M², M², d)`` forward and
``10·B·nW·heads·M⁴·d`` backward (T = B·H·W tokens; padded windows counted as timm computes
them). Minimum bytes (bf16 elements x 2), the sum of each stage's own minimum, Linears as
separate GEMMs and LayerNorm / GELU / residual adds fused into their neighbours:

* window attention alone: read qkv (3C per token) and the table, write C per token; backward
  read qkv and dout (C), write dqkv (3C) and dtable. Recorded per row as ``attn_min_bytes`` /
  ``attn_flops``;
* attention part: + qkv Linear (read x C, write qkv 3C) and proj Linear (read C, write C), the
  weights read once; backward + proj (read dout, o; write do) and qkv Linear (read dqkv, x;
  write dx), weights read and weight gradients written once: 10·C per token forward, 15·C
  backward;
* block: + proj's residual (read x), fc1 (read C, write 4C), fc2 (read 4C and the residual,
  write C): 22·C per token forward, 30·C backward, all weights (12·C²) read once per pass and
  their gradients written once.

Peak memory (GPU) of one call is recorded for every row; ``summary.md`` adds "peak vs naive"
(this row's peak ÷ the naive row's peak; < 1 = less memory) for this family.

CPU (no GPU): a smoke grid (B = 2, 14×14 grid, C = 32, 2 heads, window 7, shift 3, fp32) for
``naive`` and ``timm_sdpa`` at both levels; FlexAttention and vitkern rows are skipped with the
reason. vitkern's op and module (Swin V2's too) are checked for equality under TRITON_INTERPRET=1 on tiny
shapes (``test_vitkern_window_attention_interpreter_equality``,
``test_vitkern_block_interpreter_equality``; skipped with the reason while they do not exist),
and both FlexAttention implementations' math (score_mod, block mask, roll / pad / partition) is
checked in eager mode against timm in float64 (``test_flex_eager_forward_equality``; FlexAttention
has no CPU backward).

GPU time (estimate, H100, cold Triton / inductor caches, default settings):
  12 shapes x 2 modes x (3 block + 3 attention + 2 FlexAttention implementations) = 192 timed
  cases; each ~0.15 s of timed calls (20..200 rounds), the largest (Swin-B 384 stage 1, naive
  fwd+bwd ~15-25 ms per call) ~0.6 s with warm-up, equality and peak memory -> ~55 s; inputs
  and fp32 references (TF32 off) per (level, shape, mode) ~0.1-0.5 s -> ~15 s; Triton JIT of
  vitkern's window attention (2 windows x shifted / unshifted x fwd / bwd) and block ~20-40 s;
  session start (CUDA, ceilings, timm) ~10 s; FlexAttention: one compile per shape x mode x
  variant (~5 s forward, ~10-15 s forward + backward) = 48 compiles ~6-8 min.
  Without FlexAttention ~1.7-2 min; scripts/gpu_check.sh caps the family at
  VK_BENCH_TIMEOUT_WINDOW_ATTENTION=130 s plus whatever time the earlier steps left, so FlexAttention
  typically covers the first few shapes (stage 1 first) and the rest are recorded as skipped
  for the time cap. ``pytest --benchmark benchmarks/bench_window_attention.py`` without a cap runs it all
  (~9-10 min).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import types
import warnings
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import floors
import harness
from vitkern.ops.attention import attention_flops
from vitkern.reference import swin_effective_window

FAMILY = "window_attention"


# --------------------------------------------------------------------------- #
# Grid
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class SwinCase:
    name: str
    B: int
    H: int
    W: int
    dim: int
    heads: int
    window: int  # requested window (the block's window_size argument)
    shift: int  # requested shift (the block's shift_size argument)
    v2: bool = False  # timm's Swin V2 block (cosine attention, CPB table) instead of Swin's

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def eff(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(window, shift) the block really uses (timm's small-grid rule)."""
        return swin_effective_window((self.H, self.W), self.window, self.shift)

    @property
    def padded(self) -> Tuple[int, int]:
        (mh, mw), _ = self.eff
        return math.ceil(self.H / mh) * mh, math.ceil(self.W / mw) * mw

    @property
    def num_windows(self) -> int:
        (mh, mw), _ = self.eff
        hp, wp = self.padded
        return (hp // mh) * (wp // mw)

    @property
    def tokens(self) -> int:
        return self.B * self.H * self.W

    def shape(self) -> Dict[str, object]:
        (mh, mw), (sh, sw) = self.eff
        return dict(B=self.B, H=self.H, W=self.W, C=self.dim, heads=self.heads, head_dim=self.head_dim,
                    window=f"{mh}x{mw}", shift=f"{sh}x{sw}", windows_per_image=self.num_windows)


def _case_name(model: str, stage: int, grid: int, window: int, shift: int, B: int) -> str:
    (mh, mw), (sh, sw) = swin_effective_window((grid, grid), window, shift)
    tag = f"shift{sh}" if (sh or sw) else "noshift"
    return f"{model}_s{stage}_{grid}x{grid}_w{mh}_{tag}_bs{B}"


# model -> (resolution, dims per stage, heads per stage, window)
_MODELS = {
    "swin_t_224": (224, (96, 192, 384, 768), (3, 6, 12, 24), 7),
    "swin_b_224": (224, (128, 256, 512, 1024), (4, 8, 16, 32), 7),
    "swin_b_384": (384, (128, 256, 512, 1024), (4, 8, 16, 32), 12),
}
STAGE_ORDER = (1, 3, 2, 4)  # stage 3 holds most of Swin's blocks; stage 1 is the largest
FULL_BATCH = 128


def _stage_cases(models) -> List[SwinCase]:
    cases = []
    for stage in STAGE_ORDER:
        for model, (res, dims, heads, window) in models.items():
            grid = res // 4 // 2 ** (stage - 1)
            shift = window // 2  # the shifted block; the small-grid rule drops it on the last stage
            cases.append(SwinCase(_case_name(model, stage, grid, window, shift, FULL_BATCH), FULL_BATCH,
                                  grid, grid, dims[stage - 1], heads[stage - 1], window, shift))
    return cases


def full_grid() -> List[SwinCase]:
    return _stage_cases(_MODELS)


def smoke_grid() -> List[SwinCase]:
    return [SwinCase("tiny_14x14_w7_shift3_bs2", 2, 14, 14, 32, 2, 7, 3)]


_MODELS_V2 = {"swinv2_t_256": (256, (96, 192, 384, 768), (3, 6, 12, 24), 8)}


def v2_full_grid() -> List[SwinCase]:
    return [dataclasses.replace(c, v2=True) for c in _stage_cases(_MODELS_V2)]


def v2_smoke_grid() -> List[SwinCase]:
    return [SwinCase("tiny_v2_14x14_w7_shift3_bs2", 2, 14, 14, 32, 2, 7, 3, v2=True)]


Mode = harness.Mode
MODES = harness.MODES

BLOCK_IMPLS: Dict[str, str] = {"naive": "naive", "timm_sdpa": "peer", "vitkern_triton": "vitkern"}
ATTN_IMPLS: Dict[str, str] = {"naive": "naive", "timm_sdpa": "peer", "vitkern_triton": "vitkern"}
FLEX_IMPLS: Dict[str, str] = {"flex_blockmask": "peer", "flex_windows": "peer"}
V2_IMPLS: Dict[str, str] = {"naive": "naive", "vitkern_triton": "vitkern"}  # both levels; timm V2 has no SDPA path
BLOCK_PREFIX = "block_"  # block-level case names: block_<case>
#: implementations that cannot run everywhere -> their kind (harness.skip_reason)
KINDS = {"vitkern_triton": "triton", "flex_blockmask": "flex", "flex_windows": "flex"}


def pytest_generate_tests(metafunc):
    cases = harness.grid(metafunc.config, full_grid, smoke_grid)
    harness.parametrize(metafunc, "wa_block_point", cases, MODES, BLOCK_IMPLS, prefix=BLOCK_PREFIX)
    harness.parametrize(metafunc, "wa_attn_point", cases, MODES, ATTN_IMPLS)
    v2_cases = harness.grid(metafunc.config, v2_full_grid, v2_smoke_grid)
    harness.parametrize(metafunc, "wa_v2_block_point", v2_cases, MODES, V2_IMPLS, prefix=BLOCK_PREFIX)
    harness.parametrize(metafunc, "wa_v2_attn_point", v2_cases, MODES, V2_IMPLS)
    if "wa_flex_point" in metafunc.fixturenames:
        # variant outermost: flex_blockmask (the peer) on every shape before flex_windows
        pts, ids = [], []
        for impl in FLEX_IMPLS:
            p, i = harness.points(cases, MODES, [impl])
            pts, ids = pts + p, ids + i
        metafunc.parametrize("wa_flex_point", pts, ids=ids)


# --------------------------------------------------------------------------- #
# FLOPs and minimum bytes
# --------------------------------------------------------------------------- #
def window_attn_flops(case: SwinCase, mode: Mode) -> int:
    (mh, mw), _ = case.eff
    n = mh * mw
    args = (case.B * case.num_windows, case.heads, n, n, case.head_dim)
    fwd = attention_flops(*args)
    return fwd + attention_flops(*args, backward=True) if mode.backward else fwd


def flops(case: SwinCase, mode: Mode, level: str) -> int:
    T, C = case.tokens, case.dim
    linears = 2 * T * C * 3 * C + 2 * T * C * C  # qkv, proj
    if level == "block":
        linears += 2 * 2 * T * C * 4 * C  # fc1, fc2
    return (3 * linears if mode.backward else linears) + window_attn_flops(case, mode)


def _table_elems(case: SwinCase) -> int:
    (mh, mw), _ = case.eff
    return (2 * mh - 1) * (2 * mw - 1) * case.heads


def window_attn_min_bytes(case: SwinCase, mode: Mode, elem: int) -> int:
    """read qkv (3C/token) + table, write C/token; backward read qkv + dout, write dqkv + dtable."""
    T, C, tab = case.tokens, case.dim, _table_elems(case)
    total = T * 4 * C + tab
    if mode.backward:
        total += T * 7 * C + 2 * tab
    return total * elem


def min_bytes(case: SwinCase, mode: Mode, level: str, elem: int) -> int:
    """Sum of each stage's minimum (see the module docstring): per token 10·C / 15·C (attention
    part) or 22·C / 30·C (block) forward / backward, plus the weights once per pass."""
    T, C, tab = case.tokens, case.dim, _table_elems(case)
    if level == "block":
        fwd_tok, bwd_tok = 22, 30
        weights = 12 * C * C + (3 * C + C + 4 * C + C) + 4 * C + tab  # Linears, biases, 2 LayerNorms, table
    else:
        fwd_tok, bwd_tok = 10, 15
        weights = 4 * C * C + 4 * C + tab
    total = T * fwd_tok * C + weights
    if mode.backward:
        total += T * bwd_tok * C + 2 * weights  # weights read again, their gradients written
    return total * elem


# --------------------------------------------------------------------------- #
# timm blocks (one set per case) and vitkern's op / module, imported lazily
# --------------------------------------------------------------------------- #
def _timm_block_cls(v2: bool = False):
    if v2:
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block

        return SwinTransformerV2Block
    from timm.models.swin_transformer import SwinTransformerBlock

    return SwinTransformerBlock


def _randomise(block: torch.nn.Module) -> None:
    """A bias table large enough that a wrong bias index shows (V2: logit scales and q/v biases
    perturbed, the CPB MLP at its init), and perturbed LayerNorm affines."""
    with torch.no_grad():
        attn = block.attn
        if hasattr(attn, "logit_scale"):
            attn.logit_scale.add_(torch.randn_like(attn.logit_scale), alpha=0.3)
            for bias in (attn.q_bias, attn.v_bias):
                bias.normal_(0.0, 0.5)
        else:
            attn.relative_position_bias_table.normal_(0.0, 0.5)
        for norm in (block.norm1, block.norm2):
            norm.weight.add_(torch.randn_like(norm.weight), alpha=0.1)
            norm.bias.normal_(0.0, 0.1)


def _window_attention_op() -> Callable:
    """vitkern.ops.window_attention (the function, even if only the submodule exists)."""
    ops = importlib.import_module("vitkern.ops")
    fn = getattr(ops, "window_attention", None)
    if fn is None or isinstance(fn, types.ModuleType):
        fn = getattr(importlib.import_module("vitkern.ops.window_attention"), "window_attention")
    if not callable(fn):
        raise ImportError(f"vitkern.ops.window_attention is a {type(fn).__name__}, not a function")
    return fn


def _vitkern_op_or_reason() -> Tuple[Optional[Callable], Optional[str]]:
    try:
        return _window_attention_op(), None
    except Exception as exc:  # noqa: BLE001 - being written, or broken: skip with the reason
        return None, f"vitkern.ops.window_attention is not importable: {harness.first_line(exc)}"


class SwinModules:
    """The timm blocks compared for one case, sharing one set of weights."""

    def __init__(self, case: SwinCase, device: torch.device, dtype: torch.dtype):
        self.case, self.device, self.dtype = case, device, dtype
        cls = _timm_block_cls(case.v2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(harness.seed_of(FAMILY, "modules", case.name))
            base = cls(case.dim, input_resolution=(case.H, case.W), num_heads=case.heads,
                       window_size=case.window, shift_size=case.shift)
            _randomise(base)
        base = base.to(device=device, dtype=dtype).eval()
        self.window = tuple(int(v) for v in base.window_size)
        self.shift = tuple(int(v) for v in base.shift_size)
        if (self.window, self.shift) != case.eff:
            raise AssertionError(f"timm's block uses window {self.window} shift {self.shift}, "
                                 f"swin_effective_window says {case.eff}")
        self.naive = copy.deepcopy(base)
        self.naive.attn.fused_attn = False  # timm's unfused q·kᵀ -> + bias + mask -> softmax -> ·v
        self.sdpa = None if case.v2 else copy.deepcopy(base)
        if self.sdpa is not None:
            self.sdpa.attn.fused_attn = True  # F.scaled_dot_product_attention with the bias as attn_mask
        self.func = copy.deepcopy(base)  # parameters of the functional implementations (vitkern, flex)
        self.high = copy.deepcopy(base).to(harness.high_dtype(device))  # the same (bf16-representable) weights, upcast
        self.high.attn.fused_attn = False
        self.state_dict = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self._vitkern = None
        self._vitkern_reason: Optional[str] = None

    def vitkern_block(self):
        """(vitkern.nn.SwinTransformerBlock / SwinTransformerV2Block with timm's weights, None) or (None, why not)."""
        if self._vitkern is None and self._vitkern_reason is None:
            c = self.case
            name = "SwinTransformerV2Block" if c.v2 else "SwinTransformerBlock"
            try:
                cls = getattr(importlib.import_module("vitkern.nn"), name)
            except Exception as exc:  # noqa: BLE001 - being written, or broken: skip with the reason
                self._vitkern_reason = f"vitkern.nn.{name} is not importable: {harness.first_line(exc)}"
                return None, self._vitkern_reason
            try:
                mod = cls(c.dim, input_resolution=(c.H, c.W), num_heads=c.heads, window_size=c.window,
                          shift_size=c.shift, backend="triton")
                mod = mod.to(device=self.device, dtype=self.dtype).eval()
                mod.load_state_dict(self.state_dict)  # strict: same keys and shapes as timm
            except Exception as exc:  # noqa: BLE001
                self._vitkern_reason = (f"vitkern.nn.{name} could not be built with timm's "
                                        f"state_dict: {harness.first_line(exc)}")
                return None, self._vitkern_reason
            self._vitkern = mod
        return self._vitkern, self._vitkern_reason


# One case's modules and one (level, case, mode) state alive at a time: GPU memory stays bounded.
_MODULES = harness.Slot()
_STATE = harness.Slot()


def _modules(case: SwinCase, device: torch.device, dtype: torch.dtype) -> SwinModules:
    def build():
        _STATE.clear()  # its references belong to the old modules
        return SwinModules(case, device, dtype)
    return _MODULES.get((case, str(device), dtype), build)


def _param_names(module: torch.nn.Module, level: str) -> List[str]:
    """Names (relative to the block) of the parameters the level differentiates."""
    names = [n for n, _ in module.named_parameters()]
    return [n for n in names if n.startswith("attn.")] if level == "attn" else names


def _params(module: torch.nn.Module, names: Sequence[str]) -> List[torch.Tensor]:
    params = dict(module.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise AssertionError(f"parameters differ from timm's: missing {missing}, has {sorted(params)}")
    return [params[n] for n in names]


def _timm_fn(block: torch.nn.Module, level: str) -> Callable:
    return block._attn if level == "attn" else block


class SwinState:
    """Rotated x / upstream-gradient copies and the two references for one (level, case, mode)."""

    def __init__(self, level: str, case: SwinCase, mode: Mode, mods: SwinModules):
        self.level, self.case, self.mode = level, case, mode
        device, dtype = mods.device, mods.dtype
        self.names = _param_names(mods.high, level)
        self.keys = ["dx"] + [f"d{n}" for n in self.names] if mode.backward else []
        gen = harness.seeded_generator(device, FAMILY, level, case.name, mode.name)
        first = self._make_set(gen, device, dtype)
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device)
        self.sets = [first] + [self._make_set(gen, device, dtype) for _ in range(copies - 1)]
        self.ref_high = self._reference(mods.high, first, harness.high_dtype(device))
        self.ref_same = self._reference(mods.naive, first, None) if harness.needs_same_dtype_reference(dtype) else None

    def _make_set(self, gen, device, dtype) -> dict:
        c = self.case
        shape = (c.B, c.H, c.W, c.dim)
        s = {"x": torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_(self.mode.backward)}
        if self.mode.backward:
            s["grad"] = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        return s

    def _reference(self, block, s: dict, high: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        x = s["x"].detach()
        x = (x.to(high) if high is not None else x).requires_grad_(self.mode.backward)
        a = {"x": x}
        if self.mode.backward:
            a["grad"] = s["grad"].to(high) if high is not None else s["grad"]
        step = _make_step(_timm_fn(block, self.level), _params(block, self.names), self.mode.backward)
        with harness.exact_fp32() if high is not None else nullcontext():
            out, grads = step(a)
        result = {"out": out.detach()}
        result.update({k: g.detach() for k, g in zip(self.keys, grads)})
        return result


def _state(level: str, case: SwinCase, mode: Mode, mods: SwinModules) -> SwinState:
    return _STATE.get((level, case, mode, str(mods.device), mods.dtype), lambda: SwinState(level, case, mode, mods))


_make_step = harness.x_step


def _check_equal(impl: str, out, grads, state: SwinState) -> Dict[str, float]:
    return harness.check_equal(impl, out, grads, state.keys, state.ref_high, state.ref_same)


# --------------------------------------------------------------------------- #
# Functional implementations of the attention part (same math as timm's _attn)
# --------------------------------------------------------------------------- #
def vitkern_attn_fn(op: Callable, attn: torch.nn.Module, window, shift) -> Callable:
    """qkv Linear -> vitkern.ops.window_attention (roll, pad, windows, bias, mask, merge inside) -> proj."""
    def fn(x):
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
        o = op(qkv, attn.relative_position_bias_table, num_heads=attn.num_heads, window_size=window,
               shift_size=shift, scale=attn.scale, qkv_bias=attn.qkv.bias, backend="triton")
        return F.linear(o, attn.proj.weight, attn.proj.bias)
    return fn


def vitkern_v2_attn_fn(op: Callable, attn: torch.nn.Module, window, shift) -> Callable:
    """Swin V2: qkv Linear (q/v biases) -> CPB table in torch -> the window op's cosine attention -> proj."""
    def fn(x):
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)
        table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
        o = op(qkv, table, num_heads=attn.num_heads, window_size=window, shift_size=shift, qkv_bias=bias,
               logit_scale=attn.logit_scale, backend="triton")
        return F.linear(o, attn.proj.weight, attn.proj.bias)
    return fn


def _region(p, length: int, window: int, shift: int):
    """timm's shift-mask region label (0, 1, 2) of padded coordinate ``p`` along one axis."""
    return (p >= length - window).to(torch.int32) + (p >= length - shift).to(torch.int32)


class FlexSwinAttention:
    """timm's ``_attn`` on FlexAttention, for one shape (score_mod / block mask built once).

    ``variant="blockmask"``: roll + pad, the qkv Linear on the whole grid, one flex_attention per
    image over the Hp·Wp row-major tokens with a block mask "same window"; ``"windows"``: roll + pad
    + window partition as timm, flex_attention over the (B·nW, heads, M², d) windows. Both add the
    relative-position bias (table gathered by an index computed from q_idx / kv_idx) and the shift
    mask (region ids from the coordinates) in a score_mod.
    """

    def __init__(self, variant: str, attn: torch.nn.Module, grid: Tuple[int, int], window, shift,
                 flex: Optional[Callable] = None):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if variant not in ("blockmask", "windows"):
            raise ValueError(f"variant: expected 'blockmask' or 'windows', got {variant!r}")
        self.variant, self.attn = variant, attn
        self.flex = flex or flex_attention
        H, W = grid
        (mh, mw), (sh, sw) = tuple(window), tuple(shift)
        self.grid, self.window, self.shift = (H, W), (mh, mw), (sh, sw)
        self.pad = ((-H) % mh, (-W) % mw)
        hp, wp = H + self.pad[0], W + self.pad[1]
        self.padded = (hp, wp)
        nww = wp // mw
        self.num_windows = (hp // mh) * nww
        nw = self.num_windows
        shifted = bool(sh or sw)
        table = attn.relative_position_bias_table

        if variant == "blockmask":
            def score_mod(score, b, h, q_idx, kv_idx):
                qy, qx = q_idx // wp, q_idx % wp
                ky, kx = kv_idx // wp, kv_idx % wp
                rel = (qy % mh - ky % mh + (mh - 1)) * (2 * mw - 1) + (qx % mw - kx % mw + (mw - 1))
                score = score + table[rel, h]
                if shifted:
                    rq = _region(qy, hp, mh, sh) * 3 + _region(qx, wp, mw, sw)
                    rk = _region(ky, hp, mh, sh) * 3 + _region(kx, wp, mw, sw)
                    score = torch.where(rq == rk, score, score - 100.0)
                return score

            def same_window(b, h, q_idx, kv_idx):
                return (((q_idx // wp) // mh == (kv_idx // wp) // mh)
                        & ((q_idx % wp) // mw == (kv_idx % wp) // mw))

            L = hp * wp
            self.block_mask = create_block_mask(same_window, None, None, L, L, device=table.device)
        else:
            def score_mod(score, b, h, q_idx, kv_idx):
                qy, qx = q_idx // mw, q_idx % mw
                ky, kx = kv_idx // mw, kv_idx % mw
                score = score + table[(qy - ky + (mh - 1)) * (2 * mw - 1) + (qx - kx + (mw - 1)), h]
                if shifted:
                    w = b % nw
                    oy, ox = (w // nww) * mh, (w % nww) * mw  # the window's top-left in the padded grid
                    rq = _region(oy + qy, hp, mh, sh) * 3 + _region(ox + qx, wp, mw, sw)
                    rk = _region(oy + ky, hp, mh, sh) * 3 + _region(ox + kx, wp, mw, sw)
                    score = torch.where(rq == rk, score, score - 100.0)
                return score

            self.block_mask = None
        self.score_mod = score_mod

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        B, H, W, C = x.shape
        (mh, mw), (sh, sw), (hp, wp) = self.window, self.shift, self.padded
        heads = attn.num_heads
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        if any(self.pad):
            x = F.pad(x, (0, 0, 0, self.pad[1], 0, self.pad[0]))  # zero tokens, as timm pads them
        if self.variant == "blockmask":
            qkv = F.linear(x.reshape(B, hp * wp, C), attn.qkv.weight, attn.qkv.bias)
            q, k, v = qkv.reshape(B, hp * wp, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            o = self.flex(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask, scale=attn.scale)
            o = o.transpose(1, 2).reshape(B, hp, wp, C)
        else:
            n, nwh, nww = mh * mw, hp // mh, wp // mw
            xw = x.reshape(B, nwh, mh, nww, mw, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nwh * nww, n, C)
            qkv = F.linear(xw, attn.qkv.weight, attn.qkv.bias)
            q, k, v = qkv.reshape(B * nwh * nww, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            o = self.flex(q, k, v, score_mod=self.score_mod, scale=attn.scale)
            o = o.transpose(1, 2).reshape(B, nwh, nww, mh, mw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, hp, wp, C)
        o = o[:, :H, :W]
        if sh or sw:
            o = torch.roll(o, shifts=(sh, sw), dims=(1, 2))
        return F.linear(o, attn.proj.weight, attn.proj.bias)


_FLEX_COMPILED: Optional[Callable] = None
#: (variant, backward) -> the case and error of a failed compile: not retried (each costs seconds).
_FLEX_FAILED: Dict[Tuple[str, bool], str] = {}
#: Seconds a FlexAttention row needs at least (a compile, equality, timing) before the cap's deadline.
FLEX_MIN_LEFT_S = 30.0


def _compiled_flex() -> Callable:
    """One ``torch.compile(flex_attention, dynamic=False)``: a static graph per shape and mode."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    harness.raise_recompile_limit(128)  # 12 shapes x 2 modes x 2 variants, plus other families' graphs
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


# --------------------------------------------------------------------------- #
# One row: floors, skips, equality, then timing and peak memory
# --------------------------------------------------------------------------- #
def _common(case: SwinCase, mode: Mode, impl: str, role: str, level: str, settings) -> dict:
    name = f"{BLOCK_PREFIX}{case.name}" if level == "block" else case.name
    return harness.row_id(FAMILY, name, impl, role, settings, mode, {**case.shape(), "level": level})


def _note_floors(common: dict, case: SwinCase, mode: Mode, level: str, mods: SwinModules) -> None:
    def naive():
        block = floors.meta_module(mods.naive)
        fn = _timm_fn(block, level)
        x = floors.meta((case.B, case.H, case.W, case.dim), mode.backward)
        harness.grad_step(fn, (x,), floors.meta(x.shape) if mode.backward else None, _params(block, _param_names(block, level)))()

    harness.note_floors(FAMILY, common["case"], mode, common["shape"],
                        kernel=lambda elem: (flops(case, mode, level), min_bytes(case, mode, level, elem)),
                        naive=naive)


def _prepare(common: dict, case: SwinCase, mode: Mode, impl: str, level: str, settings) -> SwinModules:
    """timm's modules (or a skip if timm is missing), the case's floors, then the skip for ``impl``."""
    try:
        _timm_block_cls(case.v2)
    except ImportError as exc:
        harness.skip(common, f"timm is not installed: {harness.first_line(exc)}")
    mods = _modules(case, settings.device, settings.dtype)
    _note_floors(common, case, mode, level, mods)
    reason = harness.skip_reason(KINDS.get(impl), settings)
    if reason:
        harness.skip(common, reason)
    return mods


def _run(benchmark, settings, ceilings, common: dict, state: SwinState, step: Callable,
         *, level: str, may_fail: bool = False, extra: Optional[dict] = None) -> None:
    case, mode = state.case, state.mode
    elem = harness.element_size(settings.dtype)
    harness.equal_then_time(
        benchmark, settings, ceilings, common, step, state.sets,
        lambda out, grads: _check_equal(common["impl"], out, grads, state),
        flops=flops(case, mode, level), min_bytes=min_bytes(case, mode, level, elem),
        extra={"level": level, "wrt": [k[1:] for k in state.keys], "attn_flops": window_attn_flops(case, mode),
               "attn_min_bytes": window_attn_min_bytes(case, mode, elem), **(extra or {})},
        may_fail=may_fail)


# --------------------------------------------------------------------------- #
# The benchmarks: whole block first (short), then the attention part, then FlexAttention
# (compiles; the rows a time cap cuts)
# --------------------------------------------------------------------------- #
def test_window_attention_block(benchmark, vk_settings, vk_ceilings, wa_block_point):
    _bench_block(benchmark, vk_settings, vk_ceilings, wa_block_point, BLOCK_IMPLS)


def test_window_attention(benchmark, vk_settings, vk_ceilings, wa_attn_point):
    _bench_attn(benchmark, vk_settings, vk_ceilings, wa_attn_point, ATTN_IMPLS)


def test_window_attention_v2_block(benchmark, vk_settings, vk_ceilings, wa_v2_block_point):
    _bench_block(benchmark, vk_settings, vk_ceilings, wa_v2_block_point, V2_IMPLS)


def test_window_attention_v2(benchmark, vk_settings, vk_ceilings, wa_v2_attn_point):
    _bench_attn(benchmark, vk_settings, vk_ceilings, wa_v2_attn_point, V2_IMPLS)


def _bench_block(benchmark, settings, vk_ceilings, point, impls: Dict[str, str]) -> None:
    case, mode, impl = point
    common = _common(case, mode, impl, impls[impl], "block", settings)
    benchmark.group = f"{FAMILY} {common['case']} {mode.name}"
    mods = _prepare(common, case, mode, impl, "block", settings)
    if impl == "vitkern_triton":
        block, why = mods.vitkern_block()
        if block is None:
            harness.skip(common, why)
    else:
        block = mods.naive if impl == "naive" else mods.sdpa
    state = _state("block", case, mode, mods)
    try:
        params = _params(block, state.names) if mode.backward else []
    except AssertionError as exc:
        harness.record_failure(**common, reason=str(exc))
        raise
    _run(benchmark, settings, vk_ceilings, common, state, _make_step(block, params, mode.backward), level="block")


def _bench_attn(benchmark, settings, vk_ceilings, point, impls: Dict[str, str]) -> None:
    case, mode, impl = point
    common = _common(case, mode, impl, impls[impl], "attn", settings)
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    mods = _prepare(common, case, mode, impl, "attn", settings)
    if impl == "vitkern_triton":
        op, why = _vitkern_op_or_reason()
        if op is None:
            harness.skip(common, why)
        make = vitkern_v2_attn_fn if case.v2 else vitkern_attn_fn
        fn, owner = make(op, mods.func.attn, mods.window, mods.shift), mods.func
    else:
        owner = mods.naive if impl == "naive" else mods.sdpa
        fn = owner._attn
    state = _state("attn", case, mode, mods)
    params = _params(owner, state.names) if mode.backward else []
    _run(benchmark, settings, vk_ceilings, common, state, _make_step(fn, params, mode.backward), level="attn")


def test_window_attention_flex(benchmark, vk_settings, vk_ceilings, wa_flex_point):
    case, mode, impl = wa_flex_point
    settings = vk_settings
    common = _common(case, mode, impl, FLEX_IMPLS[impl], "attn", settings)
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    mods = _prepare(common, case, mode, impl, "attn", settings)
    variant = impl[len("flex_"):]
    failed = _FLEX_FAILED.get((variant, mode.backward))
    if failed:
        harness.skip(common, f"torch.compile(flex_attention) failed earlier ({failed}); not retried")
    left = harness.time_left_s()
    if left is not None and left < FLEX_MIN_LEFT_S:
        harness.skip(common, f"time cap: {left:.0f} s left before $VK_BENCH_DEADLINE, a FlexAttention compile + "
                             f"timing needs ~{FLEX_MIN_LEFT_S:.0f} s (run this family without the cap for every shape)")
    try:
        compiled = _compiled_flex()
    except ImportError as exc:
        harness.skip(common, f"this torch has no FlexAttention: {harness.first_line(exc)}")
    try:
        fn = FlexSwinAttention(variant, mods.func.attn, (case.H, case.W), mods.window, mods.shift, flex=compiled)
    except Exception as exc:  # noqa: BLE001 - e.g. create_block_mask out of memory
        harness.skip(common, f"FlexAttention set-up failed: {harness.first_line(exc)}")
    state = _state("attn", case, mode, mods)
    params = _params(mods.func, state.names) if mode.backward else []
    try:
        _run(benchmark, settings, vk_ceilings, common, state, _make_step(fn, params, mode.backward), level="attn",
             may_fail=True, extra={"compile": "static per shape (dynamic=False)", "block_mask": variant == "blockmask"})
    except harness.FirstCallFailed as exc:
        if not isinstance(exc.__cause__, torch.cuda.OutOfMemoryError):  # a smaller shape may still fit
            _FLEX_FAILED[(variant, mode.backward)] = f"{case.name}: {exc}"
        harness.skip(common, f"torch.compile(flex_attention) failed: {exc}")


# --------------------------------------------------------------------------- #
# CPU: vitkern under the interpreter, FlexAttention's math in eager mode (equality only)
# --------------------------------------------------------------------------- #
TINY = [SwinCase("tiny_14x14_w7_shift3_bs1", 1, 14, 14, 32, 2, 7, 3),
        SwinCase("tiny_10x13_w7_shift3_bs1", 1, 10, 13, 32, 2, 7, 3)]  # roll-then-pad, not square
TINY_V2 = [SwinCase("tiny_v2_10x13_w7_shift3_bs1", 1, 10, 13, 32, 2, 7, 3, v2=True)]


@pytest.mark.parametrize("case", TINY + TINY_V2, ids=[c.name for c in TINY + TINY_V2])
def test_vitkern_window_attention_interpreter_equality(case):
    """The attention part on window_attention(backend="triton") vs timm's _attn in float64: out, dx, dW, dtable
    (Swin V2: d logit_scale, d q/v bias and the CPB MLP's weights instead of the table)."""
    harness.skip_unless_interpreter(lambda: _timm_block_cls(case.v2))
    op, why = _vitkern_op_or_reason()
    if op is None:
        pytest.skip(why)
    mods = SwinModules(case, torch.device("cpu"), torch.float32)
    state = SwinState("attn", case, MODES[1], mods)
    fn = (vitkern_v2_attn_fn if case.v2 else vitkern_attn_fn)(op, mods.func.attn, mods.window, mods.shift)
    out, grads = _make_step(fn, _params(mods.func, state.names), True)(state.sets[0])
    _check_equal("vitkern window_attention (interpreter)", out, grads, state)


@pytest.mark.parametrize("case", [TINY[0], TINY_V2[0]], ids=[TINY[0].name, TINY_V2[0].name])
def test_vitkern_block_interpreter_equality(case):
    """vitkern.nn.SwinTransformerBlock / SwinTransformerV2Block(backend="triton") with timm's weights vs
    timm's block in float64."""
    harness.skip_unless_interpreter(lambda: _timm_block_cls(case.v2))
    mods = SwinModules(case, torch.device("cpu"), torch.float32)
    block, why = mods.vitkern_block()
    if block is None:
        pytest.skip(why)
    state = SwinState("block", case, MODES[1], mods)
    out, grads = _make_step(block, _params(block, state.names), True)(state.sets[0])
    _check_equal(f"vitkern.nn.{type(block).__name__} (interpreter)", out, grads, state)


@pytest.mark.parametrize("variant", ["blockmask", "windows"])
@pytest.mark.parametrize("case", TINY, ids=[c.name for c in TINY])
def test_flex_eager_forward_equality(case, variant):
    """The FlexAttention implementations (score_mod, block mask, roll / pad / partition) equal timm's
    _attn, in eager mode in float64 (forward only: FlexAttention has no CPU backward)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU every timed FlexAttention case checks its own equality, forward and backward")
    try:
        _timm_block_cls()
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError as exc:
        pytest.skip(f"timm or FlexAttention missing: {exc}")
    mods = SwinModules(case, torch.device("cpu"), torch.float64)
    fn = FlexSwinAttention(variant, mods.func.attn, (case.H, case.W), mods.window, mods.shift)
    x = torch.randn(case.B, case.H, case.W, case.dim, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = fn(x)
        ref = mods.naive._attn(x)
    harness.assert_close(f"flex_{variant} (eager) out", out, ref)
