#!/usr/bin/env bash
# The GPU checks that a CPU machine cannot run, in one short session (a lent GPU has about
# 15 minutes): the CUDA tests, a CUDA sweep and a stopped-and-resumed CUDA training run
# through the `modnorm` command (issue #5), how often Lanczos should check its stopping rule
# and the optimizer overhead on the GPU with full and mixed-precision dualization (issue #4),
# and `modnorm train --strategy ddp|fsdp` under torchrun with NCCL against the
# single-process run (issue #8).
#
# Each step has its own time limit (STEP_LIMIT seconds, default 150, and never past
# TOTAL_LIMIT seconds from the first step, default 480) and reports PASS, FAIL, TIMEOUT or SKIPPED
# with its wall time in $OUT/summary.txt, so one step that hangs (a collective that never
# completes, say) costs its limit and not the whole lease. It runs from a source
# checkout without installing anything (PYTHONPATH=src) where modnorm is not installed.
#
#   OUT=gpu-check bash benchmarks/gpu_check.sh
#   # on a lent machine, whose $OUT takes back few files: work elsewhere, copy the summaries
#   OUT=/tmp/gc TEXT=.devdata/shakespeare.txt bash benchmarks/gpu_check.sh; cp /tmp/gc/*.txt \
#       /tmp/gc/*.json "$OUT"   # (.devdata: an ignored copy of the corpus, carried along)
#   DEVICE=cpu OVERHEAD="--quick --widths 64" LANCZOS="--steps 4 --warmup 2" \
#       bash benchmarks/gpu_check.sh   # a dry run (tests/test_gpu_check.py runs one)
set -uo pipefail
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}
STEP_LIMIT=${STEP_LIMIT:-150}
TOTAL_LIMIT=${TOTAL_LIMIT:-480}
PY=${PY:-$(command -v python || command -v python3)}
TEXT=${TEXT:-../shared/data/shakespeare.txt}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
"$PY" -c "import modnorm" 2>/dev/null || export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv || true; } 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" |
    tee -a "$OUT/gpu.txt"

# the clock starts at the first step: the two Python start-ups above take seconds on a busy
# machine, and a limit of a few seconds would otherwise skip every step
deadline=$(($(date +%s) + TOTAL_LIMIT))
failed=0
step() {  # step NAME COMMAND...: run it under the time limit, log it, record the verdict
    local name=$1 start rc verdict limit
    shift
    start=$(date +%s)
    limit=$((deadline - start < STEP_LIMIT ? deadline - start : STEP_LIMIT))
    echo "== $name" | tee -a "$OUT/log.txt"
    if [ "$limit" -le 0 ]; then
        rc=-1
    else
        timeout -k 10 "$limit" "$@" >>"$OUT/log.txt" 2>&1
        rc=$?
    fi
    case $rc in
        -1) verdict=SKIPPED ;;
        0) verdict=PASS ;;
        124 | 137) verdict=TIMEOUT ;;
        *) verdict="FAIL (rc $rc)" ;;
    esac
    [ "$rc" = 0 ] || failed=1
    printf '%-10s %-14s %4d s\n' "$name" "$verdict" $(($(date +%s) - start)) |
        tee -a "$OUT/summary.txt"
}
MN=("$PY" -m modnorm.cli)  # `timeout` runs programs, not shell functions
# each run's training curve against $OUT/whole's: python compare.py OUT RUN...
cat >"$OUT/compare.py" <<'EOF'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
whole = json.load(open(f"{out}/whole/train.json"))["train_curve"]
for run in runs:
    curve = json.load(open(f"{out}/{run}/train.json"))["train_curve"]
    worst = max(abs(a - b) / abs(a) for a, b in zip(whole, curve, strict=True))
    print(f"{run} against the uninterrupted single-process run: worst relative difference {worst:.2e}")
    assert worst < 1e-4, run
EOF

# 1. the tests that skip without CUDA (optimizers on CUDA, bf16, exact resume on CUDA)
step tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_optim.py -k cuda

# 2. a width sweep on the GPU: the CLI's --device path end to end
step sweep "${MN[@]}" sweep --device "$DEVICE" --model resmlp --data digits --scale width \
    --values 64,512 --lrs 2^-4:2^0 --optimizers modnorm-adam,adam --steps 100 \
    --input-noise 1 --out "$OUT/sweep" --no-progress

# 3. a run stopped at step 50 and resumed must log the losses of the uninterrupted one
args=(train --device "$DEVICE" --model gpt --data "text:$TEXT" --width 128 --depth 2 --heads 4
      --context 64 --steps 100 --batch-size 16 --eval-every 50 --checkpoint-every 50
      --no-progress)
step whole "${MN[@]}" "${args[@]}" --out "$OUT/whole"
step stop "${MN[@]}" "${args[@]}" --out "$OUT/split" --stop-after 50
step resume "${MN[@]}" "${args[@]}" --out "$OUT/split" --resume
step same "$PY" "$OUT/compare.py" "$OUT" split

# 4. how often Lanczos should check its stopping rule on the GPU (each check is a sync)
# shellcheck disable=SC2086  # LANCZOS and OVERHEAD hold several arguments
step lanczos "$PY" benchmarks/lanczos_checks.py --device "$DEVICE" ${LANCZOS:-} --out "$OUT"

# 5. normalize / dualize cost on the GPU (full and mixed precision), widths 256…1024
# shellcheck disable=SC2086  # OVERHEAD holds several arguments
step overhead "$PY" benchmarks/optimizer_overhead.py --devices "$DEVICE" ${OVERHEAD:-} \
    --out "$OUT"

# 6. DDP and FSDP2 through NCCL (one process per GPU), against the single-process run
NPROC=${NPROC:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
for strategy in ddp fsdp; do
    step "$strategy" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
        -m modnorm.cli "${args[@]}" --strategy "$strategy" --out "$OUT/$strategy"
done
step same "$PY" "$OUT/compare.py" "$OUT" ddp fsdp

grep -h "worst relative\|^|\|passed\|failed\|skipped" "$OUT/log.txt" | tee -a "$OUT/summary.txt"
exit "$failed"
