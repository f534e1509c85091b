#!/usr/bin/env bash
# One-shot check on a GPU machine: install, environment, full test suite, benchmark suite.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Written for the project's H100/H200 image (runs as root; python3 = torch 2.11 + Triton 3.6 +
# timm + pytest-benchmark preinstalled; no network). What lands in OUTDIR (at most 8 files,
# 2 folder levels; the device tool returns nothing deeper or more):
#   OUTDIR/tests.log               environment, install, `pytest tests` output
#   OUTDIR/bench.log               `pytest --benchmark` output (pytest-benchmark's tables)
#   OUTDIR/pytest_benchmark.json   pytest-benchmark's own JSON (every round's stats + extra_info)
#   OUTDIR/results/<family>.json   vitkern's rows per kernel family (one file per family)
#   OUTDIR/results/summary.md      readable tables: time, speedups, roofline fraction, peak memory
# With four kernel families that is 8 files: add no more without dropping one.
#
# Every step runs even when an earlier one failed; the exit status is non-zero if any failed.
# Time budget (estimate for an H100, cold Triton / inductor caches), under 9 minutes in all:
#   install (pure Python, editable)            ~15 s
#   environment print (nvidia-smi, imports)    ~10 s
#   test suite                                 ~1-2 min, capped at VK_TESTS_TIMEOUT=180 s
#   benchmarks (patch_embed: 14 shapes x 3 modes x 6 implementations = 252 timed cases):
#     ceilings ~2 s; per case ~0.15 s timed (20..200 rounds) + ~0.1 s warm-up/equality/peak memory
#     = ~65 s; Triton JIT of vitkern's kernels per shape ~40-80 s; cuDNN autotuning ~20 s;
#     torch.compile (one dynamic-shape compile per patch size x mode, ~9 graphs) ~40 s
#     = ~3-3.5 min, capped at VK_BENCH_TIMEOUT=300 s
#   worst case with both caps hit: 15 + 10 + 180 + 300 + 2 x 15 s kill grace = ~9 min; typical ~5-6 min.
# A step that reaches its cap gets SIGINT: pytest stops after the current test and still writes
# what it measured (results/*.json, summary.md, pytest_benchmark.json).
#
# Environment knobs: PYTHON (default python3), VK_TESTS_TIMEOUT, VK_BENCH_TIMEOUT,
# VK_BENCH_ARGS (extra pytest arguments, e.g. "-k bs64" or "--vk-rounds 50"),
# VITKERN_COMMIT (the commit to record when the copy has no .git).
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
TESTS_TIMEOUT=${VK_TESTS_TIMEOUT:-180}
BENCH_TIMEOUT=${VK_BENCH_TIMEOUT:-300}
export PYTHONUNBUFFERED=1
# Imports keep working from the checkout even if the editable install fails.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

failed=()
note_failure() {  # name rc
    echo "=== $1 FAILED (exit $2)"
    failed+=("$1 (exit $2)")
}

run_capped() {  # seconds command...  (SIGINT at the cap so pytest writes its results)
    local secs=$1
    shift
    if command -v timeout >/dev/null 2>&1; then
        timeout -s INT -k 15 "$secs" "$@"
    else
        "$@"
    fi
}

start=$(date +%s)
{
    echo "=== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO"
    echo "=== install: $PY -m pip install --no-deps --no-build-isolation -e ."
} | tee "$OUT/tests.log"

# 1. Install (editable, no dependencies: the image has them, and there is no network).
pip_log=$(mktemp)
"$PY" -m pip install --no-deps --no-build-isolation -e . >"$pip_log" 2>&1
rc=$?
cat "$pip_log" >>"$OUT/tests.log"
tail -n 2 "$pip_log"
rm -f "$pip_log"
[ $rc -eq 0 ] || note_failure install $rc

# 2. Environment.
{
    echo "=== environment"
    nvidia-smi || echo "nvidia-smi not available"
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, subprocess
import torch
print("python", platform.python_version(), "|", platform.platform())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for name in ("triton", "pytest", "pytest-benchmark", "timm", "numpy", "vitkern"):
    try:
        print(name, md.version(name))
    except Exception as exc:
        print(name, "not installed", f"({type(exc).__name__})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB", "L2", getattr(p, "L2_cache_size", "?"))
else:
    print("NO CUDA DEVICE VISIBLE to torch")
try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception:
    head = ""
print("git HEAD", head or "unknown (set VITKERN_COMMIT to record it)")
EOF
} 2>&1 | tee -a "$OUT/tests.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || note_failure environment "$rc"

# 3. Test suite.
echo "=== tests: $PY -m pytest tests -q -rs (cap ${TESTS_TIMEOUT}s)" | tee -a "$OUT/tests.log"
run_capped "$TESTS_TIMEOUT" "$PY" -m pytest tests -q -rs 2>&1 | tee -a "$OUT/tests.log" | tail -n 25
rc=${PIPESTATUS[0]}
[ $rc -eq 0 ] || note_failure tests $rc

# 4. Benchmarks.
echo "=== benchmarks: $PY -m pytest --benchmark (cap ${BENCH_TIMEOUT}s)" | tee "$OUT/bench.log"
# shellcheck disable=SC2086  # VK_BENCH_ARGS is split on purpose
run_capped "$BENCH_TIMEOUT" "$PY" -m pytest --benchmark -q -rfEs \
    --vk-results-dir "$OUT/results" \
    --benchmark-json "$OUT/pytest_benchmark.json" \
    --benchmark-columns=min,median,iqr,rounds \
    ${VK_BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" | grep -E "passed|failed|error|skipped|wrote|FAILED|ERROR" | tail -n 30
rc=${PIPESTATUS[0]}
[ $rc -eq 0 ] || note_failure benchmarks $rc

# 5. Summary: the header and each family's overview table (the per-case tables stay in the file).
echo "=== $OUT/results/summary.md (overview; per-case tables in the file)"
if [ -f "$OUT/results/summary.md" ]; then
    awk '/^## /{detail=0} /^### /{detail=1} !detail' "$OUT/results/summary.md"
else
    echo "(missing)"
    failed+=("summary.md missing")
fi

echo "=== files in $OUT"
(cd "$OUT" && find . -type f | sort)
echo "=== done in $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "=== FAILED: ${failed[*]}"
    exit 1
fi
echo "=== all steps passed"
exit 0
