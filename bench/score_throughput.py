"""Scoring throughput of evaluate.py's CLI (LID + metric) on 10,000+ predictions.

    python bench/score_throughput.py --data-dir ../shared/data

Two workloads, each timed end to end as a user runs it (a fresh `python evaluate.py` process,
imports and fastText model load included):
  qa    SQuAD v1.1 dev, 10,570 questions, the BERT leaderboard predictions (EM/F1 + filtered F1 + LCR)
  sum   10,000 summaries in XL-Sum jsonl format (GUM documents cycled, lead-1 predictions),
        ROUGE-1/2/L in multilingual mode + LCR
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="data directory")
    parser.add_argument("--num-summaries", type=int, default=10_000, help="size of the summarisation workload")
    parser.add_argument("--repeats", type=int, default=3, help="runs per workload; the best is reported")
    return parser.parse_args(argv)


def time_cli(argv, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "evaluate.py")] + argv,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main(args):
    with tempfile.TemporaryDirectory() as tmp:
        squad_dev = os.path.join(args.data_dir, "squad", "dev-v1.1.json.gz")
        bert = os.path.join(args.data_dir, "squad", "predictions", "BERT.json")
        with open(bert) as f:
            num_qa = len(json.load(f))
        qa_s = time_cli(["--task", "squad", "--lang", "en", "--references", squad_dev, "--predictions", bert,
                         "--out", os.path.join(tmp, "qa.json")], args.repeats)

        gum = data.read_xlsum(os.path.join(args.data_dir, "summarization", "gum_en.jsonl"))
        refs, preds = os.path.join(tmp, "refs.jsonl"), os.path.join(tmp, "preds.jsonl")
        with open(refs, "w") as r, open(preds, "w") as p:
            for i in range(args.num_summaries):
                record = dict(gum[i % len(gum)], id=f"gum-{i}")
                r.write(json.dumps(record) + "\n")
                p.write(json.dumps({"id": record["id"], "prediction": data.split_sentences(record["text"])[0]}) + "\n")
        sum_s = time_cli(["--task", "xlsum", "--lang", "en", "--references", refs, "--predictions", preds,
                          "--out", os.path.join(tmp, "sum.json")], args.repeats)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'workload':<34}{'predictions':>12}{'seconds':>10}{'predictions/s':>15}")
    print(f"{'qa  (SQuAD dev, EM/F1/LID)':<34}{num_qa:>12,}{qa_s:>10.2f}{num_qa / qa_s:>15,.0f}")
    print(f"{'sum (XL-Sum jsonl, ROUGE/LID)':<34}{args.num_summaries:>12,}{sum_s:>10.2f}{args.num_summaries / sum_s:>15,.0f}")


if __name__ == "__main__":
    main(parse_args())
