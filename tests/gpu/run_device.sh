#!/bin/bash
# The GPU check on a bare CUDA machine, in one bounded call, from the project root. The machine's image has torch,
# torchvision, numpy, pillow, httpx, pytest; the rest comes as wheels in .whl (`make gpu-wheels` prepares them).
# Results: $OUT/gpu.jsonl (one JSON line per record), $OUT/gpu-table.md (the targets), logs beside them.
# PARTS overrides the parts to run (e.g. PARTS="http oom" for a rerun of those); each has its own time limit.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, fastapi, service.app; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  || exit 4
declare -A LIMIT=([parity]=90 [syncs]=25 [speed]=35 [http]=100 [oom]=60 [cudatests]=45 [bench]=60)
for part in ${PARTS:-parity syncs speed http oom cudatests bench}; do
  echo "== $part (limit ${LIMIT[$part]}s) $(date +%T)"
  timeout -k 5 "${LIMIT[$part]}" python3 -m tests.gpu.gpu_check --device cuda --out "$OUT" "$part" > "$OUT/$part.out" 2>&1
  echo "== $part rc=$? $(date +%T)"
  tail -c 1500 "$OUT/$part.out"
done
python3 -m tests.gpu.gpu_check --out "$OUT" table
