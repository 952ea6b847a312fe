"""The training loop shared by finetune.py and pretrain_it.py, and batched generation for evaluation.

    python -c "import loop; print([round(loop.get_lr(s, 1e-4, 4000), 8) for s in (1, 4000, 16000)])"

One home for: the fairseq inverse-square-root schedule, the token-normalised loss, the optimisation
step, atomic checkpoints with everything needed to resume bit for bit, the run log, and
length-sorted generation. The stage scripts build data and models and hand them to `train()`.

The loop has one shape (llm.c / nanoGPT style); `step` counts finished updates:

    for step in range(start, max_steps + 1):
        if step is an eval step (every eval_every, and the last):   <- before stepping: covers the
            metric = evaluate(step); save last/ (and best/)            last step (and step 0 on request)
        if step == max_steps: break
        ---- optimisation step (update number step + 1) ----
        batch -> loss = sum of token cross-entropies / number of target tokens -> backward
        -> clip -> AdamW at lr = get_lr(step + 1)
        ---- diagnostics only below here ----
        log loss, lr, grad norm, tokens/s, padding efficiency
"""

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapt
import data
from data import DataError


# -----------------------------------------------------------------------------
# Schedule, loss, optimizer

def get_lr(step, lr, warmup_steps):
    """fairseq `inverse_sqrt` with warmup_init_lr = 0, for the update after `step` finished updates:
    linear warm-up lr * step / warmup_steps, then lr * sqrt(warmup_steps / step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * step / warmup_steps
    return lr * math.sqrt(warmup_steps / step) if warmup_steps > 0 else lr


def decoder_inputs(model, labels):
    """Labels shifted right behind the decoder start token, exactly as each model class does it:
    mT5 "<pad> Y", mBART/NLLB "</s> [tgt_code] Y" (labels are "[tgt_code] Y </s>")."""
    model_type = model.config.model_type
    if model_type == "mt5":
        return model._shift_right(labels)
    if model_type == "mbart":
        from transformers.models.mbart.modeling_mbart import shift_tokens_right
        return shift_tokens_right(labels, model.config.pad_token_id)
    from transformers.models.m2m_100.modeling_m2m_100 import shift_tokens_right
    return shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)


def token_loss(model, batch):
    """Sum of the target tokens' cross-entropies divided by their number: with token-budget batches
    of varying size, every target token weighs the same. Returns (loss, number of target tokens)."""
    labels = batch["labels"]                                   # (batch, tgt_len), -100 on padding
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=decoder_inputs(model, labels)).logits   # (batch, tgt_len, vocab)
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    num_tokens = (labels != -100).sum()
    return loss_sum / num_tokens, int(num_tokens)


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999)):
    """AdamW over the trainable parameters, in model order (so a saved state loads back)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device: {name} requested but CUDA is not available")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA (mT5 overflows in fp16), plain fp32 on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every random state the loop consumes (dropout uses torch's; data streams keep their own)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Files: atomic JSON, the run log, checkpoints

class RunLog:
    """log.jsonl plus one aligned console line per log step, with the same keys."""

    def __init__(self, run_dir, resume_step=None):
        self.path = os.path.join(run_dir, "log.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # drop lines written after the checkpoint we resume from (they will be written again)
            with open(self.path) as f:
                rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            data.write_text(self.path, "".join(rows))

    def write(self, row, bar=None):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        parts = [f"step {row['step']:>6}"]
        for key, value in row.items():
            if key == "step":
                continue
            if isinstance(value, float):
                value = f"{value:.3e}" if key == "lr" else f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
            parts.append(f"{key} {value}")
        (bar.write if bar is not None else print)(" | ".join(parts))


def save_model(model, tokenizer, directory, base_model):
    """A checkpoint directory: added weights only for adapters/prompt, else save_pretrained."""
    if getattr(model, "_xlgen_method", None) in ("adapters", "prompt"):
        adapt.save_added(model, directory, base_model)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_checkpoint(run_dir, name, model, tokenizer, base_model, train_state=None):
    """Write run_dir/name (last/ or best/) so that a kill at any moment leaves a loadable one:

        write everything into run_dir/.tmp-name-XXXX   (old name/ untouched)
        rename name/ -> .old-name                      (one rename)
        rename .tmp-name-XXXX -> name/                 (one rename)
        delete .old-name
    `recover_checkpoint` puts .old-name back if a kill fell between the two renames.
    """
    final, old = os.path.join(run_dir, name), os.path.join(run_dir, f".old-{name}")
    tmp = tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-{name}-")
    save_model(model, tokenizer, tmp, base_model)
    if train_state is not None:
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(run_dir, name):
    """Undo a save interrupted between its two renames; remove abandoned temporary directories."""
    final, old = os.path.join(run_dir, name), os.path.join(run_dir, f".old-{name}")
    if not os.path.isdir(final) and os.path.isdir(old):
        os.rename(old, final)
    for entry in os.listdir(run_dir):
        if entry.startswith(f".tmp-{name}-"):
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)
    return final if os.path.isdir(final) else None


def start_run(run_dir, args):
    """Set up a run directory for a stage: recover an interrupted save, refuse to overwrite a
    checkpoint without --resume, write args.json on a fresh start, seed, pick the device.
    Returns (last/ checkpoint or None, device)."""
    last = recover_checkpoint(run_dir, "last") if os.path.isdir(run_dir) else None
    if last and not args.resume:
        raise DataError(f"--out-dir {run_dir} holds a checkpoint; pass --resume to continue it or choose another --out-dir")
    if args.resume and not last:
        raise DataError(f"--resume: no last/ checkpoint in {run_dir}")
    device = pick_device(args.device)
    os.makedirs(run_dir, exist_ok=True)
    if not args.resume:
        data.write_json(os.path.join(run_dir, "args.json"), vars(args))
    seed_everything(args.seed)
    return last, device


def load_train_state(checkpoint_dir):
    path = os.path.join(checkpoint_dir, "train_state.pt")
    if not os.path.isfile(path):
        raise DataError(f"--resume: {path} not found; the checkpoint cannot be resumed")
    return torch.load(path, weights_only=False)


# -----------------------------------------------------------------------------
# Generation for evaluation: length-sorted batches under a token budget

def generation_batches(lengths, max_tokens, max_batch_size=256):
    """Indices sorted by source length, cut so batch_size * longest source <= max_tokens.
    Sorting puts sources of similar length together, so little of each batch is padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, batch = [], []
    for i in order:
        if batch and (len(batch) + 1) * lengths[i] > max_tokens or len(batch) >= max_batch_size:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def decode_generated(tokenizer, sequences, generation_kwargs):
    """Text of generated ids without the decoder start, the forced language code, the final </s>
    and padding. Other special tokens (sentinels, <sep>, stray codes) are kept: evaluate.py strips
    and counts them (paper Section 5)."""
    forced = generation_kwargs.get("forced_bos_token_id")
    texts = []
    for seq in sequences.tolist():
        seq = seq[1:]                                          # decoder start token
        if forced is not None and seq and seq[0] == forced:
            seq = seq[1:]
        if tokenizer.eos_token_id in seq:
            seq = seq[:seq.index(tokenizer.eos_token_id)]
        seq = [t for t in seq if t != tokenizer.pad_token_id]
        texts.append(tokenizer.decode(seq, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return texts


@torch.no_grad()
def generate_batch(model, tokenizer, sources, generation_kwargs, device, max_new_tokens, num_beams=1):
    """Generated ids (batch, length) for a list of source id lists, padded on the right."""
    tensors = data.collate([{"input_ids": ids, "labels": [0]} for ids in sources], tokenizer.pad_token_id)
    with autocast(device):
        return model.generate(input_ids=tensors["input_ids"].to(device),
                              attention_mask=tensors["attention_mask"].to(device),
                              max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                              **generation_kwargs).cpu()


def generate(model, tokenizer, encoded, generation_kwargs, device, max_new_tokens, num_beams=1,
             max_tokens=8000, desc="generate"):
    """Predictions for encoded sources (list of {"input_ids"}), in input order, generated in
    length-sorted batches of at most `max_tokens` source tokens."""
    model.eval()
    lengths = [len(e["input_ids"]) for e in encoded]
    batches = generation_batches(lengths, max_tokens)
    predictions = [None] * len(encoded)
    for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2, file=sys.stderr):
        out = generate_batch(model, tokenizer, [encoded[i]["input_ids"] for i in batch], generation_kwargs,
                             device, max_new_tokens, num_beams)
        for i, text in zip(batch, decode_generated(tokenizer, out, generation_kwargs)):
            predictions[i] = text
    return predictions


# -----------------------------------------------------------------------------
# The loop

def train(model, tokenizer, stream, *, run_dir, base_model, lr, warmup_steps, max_steps, eval_every,
          evaluate_fn, device, grad_clip=1.0, weight_decay=0.0, log_every=10, resume=False,
          eval_at_start=False, metric_mode="max", stop_at_step=None):
    """Train `model` on batches from `stream` (a data.Mixture); returns (best_step, best_metric, stopped).

    evaluate_fn(step) -> a scalar to select best/ by (higher is better for metric_mode "max"),
    or None to keep only last/. Resuming restores weights (from last/, loaded by the caller),
    optimizer, schedule position, RNG and data-iterator state, so the run continues bit for bit.
    `stop_at_step`: return right after the checkpoint of that (evaluation) step, stopped=True, as a
    job with a time limit would; --resume continues it.
    """
    model.to(device)
    optimizer = make_optimizer(model, lr, weight_decay)
    start_step, best_step, best_metric = 0, None, None
    if resume:
        state = load_train_state(os.path.join(run_dir, "last"))
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        start_step, best_step, best_metric = state["step"], state["best_step"], state["best_metric"]
        print(f"resuming from step {start_step} (best step {best_step}, metric {best_metric})")
    log = RunLog(run_dir, resume_step=start_step if resume else None)
    better = (lambda a, b: a > b) if metric_mode == "max" else (lambda a, b: a < b)

    bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
    window = {"loss_sum": 0.0, "tokens": 0, "real": 0, "padded": 0, "time": time.perf_counter(), "steps": 0}
    for step in range(start_step, max_steps + 1):
        # ---- evaluation and checkpoints, before stepping ----
        is_eval_step = (step % eval_every == 0 and step > 0) or step == max_steps or (step == 0 and eval_at_start)
        if is_eval_step and not (resume and step == start_step):
            metric = evaluate_fn(step)
            if metric is not None and (best_metric is None or better(metric, best_metric)):
                best_step, best_metric = step, metric
                save_checkpoint(run_dir, "best", model, tokenizer, base_model)
            train_state = {"step": step, "optimizer": optimizer.state_dict(), "stream": stream.state_dict(),
                           "rng": rng_state(), "best_step": best_step, "best_metric": best_metric}
            save_checkpoint(run_dir, "last", model, tokenizer, base_model, train_state)
            model.train()
            if step == stop_at_step and step < max_steps:
                bar.close()
                return best_step, best_metric, True
        if step == max_steps:
            break

        # ---- one optimisation step ----
        model.train()
        path, indices = next(stream)
        batch = {k: v.to(device) for k, v in stream.stream(path).collate(indices, tokenizer.pad_token_id).items()}
        step_lr = get_lr(step + 1, lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        with autocast(device):
            loss, num_tokens = token_loss(model, batch)
        if not torch.isfinite(loss):
            last = os.path.join(run_dir, "last")
            bar.close()
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1} (lr {step_lr:.3e}); "
                                     f"stopped; the last good checkpoint is {last}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if loss.requires_grad:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:  # no trainable weight on the loss's path (e.g. LayerDrop skipped every decoder layer
            grad_norm = torch.tensor(0.0)  # while only a prompt is trained): nothing to update


        # ---- diagnostics only below here ----
        bar.update(1)
        window["loss_sum"] += loss.item() * num_tokens
        window["tokens"] += num_tokens
        window["real"] += int(batch["attention_mask"].sum()) + num_tokens
        window["padded"] += batch["input_ids"].numel() + batch["labels"].numel()
        window["steps"] += 1
        if (step + 1) % log_every == 0 or step + 1 == max_steps:
            elapsed = time.perf_counter() - window["time"]
            row = {"step": step + 1, "loss": window["loss_sum"] / window["tokens"], "lr": step_lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": window["real"] / elapsed,
                   "padding_efficiency": window["real"] / window["padded"], "stream": "/".join(path)}
            log.write(row, bar)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{step_lr:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}")
            window = {"loss_sum": 0.0, "tokens": 0, "real": 0, "padded": 0, "time": time.perf_counter(), "steps": 0}
    bar.close()
    return best_step, best_metric, False
