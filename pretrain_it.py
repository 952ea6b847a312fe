"""Intermediate tuning (IT): self-supervised finetuning on raw multilingual text before the task.

    python pretrain_it.py --model google/mt5-base --lr 1e-4 --out-dir runs/it/mt5-base
    python pretrain_it.py --model tiny-mt5 --data-dir ../shared/data --max-steps 200 --warmup-steps 20 \\
        --eval-every 100 --out-dir runs/it/tiny-mt5
    python finetune.py --model tiny-mt5 --init runs/it/tiny-mt5 ...        # then finetune from it

Paper Section 3 ("Intermediate tuning") and Appendix B. The model learns to continue a paragraph
from its beginning (Prefix-LM, Vu et al. 2022), on English and the target languages sampled
uniformly; paper: 100k steps of 5k-token batches. `--objective zmbart` uses Appendix B's
alternative: generate randomly chosen sentences of the input chunk (Maurya et al. 2021).

The paper chose the IT learning rate by reading the model's generations; so every evaluation writes,
besides the held-out loss per language, a few generated continuations to eval/step_N.json. The run
directory's last/ is a save_pretrained checkpoint that `finetune.py --init` takes (the run
directory itself may be passed). It trains with the same loop as finetune.py (loop.train).
"""

import argparse
import os
import sys

import numpy as np
import torch

import adapt
import data
import loop
import models
from data import DataError

DEFAULT_LANGS = "en,zh,fr,ko,ru,es,ar,de,th,ro,vi"  # English + the target languages of both tasks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="google/mt5-base", help="hub name, checkpoint dir, or tiny-mt5/tiny-mbart/tiny-nllb")
    p.add_argument("--objective", default="prefix_lm", choices=sorted(data.SELF_SUPERVISED_OBJECTIVES),
                   help="prefix_lm (paper) or zmbart (Appendix B)")
    p.add_argument("--langs", default=DEFAULT_LANGS, help="languages of raw text, sampled uniformly")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--max-steps", type=int, default=100000, help="optimisation steps (paper: 100k)")
    p.add_argument("--max-tokens", type=int, default=5000, help="token budget of a batch (paper: 5k)")
    p.add_argument("--warmup-steps", type=int, default=4000, help="linear warm-up steps")
    p.add_argument("--eval-every", type=int, default=5000, help="held-out loss and samples every N steps")
    p.add_argument("--val-lines", type=int, default=50, help="paragraphs per language held out for evaluation")
    p.add_argument("--num-samples", type=int, default=3, help="generated continuations per language at each evaluation")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the sample continuations")
    p.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="data directory with text/<lang>.txt")
    p.add_argument("--text-dir", default=None, help="raw text directory (default DATA_DIR/text)")
    p.add_argument("--out-dir", default=None, help="run directory (default runs/it/MODEL-OBJECTIVE-lrLR)")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/last")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--log-every", type=int, default=10, help="log every N steps")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def check_args(args):
    models.check_model_name(args.model)
    if not args.lr > 0:
        raise DataError(f"--lr: must be positive, got {args.lr}")
    for flag in ("max_steps", "max_tokens", "eval_every", "log_every", "val_lines"):
        if getattr(args, flag) < 1:
            raise DataError(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    args.langs = data.parse_langs(args.langs, "--langs")
    args.text_dir = args.text_dir or os.path.join(args.data_dir, "text")
    files = {lang: os.path.join(args.text_dir, f"{lang}.txt") for lang in args.langs}
    for path in files.values():
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
    name = os.path.basename(os.path.normpath(args.model))
    args.out_dir = args.out_dir or os.path.join("runs", "it", f"{name}-{args.objective}-lr{args.lr:g}")
    return files


@torch.no_grad()
def held_out_loss(model, stream, pad_token_id, device):
    """Token-averaged loss over one pass of a TokenBatches (every held-out example once)."""
    model.eval()
    loss_sum, num_tokens = 0.0, 0
    for indices in stream.epoch_batches(0):
        batch = {k: v.to(device) for k, v in stream.collate(indices, pad_token_id).items()}
        with loop.autocast(device):
            loss, n = loop.token_loss(model, batch)
        loss_sum, num_tokens = loss_sum + loss.item() * n, num_tokens + n
    return loss_sum / max(num_tokens, 1)


def main(args):
    # ---- setup ----
    try:
        files = check_args(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    run_dir = args.out_dir
    try:
        last, device = loop.start_run(run_dir, args)
    except DataError as e:
        sys.exit(f"error: {e}")

    # ---- model ----
    tokenizer = models.load_tokenizer(args.model, args.data_dir)
    model = adapt.apply(models.load_model(last or args.model, args.data_dir), "full")
    encoder = data.Seq2SeqEncoder(tokenizer, data.family_of(model.config))

    # ---- data: per language, held-out paragraphs first, the rest for training ----
    train_streams, val_streams, val_examples = {}, {}, {}
    for i, (lang, path) in enumerate(files.items()):
        paragraphs = data.read_text(path)
        examples = data.self_supervised_examples(paragraphs, lang, args.objective, seed=args.seed)
        held, rest = examples[:args.val_lines], examples[args.val_lines:]
        if not rest:
            sys.exit(f"error: {path}: too few paragraphs ({len(examples)}) for --val-lines {args.val_lines}")
        train_streams[lang] = data.TokenBatches(encoder.encode(rest), args.max_tokens, seed=args.seed + i, name=lang)
        val_streams[lang] = data.TokenBatches(encoder.encode(held), args.max_tokens, shuffle=False, name=f"val/{lang}")
        val_examples[lang] = held[:args.num_samples]
        print(f"{lang}: {len(rest):,} training and {len(held)} held-out {args.objective} examples from {path}")
    stream = data.Mixture.uniform(train_streams, seed=args.seed)

    # ---- training ----
    def evaluate_fn(step):
        losses = {lang: held_out_loss(model, s, tokenizer.pad_token_id, device) for lang, s in val_streams.items()}
        samples = {}
        for lang, examples in val_examples.items():
            texts = loop.generate(model, tokenizer, encoder.encode(examples), encoder.generation_kwargs(lang),
                                  device, args.max_new_tokens, desc=f"samples {lang}")
            samples[lang] = [{"input": ex.source, "generated": text, "reference": ex.target}
                             for ex, text in zip(examples, texts)]
        average = float(np.mean(list(losses.values())))
        data.write_json(os.path.join(run_dir, "eval", f"step_{step}.json"),
                        {"step": step, "val_loss": losses, "average": average, "samples": samples})
        print(f"eval step {step}: held-out loss " + " ".join(f"{l} {v:.3f}" for l, v in losses.items())
              + f" | avg {average:.3f}")
        return average

    try:
        best_step, best_loss, _ = loop.train(
            model, tokenizer, stream, run_dir=run_dir, base_model=args.model, lr=args.lr,
            warmup_steps=args.warmup_steps, max_steps=args.max_steps, eval_every=args.eval_every,
            evaluate_fn=evaluate_fn, device=device, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
            log_every=args.log_every, resume=args.resume, metric_mode="min")
    except FloatingPointError as e:
        sys.exit(f"error: {e}")
    data.write_json(os.path.join(run_dir, "results.json"),
                    {"config": vars(args), "best_step": best_step, "best_val_loss": best_loss,
                     "checkpoint": os.path.join(run_dir, "last")})
    print(f"intermediate-tuned checkpoint: {os.path.join(run_dir, 'last')} (use with finetune.py --init {run_dir})")


if __name__ == "__main__":
    main(parse_args())
