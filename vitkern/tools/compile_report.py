"""Compile every Triton kernel variant the launchers choose, for Hopper and Ampere, on a machine without a GPU.

    python -m vitkern.tools.compile_report --out DIR [--triton-label X] [--jobs N] [--set full|ci]

writes DIR/compile-triton<X>.md and .json (X defaults to the installed Triton's version).

How: the real ops run on CPU tensors with ``JITFunction.run`` replaced by a recorder, so no
kernel runs but every launch (kernel, arguments, constexprs, num_warps/num_stages) is captured
with the GPU tile settings (vitkern must be imported with TRITON_INTERPRET unset; the CLI
re-runs itself in a clean subprocess when it is set). Each launch is re-bound the way
``JITFunction.run`` binds it, for each target, so integer specialisation (== 1, % 16) is what
a GPU launch would see; the unique variants are compiled in parallel processes with a fresh
TRITON_CACHE_DIR (nothing reused between runs) and TRITON_DUMP_PTXAS_LOG=1, from whose log the
registers, spill bytes and warnings are read. Shared memory comes from the compiled metadata,
tensor-core use from the TTGIR (a ``tt.dot`` left on a blocked layout runs on FMA units) and
the PTX (``wgmma.mma_async`` = HGMMA on sm_90a, ``mma.sync`` = HMMA).

What this cannot tell: speed, races, or wrong results on hardware.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# Per-block shared-memory limits (opt-in maximum) and the ptxas architecture name of each target.
TARGETS: Dict[int, Tuple[str, int]] = {90: ("sm_90a", 232448), 80: ("sm_80", 166912)}
FP32_SPILL_LIMIT = 64  # bytes per thread (the larger of spill stores and loads) an fp32 kernel may spill; 16-bit: none
SIXTEEN_BIT = ("float16", "bfloat16")


def nvidia_backend_available() -> bool:
    """Triton with its NVIDIA backend (and so its bundled ptxas): what compiling for sm_90a/sm_80 needs."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:  # noqa: BLE001 - no Triton, or a build without the NVIDIA backend
        return False
    return True


# --------------------------------------------------------------------------- #
# Recording launches
# --------------------------------------------------------------------------- #
class Launch:
    """One kernel launch as the launcher made it: the JITFunction, its arguments and launch options."""

    def __init__(self, kernel, args, kwargs, case: str, dtype: str):
        self.kernel, self.args, self.kwargs, self.case, self.dtype = kernel, args, kwargs, case, dtype


@contextlib.contextmanager
def recording():
    """Replace ``JITFunction.run`` by a recorder (nothing runs) and let the Triton backend take CPU tensors."""
    from triton.runtime import jit

    from vitkern import _triton, backends

    if _triton.INTERPRET:
        raise RuntimeError("vitkern was imported with TRITON_INTERPRET=1, so its launchers pick the interpreter's "
                           "tiles; record in a process where TRITON_INTERPRET is unset")
    launches: List[Tuple] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs)))
        return None

    saved_run, saved_reason = jit.JITFunction.run, backends.triton_reason
    jit.JITFunction.run = record
    backends.triton_reason = lambda tensors, dtype: None
    try:
        yield launches
    finally:
        jit.JITFunction.run, backends.triton_reason = saved_run, saved_reason


def record_cases(cases: Iterable[Tuple[str, str, Callable[[], None]]]) -> List[Launch]:
    out: List[Launch] = []
    for label, dtype, thunk in cases:
        with recording() as launches:
            thunk()
        out += [Launch(k, a, kw, label, dtype) for k, a, kw in launches]
    return out


# --------------------------------------------------------------------------- #
# The shape set: benchmark grids and every flag the ops take
# --------------------------------------------------------------------------- #
ATTN_HEAD_DIMS = (32, 64, 80, 96, 128)
WINDOWS = (7, 8, 12, 16)


def _dtypes():
    import torch
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _attention_case(B, H, NQ, NK, d, dtype, bias: Optional[str], dropout: float, packed: bool):
    import torch

    from vitkern.ops import attention, attention_packed

    def run():
        if packed:
            qkv = torch.randn(B, NQ, 3 * H * d, dtype=dtype, requires_grad=True)
            bias_t = _bias(bias, B, H, NQ, NQ, dtype)
            out = attention_packed(qkv, H, attn_bias=bias_t, dropout_p=dropout, backend="triton")
        else:
            q = torch.randn(B, H, NQ, d, dtype=dtype, requires_grad=True)
            k = torch.randn(B, H, NK, d, dtype=dtype, requires_grad=True)
            v = torch.randn(B, H, NK, d, dtype=dtype, requires_grad=True)
            bias_t = _bias(bias, B, H, NQ, NK, dtype)
            out = attention(q, k, v, attn_bias=bias_t, dropout_p=dropout, backend="triton")
        out.sum().backward()
    return run


def _bias(kind: Optional[str], B, H, NQ, NK, dtype):
    import torch
    if kind is None:
        return None
    shape = {"full": (B, H, NQ, NK), "heads": (1, H, NQ, NK), "batch": (B, 1, NQ, NK)}[kind]
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def _window_case(B, grid, C, heads, window, shift, dtype, qkv_bias: bool, cosine: bool = False):
    import torch

    from vitkern.ops import window_attention

    def run():
        qkv = torch.randn(B, grid, grid, 3 * C, dtype=dtype, requires_grad=True)
        table = torch.randn((2 * window - 1) ** 2, heads, dtype=dtype, requires_grad=True)
        bias = torch.randn(3 * C, dtype=dtype, requires_grad=True) if qkv_bias else None
        logit_scale = torch.randn(heads, requires_grad=True) if cosine else None  # Swin V2
        out = window_attention(qkv, table, num_heads=heads, window_size=window, shift_size=shift, qkv_bias=bias,
                               logit_scale=logit_scale, backend="triton")
        out.float().sum().backward()
    return run


def _patch_case(B, C, H, W, P, D, dtype, cls_pos: bool, bias: bool = True, need_dx: bool = True, *,
                prefix: int = 1, per_image: bool = False, covers: bool = True, kept: Optional[int] = None):
    """With ``cls_pos``: ``prefix`` prefix rows (shared, or ``per_image``) and a pos_embed over every row
    (``covers``) or the patch rows only; ``kept`` patches per image (MAE), or all."""
    import torch

    from vitkern.ops import patch_embed

    def run():
        x = torch.randn(B, C, H, W, dtype=dtype, requires_grad=need_dx)
        w = torch.randn(D, C, P, P, dtype=dtype, requires_grad=True)
        b = torch.randn(D, dtype=dtype, requires_grad=True) if bias else None
        n = (H // P) * (W // P)
        pre = torch.randn(B if per_image else 1, prefix, D, dtype=dtype, requires_grad=True) if cls_pos else None
        pos = torch.randn(1, n + (prefix if covers else 0), D, dtype=dtype, requires_grad=True) if cls_pos else None
        keep = torch.stack([torch.randperm(n)[:kept] for _ in range(B)]) if kept is not None else None
        patch_embed(x, w, b, prefix_tokens=pre, pos_embed=pos, pos_embed_covers_prefix=covers, keep_indices=keep,
                    backend="triton").float().sum().backward()
    return run


def _pvt_case(B, H, W, C, heads, sr, linear, dtype):
    import torch

    from vitkern.ops import sr_attention

    def run():
        r = 1 if linear else sr
        t = lambda *s: (torch.randn(*s, dtype=dtype) * 0.02).requires_grad_(True)  # noqa: E731
        x = t(B, H * W, C)
        kw = dict(q_weight=t(C, C), q_bias=t(C), kv_weight=t(2 * C, C), kv_bias=t(2 * C), proj_weight=t(C, C),
                  proj_bias=t(C))
        if linear or sr > 1:
            kw.update(sr_weight=t(C, C, r, r), sr_bias=t(C), norm_weight=t(C), norm_bias=t(C))
        out = sr_attention(x, (H, W), num_heads=heads, sr_ratio=sr, linear_attn=linear, backend="triton", **kw)
        out.float().sum().backward()
    return run


def _rows(hw: int, sr: int) -> int:
    """A batch that gives PVT's reduction GEMM >= 128 rows (B x (hw/sr)^2): its tiles fit the rows,
    and the benchmark batch (128) has far more than 128."""
    return max(1, -(-128 // max(1, (hw // sr) ** 2)))


def cases(which: str = "full") -> List[Tuple[str, str, Callable[[], None]]]:
    """(label, dtype name, thunk), benchmark shapes first. Batches are tiny: a variant depends on N, d,
    window and flags, not on B.

    "full": the benchmark grids (bf16), and per op every dtype with no flag and with all flags on
    (the most live state: bias tile, dropout bits, shift masks, padding); bf16 over every head dim
    32/64/80/96/128 (fp32: 64/80/128) and window 7/8/12/16 (fp32: 7/12), each flag alone at d64.
    "ci": every kernel and every tile class the launchers pick (head dim <= 64 / > 64, window
    tiles 64 and 16, 16-bit / fp32 where fp32 is the tighter fit: attention d128, window 7),
    small enough to compile for two targets within CI's time.
    fp16 compiles to the same code as bf16 but for the conversions, so it is covered once per op.
    """
    full = which == "full"
    dt = _dtypes()
    out = []
    bf16 = dt["bfloat16"]
    heavy, plain = ("heads", 0.1), (None, 0.0)

    def attn(d, name, flags, n=197, packed=False, tag="attn"):
        bias, p = flags
        return (f"{tag} N{n} d{d} {'packed' if packed else 'heads'} bias={bias or '-'} dropout={p}", name,
                _attention_case(1 if bias != "full" else 2, 2, n, n, d, dt[name], bias, p, packed))

    # Global attention: ViT-B grid (d=64) and ViT-H (d=80), bf16, packed layout as the module uses.
    for n in ([197, 577, 1025, 50, 145, 257] if full else [197]):
        out.append(attn(64, "bfloat16", plain, n, packed=True, tag="attn vitb"))
    for n in ([257, 577] if full else []):
        out.append(attn(80, "bfloat16", plain, n, packed=True, tag="attn vith"))
    for d in (ATTN_HEAD_DIMS if full else (64, 128)):
        for name in (("bfloat16", "float32") if d in ((64, 80, 128) if full else (128,)) else ("bfloat16",)):
            for flags in (plain, heavy):
                out.append(attn(d, name, flags))
    if full:
        for flags in (("heads", 0.0), (None, 0.1), ("full", 0.0)):
            out.append(attn(64, "bfloat16", flags))
    if full:
        out += [attn(64, "float16", plain), attn(64, "float16", heavy)]

    # Swin: benchmark stages (window 7 and 12, shifted unless the grid is one window: timm's rule).
    swin = [(56, 96, 3, 7), (28, 192, 6, 7), (14, 384, 12, 7), (7, 768, 24, 7), (96, 128, 4, 12),
            (48, 256, 8, 12), (24, 512, 16, 12), (12, 1024, 32, 12)]
    for grid, C, heads, win in (swin if full else []):
        shift = win // 2 if grid > win else 0
        out.append((f"swin grid{grid} C{C} w{win} shift{shift}", "bfloat16",
                    _window_case(1, grid, C, heads, win, shift, bf16, False)))

    def win(w, shift, name, qkv_bias=True, cosine=False):  # a grid not a multiple of the window: padding tokens
        return (f"swin{'v2 cosine' if cosine else ''} w{w} shift{shift} padded qkv_bias={int(qkv_bias)} d32", name,
                _window_case(1, 2 * w + 3, 64, 2, w, shift, dt[name], qkv_bias, cosine))

    for w in (WINDOWS if full else (7, 12)):
        for shift in ((0, w // 2) if full else (w // 2,)):
            out.append(win(w, shift, "bfloat16"))
        if w in ((7, 12) if full else (7,)):
            out.append(win(w, w // 2, "float32"))
    if full:
        out.append(win(7, 3, "float16"))
    # Swin V2's cosine attention (the COSINE kernels): both window tile classes, 16-bit and fp32.
    for w in (WINDOWS if full else (7, 12)):
        out.append(win(w, w // 2, "bfloat16", cosine=True))
    out.append(win(7, 3, "float32", cosine=True))
    if full:
        out.append(win(8, 4, "float16", cosine=True))
        for grid, C, heads in ((64, 96, 3), (32, 192, 6), (16, 384, 12), (8, 768, 24)):  # Swin-V2-T 256, window 8
            out.append((f"swinv2 grid{grid} C{C} w8 shift{4 if grid > 8 else 0} cosine", "bfloat16",
                        _window_case(1, grid, C, heads, 8, 4 if grid > 8 else 0, bf16, True, cosine=True)))

    # Patchify: ViT-B p16/p32 at 224/384/512 with CLS + pos, Swin's p4 stem.
    pe = [(224, 16), (384, 16), (512, 16), (224, 32), (384, 32), (512, 32)] if full else [(224, 16)]
    for res, p in pe:
        out.append((f"patch vitb p{p} {res}", "bfloat16", _patch_case(1, 3, res, res, p, 768, bf16, True)))
    # MAE's masked patchify (49 of 196 patches kept) and a multi-token prefix (CLS + 4 registers, per image,
    # pos_embed over the patch rows only: timm's no_embed_class); 16-bit, plus fp32 in the full set.
    for name in (("bfloat16", "float32") if full else ("bfloat16",)):
        out.append(("patch mae p16 224 keep49", name, _patch_case(2, 3, 224, 224, 16, 768, dt[name], True, kept=49)))
        out.append(("patch vitb p16 224 prefix5", name, _patch_case(2, 3, 224, 224, 16, 768, dt[name], True, prefix=5,
                                                                    per_image=True, covers=False)))
    for name in (dt if full else ["float32"]):
        out.append(("patch swin stem p4 224", name, _patch_case(1, 3, 224, 224, 4, 96, dt[name], False)))
        if name != "bfloat16" and full:
            out.append(("patch vitb p16 224", name, _patch_case(1, 3, 224, 224, 16, 768, dt[name], True)))

    # PVTv2-b2: the four stages at 224 (spatial reduction 8/4/2/1), stage 1 at 512, the linear variant.
    pvt = [(56, 64, 1, 8), (28, 128, 2, 4), (14, 320, 5, 2), (7, 512, 8, 1)]
    for hw, C, heads, sr in (pvt if full else pvt[:1]):
        out.append((f"pvt b2 sr{sr} {hw}x{hw} C{C}", "bfloat16",
                    _pvt_case(_rows(hw, sr), hw, hw, C, heads, sr, False, bf16)))
    if full:
        out.append(("pvt b2 sr8 128x128 C64", "bfloat16", _pvt_case(1, 128, 128, 64, 1, 8, False, bf16)))
        out.append(("pvt b2_li 56x56 C64", "bfloat16", _pvt_case(3, 56, 56, 64, 1, 8, True, bf16)))
    for name in (("float32", "float16") if full else ()):
        out.append(("pvt b2 sr8 56x56 C64", name, _pvt_case(_rows(56, 8), 56, 56, 64, 1, 8, False, dt[name])))
    return out


# --------------------------------------------------------------------------- #
# Binding (as JITFunction.run does) and de-duplication
# --------------------------------------------------------------------------- #
def _bind(launch: Launch, arch: int) -> dict:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = [p.name for p in fn.params]
    named = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    config = {k: v for k, v in named.items() if k.startswith("BLOCK") or k == "N_PAD"}
    config.update(num_warps=options.num_warps, num_stages=options.num_stages)
    flags = {k: v for k, v in named.items() if k.isupper() and k not in config}
    return dict(kernel=fn.fn.__qualname__, module=fn.fn.__module__, arch=arch, target=TARGETS[arch][0],
                signature=signature, constexprs=constexprs, attrs=attrs, options=dict(options.__dict__),
                config=config, flags=flags)


def _variant_key(job: dict, exact: bool) -> str:
    """Kernel, target, argument types, constexprs and options; with ``exact``, also the integer
    specialisation (== 1 / % 16 of sizes and strides), which changes vectorisation but not tiles."""
    attrs = sorted(job["attrs"].items()) if exact else None
    return repr((job["module"], job["kernel"], job["arch"], sorted(job["signature"].items()),
                 sorted(job["constexprs"].items()), attrs, sorted(job["options"].items())))


def variants(launches: Sequence[Launch], archs: Sequence[int], exact: bool = False) -> List[dict]:
    """Unique variants with the cases that launch each. Without ``exact`` the first launch's
    integer specialisation stands for the others (cases() lists the benchmark shapes first)."""
    seen: Dict[str, dict] = {}
    for launch in launches:
        for arch in archs:
            job = _bind(launch, arch)
            entry = seen.setdefault(_variant_key(job, exact), dict(job, cases=[], dtypes=[]))
            if launch.case not in entry["cases"]:
                entry["cases"].append(launch.case)
            if launch.dtype not in entry["dtypes"]:
                entry["dtypes"].append(launch.dtype)
    return list(seen.values())


# --------------------------------------------------------------------------- #
# Compiling one variant (in a worker process)
# --------------------------------------------------------------------------- #
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _dot_counts(ttir: str, ttgir: str, ptx: str) -> dict:
    dots = len(re.findall(r"= tt\.dot ", ttir))
    # On sm_80 a tensor-core dot stays a tt.dot on an #mma layout, on sm_90a it becomes
    # ttng.warp_group_dot; a tt.dot whose result is on a #blocked layout runs on FMA units.
    fma = sum(1 for line in ttgir.splitlines()
              if re.search(r"= tt\.dot ", line) and re.search(r"->\s*tensor<[^>]*#blocked", line))
    return dict(dots=dots, fma_dots=fma, wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync\.aligned", ptx)))


def compile_variant(job: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    if job.get("cache"):  # a folder of its own: a hit would skip ptxas and so its log (read per use)
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=job["cache"])
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    log = io.StringIO()
    start = time.perf_counter()
    result = dict(ok=False, error=None, registers=None, spill_stores=None, spill_loads=None, shared=None,
                  dots=None, fma_dots=None, wgmma=None, mma_sync=None, warnings=[])
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        result.update(ok=True, shared=int(compiled.metadata.shared))
        result.update(_dot_counts(compiled.asm["ttir"], compiled.asm["ttgir"], compiled.asm["ptx"]))
    except Exception as exc:  # noqa: BLE001 - the report records it
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    text = log.getvalue()
    if (m := _SPILL.search(text)):
        result.update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
    if (m := _REGS.search(text)):
        result["registers"] = int(m.group(1))
    result["warnings"] = sorted({line.strip() for line in text.splitlines() if "warning" in line.lower()})
    result["compile_s"] = round(time.perf_counter() - start, 2)
    return result


def problems(row: dict) -> List[str]:
    """Why a compiled variant would fail on its target (empty when it is fine)."""
    out = []
    if not row["ok"]:
        return [f"compile error: {row['error']}"]
    limit = TARGETS[row["arch"]][1]
    if row["shared"] > limit:
        out.append(f"shared memory {row['shared']} B > {limit} B per block on {row['target']}")
    spill = max(row["spill_stores"] or 0, row["spill_loads"] or 0)
    if row["spill_stores"] is None:
        out.append("no ptxas register/spill figures in the log")
    elif any(d in SIXTEEN_BIT for d in row["dtypes"]) and spill:
        out.append(f"spills {row['spill_stores']}/{row['spill_loads']} B (stores/loads) in a 16-bit kernel")
    elif spill > FP32_SPILL_LIMIT:
        out.append(f"spills {row['spill_stores']}/{row['spill_loads']} B (stores/loads) > {FP32_SPILL_LIMIT} B")
    if row["dots"] and (row["fma_dots"] or not (row["wgmma"] or row["mma_sync"])):
        out.append(f"{row['fma_dots'] or row['dots']} of {row['dots']} tl.dot not on tensor cores")
    return out


def compile_all(jobs: List[dict], workers: int, cache_dir: Optional[str] = None) -> List[dict]:
    """Compile in ``workers`` fresh processes with a fresh, deleted-afterwards Triton cache, or into
    ``cache_dir`` (kept: the tuner's later GPU launches then find their kernels compiled; a variant
    already there has no ptxas log, so no register and spill figures)."""
    cache = cache_dir or tempfile.mkdtemp(prefix="vitkern-compile-report-")
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG", "TRITON_INTERPRET")}
    os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        # Slowest kernels first so the pool's tail is short.
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i]["config"].get("num_warps", 4))
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            todo = [dict(jobs[i], cache=None if cache_dir else cache) for i in order]
            results = dict(zip(order, pool.map(compile_variant, todo)))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for i, job in enumerate(jobs):
        row = {k: job[k] for k in ("kernel", "module", "arch", "target", "config", "flags", "cases", "dtypes")}
        row["index"] = i  # position in ``jobs`` (rows come back sorted)
        row["signature"] = ",".join(job["signature"].values())
        row["specialisation"] = {str(p[0]): a for p, a in job["attrs"].items() if a}
        row.update(results[i])
        row["problems"] = problems(row)
        rows.append(row)
    rows.sort(key=lambda r: (r["module"], r["kernel"], r["arch"], json.dumps(r["flags"], sort_keys=True),
                             json.dumps(r["config"], sort_keys=True), r["signature"]))
    return rows


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #
def _fmt_flags(d: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in d.items()) or "-"


def _fmt_config(c: dict) -> str:
    blocks = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK") or k == "N_PAD")
    return f"{blocks} w{c['num_warps']} s{c['num_stages']}"


def markdown(rows: List[dict], meta: dict) -> str:
    bad = [r for r in rows if r["problems"]]
    lines = [f"# Compile report: Triton {meta['triton']} (sm_90a, sm_80)", "",
             f"Generated by `python -m vitkern.tools.compile_report` ({meta['set']} shape set): "
             f"{meta['launches']} recorded launches, {len(rows)} unique variants "
             f"({meta['kernels']} kernels), compiled in {meta['wall_s']} s with {meta['jobs']} processes; "
             f"torch {meta['torch']}.", "",
             "Limits checked: no compile error; shared memory <= 232448 B (sm_90a) / 166912 B (sm_80) per block; "
             f"no spill in a kernel launched for fp16/bf16, <= {FP32_SPILL_LIMIT} B for fp32; every tl.dot on "
             "tensor cores (PTX `wgmma.mma_async` = HGMMA, `mma.sync` = HMMA).", "",
             f"**Variants with a problem: {len(bad)}**", ""]
    for r in bad:
        lines.append(f"- `{r['kernel']}` {r['target']} {_fmt_flags(r['flags'])} {_fmt_config(r['config'])} "
                     f"({', '.join(r['dtypes'])}): {'; '.join(r['problems'])}")
    lines += ["", "| kernel | target | dtypes | flags | tiles, warps, stages | ok | regs | spill st/ld B | smem B "
              "| dots | wgmma | mma.sync | ptxas warnings |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        warn = "; ".join(re.sub(r"\s+", " ", w)[:120] for w in r["warnings"]) or ""
        ok = "ok" if r["ok"] else f"ERROR {r['error'][:80]}"
        spill = f"{r['spill_stores']}/{r['spill_loads']}" if r["spill_stores"] is not None else "?"
        lines.append(f"| {r['kernel']} | {r['target']} | {','.join(d.replace('float', 'f') for d in r['dtypes'])} "
                     f"| {_fmt_flags(r['flags'])} | {_fmt_config(r['config'])} | {ok} | {r['registers']} | {spill} "
                     f"| {r['shared']} | {r['dots']} | {r['wgmma']} | {r['mma_sync']} | {warn} |")
    lines.append("")
    return "\n".join(lines)


def build_report(which: str = "full", jobs: Optional[int] = None, archs: Sequence[int] = (90, 80),
                 only: Optional[str] = None, kernel: Optional[str] = None) -> Tuple[List[dict], dict]:
    """Record, de-duplicate and compile. ``only`` / ``kernel``: regular expressions that keep the
    cases whose label, and the kernels whose name, they match (for quick looks; reports use neither)."""
    import torch
    import triton

    start = time.perf_counter()
    launches = record_cases([c for c in cases(which) if only is None or re.search(only, f"{c[0]} {c[1]}")])
    todo = [v for v in variants(launches, archs) if kernel is None or re.search(kernel, v["kernel"])]
    workers = jobs or os.cpu_count() or 1
    rows = compile_all(todo, workers)
    meta = dict(triton=triton.__version__, torch=torch.__version__, set=which, launches=len(launches),
                kernels=len({r["kernel"] for r in rows}), variants=len(rows), jobs=workers,
                wall_s=round(time.perf_counter() - start, 1),
                problems=sum(1 for r in rows if r["problems"]))
    return rows, meta


def write(out_dir: str, label: str, rows: List[dict], meta: dict) -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"compile-triton{label}.md")
    json_path = os.path.join(out_dir, f"compile-triton{label}.json")
    with open(md_path, "w") as f:
        f.write(markdown(rows, meta))
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, variants=rows), f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    return md_path, json_path


def _clean_env_rerun(argv: Sequence[str]) -> int:
    """vitkern decides interpreter or GPU tiles at import: rerun in a process without TRITON_INTERPRET."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.call([sys.executable, "-m", "vitkern.tools.compile_report", *argv], env=env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vitkern.tools.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for compile-triton<label>.md and .json")
    parser.add_argument("--triton-label", default=None, help="label in the file names (default: Triton's version)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--set", choices=("full", "ci"), default="full",
                        help="full: every benchmark shape and flag combination; ci: a smaller set, same kernels")
    parser.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    parser.add_argument("--only", default=None, help="regex: keep only the cases whose 'label dtype' matches")
    parser.add_argument("--kernel", default=None, help="regex: keep only the kernels whose name matches")
    parser.add_argument("--check", action="store_true", help="exit 1 when a variant has a problem")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or "vitkern" in sys.modules and _imported_interpreting():
        return _clean_env_rerun(argv)
    import triton
    rows, meta = build_report(args.set, args.jobs, [int(a) for a in args.arch.split(",")], args.only, args.kernel)
    meta.update(only=args.only, kernel=args.kernel)
    md_path, json_path = write(args.out, args.triton_label or triton.__version__, rows, meta)
    print(f"{meta['variants']} variants of {meta['kernels']} kernels from {meta['launches']} launches in "
          f"{meta['wall_s']} s; {meta['problems']} with a problem -> {md_path}, {json_path}")
    for r in rows:
        for p in r["problems"]:
            print(f"  {r['kernel']} {r['target']} {_fmt_flags(r['flags'])} {_fmt_config(r['config'])}: {p}")
    return 1 if args.check and meta["problems"] else 0


def _imported_interpreting() -> bool:
    from vitkern import _triton
    return _triton.INTERPRET


if __name__ == "__main__":
    sys.exit(main())
