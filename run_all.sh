#!/usr/bin/env bash
# Reproduce the study of Chirkova & Nikoulina (NAACL 2024): every stage of the protocol, then the report.
#
#   bash run_all.sh --out-dir study                                        # local GPU, one run after another
#   LAUNCH="sbatch --gres=gpu:1 --wrap" bash run_all.sh --out-dir study    # each run submitted to a scheduler
#   bash run_all.sh --tiny --data-dir ../shared/data --out-dir study-tiny  # tiny models, offline, CPU
#   bash run_all.sh --dry-run                                              # print every command of the study
#
# Each stage decides its runs from the results of the previous ones (see study.py); a run whose results
# exist is skipped, so the script can be rerun after an interruption or a failed run.
set -euo pipefail
cd "$(dirname "$0")"

if [[ " $* " == *" --dry-run "* ]]; then
    python study.py all "$@"          # one process: the plan of every stage, each command printed once
    exit 0
fi
python study.py it "$@"               # intermediate tuning of each model (Prefix-LM)
python study.py lr-search "$@"        # preliminary LR per task x model x {full, adapters, prompt}
python study.py methods "$@"          # every method: {PLR, 10 PLR} x {without, with IT}
python study.py translate "$@"        # translate-train baseline
python study.py large "$@"            # mT5-large
python report.py "$@"                 # tables (Markdown, CSV) and figures (PNG)
