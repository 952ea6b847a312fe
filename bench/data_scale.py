"""Data at real size: cache build time, start-to-first-step with a warm cache, peak RSS -- against corpus size.

    python bench/data_scale.py --data-dir ../shared/data                          # ~15 min on 2 cores
    python bench/data_scale.py --data-dir ../shared/data --text-mb 8,64 --articles 1000,10000   # ~3 min

Synthetic corpora made from ../shared/data at the sizes `download.py` writes (its CC-100 text files
are 256 MB per language; XL-Sum's English train split has 306,522 articles):
  text      en.txt and fr.txt of each --text-mb size, the shared text repeated (each copy of a line
            numbered, so no two lines are equal)
  xlsum     english_train.jsonl of each --articles count, the 141 GUM articles repeated under new
            ids; validation and test files of the 4-article fixture
and, as the baseline each is compared with, the same command on ../shared/data's own text (en, fr:
1.7 MB) and on 4 such articles. (Not the 4-article fixture of tests/: its articles are shorter, so
its batches and the model's activations are smaller -- 0.50 against 0.85 GB of peak RSS for the same
steps -- and the comparison would measure the batches, not the data. For the same reason the XL-Sum
runs take --max-tokens 2048: 4 articles cut to 512 tokens fill one such batch, so every run trains
on batches of the same shape.) Three commands, each run twice in its own
process with a fresh token cache -- cold (the cache is built) and warm (a second run: opened):
  pretrain_it.py --langs en,fr                      (intermediate tuning)
  finetune.py --task xquad --method mix --mix-langs en,fr  (the text mixed in; the first --text-mb size)
  finetune.py --task xlsum                          (the summarisation training set)
tiny-mt5, 2 training steps: the model is not what costs. Reported per run: the seconds the stage
reports for its data ("data ready in"), the seconds from process start to the first training step,
and the process's peak RSS (wait4's ru_maxrss), with the ratio to the baseline's.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import data  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="the shared data directory")
    p.add_argument("--text-mb", default="64,512", help="sizes of each text file, in MB (comma-separated)")
    p.add_argument("--articles", default="10000,100000", help="XL-Sum-format training articles (comma-separated)")
    p.add_argument("--work-dir", default=os.path.join("runs", "bench-data"), help="corpora, caches and runs go here")
    p.add_argument("--commands", default="pretrain_it,mix,xlsum", help="which of the three to measure")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Synthetic corpora

def write_text(directory, source_dir, megabytes):
    os.makedirs(directory, exist_ok=True)
    for lang in ("en", "fr"):
        lines = data.read_text(data.text_path(source_dir, lang))
        with open(os.path.join(directory, f"{lang}.txt"), "w", encoding="utf-8") as f:
            written, copy = 0, 0
            while written < megabytes * 2 ** 20:
                block = "".join(f"{line} ({copy})\n" for line in lines)
                f.write(block)
                written, copy = written + len(block.encode()), copy + 1


def write_xlsum(directory, source_dir, num_articles):
    os.makedirs(directory, exist_ok=True)
    fixture = os.path.join(REPO, "tests", "fixtures", "xlsum")
    for name in os.listdir(fixture):
        if name.endswith(("_val.jsonl", "_test.jsonl")):
            shutil.copy(os.path.join(fixture, name), directory)
    articles = data.read_xlsum(data.gum_path(source_dir))
    with open(os.path.join(directory, "english_train.jsonl"), "w", encoding="utf-8") as f:
        for i in range(num_articles):
            f.write(json.dumps({**articles[i % len(articles)], "id": f"synthetic-{i}"}, ensure_ascii=False) + "\n")


def data_dir_with_text(directory, source_dir, text_dir):
    """A data directory of the shared SQuAD and XQuAD, with text/ -> text_dir (for --method mix)."""
    os.makedirs(directory, exist_ok=True)
    for name, target in (("squad", os.path.join(source_dir, "squad")), ("xquad", os.path.join(source_dir, "xquad")),
                         ("text", text_dir)):
        link = os.path.join(directory, name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(target), link)
    return directory


# -----------------------------------------------------------------------------
# One run of a stage, measured

COMMON = ["--model", "tiny-mt5", "--max-steps", "2", "--eval-every", "2", "--warmup-steps", "1", "--log-every", "1",
          "--device", "cpu"]


def run(argv, cache, out_dir):
    """(data seconds, seconds to the first step, peak RSS in MB) of one process."""
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, XLGEN_TOKEN_CACHE=cache, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv, "--out-dir", out_dir], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    data_seconds = first_step = None
    for line in proc.stdout:
        if line.startswith("data ready in"):
            data_seconds = float(line.split()[3])
        if first_step is None and line.lstrip().startswith("step") and line.split()[1] == "1":
            first_step = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(argv)}")
    return data_seconds, first_step, usage.ru_maxrss / 1024


def measure(name, size, argv, work):
    cache = os.path.join(work, "cache", f"{name}-{size}")
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for state in ("cold", "warm"):
        seconds, first_step, rss = run(argv, cache, os.path.join(work, "runs", f"{name}-{size}-{state}"))
        tokens, build_seconds = _built(cache)
        rows.append({"command": name, "size": size, "cache": state, "data_s": seconds, "first_step_s": first_step,
                     "peak_rss_mb": rss, "cache_mb": _size_mb(cache), "cached_tokens": tokens,
                     "build_tokens_per_s": tokens / max(build_seconds, 1e-9)})
        print(f"  {name:<12}{size:>18}  {state:<5}{seconds:>9.1f}{first_step:>13.1f}{rss:>13,.0f}"
              f"{_size_mb(cache):>10,.0f}{tokens / 1e6:>10.1f}{tokens / max(build_seconds, 1e-9):>12,.0f}", flush=True)
    return rows


def _built(cache):
    """(tokens, seconds) of the entries built in a cache (their meta.json)."""
    tokens = seconds = 0
    for name in os.listdir(cache) if os.path.isdir(cache) else []:
        meta = os.path.join(cache, name, "meta.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                entry = json.load(f)
            tokens, seconds = tokens + entry["num_tokens"], seconds + entry["seconds"]
    return tokens, seconds


def _size_mb(directory):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files) / 2 ** 20


def main(args):
    work = os.path.abspath(args.work_dir)
    source = os.path.abspath(args.data_dir)
    text_sizes = [int(x) for x in args.text_mb.split(",")]
    article_counts = [int(x) for x in args.articles.split(",")]
    commands = args.commands.split(",")
    print(f"{'command':<14}{'corpus':>18}  {'cache':<5}{'data s':>9}{'1st step s':>13}{'peak RSS MB':>13}"
          f"{'cache MB':>10}{'M tokens':>10}{'build tok/s':>12}")
    rows = []
    # intermediate tuning on two languages
    corpora = [("shared text", os.path.join(source, "text"))]
    for mb in text_sizes if {"pretrain_it", "mix"} & set(commands) else []:
        write_text(os.path.join(work, f"text-{mb}mb"), source, mb)
        corpora.append((f"2 x {mb} MB text", os.path.join(work, f"text-{mb}mb")))
    for label, text_dir in corpora if "pretrain_it" in commands else []:
        rows += measure("pretrain_it", label, ["pretrain_it.py", "--langs", "en,fr", "--text-dir", text_dir,
                                               "--data-dir", source, "--num-samples", "0", *COMMON], work)
    for label, text_dir in corpora[:2] if "mix" in commands else []:  # the shared text and the smaller size (the text is cached as for IT)
        data_dir = data_dir_with_text(os.path.join(work, "data-" + label.replace(" ", "")), source, text_dir)
        rows += measure("mix", label, ["finetune.py", "--task", "xquad", "--method", "mix", "--mix-langs", "en,fr",
                                       "--data-dir", data_dir, "--max-eval-examples", "2", "--val-langs", "th",
                                       "--test-langs", "de", *COMMON], work)
    # summarisation
    for count in [4] + article_counts if "xlsum" in commands else []:
        label = f"{count:,} articles"
        xlsum_dir = os.path.join(work, f"xlsum-{count}")
        write_xlsum(xlsum_dir, source, count)
        rows += measure("xlsum", label, ["finetune.py", "--task", "xlsum", "--xlsum-dir", xlsum_dir, "--data-dir", source,
                                         "--max-eval-examples", "2", "--val-langs", "fr", "--test-langs", "es",
                                         "--max-tokens", "2048", *COMMON], work)
    print("\nratios to the baseline (the shared text / 4 articles):")
    for name in commands:
        base = {r["cache"]: r for r in rows if r["command"] == name and r["size"] in ("shared text", "4 articles")}
        for r in rows:
            if r["command"] == name and r["size"] not in ("shared text", "4 articles"):
                cold = next(c for c in rows if c["command"] == name and c["size"] == r["size"] and c["cache"] == "cold")
                print(f"  {name:<12}{r['size']:>18}  {r['cache']:<5} peak RSS {r['peak_rss_mb'] / base[r['cache']]['peak_rss_mb']:.2f}x"
                      f" the baseline's; data {r['data_s'] / cold['data_s']:.3f}x the cold run's; cache {r['cache_mb']:,.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(parse_args())
