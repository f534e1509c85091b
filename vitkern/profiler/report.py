"""Terminal tables, CSV, JSON and the cost-vs-resolution plot."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Optional, Sequence

__all__ = ["format_table", "fmt_bytes", "write_csv", "write_json", "plot_profile", "plot_train_step",
           "analytic_table", "measured_table", "UNITS"]

UNITS = ("Units: 1 GMAC = 10^9 multiply-accumulates = 2 GFLOPs (timm's model cards and the seed's ResNet "
         "figures quote MACs; torch.utils.flop_counter counts FLOPs). FLOPs are per image, forward. "
         "MiB = 2^20 bytes, GiB = 2^30 bytes.")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[str] = None) -> str:
    """Plain-text table; ``align`` is one 'l'/'r' per column (default: first column left)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{int(n)} B"


def _g(v: Optional[float], digits: int = 2) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}" if digits <= 1 else f"{v:.1f}"
    if abs(v) >= 0.01:
        return f"{v:.{digits}f}"
    return f"{v:.2g}"


def _tokens_cell(r: dict) -> str:
    fam = r["family"]
    if fam in ("vit", "d2l"):
        return f"{r['tokens']}+{r['prefix_tokens']}" if r["prefix_tokens"] else str(r["tokens"])
    if fam == "swin":
        return f"{r['tokens']} (win {r['keys_per_query']})"
    if fam == "pvt":
        return f"{r['tokens']} (kv {r['keys_per_query']})"
    return "-"


def analytic_table(rows: List[dict], backward: bool) -> str:
    headers = ["model", "res", "tokens", "GMACs", "GFLOPs", "attn GFLOPs", "attn %", "attn+proj %",
               "MLP GFLOPs", "scores/layer (1 img)", "scores all layers (batch)"]
    if backward:
        headers.insert(5, "fwd+bwd GFLOPs")
    out, skipped = [], []
    for r in rows:
        if r.get("error"):
            skipped.append(f"{r['model']} {r['resolution']}: {r['error']}")
            continue
        cnn = r["family"] == "cnn"
        row = [r["model"], r["resolution"], _tokens_cell(r), _g(r["gmacs"]), _g(r["gflops"]),
               "-" if cnn else _g(r["attn_core_gflops"], 3), "-" if cnn else f"{r['attn_core_share'] * 100:.1f}%",
               "-" if cnn else f"{r['attn_share'] * 100:.1f}%", "-" if cnn else _g(r["mlp_gflops"]),
               "-" if cnn else fmt_bytes(r["scores_per_layer_bytes"]),
               "-" if cnn else fmt_bytes(r["scores_total_bytes_batch"])]
        if backward:
            row.insert(5, _g(r.get("train_gflops")))
        out.append(row)
    return "\n".join([format_table(headers, out, "llr" + "r" * (len(headers) - 3))] + skipped)


# A measurement whose repeats spread by more than this fraction of their median is flagged as noisy.
NOISY_SPREAD = 0.2


def spread_cell(m: dict) -> str:
    if m.get("spread") is None or m.get("rounds", 0) < 2:
        return "-"
    return f"{100 * m['spread']:.0f}%" + (" !" if m["spread"] > NOISY_SPREAD else "")


def measured_table(rows: List[dict]) -> str:
    headers = ["model", "res", "backend", "ms / batch", "spread", "img/s", "peak MiB", "vs naive", "note"]
    out = []
    for r in rows:
        for m in r.get("measurements", []):
            ok = m["status"] == "ok"
            note = "" if ok else (m["status"] if m["status"] in ("oom", "error") else m["status"] + " (see notes)")
            if m["status"] == "error":
                note = "error: " + m["reason"][:60]
            out.append([r["model"], r["resolution"], m["backend"], _g(m["ms"], 1) if ok else "-",
                        spread_cell(m) if ok else "-",
                        _g(m["img_per_s"], 1) if ok else "-", _g(m["peak_mib"], 1) if ok else "-",
                        f"{m['speedup']:.2f}x" if ok and m.get("speedup") else "-", note])
    return format_table(headers, out, "lrlrrrrrl")


def noise_warnings(rows: List[dict], threshold: float = NOISY_SPREAD) -> List[str]:
    """One line per measurement whose timed repeats disagree by more than ``threshold`` of their
    median, plus one line when too few repeats were timed to judge the noise at all."""
    lines, unjudged = [], 0
    for r in rows:
        for m in r.get("measurements", []):
            if m["status"] != "ok":
                continue
            if m.get("rounds", 0) < 3:
                unjudged += 1
            elif m.get("spread") is not None and m["spread"] > threshold:
                lines.append(f"noisy: {r['model']} at {r['resolution']}, {m['backend']}: timed calls range "
                             f"{m['ms_min']:.3g}-{m['ms_max']:.3g} ms around a median of {m['ms']:.3g} ms "
                             f"(spread {100 * m['spread']:.0f}% > {100 * threshold:.0f}%); the speedups that use it "
                             f"are unreliable: rerun with more --rounds on an idle machine")
    if unjudged:
        lines.append(f"{unjudged} measurement(s) timed fewer than 3 calls: their noise cannot be judged "
                     f"(--rounds 5 or more gives a spread)")
    return lines


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #
CSV_FIELDS = [
    "model", "family", "impl", "resolution", "patch", "tokens", "prefix_tokens", "keys_per_query", "params",
    "gmacs", "gflops", "attn_core_gflops", "attn_proj_gflops", "mlp_gflops", "other_gflops", "attn_core_share",
    "attn_share", "mlp_share", "train_gflops", "attention_layers", "scores_per_layer_bytes",
    "scores_per_layer_bytes_batch", "scores_total_bytes", "scores_total_bytes_batch", "device", "dtype", "batch", "mode",
    "backend", "status", "reason", "ms", "ms_min", "ms_max", "spread", "img_per_s", "peak_mib", "speedup", "counted_gflops", "rounds",
]


def write_csv(path: str, rows: List[dict]) -> None:
    """One line per (config, backend); the analytic columns repeat (long format)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            base = {k: v for k, v in r.items() if k != "measurements"}
            ms = r.get("measurements") or [{"backend": "", "status": "not measured"}]
            for m in ms:
                w.writerow({**base, **m})


def write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")


# --------------------------------------------------------------------------- #
# Plots (matplotlib's Agg canvas directly: no pyplot, no GUI, no global backend switch)
# --------------------------------------------------------------------------- #
_BACKEND_STYLE = {"naive": "-", "sdpa": "--", "vitkern": "-."}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    """Save as PNG, then shrink it (a 96-colour palette: about 4x smaller, looks the same) when Pillow is here."""
    fig.savefig(path, bbox_inches="tight")
    try:
        from PIL import Image
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        small.save(path, optimize=True)
    except Exception:  # noqa: BLE001 - the unshrunk PNG is fine
        pass


def _log_axes(ax, xs: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted(set(xs))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="both", alpha=0.25)


def _slopes(ax, x0: float, x1: float, y_for_2: float, y_for_4: float) -> None:
    """Reference segments of slope 2 and 4, clipped to the data's y-range: a guide must never
    stretch the axis and squash the data it is there to explain."""
    if x1 <= x0:
        x1 = x0 * 1.5
    ax.autoscale_view()
    ylim = ax.get_ylim()
    ax.plot([x0, x1], [y_for_2, y_for_2 * (x1 / x0) ** 2], color="0.45", lw=1, ls=(0, (1, 2)),
            label="slope 2: ∝ res² (linear in tokens)", scalex=False, scaley=False)
    ax.plot([x0, x1], [y_for_4, y_for_4 * (x1 / x0) ** 4], color="0.2", lw=1, ls=(0, (5, 2, 1, 2)),
            label="slope 4: ∝ res⁴ (quadratic in tokens)", scalex=False, scaley=False)
    ax.set_ylim(ylim)


# Legend text in points; at the figures' 100 dpi, 10 pt is about 14 px, readable at the PNG's own size.
LEGEND_FONTSIZE = 10


def _legends(ax, colors: Dict[str, str], styles: List[tuple], ncol_colors: int = 3) -> None:
    """Two legends below ``ax``: colours = models, line styles = what the line is."""
    from matplotlib.lines import Line2D
    color_handles = [Line2D([], [], color=c, lw=2.5, label=name) for name, c in colors.items()]
    style_handles = [Line2D([], [], color=col, ls=ls, marker=mk, lw=1.4, label=label)
                     for label, ls, mk, col in styles]
    first = ax.legend(handles=color_handles, fontsize=LEGEND_FONTSIZE, ncol=ncol_colors, loc="upper left",
                      bbox_to_anchor=(0.0, -0.14), frameon=False)
    ax.add_artist(first)
    ax.legend(handles=style_handles, fontsize=LEGEND_FONTSIZE, ncol=2, loc="upper left",
              bbox_to_anchor=(0.0, -0.22), frameon=False)


_SLOPE_STYLES = [("slope 2: ∝ res² (linear in tokens)", (0, (1, 2)), None, "0.45"),
                 ("slope 4: ∝ res⁴ (quadratic in tokens)", (0, (5, 2, 1, 2)), None, "0.2")]


def plot_profile(rows: List[dict], path: str, title: str) -> None:
    """Left: counted GFLOPs vs resolution (total, attention core, MLP per model). Right: measured
    time per image vs resolution per model and backend. Log-log, with reference slopes 2 and 4."""
    fig = _figure(13, 7.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray"]
    series: Dict[str, List[dict]] = {}
    for r in rows:
        if not r.get("error"):
            series.setdefault(r["model"], []).append(r)
    colors = {name: palette[i % len(palette)] for i, name in enumerate(series)}
    all_x = [r["resolution"] for s in series.values() for r in s]
    anchor = None
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["resolution"])
        c = colors[name]
        xs = [r["resolution"] for r in pts]
        ax1.plot(xs, [r["gflops"] for r in pts], "o-", color=c, lw=2)
        if pts[0]["family"] != "cnn" and all(r["attn_core_gflops"] > 0 for r in pts):
            ax1.plot(xs, [r["attn_core_gflops"] for r in pts], "^--", color=c, lw=1.2)
            ax1.plot(xs, [r["mlp_gflops"] for r in pts], "s:", color=c, lw=1.2)
            if anchor is None and pts[0]["family"] in ("vit", "d2l"):
                anchor = pts[0]
    if all_x:
        _log_axes(ax1, all_x)
        a = anchor or next(iter(series.values()))[0]
        _slopes(ax1, min(all_x), max(all_x), (a["mlp_gflops"] or a["gflops"]) * 0.5,
                (a["attn_core_gflops"] or a["gflops"]) * 0.5)
        _legends(ax1, colors, [("total", "-", "o", "k"), ("attention q·kᵀ, p·v (quadratic)", "--", "^", "k"),
                               ("MLP (linear)", ":", "s", "k")] + _SLOPE_STYLES)
    ax1.set_xlabel("image resolution (pixels per side)")
    ax1.set_ylabel("GFLOPs per image (counted, forward)")
    ax1.set_title("Analytic cost (FlopCounterMode on the meta device)", fontsize=11)

    measured_x, first_time, used = [], None, []
    for name, pts in series.items():
        for backend, ls in _BACKEND_STYLE.items():
            xy = []
            for r in sorted(pts, key=lambda r: r["resolution"]):
                m = next((m for m in r.get("measurements", []) if m["backend"] == backend and m["status"] == "ok"),
                         None)
                if m:
                    lo, hi = m.get("ms_min") or m["ms"], m.get("ms_max") or m["ms"]
                    xy.append((r["resolution"], m["ms"] / r["batch"], (m["ms"] - lo) / r["batch"],
                               (hi - m["ms"]) / r["batch"]))
            if xy:
                # Error bars: the fastest and slowest timed call around the median.
                ax2.errorbar([p[0] for p in xy], [p[1] for p in xy], yerr=[[p[2] for p in xy], [p[3] for p in xy]],
                             marker="o", ls=ls, color=colors[name], lw=1.6, capsize=3)
                measured_x += [p[0] for p in xy]
                used.append(backend)
                # Guides start just below the fastest point at the smallest resolution, so they rise
                # through the data instead of above it.
                if first_time is None or xy[0][0] < first_time[0] or (
                        xy[0][0] == first_time[0] and xy[0][1] < first_time[1]):
                    first_time = xy[0][:2]
    if measured_x:
        _log_axes(ax2, measured_x)
        _slopes(ax2, min(measured_x), max(measured_x), first_time[1] * 0.8, first_time[1] * 0.8)
        measured_models = {n: c for n, c in colors.items()
                           if any(m["status"] == "ok" for r in series[n] for m in r.get("measurements", []))}
        _legends(ax2, measured_models, [(b, ls, "o", "k") for b, ls in _BACKEND_STYLE.items() if b in used]
                 + _SLOPE_STYLES)
    else:
        ax2.text(0.5, 0.5, "not measured (--analytic-only)", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xticks([])
        ax2.set_yticks([])
    ax2.set_xlabel("image resolution (pixels per side)")
    ax2.set_ylabel("measured ms per image")
    ax2.set_title("Measured time per image (median; bars: min-max of the timed calls)", fontsize=11)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    _save(fig, path)


def plot_train_step(rows: List[dict], fits: Dict[str, Dict[str, dict]], path: str, title: str) -> None:
    """One panel per model: measured training images/s vs img_size (log-log) per backend, each beside
    its FLOP-predicted images/s (the counted work per image, anchored at the largest size measured),
    and slope -2 / -4 guides over the last doubling (throughput ∝ 1/tokens, 1/tokens²)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = _figure(5.2 * max(1, len(models)), 4.6)
    for i, model in enumerate(models):
        ax = fig.add_subplot(1, max(1, len(models)), i + 1)
        xs_all, last = [], None
        for backend, ls in _BACKEND_STYLE.items():
            pts = [(r["img_size"], r["img_per_s"], r.get("pred_img_per_s")) for r in rows
                   if r["model"] == model and r["backend"] == backend and r["status"] == "ok"]
            if not pts:
                continue
            xs_all += [p[0] for p in pts]
            fit = fits.get(model, {}).get(backend, {})
            label = f"{backend} measured" + (f" (time ∝ img_size^{fit['exponent']:.2f})" if fit.get("exponent") else "")
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=ls, lw=2, label=label)
            if all(p[2] for p in pts):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="s", ls=":", lw=1.2, color=line.get_color(),
                        label=f"{backend} FLOP-predicted")
            if last is None:
                last = pts
        if xs_all:
            _log_axes(ax, xs_all)
            if len(last) > 1:
                (x0, y0, _), (x1, _, _) = last[-2], last[-1]
                r = x1 / x0
                ax.autoscale_view()
                ylim = ax.get_ylim()
                ax.plot([x0, x1], [y0, y0 / r ** 2], color="0.45", lw=1, ls=(0, (1, 2)),
                        label="slope -2: ∝ 1/tokens", scalex=False, scaley=False)
                ax.plot([x0, x1], [y0, y0 / r ** 4], color="0.2", lw=1, ls=(0, (5, 2, 1, 2)),
                        label="slope -4: ∝ 1/tokens²", scalex=False, scaley=False)
                ax.set_ylim(ylim)
            ax.legend(fontsize=LEGEND_FONTSIZE, loc="best")
        ax.set_xlabel("img_size")
        ax.set_ylabel("training images/s")
        ax.set_title(model, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def ensure_dir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
