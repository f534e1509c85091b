#!/usr/bin/env bash
# One short GPU run: install, tune, the GPU-only tests, the four kernel benchmark families.
#
#   bash scripts/gpu_check.sh OUTDIR            # part "core" (the default): everything below
#   bash scripts/gpu_check.sh OUTDIR extra      # part "extra": a second, shorter command (see PARTS)
#
# TIME PLAN. A lent GPU gives 15 min of device time in all (starting the machine takes 1-2 of
# them) and at most 10 min to one command. This script is that one command and stays within
# VK_TOTAL_TIMEOUT = 540 s (9 min), leaving ~1 min of the command limit and ~4 min of the
# device time for start-up, the transfer of OUTDIR and one short rerun of a single step.
# The steps run in this order, each under its own cap (SIGINT at the cap, SIGKILL 10 s later):
#
#   step                                   cap        expected on an H100/H200 (16-core host)
#   1 install (pip -e, no deps, no build)  60 s       ~15 s
#   2 environment (versions, GPU)          30 s       ~5 s
#   3 tuner  vitkern.tools.tune            150 s      what its --budget-s allows (140 s)
#   4 GPU tests  -m gpu, bf16 only         180 s      ~1-2 min (Triton JIT dominates; -n 16)
#   5 benchmarks, one pytest per family    the rest   every second steps 1-4 left, shared in
#                                                     proportion to the nominal caps below
#   (background, steps 3-4) vitkern.tools.compile_report --jobs 4: the static compile report
#   on 4 of the 16 cores (1 on a smaller machine), stopped when step 4 ends; its last lines
#   go to the log.
#
# Nominal caps of the families (their share of what is left; 480 s in all):
#   patch_embed 120 s, attention 130 s, window_attention 130 s, sr_attention 100 s.
# With the tuner and the tests at their caps, the families share ~280 s (~58 % of nominal);
# each family's pytest gets $VK_BENCH_DEADLINE (the Unix time of its cap), so the long compiles
# (FlexAttention, torch.compile) that come last in each family record themselves as skipped
# for the time cap instead of being cut off silently.
#
# GPU tests: only what a GPU alone can show. CPU CI runs every test under Triton's interpreter
# (fp32 / fp16); here the selection is the `gpu`-marked tests in bf16 (VK_GPU_TESTS: default
# `-m gpu -k "not torch.float16"`: the benchmark shapes of every family, so each kernel runs
# once per specialisation the benchmarks use, with the real launch configurations), with
# pytest-xdist on 16 workers when it is installed (serially otherwise), failures listed (-rfEs).
# Their Triton JIT also fills the kernel cache the benchmarks then reuse.
#
# FILES (at most 8 come back; each is written as its step goes, so whatever finished is there
# even when a later step, or the whole command, is cut off):
#   OUTDIR/gpu_check.log          install, environment, tuner, GPU tests, compile-report tail, summary
#   OUTDIR/bench.log              the benchmark families' pytest output (floors, tables)
#   OUTDIR/tune/<gpu-slug>.json   the tuner's table (copied from vitkern/configs/<gpu-slug>.json)
#   OUTDIR/results/summary.md     time, speedups, floors, roofline fraction, peak memory
#   OUTDIR/results/<family>.json  one per family: patch_embed, attention, window_attention, sr_attention
#
# PARTS. "core" is the plan above and comes first. "extra" is for the device time that is left
# after it (15 min - start-up - core's ~9.5 min: about 4 min): no tuner, no GPU tests, only the
# families that did not fit: attention_relpos (BEiT / MaxViT / CoAtNet attention, nominal 60 s)
# and models (whole timm models, nominal 180 s: the eager training-step and inference grid,
# ~2.5-3 min with Triton's JIT, then the compiled rows as far as the deadline allows; they
# record themselves as skipped past it). Its budget is VK_TOTAL_TIMEOUT (default 240 s here).
# On a machine with 2 or more GPUs, "extra" also runs tests/test_distributed.py over NCCL
# (VITKERN_DIST_BACKEND=nccl, cap 60 s). Files of "extra": gpu_check.log, bench.log,
# results/summary.md and one JSON per family (5 or fewer).
#
# Knobs: PYTHON (python3), VK_TOTAL_TIMEOUT (540), VK_TUNE_TIMEOUT (150), VK_TESTS_TIMEOUT (180;
# 0 skips the tests), VK_GPU_TESTS (the selection above), VK_BENCH_FAMILIES (the four),
# VK_BENCH_TIMEOUT_<FAMILY> (nominal caps), VK_BENCH_ARGS (extra pytest arguments for every
# family, e.g. "-k bs64"), VITKERN_COMMIT (the commit to record when the copy has no .git).
# Without a GPU every step still runs (the tuner prints its candidates, the GPU tests skip, the
# benchmarks run their CPU smoke grid), which is how this script is checked on CPU.
set -u

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR [core|extra]" >&2
    exit 2
fi
PART=${2:-core}
case "$PART" in
    core) ;;
    extra)  # the second command: see PARTS above
        : "${VK_TOTAL_TIMEOUT:=240}" "${VK_TUNE_TIMEOUT:=0}" "${VK_TESTS_TIMEOUT:=0}"
        : "${VK_BENCH_FAMILIES:=attention_relpos models}" ;;
    *) echo "gpu_check.sh: PART must be core or extra, got '$PART'" >&2; exit 2 ;;
esac
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
TOTAL_TIMEOUT=${VK_TOTAL_TIMEOUT:-540}
TUNE_TIMEOUT=${VK_TUNE_TIMEOUT:-150}
TESTS_TIMEOUT=${VK_TESTS_TIMEOUT:-180}
GPU_TESTS=${VK_GPU_TESTS:-'-m gpu -k "not torch.float16"'}  # quotes kept: the step evals it
BENCH_FAMILIES=${VK_BENCH_FAMILIES:-patch_embed attention window_attention sr_attention}
KILL_GRACE=10
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
# One id for this script's benchmark runs: summary.md presents the families as one run.
export VK_BENCH_RUN_ID=${VK_BENCH_RUN_ID:-gpu_check-$(date -u +%Y%m%dT%H%M%SZ)-$$}
# Imports keep working from the checkout even if the editable install fails.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

start=$(date +%s)
failed=()
note_failure() {  # what rc
    echo "=== $1 FAILED (exit $2)" | tee -a "$LOG"
    failed+=("$1 (exit $2)")
}
left_s() {  # seconds before the whole script's deadline
    echo $(( start + TOTAL_TIMEOUT - $(date +%s) ))
}
capped() {  # cap-seconds command... ; the cap is cut to what the total budget still allows
    local secs=$1 left
    shift
    left=$(( $(left_s) - KILL_GRACE ))
    [ "$secs" -gt "$left" ] && secs=$left
    if [ "$secs" -lt 5 ]; then
        echo "=== not run: no time left in the ${TOTAL_TIMEOUT}s budget" | tee -a "$LOG"
        return 124
    fi
    timeout -s INT -k "$KILL_GRACE" "$secs" "$@"
}
step() {  # title
    echo "=== [$(( $(date +%s) - start ))s] $1" | tee -a "$LOG"
}

echo "=== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO (budget ${TOTAL_TIMEOUT}s)" | tee "$LOG"

# 1. Install (editable, no dependencies: the image has them and there is no network).
step "install: $PY -m pip install --no-deps --no-build-isolation -e ."
capped 60 "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
rc=$?
tail -n 1 "$LOG"
[ $rc -eq 0 ] || note_failure install $rc

# 2. Environment.
step "environment"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    capped 30 "$PY" - <<'EOF'
import importlib.util, platform, torch
from vitkern import _timing
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
env = _timing.environment(dev)
for key in ("device_name", "device_slug", "capability", "sm_count", "python", "torch", "cuda", "cudnn", "triton",
            "timm", "commit", "dirty"):
    print(f"{key}: {env.get(key)}")
print("pytest-xdist:", "yes" if importlib.util.find_spec("xdist") else "no (tests run serially)")
EOF
} >>"$LOG" 2>&1
SLUG=$("$PY" -c "import torch; from vitkern import _timing; print(_timing.device_slug(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>/dev/null || echo unknown)
CORES=$(nproc 2>/dev/null || echo 16)
XDIST=""  # 16 test workers on the 16-core GPU host, fewer on a smaller machine
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n $(( CORES < 16 ? CORES : 16 ))"
REPORT_JOBS=$(( CORES >= 16 ? 4 : 1 ))
tail -n 14 "$LOG"

# Background: the static compile report on 4 cores while the tuner and the tests run.
report_dir=$(mktemp -d)
report_pid=""
if [ $(( TUNE_TIMEOUT + TESTS_TIMEOUT )) -gt 0 ]; then
    ( timeout -s INT -k 5 $(( TUNE_TIMEOUT + TESTS_TIMEOUT )) \
        "$PY" -m vitkern.tools.compile_report --out "$report_dir" --jobs "$REPORT_JOBS" >"$report_dir/stdout.log" 2>&1
      echo "exit $?" >>"$report_dir/stdout.log" ) &
    report_pid=$!
fi

# 3. Tuner: times the candidate configs on this GPU and writes the table the launchers read.
if [ "$TUNE_TIMEOUT" -le 0 ]; then
    step "tuner: skipped (VK_TUNE_TIMEOUT=0)"
else
step "tuner: $PY -m vitkern.tools.tune --out vitkern/configs/$SLUG.json --budget-s $(( TUNE_TIMEOUT - 10 )) (cap ${TUNE_TIMEOUT}s)"
capped "$TUNE_TIMEOUT" "$PY" -m vitkern.tools.tune --out "vitkern/configs/$SLUG.json" \
    --budget-s $(( TUNE_TIMEOUT - 10 )) >>"$LOG" 2>&1
rc=$?
[ $rc -eq 0 ] || note_failure "tuner" $rc
fi
if [ -f "vitkern/configs/$SLUG.json" ]; then
    mkdir -p "$OUT/tune" && cp "vitkern/configs/$SLUG.json" "$OUT/tune/$SLUG.json"
    echo "=== tune table: $OUT/tune/$SLUG.json" | tee -a "$LOG"
else
    echo "=== no tune table written (vitkern/configs/$SLUG.json)" | tee -a "$LOG"
fi

# 4. GPU tests.
if [ "$TESTS_TIMEOUT" -le 0 ]; then
    step "GPU tests: skipped (VK_TESTS_TIMEOUT=0)"
else
    step "GPU tests: $PY -m pytest tests $GPU_TESTS ${XDIST:-(serial)} -q -rfEs (cap ${TESTS_TIMEOUT}s)"
    # shellcheck disable=SC2086  # the selection and -n are split on purpose
    eval capped "$TESTS_TIMEOUT" "$PY" -m pytest tests $GPU_TESTS $XDIST -q -rfEs -p no:cacheprovider >>"$LOG" 2>&1
    rc=$?
    tail -n 15 "$LOG"
    case $rc in
        0 | 5) ;;  # 5: nothing selected or collected
        *) note_failure "GPU tests" $rc ;;
    esac
fi

# The compile report stops here at the latest; its last lines go to the log.
if [ -n "$report_pid" ]; then
kill -INT "$report_pid" 2>/dev/null
wait "$report_pid" 2>/dev/null
{
    echo "=== compile report (background; vitkern.tools.compile_report --jobs $REPORT_JOBS), last lines:"
    tail -n 12 "$report_dir/stdout.log" 2>/dev/null
} >>"$LOG"
fi
rm -rf "$report_dir"

# 5. Benchmarks: one capped pytest per family, sharing what is left in proportion to the nominal caps.
nominal() {
    local var="VK_BENCH_TIMEOUT_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
    if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
    case "$1" in
        patch_embed) echo 120 ;; attention) echo 130 ;; window_attention) echo 130 ;; sr_attention) echo 100 ;;
        attention_relpos) echo 60 ;; models) echo 180 ;;
        *) echo 120 ;;
    esac
}
nominal_left=0
fams_left=0
for fam in $BENCH_FAMILIES; do
    nominal_left=$(( nominal_left + $(nominal "$fam") ))
    fams_left=$(( fams_left + 1 ))
done
echo "=== benchmarks: ${BENCH_FAMILIES} (run id ${VK_BENCH_RUN_ID})" >"$OUT/bench.log"
for fam in $BENCH_FAMILIES; do
    file="benchmarks/bench_${fam}.py"
    nom=$(nominal "$fam")
    spare=$(( $(left_s) - fams_left * KILL_GRACE - 5 ))
    cap=$(( spare > 0 ? spare * nom / nominal_left : 0 ))
    nominal_left=$(( nominal_left - nom ))
    fams_left=$(( fams_left - 1 ))
    step "benchmarks $fam: $PY -m pytest --benchmark $file (cap ${cap}s)"
    if [ ! -f "$file" ]; then
        note_failure "benchmarks $fam ($file missing)" 2
        continue
    fi
    if [ "$cap" -lt 15 ]; then
        note_failure "benchmarks $fam (no time left)" 124
        continue
    fi
    fam_start=$(date +%s)
    # shellcheck disable=SC2086  # VK_BENCH_ARGS is split on purpose
    VK_BENCH_DEADLINE=$(( fam_start + cap )) capped "$cap" "$PY" -m pytest --benchmark "$file" -q -rfEs \
        -p no:cacheprovider --vk-results-dir "$OUT/results" --benchmark-columns=min,median,iqr,rounds \
        ${VK_BENCH_ARGS:-} >>"$OUT/bench.log" 2>&1
    rc=$?
    echo "=== benchmarks $fam: exit $rc after $(( $(date +%s) - fam_start )) s" | tee -a "$OUT/bench.log" "$LOG" >/dev/null
    grep -E "passed|failed|error" "$OUT/bench.log" | tail -n 1
    case $rc in
        0 | 5) ;;
        124 | 130 | 137) note_failure "benchmarks $fam (cap ${cap}s reached; partial results kept)" $rc ;;
        *) note_failure "benchmarks $fam" $rc ;;
    esac
done

# 5b. Distributed training of converted models over NCCL, where the machine has 2 or more GPUs.
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$PART" = extra ] && [ "$NGPU" -ge 2 ]; then
    step "distributed: VITKERN_DIST_BACKEND=nccl $PY -m pytest tests/test_distributed.py (cap 60s)"
    VITKERN_DIST_BACKEND=nccl capped 60 "$PY" -m pytest tests/test_distributed.py -q -rfEs -p no:cacheprovider \
        >>"$LOG" 2>&1
    rc=$?
    [ $rc -eq 0 ] || note_failure "distributed (nccl)" $rc
elif [ "$PART" = extra ]; then
    step "distributed: skipped ($NGPU GPU(s); NCCL needs 2)"
fi

# 6. Summary: the overview tables (the per-case tables stay in the file).
{
    echo "=== results/summary.md overview"
    if [ -f "$OUT/results/summary.md" ]; then
        awk '/^## /{detail=0} /^### /{detail=1} !detail' "$OUT/results/summary.md"
    else
        echo "(missing)"
    fi
    echo "=== files in $OUT"
    (cd "$OUT" && find . -type f | sort)
    echo "=== done in $(( $(date +%s) - start )) s"
} >>"$LOG"
tail -n 4 "$LOG"
if [ ${#failed[@]} -gt 0 ]; then
    echo "=== FAILED: ${failed[*]}" | tee -a "$LOG"
    exit 1
fi
echo "=== all steps passed" | tee -a "$LOG"
exit 0
