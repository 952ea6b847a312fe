#!/usr/bin/env bash
# Reproduce the study of Chirkova & Nikoulina (NAACL 2024): every stage of the protocol, then the report.
#
#   python download.py --data-dir data                                    # once, with internet
#   bash run_all.sh --out-dir study                                       # local GPU, one run after another
#   LAUNCH="sbatch --gres=gpu:1 --wrap" bash run_all.sh --out-dir study   # each run submitted to a scheduler
#   bash run_all.sh --tiny --data-dir ../shared/data --xlsum-dir tests/fixtures/xlsum --out-dir study-tiny
#   bash run_all.sh --dry-run                                             # print every command of the study
#   bash run_all.sh --rouge xlsum ...    # the ROUGE that selects and fills XL-Sum's tables (default gem, the paper's)
#   bash run_all.sh --scope full ...     # beyond the paper: every method and translate-train for every model (default paper)
#
# Each stage decides its runs from the results of the stages before it (plan.json, chosen.json in
# the study directory); a run whose results exist is skipped, so the script can be rerun after an
# interruption, and one stage can be run alone: python study.py methods --out-dir study.
# The script exits non-zero if any run failed, after finishing everything it can.
set -euo pipefail
cd "$(dirname "$0")"

stages=(
    guard       # every model learns a few English examples through the real pipeline (F1 >= 90, ROUGE-2 >= 80)
    it          # intermediate tuning: Prefix-LM on raw text of the target languages, once per model
    lr-search   # per task x model, the LR search of each method that has its own (full, adapters, prompt, ...):
                #   {1e-3, 1e-4, 1e-5}, extended while the non-English validation metric improves -> the PLR
    methods     # per task x model x method: the best of {PLR, 10 PLR} x {without IT, with IT}
    figures     # what only the figures need: freeze and mix at a fixed LR (Figure 1), full finetuning's 3rd run (Figure 3)
    translate   # translate-train: the English data translated (NLLB-3.3B), full finetuning on it, its own LR search
    large       # mT5-large at LR 1e-5 (Table 2)
    appendix-b  # IT with the ZmBART-like objective, then freeze at the PLR (Figure 5)
    appendix-c  # mixing in Prefix-LM or the model's own pretraining task at several probabilities, XL-Sum (Figure 6)
    appendix-d  # the best LR for English: its outputs translated into the target language (Table 3)
    report      # the tables and figures (report.py)
)
# one process for all stages, so that the dry run can show every stage's commands (its made-up
# results live in memory only); `python study.py STAGE ...` runs one
"${PYTHON:-python}" study.py "${stages[@]}" "$@"   # PYTHON: another interpreter
