"""Patchify-projection benchmarks: ``vitkern.ops.patch_embed`` against the naive reference and peers.

Grid (GPU, bf16): ViT-B's patch embedding with its ``_pos_embed`` (Conv2d(3, 768, P, P) ->
tokens -> CLS row -> + position embedding) at resolution 224 / 384 / 512 x patch 16 / 32,
batch 64 and 256; Swin's stem (Conv2d(3, 96, 4, 4), no CLS, no position embedding)
at 224, batch 64 and 256; and MAE's masked patchify (ViT-B/16 at 224 keeping 49 of the 196
patches, a random subset per image as MAE's argsort of noise, + CLS row and the kept patches'
position rows), batch 64 and 256.

Modes:
* ``fwd``: forward only (inputs do not require grad, no graph is built).
* ``fwd+bwd``: forward + backward for weight, bias, CLS token and position embedding. This is
  ViT training: the image is data, nobody needs d(image), and every implementation skips
  the dx GEMM when x does not require grad (cuDNN dgrad is not run either).
* ``fwd+bwd+dx``: the same plus the gradient w.r.t. the image, to show that path
  (adversarial examples, saliency, a patch embedding that is not the first layer).
The backward is ``torch.autograd.grad(out, leaves, random upstream grad)``, so no ``.grad``
accumulation kernels are timed.

Implementations, timed in the same run (one pytest-benchmark group per case and mode):
* ``naive``: ``vitkern.reference.patch_embed_reference`` as is.
* ``conv2d_nchw``: F.conv2d on NCHW + flatten/transpose/cat/+pos, what a user writes by hand.
* ``conv2d_channels_last``: the same with image and weight in channels_last (converted outside
  the timing, as a channels_last data pipeline would deliver them).
* ``unfold_linear``: reshape/permute the image into patches, F.linear, cat, + pos (the
  "reshape + linear" route that beats some cuDNN choices for stride == kernel). With kept
  patches it gathers them before the F.linear, so it multiplies only those (conv2d peers run
  the full convolution, then gather, as MAE's reference code does).
* ``compile_reference``: ``torch.compile`` of the reference (compiled outside the timing;
  a failing compile is recorded and that peer skipped).
* ``vitkern_triton``: ``patch_embed(..., backend="triton")``.
The best peer is the fastest of the four peers (neither naive nor vitkern).

Every case first checks equality with the reference: output and every gradient of each
implementation against the fp32 reference on upcast inputs (float64 on CPU), within 2x
(forward) / 3x (gradients) the error of the bf16 naive reference (vitkern.testing.assert_close).

On CPU: a smoke grid (224, patch 16 / 32 and the Swin stem, batch 2, fp32) for the eager
implementations; ``compile_reference`` and ``vitkern_triton`` are skipped with the reason,
and vitkern's Triton kernels are checked for equality under the interpreter on tiny shapes.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import floors
import harness
from vitkern.ops import patch_embed
from vitkern.reference import patch_embed_reference

FAMILY = "patch_embed"
INPUTS = ("x", "weight", "bias", "cls_token", "pos_embed", "keep")  # keep: (B, K) int64 or None


# --------------------------------------------------------------------------- #
# Grid
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class PECase:
    name: str
    B: int
    C: int
    H: int
    W: int
    P: int
    D: int
    cls_pos: bool  # CLS token + position embedding (ViT) or neither (Swin stem)
    kept: Optional[int] = None  # patches kept per image (MAE's keep_indices), or None: all

    @property
    def num_patches(self) -> int:
        return (self.H // self.P) * (self.W // self.P)

    @property
    def rows(self) -> int:
        """Patch rows per image: the patches read and multiplied."""
        return self.num_patches if self.kept is None else self.kept

    @property
    def tokens(self) -> int:
        return self.rows + (1 if self.cls_pos else 0)

    @property
    def pos_rows(self) -> int:
        return self.num_patches + (1 if self.cls_pos else 0)

    @property
    def K(self) -> int:
        return self.C * self.P * self.P

    def shape(self) -> Dict[str, object]:
        return dict(B=self.B, C=self.C, H=self.H, W=self.W, P=self.P, D=self.D, N=self.num_patches,
                    tokens=self.tokens, cls_pos=self.cls_pos, kept=self.kept)


Mode = harness.Mode
MODES = (
    harness.FWD,
    Mode("fwd+bwd", "fwd_bwd", backward=True, dx=False),
    Mode("fwd+bwd+dx", "fwd_bwd_dx", backward=True, dx=True),
)

# implementation -> role ("naive" | "peer" | "vitkern"); the order is the timing order.
#: implementations that cannot run everywhere -> their kind (harness.skip_reason)
KINDS = {"compile_reference": "compile", "vitkern_triton": "triton"}
IMPLS: Dict[str, str] = {
    "naive": "naive",
    "conv2d_nchw": "peer",
    "conv2d_channels_last": "peer",
    "unfold_linear": "peer",
    "compile_reference": "peer",
    "vitkern_triton": "vitkern",
}


def full_grid() -> List[PECase]:
    cases = []
    for res in (224, 384, 512):
        for patch in (16, 32):
            for batch in (64, 256):
                cases.append(PECase(f"vitb_p{patch}_{res}_bs{batch}", batch, 3, res, res, patch, 768, True))
    for batch in (64, 256):
        cases.append(PECase(f"swin_stem_p4_224_bs{batch}", batch, 3, 224, 224, 4, 96, False))
    for batch in (64, 256):  # MAE ViT-B/16 pretraining: 75 % of the patches masked
        cases.append(PECase(f"mae_vitb_p16_224_keep49_bs{batch}", batch, 3, 224, 224, 16, 768, True, kept=49))
    return cases


def smoke_grid() -> List[PECase]:
    return [
        PECase("vitb_p16_224_bs2", 2, 3, 224, 224, 16, 768, True),
        PECase("vitb_p32_224_bs2", 2, 3, 224, 224, 32, 768, True),
        PECase("swin_stem_p4_224_bs2", 2, 3, 224, 224, 4, 96, False),
        PECase("mae_vitb_p16_224_keep49_bs2", 2, 3, 224, 224, 16, 768, True, kept=49),
    ]


def pytest_generate_tests(metafunc):
    harness.parametrize(metafunc, "pe_point", harness.grid(metafunc.config, full_grid, smoke_grid), MODES, IMPLS)


# --------------------------------------------------------------------------- #
# FLOPs and minimum bytes
# --------------------------------------------------------------------------- #
def flops(case: PECase, mode: Mode) -> int:
    """2*B*N*D*C*P^2 forward (N: the kept patches); the backward adds dW (1x) and, with dx, dX (1x more)."""
    fwd = 2 * case.B * case.rows * case.D * case.K
    if not mode.backward:
        return fwd
    return fwd + fwd * (2 if mode.dx else 1)


def min_bytes(case: PECase, mode: Mode, elem: int) -> int:
    """Bytes each pass must move at least (every tensor read or written once).

    forward: read x (its kept patches), weight, bias (+ cls, pos); write out.
    backward: read dout, x (for dW) (+ weight for dx); write dW, dbias (+ dcls, dpos) (+ dx, all of it).
    The forward and backward are separate passes, so fwd+bwd counts x twice. (The kept indices,
    B*K int64, are not counted.)
    """
    x = case.B * case.C * case.H * case.W
    x_read = x * case.rows // case.num_patches
    w = case.D * case.K
    b = case.D
    cls = case.D if case.cls_pos else 0
    pos = case.pos_rows * case.D if case.cls_pos else 0
    out = case.B * case.tokens * case.D
    total = x_read + w + b + cls + pos + out
    if mode.backward:
        total += out + x_read + w + b + cls + pos
        if mode.dx:
            total += w + x
    return total * elem


# --------------------------------------------------------------------------- #
# Implementations: fn(x, weight, bias, cls_token, pos_embed, keep) -> (B, T+K, D)
# --------------------------------------------------------------------------- #
def _naive(x, weight, bias, cls_token, pos_embed, keep=None):
    return patch_embed_reference(x, weight, bias, cls_token=cls_token, pos_embed=pos_embed, keep_indices=keep)


def _kept_rows(t, keep):
    """Rows keep[b, j] of t (B or 1, N, F) per image: (B, K, F); t itself without keep."""
    if keep is None:
        return t
    return t.expand(keep.shape[0], -1, -1).gather(1, keep[:, :, None].expand(-1, -1, t.shape[-1]))


def _add_cls_pos(tokens, cls_token, pos_embed, keep=None):
    """tokens (B, K, D) of the kept patches -> CLS row first, + the position rows of CLS and the kept patches."""
    T = 1 if cls_token is not None else 0
    if pos_embed is not None:
        pos = pos_embed.reshape(1, -1, tokens.shape[2])
        tokens = tokens + _kept_rows(pos[:, T:], keep)
    if cls_token is not None:
        cls = cls_token.reshape(1, 1, -1) + (pos[:, :1] if pos_embed is not None else 0)
        tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    return tokens


def _conv2d(x, weight, bias, cls_token, pos_embed, keep=None):
    """F.conv2d + flatten/transpose (+ gather the kept patches)/cat/+pos; NCHW or channels_last, as the inputs come."""
    y = F.conv2d(x, weight, bias, stride=tuple(weight.shape[-2:]))
    return _add_cls_pos(_kept_rows(y.flatten(2).transpose(1, 2), keep), cls_token, pos_embed, keep)


def _unfold_linear(x, weight, bias, cls_token, pos_embed, keep=None):
    B, C, H, W = x.shape
    D, _, ph, pw = weight.shape
    gh, gw = H // ph, W // pw
    patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
    y = F.linear(_kept_rows(patches, keep), weight.reshape(D, C * ph * pw), bias)  # only the kept patches
    return _add_cls_pos(y, cls_token, pos_embed, keep)


def _vitkern_triton(x, weight, bias, cls_token, pos_embed, keep=None):
    return patch_embed(x, weight, bias, cls_token=cls_token, pos_embed=pos_embed, keep_indices=keep, backend="triton")


_DYNAMIC_COMPILED: Optional[Callable] = None


def _compiled_reference(compile_mode: str, state: "CaseState") -> Callable:
    global _DYNAMIC_COMPILED
    harness.raise_recompile_limit()
    if compile_mode == "static":
        if state.compiled is None:
            torch._dynamo.reset()  # one specialised graph per (case, mode); never near the limit
            state.compiled = torch.compile(_naive, dynamic=False)
        return state.compiled
    if _DYNAMIC_COMPILED is None:
        _DYNAMIC_COMPILED = torch.compile(_naive, dynamic=True)
    return _DYNAMIC_COMPILED


# --------------------------------------------------------------------------- #
# Inputs and references, built once per (case, mode)
# --------------------------------------------------------------------------- #
class CaseState:
    """Rotated input copies, the wrt list and the two references for one (case, mode)."""

    def __init__(self, case: PECase, mode: Mode, device: torch.device, dtype: torch.dtype):
        self.case, self.mode, self.device, self.dtype = case, mode, device, dtype
        self.wrt = self.wrt_names(case, mode)
        self.compiled: Optional[Callable] = None
        self._channels_last: Optional[List[dict]] = None

        gen = harness.seeded_generator(device, case.name, mode.name)
        first = self._make_set(gen)
        copies = harness.rotation_count(harness.tensor_bytes(first.values()), device)
        self.sets = [first] + [self._make_set(gen) for _ in range(copies - 1)]

        self.ref_high = self._reference(first, harness.high_dtype(device))
        self.ref_same = self._reference(first, None) if harness.needs_same_dtype_reference(dtype) else None

    @staticmethod
    def wrt_names(case: PECase, mode: Mode) -> Tuple[str, ...]:
        """The leaves the mode differentiates (x only with dx)."""
        if not mode.backward:
            return ()
        return (("x",) if mode.dx else ()) + ("weight", "bias") + (("cls_token", "pos_embed") if case.cls_pos else ())

    def _make_set(self, gen: torch.Generator) -> dict:
        c, dev, dt = self.case, self.device, self.dtype

        def rnd(*shape, scale=1.0, name=None):
            t = torch.randn(shape, generator=gen, device=dev, dtype=dt)
            if scale != 1.0:
                t.mul_(scale)
            return t.requires_grad_(name in self.wrt)

        s = {
            "x": rnd(c.B, c.C, c.H, c.W, name="x"),
            "weight": rnd(c.D, c.C, c.P, c.P, scale=c.K ** -0.5, name="weight"),
            "bias": rnd(c.D, scale=0.5, name="bias"),
            "cls_token": rnd(1, 1, c.D, scale=0.5, name="cls_token") if c.cls_pos else None,
            "pos_embed": rnd(1, c.pos_rows, c.D, scale=0.5, name="pos_embed") if c.cls_pos else None,
            # MAE's choice: the first K of each image's argsort of uniform noise
            "keep": (torch.rand(c.B, c.num_patches, generator=gen, device=dev).argsort(1)[:, :c.kept]
                     if c.kept is not None else None),
        }
        if self.mode.backward:
            s["grad"] = rnd(c.B, c.tokens, c.D)
        return s

    def _reference(self, s: dict, high: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        """The naive reference's output and gradients, on inputs upcast to ``high`` (or as they are)."""
        leaves = {}
        for name in INPUTS:
            t = s[name]
            if t is None or name == "keep":
                leaves[name] = t
                continue
            u = t.detach()
            if high is not None:
                u = u.to(high)
            leaves[name] = u.requires_grad_(name in self.wrt)
        with harness.exact_fp32() if high is not None else nullcontext():
            out = _naive(*(leaves[n] for n in INPUTS))
            result = {"out": out.detach()}
            if self.wrt:
                grad = s["grad"].to(high) if high is not None else s["grad"]
                grads = torch.autograd.grad(out, [leaves[n] for n in self.wrt], grad)
                result.update({f"d{n}": g.detach() for n, g in zip(self.wrt, grads)})
        return result

    def channels_last_sets(self) -> List[dict]:
        if self._channels_last is None:
            converted = []
            for s in self.sets:
                t = dict(s)
                for name in ("x", "weight"):
                    v = s[name]
                    t[name] = v.detach().contiguous(memory_format=torch.channels_last).requires_grad_(v.requires_grad)
                converted.append(t)
            self._channels_last = converted
        return self._channels_last


_STATE = harness.Slot()


def _state(case: PECase, mode: Mode, device: torch.device, dtype: torch.dtype) -> CaseState:
    return _STATE.get((case, mode, str(device), dtype), lambda: CaseState(case, mode, device, dtype))


def _make_step(fn: Callable, wrt: Tuple[str, ...]) -> Callable[[dict], tuple]:
    """One timed call: the forward, and with ``wrt`` the backward for those leaves."""
    if not wrt:
        def step(a):
            return fn(*(a[n] for n in INPUTS)), ()
    else:
        def step(a):
            out = fn(*(a[n] for n in INPUTS))
            return out, torch.autograd.grad(out, [a[n] for n in wrt], a["grad"])
    return step


def _check_equal(impl: str, out, grads, state: CaseState) -> Dict[str, float]:
    return harness.check_equal(impl, out, grads, [f"d{n}" for n in state.wrt], state.ref_high, state.ref_same)


def _note_floors(case: PECase, mode: Mode) -> None:
    def naive():
        wrt = CaseState.wrt_names(case, mode)
        shapes = {"x": (case.B, case.C, case.H, case.W), "weight": (case.D, case.C, case.P, case.P),
                  "bias": (case.D,), "cls_token": (1, 1, case.D), "pos_embed": (1, case.pos_rows, case.D)}
        leaves = {n: floors.meta(shapes[n], n in wrt) if (case.cls_pos or n not in ("cls_token", "pos_embed"))
                  else None for n in INPUTS if n != "keep"}
        leaves["keep"] = (floors.meta((case.B, case.kept), dtype=torch.int64) if case.kept is not None else None)
        grad = floors.meta((case.B, case.tokens, case.D)) if mode.backward else None
        harness.grad_step(_naive, [leaves[n] for n in INPUTS], grad)()

    harness.note_floors(FAMILY, case.name, mode, case.shape(),
                        kernel=lambda elem: (flops(case, mode), min_bytes(case, mode, elem)), naive=naive)


# --------------------------------------------------------------------------- #
# The benchmark
# --------------------------------------------------------------------------- #
def test_patch_embed(benchmark, vk_settings, vk_ceilings, pe_point):
    case, mode, impl = pe_point
    settings = vk_settings
    common = harness.row_id(FAMILY, case.name, impl, IMPLS[impl], settings, mode, case.shape())
    benchmark.group = f"{FAMILY} {case.name} {mode.name}"
    _note_floors(case, mode)
    reason = harness.skip_reason(KINDS.get(impl), settings)
    if reason:
        harness.skip(common, reason)

    state = _state(case, mode, settings.device, settings.dtype)
    fns = {
        "naive": _naive,
        "conv2d_nchw": _conv2d,
        "conv2d_channels_last": _conv2d,
        "unfold_linear": _unfold_linear,
        "vitkern_triton": _vitkern_triton,
    }
    fn = _compiled_reference(settings.compile, state) if impl == "compile_reference" else fns[impl]
    arg_sets = state.channels_last_sets() if impl == "conv2d_channels_last" else state.sets
    try:
        harness.equal_then_time(
            benchmark, settings, vk_ceilings, common, _make_step(fn, state.wrt), arg_sets,
            lambda out, grads: _check_equal(impl, out, grads, state),
            flops=flops(case, mode), min_bytes=min_bytes(case, mode, harness.element_size(settings.dtype)),
            extra={"wrt": list(state.wrt), "compile": settings.compile if impl == "compile_reference" else None},
            may_fail=impl == "compile_reference")
    except harness.FirstCallFailed as exc:
        harness.skip(common, f"torch.compile failed: {exc}")


# --------------------------------------------------------------------------- #
# CPU: vitkern's Triton kernels under the interpreter, equality only
# --------------------------------------------------------------------------- #
TINY = [
    PECase("tiny_vit_p16_32_bs1", 1, 3, 32, 32, 16, 64, True),
    PECase("tiny_stem_p4_16_bs1", 1, 3, 16, 16, 4, 16, False),
    PECase("tiny_mae_p8_32_keep5_bs2", 2, 3, 32, 32, 8, 64, True, kept=5),
]


@pytest.mark.parametrize("case", TINY, ids=[c.name for c in TINY])
def test_vitkern_triton_interpreter_equality(case):
    """Forward and every gradient (dx included) of backend="triton" vs the float64 reference."""
    harness.skip_unless_interpreter()
    mode = MODES[-1]  # fwd+bwd+dx: every gradient
    state = CaseState(case, mode, torch.device("cpu"), torch.float32)
    out, grads = _make_step(_vitkern_triton, state.wrt)(state.sets[0])
    _check_equal("vitkern_triton (interpreter)", out, grads, state)
