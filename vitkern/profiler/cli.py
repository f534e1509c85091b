"""``vitkern profile``: command-line options, validation and dispatch to the three modes."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from typing import List, Optional, Sequence

__all__ = ["add_arguments", "run", "main", "DESCRIPTION"]

DESCRIPTION = """\
Attention cost vs image resolution. For each model and resolution: tokens, FLOPs of the whole
model and of attention alone (counted with torch.utils.flop_counter on the meta device, in MACs
and FLOPs), attention's share, the memory the naive path needs for attention scores, and the
measured time, throughput and peak memory of each backend (naive = unfused matmul-softmax-matmul,
sdpa = PyTorch's scaled_dot_product_attention as timm uses it, vitkern = vitkern's fused kernels)
with speedups. Writes profile.csv, profile.json and profile.png (cost vs resolution, log-log).

With no arguments: ViT-B/16 and ViT-B/32 at 224, 384, 512, Swin-T and PVTv2-b2 at 224 and 512,
and ResNet-50 (FLOPs only) when torchvision is installed."""

EPILOG = """\
models: vit-ti vit-s vit-b vit-l vit-h (add /P for a patch size, e.g. vit-b/32), swin-t swin-s swin-b,
pvtv2-b0 ... pvtv2-b5, resnet50 (FLOPs only), d2l-vit (the seed chapter's ViT), or a custom ViT:
vit:dim=D,depth=L,heads=H[,mlp=M][,patch=P].

examples:
  vitkern profile                                   # the default grid
  vitkern profile --models vit-l vit-h --resolutions 224 448 --mode forward+backward
  vitkern profile --models vit:dim=192,depth=4,heads=3 --resolutions 64 128 --batch 2
  vitkern profile --analytic-only --models vit-b --patch-sizes 8 16 32
  vitkern profile --seed-figures                    # the seed chapter's numbers, recomputed
  vitkern profile --train-step                      # d2l exercise 1: training images/s vs img_size for
                                                    # the d2l ViT, ViT-B/16 and Swin-T, naive vs vitkern
  vitkern profile --train-step --models d2l-vit --img-sizes 48 96   # the chapter's ViT alone"""

_DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_MODES = {"forward": False, "fwd": False, "inference": False,
          "forward+backward": True, "fwd+bwd": True, "fwdbwd": True}
# Names a user may type expecting something the profiler does not time: say so instead of guessing.
_NOT_MODES = {
    "backward": "the backward pass is not timed on its own; use --mode forward+backward (forward and backward "
                "of one batch, no optimizer step)",
    "bwd": "the backward pass is not timed on its own; use --mode forward+backward",
    "train": "--mode forward+backward times forward and backward without an optimizer step; for a whole "
             "training step (with the optimizer) use --train-step",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _dtype(text: str) -> str:
    key = text.lower()
    if key not in _DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from auto, float32 (fp32), "
                                         f"float16 (fp16), bfloat16 (bf16)")
    return key


def _mode(text: str) -> str:
    key = text.lower()
    if key in _NOT_MODES:
        raise argparse.ArgumentTypeError(f"mode {text!r} is not supported: {_NOT_MODES[key]}")
    if key not in _MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}; choose forward or forward+backward")
    return key


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to profile")
    g.add_argument("--models", "-m", nargs="+", metavar="MODEL",
                   help="model configs (default: vit-b/16 vit-b/32 swin-t pvtv2-b2 [resnet50]); see below")
    g.add_argument("--resolutions", "-r", nargs="+", type=_positive_int, metavar="PIXELS",
                   help="image sizes (square); default 224 384 512 for ViTs and ResNet-50, 224 512 for Swin/PVT")
    g.add_argument("--patch-sizes", "-p", nargs="+", type=_positive_int, metavar="P",
                   help="patch sizes for ViT models given without /P (default: the model's own, 14 for ViT-H)")
    g = p.add_argument_group("how to measure")
    g.add_argument("--batch", "-b", type=_positive_int, default=None,
                   help="images per call (default: 32 on a GPU, 1 on CPU)")
    g.add_argument("--dtype", type=_dtype, default="auto",
                   help="auto (bfloat16 on a GPU, float32 on CPU), float32, float16 or bfloat16")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--backends", nargs="+", choices=("naive", "sdpa", "vitkern"), default=None,
                   help="backends to time (default: all three; vitkern is n/a on CPU)")
    g.add_argument("--mode", type=_mode, default="forward",
                   help="forward (inference, default) or forward+backward (training step without optimizer)")
    g.add_argument("--warmup", type=_nonnegative_int, default=None,
                   help="warm-up calls per backend (default: 3 on a GPU, 1 on CPU)")
    g.add_argument("--rounds", type=_positive_int, default=None,
                   help="timed calls per backend, median reported (default: 10 on a GPU, 2 on CPU)")
    g.add_argument("--analytic-only", action="store_true", help="count FLOPs and memory only; time nothing")
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", default="vitkern-profile", metavar="DIR",
                   help="folder for the CSV, JSON and PNG files (default: ./vitkern-profile)")
    g.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g = p.add_argument_group("other reports")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--seed-figures", action="store_true",
                   help="recompute (and correct) the seed chapter's figures: attention memory 1.86 / 16.0 MB, "
                        "'4x per 2x resolution', 'P=32 cuts attention 16x', ViT-B vs ResNet-50 FLOPs")
    x.add_argument("--train-step", action="store_true",
                   help="d2l exercise 1: training images/s vs img_size of --models (default: d2l-vit vit-b/16 "
                        "swin-t), naive vs vitkern, with the fitted exponent and the FLOP-predicted curve")
    x.add_argument("--list-models", action="store_true", help="print the known model names and exit")
    g.add_argument("--img-sizes", nargs="+", type=_positive_int, metavar="PIXELS",
                   help="img_size values for --train-step (default: 48 96 192 384 for d2l-vit; 224 384 512 for "
                        "timm models on a GPU, 32 64 on CPU; multiples of the patch, of 32 for Swin)")


def _build_parser(prog: str = "vitkern profile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _resolve_device(parser, text: str):
    import torch
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device: unknown device {text!r}; use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {text!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: CUDA is not available on this machine "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _check_out_dir(parser, path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vitkern-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        parser.error(f"--out {path}: cannot write output files there ({exc.strerror or exc})")
    return path


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> int:
    """Validate ``args`` (errors exit with status 2 through ``parser.error``) and run the chosen mode."""
    from vitkern.profiler import specs

    if args.list_models:
        for name in specs.known_models():
            print(name)
        print("vit:dim=D,depth=L,heads=H[,mlp=M][,patch=P]")
        return 0

    import torch
    device = _resolve_device(parser, args.device)
    on_gpu = device.type == "cuda"
    dtype_name = _DTYPES[args.dtype] or ("bfloat16" if on_gpu else "float32")
    dtype = getattr(torch, dtype_name)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    rounds = args.rounds if args.rounds is not None else (10 if on_gpu else 2)
    command = "vitkern profile " + " ".join(shlex.quote(a) for a in argv)
    progress = not args.no_progress

    if args.seed_figures:
        out = _check_out_dir(parser, args.out)
        from vitkern.profiler.seed import seed_figures
        seed_figures(out_dir=out)
        return 0

    if args.train_step:
        from vitkern.profiler import trainstep
        model_names = args.models or list(trainstep.DEFAULT_MODELS)
        try:
            templates = trainstep.train_models(model_names)
        except ValueError as exc:
            parser.error(f"--models: {exc}")
        for template in templates:
            for s in args.img_sizes or ():
                why = trainstep.check_img_size(template, s)
                if why:
                    parser.error(f"--img-sizes: {why}")
        if args.resolutions:
            parser.error("--resolutions is for the profile; use --img-sizes with --train-step")
        out = _check_out_dir(parser, args.out)
        backends = args.backends or ["naive", "vitkern"]
        if "sdpa" in backends:
            print("note: --train-step times naive and vitkern only (the d2l ViT has no SDPA path)", file=sys.stderr)
        # Training runs in float32 unless a dtype is asked for (then under autocast, as d2l users would).
        tdtype = dtype if args.dtype != "auto" else torch.float32
        payload = trainstep.train_step_scaling(args.img_sizes, device=device, dtype=tdtype, batch=args.batch,
                                               warmup=warmup, rounds=rounds, backends=backends,
                                               models=model_names,
                                               out_dir=out, plot=not args.no_plot, progress=progress, command=command)
        return payload["exit_code"]

    if args.img_sizes:
        parser.error("--img-sizes is for --train-step; use --resolutions for the profile")
    model_names = args.models or specs.default_models()
    configs = []
    for name in model_names:
        try:
            spec, patch_override = specs.parse_model(name)
        except ValueError as exc:
            parser.error(f"--models: {exc}")
        if spec.has_patch:
            if patch_override:
                patches = [patch_override]
            elif args.patch_sizes:
                patches = list(args.patch_sizes)
            else:
                patches = [spec.patch]
        else:
            patches = [None]
        for patch in patches:
            for res in args.resolutions or specs.default_resolutions(spec, patch):
                why = specs.check_resolution(spec, res, patch)
                if why:
                    parser.error(f"--resolutions: {why}")
                configs.append(specs.Config(spec, res, patch))
    if not args.models and not specs.has_timm():
        print("note: timm is not installed: ViTs use vitkern.models.ViT, Swin-T and PVTv2-b2 are skipped "
              "(pip install timm)", file=sys.stderr)
    out = _check_out_dir(parser, args.out)
    batch = args.batch or (32 if on_gpu else 1)
    backends = args.backends or ["naive", "sdpa", "vitkern"]
    backends = [b for b in ("naive", "sdpa", "vitkern") if b in backends]  # vitkern converts in place: last
    from vitkern.profiler.run import cpu_notes, run_profile
    notes: List[str] = [] if on_gpu else cpu_notes(backends)
    payload = run_profile(configs, device=device, dtype=dtype, batch=batch, backward=_MODES[args.mode],
                          backends=backends, warmup=warmup, rounds=rounds, out_dir=out,
                          measure=not args.analytic_only, plot=not args.no_plot, progress=progress, notes=notes,
                          command=command)
    return payload["exit_code"]


def main(argv: Optional[Sequence[str]] = None, prog: str = "vitkern profile") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(prog)
    args = parser.parse_args(argv)
    return run(args, parser, argv)
