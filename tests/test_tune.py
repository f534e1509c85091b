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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tuner times and writes a table")
@pytest.mark.skipif(not cr.nvidia_backend_available(), reason="needs Triton with its NVIDIA backend (bundled ptxas)")
def test_tuner_filters_candidates_on_cpu(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vitkern.tools.tune", "--out", str(out), "--kernels", "attention.dbias",
         "--limit", "2", "--arch", "90"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 of 2 candidates survive the compile filter (sm_90a)" in proc.stdout, proc.stdout
    # The real launcher took each candidate from the temporary table: the recorded tiles are the candidate's.
    assert "bwd_dbias@sm_90a 16x64x64 w4 s1:" in proc.stdout, proc.stdout
    assert "bwd_dbias@sm_90a 16x64x64 w8 s1:" in proc.stdout, proc.stdout
    assert "no CUDA GPU: nothing timed, no table written" in proc.stdout
    assert not out.exists()
