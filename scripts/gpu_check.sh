#!/usr/bin/env bash
# One-shot check on a GPU machine: install, environment, full test suite, benchmark suite.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Written for the project's H100/H200 image (runs as root; python3 = torch 2.11 + Triton 3.6 +
# timm + pytest-benchmark preinstalled; no network). What lands in OUTDIR (at most 8 files,
# 2 folder levels; the device tool returns nothing deeper or more):
#   OUTDIR/tests.log               environment, install, `pytest tests` output
#   OUTDIR/bench.log               `pytest --benchmark` output (pytest-benchmark's tables), every family
#   OUTDIR/pytest_benchmark.json   pytest-benchmark's own JSON (every round's stats + extra_info), the
#                                  families' runs merged into one file
#   OUTDIR/results/<family>.json   vitkern's rows per kernel family (one file per family)
#   OUTDIR/results/summary.md      readable tables: time, speedups, roofline fraction, peak memory
# With the four kernel families (patch_embed, attention, swin, pvt) that is exactly 8 files
# (3 + 4 family JSONs + summary.md): add no more without dropping one.
#
# Each benchmark family runs as its own pytest invocation under its own time cap, so a slow
# family cannot eat another's time; all write into OUTDIR/results (summary.md is rebuilt from
# every family JSON there) and share VK_BENCH_RUN_ID, so the summary treats them as one run.
#
# Every step runs even when an earlier one failed; the exit status is non-zero if any failed.
#
# Time budget: the whole script stays within VK_TOTAL_TIMEOUT (default 560 s = 9.3 min; the
# device tool allows 10). The capped steps (tests, then one pytest per family) have nominal caps;
# when a step starts it gets its nominal cap scaled by (time left before the deadline, less 10 s
# kill grace per step left and 10 s for the final merge) / (sum of the nominal caps of the steps
# left). Time an earlier step did not use thus flows to the later ones in proportion, and the
# caps can never add up past the deadline, however many families VK_BENCH_FAMILIES lists (a
# single family gets nearly the whole budget). VK_TOTAL_TIMEOUT=0: the nominal caps as they are.
# Each family's pytest also gets VK_BENCH_DEADLINE (Unix time of its cap), so a bench file can
# record rows it cannot finish (e.g. FlexAttention compiles) as skipped with that reason.
# Estimates for an H100, cold Triton / inductor caches:
#   install (pure Python, editable)            ~15 s
#   environment print (nvidia-smi, imports)    ~10 s
#   test suite                                 ~1-2 min, nominal VK_TESTS_TIMEOUT=120 s (0: skip the tests)
#   benchmarks, one pytest per family, nominal VK_BENCH_TIMEOUT_<FAMILY> (VK_BENCH_TIMEOUT, if set,
#   is every family's nominal cap; a family without one gets 120 s):
#     patch_embed (14 shapes x 3 modes x 6 implementations = 252 timed cases): ceilings ~2 s;
#       per case ~0.15 s timed (20..200 rounds) + ~0.1 s warm-up/equality/peak memory = ~65 s;
#       Triton JIT of vitkern's kernels per shape ~40-80 s; cuDNN autotuning ~20 s; torch.compile
#       (one dynamic-shape compile per patch size x mode, ~9 graphs) ~40 s
#       = ~2.5-3.5 min, nominal VK_BENCH_TIMEOUT_PATCH_EMBED=120 s
#     attention (module level 6 shapes x 4 implementations, kernel level 8 shapes x 2 modes x
#       9 implementations = 168 timed cases): ~35 s timing; FlexAttention and timm-module
#       torch.compile ~50-80 s; Triton JIT ~15-25 s; start-up ~10 s
#       = ~2-2.5 min, nominal VK_BENCH_TIMEOUT_ATTENTION=130 s
#     swin (12 Swin-T/B stage shapes x 2 modes: block level 3 implementations, attention part 3 +
#       2 FlexAttention = 192 timed cases): ~55 s timing, ~15 s inputs and fp32 references, Triton
#       JIT ~20-40 s, start-up ~10 s = ~1.7-2 min before FlexAttention, whose 48 static compiles
#       (~5-15 s each) run last and stop ~30 s before the cap (the rest recorded as skipped)
#       = ~1.7 min + FlexAttention as time allows, nominal VK_BENCH_TIMEOUT_SWIN=130 s
#     pvt (7 PVTv2-b2 shapes x 2 modes x 3 implementations = 42 timed rows, then 14 compile_timm
#       rows): ~15 s timing, ~10 s inputs and fp32 references, Triton JIT ~20-40 s (less when the
#       test suite warmed the cache), start-up ~10 s = ~1-1.3 min before torch.compile of timm's
#       module (10 dynamic compiles, ~8-30 s each, stage 1 first), which runs last and stops
#       ~30 s before the cap (the rest recorded as skipped)
#       = ~1-1.3 min + compiles as time allows, nominal VK_BENCH_TIMEOUT_PVT=100 s
#   nominal sum 120 + 120 + 130 + 130 + 100 = 600 s; install + environment (~25 s), 5 x 10 s kill
#   grace and 10 s for the final merge leave ~475 s, so each step gets ~79 % of its nominal cap
#   plus what the steps before it left unused: typical ~8.5-9 min (most families use their whole
#   share); worst case 560 s + however much install, environment and the final merge overrun
#   their share.
#   A new family: give it a nominal cap in bench_cap (or just list it: 120 s); the budget
#   rescales every step's share, so the total stays within VK_TOTAL_TIMEOUT.
# A step that reaches its cap gets SIGINT: pytest stops after the current test and still writes
# what it measured (results/*.json, summary.md, its pytest-benchmark JSON).
#
# Environment knobs: PYTHON (default python3), VK_TOTAL_TIMEOUT, VK_TESTS_TIMEOUT,
# VK_BENCH_TIMEOUT_PATCH_EMBED, VK_BENCH_TIMEOUT_ATTENTION, VK_BENCH_TIMEOUT_SWIN,
# VK_BENCH_TIMEOUT_PVT, VK_BENCH_TIMEOUT (default nominal cap of every family), VK_BENCH_FAMILIES
# (default "patch_embed attention swin pvt"), VK_BENCH_ARGS (extra pytest arguments
# for every family, e.g. "-k bs64" or "--vk-rounds 50"; a family with nothing selected is not
# a failure), VITKERN_COMMIT (the commit to record when the copy has no .git).
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
TOTAL_TIMEOUT=${VK_TOTAL_TIMEOUT:-560}
TESTS_TIMEOUT=${VK_TESTS_TIMEOUT:-120}
BENCH_FAMILIES=${VK_BENCH_FAMILIES:-patch_embed attention swin pvt}
KILL_GRACE=10  # timeout's -k: SIGKILL this long after the SIGINT
FINAL_TAIL=10  # the pytest-benchmark JSON merge and the summary at the end
bench_cap() {  # family -> seconds
    local var
    var="VK_BENCH_TIMEOUT_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
    if [ -n "${!var:-}" ]; then
        echo "${!var}"
        return
    fi
    case "$1" in
        patch_embed) echo "${VK_BENCH_TIMEOUT:-120}" ;;
        attention) echo "${VK_BENCH_TIMEOUT:-130}" ;;
        swin) echo "${VK_BENCH_TIMEOUT:-130}" ;;
        pvt) echo "${VK_BENCH_TIMEOUT:-100}" ;;
        *) echo "${VK_BENCH_TIMEOUT:-120}" ;;
    esac
}
share_cap() {  # nominal  sum-of-nominals-of-the-steps-left-including-this  steps-left -> seconds
    local nominal=$1 sum=$2 steps=$3 left
    if [ "$TOTAL_TIMEOUT" -le 0 ] || [ "$sum" -le 0 ]; then
        echo "$nominal"
        return
    fi
    left=$(( start + TOTAL_TIMEOUT - $(date +%s) - steps * KILL_GRACE - FINAL_TAIL ))
    echo $(( left > 0 ? left * nominal / sum : 0 ))
}
export PYTHONUNBUFFERED=1
# One id for this script's benchmark runs: summary.md then presents the families as one run.
export VK_BENCH_RUN_ID=${VK_BENCH_RUN_ID:-gpu_check-$(date -u +%Y%m%dT%H%M%SZ)-$$}
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
        timeout -s INT -k 10 "$secs" "$@"
    else
        "$@"
    fi
}

start=$(date +%s)
# Nominal caps of the capped steps, for the budget's shares (share_cap).
fam_nominal_sum=0
fam_count=0
for fam in $BENCH_FAMILIES; do
    fam_nominal_sum=$(( fam_nominal_sum + $(bench_cap "$fam") ))
    fam_count=$(( fam_count + 1 ))
done
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
if [ "$TESTS_TIMEOUT" -le 0 ]; then
    echo "=== tests: skipped (VK_TESTS_TIMEOUT=0)" | tee -a "$OUT/tests.log"
else
    cap=$(share_cap "$TESTS_TIMEOUT" $(( TESTS_TIMEOUT + fam_nominal_sum )) $(( fam_count + 1 )))
    echo "=== tests: $PY -m pytest tests -q -rs (cap ${cap}s: nominal ${TESTS_TIMEOUT}s, budget" \
        "${TOTAL_TIMEOUT}s, $(( $(date +%s) - start ))s used)" | tee -a "$OUT/tests.log"
    if [ "$cap" -lt 15 ]; then
        echo "=== tests: not run, no time left in the budget" | tee -a "$OUT/tests.log"
        failed+=("tests (no time left in VK_TOTAL_TIMEOUT=${TOTAL_TIMEOUT}s)")
    else
        run_capped "$cap" "$PY" -m pytest tests -q -rs 2>&1 | tee -a "$OUT/tests.log" | tail -n 25
        rc=${PIPESTATUS[0]}
        [ $rc -eq 0 ] || note_failure tests $rc
    fi
fi

# 4. Benchmarks: one capped pytest per family, all into OUTDIR/results.
pb_dir=$(mktemp -d)
echo "=== benchmarks: families ${BENCH_FAMILIES} (run id ${VK_BENCH_RUN_ID})" | tee "$OUT/bench.log"
fam_left=$fam_count
for fam in $BENCH_FAMILIES; do
    file="benchmarks/bench_${fam}.py"
    nominal=$(bench_cap "$fam")
    cap=$(share_cap "$nominal" "$fam_nominal_sum" "$fam_left")
    fam_nominal_sum=$(( fam_nominal_sum - nominal ))
    fam_left=$(( fam_left - 1 ))
    if [ ! -f "$file" ]; then
        echo "=== benchmarks $fam: $file missing" | tee -a "$OUT/bench.log"
        failed+=("benchmarks $fam ($file missing)")
        continue
    fi
    echo "=== benchmarks $fam: $PY -m pytest --benchmark $file (cap ${cap}s: nominal ${nominal}s," \
        "$(( $(date +%s) - start ))s of the ${TOTAL_TIMEOUT}s budget used)" | tee -a "$OUT/bench.log"
    if [ "$cap" -lt 15 ]; then
        echo "=== benchmarks $fam: not run, no time left in the budget" | tee -a "$OUT/bench.log"
        failed+=("benchmarks $fam (no time left in VK_TOTAL_TIMEOUT=${TOTAL_TIMEOUT}s)")
        continue
    fi
    fam_start=$(date +%s)
    # shellcheck disable=SC2086  # VK_BENCH_ARGS is split on purpose
    VK_BENCH_DEADLINE=$(( fam_start + cap )) \
    run_capped "$cap" "$PY" -m pytest --benchmark "$file" -q -rfEs \
        --vk-results-dir "$OUT/results" \
        --benchmark-json "$pb_dir/$fam.json" \
        --benchmark-columns=min,median,iqr,rounds \
        ${VK_BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" | grep -E "passed|failed|error|skipped|wrote|FAILED|ERROR" | tail -n 30
    rc=${PIPESTATUS[0]}
    echo "=== benchmarks $fam: exit $rc after $(( $(date +%s) - fam_start )) s" | tee -a "$OUT/bench.log"
    case $rc in
        0 | 5) ;;  # 5: nothing selected (a -k filter in VK_BENCH_ARGS that matches another family only)
        124 | 130 | 137) note_failure "benchmarks $fam (cap ${cap}s reached; partial results kept)" "$rc" ;;
        *) note_failure "benchmarks $fam" "$rc" ;;
    esac
done
# pytest-benchmark's JSON: the families' files merged into one (keeps OUTDIR at <= 8 files).
"$PY" - "$pb_dir" "$OUT/pytest_benchmark.json" <<'EOF' 2>&1 | tee -a "$OUT/bench.log"
import json, pathlib, sys
parts = sorted(pathlib.Path(sys.argv[1]).glob("*.json"))
merged = None
for path in parts:
    try:
        doc = json.loads(path.read_text())
    except Exception as exc:  # a run killed while writing
        print(f"pytest-benchmark JSON {path.name} unreadable: {type(exc).__name__}: {exc}")
        continue
    if merged is None:
        merged = doc
        merged.setdefault("benchmarks", [])
    else:
        merged["benchmarks"].extend(doc.get("benchmarks", []))
if merged is None:
    print("no pytest-benchmark JSON to merge")
else:
    pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=1))
    print(f"merged {len(parts)} pytest-benchmark JSON files ({len(merged['benchmarks'])} benchmarks) "
          f"into {sys.argv[2]}")
EOF
rm -rf "$pb_dir"

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
