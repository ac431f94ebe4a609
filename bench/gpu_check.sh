#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR
# On a fresh GPU machine (torch and torchvision present, nothing else guaranteed), run the
# training benchmark and write JSON and text to OUTDIR. Python packages it lacks (pydantic,
# optuna, mlflow) can travel as wheels in .whl/ at the repository root. Under 5 minutes.
set -euo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 STYLEPIPE_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/versions.txt"
timeout 270 python3 -m bench.train_bench "$out" 2>&1 | tee "$out/train_bench.txt"
