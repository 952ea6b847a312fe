#!/usr/bin/env bash
# The GPU figures of the README in one command, under 8 minutes on an H100/H200, and the rates
# cost.py prices the study with, written into bench/rates.json (a copy goes to $OUT when set):
#     bash bench/gpu.sh ../shared/data
#     WHEELS=PACK/wheels XLGEN_CACHE=PACK/cache bash bench/gpu.sh PACK/data   # a node without internet:
#                                                   # PACK from bench/offline_pack.sh on a machine with it
#   0. the tiny models whose tokenizers the benchmarks use, built on first use (seconds when
#      XLGEN_CACHE holds them; untimed, so no step spends its limit on a first build)
#   1. training at the real mT5-base dimensions, bf16, 4,000-token batches: eager against --compile
#      (bucketed shapes, compiled loss, fused AdamW), ~205 steps each; loss curves over those steps
#      compared on a pass with dropout off, then the rate of a second (steady) pass with dropout on
#   2. decoding the 141 XL-Sum-length documents at mT5-base dimensions: HF generate, ours dynamic,
#      compiled, compiled on device-sized batches (each one's predictions compared with HF
#      generate's; the static decoder uncompiled is a CPU configuration, left out for time)
#   3. the compiled-auto decoding rate at mBART-50 and NLLB-600M dimensions (their tokens are checked
#      against HF generate by the CPU tests)
#   4. beam search (4 beams) of translate-train's work at NLLB-600M dimensions: the sentences of 8
#      SQuAD paragraphs (~300) in translate_train.py's 4,000-token batches, HF generate against the
#      compiled static decoder (translations compared); cost.py prices the translations
#      (NLLB-3.3B) at the faster one's FLOP/s
#   5. step 2's decoders again in fp32, the check that their tokens are HF generate's on the 141
#      documents: in bf16 a kernel of another shape (the static cache's longer attention, larger
#      batches, inductor's fused kernels) rounds otherwise and a random model's near-ties flip
#      tokens, which step 2's "same as" column shows; fp32 rounding is too fine to flip one. Last:
#      it gets what steps 1-4 leave of BUDGET (no rates depend on it)
#   6. cost.py and the study's dry-run total at the rates just measured (at once: ~12 s)
# Steps 1-5 have time limits of 555 s in all, and none runs past BUDGET (455 s) from the start: a
# step that would is cut at it, and one that starts after it is skipped, so with the ~20 s of the
# rest the script ends within 8 minutes; a step that hangs or is cut leaves the others' figures, and
# its own configurations measured before the cut: each bench prints a configuration's row and writes
# its rates as soon as it is measured (training's --budget cuts a configuration that would outlast
# the step's limit, so the bench itself ends and says which it left out).
# WHEELS: a folder of wheels installed into a temporary folder ahead of the Python's own packages
# (a GPU node's image keeps its CUDA build of torch and takes the pinned transformers from there).
set -uo pipefail
failed=0
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHON=$PY                       # run_all.sh's, for the dry runs
BUDGET=${GPU_SH_BUDGET:-455}
RATES=bench/rates.json

step() {  # step LIMIT COMMAND...: COMMAND under the lesser of LIMIT and what is left of BUDGET
    local limit=$1 left=$((BUDGET - SECONDS))
    shift
    if [ "$left" -le 0 ]; then
        echo "bench/gpu.sh: skipped, its ${BUDGET} s are spent: ${*:2:3}" >&2
        failed=1
        return
    fi
    timeout "$((limit < left ? limit : left))" "$@" || failed=1
}

if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import sys, torch, transformers, models
print('torch', torch.__version__, 'transformers', transformers.__version__)
for name in ('tiny-mt5', 'tiny-mbart', 'tiny-nllb'):
    models.load_tokenizer(name, sys.argv[1])" "$DATA" || failed=1
step 220 "$PY" bench/train_throughput.py --dims mt5-base --device cuda --data-dir "$DATA" --num-examples 3100 \
    --modes ours,ours-compiled --curve --mode-timeout 150 --budget 210 --rates "$RATES"
step 120 "$PY" bench/generate_throughput.py --dims mt5-base --device cuda --data-dir "$DATA" --workloads xlsum \
    --configurations hf-sorted,ours,compiled,compiled-auto --rates "$RATES"
for dims in mbart-large-50 nllb-600M; do
    step 40 "$PY" bench/generate_throughput.py --dims "$dims" --device cuda --data-dir "$DATA" --workloads xlsum \
        --configurations compiled-auto --rates "$RATES"
done
step 45 "$PY" bench/generate_throughput.py --dims nllb-600M --device cuda --data-dir "$DATA" --workloads translate \
    --num-beams 4 --max-tokens 4000 --paragraphs 8 --configurations hf-sorted,compiled --rates "$RATES"
step 90 "$PY" bench/generate_throughput.py --dims mt5-base --device cuda --data-dir "$DATA" --workloads xlsum \
    --configurations hf-sorted,compiled,compiled-auto --precision fp32
# the three pricings at once (~12 s on 2 cores, not ~21 s one after another), printed in order
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
