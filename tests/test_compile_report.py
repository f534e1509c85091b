"""Every Triton kernel variant the launchers pick compiles for sm_90a and sm_80 within the limits.

The compile runs in a subprocess without TRITON_INTERPRET (the repo's conftest sets it, and vitkern
picks interpreter tiles when it is set), in parallel, with a fresh Triton cache each run.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from vitkern.tools import compile_report as cr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not cr.nvidia_backend_available(), reason="needs Triton with its NVIDIA backend (bundled ptxas)")
def test_every_kernel_variant_compiles_within_limits(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vitkern.tools.compile_report", "--out", str(tmp_path), "--set", "ci",
         "--triton-label", "ci", "--jobs", str(max(2, os.cpu_count() or 1))],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "compile-tritonci.json").read_text())
    rows = report["variants"]
    kernels = {r["kernel"] for r in rows}
    # Every kernel of every op family is in the set, for both targets.
    for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dbias_kernel",
                 "_win_fwd_kernel", "_win_bwd_dq_kernel", "_win_bwd_dkdv_kernel", "_win_bwd_dscore_sum_kernel",
                 "_table_grad_kernel", "_patch_embed_fwd_kernel", "_patch_embed_dx_kernel",
                 "_patch_embed_dw_kernel"):
        assert name in kernels, f"{name} was not recorded; recorded: {sorted(kernels)}"
    assert {r["target"] for r in rows} == {"sm_90a", "sm_80"}
    bad = [f"{r['kernel']} {r['target']} {r['flags']} {r['config']} {r['dtypes']}: {'; '.join(r['problems'])}"
           for r in rows if r["problems"]]
    assert not bad, f"{len(bad)} of {len(rows)} variants fail a limit:\n" + "\n".join(bad)
    # Re-derive the verdicts from the raw figures, so a wrong problems() cannot hide a failure.
    for r in rows:
        assert r["ok"] and r["spill_stores"] is not None, r
        assert r["shared"] <= cr.TARGETS[r["arch"]][1], r
    print(f"compiled {len(rows)} variants in {elapsed:.0f} s")


def _row(**kw):
    row = dict(ok=True, error=None, arch=90, target="sm_90a", shared=1024, spill_stores=0, spill_loads=0,
               dtypes=["bfloat16"], dots=2, fma_dots=0, wgmma=4, mma_sync=0)
    row.update(kw)
    return row


def test_problems_flags_each_limit():
    assert cr.problems(_row()) == []
    assert cr.problems(_row(ok=False, error="CompilationError: x"))[0].startswith("compile error")
    assert "shared memory" in cr.problems(_row(shared=232449))[0]
    assert cr.problems(_row(shared=232448)) == []
    assert "shared memory" in cr.problems(_row(arch=80, target="sm_80", shared=166913, wgmma=0, mma_sync=4))[0]
    assert cr.problems(_row(arch=80, target="sm_80", shared=166912, wgmma=0, mma_sync=4)) == []
    assert "16-bit" in cr.problems(_row(spill_stores=4, spill_loads=0))[0]
    assert "16-bit" in cr.problems(_row(dtypes=["float32", "float16"], spill_stores=0, spill_loads=4))[0]
    assert cr.problems(_row(dtypes=["float32"], spill_stores=64, spill_loads=40)) == []
    assert "> 64 B" in cr.problems(_row(dtypes=["float32"], spill_stores=65, spill_loads=32))[0]
    assert "> 64 B" in cr.problems(_row(dtypes=["float32"], spill_stores=8, spill_loads=65))[0]
    assert "tensor cores" in cr.problems(_row(fma_dots=1))[0]
    assert "tensor cores" in cr.problems(_row(wgmma=0, mma_sync=0))[0]
    assert cr.problems(_row(dots=0, wgmma=0)) == []
    assert "no ptxas" in cr.problems(_row(spill_stores=None, spill_loads=None))[0]


def test_ptxas_log_and_dot_parsing():
    ttir = "%1 = tt.dot %a, %b, %c : tensor<64x64xbf16>\n%2 = tt.dot %d, %e, %f : tensor<64x64xbf16>"
    ttgir = ("%1 = ttng.warp_group_dot %a, %b, %c : ... -> tensor<64x64xf32, #mma>\n"
             "%2 = tt.dot %d, %e, %f : tensor<64x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * "
             "tensor<16x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<64x64xf32, #blocked>")
    ptx = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...\nwgmma.fence.sync.aligned;"
    assert cr._dot_counts(ttir, ttgir, ptx) == dict(dots=2, fma_dots=1, wgmma=1, mma_sync=0)
    log = "    0 bytes stack frame, 24 bytes spill stores, 40 bytes spill loads\nptxas info : Used 255 registers"
    assert cr._SPILL.search(log).groups() == ("24", "40")
    assert cr._REGS.search(log).group(1) == "255"
