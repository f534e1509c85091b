"""The profile run: count every config, measure it per backend, print and write the results."""
from __future__ import annotations

import datetime
import os
import sys
from typing import Callable, Dict, List, Sequence

import torch

from vitkern import _timing
from vitkern._timing import cpu_name
from vitkern.profiler.counting import count_config
from vitkern.profiler.measure import Progress, measure_config
from vitkern.profiler.report import (UNITS, analytic_table, measured_table, noise_warnings, plot_profile, write_csv,
                                     write_json)
from vitkern.profiler.specs import Config, ModelUnavailable, vitkern_cpu_reason

__all__ = ["run_profile", "environment", "device_description", "analytic_row"]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(idx)} (cuda:{idx})"
    return f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict:
    env = _timing.environment(device)
    return {
        "device": str(device), "device_name": device_description(device),
        "python": env["python"], "torch": env["torch"], "cuda": env["cuda"], "timm": env["timm"],
        "torchvision": env["torchvision"], "triton": env["triton"], "platform": env["platform"],
        "vitkern": env["vitkern"], "commit": _timing.commit_label(env),
    }


def analytic_row(config: Config, counts, *, dtype: torch.dtype, batch: int, backward: bool) -> dict:
    per_layer, total = counts.score_bytes(dtype)
    g = 1e9
    return {
        "model": config.name, "family": config.spec.family, "resolution": config.resolution,
        "patch": config.patch, "tokens": counts.tokens, "prefix_tokens": counts.prefix_tokens,
        "keys_per_query": counts.keys_per_query, "params": counts.params,
        "gmacs": counts.macs / g, "gflops": counts.flops / g,
        "attn_core_gflops": counts.attn_core_flops / g, "attn_proj_gflops": counts.attn_proj_flops / g,
        "mlp_gflops": counts.mlp_flops / g, "other_gflops": counts.other_flops / g,
        "attn_core_share": counts.attn_core_flops / counts.flops if counts.flops else 0.0,
        "attn_share": counts.attn_flops / counts.flops if counts.flops else 0.0,
        "mlp_share": counts.mlp_flops / counts.flops if counts.flops else 0.0,
        "train_gflops": counts.train_flops / g if counts.train_flops else None,
        "attention_layers": len(counts.score_shapes), "score_shapes": [list(s) for s in counts.score_shapes],
        "scores_per_layer_bytes": per_layer, "scores_per_layer_bytes_batch": per_layer * batch,
        "scores_total_bytes": total, "scores_total_bytes_batch": total * batch,
        "dtype": str(dtype).replace("torch.", ""), "batch": batch,
        "mode": "forward+backward" if backward else "forward",
    }


def run_profile(configs: Sequence[Config], *, device: torch.device, dtype: torch.dtype, batch: int,
                backward: bool, backends: Sequence[str], warmup: int, rounds: int, out_dir: str,
                measure: bool = True, plot: bool = True, progress: bool = True, notes: Sequence[str] = (),
                command: str = "", log: Callable[[str], None] = print) -> Dict:
    """Count and measure ``configs``; print the tables; write profile.{csv,json,png} to ``out_dir``.

    Returns the JSON payload (``payload["exit_code"]``: 1 if a backend crashed, else 0).
    """
    env = environment(device)
    mode = "forward+backward" if backward else "forward"
    rows: List[dict] = []
    for cfg in configs:
        try:
            counts = count_config(cfg, backward=backward)
        except ModelUnavailable as exc:
            rows.append({"model": cfg.name, "family": cfg.spec.family, "resolution": cfg.resolution,
                         "patch": cfg.patch, "error": f"skipped: {exc}", "batch": batch, "measurements": []})
            continue
        row = analytic_row(cfg, counts, dtype=dtype, batch=batch, backward=backward)
        row["device"] = env["device_name"]
        row["_config"] = cfg
        rows.append(row)

    header = (f"vitkern profile - {env['device_name']} - {row_dtype(dtype)}, batch {batch}, {mode}"
              f" - torch {env['torch']}, timm {env['timm'] or 'not installed'}")
    log(header)
    for n in notes if measure else []:
        log(f"note: {n}")
    log("")
    log("Analytic cost per configuration (counted with torch.utils.flop_counter on the meta device, naive path)")
    log(analytic_table(rows, backward))
    log("tokens: patch tokens + CLS (ViT), first-stage tokens (window size / keys per query) for Swin / PVT.")
    log("attn GFLOPs: the q·kᵀ and p·v matmuls (quadratic in tokens); attn %: their share of the model;")
    log("attn+proj %: whole attention modules incl. qkv/proj (and PVT's spatial reduction).")
    log(f"scores: the (heads x Nq x Nk) attention matrix the naive path materialises per layer, in "
        f"{row_dtype(dtype)}; 'all layers (batch)' = every layer, x batch {batch} (what a naive training step "
        f"keeps for backward; it also keeps the pre-softmax copy, about 2x this).")
    log(UNITS)

    if measure:
        todo = [r for r in rows if not r.get("error") and r["_config"].spec.measurable]
        bar = Progress(len(todo) * len(backends), desc="measuring", enabled=progress)
        try:
            for r in todo:
                ms = measure_config(r["_config"], backends, device=device, dtype=dtype, batch=batch,
                                    backward=backward, warmup=warmup, rounds=rounds, progress=bar)
                r["measurements"] = [m.to_dict() for m in ms]
        finally:
            bar.close()
        log("")
        log(f"Measured on {env['device_name']}: {row_dtype(dtype)}, batch {batch}, {mode}, median of {rounds} "
            f"timed call(s) after {warmup} warm-up call(s); peak MiB = memory allocated during one call on top "
            f"of weights and input" + (" (CPU: live tensors tracked per op)" if device.type == "cpu" else ""))
        log(measured_table([r for r in rows if r.get("measurements")]))
        reasons = {}
        for r in rows:
            for m in r.get("measurements", []):
                if m["status"] not in ("ok",) and m["reason"]:
                    prefix = "" if m["reason"].startswith(m["status"]) else f"{m['status']}: "
                    reasons.setdefault(f"{m['backend']}: {prefix}{m['reason']}", None)
        for reason in reasons:
            log(f"  {reason}")
        warnings_ = noise_warnings(rows)
        for w in warnings_:
            log(f"warning: {w}")
    else:
        warnings_ = []

    for r in rows:
        r.pop("_config", None)
    payload = {
        "kind": "vitkern.profile", "version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "environment": env,
        "settings": {"dtype": row_dtype(dtype), "batch": batch, "mode": mode, "backends": list(backends),
                     "warmup": warmup, "rounds": rounds, "measured": measure},
        "units": {"gmacs": "1e9 multiply-accumulates per image (forward)", "gflops": "1e9 FLOPs = 2 x MACs",
                  "bytes": "bytes", "peak_mib": "2^20 bytes", "ms": "milliseconds per call (whole batch)",
                  "img_per_s": "images per second"},
        "notes": list(notes), "warnings": warnings_, "rows": rows,
    }
    errors = [m for r in rows for m in r.get("measurements", []) if m["status"] == "error"]
    payload["exit_code"] = 1 if errors else 0
    os.makedirs(out_dir, exist_ok=True)
    files = {"csv": os.path.join(out_dir, "profile.csv"), "json": os.path.join(out_dir, "profile.json")}
    write_csv(files["csv"], rows)
    if plot:
        files["png"] = os.path.join(out_dir, "profile.png")
        try:
            plot_profile(rows, files["png"], f"vitkern profile - {env['device_name']} - {row_dtype(dtype)}, "
                                             f"batch {batch}, {mode}")
        except ImportError as exc:
            files.pop("png")
            log(f"note: no plot ({exc}); pip install matplotlib")
    payload["files"] = files
    write_json(files["json"], payload)
    log("")
    log("wrote " + ", ".join(files.values()))
    return payload


def row_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cpu_notes(backends: Sequence[str]) -> List[str]:
    notes = ["CPU-only run (no CUDA device): small batch and few timing rounds; timings show the trend, "
             "not GPU speed."]
    if "vitkern" in backends:
        notes.append("vitkern: " + vitkern_cpu_reason())
    return notes


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m vitkern profile")
