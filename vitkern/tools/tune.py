"""Tune the launch configs of vitkern's kernels for this GPU; on a machine without one, show what would be timed.

    python -m vitkern.tools.tune --out vitkern/configs/<gpu-slug>.json [--budget-s SECONDS] [--groups G,..]

The kernel groups (keys of the table, :data:`CANDIDATES`): attention (``attention.fwd``, ``.bwd`` for
dQ and dK/dV, ``.dbias``), window attention (``window_attention.fwd``, ``.bwd`` for dQ and dK/dV,
``.dscore`` for the d(score) sum of the table gradient) and patchify (``patch_embed.fwd``,
``.fwd_norm`` with the LayerNorm epilogue, ``.dx``, ``.dw``). A shape class is what decides the tiles:
dtype, head dim, bias, dropout for attention; dtype, window tokens, head dim, shift for windows;
dtype, D and K = C*Ph*Pw for patchify (M is the batch's: timed at the benchmark batch).

Per group a small candidate space (block sizes, warps, stages) is first compiled ahead of time for
the target by :mod:`vitkern.tools.compile_report`, through the real launchers reading a one-entry
table; candidates that fail to compile, spill (any spill in 16-bit kernels, > 64 B in fp32 ones) or
exceed shared memory are dropped. On a GPU the survivors are timed at the benchmark shapes (CUDA
events, median, inputs rotated between calls so no call reads the previous one's data from L2) and
the fastest per shape class is written to ``--out``, which the launchers read (:mod:`vitkern.configs`);
the heuristics stay the fallback for GPUs and shape classes without an entry. Groups are compiled
and timed one after another in the order of :data:`CANDIDATES` (benchmark importance); when
``--budget-s`` is spent the run stops and writes what it has. Without a GPU it prints the surviving
candidates with their compile figures and exits 0.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple


def _grid(**axes) -> List[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


# kernel group (a vitkern.configs key prefix) -> candidate launch settings. The order is the timing
# order on a GPU (benchmark importance): a spent --budget-s cuts the later groups.
CANDIDATES: Dict[str, List[dict]] = {
    "attention.fwd": _grid(BLOCK_M=(64, 128), BLOCK_N=(32, 64), num_warps=(4, 8), num_stages=(2, 3)),
    "attention.bwd": _grid(BLOCK_M=(32, 64), BLOCK_N=(32, 64), num_warps=(4, 8), num_stages=(1, 2)),
    "window_attention.fwd": _grid(BLOCK_M=(64, 32), BLOCK_N=(64, 32), num_warps=(8, 4), num_stages=(2, 1)),
    "window_attention.bwd": _grid(BLOCK_M=(64, 32), BLOCK_N=(64, 32), num_warps=(8, 4), num_stages=(2, 1)),
    "patch_embed.fwd": _grid(BLOCK_M=(128, 64), BLOCK_N=(128, 64), BLOCK_K=(64, 32), num_warps=(8, 4),
                             num_stages=(3,)),
    "patch_embed.dx": _grid(BLOCK_M=(128, 64), BLOCK_N=(64, 32), BLOCK_K=(64, 32), num_warps=(8, 4), num_stages=(2,)),
    "patch_embed.dw": _grid(BLOCK_M=(128, 64), BLOCK_N=(64, 32), BLOCK_K=(64, 32), num_warps=(8, 4), num_stages=(2,)),
    "attention.dbias": _grid(BLOCK_M=(16, 32), BLOCK_N=(64,), num_warps=(4, 8), num_stages=(1,)),
    "window_attention.dscore": _grid(BLOCK_M=(32, 16), BLOCK_N=(32, 64), num_warps=(4, 8), num_stages=(2, 1)),
    # BLOCK_N is the whole row (the LayerNorm statistics): the launcher keeps it, entries omit it.
    "patch_embed.fwd_norm": _grid(BLOCK_M=(64, 32), BLOCK_K=(64, 32), num_warps=(8, 4), num_stages=(2, 3)),
}

# Shape classes of the benchmark grids: (dtype, head dim, bias, dropout) and the (B, heads, N) timed.
SHAPES: List[Tuple[str, int, bool, bool, Tuple[int, int, int]]] = [
    ("bfloat16", 64, False, False, (256, 12, 197)),  # ViT-B/16 224; also PVTv2 (d = 64 in every stage)
    ("bfloat16", 80, False, False, (128, 16, 257)),  # ViT-H/14 224
    ("bfloat16", 64, True, False, (64, 12, 197)),  # ViT-B/16 with a learned (1, h, N, N) bias: d(bias) too
]
# Swin cases of benchmarks/bench_window_attention.py: (dtype, batch, grid, C, heads, window, shift).
WINDOW_SHAPES = [
    ("bfloat16", 128, 56, 96, 3, 7, 3),  # Swin-T 224 stage 1 (the shifted block; d = 32 in every Swin stage)
    ("bfloat16", 128, 7, 768, 24, 7, 0),  # Swin-T 224 stage 4: one window, no shift
    ("bfloat16", 128, 96, 128, 4, 12, 6),  # Swin-B 384 stage 1: window 12
]
# Patchify cases of benchmarks/bench_patch_embed.py: (dtype, batch, C, resolution, patch, D, CLS + pos).
PATCH_SHAPES = [
    ("bfloat16", 256, 3, 224, 16, 768, True),  # ViT-B/16 224
    ("bfloat16", 256, 3, 224, 4, 96, False),  # Swin stem
]
NORM_SHAPES = [("bfloat16", 128, 3, 224, 4, 96, False)]  # the Swin stem with its LayerNorm epilogue
KERNELS_OF = {"attention.fwd": ("_attn_fwd_kernel",),
              "attention.bwd": ("_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"),
              "attention.dbias": ("_attn_bwd_dbias_kernel",),
              "window_attention.fwd": ("_win_fwd_kernel",),
              "window_attention.bwd": ("_win_bwd_dq_kernel", "_win_bwd_dkdv_kernel"),
              "window_attention.dscore": ("_win_bwd_dscore_sum_kernel",),
              "patch_embed.fwd": ("_patch_embed_fwd_kernel",),
              "patch_embed.fwd_norm": ("_patch_embed_fwd_kernel",),
              "patch_embed.dx": ("_patch_embed_dx_kernel",),
              "patch_embed.dw": ("_patch_embed_dw_kernel",)}
TIMED = {"attention.fwd": "fwd", "window_attention.fwd": "fwd", "patch_embed.fwd": "fwd",
         "patch_embed.fwd_norm": "fwd", "patch_embed.dx": "fwd + dx", "patch_embed.dw": "fwd + dW"}


def shape_class(dtype: str, d: int, bias: bool, dropout: bool) -> str:
    return f"{dtype}|d{d}|bias{int(bias)}|dropout{int(dropout)}"


def _rotated(make, device: str):
    """Three input sets on a GPU, used in turn, so no call reads the last one's inputs from L2."""
    return [make() for _ in range(3 if device == "cuda" else 1)]


def _cycle(sets, step):
    state = {"i": 0}

    def call():
        step(*sets[state["i"] % len(sets)])
        state["i"] += 1
    return call


def _run(dtype: str, d: int, bias: bool, dropout: bool, bhn: Tuple[int, int, int], device: str, backward: bool):
    """A thunk that runs the op at this shape: forward, or forward + backward."""
    import torch

    from vitkern.ops import attention

    B, H, N = bhn
    dt = getattr(torch, dtype)

    def make():
        q, k, v = (torch.randn(B, H, N, d, device=device, dtype=dt, requires_grad=backward) for _ in range(3))
        b = torch.randn(1, H, N, N, device=device, dtype=dt, requires_grad=backward) if bias else None
        return q, k, v, b

    def step(q, k, v, b):
        out = attention(q, k, v, attn_bias=b, dropout_p=0.1 if dropout else 0.0, backend="triton")
        if backward:
            out.backward(torch.ones_like(out))
    return _cycle(_rotated(make, device), step)


def _run_window(dtype, B, grid, C, heads, window, shift, device: str, mode: str):
    """Swin window attention (qkv bias, relative-position table): forward; "bwd" adds dqkv, "dscore"
    d(table) too."""
    import torch

    from vitkern.ops import window_attention

    dt = getattr(torch, dtype)

    def make():
        qkv = torch.randn(B, grid, grid, 3 * C, device=device, dtype=dt, requires_grad=mode != "fwd")
        table = torch.randn((2 * window - 1) ** 2, heads, device=device, dtype=dt, requires_grad=mode == "dscore")
        return qkv, table, torch.randn(3 * C, device=device, dtype=dt)

    def step(qkv, table, qkv_bias):
        out = window_attention(qkv, table, num_heads=heads, window_size=window, shift_size=shift,
                               qkv_bias=qkv_bias, backend="triton")
        if mode != "fwd":
            out.backward(torch.ones_like(out))
    return _cycle(_rotated(make, device), step)


def _run_patch(dtype, B, C, res, P, D, cls_pos, device: str, mode: str, width: Optional[int] = None):
    """Patchify: forward ("fwd", "fwd_norm": with the LayerNorm epilogue), or forward + dx / dW."""
    import torch

    from vitkern.ops import patch_embed, patch_embed_layernorm

    dt = getattr(torch, dtype)
    width = width or res
    tokens = 1 + (res // P) * (width // P)

    def make():
        x = torch.randn(B, C, res, width, device=device, dtype=dt, requires_grad=mode == "dx")
        w = torch.randn(D, C, P, P, device=device, dtype=dt, requires_grad=mode == "dw")
        b = torch.randn(D, device=device, dtype=dt)
        cls = torch.randn(1, 1, D, device=device, dtype=dt) if cls_pos else None
        pos = torch.randn(1, tokens, D, device=device, dtype=dt) if cls_pos else None
        return x, w, b, cls, pos

    def step(x, w, b, cls, pos):
        if mode == "fwd_norm":
            ones = torch.ones(D, device=device, dtype=dt)
            patch_embed_layernorm(x, w, b, ones, torch.zeros_like(ones))
            return
        out = patch_embed(x, w, b, cls_token=cls, pos_embed=pos, backend="triton")
        if mode in ("dx", "dw"):
            out.backward(torch.ones_like(out))
    return _cycle(_rotated(make, device), step)


def cases(group: str):
    """[(shape class, run(device, tiny) -> thunk)] of a group: tiny is the CPU filter's recording,
    one image with the benchmark case's constexprs (window, head dim, shift; D, K, patch)."""
    family, kernel = group.split(".")
    out = []
    if family == "attention":
        for dtype, d, bias, dropout, bhn in SHAPES:
            if kernel == "dbias" and not bias:
                continue
            run = (lambda dt, d_, b_, p_, s_: lambda device, tiny: _run(
                dt, d_, b_, p_, (1, 2, s_[2]) if tiny else s_, device, kernel != "fwd"))(dtype, d, bias, dropout, bhn)
            out.append((shape_class(dtype, d, bias, dropout), run))
    elif family == "window_attention":
        from vitkern.ops.window_attention import _shape_class as window_class
        for dtype, B, grid, C, heads, window, shift in WINDOW_SHAPES:
            d = C // heads
            cls = window_class(getattr(__import__("torch"), dtype), window * window, d, bool(shift))
            run = (lambda dt, B_, g_, h_, d_, w_, s_: lambda device, tiny: _run_window(
                dt, 1 if tiny else B_, min(g_, 2 * w_) if tiny else g_, d_ if tiny else h_ * d_, 1 if tiny else h_,
                w_, s_, device, kernel))(dtype, B, grid, heads, d, window, shift)
            out.append((cls, run))
    else:
        for dtype, B, C, res, P, D, cls_pos in (NORM_SHAPES if kernel == "fwd_norm" else PATCH_SHAPES):
            run = (lambda dt, B_, C_, r_, P_, D_, c_: lambda device, tiny: _run_patch(
                dt, 1 if tiny else B_, C_, P_ if tiny else r_, P_, D_, c_, device, kernel,
                2 * P_ if tiny else None))(dtype, B, C, res, P, D, cls_pos)
            out.append((f"{dtype}|D{D}|K{C * P * P}", run))
    return out


class _Table:
    """A one-entry config table in a temporary file, so the real launchers pick the candidate."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(suffix=".json", prefix="vitkern-tune-")
        os.close(fd)

    def set(self, key: str, cfg: dict):
        with open(self.path, "w") as f:
            json.dump({"entries": {key: cfg}}, f)
        os.utime(self.path, (time.time(), time.time() + len(key) * 1e-3))  # a new mtime: no stale cache
        os.environ["VITKERN_CONFIG_TABLE"] = self.path


def filter_candidates(groups: Sequence[str], archs: Sequence[int], limit: Optional[int], jobs: int,
                      cache_dir: Optional[str] = None):
    """Compile every candidate at every shape class; return [(group, class, cfg, [compile rows], problems)]."""
    from vitkern.tools import compile_report as cr

    table = _Table()
    plan, all_jobs = [], []
    for group in groups:
        for cls, run in cases(group):
            key = f"{group}|{cls}"
            for cfg in CANDIDATES[group][:limit]:
                table.set(key, cfg)
                launches = cr.record_cases([(key, cls.split("|")[0], run("cpu", True))])
                launches = [l for l in launches if l.kernel.fn.__name__ in KERNELS_OF[group]]
                variants = cr.variants(launches, archs)
                plan.append((group, cls, cfg, len(all_jobs), len(variants)))
                all_jobs += variants
    os.environ.pop("VITKERN_CONFIG_TABLE", None)
    os.remove(table.path)
    rows = cr.compile_all(all_jobs, jobs, cache_dir=cache_dir) if all_jobs else []
    by_index = {r["index"]: r for r in rows}
    out = []
    for group, cls, cfg, start, count in plan:
        mine = [by_index[i] for i in range(start, start + count)]
        problems = [p for r in mine for p in r["problems"]
                    if not (cache_dir and p.startswith("no ptxas"))]  # a kernel already in the kept cache
        if not mine:
            problems = ["the launcher made no launch of " + "/".join(KERNELS_OF[group])]
        out.append((group, cls, cfg, mine, problems))
    return out


def _time_ms(fn, reps: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _short(kernel: str) -> str:
    for prefix in ("_attn_", "_win_", "_patch_embed_"):
        kernel = kernel.replace(prefix, "")
    return kernel.replace("_kernel", "")


def _describe(cfg: dict, rows: List[dict]) -> str:
    from vitkern.tools.compile_report import _fmt_config
    # The tiles as launched (recorded), beside the figures: they show the launcher took the entry.
    figs = ", ".join(f"{_short(r['kernel'])}@{r['target']} "
                     f"{_fmt_config(r['config'])}: "
                     f"{r['registers']} regs, spill {r['spill_stores']}/{r['spill_loads']} B, {r['shared']} B smem"
                     for r in rows)
    return f"{json.dumps(cfg, sort_keys=True)}  [{figs}]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vitkern.tools.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the table to write, vitkern/configs/<gpu-slug>.json")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop timing after this many seconds")
    parser.add_argument("--kernels", "--groups", dest="kernels", default=",".join(CANDIDATES),
                        help="comma-separated kernel groups, timed in this order")
    parser.add_argument("--limit", type=int, default=None, help="only the first N candidates per group (tests)")
    parser.add_argument("--arch", default=None, help="targets to filter for without a GPU (default 90,80)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # launchers would pick interpreter tiles
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        return subprocess.call([sys.executable, "-m", "vitkern.tools.tune", *argv], env=env)

    import torch

    groups = [g for g in args.kernels.split(",") if g]
    for g in groups:
        if g not in CANDIDATES:
            parser.error(f"--kernels: unknown group {g!r}; expected some of {sorted(CANDIDATES)}")
    gpu = torch.cuda.is_available()
    start = time.perf_counter()
    if gpu:
        major, minor = torch.cuda.get_device_capability()
        archs = [major * 10 + minor]
        from triton import knobs
        cache_dir = knobs.cache.dir  # compile into the cache the timed launches will read
    else:
        archs = [int(a) for a in (args.arch or "90,80").split(",")]
        cache_dir = None
    jobs = args.jobs or os.cpu_count() or 1
    from vitkern.tools import compile_report as cr
    targets = ", ".join(cr.TARGETS[a][0] if a in cr.TARGETS else "sm_%d" % a for a in archs)
    table = _Table() if gpu else None
    best: Dict[str, dict] = {}
    spent = lambda: time.perf_counter() - start > args.budget_s  # noqa: E731
    # Group by group, most important first: compile, then time; a spent budget keeps what is done.
    for group in groups:
        if spent():
            print(f"budget of {args.budget_s:.0f} s spent: stopping before {group}")
            break
        results = filter_candidates([group], archs, args.limit, jobs, cache_dir)
        survivors = [r for r in results if not r[4]]
        print(f"{group}: {len(survivors)} of {len(results)} candidates survive the compile filter ({targets}) "
              f"at {time.perf_counter() - start:.0f} s")
        for _, cls, cfg, rows, problems in results:
            mark = "keep" if not problems else "drop: " + "; ".join(sorted(set(problems)))[:200]
            print(f"  {group}|{cls} {_describe(cfg, rows)} {mark}")
        if not gpu:
            continue
        runs = dict(cases(group))
        for _, cls, cfg, rows, problems in survivors:
            if spent():
                print(f"budget of {args.budget_s:.0f} s spent: stopping before {group}|{cls} {cfg}")
                break
            key = f"{group}|{cls}"
            table.set(key, cfg)
            try:
                ms = _time_ms(runs[cls]("cuda", False))
            except Exception as exc:  # noqa: BLE001 - e.g. out of resources at launch: not a candidate
                print(f"  {key} {cfg}: failed at launch: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            print(f"  {key} {json.dumps(cfg, sort_keys=True)}: {ms:.3f} ms")
            if key not in best or ms < best[key]["ms"]:
                best[key] = dict(cfg, ms=round(ms, 4))
        torch.cuda.empty_cache()
        if best:
            _write(args.out, groups, best)  # after every group: a run cut off by its cap keeps what is done
    if not gpu:
        print("no CUDA GPU: nothing timed, no table written")
        return 0
    os.environ.pop("VITKERN_CONFIG_TABLE", None)
    os.remove(table.path)
    _write(args.out, groups, best)
    print(f"wrote {len(best)} entries to {args.out}")
    return 0


def _write(out: str, groups: Sequence[str], best: Dict[str, dict]) -> None:
    import torch
    import triton

    from vitkern.configs import gpu_slug
    name = torch.cuda.get_device_name()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    timed = "; ".join(f"{g}: {TIMED.get(g, 'fwd + bwd')}" for g in groups)
    with open(out + ".tmp", "w") as f:
        json.dump(dict(gpu=name, slug=gpu_slug(name), triton=triton.__version__, torch=torch.__version__,
                       timed=timed + "; CUDA events, median of 20, rotated inputs", entries=best),
                  f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(out + ".tmp", out)  # whole tables only: the launchers may read it meanwhile


if __name__ == "__main__":
    sys.exit(main())
