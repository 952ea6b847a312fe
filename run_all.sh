#!/usr/bin/env bash
# Reproduce the study of Chirkova & Nikoulina (NAACL 2024): every stage of the protocol, then the report.
#
#   python download.py --data-dir data                                    # once, with internet
#   bash run_all.sh --out-dir study                                       # local GPU, one run after another
#   LAUNCH="sbatch --gres=gpu:1 --wrap" bash run_all.sh --out-dir study   # each run submitted to a scheduler
#   bash run_all.sh --tiny --data-dir ../shared/data --xlsum-dir tests/fixtures/xlsum --out-dir study-tiny
#   bash run_all.sh --dry-run                                             # print every command of the study
#
# The stages and their order are study.STAGES (`python study.py --help`): intermediate tuning, the LR
# search, every method at {PLR, 10 PLR} x {without, with IT}, translate-train, mT5-large, the report.
# Each stage decides its runs from the results of the previous ones; a run whose results exist is
# skipped, so the script can be rerun after an interruption. It exits non-zero if any run failed.
set -euo pipefail
cd "$(dirname "$0")"
exec python study.py all "$@"
