"""Global attention benchmarks: ``vitkern.ops.attention`` / ``attention_packed`` and
``vitkern.nn.Attention`` against the naive reference and the peers a user would pick.

Grid (GPU, bf16; batch B chosen so the GPU is full), N = (resolution / patch)² + 1 (CLS):

* ViT-B/16 (12 heads, d = 64) at 224 / 384 / 512: N = 197 / 577 / 1025, B = 256 / 64 / 32;
* ViT-B/32 (12 heads, d = 64) at 224 / 384 / 512: N = 50 / 145 / 257, B = 256 / 256 / 128;
* ViT-H/14 (16 heads, d = 80) at 224 / 336: N = 257 / 577, B = 128 / 64 (kernel level only).

Kernel level (``test_attention``): q, k, v (B, h, N, d), modes ``fwd`` and ``fwd+bwd``
(gradients for q, k and v from a random upstream gradient, ``torch.autograd.grad``, no
``.grad`` accumulation timed). Implementations, timed in the same run:

* ``naive``: ``vitkern.reference.attention_reference`` (q·kᵀ -> softmax -> ·v) as is;
* ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn`` / ``sdpa_math``:
  ``F.scaled_dot_product_attention`` under ``torch.nn.attention.sdpa_kernel(SDPBackend.X)``.
  A backend that cannot run a shape (or this torch lacks) is recorded as skipped with its
  error and SDPA's "not used because" warnings, not a failure;
* ``flex_attention``: ``torch.nn.attention.flex_attention.flex_attention`` (no score_mod,
  no block mask) under ``torch.compile``, compiled before the timing. ``--vk-compile dynamic``
  (default): one ``dynamic=True`` compile reused across shapes (falling back to a static
  compile of the shape if the dynamic one fails); ``static``: a fresh static compile per
  shape and mode; ``off``: not run. A failed compile is recorded as skipped with the reason;
* ``sdpa_packed``: timm's fused path on a packed (B, N, 3·h·d) qkv tensor: reshape/permute
  views -> ``unbind`` -> SDPA (default backend choice) -> transpose/reshape to (B, N, h·d);
* ``vitkern_triton``: ``attention(q, k, v, backend="triton")``;
* ``vitkern_triton_packed``: ``attention_packed(qkv, h, backend="triton")`` on the same packed
  tensor as ``sdpa_packed`` (what ``vitkern.nn.Attention`` calls): reads q, k, v in place and
  writes (B, N, h·d); its backward writes dqkv in the packed layout.
Best peer = the fastest of the SDPA backends, FlexAttention and ``sdpa_packed``.

Module level (``test_attention_module``): ViT-B's attention block, ``timm.layers.Attention
(dim=768, num_heads=12, qkv_bias=True)``, forward + backward including the qkv and proj
Linears; x (B, N, 768) requires grad; gradients for x and every parameter. Implementations:
``naive`` (the timm module with ``fused_attn=False``), ``timm_sdpa`` (timm's default fused
SDPA path), ``compile_timm`` (``torch.compile`` of the timm module; skipped with the reason
if it fails), ``vitkern_triton`` (``vitkern.nn.Attention(..., backend="triton")`` loaded
with the timm module's state_dict; skipped with the reason if it is not importable).

Equality first, for every implementation: output and every gradient against the reference
on upcast inputs (fp32 with TF32 off on the GPU, float64 on CPU) within 2x (forward) / 3x
(gradients) the error of the bf16 naive reference (``vitkern.testing.assert_close``). Kernel
level: ``attention_reference``; module level: the timm module with ``fused_attn=False``
holding the same (upcast) weights.

FLOPs (``vitkern.ops.attention.attention_flops``): 4·B·h·N²·d forward, 10·B·h·N²·d backward.
The module adds the Linears: 2·B·N·768·2304 + 2·B·N·768·768 forward, twice that backward
(dx and dW). Minimum bytes, kernel level: read q, k, v and write out (forward); read q, k, v,
out, dout and write dq, dk, dv (backward); the logsumexp is negligible. Module level: the sum of
each stage's own minimum (qkv Linear, attention, proj Linear, the Linears run as separate GEMMs
in every implementation here): forward x, weights, biases, qkv, attention output, out;
backward dout, saved activations, weights, and every gradient written once.

CPU (no GPU): a smoke grid (B=2, h=2, N=50, d=64 and 80, fp32; the module at B=2, N=50) of
the eager implementations; SDPA backends the CPU lacks are recorded as skipped with their
error; FlexAttention, ``torch.compile`` and vitkern's Triton rows are skipped with the
reason, and vitkern's kernels and module are checked for equality under TRITON_INTERPRET=1
on tiny shapes (``test_vitkern_triton_interpreter_equality``,
``test_vitkern_module_interpreter_equality``).

GPU time (estimate, H100, cold Triton / inductor caches, default settings):
  kernel level 8 shapes x 2 modes x 9 implementations = 144 cases, module level 6 shapes x
  4 implementations = 24 cases; each ~0.15 s of timed calls (20..200 rounds) + ~8 untimed
  calls (equality, pre-calls, warm-up, peak memory; <= 5 ms each on the slowest naive / math
  rows) ~= 0.2 s -> ~35 s; references (fp32, TF32 off) < 0.1 s per (shape, mode);
  FlexAttention dynamic compiles (fwd / fwd+bwd x head dim 64 / 80; dynamo specialises the
  first shape and goes dynamic at the second: ~4-8 graphs) ~30-60 s;
  timm Attention dynamic compile (fwd+bwd) ~20-30 s; Triton JIT of vitkern's 4 kernels x
  2 head dims ~15-25 s; session start (CUDA, ceilings, timm import) ~10 s
  = ~2-2.5 min; scripts/gpu_check.sh gives this family a nominal VK_BENCH_TIMEOUT_ATTENTION=130 s,
  scaled to its share of what the tuner and the GPU tests left.
  The module level runs first, then the kernel grid in the order above (ViT-B/16 first),
  so a cap cuts the least-used shapes. ``--vk-compile static`` adds ~16 + 6 compiles
  (several minutes): run it without the cap.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import floors
import harness
from vitkern.ops import attention, attention_packed
from vitkern.ops.attention import attention_flops
from vitkern.reference import attention_reference

FAMILY = "attention"


# --------------------------------------------------------------------------- #
# Grid
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class AttnCase:
    name: str
    B: int
    heads: int
    N: int
    head_dim: int

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def shape(self) -> Dict[str, object]:
        return dict(B=self.B, heads=self.heads, N=self.N, head_dim=self.head_dim, dim=self.dim)


Mode = harness.Mode
MODES = harness.MODES
MODULE_MODE = harness.FWD_BWD  # the module level is a training step: forward + backward

# implementation -> (role, layout); the order is the timing order.
#   layout "heads": q, k, v contiguous (B, h, N, d); "packed": one (B, N, 3·h·d) qkv tensor.
KERNEL_IMPLS: Dict[str, Tuple[str, str]] = {
    "naive": ("naive", "heads"),
    "sdpa_flash": ("peer", "heads"),
    "sdpa_efficient": ("peer", "heads"),
    "sdpa_cudnn": ("peer", "heads"),
    "sdpa_math": ("peer", "heads"),
    "flex_attention": ("peer", "heads"),
    "sdpa_packed": ("peer", "packed"),
    "vitkern_triton": ("vitkern", "heads"),
    "vitkern_triton_packed": ("vitkern", "packed"),
}
SDPA_BACKENDS = {  # implementation -> torch.nn.attention.SDPBackend member
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",  # torch >= 2.5
    "sdpa_math": "MATH",
}
#: implementations that cannot run everywhere -> their kind (harness.skip_reason)
KINDS = {"flex_attention": "flex", "vitkern_triton": "triton", "vitkern_triton_packed": "triton",
         "compile_timm": "compile"}
MODULE_IMPLS: Dict[str, str] = {
    "naive": "naive",
    "timm_sdpa": "peer",
    "compile_timm": "peer",
    "vitkern_triton": "vitkern",
}

# (ViT variant, patch, resolution) -> N = (res / patch)² + 1; B so the GPU is full.
_VIT_B = [  # name, B, N
    ("vitb_p16_224_bs256", 256, 197),
    ("vitb_p16_384_bs64", 64, 577),
    ("vitb_p16_512_bs32", 32, 1025),
    ("vitb_p32_224_bs256", 256, 50),
    ("vitb_p32_384_bs256", 256, 145),
    ("vitb_p32_512_bs128", 128, 257),
]


def kernel_full_grid() -> List[AttnCase]:
    cases = [AttnCase(name, B, 12, N, 64) for name, B, N in _VIT_B]
    cases += [AttnCase("vith_p14_224_bs128", 128, 16, 257, 80),  # ViT-H/14: 1280 = 16 heads x 80
              AttnCase("vith_p14_336_bs64", 64, 16, 577, 80)]
    return cases


def kernel_smoke_grid() -> List[AttnCase]:
    return [AttnCase("tiny_n50_d64_bs2", 2, 2, 50, 64), AttnCase("tiny_n50_d80_bs2", 2, 2, 50, 80)]


def module_full_grid() -> List[AttnCase]:
    return [AttnCase(f"module_{name}", B, 12, N, 64) for name, B, N in _VIT_B]


def module_smoke_grid() -> List[AttnCase]:
    return [AttnCase("module_vitb_p32_224_bs2", 2, 12, 50, 64)]


def pytest_generate_tests(metafunc):
    harness.parametrize(metafunc, "attn_point", harness.grid(metafunc.config, kernel_full_grid, kernel_smoke_grid),
                        MODES, KERNEL_IMPLS)
    harness.parametrize(metafunc, "attn_module_point",
                        harness.grid(metafunc.config, module_full_grid, module_smoke_grid), [MODULE_MODE], MODULE_IMPLS)


# --------------------------------------------------------------------------- #
# FLOPs and minimum bytes
# --------------------------------------------------------------------------- #
def kernel_flops(case: AttnCase, mode: Mode) -> int:
    fwd = attention_flops(case.B, case.heads, case.N, case.N, case.head_dim)
    if not mode.backward:
        return fwd
    return fwd + attention_flops(case.B, case.heads, case.N, case.N, case.head_dim, backward=True)


def kernel_min_bytes(case: AttnCase, mode: Mode, elem: int) -> int:
    """forward: q, k, v read + out written (4 tensors); backward: q, k, v, out, dout read and
    dq, dk, dv written (8 more). The logsumexp (B·h·N fp32) is left out: < 1 % at d = 64."""
    one = case.B * case.heads * case.N * case.head_dim
    return (12 if mode.backward else 4) * one * elem


def module_flops(case: AttnCase, mode: Mode) -> int:
    C = case.dim
    linears = 2 * case.B * case.N * C * (3 * C) + 2 * case.B * case.N * C * C
    attn = kernel_flops(case, mode)
    return attn + (3 * linears if mode.backward else linears)


def module_min_bytes(case: AttnCase, mode: Mode, elem: int) -> int:
    """Sum of each stage's minimum (qkv Linear -> attention -> proj Linear); see the docstring."""
    T, C = case.B * case.N, case.dim
    w_qkv, b_qkv, w_proj, b_proj = 3 * C * C, 3 * C, C * C, C
    x, qkv, o, out = T * C, T * 3 * C, T * C, T * C
    fwd = (x + w_qkv + b_qkv + qkv) + (qkv + o) + (o + w_proj + b_proj + out)
    total = fwd
    if mode.backward:
        proj = out + o + w_proj + o + w_proj + b_proj  # read dout, o, W; write do, dW, db
        attn = qkv + o + o + qkv  # read qkv, out, dout; write dqkv
        lin = qkv + x + w_qkv + x + w_qkv + b_qkv  # read dqkv, x, W; write dx, dW, db
        total += proj + attn + lin
    return total * elem


# --------------------------------------------------------------------------- #
# Kernel-level implementations
# --------------------------------------------------------------------------- #
def _naive(q, k, v):
    return attention_reference(q, k, v)


def _vitkern_triton(q, k, v):
    return attention(q, k, v, backend="triton")


def _split_packed(qkv: torch.Tensor, heads: int):
    """timm's views: (B, N, 3·h·d) -> reshape -> permute -> unbind -> three (B, h, N, d) views."""
    B, N, C3 = qkv.shape
    return qkv.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _make_sdpa_packed(heads: int) -> Callable:
    def fn(qkv):
        B, N, _ = qkv.shape
        q, k, v = _split_packed(qkv, heads)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
    return fn


def _make_vitkern_packed(heads: int) -> Callable:
    def fn(qkv):
        return attention_packed(qkv, heads, backend="triton")
    return fn


def _sdpa_backend(impl: str):
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return None
    return getattr(SDPBackend, SDPA_BACKENDS[impl], None)


def _make_sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        # The backward runs the kernel the forward picked (the op recorded in the graph).
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


_FLEX_DYNAMIC: Optional[Callable] = None
#: (head_dim, backward) combinations whose dynamic compile failed once: not retried per shape.
_FLEX_DYNAMIC_FAILED: Dict[Tuple[int, bool], str] = {}
_FLEX_DYNAMIC_HOW = "dynamic"


def _flex_candidates(compile_mode: str, state: "KernelState") -> List[Tuple[str, Callable[[], Callable]]]:
    """(how, factory) pairs to try in order; each factory returns the compiled flex_attention."""
    from torch.nn.attention.flex_attention import flex_attention

    harness.raise_recompile_limit()

    def static():
        if state.flex_static is None:
            if compile_mode == "static":
                torch._dynamo.reset()  # one specialised graph per (case, mode); never near the limit
            state.flex_static = torch.compile(flex_attention, dynamic=False)
        return state.flex_static

    def dynamic():
        global _FLEX_DYNAMIC
        if _FLEX_DYNAMIC is None:
            _FLEX_DYNAMIC = torch.compile(flex_attention, dynamic=True)
        return _FLEX_DYNAMIC

    if compile_mode == "static":
        return [("static", static)]
    failed = _FLEX_DYNAMIC_FAILED.get((state.case.head_dim, state.mode.backward))
    if failed:
        return [(f"static (the dynamic compile failed earlier: {failed})", static)]
    return [(_FLEX_DYNAMIC_HOW, dynamic), ("static (after the dynamic compile failed)", static)]


# --------------------------------------------------------------------------- #
# Kernel-level inputs and references, built once per (case, mode)
# --------------------------------------------------------------------------- #
def _pack_heads(q, k, v) -> torch.Tensor:
    """Three (B, h, N, d) tensors -> one (B, N, 3·h·d) tensor laid out [q | k | v] (timm's qkv)."""
    B, H, N, D = q.shape
    return torch.stack([q, k, v], dim=0).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * D)


def _merge_heads(o) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h·d)."""
    B, H, N, D = o.shape
    return o.transpose(1, 2).reshape(B, N, H * D)


class KernelState:
    """Rotated q, k, v (and packed qkv) copies and the two references for one (case, mode)."""

    def __init__(self, case: AttnCase, mode: Mode, device: torch.device, dtype: torch.dtype):
        self.case, self.mode, self.device, self.dtype = case, mode, device, dtype
        self.flex_static: Optional[Callable] = None
        gen = harness.seeded_generator(device, FAMILY, case.name, mode.name)
        first = self._make_set(gen)
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device)
        self.sets = [first] + [self._make_set(gen) for _ in range(copies - 1)]
        self.ref_high = self._reference(first, harness.high_dtype(device))
        self.ref_same = self._reference(first, None) if harness.needs_same_dtype_reference(dtype) else None
        self._packed: Optional[List[dict]] = None

    def _make_set(self, gen: torch.Generator) -> dict:
        c = self.case
        shape = (c.B, c.heads, c.N, c.head_dim)
        s = {n: torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
             .requires_grad_(self.mode.backward) for n in ("q", "k", "v")}
        if self.mode.backward:
            s["grad"] = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
        return s

    def _reference(self, s: dict, high: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        leaves = []
        for n in ("q", "k", "v"):
            u = s[n].detach()
            leaves.append((u.to(high) if high is not None else u).requires_grad_(self.mode.backward))
        with harness.exact_fp32() if high is not None else nullcontext():
            out = attention_reference(*leaves)
            result = {"out": out.detach()}
            if self.mode.backward:
                grad = s["grad"].to(high) if high is not None else s["grad"]
                grads = torch.autograd.grad(out, leaves, grad)
                result.update({f"d{n}": g.detach() for n, g in zip(("q", "k", "v"), grads)})
        return result

    # The packed layout holds the same values as the heads layout, so its references are
    # the heads references re-laid out (no second reference computation).
    def packed_sets(self) -> List[dict]:
        if self._packed is None:
            packed = []
            for s in self.sets:
                t = {"qkv": _pack_heads(s["q"].detach(), s["k"].detach(), s["v"].detach())
                     .requires_grad_(self.mode.backward)}
                if self.mode.backward:
                    t["grad"] = _merge_heads(s["grad"])
                packed.append(t)
            self._packed = packed
        return self._packed

    @staticmethod
    def _packed_ref(ref: Optional[Dict[str, torch.Tensor]]) -> Optional[Dict[str, torch.Tensor]]:
        if ref is None:
            return None
        out = {"out": _merge_heads(ref["out"])}
        if "dq" in ref:
            out["dqkv"] = _pack_heads(ref["dq"], ref["dk"], ref["dv"])
        return out

    def refs(self, layout: str):
        if layout == "packed":
            return self._packed_ref(self.ref_high), self._packed_ref(self.ref_same)
        return self.ref_high, self.ref_same


# One (case, mode) state alive at a time (kernel or module level), so GPU memory stays bounded.
_STATE = harness.Slot()


def _make_step(fn: Callable, names: Sequence[str], backward: bool) -> Callable[[dict], tuple]:
    """One timed call: fn on the named inputs; with ``backward`` also their gradients."""
    names = tuple(names)
    if not backward:
        def step(a):
            return fn(*(a[n] for n in names)), ()
    else:
        def step(a):
            out = fn(*(a[n] for n in names))
            return out, torch.autograd.grad(out, [a[n] for n in names], a["grad"])
    return step


_check_equal = harness.check_equal


def _sdpa_warnings(caught) -> str:
    """SDPA's "kernel not used because ..." warnings, deduplicated, for a skip reason."""
    seen: List[str] = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if text and text not in seen:
            seen.append(text)
    return " | ".join(seen)[:600]


# --------------------------------------------------------------------------- #
# Module level: timm Attention vs vitkern.nn.Attention
# --------------------------------------------------------------------------- #
def _timm_attention_cls():
    try:
        from timm.layers import Attention
    except ImportError:
        from timm.models.vision_transformer import Attention  # older timm
    return Attention


class ModuleSet:
    """The modules compared at module level, sharing one set of weights (built once per session)."""

    def __init__(self, dim: int, heads: int, device: torch.device, dtype: torch.dtype):
        self.dim, self.heads, self.device, self.dtype = dim, heads, device, dtype
        cls = _timm_attention_cls()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(harness.seed_of(FAMILY, "module", dim, heads))
        base = cls(dim, num_heads=heads, qkv_bias=True)
        torch.random.set_rng_state(gen_state)
        base = base.to(device=device, dtype=dtype)
        self.naive = copy.deepcopy(base)
        self.naive.fused_attn = False  # timm's unfused q·kᵀ -> softmax -> ·v path
        self.sdpa = copy.deepcopy(base)
        self.sdpa.fused_attn = True  # timm's default: F.scaled_dot_product_attention
        self.high = copy.deepcopy(base).to(harness.high_dtype(device))  # the same (bf16-representable) weights, upcast
        self.high.fused_attn = False
        self.state_dict = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.compiled: Optional[Callable] = None
        self._vitkern = None
        self._vitkern_reason: Optional[str] = None

    def vitkern(self):
        """(vitkern.nn.Attention with the timm weights, None) or (None, why not)."""
        if self._vitkern is None and self._vitkern_reason is None:
            try:
                import vitkern.nn as vk_nn

                cls = vk_nn.Attention
            except Exception as exc:  # noqa: BLE001 - being written, or broken: skip with the reason
                self._vitkern_reason = f"vitkern.nn.Attention is not importable: {harness.first_line(exc)}"
                return None, self._vitkern_reason
            try:
                mod = cls(self.dim, num_heads=self.heads, qkv_bias=True, backend="triton")
                mod = mod.to(device=self.device, dtype=self.dtype)
                mod.load_state_dict(self.state_dict)  # strict: same keys and shapes as timm
            except Exception as exc:  # noqa: BLE001
                self._vitkern_reason = (f"vitkern.nn.Attention could not be built with timm's state_dict: "
                                        f"{harness.first_line(exc)}")
                return None, self._vitkern_reason
            self._vitkern = mod
        return self._vitkern, self._vitkern_reason


_MODULE_SETS: Dict[tuple, ModuleSet] = {}


def _module_set(case: AttnCase, device: torch.device, dtype: torch.dtype) -> ModuleSet:
    key = (case.dim, case.heads, str(device), dtype)
    if key not in _MODULE_SETS:
        _MODULE_SETS[key] = ModuleSet(case.dim, case.heads, device, dtype)
    return _MODULE_SETS[key]


def _param_keys(module: torch.nn.Module) -> List[str]:
    return [name for name, _ in module.named_parameters()]


def _module_grad(module: torch.nn.Module, x: torch.Tensor, grad: Optional[torch.Tensor]):
    out = module(x)
    if grad is None:
        return out, ()
    params = [p for _, p in module.named_parameters()]
    return out, torch.autograd.grad(out, [x] + params, grad)


class ModuleState:
    """Rotated x copies and the two module references for one case (forward + backward)."""

    def __init__(self, case: AttnCase, ms: ModuleSet, device: torch.device, dtype: torch.dtype):
        self.case, self.device, self.dtype = case, device, dtype
        self.compiled: Optional[Callable] = None
        gen = harness.seeded_generator(device, FAMILY, case.name)
        first = self._make_set(gen)
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device)
        self.sets = [first] + [self._make_set(gen) for _ in range(copies - 1)]
        self.grad_keys = ["dx"] + [f"d{n}" for n in _param_keys(ms.high)]
        self.ref_high = self._reference(ms.high, first, harness.high_dtype(device))
        self.ref_same = self._reference(ms.naive, first, None) if harness.needs_same_dtype_reference(dtype) else None

    def _make_set(self, gen: torch.Generator) -> dict:
        c = self.case
        shape = (c.B, c.N, c.dim)
        return {"x": torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype).requires_grad_(True),
                "grad": torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)}

    def _reference(self, module, s: dict, high: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        x = s["x"].detach()
        x = (x.to(high) if high is not None else x).requires_grad_(True)
        grad = s["grad"].to(high) if high is not None else s["grad"]
        with harness.exact_fp32() if high is not None else nullcontext():
            out, grads = _module_grad(module, x, grad)
        result = {"out": out.detach()}
        result.update({k: g.detach() for k, g in zip(self.grad_keys, grads)})
        return result


def _compiled_timm(compile_mode: str, ms: ModuleSet, state: ModuleState) -> Callable:
    harness.raise_recompile_limit()
    if compile_mode == "static":
        if state.compiled is None:
            torch._dynamo.reset()
            state.compiled = torch.compile(ms.sdpa, dynamic=False)
        return state.compiled
    if ms.compiled is None:
        ms.compiled = torch.compile(ms.sdpa, dynamic=True)
    return ms.compiled


def _note_kernel_floors(case: AttnCase, mode: Mode) -> None:
    def naive():
        shape = (case.B, case.heads, case.N, case.head_dim)
        q, k, v = (floors.meta(shape, mode.backward) for _ in range(3))
        harness.grad_step(_naive, (q, k, v), floors.meta(shape) if mode.backward else None)()

    harness.note_floors(FAMILY, case.name, mode, {**case.shape(), "level": "kernel"},
                        kernel=lambda elem: (kernel_flops(case, mode), kernel_min_bytes(case, mode, elem)),
                        naive=naive)


def _note_module_floors(case: AttnCase, mode: Mode, ms: "ModuleSet") -> None:
    def naive():
        module = floors.meta_module(ms.naive)
        x = floors.meta((case.B, case.N, case.dim), True)
        harness.grad_step(module, (x,), floors.meta(x.shape), module.parameters())()

    harness.note_floors(FAMILY, case.name, mode, {**case.shape(), "level": "module"},
                        kernel=lambda elem: (module_flops(case, mode), module_min_bytes(case, mode, elem)),
                        naive=naive)


# --------------------------------------------------------------------------- #
# The benchmarks (module level first: it is short, and a time cap then cuts the
# end of the kernel grid instead)
# --------------------------------------------------------------------------- #
def test_attention_module(benchmark, vk_settings, vk_ceilings, attn_module_point):
    case, mode, impl = attn_module_point
    settings = vk_settings
    common = harness.row_id(FAMILY, case.name, impl, MODULE_IMPLS[impl], settings, mode,
                            {**case.shape(), "level": "module"})
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    try:
        _timm_attention_cls()
    except ImportError as exc:
        harness.skip(common, f"timm is not installed: {harness.first_line(exc)}")
    ms = _module_set(case, settings.device, settings.dtype)
    _note_module_floors(case, mode, ms)
    reason = harness.skip_reason(KINDS.get(impl), settings)
    if reason:
        harness.skip(common, reason)

    state = _STATE.get(("module", case, str(settings.device), settings.dtype),
                       lambda: ModuleState(case, ms, settings.device, settings.dtype))
    extra: Dict[str, object] = {"level": "module"}
    if impl == "naive":
        module, params_of = ms.naive, ms.naive
    elif impl == "timm_sdpa":
        module, params_of = ms.sdpa, ms.sdpa
    elif impl == "compile_timm":
        module, params_of = _compiled_timm(settings.compile, ms, state), ms.sdpa
        extra["compile"] = settings.compile
    else:
        module, why = ms.vitkern()
        if module is None:
            harness.skip(common, why)
        params_of = module
    keys = ["dx"] + [f"d{n}" for n in _param_keys(params_of)]
    params = [p for _, p in params_of.named_parameters()]

    step = harness.x_step(module, params, True)

    def check(out, grads):
        missing = sorted(set(keys) ^ set(state.grad_keys))
        assert not missing, f"{impl}: parameters differ from timm's: {missing}"
        return _check_equal(impl, out, grads, keys, state.ref_high, state.ref_same)

    try:
        harness.equal_then_time(
            benchmark, settings, vk_ceilings, common, step, state.sets, check,
            flops=module_flops(case, mode), min_bytes=module_min_bytes(case, mode, harness.element_size(settings.dtype)),
            extra={**extra, "wrt": [k[1:] for k in keys]}, may_fail=impl == "compile_timm")
    except harness.FirstCallFailed as exc:
        harness.skip(common, f"torch.compile failed: {exc}")


def test_attention(benchmark, vk_settings, vk_ceilings, attn_point):
    case, mode, impl = attn_point
    role, layout = KERNEL_IMPLS[impl]
    settings = vk_settings
    common = harness.row_id(FAMILY, case.name, impl, role, settings, mode, {**case.shape(), "level": "kernel"})
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    _note_kernel_floors(case, mode)

    reason = harness.skip_reason(KINDS.get(impl), settings)
    backend = None
    if reason is None and impl in SDPA_BACKENDS:
        backend = _sdpa_backend(impl)
        if backend is None:
            reason = f"torch {torch.__version__} has no SDPBackend.{SDPA_BACKENDS[impl]}"
    if reason:
        harness.skip(common, reason)

    state = _STATE.get(("kernel", case, mode, str(settings.device), settings.dtype),
                       lambda: KernelState(case, mode, settings.device, settings.dtype))
    if layout == "packed":
        arg_sets, names, grad_keys = state.packed_sets(), ("qkv",), ("dqkv",)
    else:
        arg_sets, names, grad_keys = state.sets, ("q", "k", "v"), ("dq", "dk", "dv")
    ref_high, ref_same = state.refs(layout)

    # Candidates: (description, factory). Only FlexAttention has a fallback (static compile).
    if impl == "flex_attention":
        try:
            candidates = _flex_candidates(settings.compile, state)
        except ImportError as exc:
            harness.skip(common, f"this torch has no FlexAttention: {harness.first_line(exc)}")
    elif backend is not None:
        candidates = [(f"SDPBackend.{backend.name}", lambda: _make_sdpa(backend))]
    else:
        fns = {"naive": lambda: _naive, "vitkern_triton": lambda: _vitkern_triton,
               "sdpa_packed": lambda: _make_sdpa_packed(case.heads),
               "vitkern_triton_packed": lambda: _make_vitkern_packed(case.heads)}
        candidates = [(impl, fns[impl])]

    # A peer that cannot run this shape / this torch is recorded as skipped, not a failure.
    reasons: List[str] = []
    for how, factory in candidates:
        extra: Dict[str, object] = {"level": "kernel", "layout": layout,
                                    "wrt": list(names) if mode.backward else []}
        if impl == "flex_attention":
            extra["compile"] = how
        elif backend is not None:
            extra["sdpa_backend"] = backend.name
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                harness.equal_then_time(
                    benchmark, settings, vk_ceilings, common, _make_step(factory(), names, mode.backward), arg_sets,
                    lambda out, grads: _check_equal(impl, out, grads, grad_keys, ref_high, ref_same),
                    flops=kernel_flops(case, mode),
                    min_bytes=kernel_min_bytes(case, mode, harness.element_size(settings.dtype)),
                    extra=extra, may_fail=role == "peer")
            return
        except harness.FirstCallFailed as exc:
            why = str(exc)
            if backend is not None and _sdpa_warnings(caught):
                why += f" [{_sdpa_warnings(caught)}]"
            if impl == "flex_attention" and how == _FLEX_DYNAMIC_HOW:
                _FLEX_DYNAMIC_FAILED[(case.head_dim, mode.backward)] = why
            reasons.append(f"{how}: {why}" if impl == "flex_attention" else why)
    reason = "; ".join(reasons)
    harness.skip(common, f"torch.compile(flex_attention) failed: {reason}" if impl == "flex_attention"
                 else f"cannot run: {reason}")


# --------------------------------------------------------------------------- #
# CPU: vitkern's Triton kernels and module under the interpreter, equality only
# --------------------------------------------------------------------------- #
TINY = [AttnCase("tiny_n50_d64_bs1", 1, 2, 50, 64), AttnCase("tiny_n50_d80_bs1", 1, 2, 50, 80)]
TINY_POINTS = [(c, layout) for c in TINY for layout in ("heads", "packed")]


@pytest.mark.parametrize("case,layout", TINY_POINTS, ids=[f"{c.name}-{lay}" for c, lay in TINY_POINTS])
def test_vitkern_triton_interpreter_equality(case, layout):
    """Forward and dq/dk/dv (or dqkv) of backend="triton" vs the float64 reference, fp32."""
    harness.skip_unless_interpreter()
    state = KernelState(case, MODES[1], torch.device("cpu"), torch.float32)
    if layout == "packed":
        fn, sets, names, keys = _make_vitkern_packed(case.heads), state.packed_sets(), ("qkv",), ("dqkv",)
    else:
        fn, sets, names, keys = _vitkern_triton, state.sets, ("q", "k", "v"), ("dq", "dk", "dv")
    ref_high, ref_same = state.refs(layout)
    out, grads = _make_step(fn, names, True)(sets[0])
    _check_equal(f"vitkern_triton[{layout}] (interpreter)", out, grads, keys, ref_high, ref_same)


def test_vitkern_module_interpreter_equality():
    """vitkern.nn.Attention(backend="triton") with timm's weights vs the float64 timm module: out, dx, dW."""
    harness.skip_unless_interpreter(_timm_attention_cls)
    case = AttnCase("tiny_module_n50_dim128", 1, 2, 50, 64)
    ms = ModuleSet(case.dim, case.heads, torch.device("cpu"), torch.float32)
    module, why = ms.vitkern()
    if module is None:
        pytest.skip(why)
    state = ModuleState(case, ms, torch.device("cpu"), torch.float32)
    keys = ["dx"] + [f"d{n}" for n in _param_keys(module)]
    assert sorted(keys) == sorted(state.grad_keys), f"parameters differ from timm's: {keys} vs {state.grad_keys}"
    s = state.sets[0]
    out, grads = _module_grad(module, s["x"], s["grad"])
    _check_equal("vitkern.nn.Attention (interpreter)", out, grads, keys, state.ref_high, state.ref_same)
