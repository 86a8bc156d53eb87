#!/usr/bin/env bash
# On a machine with a CUDA GPU, from the repository root's environment (README's test setup): the test suite's
# CUDA-marked tests, then the CUDA paths timed on one shared dataset as one table (bench/bench_gpu.py):
# extraction, modes frozen and finetune, export and serve. About 5 to 10 minutes on one GPU.
#   bash bench/gpu_check.sh [DATA]      (default: ../shared/datasets/oxford17_flowers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here: nothing to check')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
"$PY" -m pytest -m cuda -q -p no:cacheprovider
cd bench && "../$PY" bench_gpu.py ${1:+--data "$1"}
