#!/bin/bash
# Device side of benchmarks/gpu/pack.sh: unpack once, optionally smoke-test the CUDA paths, run
# benchmarks/bench_gpu_short.py with the given flags under a hard limit, and leave the outputs (no weights) in $OUT.
#   SMOKE=1 (default) runs 2 steps per stage of finetune and invcoss first and stops if that fails.
#   STEP=1 (default) first times the stage loop's steps (benchmarks/bench_gpu_step.py: batch sizes, loss read-backs).
#   DEADLINE (s, default 370): no method starts that would end later; HARD (s, default 470): the run is killed.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ ! -d /tmp/g/data ]; then
  mkdir -p /tmp/g && xz -dc .gpudata/bundle.tar.xz | tar xf - -C /tmp/g && gzip -1 /tmp/g/data/fetched/ct/*.nii || exit 3
fi
export PYTHONPATH=$PWD:/tmp/g/site PYTHONUNBUFFERED=1
D=/tmp/g/data/fetched
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch; print(torch.__version__)"; } \
  2>&1 | tee "$OUT/env.txt"
if [ "${SMOKE:-1}" = 1 ]; then
  timeout 150 python3 benchmarks/bench_gpu_short.py --data $D --out /tmp/smoke --stage-steps 2,2,2 \
    --epochs-per-stage 1 --probe-samples 100 --recon-test 32 --smoke --methods finetune,invcoss > "$OUT/smoke.log" 2>&1
  RC=$?; echo "smoke rc $RC" | tee -a "$OUT/env.txt"
  [ $RC -ne 0 ] && { tail -40 "$OUT/smoke.log"; exit 4; }
fi
if [ "${STEP:-1}" = 1 ]; then
  timeout 75 python3 benchmarks/bench_gpu_step.py --batch-sizes "${STEP_BATCHES:-64,512}" --steps 80 \
    --json "$OUT/step.json" > "$OUT/step.log" 2>&1
  echo "step bench rc $?" | tee -a "$OUT/env.txt"; cat "$OUT/step.log"
fi
timeout "${HARD:-470}" python3 benchmarks/bench_gpu_short.py --data $D --out /tmp/short --deadline "${DEADLINE:-370}" \
  "$@" > "$OUT/short.log" 2>&1
RC=$?; echo "main rc $RC" | tee -a "$OUT/env.txt"
[ $RC -ne 0 ] && timeout 45 python3 benchmarks/bench_gpu_short.py --data $D --out /tmp/short --report-only "$@" \
  > "$OUT/report.log" 2>&1
(cd /tmp/short && tar czf "$OUT/short.tar.gz" --exclude='*.safetensors' --exclude='*.work' .)
tail -20 "$OUT/short.log"; echo "total $(( $(date +%s) - T0 )) s"
