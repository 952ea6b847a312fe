"""How many validation examples per language LR selection needs (study.py --val-cap N).

    python bench/validation_cap.py --data-dir ../shared/data

Selection compares two settings (neighbouring LRs, IT or not) on the same validation examples by
their metric averaged over the validation languages. What decides whether a cap of N examples per
language keeps that choice is the standard error of the *difference* of the two settings' means on
N examples (paired: the same questions), against the gaps the paper's selection resolves.

Per-example F1 comes from real system outputs: the two published cross-lingual systems of
../shared/data/xquad/predictions (CL-mt5base: mT5-base finetuned on English SQuAD; CL-mlpp15out1sum),
scored by evaluate.score on XQuAD en/es/zh (1,190 questions each). For each language: each system's
mean F1 and per-question spread, and the standard error of the mean paired difference at each cap
(a cap takes a language's first N examples, as finetune.py --max-val-examples does), and with no
cap (all N). "Selection" is the average
over three languages, as the paper's three held-out XQuAD languages: its standard error is that of
a mean of three. The first-N estimate of the difference is printed beside the full-set one.

ROUGE-2 (XL-Sum) has no real outputs here: its per-summary spread is an assumption (--rouge2-sd),
printed as such, and turned into the same standard errors over XL-Sum's five validation languages.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402

SYSTEMS = ("CL-mt5base", "CL-mlpp15out1sum")
LANGS = ("en", "es", "zh")
CAPS = (100, 250, 500, 1000)
# Gaps the paper's selection resolves (Table 1: with against without IT, at the chosen LR): XQuAD F1
# and XL-Sum ROUGE-2, the non-zero entries.
PAPER_GAPS = {"xquad F1": [6.3, 9.0, 3.1, 8.3, 11.2, 1.3, 1.0, 3.9, 26.8, 25.1],
              "xlsum ROUGE-2": [0.1, 2.5, 0.6, 1.0, 4.3, 4.1, 3.9, 7.5, 7.2]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="data directory")
    p.add_argument("--rouge2-sd", type=float, default=10.0,
                   help="assumed per-summary spread of the ROUGE-2 difference of two settings, in points")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def label(cap):
    return "all" if cap == math.inf else str(cap)


def mean(xs):
    return sum(xs) / len(xs)


def sd(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def standard_error(spread, n, population):
    """Of a mean of n values (at most the `population` there are) with this spread."""
    return spread / math.sqrt(min(n, population))


def per_question_f1(data_dir, system, lang):
    questions = data.read_squad(data.xquad_path(data_dir, lang))
    with open(os.path.join(data_dir, "xquad", "predictions", f"{system}.{lang}.json")) as f:
        predictions = json.load(f)
    _, details = evaluate.score("xquad", lang, predictions, questions)
    return [100 * row["f1"] for row in details]


def main(args):
    f1 = {(s, lang): per_question_f1(args.data_dir, s, lang) for s in SYSTEMS for lang in LANGS}
    caps = list(CAPS) + [math.inf]  # inf: every example
    out = {"xquad": {}, "caps": caps}
    print(f"XQuAD F1 per question, real outputs of {SYSTEMS[0]} (A) and {SYSTEMS[1]} (B)")
    print(f"{'lang':<6}{'N':>6}{'F1 A':>7}{'F1 B':>7}{'sd A':>7}{'sd A-B':>8}"
          + "".join(f"{f'SE@{label(c)}':>9}" for c in caps) + f"{'A-B all':>9}{'A-B 1st 500':>13}")
    se_by_cap = {c: [] for c in caps}
    for lang in LANGS:
        a, b = f1[SYSTEMS[0], lang], f1[SYSTEMS[1], lang]
        diff = [x - y for x, y in zip(a, b)]
        n = len(diff)
        ses = [standard_error(sd(diff), c, n) for c in caps]
        for c, se in zip(caps, ses):
            se_by_cap[c].append(se)
        out["xquad"][lang] = {"n": n, "mean_a": mean(a), "mean_b": mean(b), "sd_a": sd(a), "sd_diff": sd(diff),
                              "se_diff": dict(zip(map(label, caps), ses)), "diff_all": mean(diff),
                              "diff_first_500": mean(diff[:500])}
        print(f"{lang:<6}{n:>6}{mean(a):>7.1f}{mean(b):>7.1f}{sd(a):>7.1f}{sd(diff):>8.1f}"
              + "".join(f"{se:>9.2f}" for se in ses) + f"{mean(diff):>9.2f}{mean(diff[:500]):>13.2f}")
    selection = {c: math.sqrt(sum(se ** 2 for se in se_by_cap[c])) / len(LANGS) for c in caps}
    out["xquad_selection_se"] = {label(c): v for c, v in selection.items()}
    print(f"selection (mean of {len(LANGS)} languages): SE of the difference "
          + ", ".join(f"{selection[c]:.2f} at {label(c)}" for c in caps) + " F1 points")

    xlsum = data.get_task("xlsum")
    sizes = {lang: xlsum.sizes["val"][lang] for lang in xlsum.val_langs}
    rouge = {c: math.sqrt(sum(standard_error(args.rouge2_sd, c, n) ** 2 for n in sizes.values())) / len(sizes)
             for c in caps}
    out["xlsum_selection_se"] = {label(c): v for c, v in rouge.items()}
    out["rouge2_sd_assumed"] = args.rouge2_sd
    print(f"\nXL-Sum ROUGE-2, ASSUMED per-summary spread of a difference {args.rouge2_sd:g} points (no real outputs "
          f"offline); validation languages {', '.join(f'{k} {v:,}' for k, v in sizes.items())}")
    print("selection (mean of 5 languages): SE of the difference "
          + ", ".join(f"{rouge[c]:.2f} at {label(c)}" for c in caps) + " ROUGE-2 points")
    for name, gaps in PAPER_GAPS.items():
        print(f"paper Table 1 gaps, {name}: smallest {min(gaps):g}, median {sorted(gaps)[len(gaps) // 2]:g}")
    if args.json:
        common.write_text(args.json, json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main(parse_args())
