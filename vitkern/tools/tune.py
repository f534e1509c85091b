"""Tune the attention launch configs for this GPU; on a machine without one, show what would be timed.

    python -m vitkern.tools.tune --out vitkern/configs/<gpu-slug>.json [--budget-s SECONDS]

Per kernel group a small candidate space (block sizes, warps, stages) is first compiled ahead of
time for the target by :mod:`vitkern.tools.compile_report`; candidates that fail to compile, spill
(any spill in 16-bit kernels, > 64 B in fp32 ones) or exceed shared memory are dropped. On a GPU
the survivors are timed at the benchmark shapes (CUDA events, median, inputs rotated between
calls so no call reads the previous one's data from L2) and the fastest per shape class is written
to ``--out``, which the launchers read (:mod:`vitkern.configs`); the heuristics stay the fallback
for GPUs and shape classes without an entry. Without a GPU it prints the surviving candidates
with their compile figures and exits 0.
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


# kernel group (a vitkern.configs key prefix) -> candidate launch settings
CANDIDATES: Dict[str, List[dict]] = {
    "attention.fwd": _grid(BLOCK_M=(64, 128), BLOCK_N=(32, 64), num_warps=(4, 8), num_stages=(2, 3)),
    "attention.bwd": _grid(BLOCK_M=(32, 64), BLOCK_N=(32, 64), num_warps=(4, 8), num_stages=(1, 2)),
    "attention.dbias": _grid(BLOCK_M=(16, 32), BLOCK_N=(64,), num_warps=(4, 8), num_stages=(1,)),
}

# Shape classes of the benchmark grids: (dtype, head dim, bias, dropout) and the (B, heads, N) timed.
SHAPES: List[Tuple[str, int, bool, bool, Tuple[int, int, int]]] = [
    ("bfloat16", 64, False, False, (256, 12, 197)),  # ViT-B/16 224; also PVTv2 (d = 64 in every stage)
    ("bfloat16", 80, False, False, (128, 16, 257)),  # ViT-H/14 224
    ("bfloat16", 64, True, False, (64, 12, 197)),  # ViT-B/16 with a learned (1, h, N, N) bias: d(bias) too
]
KERNELS_OF = {"attention.fwd": ("_attn_fwd_kernel",),
              "attention.bwd": ("_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"),
              "attention.dbias": ("_attn_bwd_dbias_kernel",)}


def shape_class(dtype: str, d: int, bias: bool, dropout: bool) -> str:
    return f"{dtype}|d{d}|bias{int(bias)}|dropout{int(dropout)}"


def _run(dtype: str, d: int, bias: bool, dropout: bool, bhn: Tuple[int, int, int], device: str, backward: bool):
    """A thunk that runs the op at this shape: forward, or forward + backward."""
    import torch

    from vitkern.ops import attention

    B, H, N = bhn
    dt = getattr(torch, dtype)
    sets = []
    for _ in range(3 if device == "cuda" else 1):  # rotated inputs: no call reads the last one's from L2
        q, k, v = (torch.randn(B, H, N, d, device=device, dtype=dt, requires_grad=backward) for _ in range(3))
        b = torch.randn(1, H, N, N, device=device, dtype=dt, requires_grad=backward) if bias else None
        sets.append((q, k, v, b))
    state = {"i": 0}

    def call():
        q, k, v, b = sets[state["i"] % len(sets)]
        state["i"] += 1
        out = attention(q, k, v, attn_bias=b, dropout_p=0.1 if dropout else 0.0, backend="triton")
        if backward:
            out.backward(torch.ones_like(out))
    return call


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


def filter_candidates(groups: Sequence[str], shapes, archs: Sequence[int], limit: Optional[int], jobs: int,
                      cache_dir: Optional[str] = None):
    """Compile every candidate at every shape class; return [(group, class, cfg, [compile rows], problems)]."""
    from vitkern.tools import compile_report as cr

    table = _Table()
    plan, all_jobs = [], []
    for group in groups:
        for dtype, d, bias, dropout, bhn in shapes:
            if group == "attention.dbias" and not bias:
                continue
            key = f"{group}|{shape_class(dtype, d, bias, dropout)}"
            for cfg in CANDIDATES[group][:limit]:
                table.set(key, cfg)
                launches = cr.record_cases([(key, dtype, _run(dtype, d, bias, dropout, (1, 2, bhn[2]), "cpu",
                                                              group != "attention.fwd"))])
                launches = [l for l in launches if l.kernel.fn.__name__ in KERNELS_OF[group]]
                variants = cr.variants(launches, archs)
                plan.append((group, shape_class(dtype, d, bias, dropout), cfg, len(all_jobs), len(variants)))
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


def _describe(cfg: dict, rows: List[dict]) -> str:
    from vitkern.tools.compile_report import _fmt_config
    # The tiles as launched (recorded), beside the figures: they show the launcher took the entry.
    figs = ", ".join(f"{r['kernel'].replace('_attn_', '').replace('_kernel', '')}@{r['target']} "
                     f"{_fmt_config(r['config'])}: "
                     f"{r['registers']} regs, spill {r['spill_stores']}/{r['spill_loads']} B, {r['shared']} B smem"
                     for r in rows)
    return f"{json.dumps(cfg, sort_keys=True)}  [{figs}]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vitkern.tools.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the table to write, vitkern/configs/<gpu-slug>.json")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop timing after this many seconds")
    parser.add_argument("--kernels", default=",".join(CANDIDATES), help="comma-separated kernel groups")
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
    results = filter_candidates(groups, SHAPES, archs, args.limit, jobs, cache_dir)
    survivors = [r for r in results if not r[4]]
    print(f"{len(survivors)} of {len(results)} candidates survive the compile filter "
          f"({', '.join(cr.TARGETS[a][0] if a in cr.TARGETS else 'sm_%d' % a for a in archs)}) in {time.perf_counter() - start:.0f} s")
    for group, cls, cfg, rows, problems in results:
        mark = "keep" if not problems else "drop: " + "; ".join(sorted(set(problems)))[:200]
        print(f"  {group}|{cls} {_describe(cfg, rows)} {mark}")
    if not gpu:
        print("no CUDA GPU: nothing timed, no table written")
        return 0

    import triton

    from vitkern.configs import gpu_slug
    table = _Table()
    best: Dict[str, dict] = {}
    shapes = {shape_class(*s[:4]): s for s in SHAPES}
    for group, cls, cfg, rows, problems in survivors:
        if time.perf_counter() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: stopping before {group}|{cls} {cfg}")
            break
        dtype, d, bias, dropout, bhn = shapes[cls]
        key = f"{group}|{cls}"
        table.set(key, cfg)
        try:
            ms = _time_ms(_run(dtype, d, bias, dropout, bhn, "cuda", group != "attention.fwd"))
        except Exception as exc:  # noqa: BLE001 - e.g. out of resources at launch: not a candidate
            print(f"  {key} {cfg}: failed at launch: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        print(f"  {key} {json.dumps(cfg, sort_keys=True)}: {ms:.3f} ms")
        if key not in best or ms < best[key]["ms"]:
            best[key] = dict(cfg, ms=round(ms, 4))
    os.environ.pop("VITKERN_CONFIG_TABLE", None)
    name = torch.cuda.get_device_name()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=name, slug=gpu_slug(name), triton=triton.__version__, torch=torch.__version__,
                       timed="fwd for attention.fwd, fwd+bwd for attention.bwd/dbias; CUDA events, median of 20",
                       entries=best), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(best)} entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
