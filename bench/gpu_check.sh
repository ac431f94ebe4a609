#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR
# On a fresh GPU machine (torch and torchvision present, nothing else guaranteed), run the
# training benchmark and write JSON and text to OUTDIR. Python packages it lacks (pydantic,
# optuna, mlflow) can travel as wheels in .whl/ at the repository root. Under 5 minutes:
# the benchmark gets 230 s (it measures the costly compiled variants last and rewrites its
# JSON after each measurement), the 4-trial study about 45 s.
# Wheels (installed with --no-deps) for what `python3 -c "import stylepipe.search.study"`
# finds missing there, fetched where the package index is reachable:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl PACKAGE==VERSION ...
# (on 2026-11-27: pydantic, optuna, mlflow and 43 of their dependencies, about 35 MB).
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
timeout 230 python3 -m bench.train_bench "$out" 2>&1 | tee "$out/train_bench.txt" || echo "train_bench ended early (status $?); train_bench.json holds what it measured"

# A 4-trial GPU study end to end (needs optuna and mlflow: carry them as wheels).
if python3 -c "import optuna, mlflow" 2>/dev/null; then
  study="$out/study"
  python3 - "$study" <<'PY' 2>&1 | tee "$out/gpu_study.txt"
import json, sys, time
from pathlib import Path
import pandas as pd
from bench.prepare_bench import make_corpus
from stylepipe.chain import run_search
from stylepipe.config import PrepareConfig, load_config
from stylepipe.data.prepare import prepare

root = Path(sys.argv[1])
make_corpus(root / "source", 96)
prepare(root / "source", root / "prepared", PrepareConfig(image_size=256, near_duplicate_distance=0,
        outlier_min_images=10**9, val_fraction=0.1), progress=False)
config = load_config("configs/demo.yaml", [f"run_dir={root / 'run'}", f"data.content={root / 'prepared'}",
    "data.image_size=256", "train.batch_size=16", "train.precision=bf16", "train.steps=150",
    "train.check_every=25", "search.n_trials=4", "search.eval_every=50", "search.pruner_warmup_steps=50",
    "search.top_k=2", "search.replay_seeds=1", "search.max_val_images=16", "final.steps=150",
    "search.space.lr=[1e-4,3.0]"])
started = time.perf_counter()
result = run_search(config, progress=False)
trials = pd.read_csv(result["trials_csv"])
safest = result["safest"]
summary = {"seconds": time.perf_counter() - started,
           "outcomes": result["outcomes"],
           "causes": trials["cause"].dropna().value_counts().to_dict(),
           "safest": safest and {"trial": safest.trial, "quality": safest.quality, "params": safest.params},
           "model": result["model"] and result["model"]["model_uri"]}
Path(sys.argv[1], "..", "gpu_study.json").resolve().write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps(summary, indent=2, default=str))
PY
else
  echo '{"skipped": "optuna/mlflow not installed"}' > "$out/gpu_study.json"
fi
