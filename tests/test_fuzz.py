"""Fuzz suite: seeded random draws for every public op, on backend="triton".

Family 1 (test_<op>_matches_reference): each case draws shapes (tile edges, empty batches), tensor
layouts (offset views inside NaN, sliced, permuted / channels-last, expanded stride-0, strided or
stride-0 upstream gradients), the dtype (fp32 / fp16; bf16 on a GPU) and the optional arguments,
then compares the forward and the gradient of every input that needs one with the float64
reference (float32 on a GPU) under the policy of tests/helpers.py, outputs poisoned with NaN.
Family 2 (test_bad_input_raises_clear_error): a valid draw with one argument broken must raise
ValueError / TypeError (BackendUnavailableError for what the forced backend cannot run) whose
message names that argument; never a wrong answer, a crash or a hang (each case runs under
a time limit).
test_offsets_past_int32_are_int64: per op, one input and the upstream gradient with a batch stride of
2^30 + 1 elements, so every address past batch 1 needs int64; run in a child process (a crash fails it).

Counts per op in CI: the ``examples(...)`` arguments below (README.md, Tests). VITKERN_FUZZ_EXAMPLES=N
draws N per op (bad input: N // 20 per mutation), VITKERN_FUZZ_SEED=S another set of draws.
"""
from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from vitkern.backends import BackendUnavailableError
from vitkern.ops import attention, attention_packed, patch_embed, sr_attention, window_attention
from vitkern.ops.attention import dropout_keep_mask
from vitkern.ops.window_attention import window_dropout_keep_mask
from vitkern.reference import (attention_reference, patch_embed_reference, sr_attention_reference,
                               swin_effective_window, window_attention_reference)

from fuzz_draws import (CASE_TIMEOUT_S, DEVICE, LAYOUTS, Draw, check_against_reference, draw_layout, dropout_reference_patch, examples,
                        huge_batch_stride, log_uniform, reported, upstream_grad)

ATTN_EDGES = (1, 2, 15, 16, 17, 63, 64, 65, 127, 129)
HEAD_DIMS = (1, 3, 8, 16, 20, 32, 33, 48, 64, 80, 96, 128)


def _ids(op, n):
    return [f"{op}-{i:03d}" for i in range(n)]


def _needs(d: Draw, names, p=0.8):
    """Which inputs need a gradient (subsets exercise the only-what-is-asked paths)."""
    needs = {n: d.rng.random() < p for n in names}
    d.drawn["needs_grad"] = [n for n, v in needs.items() if v]
    return needs


def _dropout(d: Draw, p_any=0.25):
    p = d.rng.choice((0.1, 0.3, 0.5)) if d.rng.random() < p_any else 0.0
    d.record(dropout_p=p)
    if p:
        d.record(torch_seed=d.rng.randrange(2**31))
    return p


def _op_seed(d: Draw) -> int:
    """The Philox seed the op draws from torch's generator (seeded with the draw's torch_seed)."""
    torch.manual_seed(d.drawn["torch_seed"])
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())


def _kernel_mask(d: Draw, p: float):
    """The keep mask the attention kernels apply, as a function of the probabilities' shape."""
    seed = _op_seed(d)

    def mask(shape):
        if 0 in shape:
            return torch.ones(shape, device=DEVICE)
        return dropout_keep_mask(seed, shape, p, device=DEVICE)
    return mask


def _with_mask(reference, d: Draw, p: float):
    if not p:
        return reference
    mask = _kernel_mask(d, p)

    def masked(**kw):
        with dropout_reference_patch(mask):
            return reference(**kw)
    return masked


# --------------------------------------------------------------------------- #
# attention
# --------------------------------------------------------------------------- #
def _draw_bias(d: Draw, full, dtype, causal=False):
    """None or a bias broadcastable to ``full`` = (B, h, Nq, Nk): any subset of broadcast dimensions,
    leading ones dropped or kept, sometimes -inf entries (masking; never a whole row, with the
    causal mask too: key 0 stays finite then)."""
    if d.rng.random() < 0.45:
        return None
    shape = [n if d.rng.random() < 0.5 else 1 for n in full]
    while len(shape) > 1 and shape[0] == 1 and d.rng.random() < 0.5:
        shape = shape[1:]
    bias = d.randn(*shape, scale=2.0, dtype=torch.float64)
    if shape[-1] == full[-1] and full[-1] > 1 and d.rng.random() < 0.25:
        bias = bias.masked_fill(torch.rand(bias.shape, generator=d.gen, dtype=torch.float64).to(DEVICE) < 0.3,
                                float("-inf"))
        bias[..., 0 if causal else d.rng.randrange(full[-1])] = 0.0  # one finite key per row
        d.record(bias_neg_inf=True)
    d.record(bias_shape=tuple(shape))
    return draw_layout(d, "bias", bias.to(dtype))


def _key_broadcast_scales(ref_ins, reference, grad_out, full):
    """A bias broadcast over keys gets the row sums of dS, which are 0 by the math: measure the
    error against the size of dS along keys (the gradient of the same bias expanded over keys)."""
    bias = ref_ins["attn_bias"]
    if bias is None or not bias.requires_grad or (bias.dim() and bias.shape[-1] != 1) or full[-1] == 1:
        return {}
    wide = bias.detach().expand(*bias.shape[:-1], full[-1]).contiguous().requires_grad_(True)
    kw = {**{n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in ref_ins.items()}, "attn_bias": wide}
    (g,) = torch.autograd.grad(reference(**kw), [wide], grad_out.to(wide.dtype))
    return {"attn_bias": max(g.norm().item(), 1e-30)}


def _draw_qkv_sizes(d: Draw, packed=False):
    B = d.batch(3)
    H = d.size(1, 3)
    while B * H > 6:
        H -= 1
    # At least 2 keys: with one, every score gradient is 0 and there is nothing to compare relatively.
    NQ = d.size(2 if packed else 1, 80, ATTN_EDGES[1:] if packed else ATTN_EDGES)
    NK = NQ if packed else d.size(2, 80, ATTN_EDGES[1:])
    D = d.rng.choice(HEAD_DIMS)
    if D > 64 and max(NQ, NK) > 64:  # keep the interpreter's cost bounded
        NQ, NK = min(NQ, 64), NK if packed else min(NK, 64)
        NK = NQ if packed else NK
    causal = d.rng.random() < 0.25
    if causal and NQ == 1:  # query 0 sees key 0 only: its score gradients are 0
        NQ = 2
        NK = NQ if packed else NK
    d.record(B=B, H=H, NQ=NQ, NK=NK, D=D, is_causal=causal)
    return B, H, NQ, NK, D


def _scale(d: Draw):
    return d.record(scale=None if d.rng.random() < 0.6 else round(log_uniform(d.rng, 0.05, 2.0), 4))


@pytest.mark.parametrize("case", range(examples(40)), ids=_ids("attention", examples(40)))
def test_attention_matches_reference(case):
    d = Draw("attention", case)
    with reported(d):
        B, H, NQ, NK, D = _draw_qkv_sizes(d)
        dtype = d.record(dtype=d.dtype())
        mag = d.record(magnitude=round(d.rng.uniform(0.5, 2.5), 2))
        inputs = {n: draw_layout(d, n, d.randn(B, H, length, D, dtype=dtype, scale=mag), expand_dims=(0, 1, 3))
                  for n, length in (("q", NQ), ("k", NK), ("v", NK))}
        causal = d.drawn["is_causal"]
        inputs["attn_bias"] = _draw_bias(d, (B, H, NQ, NK), dtype, causal)
        scale, p = _scale(d), _dropout(d)
        needs = _needs(d, ["q", "k", "v", "attn_bias"])
        grad_out = upstream_grad(d, (B, H, NQ, D), dtype)

        def op(**kw):
            return attention(**kw, scale=scale, dropout_p=p, is_causal=causal, backend="triton")

        def ref(**kw):
            return attention_reference(**kw, scale=scale, dropout_p=p, is_causal=causal)

        ref = _with_mask(ref, d, p)
        check_against_reference(
            d, op, ref, inputs, needs, grad_out, dtype,
            zero_scales=lambda r: _key_broadcast_scales(r, ref, grad_out, (B, H, NQ, NK)),
            rerun=d.rng.random() < 0.2)


@pytest.mark.parametrize("case", range(examples(20)), ids=_ids("attention_packed", examples(20)))
def test_attention_packed_matches_reference(case):
    d = Draw("attention_packed", case)
    with reported(d):
        B, H, N, _, D = _draw_qkv_sizes(d, packed=True)
        dtype = d.record(dtype=d.dtype())
        causal = d.drawn["is_causal"]
        inputs = {"qkv": draw_layout(d, "qkv", d.randn(B, N, 3 * H * D, dtype=dtype, scale=1.5), expand_dims=(0, 2)),
                  "attn_bias": _draw_bias(d, (B, H, N, N), dtype, causal)}
        scale, p = _scale(d), _dropout(d)
        needs = _needs(d, ["qkv", "attn_bias"], p=0.85)
        grad_out = upstream_grad(d, (B, N, H * D), dtype)

        def op(qkv, attn_bias):
            return attention_packed(qkv, H, scale=scale, attn_bias=attn_bias, dropout_p=p, is_causal=causal,
                                    backend="triton")

        def ref(qkv, attn_bias):
            q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
            out = attention_reference(q, k, v, scale=scale, attn_bias=attn_bias, dropout_p=p, is_causal=causal)
            return out.transpose(1, 2).reshape(B, N, H * D)

        ref = _with_mask(ref, d, p)
        check_against_reference(
            d, op, ref, inputs, needs, grad_out, dtype,
            zero_scales=lambda r: _key_broadcast_scales(r, ref, grad_out, (B, H, N, N)),
            rerun=d.rng.random() < 0.2)


# --------------------------------------------------------------------------- #
# patch_embed
# --------------------------------------------------------------------------- #
def _draw_patch_embed(d: Draw, dtype):
    B = d.batch(3)
    C = d.size(1, 4)
    ph, pw = d.size(1, 5), d.size(1, 5)
    gh, gw = d.size(1, 5), d.size(1, 5)
    D = d.size(1, 40, (16, 17, 64, 65))
    cls = d.rng.random() < 0.5
    # a multi-row prefix (CLS + register / distillation tokens), shared or per image, instead of a CLS row
    T = d.rng.choice((2, 3)) if not cls and d.rng.random() < 0.5 else int(cls)
    n = gh * gw
    K = d.size(1, n) if d.rng.random() < 0.35 else None  # MAE: only K of the n patches
    covers = d.rng.random() < 0.7
    d.record(B=B, C=C, patch=(ph, pw), grid=(gh, gw), D=D, cls=cls, T=T, K=K, covers=covers)
    x = d.randn(B, C, gh * ph, gw * pw, dtype=dtype)
    inputs = {
        "x": draw_layout(d, "x", x, kinds=("offset", "sliced", "permuted", "channels_last", "expanded")),
        "weight": draw_layout(d, "weight", d.randn(D, C, ph, pw, dtype=dtype, scale=(C * ph * pw) ** -0.5)),
        "bias": draw_layout(d, "bias", d.randn(D, dtype=dtype)) if d.rng.random() < 0.7 else None,
        "cls_token": None, "prefix_tokens": None, "pos_embed": None, "pos_embed_covers_prefix": covers,
        "keep_indices": None,
    }
    if cls:
        shape = d.record(cls_shape=d.rng.choice(((1, 1, D), (D,), (1, D))))
        inputs["cls_token"] = draw_layout(d, "cls_token", d.randn(*shape, dtype=dtype))
    elif T:
        shape = d.record(prefix_shape=d.rng.choice(((1, T, D), (B, T, D), (T, D))))
        inputs["prefix_tokens"] = draw_layout(d, "prefix_tokens", d.randn(*shape, dtype=dtype))
    if K is not None:
        perm = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(d.rng.randrange(2**31)))[:K]
                            for _ in range(B)]) if B else torch.empty(0, K, dtype=torch.int64)
        inputs["keep_indices"] = perm.to(DEVICE)
    if d.rng.random() < 0.6:
        rows = T + n if covers else n
        shape = d.record(pos_shape=d.rng.choice(((1, rows, D), (rows, D))))
        inputs["pos_embed"] = draw_layout(d, "pos_embed", d.randn(*shape, dtype=dtype, scale=0.5))
    return inputs


@pytest.mark.parametrize("case", range(examples(40)), ids=_ids("patch_embed", examples(40)))
def test_patch_embed_matches_reference(case):
    d = Draw("patch_embed", case)
    with reported(d):
        dtype = d.record(dtype=d.dtype())
        inputs = _draw_patch_embed(d, dtype)
        needs = _needs(d, [n for n in inputs if n != "keep_indices"])
        x, w = inputs["x"], inputs["weight"]
        kept = inputs["keep_indices"]
        patches = kept.shape[1] if kept is not None else (x.shape[2] // w.shape[2]) * (x.shape[3] // w.shape[3])
        tokens = patches + d.drawn["T"]
        grad_out = upstream_grad(d, (x.shape[0], tokens, w.shape[0]), dtype)
        check_against_reference(d, lambda **kw: patch_embed(**kw, backend="triton"), patch_embed_reference,
                                inputs, needs, grad_out, dtype, rerun=d.rng.random() < 0.3)


# --------------------------------------------------------------------------- #
# window_attention
# --------------------------------------------------------------------------- #
def _draw_window(d: Draw, dtype):
    while True:  # bound the interpreter's work: (images x windows x heads) programs
        B = d.batch(2)
        heads = d.size(1, 3)
        head_dim = d.rng.choice((1, 3, 8, 12, 16, 24))
        H, W = d.size(1, 10), d.size(1, 10)
        window = (d.size(1, 7), d.size(1, 7))
        if window == (1, 1):
            continue  # one-token windows: every score gradient is 0 (nothing to compare relatively)
        shift = tuple(d.rng.randrange(m) if d.rng.random() < 0.6 else 0 for m in window)
        if d.rng.random() < 0.5:  # what the Swin block passes: timm's small-grid rule
            window, shift = swin_effective_window((H, W), window, shift)
            if window == (1, 1):
                continue
        n_win = -(-H // window[0]) * -(-W // window[1])
        if max(B, 1) * n_win * heads <= 24:
            break
    C = heads * head_dim
    d.record(B=B, grid=(H, W), heads=heads, head_dim=head_dim, window=window, shift=shift)
    table_rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    kinds = ("offset", "sliced", "permuted", "expanded")
    return {
        "qkv": draw_layout(d, "qkv", d.randn(B, H, W, 3 * C, dtype=dtype, scale=1.5), kinds=kinds,
                           expand_dims=(0, 3)),
        "rel_pos_bias_table": draw_layout(d, "table", d.randn(table_rows, heads, dtype=dtype)),
        "qkv_bias": draw_layout(d, "qkv_bias", d.randn(3 * C, dtype=dtype)) if d.rng.random() < 0.6 else None,
        # Swin V2 cosine attention: the raw per-head parameter, some heads above the clamp at log(100). Not at
        # head_dim 1, where unit rows are +-1 (a degenerate case whose d(logit_scale) is not yet understood)
        "logit_scale": (torch.tensor([d.rng.uniform(math.log(2.0), math.log(150.0)) for _ in range(heads)],
                                     dtype=torch.float32, device=DEVICE)
                        if head_dim >= 3 and d.rng.random() < 0.3 else None),
    }, heads, window, shift


def _window_mask(d: Draw, p: float, qkv_shape, heads, window):
    """The window kernels' keep mask (B, nW, heads, n, n) for the seed the op draws."""
    B, H, W, _ = qkv_shape
    if B == 0:
        n_win = -(-H // window[0]) * -(-W // window[1])
        return torch.ones(0, n_win, heads, window[0] * window[1], window[0] * window[1], device=DEVICE)
    return window_dropout_keep_mask(_op_seed(d), B, (H, W), heads, window, p, device=DEVICE)


@pytest.mark.parametrize("case", range(examples(24)), ids=_ids("window_attention", examples(24)))
def test_window_attention_matches_reference(case):
    d = Draw("window_attention", case)
    with reported(d):
        dtype = d.record(dtype=d.dtype())
        inputs, heads, window, shift = _draw_window(d, dtype)
        scale = _scale(d)
        mask_value = d.record(mask_value=d.rng.choice((-100.0, -100.0, -3.0)))
        p = _dropout(d, p_any=0.2)
        needs = _needs(d, list(inputs))
        qkv = inputs["qkv"]
        grad_out = upstream_grad(d, (*qkv.shape[:3], qkv.shape[3] // 3), dtype)
        if inputs["logit_scale"] is not None:
            scale = None  # cosine attention has no scale of its own
        kw = dict(num_heads=heads, window_size=window, shift_size=shift, scale=scale, mask_value=mask_value)
        mask = _window_mask(d, p, qkv.shape, heads, window) if p else None

        def ref(**i):
            drop = {"dropout_mask": mask.to(i["qkv"].dtype)} if p else {}
            return window_attention_reference(**i, **kw, **drop)

        check_against_reference(d, lambda **i: window_attention(**i, **kw, dropout_p=p, backend="triton"), ref,
                                inputs, needs, grad_out, dtype, rerun=d.rng.random() < 0.2)


# --------------------------------------------------------------------------- #
# sr_attention
# --------------------------------------------------------------------------- #
def _draw_sr(d: Draw, dtype):
    B = d.batch(2)
    heads = d.size(1, 3)
    head_dim = d.rng.choice((4, 8, 12, 16))
    C = heads * head_dim
    linear = d.rng.random() < 0.2
    sr = 1 if linear else d.rng.choice((1, 2, 2, 3, 4))
    while True:  # at least 2 keys: with one, the q path's gradients are 0 (nothing to compare relatively)
        H, W = d.size(sr, 10), d.size(sr, 10)
        if linear or (H // sr) * (W // sr) >= 2:
            break
    d.record(B=B, grid=(H, W), heads=heads, C=C, sr_ratio=sr, linear_attn=linear)
    with_bias = d.rng.random() < 0.7

    def param(name, *shape, scale=1.0, offset=0.0, optional=False, kinds=LAYOUTS):
        if optional and d.rng.random() < 0.3:
            return None
        return draw_layout(d, name, d.randn(*shape, dtype=dtype, scale=scale, offset=offset), kinds=kinds)

    # Weight matrices are not expanded: equal rows make k equal v and all channels alike, a
    # degenerate case whose few gradient elements cancel (fp16 then compares noise with noise).
    dense = tuple(k for k in LAYOUTS if k != "expanded")
    p = dict(q_weight=param("q_weight", C, C, scale=C ** -0.5, kinds=dense),
             q_bias=param("q_bias", C) if with_bias else None,
             kv_weight=param("kv_weight", 2 * C, C, scale=C ** -0.5, kinds=dense),
             kv_bias=param("kv_bias", 2 * C) if with_bias else None,
             proj_weight=param("proj_weight", C, C, scale=C ** -0.5, kinds=dense),
             proj_bias=param("proj_bias", C, optional=True))
    if linear or sr > 1:
        k = 1 if linear else sr
        p.update(sr_weight=param("sr_weight", C, C, k, k, scale=(C * k * k) ** -0.5, kinds=dense),
                 sr_bias=param("sr_bias", C, optional=True),
                 norm_weight=param("norm_weight", C, scale=0.2, offset=1.0),
                 norm_bias=param("norm_bias", C, scale=0.2, optional=True))
    x = draw_layout(d, "x", d.randn(B, H * W, C, dtype=dtype), expand_dims=(0,))
    return {"x": x, **p}, (H, W), heads, sr, linear


def _sr_keys(H, W, sr, linear):
    return 49 if linear else (H // sr) * (W // sr)


@pytest.mark.parametrize("case", range(examples(24)), ids=_ids("sr_attention", examples(24)))
def test_sr_attention_matches_reference(case):
    d = Draw("sr_attention", case)
    with reported(d):
        dtype = d.record(dtype=d.dtype())
        inputs, feat, heads, sr, linear = _draw_sr(d, dtype)
        eps = d.record(norm_eps=d.rng.choice((1e-5, 1e-5, 1e-6, 1e-3)))
        scale, p = _scale(d), _dropout(d, p_any=0.2)
        needs = _needs(d, list(inputs))
        x = inputs["x"]
        grad_out = upstream_grad(d, tuple(x.shape), dtype)
        kw = dict(num_heads=heads, sr_ratio=sr, linear_attn=linear, norm_eps=eps, scale=scale, dropout_p=p)

        def op(x, **params):
            return sr_attention(x, feat, **params, **kw, backend="triton")

        def ref(x, **params):
            return sr_attention_reference(x, feat, **params, **kw)

        check_against_reference(d, op, _with_mask(ref, d, p), inputs, needs, grad_out, dtype,
                                rerun=d.rng.random() < 0.2)


# --------------------------------------------------------------------------- #
# Family 2: bad input must raise a clear error naming the argument
# --------------------------------------------------------------------------- #
CLEAR_ERRORS = (ValueError, TypeError, BackendUnavailableError)


def _expect_clear_error(d: Draw, call, arg: str, received=None):
    """``call()`` raises ValueError/TypeError/BackendUnavailableError whose message names ``arg``
    (and shows ``received``, the bad value, when given)."""
    d.record(expect_error_naming=arg)
    with pytest.raises(CLEAR_ERRORS) as info:
        call()
    msg = str(info.value)
    assert re.search(rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])", msg), \
        f"the error does not name {arg!r}: {type(info.value).__name__}: {msg}"
    if received is not None:
        assert str(received) in msg, f"the error does not show the received {received!r}: {msg}"


def _tensor(d, *shape, dtype=torch.float32):
    return d.randn(*shape, dtype=dtype)


# Per op: a valid call's arguments drawn at random, and mutations: name -> fn(d, valid arguments) ->
# (the broken arguments, the argument the error must name, the received value it must show or None).
def _valid_attention(d):
    B, H, NQ, NK = d.size(1, 2), d.size(1, 2), d.size(1, 20), d.size(2, 20)
    D = d.rng.choice((8, 16, 32))
    d.record(B=B, H=H, NQ=NQ, NK=NK, D=D)
    return {"q": _tensor(d, B, H, NQ, D), "k": _tensor(d, B, H, NK, D), "v": _tensor(d, B, H, NK, D)}


ATTENTION_BAD = {
    "q_rank3": lambda d, a: ({**a, "q": a["q"][0]}, "q", tuple(a["q"][0].shape)),
    "k_dtype": lambda d, a: ({**a, "k": a["k"].half()}, "k", "torch.float16"),
    "q_int": lambda d, a: ({**a, "q": a["q"].long()}, "q", "torch.int64"),
    "v_head_dim": lambda d, a: ({**a, "v": a["v"][..., :-1]}, "v", None),
    "k_keys": lambda d, a: ({**a, "k": a["k"][:, :, :-1]}, "k", None),
    "k_batch": lambda d, a: ({**a, "k": torch.cat([a["k"], a["k"]])}, "k", None),
    "k_device": lambda d, a: ({**a, "k": a["k"].to("meta")}, "k", "meta"),
    "bias_shape": lambda d, a: ({**a, "attn_bias": _tensor(d, a["q"].shape[2] + 1, a["k"].shape[2])},
                                "attn_bias", None),
    "bias_rank5": lambda d, a: ({**a, "attn_bias": _tensor(d, 1, *a["q"].shape[:3], a["k"].shape[2])},
                                "attn_bias", None),
    "bias_bool": lambda d, a: ({**a, "attn_bias": torch.ones(a["q"].shape[2], a["k"].shape[2], dtype=torch.bool)},
                               "attn_bias", "torch.bool"),
    "bias_list": lambda d, a: ({**a, "attn_bias": [0.0]}, "attn_bias", "list"),
    "dropout_one": lambda d, a: ({**a, "dropout_p": 1.0}, "dropout_p", "1.0"),
    "dropout_negative": lambda d, a: ({**a, "dropout_p": -0.25}, "dropout_p", "-0.25"),
    "dropout_str": lambda d, a: ({**a, "dropout_p": "0.1"}, "dropout_p", None),
    "head_dim_too_big": lambda d, a: ({**a, **{n: _tensor(d, *a[n].shape[:3], 160) for n in "qkv"}},
                                      "head_dim", "160"),
    "float64_on_triton": lambda d, a: ({**a, **{n: a[n].double() for n in "qkv"}}, "float64", None),
    "q_not_tensor": lambda d, a: ({**a, "q": a["q"].tolist()}, "q", "list"),
    "backend_name": lambda d, a: ({**a, "backend": "cuDNN"}, "backend", "cuDNN"),
}



def _valid_packed(d):
    B, N, H, D = d.size(1, 2), d.size(1, 20), 2, d.rng.choice((8, 16))
    d.record(B=B, N=N, H=H, D=D)
    return {"qkv": _tensor(d, B, N, 3 * H * D), "num_heads": H}


PACKED_BAD = {
    "qkv_rank4": lambda d, a: ({**a, "qkv": a["qkv"][None]}, "qkv", None),
    "channels_not_3hd": lambda d, a: ({**a, "qkv": a["qkv"][..., :-1]}, "num_heads", None),
    "num_heads_zero": lambda d, a: ({**a, "num_heads": 0}, "num_heads", "0"),
    "num_heads_float": lambda d, a: ({**a, "num_heads": 2.0}, "num_heads", "2.0"),
    "bias_shape": lambda d, a: ({**a, "attn_bias": _tensor(d, a["qkv"].shape[1], a["qkv"].shape[1] + 1)},
                                "attn_bias", None),
    "dropout_one": lambda d, a: ({**a, "dropout_p": 1.0}, "dropout_p", "1.0"),
    "qkv_int": lambda d, a: ({**a, "qkv": a["qkv"].long()}, "qkv", "torch.int64"),
}



def _valid_patch_embed(d):
    B, C, P, g, D = d.size(1, 2), d.size(1, 3), d.size(2, 4), d.size(1, 3), d.size(4, 16)
    d.record(B=B, C=C, P=P, grid=g, D=D)
    return {"x": _tensor(d, B, C, g * P, g * P), "weight": _tensor(d, D, C, P, P)}


PATCH_EMBED_BAD = {
    "not_divisible": lambda d, a: ({**a, "x": a["x"][..., :-1]}, "patch", None),
    "height_zero": lambda d, a: ({**a, "x": a["x"][:, :, :0]}, "x", None),
    "width_zero": lambda d, a: ({**a, "x": a["x"][..., :0]}, "x", None),
    "weight_channels": lambda d, a: ({**a, "weight": torch.cat([a["weight"]] * 2, 1)}, "weight", None),
    "weight_rank3": lambda d, a: ({**a, "weight": a["weight"][0]}, "weight", None),
    "x_rank3": lambda d, a: ({**a, "x": a["x"][0]}, "x", None),
    "x_int": lambda d, a: ({**a, "x": a["x"].long()}, "x", "torch.int64"),
    "bias_shape": lambda d, a: ({**a, "bias": _tensor(d, a["weight"].shape[0] + 1)}, "bias", None),
    "bias_dtype": lambda d, a: ({**a, "bias": _tensor(d, a["weight"].shape[0]).half()}, "bias", "torch.float16"),
    "bias_list": lambda d, a: ({**a, "bias": [0.0] * a["weight"].shape[0]}, "bias", "list"),
    "cls_size": lambda d, a: ({**a, "cls_token": _tensor(d, 1, 1, a["weight"].shape[0] + 1)}, "cls_token", None),
    "pos_shape": lambda d, a: ({**a, "pos_embed": _tensor(d, 2, 1, a["weight"].shape[0])}, "pos_embed", None),
    "weight_device": lambda d, a: ({**a, "weight": a["weight"].to("meta")}, "weight", "meta"),
    "float64_on_triton": lambda d, a: ({**a, "x": a["x"].double(), "weight": a["weight"].double()},
                                       "float64", None),
}



def _valid_window(d):
    B, H, W, heads, M = d.size(1, 2), d.size(2, 8), d.size(2, 8), d.size(1, 2), d.size(2, 4)
    d.record(B=B, grid=(H, W), heads=heads, window=M)
    return {"qkv": _tensor(d, B, H, W, 3 * 8 * heads), "rel_pos_bias_table": _tensor(d, (2 * M - 1) ** 2, heads),
            "num_heads": heads, "window_size": M, "shift_size": M // 2}


WINDOW_BAD = {
    "table_float64": lambda d, a: ({**a, "rel_pos_bias_table": a["rel_pos_bias_table"].double()},
                                   "rel_pos_bias_table", "torch.float64"),
    "table_rows": lambda d, a: ({**a, "rel_pos_bias_table": a["rel_pos_bias_table"][1:]}, "rel_pos_bias_table",
                                None),
    "table_int": lambda d, a: ({**a, "rel_pos_bias_table": a["rel_pos_bias_table"].long()},
                               "rel_pos_bias_table", "torch.int64"),
    "shift_too_big": lambda d, a: ({**a, "shift_size": a["window_size"]}, "shift_size", None),
    "shift_negative": lambda d, a: ({**a, "shift_size": -1}, "shift_size", None),
    "window_zero": lambda d, a: ({**a, "window_size": 0, "shift_size": 0}, "window_size", None),
    "window_str": lambda d, a: ({**a, "window_size": "4"}, "window_size", "'4'"),
    "window_triple": lambda d, a: ({**a, "window_size": (4, 4, 4)}, "window_size", None),
    "num_heads": lambda d, a: ({**a, "num_heads": a["num_heads"] + 5}, "num_heads", None),
    "qkv_channels": lambda d, a: ({**a, "qkv": a["qkv"][..., :-1]}, "qkv", None),
    "qkv_rank3": lambda d, a: ({**a, "qkv": a["qkv"][0]}, "qkv", None),
    "qkv_int": lambda d, a: ({**a, "qkv": a["qkv"].long()}, "qkv", "torch.int64"),
    "qkv_bias_shape": lambda d, a: ({**a, "qkv_bias": _tensor(d, a["qkv"].shape[-1] - 1)}, "qkv_bias", None),
    "qkv_bias_int": lambda d, a: ({**a, "qkv_bias": torch.ones(a["qkv"].shape[-1], dtype=torch.long)},
                                  "qkv_bias", "torch.int64"),
    "qkv_bias_device": lambda d, a: ({**a, "qkv_bias": _tensor(d, a["qkv"].shape[-1]).to("meta")}, "qkv_bias",
                                     "meta"),
}



def _valid_sr(d):
    B, sr, C = d.size(1, 2), d.size(2, 3), 16
    H, W = d.size(sr, 6), d.size(sr, 6)
    d.record(B=B, grid=(H, W), sr_ratio=sr)
    return dict(x=_tensor(d, B, H * W, C), feat_size=(H, W), num_heads=2, sr_ratio=sr,
                q_weight=_tensor(d, C, C), q_bias=_tensor(d, C), kv_weight=_tensor(d, 2 * C, C),
                kv_bias=_tensor(d, 2 * C), proj_weight=_tensor(d, C, C), proj_bias=_tensor(d, C),
                sr_weight=_tensor(d, C, C, sr, sr), sr_bias=_tensor(d, C), norm_weight=_tensor(d, C),
                norm_bias=_tensor(d, C))


SR_BAD = {
    "feat_size": lambda d, a: ({**a, "feat_size": (a["feat_size"][0] + 1, a["feat_size"][1])}, "feat_size", None),
    "feat_size_scalar": lambda d, a: ({**a, "feat_size": 7}, "feat_size", None),
    "grid_below_sr": lambda d, a: ({**a, "feat_size": (1, a["feat_size"][0] * a["feat_size"][1])}, "feat_size",
                                   None),
    "num_heads": lambda d, a: ({**a, "num_heads": 5}, "num_heads", None),
    "sr_ratio_zero": lambda d, a: ({**a, "sr_ratio": 0}, "sr_ratio", "0"),
    "sr_ratio_float": lambda d, a: ({**a, "sr_ratio": 2.0}, "sr_ratio", "2.0"),
    "q_weight_shape": lambda d, a: ({**a, "q_weight": a["q_weight"][:-1]}, "q_weight", None),
    "kv_weight_shape": lambda d, a: ({**a, "kv_weight": a["kv_weight"][:-1]}, "kv_weight", None),
    "proj_weight_shape": lambda d, a: ({**a, "proj_weight": a["proj_weight"][:, :-1]}, "proj_weight", None),
    "sr_weight_missing": lambda d, a: ({**a, "sr_weight": None}, "sr_weight", None),
    "sr_weight_kernel": lambda d, a: ({**a, "sr_weight": a["sr_weight"][..., :1, :1]}, "sr_weight", None),
    "norm_weight_missing": lambda d, a: ({**a, "norm_weight": None}, "norm_weight", None),
    "norm_weight_shape": lambda d, a: ({**a, "norm_weight": a["norm_weight"][:-1]}, "norm_weight", None),
    "norm_bias_shape": lambda d, a: ({**a, "norm_bias": a["norm_bias"][:-1]}, "norm_bias", None),
    "sr_bias_shape": lambda d, a: ({**a, "sr_bias": a["sr_bias"][:-1]}, "sr_bias", None),
    "q_bias_shape": lambda d, a: ({**a, "q_bias": a["q_bias"][:-1]}, "q_bias", None),
    "kv_bias_dtype": lambda d, a: ({**a, "kv_bias": a["kv_bias"].half()}, "kv_bias", "torch.float16"),
    "x_rank2": lambda d, a: ({**a, "x": a["x"][0]}, "x", None),
    "x_int": lambda d, a: ({**a, "x": a["x"].long()}, "x", "torch.int64"),
    "weight_device": lambda d, a: ({**a, "kv_weight": a["kv_weight"].to("meta")}, "kv_weight", "meta"),
    "dropout_one": lambda d, a: ({**a, "dropout_p": 1.0}, "dropout_p", "1.0"),
}



BAD_INPUT = {  # op -> (function, a valid call's arguments, mutations)
    "attention": (attention, _valid_attention, ATTENTION_BAD),
    "attention_packed": (attention_packed, _valid_packed, PACKED_BAD),
    "patch_embed": (patch_embed, _valid_patch_embed, PATCH_EMBED_BAD),
    "window_attention": (window_attention, _valid_window, WINDOW_BAD),
    "sr_attention": (sr_attention, _valid_sr, SR_BAD),
}
# Cheap cases: 2 valid calls per mutation in CI, N // 20 with VITKERN_FUZZ_EXAMPLES=N.
BAD_CASES = [(op, m, i) for op, (_, _, table) in BAD_INPUT.items() for i in range(examples(2, share=20))
             for m in table]


@pytest.mark.parametrize("op,mutation,case", BAD_CASES, ids=[f"{op}-{m}-{i}" for op, m, i in BAD_CASES])
def test_bad_input_raises_clear_error(op, mutation, case):
    fn, valid, table = BAD_INPUT[op]
    d = Draw(f"{op}-bad-{mutation}", case)
    with reported(d):
        d.record(mutation=mutation)
        call, arg, received = table[mutation](d, {**valid(d), "backend": "triton"})
        _expect_clear_error(d, lambda: fn(**call), arg, received)


def test_every_public_op_is_fuzzed():
    """A new public op (or a new optional argument of one) must get draws here too."""
    import vitkern.ops

    fuzzed = {"attention", "attention_packed", "patch_embed", "window_attention", "sr_attention",
              "patch_embed_layernorm"}  # the last is sr_attention's building block, drawn through it
    assert set(vitkern.ops.__all__) <= fuzzed, set(vitkern.ops.__all__) - fuzzed
    drawn = {
        attention: {"q", "k", "v", "scale", "attn_bias", "dropout_p", "is_causal", "backend"},
        attention_packed: {"qkv", "num_heads", "scale", "attn_bias", "dropout_p", "is_causal", "backend"},
        patch_embed: {"x", "weight", "bias", "cls_token", "prefix_tokens", "pos_embed", "pos_embed_covers_prefix",
                      "keep_indices", "backend"},
        window_attention: {"qkv", "rel_pos_bias_table", "num_heads", "window_size", "shift_size", "scale",
                           "qkv_bias", "mask_value", "dropout_p", "logit_scale", "backend"},
        sr_attention: {"x", "feat_size", "num_heads", "q_weight", "q_bias", "kv_weight", "kv_bias", "proj_weight",
                       "proj_bias", "sr_weight", "sr_bias", "norm_weight", "norm_bias", "sr_ratio", "linear_attn",
                       "norm_eps", "scale", "dropout_p", "backend"},
    }
    for fn, names in drawn.items():
        assert set(inspect.signature(fn).parameters) <= names, (fn.__name__, set(inspect.signature(fn).parameters)
                                                                 - names)


# --------------------------------------------------------------------------- #
# Offsets past 2^31 elements: one input and the upstream gradient with a huge batch stride
# --------------------------------------------------------------------------- #
def _huge_cases(d: Draw):
    """op -> (op, reference, inputs, output shape): small fp16 shapes, batch 3."""
    h = dict(dtype=torch.float16)
    window_kw = dict(num_heads=2, window_size=3, shift_size=1)
    sr_p = dict(q_weight=d.randn(16, 16, scale=0.25, **h), q_bias=d.randn(16, **h),
                kv_weight=d.randn(32, 16, scale=0.25, **h), kv_bias=d.randn(32, **h),
                proj_weight=d.randn(16, 16, scale=0.25, **h), proj_bias=d.randn(16, **h),
                sr_weight=d.randn(16, 16, 2, 2, scale=0.125, **h), sr_bias=d.randn(16, **h),
                norm_weight=d.randn(16, scale=0.2, offset=1.0, **h), norm_bias=d.randn(16, **h))
    return {
        "patch_embed": (lambda **kw: patch_embed(**kw, backend="triton"), patch_embed_reference,
                        {"x": huge_batch_stride(d.randn(3, 2, 8, 8, **h)), "weight": d.randn(16, 2, 4, 4, **h),
                         "bias": d.randn(16, **h), "cls_token": d.randn(1, 1, 16, **h),
                         "pos_embed": d.randn(1, 5, 16, **h)}, (3, 5, 16)),
        "attention": (lambda **kw: attention(**kw, backend="triton"), attention_reference,
                      {"q": d.randn(3, 2, 20, 16, **h), "k": huge_batch_stride(d.randn(3, 2, 24, 16, **h)),
                       "v": d.randn(3, 2, 24, 16, **h), "attn_bias": d.randn(3, 1, 20, 24, **h)}, (3, 2, 20, 16)),
        "attention_packed": (
            lambda qkv: attention_packed(qkv, 2, backend="triton"),
            lambda qkv: attention_reference(*qkv.reshape(3, 20, 3, 2, 16).permute(2, 0, 3, 1, 4))
            .transpose(1, 2).reshape(3, 20, 32),
            {"qkv": huge_batch_stride(d.randn(3, 20, 96, **h))}, (3, 20, 32)),
        "window_attention": (lambda **kw: window_attention(**kw, **window_kw, backend="triton"),
                             lambda **kw: window_attention_reference(**kw, **window_kw),
                             {"qkv": huge_batch_stride(d.randn(3, 5, 7, 48, **h)),
                              "rel_pos_bias_table": d.randn(25, 2, **h), "qkv_bias": d.randn(48, **h)}, (3, 5, 7, 16)),
        "sr_attention": (lambda x, **p: sr_attention(x, (6, 6), num_heads=2, sr_ratio=2, **p, backend="triton"),
                         lambda x, **p: sr_attention_reference(x, (6, 6), num_heads=2, sr_ratio=2, **p),
                         {"x": huge_batch_stride(d.randn(3, 36, 16, **h)), **sr_p}, (3, 36, 16)),
    }


@pytest.mark.parametrize("op", ["patch_embed", "attention", "attention_packed", "window_attention", "sr_attention"])
def test_offsets_past_int32_are_int64(op, request):
    """An int32 address wraps and reads (or writes) far outside the tensor, which can kill the process:
    each case runs in a child pytest, so a crash is this test's failure, with the child's report."""
    if os.environ.get("VITKERN_FUZZ_CHILD") != "1":
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                               cwd=request.config.rootpath, env={**os.environ, "VITKERN_FUZZ_CHILD": "1"},
                               capture_output=True, text=True, timeout=CASE_TIMEOUT_S + 60)
        report = child.stdout + child.stderr
        # A crash's faulthandler trace: keep the kernel and launcher frames, not pytest's.
        lines = [ln for ln in report.splitlines() if "Fatal Python" in ln or "vitkern" in ln or ln.startswith("E ")]
        assert child.returncode == 0, f"child exited with {child.returncode}:\n" + "\n".join(lines[-40:])
        return
    d = Draw(f"huge-{op}", 0)
    with reported(d):
        fn, reference, inputs, out_shape = _huge_cases(d)[op]
        grad_out = huge_batch_stride(d.randn(*out_shape, dtype=torch.float16))
        check_against_reference(d, fn, reference, inputs, {n: True for n in inputs}, grad_out, torch.float16)
