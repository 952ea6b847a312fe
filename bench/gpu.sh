#!/usr/bin/env bash
# The GPU figures of the README in one command (under 8 minutes on an H100/H200: each step has a
# time limit, 465 s in all, the pricing at the end ~12 s), and the rates
# cost.py prices the study with, written into bench/rates.json (a copy goes to $OUT when set):
#     bash bench/gpu.sh ../shared/data
#   1. training at the real mT5-base dimensions, bf16, 4,000-token batches: eager against --compile
#      (bucketed shapes, compiled loss, fused AdamW), ~205 steps each; loss curves over those steps
#      compared on a pass with dropout off, then the rate of a second (steady) pass with dropout on
#   2. decoding the 141 XL-Sum-length documents at mT5-base dimensions: HF generate, ours dynamic,
#      compiled, compiled on device-sized batches (predictions checked against HF generate; the
#      static decoder uncompiled is a CPU configuration, left out for time)
#   3. the compiled-auto decoding rate at mBART-50 and NLLB-600M dimensions (their tokens are checked
#      against HF generate by the CPU tests)
#   4. beam search (4 beams) of translate-train's work at NLLB-600M dimensions: the sentences of 8
#      SQuAD paragraphs (~300) in translate_train.py's 4,000-token batches, HF generate against the
#      compiled static decoder (translations checked equal); cost.py prices the translations
#      (NLLB-3.3B) at the faster one's FLOP/s
#   5. cost.py and the study's dry-run total at the rates just measured
# Each step has its own time limit, so one that hangs leaves the others' figures.
set -uo pipefail
failed=0
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
PY=${PYTHON:-python}
RATES=bench/rates.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 220 "$PY" bench/train_throughput.py --dims mt5-base --device cuda --data-dir "$DATA" --num-examples 3100 \
    --modes ours,ours-compiled --curve --mode-timeout 150 --rates "$RATES" || failed=1
timeout 120 "$PY" bench/generate_throughput.py --dims mt5-base --device cuda --data-dir "$DATA" --workloads xlsum \
    --configurations hf-sorted,ours,compiled,compiled-auto --rates "$RATES" || failed=1
for dims in mbart-large-50 nllb-600M; do
    timeout 40 "$PY" bench/generate_throughput.py --dims "$dims" --device cuda --data-dir "$DATA" --workloads xlsum \
        --configurations compiled-auto --rates "$RATES" || failed=1
done
timeout 45 "$PY" bench/generate_throughput.py --dims nllb-600M --device cuda --data-dir "$DATA" --workloads translate \
    --num-beams 4 --max-tokens 4000 --paragraphs 8 --configurations hf-sorted,compiled --rates "$RATES" || failed=1
# the three pricings at once (~10 s, not ~25 s one after another), printed in order
rest=$(mktemp -d)
"$PY" cost.py > "$rest/cost" 2>&1 & cost=$!
(bash run_all.sh --dry-run --out-dir /tmp/xlgen-gpu-dry-run | sed -n '/estimated GPU-hours/,/total/p') > "$rest/dry" 2>&1 & dry=$!
(bash run_all.sh --dry-run --val-cap 1000 --out-dir /tmp/xlgen-gpu-dry-run-cap | grep ' total ') > "$rest/cap" 2>&1 & cap=$!
for job in cost dry cap; do
    wait "${!job}" || failed=1
    cat "$rest/$job"
done
rm -rf "$rest"
if [ -n "${OUT:-}" ]; then cp "$RATES" "$OUT/"; fi
exit $failed
