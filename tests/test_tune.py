"""The tuner's CPU filter, and the launchers' use of a tuned-config table (vitkern.configs)."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from vitkern import _triton, configs
from vitkern.tools import compile_report as cr

attn_ops = importlib.import_module("vitkern.ops.attention")  # the module (vitkern.ops.attention is also a function)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_slug():
    assert configs.gpu_slug("NVIDIA H200") == "h200"
    assert configs.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert configs.gpu_slug("NVIDIA A100-SXM4-40GB") == "a100-sxm4-40gb"


def test_launcher_config_uses_table_entry_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)  # the GPU branch of the config functions
    heuristic = attn_ops._fwd_config(64, torch.bfloat16, False, False)
    heuristic_d80 = attn_ops._fwd_config(80, torch.bfloat16, False, False)
    heuristic_bwd = attn_ops._bwd_configs(64, torch.bfloat16, False, False)
    entry = dict(BLOCK_M=64, BLOCK_N=32, num_warps=2, num_stages=5)
    assert entry != heuristic
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": {"attention.fwd|bfloat16|d64|bias0|dropout0": dict(entry, ms=0.5)}}))
    monkeypatch.setenv("VITKERN_CONFIG_TABLE", str(path))
    assert attn_ops._fwd_config(64, torch.bfloat16, False, False) == entry  # timing figures are not passed on
    assert attn_ops._fwd_config(80, torch.bfloat16, False, False) == heuristic_d80  # no entry: heuristic
    assert attn_ops._fwd_config(64, torch.float16, False, False) == heuristic  # other dtype: heuristic
    assert attn_ops._bwd_configs(64, torch.bfloat16, False, False) == heuristic_bwd  # other kernel: heuristic
    monkeypatch.setenv("VITKERN_CONFIG_TABLE", str(tmp_path / "missing.json"))
    assert attn_ops._fwd_config(64, torch.bfloat16, False, False) == heuristic
    monkeypatch.setattr(_triton, "INTERPRET", True)  # the interpreter keeps its own tiles
    monkeypatch.setenv("VITKERN_CONFIG_TABLE", str(path))
    assert attn_ops._fwd_config(64, torch.bfloat16, False, False) == dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)


def test_no_table_without_gpu(monkeypatch):
    monkeypatch.delenv("VITKERN_CONFIG_TABLE", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the table path is the GPU's")
    assert configs.table_path() is None and configs.lookup("attention.fwd", "bfloat16|d64|bias0|dropout0") is None


def _tune_on_cpu(out, *args):
    """The tuner's CPU filter for sm_90a, in a process without TRITON_INTERPRET (the launchers' GPU tiles)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "vitkern.tools.tune", "--out", str(out), *args, "--arch", "90"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tuner times and writes a table")
@pytest.mark.skipif(not cr.nvidia_backend_available(), reason="needs Triton with its NVIDIA backend (bundled ptxas)")
def test_tuner_filters_candidates_on_cpu(tmp_path):
    out = tmp_path / "table.json"
    proc = _tune_on_cpu(out, "--kernels", "attention.dbias", "--limit", "2")
    assert "2 of 2 candidates survive the compile filter (sm_90a)" in proc.stdout, proc.stdout
    # The real launcher took each candidate from the temporary table: the recorded tiles are the candidate's.
    assert "bwd_dbias@sm_90a 16x64x64 w4 s1:" in proc.stdout, proc.stdout
    assert "bwd_dbias@sm_90a 16x64x64 w8 s1:" in proc.stdout, proc.stdout
    assert "no CUDA GPU: nothing timed, no table written" in proc.stdout
    assert not out.exists()


def _table(tmp_path, monkeypatch, entries):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": entries}))
    monkeypatch.setenv("VITKERN_CONFIG_TABLE", str(path))


def test_window_launch_settings_use_table_entry_and_fall_back(tmp_path, monkeypatch):
    win_ops = importlib.import_module("vitkern.ops.window_attention")
    monkeypatch.setattr(_triton, "INTERPRET", False)

    def geometry(dtype=torch.bfloat16, shift=3, heads=3):  # Swin-T stage 1: 49 tokens, d = 32
        return win_ops._Geometry(torch.empty(1, 14, 14, 3 * heads * 32, dtype=dtype), heads, (7, 7), (shift, shift))

    heuristic = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1)
    entry = dict(BLOCK_M=32, BLOCK_N=16, num_warps=2, num_stages=4)
    _table(tmp_path, monkeypatch, {"window_attention.bwd|bfloat16|t49|d32|shift1": dict(entry, ms=0.2)})
    assert geometry().launch("bwd", 64, 64, 8, 1) == entry  # timing figures are not passed on
    assert geometry().launch("fwd", 64, 64, 8, 1) == heuristic  # other group: the given settings
    assert geometry().launch("dscore", 64, 64, 8, 1) == heuristic
    assert geometry(shift=0).launch("bwd", 64, 64, 8, 1) == heuristic  # other shape class
    assert geometry(dtype=torch.float16).launch("bwd", 64, 64, 8, 1) == heuristic
    monkeypatch.setattr(_triton, "INTERPRET", True)  # the interpreter keeps its own tiles
    assert geometry().launch("bwd", 64, 64, 8, 1) == heuristic


def test_patchify_tiles_use_table_entry_and_fall_back(tmp_path, monkeypatch):
    pe_ops = importlib.import_module("vitkern.ops.patch_embed")
    monkeypatch.setattr(_triton, "INTERPRET", False)
    heuristic = pe_ops._backward_tiles(pe_ops._gemm_config(torch.bfloat16, 50176, 768, 768))
    entry = dict(BLOCK_M=32, BLOCK_K=16, num_warps=2, num_stages=4)  # BLOCK_N omitted: the heuristic's stays
    _table(tmp_path, monkeypatch, {"patch_embed.dx|bfloat16|D768|K768": dict(entry, ms=0.3)})
    assert pe_ops._tuned("dx", heuristic, torch.bfloat16, 768, 768) == dict(heuristic, **entry)
    assert dict(heuristic, **entry) != heuristic
    assert pe_ops._tuned("dw", heuristic, torch.bfloat16, 768, 768) == heuristic  # other group
    assert pe_ops._tuned("dx", heuristic, torch.bfloat16, 96, 48) == heuristic  # other (D, K)
    assert pe_ops._tuned("dx", heuristic, torch.float32, 768, 768) == heuristic  # other dtype
    monkeypatch.setattr(_triton, "INTERPRET", True)
    assert pe_ops._tuned("dx", heuristic, torch.bfloat16, 768, 768) == heuristic


# The first candidate of each group, as the real launcher recorded it (tiles, BLOCK_D / head dim, warps,
# stages): each differs from the heuristic at the filter's one-image shapes, so a launcher that ignored
# the table would record other tiles.
FIRST_CANDIDATE_LAUNCHES = {
    "window_attention.fwd": ("fwd@sm_90a 64x64x32 w8 s2:", 3),
    "window_attention.bwd": ("bwd_dq@sm_90a 64x64x32 w8 s2:", 3),
    "window_attention.dscore": ("bwd_dscore_sum@sm_90a 32x32x32 w4 s2:", 3),
    "patch_embed.fwd": ("fwd@sm_90a 128x128x64 w8 s3:", 2),
    "patch_embed.fwd_norm": ("fwd@sm_90a 64x128x64 w8 s2:", 1),
    "patch_embed.dx": ("dx@sm_90a 128x64x64 w8 s2:", 2),
    "patch_embed.dw": ("dw@sm_90a 128x64x64 w8 s2:", 2),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tuner times and writes a table")
@pytest.mark.skipif(not cr.nvidia_backend_available(), reason="needs Triton with its NVIDIA backend (bundled ptxas)")
def test_tuner_lists_window_and_patchify_candidates_on_cpu(tmp_path):
    out = tmp_path / "table.json"
    proc = _tune_on_cpu(out, "--groups", ",".join(FIRST_CANDIDATE_LAUNCHES), "--limit", "1")
    lines = proc.stdout.splitlines()
    for group, (launch, classes) in FIRST_CANDIDATE_LAUNCHES.items():
        assert any(l.startswith(f"{group}: ") and f"of {classes} candidates survive" in l for l in lines), proc.stdout
        mine = [l for l in lines if l.startswith(f"  {group}|")]
        assert len(mine) == classes and all(launch in l for l in mine), (group, mine)
    assert "no CUDA GPU: nothing timed, no table written" in proc.stdout
    assert not out.exists()
