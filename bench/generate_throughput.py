"""Evaluation generation: length-sorted token-budget batches against unsorted fixed-size batches.

    python bench/generate_throughput.py --data-dir ../shared/data
    python bench/generate_throughput.py --data-dir ../shared/data --run-dir runs/demo   # + eval share of a run

Same model (the benchmark model of train_throughput.py, random weights), same inputs (XQuAD
validation questions of th, ro, vi, as finetune.py evaluates them), greedy, the same number of
batches in both configurations:
  sorted     loop.generate: sources sorted by length, batches of <= --max-tokens source tokens
  unsorted   the same sources in file order, in fixed-size batches (as a plain DataLoader would)
Both decode exactly the same predictions (checked). With --run-dir, also the share of that
finetune run's wall time spent in evaluation (validation and final test, from its results.json).
"""

import argparse
import json
import math
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import data  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
from train_throughput import build_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="data directory")
    p.add_argument("--langs", default="th,ro,vi", help="XQuAD languages to generate for")
    p.add_argument("--per-lang", type=int, default=100, help="questions per language")
    p.add_argument("--max-tokens", type=int, default=8000, help="source-token budget of a sorted batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length limit (XQuAD default)")
    p.add_argument("--dims", default="bench", choices=["bench", "mt5-base"], help="model size")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--run-dir", default=None, help="a finished finetune.py run to measure the evaluation share of")
    return p.parse_args(argv)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def evaluation_share(run_dir):
    """(validation + test seconds, total seconds) of a finished run, from its results.json.
    (A resumed run counts only its last session.)"""
    seconds = json.load(open(os.path.join(run_dir, "results.json")))["seconds"]
    return seconds["validation"] + seconds["test"], seconds["total"]


def main(args):
    device = loop.pick_device(args.device)
    tokenizer = models.load_tokenizer("tiny-mt5", args.data_dir)
    model = build_model(args.dims, len(tokenizer), device).eval()
    encoder = models.Seq2SeqEncoder(tokenizer, "mt5")
    encoded = []
    for lang in data.parse_langs(args.langs):
        questions = data.read_squad(data.xquad_path(args.data_dir, lang))[:args.per_lang]
        encoded += encoder.encode(data.qa_examples(questions, lang))
    generation = encoder.generation_kwargs("th")
    lengths = [len(e["input_ids"]) for e in encoded]
    num_batches = len(data.generation_batches(lengths, args.max_tokens))
    batch_size = math.ceil(len(encoded) / num_batches)

    def unsorted():
        predictions = []
        for start in range(0, len(encoded), batch_size):
            batch = [e["input_ids"] for e in encoded[start:start + batch_size]]
            out = loop.generate_batch(model, tokenizer, batch, generation, device, args.max_new_tokens)
            predictions += loop.decode_generated(tokenizer, out, generation)
        return predictions

    def sorted_batches():
        return loop.generate(model, tokenizer, encoded, generation, device, args.max_new_tokens,
                             max_tokens=args.max_tokens, desc="sorted")

    loop.generate(model, tokenizer, encoded[:8], generation, device, 4)  # warm-up
    unsorted_predictions, unsorted_s = timed(unsorted)
    sorted_predictions, sorted_s = timed(sorted_batches)
    same = sum(a == b for a, b in zip(sorted_predictions, unsorted_predictions))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"machine: {name}; model: {args.dims}; {len(encoded)} XQuAD questions ({args.langs}), greedy, "
          f"max {args.max_new_tokens} new tokens, {num_batches} batches each; identical predictions: {same}/{len(encoded)}")
    print(f"{'configuration':<12}{'seconds':>9}{'predictions/s':>15}{'speed-up':>10}")
    print(f"{'unsorted':<12}{unsorted_s:>9.1f}{len(encoded) / unsorted_s:>15.1f}{1.0:>9.2f}x")
    print(f"{'sorted':<12}{sorted_s:>9.1f}{len(encoded) / sorted_s:>15.1f}{unsorted_s / sorted_s:>9.2f}x")
    if args.run_dir:
        eval_s, total_s = evaluation_share(args.run_dir)
        print(f"evaluation share of {args.run_dir}: {eval_s:.1f} s of {total_s:.1f} s ({eval_s / total_s:.0%}), "
              f"(validation at every evaluation step and the final test scoring)")


if __name__ == "__main__":
    main(parse_args())
