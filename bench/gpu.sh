#!/usr/bin/env bash
# The GPU figures of the README, in one go (about 5 minutes on an H100/H200): training and
# evaluation generation at the real mT5-base dimensions, bf16 autocast, 4000-token batches.
#     bash bench/gpu.sh ../shared/data
set -uo pipefail
failed=0
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"${PYTHON:-python}" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"${PYTHON:-python}" bench/train_throughput.py --dims mt5-base --device cuda --data-dir "$DATA" --num-examples 4000 || failed=1
"${PYTHON:-python}" bench/generate_throughput.py --dims mt5-base --device cuda --data-dir "$DATA" || failed=1
exit $failed
