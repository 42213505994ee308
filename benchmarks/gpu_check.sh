#!/usr/bin/env bash
# gileak's device check: one command, under 8 minutes on an H200 (the steps' limits add up to 479 s;
# on a first run no step's time there was known), that writes what it found to
# $OUT (summary.json, summary.md, logs.tar.gz — three files, as the device tool brings back at
# most eight). Each step has its own time limit; a step that fails or runs out of time is
# recorded and the script goes on.
#
#   1. wheels      pip-installs gpu-wheels/ (benchmarks/gpu_wheels.sh) into a target dir, with no
#                  index and no dependencies; gileak itself runs from this source tree (PYTHONPATH)
#   2. env         Python, torch, GPU, driver, precision settings, private torch APIs present
#   3. tests       tests/test_cuda.py -m cuda: engine equivalence and every attack on the GPU
#   4. cpu-tests   on this torch: torch's line search bit for bit against the batched solver's,
#                  the private-API fallbacks (tests/test_compat.py)
#   5. throughput  benchmarks/attack_throughput.py --device cuda: cnn (ig; idlg at N <= 128),
#                  resnet18 and vit at N = 1, 32, 128, 512, useful FLOP/s as a share of the
#                  same run's float32 and TF32 matmul
#   6. bench       the quick default bench (`gileak bench`) on the GPU
#   7. dry-run     `gileak bench --profile paper --dry-run` for the commands of Tables II-VI
#                  (docs/reproducing.md), cost on this GPU and each attack's engine
#   8. summary     benchmarks/gpu_check_summary.py: the JSON and Markdown summary, the GPU goals
#
# Usage (repository root or anywhere):
#   benchmarks/gpu_wheels.sh                 # once, where pip reaches PyPI (skip where gileak's
#                                            # dependencies are installed already)
#   OUT=/some/dir benchmarks/gpu_check.sh    # on the CUDA machine ($OUT defaults to gpu-check-out/)
#   benchmarks/gpu_check.sh --rehearse       # the same plumbing on the CPU with tiny sizes
# PYTHON (default python3) is the interpreter; GILEAK_CHECK_SCALE multiplies every time limit.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gileak-gpu-check.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/runs"
STEPS="$WORK/steps.tsv"
: > "$STEPS"
export COLUMNS=200 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
STARTED=$(date +%s)

if [ "$REHEARSE" = 1 ]; then
    DEVICE=cpu SCALE=${GILEAK_CHECK_SCALE:-6} MARK="not cuda"
    VICTIMS=1,2 SMALL_VICTIMS=1,2
    IG_SIZES="--iterations 2 --loop-iterations 1 --repeats 1" LBFGS_REPEATS=1
    BIG_SIZES="--iterations 1 --loop-iterations 1 --repeats 1"
    BENCH_SIZES="--victims 2 --iterations 20"
    DRY_SIZES="--victims 2 --iterations 10 --seeds 1"
else
    DEVICE=cuda SCALE=${GILEAK_CHECK_SCALE:-1} MARK="cuda"
    VICTIMS=1,32,128,512 SMALL_VICTIMS=1,32,128
    # (the L-BFGS row times the batched solver --repeats times before its loop and again after)
    IG_SIZES="--iterations 20 --loop-iterations 5 --repeats 3" LBFGS_REPEATS=2
    BIG_SIZES="--iterations 3 --loop-iterations 3 --repeats 2"
    BENCH_SIZES=""
    DRY_SIZES=""
fi

# step NAME LIMIT_SECONDS COMMAND...: run it with its log in logs/NAME.log, record rc and time
step() {
    local name=$1 limit=$(( $2 * SCALE )); shift 2
    local begun=$(date +%s.%N)
    printf '%-22s ' "$name"
    timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    local rc=$?
    local seconds=$(awk -v a="$begun" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >> "$STEPS"
    case $rc in
        0) echo "ok      ${seconds}s" ;;
        124|137) echo "TIMEOUT ${seconds}s (limit ${limit}s)" ;;
        *) echo "FAILED  rc=$rc ${seconds}s (see logs/$name.log)" ;;
    esac
}
gileak() {  # the CLI from the source tree, under `step`
    "$PYTHON" -c 'import sys; from gileak.cli import main; sys.argv[0] = "gileak"; main()' "$@"
}
export -f gileak 2>/dev/null
export PYTHON

echo "gileak device check: device=$DEVICE rehearse=$REHEARSE out=$OUT work=$WORK"

# 1. wheels (none to install where gileak's dependencies are there already)
SITE="$WORK/site"
if ls gpu-wheels/*.whl > /dev/null 2>&1; then
    step wheels 15 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" gpu-wheels/*.whl
else
    echo "no gpu-wheels/ (benchmarks/gpu_wheels.sh): using the interpreter's own packages" | tee "$WORK/logs/wheels.log"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 2. environment
step env 15 "$PYTHON" benchmarks/gpu_check_summary.py env --device "$DEVICE" --json "$WORK/env.json"

# 3-4. tests: the GPU variants, then this torch's CPU-side contracts
step tests 70 "$PYTHON" -m pytest -p no:cacheprovider -q -m "$MARK" tests/test_cuda.py --junitxml="$WORK/junit-tests.xml"
step cpu-tests 15 "$PYTHON" -m pytest -p no:cacheprovider -q tests/test_compat.py \
    "tests/test_lbfgs.py::test_the_search_generator_takes_torchs_strong_wolfe_steps_bit_for_bit" \
    "tests/test_lbfgs.py::test_cubic_interpolation_is_torchs_bit_for_bit_on_hostile_values" \
    "tests/test_lbfgs.py::test_numpy_scalar_arithmetic_is_torchs_0d_tensor_arithmetic_on_hostile_values" \
    --junitxml="$WORK/junit-cpu-tests.xml"

# 5. throughput (each writes its JSON row by row: a step cut short keeps what it measured)
step throughput-cnn 40 "$PYTHON" benchmarks/attack_throughput.py --device "$DEVICE" --models cnn --attacks ig \
    --victims "$VICTIMS" $IG_SIZES --loop-victims 8 --no-vmap --json "$WORK/throughput-cnn.json"
step throughput-cnn-lbfgs 35 "$PYTHON" benchmarks/attack_throughput.py --device "$DEVICE" --models cnn --attacks idlg \
    --victims "$SMALL_VICTIMS" $IG_SIZES --repeats "$LBFGS_REPEATS" --loop-victims 4 --loop-repeats 1 \
    --json "$WORK/throughput-cnn-lbfgs.json"
step throughput-resnet18 50 "$PYTHON" benchmarks/attack_throughput.py --device "$DEVICE" --models resnet18 \
    --attacks ig --victims "$VICTIMS" $BIG_SIZES --loop-victims 4 --no-vmap --json "$WORK/throughput-resnet18.json"
step throughput-vit 40 "$PYTHON" benchmarks/attack_throughput.py --device "$DEVICE" --models vit --attacks ig \
    --victims "$VICTIMS" $BIG_SIZES --loop-victims 4 --no-vmap --json "$WORK/throughput-vit.json"

# 6. the quick default bench (README's first command)
step bench 35 bash -c "gileak bench --device $DEVICE $BENCH_SIZES --out '$WORK/runs/quick' \
    --export '$WORK/bench.json'"

# 7. --dry-run of the paper's tables (the commands of docs/reproducing.md, --out in the work dir)
dry() {  # dry NAME LIMIT ARGS...
    local name=$1 limit=$2; shift 2
    step "dry-$name" "$limit" bash -c 'gileak "$@"' gileak bench --profile paper "$@" --device "$DEVICE" \
        $DRY_SIZES --dry-run --out "$WORK/runs/$name"
}
dry table2 12 --datasets cifar10 --models cnn --defenses "none,precode(position=1|2|3)" --attacks ig,ignore
dry table3 25 --datasets mnist,cifar10 --models cnn --defenses none,cvb \
    --attacks "idlg,cpl,ig,idlg(ignore_stochastic=true),cpl(ignore_stochastic=true),ignore"
dry table4 20 --datasets mnist,cifar10 --models cnn \
    --defenses "none,dp(sigma=0.001|0.01|0.1|1),gc(ratio=0.9|0.99)" --attacks ig
dry table4-ignore 15 --datasets mnist,cifar10 --models cnn --defenses "precode(size=8|16|32|64|128|256|512),cvb" \
    --attacks ignore
dry table5-cnn 10 --datasets mnist,cifar10 --models cnn --defenses none,cvb --attacks ig,ignore
dry table5-resnet18 25 --datasets mnist,cifar10 --models "resnet18(norm=group)" \
    --defenses "none,cvb(position=2,beta=0.00005)" --attacks ig,ignore
dry table5-vit 25 --datasets mnist,cifar10 --models vit --defenses "none,cvb(position=1,kernel=3)" --attacks ig,ignore
dry table6-pneumonia 8 --datasets pneumoniamnist --models cnn --defenses "none,cvb(beta=0.001)" --attacks ig,ignore
dry table6-derma 8 --datasets dermamnist --models cnn --defenses "none,cvb(kernel=3)" --attacks ig,ignore
dry table6-retina 8 --victims 98 --datasets retinamnist --models cnn --defenses "none,cvb(kernel=3,beta=0.001)" \
    --attacks ig,ignore
dry table6-blood 8 --datasets bloodmnist --models cnn --defenses none,cvb --attacks ig,ignore

# 8. summary: JSON + Markdown + the logs, in $OUT
ELAPSED=$(( $(date +%s) - STARTED ))
if ! "$PYTHON" benchmarks/gpu_check_summary.py summary --work "$WORK" --out "$OUT" --device "$DEVICE" \
        --rehearse "$REHEARSE" --elapsed "$ELAPSED" > "$WORK/logs/summary.log" 2>&1; then
    echo "the summary failed (logs/summary.log); the steps table is in $OUT/steps.tsv"
    cp "$STEPS" "$OUT/steps.tsv"
fi
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs steps.tsv $(cd "$WORK" && ls *.json *.xml 2>/dev/null)
echo "done in $(( $(date +%s) - STARTED ))s: $OUT/summary.md"
cat "$OUT/summary.md" 2>/dev/null | head -60
