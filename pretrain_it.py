"""Intermediate tuning (IT): self-supervised finetuning on raw multilingual text before the task.

    python download.py --tasks text --data-dir data                    # CommonCrawl text (CC-100)
    python pretrain_it.py --model google/mt5-base --lr 1e-4 --out-dir runs/it/mt5-base
    python pretrain_it.py --model tiny-mt5 --data-dir ../shared/data --max-steps 200 --warmup-steps 20 \\
        --eval-every 100 --out-dir runs/it/tiny-mt5
    python finetune.py --model tiny-mt5 --init runs/it/tiny-mt5 ...        # then finetune from it

Paper Section 3 ("Intermediate tuning") and Appendix B. The model learns to continue a paragraph
from its beginning (Prefix-LM, Vu et al. 2022), on English and the target languages sampled
uniformly; paper: 100k steps of 5k-token batches on CommonCrawl text. `--objective zmbart` uses
Appendix B's alternative: generate randomly chosen sentences of the input chunk (Maurya et al. 2021).

The text is read through the token cache (token_cache.py): each text/<lang>.txt is tokenized once
per tokenizer (paragraph ids on disk), and the Prefix-LM examples are cut from those ids in token
space, on a word boundary, when the streams are made; a run holds lengths, not tokens.

The paper chose the IT learning rate by reading the model's generations; so every evaluation writes,
besides the held-out loss per language, a few generated continuations to eval/step_N.json. The run
directory's last/ is a save_pretrained checkpoint that `finetune.py --init` takes (the run
directory itself may be passed). It trains with the same loop as finetune.py (loop.train), and its
run directory behaves the same way (args.json, --resume, --stop-at-step, skipped when finished).
"""

import os
import time

import numpy as np
import torch

import adapt
import common
import data
import loop
import models
import token_cache
from common import DataError, UsageError


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="google/mt5-base", help="hub name, checkpoint dir, or tiny-mt5/tiny-mbart/tiny-nllb")
    p.add_argument("--objective", default="prefix_lm", choices=sorted(data.SELF_SUPERVISED_OBJECTIVES),
                   help="prefix_lm (paper) or zmbart (Appendix B)")
    p.add_argument("--langs", default=",".join(data.target_langs()),
                   help="languages of raw text, sampled uniformly (default: English and every target language)")
    loop.add_training_args(p, max_steps=100000, max_tokens=5000, eval_every=5000)  # paper: 100k steps, 5k tokens
    p.add_argument("--val-lines", type=common.positive_int, default=50, help="paragraphs per language held out for evaluation")
    p.add_argument("--num-samples", type=common.non_negative_int, default=3,
                   help="generated continuations per language at each evaluation")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=48, help="length of the sample continuations")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="data directory with text/<lang>.txt")
    p.add_argument("--text-dir", default=None, help="raw text directory (default DATA_DIR/text)")
    token_cache.add_cache_arg(p)
    return common.parse_with_config(p, argv)


def check_args(args):
    models.refuse_added_checkpoint(args.model, "--model", "a base model")
    family = models.family_of_name(args.model, args.data_dir)
    loop.check_stop_at_step(args)
    args.langs = data.parse_langs(args.langs, "--langs")
    for lang in args.langs:
        models.language_code(family, lang, "--langs")
    args.data_dir = os.path.abspath(args.data_dir)
    args.text_dir = os.path.abspath(args.text_dir or os.path.join(args.data_dir, "text"))
    files = {lang: os.path.join(args.text_dir, f"{lang}.txt") for lang in args.langs}
    for path in files.values():
        if not os.path.isfile(path):
            raise UsageError(f"{path}: file not found (python download.py --tasks text --data-dir DATA fetches "
                             f"CommonCrawl text for intermediate tuning)")
    name = os.path.basename(os.path.normpath(args.model))
    args.out_dir = os.path.abspath(args.out_dir or os.path.join("runs", "it", f"{name}-{args.objective}-lr{args.lr:g}"))
    common.refuse_inputs_inside(args.out_dir, "--out-dir", [(f"--langs {lang}: text", path) for lang, path in files.items()]
                                + [("--model", args.model if os.path.isdir(args.model) else None)])
    return files, family


@torch.no_grad()
def held_out_loss(model, stream, pad_token_id, device, precision=None):
    """Token-averaged loss over one pass of a TokenBatches (every held-out example once)."""
    model.eval()
    loss_sum, num_tokens = 0.0, 0
    for indices in stream.epoch_batches(0):
        batch = {k: v.to(device) for k, v in stream.collate(indices, pad_token_id).items()}
        with loop.autocast(device, precision):
            loss, n = loop.token_loss(model, batch)
        loss_sum, num_tokens = loss_sum + loss.item() * n, num_tokens + n
    return loss_sum / max(num_tokens, 1)


@common.exits_on_error(interrupted=common.RESUME_HINT)
def main(args):
    files, family = check_args(args)
    with loop.run_lock(args):  # one process at a time in a run directory
        return run(args, files, family)


def run(args, files, family):
    # ---- setup ----
    run_dir = args.out_dir
    results = loop.finished_run(args)
    if results is not None:
        return results
    last, device = loop.start_run(args)

    # ---- model ----
    tokenizer = models.load_tokenizer(args.model, args.data_dir)
    model = adapt.apply(models.load_model(last or args.model, args.data_dir), "full")
    if models.family_of(model.config) != family:
        raise UsageError(f"--model {args.model}: the checkpoint in {run_dir} is a {models.family_of(model.config)} model")
    models.check_objective_token(args.objective, tokenizer, args.model, "--objective")
    length = models.max_length(model.config)
    encoder = models.Seq2SeqEncoder(tokenizer, family, length, length)

    # ---- data: per language, held-out paragraphs first, the rest for training (token cache) ----
    data_start = time.perf_counter()
    root = token_cache.cache_root(args.token_cache, args.data_dir)
    train_streams, val_streams, val_examples, summary = {}, {}, {}, {}
    for i, (lang, path) in enumerate(files.items()):
        examples = token_cache.self_supervised(path, lang, args.objective, encoder, root, seed=args.seed)
        if len(examples) <= args.val_lines:
            raise DataError(f"{path}: too few paragraphs ({len(examples)}) for --val-lines {args.val_lines}")
        held, rest = examples.subset(0, args.val_lines), examples.subset(args.val_lines)
        train_streams[lang] = data.TokenBatches(rest, args.max_tokens, seed=args.seed + i, name=f"{lang} ({path})")
        stats = {**rest.stats(), "num_cut_to_budget": train_streams[lang].num_truncated}
        summary[lang] = {"file": path, **stats}
        val_streams[lang] = data.TokenBatches(held, args.max_tokens, shuffle=False, name=f"val/{lang}")
        val_examples[lang] = [held[j] for j in range(min(args.num_samples, len(held)))]
        print(f"{lang}: {len(rest):,} training and {len(held)} held-out {args.objective} examples from {path}; "
              f"{stats['num_cut_sources']:,} sources and {stats['num_cut_targets']:,} targets cut to {length} tokens, "
              f"{stats['num_cut_to_budget']:,} examples to the {args.max_tokens}-token batch budget")
    stream = data.Mixture.uniform(train_streams, seed=args.seed)
    print(f"data ready in {time.perf_counter() - data_start:.1f} s")
    loop.begin_run(args, args.resume)
    if not args.resume:
        loop.RunLog(run_dir).event({"event": "data", "streams": summary})

    # ---- training ----
    def evaluate_fn(step):
        losses = {lang: held_out_loss(model, s, tokenizer.pad_token_id, device, args.precision)
                  for lang, s in val_streams.items()}
        samples = {}
        for lang, shown in val_examples.items():
            texts = loop.generate(model, tokenizer, shown, encoder.generation_kwargs(lang), device,
                                  args.max_new_tokens, max_tokens=args.eval_max_tokens,
                                  max_batch_size=args.max_gen_batch_size, desc=f"samples {lang}",
                                  precision=args.precision, decoder=args.decoder) if shown else []
            samples[lang] = [{"input": tokenizer.decode(ex["input_ids"], skip_special_tokens=True), "generated": text,
                              "reference": tokenizer.decode(ex["labels"], skip_special_tokens=True)}
                             for ex, text in zip(shown, texts)]
        average = float(np.mean(list(losses.values())))
        common.write_json(os.path.join(run_dir, "eval", f"step_{step}.json"),
                          {"step": step, "val_loss": losses, "average": average, "samples": samples})
        print(f"eval step {step}: held-out loss " + " ".join(f"{l} {v:.3f}" for l, v in losses.items())
              + f" | avg {average:.3f}")
        return average

    settings = loop.TrainSettings.from_args(args, base_model=args.model, device=device, metric_mode="min")
    best_step, best_loss, stopped = loop.train(model, tokenizer, stream, evaluate_fn, settings)
    if stopped is not None:
        print(f"stopped after the checkpoint of step {stopped}; continue with --resume")
        return None
    results = {"config": loop.settings_of(args), "best_step": best_step, "best_val_loss": best_loss,
               "checkpoint": os.path.join(run_dir, "last"), "data": summary}
    results = loop.finish_run(args, results, args.model, device)  # results.json; checkpoints pruned
    print(f"intermediate-tuned checkpoint: {os.path.join(run_dir, 'last')} (use with finetune.py --init {run_dir})")
    return results


if __name__ == "__main__":
    main(parse_args())
