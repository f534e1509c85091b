"""``vitkern profile``: the CLI end to end on CPU, counted FLOPs against hand-computed values,
the seed-figures report, the training-step mode (d2l exercise 1) and bad options.

Everything here runs on CPU in well under a minute: FLOPs are counted on the meta device
(free even for ViT-B), and the only timed models are tiny.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkern.profiler import cli as profile_cli
from vitkern.profiler.counting import count_config, count_model
from vitkern.profiler.measure import PeakTensorMemory, Progress
from vitkern.profiler.specs import Config, parse_model

ROOT = Path(__file__).resolve().parents[1]
HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(*args, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "vitkern", "profile", *args], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=timeout)


def _check_png(path: Path, min_bytes: int = 10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 300 and height >= 200, (width, height)


# --------------------------------------------------------------------------- #
# End to end
# --------------------------------------------------------------------------- #
def test_cli_end_to_end_tiny_vit_on_cpu(tmp_path):
    out = tmp_path / "prof"
    args = ["--models", "vit:dim=32,depth=2,heads=2,patch=16", "--resolutions", "32", "64", "--batch", "1",
            "--rounds", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)]
    if not HAS_MPL:
        args.append("--no-plot")
    r = _cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    assert "Analytic cost" in text and "Measured on CPU" in text
    assert "CPU-only run" in text and "n/a on CPU" in text  # says so, and why vitkern does not run
    assert "1 GMAC = 10^9 multiply-accumulates = 2 GFLOPs" in text  # units stated
    assert "measuring" in r.stderr  # the progress bar

    payload = json.loads((out / "profile.json").read_text())
    rows = payload["rows"]
    assert [(row["resolution"], row["tokens"], row["prefix_tokens"]) for row in rows] == [(32, 4, 1), (64, 16, 1)]
    for row in rows:
        n, d, L = row["tokens"] + 1, 32, 2
        # attention core = 4·n²·d per layer (q·kᵀ and p·v), counted
        assert row["attn_core_gflops"] * 1e9 == pytest.approx(L * 4 * n * n * d)
        assert row["scores_per_layer_bytes"] == 2 * n * n * 4  # heads x n x n fp32
        assert row["scores_total_bytes_batch"] == L * 2 * n * n * 4
        status = {m["backend"]: m for m in row["measurements"]}
        assert status["naive"]["status"] == "ok" and status["naive"]["ms"] > 0 and status["naive"]["img_per_s"] > 0
        assert status["naive"]["peak_mib"] > 0
        assert status["vitkern"]["status"] == "n/a" and "CPU" in status["vitkern"]["reason"]
        if HAS_TIMM:
            assert status["sdpa"]["status"] == "ok" and status["sdpa"]["speedup"] > 0
    assert payload["settings"]["batch"] == 1 and payload["environment"]["device"] == "cpu"

    with open(out / "profile.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 * 3  # configs x backends
    assert {line["backend"] for line in lines} == {"naive", "sdpa", "vitkern"}
    assert float(lines[0]["gmacs"]) * 2 == pytest.approx(float(lines[0]["gflops"]))
    if HAS_MPL:
        _check_png(out / "profile.png")


def test_analytic_only_default_grid_has_the_seed_models(tmp_path):
    """No model arguments: ViT-B/16, ViT-B/32 at 224/384/512, Swin-T and PVTv2-b2 at 224/512 (+ ResNet-50)."""
    r = _cli("--analytic-only", "--no-plot", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    got = {(row["model"], row["resolution"]) for row in rows}
    for res in (224, 384, 512):
        assert ("ViT-B/16", res) in got and ("ViT-B/32", res) in got
    for res in (224, 512):
        assert ("Swin-T", res) in got and ("PVTv2-b2", res) in got
    if HAS_TORCHVISION:
        assert ("ResNet-50", 224) in got
    for row in rows:
        assert not row.get("measurements")
    vit = {row["resolution"]: row for row in rows if row["model"] == "ViT-B/16"}
    assert vit[224]["gmacs"] == pytest.approx(17.6, rel=0.01)
    if not HAS_TIMM:
        for row in rows:
            if row["model"] in ("Swin-T", "PVTv2-b2"):
                assert "timm" in row["error"]


# --------------------------------------------------------------------------- #
# Counted FLOPs vs hand-computed values
# --------------------------------------------------------------------------- #
def _vit_macs(res, patch, d=768, L=12, mlp=3072, heads=12, in_chans=3, classes=1000):
    n_patch = (res // patch) ** 2
    n = n_patch + 1
    block = 4 * n * d * d + 2 * n * d * mlp + 2 * n * n * d  # qkv + proj, MLP, q·kᵀ + p·v
    return L * block + n_patch * d * in_chans * patch * patch + d * classes


@pytest.mark.parametrize("res, timm_gmacs, tokens", [(224, 17.6, 196), (384, 55.5, 576), (512, None, 1024)])
def test_vit_b16_counts_match_timm_and_hand_formula(res, timm_gmacs, tokens):
    c = count_model("vit-b", res)
    assert (c.tokens, c.prefix_tokens, c.seq_len) == (tokens, 1, tokens + 1)  # the seed's 196/576/1024 (+1 CLS)
    assert c.macs == _vit_macs(res, 16)  # exact
    assert c.flops == 2 * c.macs
    if timm_gmacs is not None:
        assert c.macs / 1e9 == pytest.approx(timm_gmacs, rel=0.01)  # timm's model cards: 17.6, 55.5 GMACs
    n = tokens + 1
    assert c.attn_core_flops == 12 * 4 * n * n * 768
    assert c.mlp_flops == 12 * 2 * 2 * n * 768 * 3072
    assert c.attn_proj_flops == 12 * 2 * 4 * n * 768 * 768
    assert c.score_shapes == [(1, 12, n, n)] * 12
    assert c.score_bytes(torch.float32) == (12 * n * n * 4, 12 * 12 * n * n * 4)


@pytest.mark.parametrize("res, tokens", [(224, 49), (384, 144), (512, 256)])
def test_vit_b32_tokens(res, tokens):
    c = count_model("vit-b/32", res)
    assert c.tokens == tokens and c.macs == _vit_macs(res, 32)


def test_backward_counts_three_times_the_matmuls():
    c = count_model("vit-b", 224, backward=True)
    # weight and input gradients of every matmul (the stem conv has no input gradient: the image)
    stem = 196 * 768 * 3 * 256 * 2
    assert c.train_flops == 3 * c.flops - stem
    assert c.train_attn_core_flops == 3 * c.attn_core_flops


def test_d2l_vit_counted_through_vitkern_modules():
    """The seed ViT (vitkern.models.ViT) is counted under FakeTensorMode through its own modules."""
    c = count_model("d2l-vit", 96)
    n, d, mlp, L = 37, 512, 2048, 2
    assert c.macs == L * (4 * n * d * d + 2 * n * d * mlp + 2 * n * n * d) + 36 * d * 1 * 256 + d * 10
    assert c.attn_core_flops == L * 4 * n * n * d
    assert c.score_shapes == [(1, 8, n, n)] * L


@pytest.mark.skipif(not HAS_TIMM, reason="needs timm")
def test_swin_and_pvt_counts():
    swin = count_model("swin-t", 224)
    assert swin.macs / 1e9 == pytest.approx(4.5, rel=0.01)  # timm: swin_tiny_patch4_window7_224 4.5 GMACs
    # window attention: 4 · windows · 49² · C per layer, stages (56, 96, 2), (28, 192, 2), (14, 384, 6), (7, 768, 2)
    core = sum(depth * 4 * (grid // 7) ** 2 * 49 * 49 * dim
               for grid, dim, depth in ((56, 96, 2), (28, 192, 2), (14, 384, 6), (7, 768, 2)))
    assert swin.attn_core_flops == core
    assert swin.score_shapes[0] == (64, 3, 49, 49) and swin.tokens == 3136
    pvt = count_model("pvtv2-b2", 224)
    assert pvt.macs / 1e9 == pytest.approx(4.0, rel=0.02)  # timm: pvt_v2_b2 4.0 GMACs
    assert pvt.score_shapes[0] == (1, 1, 3136, 49)  # sr ratio 8 -> 49 keys at 224
    assert count_model("pvtv2-b2", 512).score_shapes[0] == (1, 1, 16384, 256)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")
def test_resnet50_gmacs():
    assert count_model("resnet50", 224).macs / 1e9 == pytest.approx(4.09, abs=0.01)


# --------------------------------------------------------------------------- #
# Seed figures
# --------------------------------------------------------------------------- #
def test_seed_figures_are_computed(tmp_path):
    r = _cli("--seed-figures", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    # recompute from the formula: heads x n² x 4 bytes, n = patches + CLS
    b224, b384 = 12 * 197 ** 2 * 4, 12 * 577 ** 2 * 4
    assert f"{b224:,} B = {b224 / 1e6:.2f} MB = {b224 / 2**20:.2f} MiB" in text
    assert f"{b384:,} B = {b384 / 1e6:.2f} MB = {b384 / 2**20:.2f} MiB" in text
    assert f"{b384 / b224:.2f}x" in text
    assert f"{4 * 197 ** 2 * 768 / 1e6:.1f} MFLOPs" in text
    assert "MB = 10^6 B" in text
    payload = json.loads((tmp_path / "seed_figures.json").read_text())
    assert (tmp_path / "seed_figures.md").read_text().startswith("Seed chapter figures")
    claims = {cl["seed_says"]: cl for cl in payload["claims"]}
    mem224 = claims["224: 12 x 197² x 4 = 1.86 MB per layer"]
    assert mem224["computed"] == b224 / 1e6 and mem224["verdict"] == "holds"
    mem384 = claims["384: 12 x 577² x 4 = 16.0 MB per layer"]
    assert mem384["computed"] == b384 / 1e6
    assert mem384["verdict"] == ("holds" if round(b384 / 1e6, 1) == 16.0 else "wrong")
    assert payload["formula_matches_count"] is True
    # patch 32 vs 16: the n² term ~16x (15.5x with CLS), the qkv/proj linears only ~4x
    core = claims["attention q·kᵀ, p·v: 16x less"]["computed"]
    assert core == pytest.approx(197 ** 2 / 50 ** 2)
    assert claims["qkv + proj linears: 16x less"]["computed"] == pytest.approx(197 / 50)
    assert claims["qkv + proj linears: 16x less"]["verdict"] == "wrong"
    # doubling the resolution: attention ~16x, MLP ~4x
    assert claims["224->448: attention q·kᵀ, p·v ~4x"]["computed"] == pytest.approx(785 ** 2 / 197 ** 2)
    assert claims["224->448: MLP (linear in tokens) ~4x"]["computed"] == pytest.approx(785 / 197)
    # the ViT-B vs ResNet-50 table, in both units
    table = {row["resolution"]: row for row in payload["resnet_vs_vit"]}
    assert table[224]["vit_b16_gmacs"] == pytest.approx(_vit_macs(224, 16) / 1e9)
    assert table[224]["vit_b16_gflops"] == pytest.approx(2 * _vit_macs(224, 16) / 1e9)
    assert claims["224: ViT-B '4.2 GFLOPs'"]["verdict"] == "wrong"
    if HAS_TORCHVISION:
        assert table[224]["resnet50_gmacs"] == pytest.approx(4.09, abs=0.01)
        assert claims["224: ResNet-50 '4.1 GFLOPs'"]["verdict"].startswith("holds in GMACs")


# --------------------------------------------------------------------------- #
# Training-step mode (d2l exercise 1)
# --------------------------------------------------------------------------- #
def test_train_step_mode_tiny(tmp_path):
    args = ["--train-step", "--models", "d2l-vit", "--img-sizes", "32", "64", "--batch", "1", "--rounds", "1",
            "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)]
    if not HAS_MPL:
        args.append("--no-plot")
    r = _cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "img_size^" in r.stdout and "answer (d2l-ViT/16):" in r.stdout
    payload = json.loads((tmp_path / "train_step.json").read_text())
    assert {row["model"] for row in payload["rows"]} == {"d2l-ViT/16"}
    naive = [row for row in payload["rows"] if row["backend"] == "naive"]
    assert [row["img_size"] for row in naive] == [32, 64] and all(row["status"] == "ok" for row in naive)
    assert [row["tokens"] for row in naive] == [4, 16]
    assert isinstance(payload["fits"]["d2l-ViT/16"]["naive"]["exponent"], float)
    assert payload["flops_exponent"]["d2l-ViT/16"] > 1.5
    assert (tmp_path / "train_step.csv").exists()
    if HAS_MPL:
        _check_png(tmp_path / "train_step.png", min_bytes=5_000)


@pytest.mark.skipif(not HAS_TIMM, reason="ViT-B/16 and Swin-T are timm models")
def test_train_step_default_models_vit_b_and_swin_t_on_cpu(tmp_path):
    """No --models: the d2l ViT, timm's ViT-B/16 and Swin-T, each with its measured images/s and the
    FLOP-predicted images/s (equal at the anchor, the largest size; above it at the smaller size)."""
    args = ["--train-step", "--img-sizes", "32", "64", "--batch", "1", "--rounds", "1", "--warmup", "0",
            "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    if not HAS_MPL:
        args.append("--no-plot")
    r = _cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    payload = json.loads((tmp_path / "train_step.json").read_text())
    assert payload["settings"]["models"] == ["d2l-ViT/16", "ViT-B/16", "Swin-T"]
    for model, tokens in (("ViT-B/16", [4, 16]), ("Swin-T", [64, 256])):
        rows = [row for row in payload["rows"] if row["model"] == model]
        naive = [row for row in rows if row["backend"] == "naive"]
        assert [row["img_size"] for row in naive] == [32, 64] and all(row["status"] == "ok" for row in naive)
        assert [row["tokens"] for row in naive] == tokens
        assert naive[1]["pred_img_per_s"] == pytest.approx(naive[1]["img_per_s"])
        flops = [row["gflops_per_step"] for row in naive]
        assert naive[0]["pred_img_per_s"] == pytest.approx(naive[1]["img_per_s"] * flops[1] / flops[0])
        assert flops[1] > 2 * flops[0]
        vitkern = [row for row in rows if row["backend"] == "vitkern"]
        assert vitkern and all(row["status"] == "n/a" and "n/a on CPU" in row["reason"] for row in vitkern)
        assert isinstance(payload["fits"][model]["naive"]["exponent"], float)
        assert f"answer ({model}):" in r.stdout
    assert "FLOP-pred img/s" in r.stdout
    if HAS_MPL:
        _check_png(tmp_path / "train_step.png", min_bytes=5_000)


@pytest.mark.skipif(not HAS_TIMM, reason="timm models")
def test_train_step_timm_backends_differ():
    """naive = timm with unfused attention, vitkern = vitkern.optimize: on CPU vitkern is n/a (its reason),
    naive has every fused_attn switched off."""
    from vitkern.profiler import trainstep
    cfg = Config(parse_model("vit-ti")[0], 32, 16)
    assert trainstep._prepare(cfg, "vitkern", torch.device("cpu")).startswith("n/a on CPU")
    model, fn, opt, chans, classes = trainstep._prepare(cfg, "naive", torch.device("cpu"))
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags) and model.training and (chans, classes) == (3, 1000)
    assert isinstance(opt, torch.optim.SGD)


def test_train_step_out_of_memory_is_a_result_not_an_error(monkeypatch):
    from vitkern.profiler import trainstep

    def oom(*_):
        raise RuntimeError("CUDA out of memory. Tried to allocate 38.00 GiB")
    monkeypatch.setattr(trainstep, "_prepare", oom)
    cfg = Config(parse_model("vit-b/16")[0], 512, 16)
    row = trainstep._measure(cfg, "naive", 32, torch.device("cpu"), None, 0, 1)
    assert row["status"] == "oom" and "batch 32" in row["reason"], row
    monkeypatch.setattr(trainstep, "_prepare", lambda *_: 1 / 0)
    assert trainstep._measure(cfg, "naive", 32, torch.device("cpu"), None, 0, 1)["status"] == "error"


# --------------------------------------------------------------------------- #
# Bad options: clear message, exit status 2
# --------------------------------------------------------------------------- #
def _bad(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        profile_cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--models", "vit-z"], "unknown model 'vit-z'"),
    (["--models", "swin-t/16"], "only applies to ViT models"),
    (["--models", "vit:dim=30,depth=2,heads=4"], "must be divisible by heads=4"),
    (["--batch", "-1"], "--batch/-b: must be a positive integer, got -1"),
    (["--batch", "0"], "must be a positive integer, got 0"),
    (["--dtype", "float13"], "unknown dtype 'float13'"),
    (["--backends", "cudnn"], "invalid choice: 'cudnn'"),
    (["--mode", "sideways"], "unknown mode 'sideways'"),
    (["--mode", "backward"], "not timed on its own; use --mode forward+backward"),
    (["--mode", "train"], "use --train-step"),
    (["--rounds", "0"], "must be a positive integer"),
    (["--models", "vit-b", "--resolutions", "100"], "resolution 100 is not divisible by the patch size 16"),
    (["--models", "swin-t", "--resolutions", "200"], "must be a multiple of 32"),
    (["--device", "tpu"], "--device"),
    (["--train-step", "--img-sizes", "50"], "d2l-ViT: resolution 50 is not divisible by the patch size 16"),
    (["--train-step", "--models", "swin-t", "--img-sizes", "48"], "Swin-T: resolution 48 must be a multiple of 32"),
    (["--train-step", "--models", "vit-b/16", "--img-sizes", "40"], "resolution 40 is not divisible by the patch"),
    (["--train-step", "--models", "pvtv2-b2"], "is not timed by --train-step"),
    (["--train-step", "--models", "vit-q"], "unknown model 'vit-q'"),
    (["--train-step", "--resolutions", "224"], "use --img-sizes with --train-step"),
    (["--seed-figures", "--train-step"], "not allowed with argument"),
])
def test_bad_options(argv, message, capsys, tmp_path):
    err = _bad(argv + ["--out", str(tmp_path)], capsys)
    assert message in err, err


def test_non_writable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = _bad(["--analytic-only", "--models", "vit-ti", "--resolutions", "32", "--out", str(blocker / "sub")],
               capsys)
    assert "cannot write output files there" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(capsys, tmp_path):
    err = _bad(["--device", "cuda", "--out", str(tmp_path)], capsys)
    assert "CUDA is not available" in err


def test_bad_option_exit_code_from_the_command_line():
    r = _cli("--models", "not-a-model")
    assert r.returncode == 2
    assert "unknown model 'not-a-model'" in r.stderr and "vit-b" in r.stderr  # lists the known names


def test_vitkern_command_dispatch(capsys):
    from vitkern.cli import main
    assert main(["profile", "--list-models"]) == 0
    out = capsys.readouterr().out
    assert "vit-b" in out and "swin-t" in out and "pvtv2-b5" in out
    assert main([]) == 2  # no command: help on stderr
    assert "profile" in capsys.readouterr().err


def test_setup_declares_console_script_and_extras():
    text = (ROOT / "setup.py").read_text()
    assert "vitkern = vitkern.cli:main" in text
    assert '"profile"' in text and "matplotlib" in text


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #
def test_parse_model_names():
    assert parse_model("ViT-B/32")[0].key == "vit-b" and parse_model("ViT-B/32")[1] == 32
    assert parse_model("pvt_v2_b2")[0].key == "pvtv2-b2"
    assert parse_model("vit-h")[0].patch == 14
    spec, _ = parse_model("vit:dim=64,depth=2,heads=2,mlp=128,patch=8")
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_dim, spec.patch) == (64, 2, 2, 128, 8)


def test_peak_tensor_memory_sees_the_score_matrix():
    B, h, n, d = 2, 3, 65, 16
    q, k = torch.randn(B, h, n, d), torch.randn(B, h, n, d)
    tracker = PeakTensorMemory()
    with tracker:
        probs = (q @ k.transpose(-2, -1)).softmax(-1)
    assert tracker.peak >= 2 * B * h * n * n * 4  # scores and probabilities both alive
    del probs


def test_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    bar = Progress(2, desc="measuring")
    bar.update("a")
    bar.update("b")
    bar.close()
    err = capsys.readouterr().err
    assert "measuring: [" in err and "2/2" in err


def test_count_config_is_free_for_big_models():
    """ViT-H/14 at 448 (1025 tokens, 32 layers) counts on the meta device without allocating."""
    spec, _ = parse_model("vit-h")
    c = count_config(Config(spec, 448, 14))
    assert c.tokens == 1024 and c.macs == _vit_macs(448, 14, d=1280, L=32, mlp=5120, heads=16)


@pytest.mark.skipif(not HAS_TIMM, reason="needs timm")
def test_vitkern_backend_wiring_uses_vitkern_optimize():
    """The vitkern row converts the timm model with vitkern.optimize (on CPU its ops fall back to the
    reference, so the outputs must match the naive path); the real run only does this on a GPU."""
    from vitkern.profiler.specs import build
    spec, _ = parse_model("vit:dim=32,depth=2,heads=2,patch=16")
    built = build(Config(spec, 32, 16), "cpu")
    x = torch.randn(2, 3, 32, 32)
    naive = built.prepare("naive", torch.device("cpu"))
    with torch.no_grad():
        ref = naive(x)
    assert "n/a on CPU" in built.prepare("vitkern", torch.device("cpu"))
    fn = built.prepare("vitkern", torch.device("cuda"))  # pretend: only the device type is looked at
    assert not isinstance(fn, str), fn
    assert any(type(m).__module__.startswith("vitkern.") for m in fn.modules())
    with torch.no_grad():
        torch.testing.assert_close(fn(x), ref, rtol=1e-4, atol=1e-5)
    assert "already converted" in built.prepare("naive", torch.device("cpu"))


def test_grouped_conv_backward_counted_exactly():
    """torch's FlopCounterMode counts a depthwise conv's weight gradient as a dense conv (64x here);
    the profiler's counter charges each gradient what the forward costs."""
    from vitkern.profiler.counting import flop_counter
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64, device="meta")
    x = torch.empty(2, 64, 28, 28, device="meta", requires_grad=True)
    counter = flop_counter()
    with counter:
        y = conv(x)
        y.backward(torch.empty_like(y))
    fwd = 2 * 2 * 28 * 28 * 64 * 9
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts == {"aten.convolution": fwd, "aten.convolution_backward": 2 * fwd}


def test_without_timm_vits_fall_back_to_vitkern_models(monkeypatch):
    """No timm: ViTs are vitkern.models.ViT with the same dimensions (same count); Swin/PVT say why not."""
    from vitkern.profiler.specs import ModelUnavailable
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    c = count_model("vit-b", 224)
    assert c.macs == _vit_macs(224, 16) and c.score_shapes == [(1, 12, 197, 197)] * 12
    with pytest.raises(ModelUnavailable, match="needs timm"):
        count_model("swin-t", 224)


# --------------------------------------------------------------------------- #
# Readability of the results: noise, plot
# --------------------------------------------------------------------------- #
def _measured_row(model, res, backend, times):
    import statistics
    med = statistics.median(times)
    return {"model": model, "resolution": res, "batch": 1, "family": "vit",
            "measurements": [{"backend": backend, "status": "ok", "ms": med, "ms_min": min(times),
                              "ms_max": max(times), "spread": (max(times) - min(times)) / med,
                              "rounds": len(times), "img_per_s": 1e3 / med, "peak_mib": 1.0, "speedup": 1.0}]}


def test_noisy_measurements_are_flagged():
    from vitkern.profiler.report import measured_table, noise_warnings
    quiet = _measured_row("ViT-B/16", 224, "naive", [10.0, 10.1, 10.2, 10.0, 10.1])
    noisy = _measured_row("ViT-B/16", 384, "naive", [10.0, 14.0, 10.5, 10.2, 19.0])
    few = _measured_row("ViT-B/16", 512, "naive", [10.0, 30.0])
    lines = noise_warnings([quiet, noisy, few])
    assert len(lines) == 2, lines
    assert "ViT-B/16 at 384, naive" in lines[0] and "spread 86%" in lines[0] and "--rounds" in lines[0]
    assert "1 measurement(s) timed fewer than 3 calls" in lines[1]
    table = measured_table([quiet, noisy])
    assert "2%" in table and "86% !" in table


def test_cli_reports_the_spread_of_repeats(tmp_path):
    out = tmp_path / "prof"
    r = _cli("--models", "vit:dim=32,depth=1,heads=2,patch=16", "--resolutions", "32", "--batch", "1",
             "--rounds", "3", "--warmup", "0", "--device", "cpu", "--backends", "naive", "--no-plot",
             "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spread" in r.stdout
    payload = json.loads((out / "profile.json").read_text())
    m = payload["rows"][0]["measurements"][0]
    assert m["ms_min"] <= m["ms"] <= m["ms_max"] and m["spread"] == pytest.approx(
        (m["ms_max"] - m["ms_min"]) / m["ms"])
    assert isinstance(payload["warnings"], list)


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
def test_slope_guides_do_not_stretch_the_axis():
    from vitkern.profiler.report import _figure, _log_axes, _slopes
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([224, 384, 512], [100.0, 250.0, 400.0], "o-")
    _log_axes(ax, [224, 384, 512])
    ax.autoscale_view()
    before = ax.get_ylim()
    _slopes(ax, 224, 512, 50.0, 30.0)  # slope 4 from 30 reaches 30 * (512/224)^4 = 820: past the data
    assert ax.get_ylim() == pytest.approx(before)


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
def test_plot_legend_text_is_readable(tmp_path):
    """Legend labels at least 12 px high in the saved PNG (they were about 7 px)."""
    from vitkern.profiler import report
    rows = [dict(_measured_row("ViT-B/16", res, "naive", [float(res)] * 3), gflops=res / 10.0,
                 attn_core_gflops=res / 100.0, mlp_gflops=res / 20.0) for res in (224, 384, 512)]
    captured = {}
    real_save = report._save

    def keep(fig, path):
        captured["fig"] = fig
        real_save(fig, path)

    report._save = keep
    try:
        report.plot_profile(rows, str(tmp_path / "p.png"), "title")
    finally:
        report._save = real_save
    fig = captured["fig"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    heights = [t.get_window_extent(renderer).height for ax in fig.axes for leg in ax.findobj(
        lambda a: type(a).__name__ == "Legend") for t in leg.get_texts()]
    assert heights and min(heights) >= 12, heights
    _check_png(tmp_path / "p.png")
