"""Finetune a multilingual encoder-decoder on an English task; evaluate zero-shot in other languages.

    python finetune.py --model google/mt5-base --task xlsum --method adapters --lr 1e-3
    python finetune.py --model tiny-mt5 --task xquad --method full --lr 1e-3 --data-dir ../shared/data \\
        --max-steps 200 --eval-every 100 --warmup-steps 50 --max-eval-examples 50 --out-dir runs/demo

Paper Section 3 and Appendix A. Defaults are the paper's: 20k steps of 4000-token batches, AdamW,
inverse-square-root schedule with 4k warm-up steps, evaluation every 2k steps on the validation
languages (greedy decoding), best checkpoint by the average non-English task metric (ROUGE-2 for
XL-Sum, filtered F1 for XQuAD), then the test languages scored with it.

  --task xlsum   train English XL-Sum; validate and test on zh fr ko ru es (test cut to 2k examples)
  --task xquad   train SQuAD v1.1 (English); tune on XQuAD th ro vi; test on XQuAD ar zh de ru es

The run directory holds args.json, log.jsonl, eval/step_N.json, predictions/, best/, last/ (with
train_state.pt for --resume) and, at the end, results.json. A run whose results.json exists is
skipped.
"""

import argparse
import json
import os
import sys
import time


import adapt
import data
import evaluate
import loop
import models
from data import DataError

TASK_DEFAULTS = {
    "xquad": {"val_langs": "th,ro,vi", "test_langs": "ar,zh,de,ru,es", "max_new_tokens": 32},
    "xlsum": {"val_langs": "zh,fr,ko,ru,es", "test_langs": "zh,fr,ko,ru,es", "max_new_tokens": 84},
}
XLSUM_TEST_LIMIT = 2000  # paper: "first 2k examples per language"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="google/mt5-base", help="hub name, checkpoint dir, or tiny-mt5/tiny-mbart/tiny-nllb")
    p.add_argument("--task", default="xlsum", help="xlsum or xquad")
    p.add_argument("--method", default="full", help=f"adaptation method: {', '.join(adapt.METHODS)}")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (after warm-up)")
    p.add_argument("--max-steps", type=int, default=20000, help="optimisation steps")
    p.add_argument("--max-tokens", type=int, default=4000, help="token budget of a training batch")
    p.add_argument("--warmup-steps", type=int, default=4000, help="linear warm-up steps of the inverse-sqrt schedule")
    p.add_argument("--eval-every", type=int, default=2000, help="evaluate on the validation languages every N steps")
    p.add_argument("--eval-at-start", action="store_true", help="also evaluate the model before training (step 0)")
    p.add_argument("--max-eval-examples", type=int, default=None,
                   help="cap each language's validation and test set (default: all; XL-Sum test: first 2000)")
    p.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="data directory (see data.py)")
    p.add_argument("--xlsum-dir", default=None, help="XL-Sum jsonl files (default: DATA_DIR/xlsum)")
    p.add_argument("--train-file", default=None, help="training file in the task's official format (e.g. translate-train output)")
    p.add_argument("--train-lang", default="en", help="language of the training data")
    p.add_argument("--max-train-examples", type=int, default=None,
                   help="use only the first N training examples of each source language (quick runs)")
    p.add_argument("--val-langs", default=None, help="comma-separated validation languages (task default)")
    p.add_argument("--test-langs", default=None, help="comma-separated test languages (task default)")
    p.add_argument("--src-langs", default=None, help="multisrc: source languages, uniformly mixed (XL-Sum only)")
    p.add_argument("--mix-prob", type=float, default=0.01, help="mix: probability of a self-supervised batch")
    p.add_argument("--mix-langs", default=None, help="mix: languages of raw text mixed in (default: val + test languages)")
    p.add_argument("--adapter-dim", type=int, default=64, help="adapters: bottleneck size")
    p.add_argument("--prompt-length", type=int, default=100, help="prompt: number of prompt vectors")
    p.add_argument("--init", default=None, help="start from this checkpoint (e.g. a pretrain_it.py run directory)")
    p.add_argument("--out-dir", default=None, help="run directory (default runs/TASK/MODEL/METHOD-lrLR[-it]-seedSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last/ checkpoint")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="exit after the checkpoint of this evaluation step (for job time limits); continue with --resume")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, dropout, initialisation of added weights)")
    p.add_argument("--num-beams", type=int, default=1, help="beams for evaluation generation (1 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length limit (task default: 84 XL-Sum, 32 XQuAD)")
    p.add_argument("--eval-max-tokens", type=int, default=8000, help="source-token budget of a generation batch")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--log-every", type=int, default=10, help="log every N steps")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--rouge-mode", default="multilingual", choices=evaluate.ROUGE_MODES, help="ROUGE tokenisation")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Argument checks and file layout (before any model is loaded)

def default_out_dir(args):
    model = os.path.basename(os.path.normpath(args.model))
    it = "-it" if args.init else ""
    return os.path.join("runs", args.task, model, f"{args.method}-lr{args.lr:g}{it}-seed{args.seed}")


def resolve_init(path):
    """--init accepts a save_pretrained directory or a run directory (its last/ is used)."""
    if path is None:
        return None
    for candidate in (path, os.path.join(path, "last")):
        if os.path.isfile(os.path.join(candidate, "config.json")) or adapt.is_added_checkpoint(candidate):
            return candidate
    raise DataError(f"--init: {path} is not a checkpoint directory (no config.json in it or in its last/)")


def xlsum_file(args, lang, split):
    folder = data.get_language(lang).xlsum
    if folder is None:
        raise DataError(f"--task xlsum: XL-Sum has no data for '{lang}'")
    path = os.path.join(args.xlsum_dir, f"{folder}_{split}.jsonl")
    if split == "train" and lang == "en" and not os.path.isfile(path):
        gum = os.path.join(args.data_dir, "summarization", "gum_en.jsonl")
        if os.path.isfile(gum):  # offline: the English GUM summaries, in XL-Sum format
            return gum
    return path


def check_args(args):
    """Every check that needs no model: a bad flag fails in a second, not after a download."""
    if args.task not in TASK_DEFAULTS:
        raise DataError(f"--task: unknown task '{args.task}'; choose from {', '.join(TASK_DEFAULTS)}")
    models.check_model_name(args.model)
    if not args.lr > 0:
        raise DataError(f"--lr: must be positive, got {args.lr}")
    for flag in ("max_steps", "max_tokens", "eval_every", "log_every", "num_beams", "eval_max_tokens"):
        if getattr(args, flag) < 1:
            raise DataError(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    if args.warmup_steps < 0:
        raise DataError(f"--warmup-steps: must be >= 0, got {args.warmup_steps}")
    defaults = TASK_DEFAULTS[args.task]
    args.val_langs = data.parse_langs(args.val_langs or defaults["val_langs"], "--val-langs")
    args.test_langs = data.parse_langs(args.test_langs or defaults["test_langs"], "--test-langs")
    data.get_language(args.train_lang, "--train-lang")
    args.max_new_tokens = args.max_new_tokens or defaults["max_new_tokens"]
    args.xlsum_dir = args.xlsum_dir or os.path.join(args.data_dir, "xlsum")
    if args.method == "multisrc":
        if args.task == "xquad":
            raise DataError("--method multisrc: XQuAD has only English training data; use --task xlsum")
        args.src_langs = data.parse_langs(args.src_langs or "en,ja,ar", "--src-langs")
    else:
        args.src_langs = [args.train_lang]
    if args.method == "mix":
        default_mix = ",".join(dict.fromkeys(l for l in args.val_langs + args.test_langs if l != "en"))
        args.mix_langs = data.parse_langs(args.mix_langs or default_mix, "--mix-langs")
    adapt.check_options(args.method, adapt.options_from_args(args))
    family = models.family_of_name(args.model, args.data_dir) if args.model in models.TINY_MODELS or \
        any(args.model.startswith(p) for p in models.HUB_PREFIXES) else None
    if family is not None:
        for lang in set(args.val_langs + args.test_langs + args.src_langs):
            data.language_code(family, lang)  # e.g. mBART-50 has no Greek
    # the files every stage will read
    files = {"train": {}, "val": {}, "test": {}, "text": {}}
    for lang in args.src_langs:
        if args.train_file and len(args.src_langs) == 1:
            files["train"][lang] = args.train_file
        elif args.task == "xquad":
            files["train"][lang] = data.squad_path(args.data_dir, "train")
        else:
            files["train"][lang] = xlsum_file(args, lang, "train")
    for split, langs in (("val", args.val_langs), ("test", args.test_langs)):
        for lang in langs:
            files[split][lang] = (data.xquad_path(args.data_dir, lang) if args.task == "xquad"
                                  else xlsum_file(args, lang, split))
    for lang in (args.mix_langs if args.method == "mix" else []):
        files["text"][lang] = data.text_path(args.data_dir, lang)
    for group in files.values():
        for path in group.values():
            if not os.path.isfile(path):
                hint = " (python data.py download fetches the official files)" if "xlsum" in path or "squad" in path else ""
                raise DataError(f"{path}: file not found{hint}")
    args.init = resolve_init(args.init)
    args.out_dir = args.out_dir or default_out_dir(args)
    return files


# -----------------------------------------------------------------------------
# Data

def read_task(task, path, lang, limit=None):
    """Examples and references of one language from an official file."""
    if task == "xquad":
        references = data.read_squad(path)[:limit] if limit else data.read_squad(path)
        return data.qa_examples(references, lang), references
    references = data.read_xlsum(path, limit=limit)
    return data.summarization_examples(references, lang), references


def build_stream(args, files, encoder):
    """The training batches: a Mixture of task streams (one per source language, uniform) and,
    for `mix`, Prefix-LM streams of the target languages with total probability --mix-prob."""
    task_streams = {}
    for i, (lang, path) in enumerate(files["train"].items()):
        examples, _ = read_task(args.task, path, lang, args.max_train_examples)
        encoded = encoder.encode(examples)
        task_streams[lang] = data.TokenBatches(encoded, args.max_tokens, seed=args.seed + i, name=f"task/{lang}")
        print(f"train {lang}: {len(examples):,} examples from {path}, "
              f"padding efficiency {task_streams[lang].padding_efficiency():.3f}")
    task = data.Mixture.uniform(task_streams, seed=args.seed)
    if args.method != "mix":
        return data.Mixture({"task": (1.0, task)}, seed=args.seed)
    ss_streams = {}
    for i, (lang, path) in enumerate(files["text"].items()):
        examples = data.self_supervised_examples(data.read_text(path), lang, "prefix_lm", seed=args.seed)
        ss_streams[lang] = data.TokenBatches(encoder.encode(examples), args.max_tokens, seed=args.seed + 100 + i,
                                             name=f"prefix_lm/{lang}")
    print(f"mix: Prefix-LM batches of {', '.join(ss_streams)} with probability {args.mix_prob}")
    self_supervised = data.Mixture.uniform(ss_streams, seed=args.seed + 1)
    return data.Mixture({"task": (1.0 - args.mix_prob, task), "prefix_lm": (args.mix_prob, self_supervised)},
                        seed=args.seed)


# -----------------------------------------------------------------------------
# Model

def build_model(args, checkpoint=None):
    """The model to train: from a checkpoint of this run (resume), else --init or --model, adapted."""
    if checkpoint is not None and adapt.is_added_checkpoint(checkpoint):
        return adapt.load_added(checkpoint, data_dir=args.data_dir)  # base + method + added weights
    model = models.load_model(checkpoint or args.init or args.model, args.data_dir)
    return adapt.apply(model, args.method, **adapt.options_from_args(args))


def load_for_eval(args, checkpoint):
    if adapt.is_added_checkpoint(checkpoint):
        return adapt.load_added(checkpoint, data_dir=args.data_dir)
    return models.load_model(checkpoint, args.data_dir)


# -----------------------------------------------------------------------------
# Evaluation

def eval_sets(args, files, encoder, limit):
    """{lang: (examples, references, encoded)} of a split, tokenized once for every evaluation."""
    sets = {}
    for lang, path in files.items():
        examples, references = read_task(args.task, path, lang, limit)
        sets[lang] = (examples, references, encoder.encode(examples))
    return sets


def evaluate_split(args, model, tokenizer, encoder, eval_sets, device, tag, out_dir):
    """Generate and score every language of a split; write predictions; return per-language metrics."""
    results = {}
    for lang, (examples, references, encoded) in eval_sets.items():
        generation = encoder.generation_kwargs(lang)
        texts = loop.generate(model, tokenizer, encoded, generation, device, args.max_new_tokens,
                              args.num_beams, args.eval_max_tokens, desc=f"{tag} {lang}")
        predictions = {ex.id: text for ex, text in zip(examples, texts)}
        metrics, details = evaluate.score(args.task, lang, predictions, references, args.rouge_mode)
        data.write_json(os.path.join(out_dir, f"{tag}.{lang}.json"), predictions)
        data.write_jsonl(os.path.join(out_dir, f"{tag}.{lang}.details.jsonl"), details)
        results[lang] = metrics
    return results


def averages(per_lang, main_metric):
    """Averages over non-English languages (all languages if only English was evaluated)."""
    langs = [l for l in per_lang if l != "en"] or list(per_lang)
    keys = (main_metric, "lcr", "avg_len", "empty_rate")
    return {k: sum(per_lang[l][k] for l in langs) / len(langs) for k in keys} | {"langs": langs}


def summary_line(tag, per_lang, main_metric):
    cells = [f"{lang} {m[main_metric]:.2f} (lcr {m['lcr']:.0f})" for lang, m in per_lang.items()]
    return f"{tag}: {main_metric} " + " | ".join(cells)


# -----------------------------------------------------------------------------

def main(args):
    # ---- setup ----
    try:
        files = check_args(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    run_dir = args.out_dir
    started = time.perf_counter()
    if os.path.isfile(os.path.join(run_dir, "results.json")):
        print(f"{run_dir}/results.json exists: run already finished, skipped")
        return json.load(open(os.path.join(run_dir, "results.json")))
    try:
        last, device = loop.start_run(run_dir, args)
    except DataError as e:
        sys.exit(f"error: {e}")
    main_metric = evaluate.MAIN_METRIC[args.task]

    # ---- model ----
    tokenizer = models.load_tokenizer(args.init or args.model, args.data_dir)
    model = build_model(args, checkpoint=last if args.resume else None)
    family = data.family_of(model.config)
    encoder = data.Seq2SeqEncoder(tokenizer, family)
    base_model = args.init or args.model

    # ---- data ----
    try:
        stream = build_stream(args, files, encoder)
        limit = args.max_eval_examples
        val_sets = eval_sets(args, files["val"], encoder, limit)
    except DataError as e:
        sys.exit(f"error: {e}")

    # ---- training, with validation every --eval-every steps ----
    validation_seconds = []

    def evaluate_fn(step):
        start = time.perf_counter()
        per_lang = evaluate_split(args, model, tokenizer, encoder, val_sets, device, "val",
                                  os.path.join(run_dir, "predictions", f"step_{step}"))
        average = averages(per_lang, main_metric)
        data.write_json(os.path.join(run_dir, "eval", f"step_{step}.json"),
                        {"step": step, "main_metric": main_metric, "average": average, "langs": per_lang,
                         "seconds": time.perf_counter() - start})
        print(summary_line(f"eval step {step}", per_lang, main_metric) + f" | avg {average[main_metric]:.2f}")
        validation_seconds.append(time.perf_counter() - start)
        return average[main_metric]

    try:
        best_step, best_metric, stopped = loop.train(
            model, tokenizer, stream, run_dir=run_dir, base_model=base_model, lr=args.lr,
            warmup_steps=args.warmup_steps, max_steps=args.max_steps, eval_every=args.eval_every,
            evaluate_fn=evaluate_fn, device=device, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
            log_every=args.log_every, resume=args.resume, eval_at_start=args.eval_at_start,
            stop_at_step=args.stop_at_step)
    except FloatingPointError as e:
        sys.exit(f"error: {e}")
    if stopped:
        print(f"stopped after the checkpoint of step {args.stop_at_step}; continue with --resume")
        return None

    # ---- final evaluation of the best checkpoint on the test languages ----
    test_start = time.perf_counter()
    best_dir = os.path.join(run_dir, "best")
    model = load_for_eval(args, best_dir).to(device)
    test_limit = args.max_eval_examples or (XLSUM_TEST_LIMIT if args.task == "xlsum" else None)
    test_sets = eval_sets(args, files["test"], encoder, test_limit)
    per_lang = evaluate_split(args, model, tokenizer, encoder, test_sets, device, "test",
                              os.path.join(run_dir, "predictions"))
    results = {"config": vars(args), "main_metric": main_metric, "best_step": best_step,
               "best_val_metric": best_metric, "test": per_lang, "test_average": averages(per_lang, main_metric),
               "seconds": {"total": time.perf_counter() - started, "validation": sum(validation_seconds),
                           "test": time.perf_counter() - test_start}}
    data.write_json(os.path.join(run_dir, "results.json"), results)
    print(summary_line("test (best checkpoint)", per_lang, main_metric)
          + f" | avg {results['test_average'][main_metric]:.2f}")
    return results


if __name__ == "__main__":
    main(parse_args())
