#!/bin/bash
# Device side of the prepared GPU check (benchmarks/gpu/check.py): one command, ≤ 8 minutes, one JSON.
# Here, once: `bash benchmarks/gpu/pack.sh /path/to/samples` (our dependencies' wheels + the sample folder as
# .gpudata/bundle.tar.xz); on the GPU machine, from the repository root with .gpudata carried:
#     bash benchmarks/gpu/check.sh [check.py flags]        # writes $OUT/check.json and $OUT/check.log
# On a machine with the project installed (`make venv` with a CUDA torch) run check.py directly instead:
#     python benchmarks/gpu/check.py --data ~/.cache/invcoss/samples --json check.json
# HARD (s, default 470): the check is killed after this long.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -d /tmp/g/data ]; then
  mkdir -p /tmp/g && xz -dc .gpudata/bundle.tar.xz | tar xf - -C /tmp/g && gzip -1 /tmp/g/data/fetched/ct/*.nii || exit 3
fi
export PYTHONPATH=$PWD:/tmp/g/site PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch; print(torch.__version__)"; } \
  2>&1 | tee "$OUT/env.txt"
timeout "${HARD:-470}" python3 benchmarks/gpu/check.py --data /tmp/g/data/fetched --json "$OUT/check.json" "$@" \
  > "$OUT/check.log" 2>&1
RC=$?
tail -c 8000 "$OUT/check.log"; echo "check rc $RC"
exit $RC
