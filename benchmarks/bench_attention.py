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
(gradients) the error of the bf16 naive reference (``tests/helpers.assert_close``). Kernel
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
  = ~2-2.5 min; scripts/gpu_check.sh caps this family at VK_BENCH_TIMEOUT_ATTENTION=170 s.
  The module level runs first, then the kernel grid in the order above (ViT-B/16 first),
  so a cap cuts the least-used shapes. ``--vk-compile static`` adds ~16 + 6 compiles
  (several minutes): run it without the cap.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import warnings
import zlib
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import harness
from vitkern import _triton
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


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    id: str
    backward: bool


MODES = (Mode("fwd", "fwd", backward=False), Mode("fwd+bwd", "fwd_bwd", backward=True))
MODULE_MODE = MODES[1]  # the module level is a training step: forward + backward

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
    full = harness.grid_choice(metafunc.config) == "full"
    if "attn_point" in metafunc.fixturenames:
        cases = kernel_full_grid() if full else kernel_smoke_grid()
        # case outermost, implementation innermost: inputs and references are built once per
        # (case, mode) and shared by the implementations.
        points = [(c, m, i) for c in cases for m in MODES for i in KERNEL_IMPLS]
        metafunc.parametrize("attn_point", points, ids=[f"{c.name}-{m.id}-{i}" for c, m, i in points])
    if "attn_module_point" in metafunc.fixturenames:
        cases = module_full_grid() if full else module_smoke_grid()
        points = [(c, i) for c in cases for i in MODULE_IMPLS]
        metafunc.parametrize("attn_module_point", points,
                             ids=[f"{c.name}-{MODULE_MODE.id}-{i}" for c, i in points])


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
        gen = torch.Generator(device=device)
        gen.manual_seed(zlib.crc32(f"{FAMILY}/{case.name}/{mode.name}".encode()))
        first = self._make_set(gen)
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device)
        self.sets = [first] + [self._make_set(gen) for _ in range(copies - 1)]
        high = torch.float32 if device.type == "cuda" else torch.float64
        self.ref_high = self._reference(first, high)
        self.ref_same = self._reference(first, None) if dtype in (torch.float16, torch.bfloat16) else None
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
_STATE: Dict[str, object] = {"key": None, "value": None}


def _cached_state(key, build: Callable[[], object]):
    if _STATE["key"] != key:
        _STATE["key"] = _STATE["value"] = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _STATE["value"] = build()
        _STATE["key"] = key
    return _STATE["value"]


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


def _check_equal(impl: str, out, grads: Sequence[torch.Tensor], grad_keys: Sequence[str],
                 ref_high: Dict[str, torch.Tensor], ref_same: Optional[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    same = ref_same or {}
    errors = {"out": harness.assert_close(f"{impl} out", out, ref_high["out"], same.get("out"))}
    for key, g in zip(grad_keys, grads):
        errors[key] = harness.assert_close(f"{impl} {key}", g, ref_high[key], same.get(key), grad=True)
    return errors


_NO_GPU_TRITON = ("no CUDA GPU: Triton kernels run on CPU only under TRITON_INTERPRET=1, whose timings are "
                  "meaningless; equality is checked by the *_interpreter_equality tests")
_NO_GPU_COMPILE = "no CUDA GPU: torch.compile on CPU takes minutes per shape and is not the comparison of interest"


def _kernel_skip_reason(impl: str, settings) -> Optional[str]:
    if settings.device.type != "cuda":
        if impl.startswith("vitkern_triton"):
            return _NO_GPU_TRITON
        if impl == "flex_attention":
            return ("no CUDA GPU: FlexAttention runs through torch.compile's Triton kernels; compiling on CPU "
                    "takes minutes per shape and is not the comparison of interest")
    if impl == "flex_attention" and settings.compile == "off":
        return "--vk-compile=off"
    return None


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
        torch.manual_seed(zlib.crc32(f"{FAMILY}/module/{dim}/{heads}".encode()))
        base = cls(dim, num_heads=heads, qkv_bias=True)
        torch.random.set_rng_state(gen_state)
        base = base.to(device=device, dtype=dtype)
        self.naive = copy.deepcopy(base)
        self.naive.fused_attn = False  # timm's unfused q·kᵀ -> softmax -> ·v path
        self.sdpa = copy.deepcopy(base)
        self.sdpa.fused_attn = True  # timm's default: F.scaled_dot_product_attention
        high = torch.float32 if device.type == "cuda" else torch.float64
        self.high = copy.deepcopy(base).to(high)  # the same (bf16-representable) weights, upcast
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
        gen = torch.Generator(device=device)
        gen.manual_seed(zlib.crc32(f"{FAMILY}/{case.name}".encode()))
        first = self._make_set(gen)
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device)
        self.sets = [first] + [self._make_set(gen) for _ in range(copies - 1)]
        self.grad_keys = ["dx"] + [f"d{n}" for n in _param_keys(ms.high)]
        high = torch.float32 if device.type == "cuda" else torch.float64
        self.ref_high = self._reference(ms.high, first, high)
        self.ref_same = self._reference(ms.naive, first, None) if dtype in (torch.float16, torch.bfloat16) else None

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


def _module_skip_reason(impl: str, settings) -> Optional[str]:
    if settings.device.type != "cuda":
        if impl == "vitkern_triton":
            return _NO_GPU_TRITON
        if impl == "compile_timm":
            return _NO_GPU_COMPILE
    if impl == "compile_timm" and settings.compile == "off":
        return "--vk-compile=off"
    return None


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


# --------------------------------------------------------------------------- #
# The benchmarks (module level first: it is short, and a time cap then cuts the
# end of the kernel grid instead)
# --------------------------------------------------------------------------- #
def test_attention_module(benchmark, vk_settings, vk_ceilings, attn_module_point):
    case, impl = attn_module_point
    mode = MODULE_MODE
    settings = vk_settings
    common = dict(family=FAMILY, case=case.name, impl=impl, role=MODULE_IMPLS[impl], dtype=settings.dtype,
                  mode=mode.name, shape={**case.shape(), "level": "module"})
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"

    reason = _module_skip_reason(impl, settings)
    if reason is None:
        try:
            _timm_attention_cls()
        except ImportError as exc:
            reason = f"timm is not installed: {harness.first_line(exc)}"
    if reason:
        harness.record_skip(**common, reason=reason)
        pytest.skip(reason)

    ms = _module_set(case, settings.device, settings.dtype)
    state = _cached_state(("module", case, str(settings.device), settings.dtype),
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
            harness.record_skip(**common, reason=why)
            pytest.skip(why)
        params_of = module
    keys = ["dx"] + [f"d{n}" for n in _param_keys(params_of)]
    params = [p for _, p in params_of.named_parameters()]

    def step(a):
        out = module(a["x"])
        return out, torch.autograd.grad(out, [a["x"]] + params, a["grad"])

    # 1. Equality (the first call also compiles / JITs, outside the timing).
    try:
        out, grads = step(state.sets[0])
    except Exception as exc:
        if impl == "compile_timm":
            reason = f"torch.compile failed: {harness.first_line(exc)}"
            harness.record_skip(**common, reason=reason)
            pytest.skip(reason)
        harness.record_failure(**common, reason=harness.first_line(exc))
        raise
    try:
        missing = sorted(set(keys) ^ set(state.grad_keys))
        assert not missing, f"{impl}: parameters differ from timm's: {missing}"
        errors = _check_equal(impl, out, grads, keys, state.ref_high, state.ref_same)
    except AssertionError as exc:
        harness.record_failure(**common, reason=f"equality: {exc}")
        raise
    del out, grads

    # 2. Timing and peak memory.
    timing = harness.time_call(benchmark, step, state.sets, settings.timing, settings.device)
    peak = harness.peak_memory_bytes(step, state.sets[0], settings.device)
    elem = torch.empty((), dtype=settings.dtype).element_size()
    harness.record(
        benchmark, **common, timing=timing, flops=module_flops(case, mode),
        min_bytes=module_min_bytes(case, mode, elem), peak_mem_bytes=peak, ceilings=vk_ceilings,
        errors=errors, extra={**extra, "wrt": [k[1:] for k in keys]},
    )


def test_attention(benchmark, vk_settings, vk_ceilings, attn_point):
    case, mode, impl = attn_point
    role, layout = KERNEL_IMPLS[impl]
    settings = vk_settings
    common = dict(family=FAMILY, case=case.name, impl=impl, role=role, dtype=settings.dtype,
                  mode=mode.name, shape={**case.shape(), "level": "kernel"})
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"

    reason = _kernel_skip_reason(impl, settings)
    backend = None
    if reason is None and impl in SDPA_BACKENDS:
        backend = _sdpa_backend(impl)
        if backend is None:
            reason = f"torch {torch.__version__} has no SDPBackend.{SDPA_BACKENDS[impl]}"
    if reason:
        harness.record_skip(**common, reason=reason)
        pytest.skip(reason)

    state = _cached_state(("kernel", case, mode, str(settings.device), settings.dtype),
                          lambda: KernelState(case, mode, settings.device, settings.dtype))
    if layout == "packed":
        arg_sets, names, grad_keys = state.packed_sets(), ("qkv",), ("dqkv",)
    else:
        arg_sets, names, grad_keys = state.sets, ("q", "k", "v"), ("dq", "dk", "dv")
    ref_high, ref_same = state.refs(layout)
    extra: Dict[str, object] = {"level": "kernel", "layout": layout}

    # Candidates: (description, factory). Only FlexAttention has a fallback (static compile).
    if impl == "flex_attention":
        try:
            candidates = _flex_candidates(settings.compile, state)
        except ImportError as exc:
            reason = f"this torch has no FlexAttention: {harness.first_line(exc)}"
            harness.record_skip(**common, reason=reason)
            pytest.skip(reason)
    elif backend is not None:
        candidates = [(f"SDPBackend.{backend.name}", lambda: _make_sdpa(backend))]
    else:
        fns = {"naive": lambda: _naive, "vitkern_triton": lambda: _vitkern_triton,
               "sdpa_packed": lambda: _make_sdpa_packed(case.heads),
               "vitkern_triton_packed": lambda: _make_vitkern_packed(case.heads)}
        candidates = [(impl, fns[impl])]

    # 1. Equality (the first call also compiles / JITs, outside the timing).
    step = out = grads = last_exc = None
    reasons: List[str] = []
    for how, factory in candidates:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step = _make_step(factory(), names, mode.backward)
                out, grads = step(arg_sets[0])
        except Exception as exc:
            why = harness.first_line(exc)
            if backend is not None and _sdpa_warnings(caught):
                why += f" [{_sdpa_warnings(caught)}]"
            if impl == "flex_attention" and how == _FLEX_DYNAMIC_HOW:
                _FLEX_DYNAMIC_FAILED[(case.head_dim, mode.backward)] = why
            reasons.append(f"{how}: {why}" if impl == "flex_attention" else why)
            step, last_exc = None, exc
            continue
        if impl == "flex_attention":
            extra["compile"] = how
        elif backend is not None:
            extra["sdpa_backend"] = backend.name
        break
    if step is None:
        reason = "; ".join(reasons)
        if role == "peer":  # a peer that cannot run this shape / this torch: recorded, not a failure
            reason = (f"torch.compile(flex_attention) failed: {reason}" if impl == "flex_attention"
                      else f"cannot run: {reason}")
            harness.record_skip(**common, reason=reason)
            pytest.skip(reason)
        harness.record_failure(**common, reason=reason)
        raise last_exc
    try:
        errors = _check_equal(impl, out, grads, grad_keys, ref_high, ref_same)
    except AssertionError as exc:
        harness.record_failure(**common, reason=f"equality: {exc}")
        raise
    del out, grads

    # 2. Timing and peak memory.
    timing = harness.time_call(benchmark, step, arg_sets, settings.timing, settings.device)
    peak = harness.peak_memory_bytes(step, arg_sets[0], settings.device)
    elem = torch.empty((), dtype=settings.dtype).element_size()
    harness.record(
        benchmark, **common, timing=timing, flops=kernel_flops(case, mode),
        min_bytes=kernel_min_bytes(case, mode, elem), peak_mem_bytes=peak, ceilings=vk_ceilings,
        errors=errors, extra={**extra, "wrt": list(names) if mode.backward else []},
    )


# --------------------------------------------------------------------------- #
# CPU: vitkern's Triton kernels and module under the interpreter, equality only
# --------------------------------------------------------------------------- #
TINY = [AttnCase("tiny_n50_d64_bs1", 1, 2, 50, 64), AttnCase("tiny_n50_d80_bs1", 1, 2, 50, 80)]
TINY_POINTS = [(c, layout) for c in TINY for layout in ("heads", "packed")]


def _skip_unless_interpreter():
    if torch.cuda.is_available():
        pytest.skip("on a GPU every timed vitkern_triton case checks its own equality")
    if not _triton.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before vitkern was imported")


@pytest.mark.parametrize("case,layout", TINY_POINTS, ids=[f"{c.name}-{lay}" for c, lay in TINY_POINTS])
def test_vitkern_triton_interpreter_equality(case, layout):
    """Forward and dq/dk/dv (or dqkv) of backend="triton" vs the float64 reference, fp32."""
    _skip_unless_interpreter()
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
    _skip_unless_interpreter()
    try:
        _timm_attention_cls()
    except ImportError as exc:
        pytest.skip(f"timm is not installed: {exc}")
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
