#!/usr/bin/env bash
# The GPU checks that a CPU machine cannot run, in one short session (a lent GPU has about
# 15 minutes): the CUDA tests, a CUDA sweep and a stopped-and-resumed CUDA training run
# through the `modnorm` command (issue #5), and the optimizer overhead on the GPU with
# full and mixed-precision dualization (issue #4). Everything lands under $OUT.
#
#   OUT=gpu-check bash benchmarks/gpu_check.sh
#   DEVICE=cpu OVERHEAD="--quick --widths 64" bash benchmarks/gpu_check.sh   # a dry run
set -euo pipefail
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt" || true

# 1. the tests that skip without CUDA (optimizers on CUDA, bf16, exact resume on CUDA)
python -m pytest -q -rs tests/test_optim.py -k cuda 2>&1 | tee "$OUT/tests.txt"

# 2. a width sweep on the GPU: the CLI's --device path end to end
modnorm sweep --device "$DEVICE" --model resmlp --data digits --scale width --values 64,512 \
    --lrs 2^-4:2^0 --optimizers modnorm-adam,adam --steps 100 --input-noise 1 \
    --out "$OUT/sweep" --no-progress 2>&1 | tail -n 25 | tee "$OUT/sweep.txt"

# 3. a run stopped at step 50 and resumed must log the losses of the uninterrupted one
TEXT=${TEXT:-../shared/data/shakespeare.txt}
args=(train --device "$DEVICE" --model gpt --data "text:$TEXT" --width 128 --depth 2 --heads 4
      --context 64 --steps 100 --batch-size 16 --eval-every 50 --checkpoint-every 50
      --no-progress)
modnorm "${args[@]}" --out "$OUT/whole"
modnorm "${args[@]}" --out "$OUT/split" --stop-after 50
modnorm "${args[@]}" --out "$OUT/split" --resume
python - "$OUT" <<'EOF' | tee "$OUT/resume.txt"
import json, sys
out = sys.argv[1]
whole, split = (json.load(open(f"{out}/{d}/train.json"))["train_curve"] for d in ("whole", "split"))
worst = max(abs(a - b) / abs(a) for a, b in zip(whole, split, strict=True))
print(f"resumed run against the uninterrupted one: worst relative difference {worst:.2e}")
EOF

# 4. normalize / dualize cost on the GPU (full and mixed precision), widths 256…1024
# shellcheck disable=SC2086  # OVERHEAD holds several arguments
python benchmarks/optimizer_overhead.py --devices "$DEVICE" ${OVERHEAD:-} --out "$OUT" 2>&1 |
    tee "$OUT/overhead.txt"
