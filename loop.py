"""The training loop shared by finetune.py and pretrain_it.py, and batched generation for evaluation.

    python -c "import loop; print([round(loop.get_lr(s, 1e-4, 4000), 8) for s in (1, 4000, 16000)])"

This module is the one home for: the fairseq inverse-square-root schedule, the token-normalised
loss, the optimisation step, atomic checkpoints with everything needed to resume bit for bit, the
run directory and its settings, the run log, and length-sorted generation. The stage scripts build
the data and the models and hand them to `train()`.

The loop has one shape (llm.c / nanoGPT style); `step` counts finished updates:

    for step in range(start, max_steps + 1):
        if step is an eval step (every eval_every, and the last):   <- before stepping: covers the
            metric = evaluate(step); save last/ (and best/)            last step (and step 0 on request)
        if step == max_steps: break
        ---- optimisation step (update number step + 1): train_step ----
        update_freq batches -> loss = sum of their target-token cross-entropies / their number of
        target tokens -> backward -> clip -> AdamW at lr = get_lr(step + 1)
        ---- diagnostics only below here ----
        log loss, lr, grad norm, tokens/s, padding efficiency, which streams the batches came from
"""

import collections
import contextlib
import dataclasses
import filecmp
import inspect
import json
import math
import os
import pickle
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapt
import common
import decode
import data
import models
from common import DataError, UsageError


# -----------------------------------------------------------------------------
# Schedule, loss, optimizer, the step

def get_lr(step, lr, warmup_steps):
    """fairseq `inverse_sqrt` with warmup_init_lr = 0, for the update after `step` finished updates:
    linear warm-up lr * step / warmup_steps, then lr * sqrt(warmup_steps / step).

    The loop gives update k (k = 1, 2, ...) get_lr(k): the first update already moves the weights,
    at lr / warmup_steps. fairseq (which sets the LR after each update, starting from warmup_init_lr
    = 0) and HF's get_inverse_sqrt_schedule (a LambdaLR from step 0) give update k get_lr(k - 1):
    the same curve one update later, their first update at LR 0 (tests/test_finetune.py compares
    with HF's exactly). Our choice; the paper names fairseq's schedule and nothing finer."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * step / warmup_steps
    return lr * math.sqrt(warmup_steps / step) if warmup_steps > 0 else lr


def loss_sum(model, input_ids, attention_mask, labels):
    """Sum of the target tokens' cross-entropies of one batch: tensors in, a scalar tensor out (no
    host sync), so torch.compile takes it whole (--compile: forward and backward compiled). No
    key/value cache: given decoder_input_ids and no labels, HF models build one (config.use_cache),
    which training never reads, and whose construction (DynamicCache(config=...) deep-copies the
    config) breaks the compiled graph under torch 2.11."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=models.decoder_inputs(model, labels),
                   use_cache=False).logits   # (batch, tgt_len, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def token_loss_sum(model, batch, loss_fn=loss_sum):
    """(sum of the target tokens' cross-entropies, number of target tokens) of one batch."""
    labels = batch["labels"]                                   # (batch, tgt_len), -100 on padding
    return loss_fn(model, batch["input_ids"], batch["attention_mask"], labels), int((labels != -100).sum())


def token_loss(model, batch):
    """Sum of the target tokens' cross-entropies divided by their number: with token-budget batches
    of varying size, every target token weighs the same. Returns (loss, number of target tokens)."""
    loss_sum, num_tokens = token_loss_sum(model, batch)
    return loss_sum / num_tokens, num_tokens


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, foreach=None, fused=None):
    """AdamW over the trainable parameters, in model order (so a saved state loads back). `foreach`:
    torch's multi-tensor implementation (default: on CUDA only); `fused`: one kernel for the whole
    update (CUDA, with --compile)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                             fused=fused)


def compiled_loss(backend="inductor"):
    """loss_sum compiled by torch.compile for the training step (--compile). Shapes are bucketed
    (data.pad_to_buckets: at least 2 rows, since torch specializes a size of 1), and their rows and
    lengths are marked dynamic before the first call, so the first graph already serves every
    bucket: one compile per mode (train, eval), where torch's automatic dynamic shapes compiled the
    first shape, then again for each dimension that changed (3 graphs; on a GPU each is a compile
    of the whole forward and backward)."""
    compiled = torch.compile(loss_sum, backend=backend)

    def loss(model, input_ids, attention_mask, labels):
        for tensor in (input_ids, attention_mask, labels):
            decode.mark_dynamic(tensor, 0, 1)   # rows, source or target positions
        return compiled(model, input_ids, attention_mask, labels)
    return loss


def train_step(model, optimizer, batches, lr, grad_clip, device, precision=None, loss_fn=loss_sum):
    """One update from `batches` (a list of update_freq collated batches on `device`), fairseq's
    --update-freq semantics: the loss is the sum of all their target tokens' cross-entropies
    divided by the total number of target tokens, so every token weighs the same as in one big
    batch. Returns (mean token loss, number of target tokens, gradient norm before clipping).

        loss = sum_b sum_t CE(b, t) / sum_b T_b      backward per batch b (gradients add up)

    A non-finite loss raises FloatingPointError before any weight changes. A step in which no
    trainable weight is on the loss's path (LayerDrop skipped every decoder layer while only a
    prompt is trained) changes nothing and reports a gradient norm of 0. `precision`: "bf16" or
    "fp32" (None: the device's default, resolve_precision). `loss_fn`: loss_sum or compiled_loss().
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    total_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    loss_total, has_grad = 0.0, False
    for batch in batches:
        with autocast(device, precision):
            batch_loss, _ = token_loss_sum(model, batch, loss_fn)
        loss = batch_loss / total_tokens
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite loss ({loss.item()})")
        if loss.requires_grad:
            loss.backward()
            has_grad = True
        loss_total += loss.item()
    if not has_grad:
        return loss_total, total_tokens, 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, total_tokens, float(grad_norm)


def add_training_args(parser, max_steps, max_tokens, eval_every):
    """The flags of the training loop, declared once for finetune.py and pretrain_it.py (the stage
    gives its own defaults for the three that differ)."""
    p = parser
    # Second names: HF Trainer's and fairseq's flags of the same meaning (a step is an update in all three).
    p.add_argument("--lr", "--learning-rate", type=common.positive_float, default=1e-4,
                   help="peak learning rate (after warm-up)")
    p.add_argument("--max-steps", "--max-update", type=common.positive_int, default=max_steps, help="optimisation steps")
    p.add_argument("--max-tokens", type=common.positive_int, default=max_tokens, help="token budget of a training batch")
    p.add_argument("--update-freq", "--gradient-accumulation-steps", type=common.positive_int, default=1,
                   help="batches per update (gradient accumulation, fairseq semantics): K x --max-tokens per update")
    p.add_argument("--warmup-steps", "--warmup-updates", type=common.non_negative_int, default=4000,
                   help="linear warm-up steps of the inverse-sqrt schedule (0: constant LR)")
    p.add_argument("--eval-every", "--eval-steps", type=common.positive_int, default=eval_every,
                   help="evaluate every N steps")
    p.add_argument("--out-dir", "--output-dir", default=None, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last/ checkpoint")
    p.add_argument("--stop-at-step", type=common.positive_int, default=None,
                   help="exit after the checkpoint of this evaluation step (for job time limits); continue with --resume")
    p.add_argument("--stop-after-steps", type=common.positive_int, default=None,
                   help="exit after the first checkpoint at least N steps into this session (job time limits: "
                        "each job trains about N steps; the study resubmits with --resume)")
    p.add_argument("--keep-train-state", action="store_true",
                   help="keep last/train_state.pt (optimizer, schedule, data position) when the run has finished: "
                        "extending the run later (--resume --max-steps N) needs it; by default it is removed")
    p.add_argument("--seed", type=common.seed, default=0, help="random seed (data order, dropout, initialisation of added weights)")
    p.add_argument("--grad-clip", "--max-grad-norm", "--clip-norm", type=common.non_negative_float, default=1.0,
                   help="clip the gradient norm to this (0 = off)")
    p.add_argument("--weight-decay", type=common.non_negative_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--adam-beta1", type=common.open_unit_float, default=0.9, help="AdamW beta1")
    p.add_argument("--adam-beta2", type=common.open_unit_float, default=0.999, help="AdamW beta2")
    p.add_argument("--adam-eps", type=common.positive_float, default=1e-8, help="AdamW epsilon")
    p.add_argument("--log-every", "--logging-steps", type=common.positive_int, default=10, help="log every N steps")
    p.add_argument("--compile", action="store_true",
                   help="training step compiled by torch.compile over batches padded to bucketed shapes "
                        "(data.pad_to_buckets), fused AdamW on CUDA; off by default until bench/gpu.sh measures it faster")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the log's scalars as TensorBoard events into RUN/tensorboard (needs the "
                        "tensorboard package: pip install -r requirements-extra.txt)")
    add_generation_args(p)
    add_device_args(p)
    common.add_config_flag(p)


def add_generation_args(p):
    """How generation batches are sized and decoded (training stages' evaluation, predict.py)."""
    p.add_argument("--eval-max-tokens", type=common.positive_int, default=None,
                   help="source-token budget of a generation batch (default: what the GPU's free memory holds, "
                        "decode.batch_limits; on CPU 8000)")
    p.add_argument("--max-gen-batch-size", type=common.positive_int, default=None,
                   help="most sources in a generation batch (default: as --eval-max-tokens; at most 512, on CPU 256)")
    add_decoder_arg(p)


def add_decoder_arg(p):
    """--decoder (DECODERS), for evaluation and predict.py, and translate_train.py's beam search."""
    p.add_argument("--decoder", default="auto", choices=DECODERS,
                   help="dynamic (greedy: finished rows dropped at once; beam search: HF generate), static (fixed "
                        "shapes, greedy or beam search: the same tokens), compiled (static, its step compiled: CUDA "
                        "graphs on a GPU); auto: compiled on CUDA; on CPU dynamic (greedy) or static (beam search)")


def add_device_args(p):
    """--device and --precision, for every stage that runs a model (training, evaluation, translation)."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="bf16 autocast or fp32 (auto: bf16 on a GPU that has it, fp32 otherwise; no fp16: mT5 overflows in it)")


def check_stop_at_step(args):
    if args.stop_at_step is not None and args.stop_at_step % args.eval_every and args.stop_at_step != args.max_steps:
        raise UsageError(f"--stop-at-step {args.stop_at_step}: not an evaluation step (a multiple of --eval-every "
                         f"{args.eval_every}); a run can only stop where it writes a checkpoint")


def pick_device(name="auto"):
    """The torch device of --device (auto: CUDA when there is one), set up for this loop's shapes."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: {name} requested but CUDA is not available")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{name}'; use auto, cpu or cuda") from None
    if device.type == "cuda":
        # cuDNN's attention builds an execution plan for every new shape: 18-22 ms of CPU per call
        # (H200, torch 2.11, bench/train_throughput.py --profile), 75% of a training step, and token-budget
        # batches and decoding (a row leaving its batch) make new shapes all the time. The flash and
        # memory-efficient kernels need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(name, device):
    """--precision for `device`: auto is bf16 on a GPU that has it (A100, H100; not V100 or T4), fp32
    otherwise (CPU included). fp16 is not offered: mT5 overflows in it."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if name in (None, "auto"):
        return "bf16" if bf16_gpu else "fp32"
    if name not in PRECISIONS:
        raise UsageError(f"--precision: unknown precision '{name}'; use {', '.join(PRECISIONS)}")
    if name == "bf16" and device.type == "cuda" and not bf16_gpu:
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use --precision fp32")
    return name


def autocast(device, precision=None):
    """bf16 autocast (the weights stay fp32) or plain fp32. `precision` as resolve_precision returned it
    (the stages resolve --precision once, at the start), or None / "auto": resolved here."""
    if precision in (None, "auto"):
        precision = resolve_precision(precision, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
# The run directory: its settings, its log, its checkpoints
#
#   RUN/args.json            the resolved settings (feed back with --config RUN/args.json)
#   RUN/log.jsonl            one line per log step (and RUN/log.csv, RUN/tensorboard/: the same scalars)
#   RUN/last/, RUN/best/     checkpoints (each with a README.md model card when the stage writes one);
#                            last/ has train_state.pt for --resume
#
# A run directory belongs to one set of settings. --resume, or a rerun into an existing directory,
# must give the same settings, except those listed here, which only say how far to go or where to
# run (fairseq and HF would silently mix two runs in one directory).
RUNTIME_SETTINGS = ("max_steps", "stop_at_step", "stop_after_steps", "resume", "device", "precision", "log_every",
                    "eval_max_tokens", "max_gen_batch_size", "decoder", "config", "token_cache", "keep_train_state",
                    "tensorboard")


def settings_of(args):
    """The settings a run directory records: every flag's resolved value."""
    return {k: v for k, v in vars(args).items() if k != "config"}


def changed_settings(saved, new):
    """Names of the settings (other than RUNTIME_SETTINGS) whose values differ. The run directory
    itself is not compared: a run directory that was moved or copied is still the same run."""
    keys = (set(saved) | set(new)) - set(RUNTIME_SETTINGS) - {"out_dir"}
    return sorted(k for k in keys if saved.get(k) != new.get(k))


def check_same_settings(run_dir, args, what):
    """UsageError naming every setting in which `args` differs from RUN/args.json."""
    saved = read_args(run_dir)
    if saved is None:
        return
    changed = changed_settings(saved, settings_of(args))
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k, None)!r}" for k in changed)
        raise UsageError(f"--out-dir {run_dir}: {what} was started with other settings ({details}); "
                         f"use the same settings or another --out-dir")


def read_args(run_dir):
    path = os.path.join(run_dir, "args.json")
    return common.read_json(path, "args.json") if os.path.isfile(path) else None


def run_lock(args):
    """The lock of the run directory args.out_dir (common.DirectoryLock), taken before the run
    reads its state: a second process on the same directory stops at once with the holder's pid."""
    common.check_output_dir(args.out_dir, "--out-dir")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out-dir {args.out_dir}: is a file")
    return common.DirectoryLock(args.out_dir, "--out-dir")


def start_run(args):
    """Check the run directory args.out_dir for a stage (after `finished_run` said it is not
    finished, and after every input was read): recover an interrupted save; refuse to overwrite a
    checkpoint without --resume, and to resume with other settings; print the settings; seed;
    pick the device. Writes nothing else (see begin_run). Called under run_lock, which checked the
    directory and made it. Returns (last/ or None, device)."""
    run_dir = args.out_dir
    last = recover_checkpoint(run_dir, "last")
    if last and not args.resume:
        raise UsageError(f"--out-dir {run_dir} holds a checkpoint; pass --resume to continue it or choose another --out-dir")
    if args.resume and not last:
        raise UsageError(f"--resume: no last/ checkpoint in {run_dir}")
    device = pick_device(args.device)
    args.precision = resolve_precision(args.precision, device)  # printed and recorded as resolved
    if getattr(args, "tensorboard", False):
        _check_tensorboard()  # before the model loads
    if last:
        check_same_settings(run_dir, args, "its checkpoint")
        step = load_train_state(last)["step"]
        if args.max_steps < step:
            raise UsageError(f"--max-steps {args.max_steps}: the run in {run_dir} is already at step {step}")
    common.print_settings(settings_of(args))
    seed_everything(args.seed)
    return last, device


def begin_run(args, resume):
    """Once the model and the data are ready: write args.json and, on a fresh start, clear what an
    earlier attempt that never reached a checkpoint left. Until here a failure changes nothing."""
    os.makedirs(args.out_dir, exist_ok=True)
    if not resume:
        for stale in ("log.jsonl", "log.csv", "results.json"):
            if os.path.exists(os.path.join(args.out_dir, stale)):
                os.remove(os.path.join(args.out_dir, stale))
        common.remove_tree(os.path.join(args.out_dir, "tensorboard"))
    common.write_json(os.path.join(args.out_dir, "args.json"), settings_of(args))


def finished_run(args):
    """The results of a finished run in args.out_dir, if it finished at args.max_steps with the same
    settings (a rerun is then skipped); None if the run is to be started, resumed or extended
    (--resume with a larger --max-steps). Other settings than before are refused."""
    path = os.path.join(args.out_dir, "results.json")
    if not os.path.isfile(path):
        return None
    results = common.read_json(path, "results.json")
    check_same_settings(args.out_dir, args, "this finished run")
    done_steps = results.get("config", {}).get("max_steps") if isinstance(results, dict) else None
    if done_steps == args.max_steps:
        print(f"{args.out_dir}/results.json exists with the same settings: run already finished, skipped")
        finish_checkpoints(args.out_dir, results, args.keep_train_state)  # (if a kill came between the two)
        return results
    if done_steps is not None and args.max_steps > done_steps and not args.resume:
        raise UsageError(f"--max-steps {args.max_steps}: the run in {args.out_dir} finished at {done_steps} steps; "
                         f"pass --resume to extend it")
    state = os.path.join(args.out_dir, "last", "train_state.pt")
    if done_steps is not None and args.max_steps > done_steps and not os.path.isfile(state):
        raise UsageError(f"--resume --max-steps {args.max_steps}: the run in {args.out_dir} finished at {done_steps} "
                         f"steps and its optimizer state was removed then ({state}); a run can be extended only if it "
                         f"was run with --keep-train-state: run it again with that flag, or start a new run")
    return None


def finish_run(args, results, model_name, device):
    """The end of a finished run: results.json (with how it was made: provenance), then the
    checkpoints pruned to what a finished run needs (finish_checkpoints)."""
    results = {**results, "provenance": {**provenance(model_name, device), "precision": args.precision}}
    common.write_json(os.path.join(args.out_dir, "results.json"), results)
    finish_checkpoints(args.out_dir, results, args.keep_train_state)
    return results


def finish_checkpoints(run_dir, results, keep_train_state=False):
    """A finished run keeps weights only: last/train_state.pt (the AdamW moments: twice the weights)
    is removed unless keep_train_state; when best/ is the last step, best/'s files become hard links
    to last/'s identical ones (one copy on disk). Called after results.json is written, so a kill in
    between leaves a finished run with more on disk, never an unfinished run without its state."""
    last, best = os.path.join(run_dir, "last"), os.path.join(run_dir, "best")
    state = os.path.join(last, "train_state.pt")
    if not keep_train_state and os.path.isfile(state):
        os.remove(state)
    if results.get("best_step") != results.get("config", {}).get("max_steps") or not (
            os.path.isdir(best) and os.path.isdir(last)):
        return
    for name in os.listdir(best):
        ours, theirs = os.path.join(best, name), os.path.join(last, name)
        if not os.path.isfile(theirs) or os.path.samefile(ours, theirs) or not filecmp.cmp(ours, theirs, shallow=False):
            continue
        link = os.path.join(best, f".link-{name}")
        try:
            os.link(theirs, link)
            os.replace(link, ours)
        except OSError:  # a filesystem without hard links: keep the copy
            if os.path.exists(link):
                os.remove(link)


def provenance(model_name, device):
    """How a run was made: the code's git commit (and whether files differed from it), the versions
    of the requirements (requirements.txt's names), the device, and which weights the model name
    stood for (models.model_revision)."""
    import platform
    import subprocess
    from importlib import metadata
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*words):
        try:
            out = subprocess.run(["git", "-C", here, *words], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    versions = {"python": platform.python_version()}
    with open(os.path.join(here, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            name = line.split("#")[0].split("==")[0].strip()
            if name:
                try:
                    versions[name] = metadata.version(name)
                except metadata.PackageNotFoundError:
                    versions[name] = None
    versions["torch"] = torch.__version__  # with its build: PyPI's CUDA wheel says 2.11.0, torch 2.11.0+cu130
    is_cuda = torch.device(device).type == "cuda"
    return {"git_commit": commit, "git_dirty": None if commit is None else bool(git("status", "--porcelain",
                                                                                      "--untracked-files=no")),
            "versions": versions, "device": torch.cuda.get_device_name(device) if is_cuda else
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "model": model_name, "model_revision": models.model_revision(model_name)}


def scalars(row, prefix=""):
    """The numbers of a log row, nested dicts flattened with "/" ({"streams": {"task": 5}} ->
    {"streams/task": 5}): what log.csv and TensorBoard get."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out |= scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def _check_tensorboard():
    import importlib
    try:
        importlib.import_module("tensorboard")  # torch.utils.tensorboard needs it
    except ImportError:
        raise UsageError("--tensorboard: needs the tensorboard package (pip install -r requirements-extra.txt)") from None


def tensorboard_writer(log_dir, purge_step=None):
    """A SummaryWriter (torch.utils.tensorboard), or a one-line error when tensorboard is not installed."""
    _check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


class RunLog:
    """log.jsonl, its step rows as log.csv (one column per scalar, "streams/task/en" for nested
    counts), optionally TensorBoard events (RUN/tensorboard), and one aligned console line per
    log step, with the same keys. On resume, what was logged after the checkpoint is dropped from
    all three (TensorBoard: purge_step), because it will be logged again."""

    def __init__(self, run_dir, resume_step=None, tensorboard=False):
        self.path = os.path.join(run_dir, "log.jsonl")
        self.csv_path = os.path.join(run_dir, "log.csv")
        if resume_step is not None and os.path.exists(self.path):
            # drop lines written after the checkpoint we resume from (they will be written again)
            kept = [line for line, row in self._lines() if row.get("step", 0) <= resume_step]
            common.write_text(self.path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
        self.columns = []
        self._rewrite_csv()
        self.writer = None
        if tensorboard:
            self.writer = tensorboard_writer(os.path.join(run_dir, "tensorboard"),
                                             purge_step=None if resume_step is None else resume_step + 1)

    def _lines(self):
        """(line, object) of each readable line of log.jsonl (a line cut by a kill is skipped)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    yield line, row

    def _rewrite_csv(self):
        """log.csv from log.jsonl's step rows (at the start, and when a row brings a new column)."""
        rows = [scalars(row) for _, row in self._lines() if "step" in row and "event" not in row]
        self.columns = list(dict.fromkeys(key for row in rows for key in row))
        if not rows and not os.path.exists(self.csv_path):
            return
        common.write_text(self.csv_path, ",".join(self.columns) + "\n" + "".join(map(self._csv_line, rows)))

    def _csv_line(self, row):
        return ",".join("" if row.get(c) is None else repr(row[c]) for c in self.columns) + "\n"

    def event(self, row):
        """A line that is not a step (e.g. what the data streams read and cut), without a console line."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def write(self, row, bar=None):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        numbers = scalars(row)
        if set(numbers) - set(self.columns):
            self._rewrite_csv()
        else:
            with open(self.csv_path, "a", encoding="utf-8") as f:
                f.write(self._csv_line(numbers))
        if self.writer is not None:
            for key, value in numbers.items():
                if key != "step":
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()
        parts = [f"step {row['step']:>6}"]
        for key, value in row.items():
            if key == "step":
                continue
            if isinstance(value, float):
                value = f"{value:.3e}" if key == "lr" else f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
            elif isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            parts.append(f"{key} {value}")
        (bar.write if bar is not None else print)(" | ".join(parts))

    def close(self):
        if self.writer is not None:
            self.writer.close()


def save_checkpoint(run_dir, name, model, tokenizer, base_model, train_state=None, card=None):
    """Write run_dir/name (last/ or best/) so that a kill at any moment leaves a loadable one:

        write everything into run_dir/.tmp-name-XXXX   (old name/ untouched)
        rename name/ -> .old-name                      (one rename)
        rename .tmp-name-XXXX -> name/                 (one rename)
        delete .old-name
    `recover_checkpoint` puts .old-name back if a kill fell between the two renames. `card`: the
    text of the checkpoint's README.md (a model card), if any.
    A failure while writing (a full disk, Ctrl-C) removes the temporary directory, so it does not
    keep the space, and leaves name/ as it was; a full disk is a one-line DataError.
    """
    final, old = os.path.join(run_dir, name), os.path.join(run_dir, f".old-{name}")
    tmp = None
    try:
        tmp = common.make_temp_dir(run_dir, prefix=f".tmp-{name}-")
        adapt.save(model, tmp, base_model)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            common.write_text(os.path.join(tmp, "README.md"), card)
        if train_state is not None:
            torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    except BaseException as e:
        if tmp is not None:
            common.remove_tree(tmp)
        written = os.path.join(run_dir, name)
        keep = f"{written} is unchanged" if os.path.isdir(written) else f"no {name}/ checkpoint was written"
        if isinstance(e, Exception):  # e.g. a full disk: OSError, or safetensors' / torch.save's own error
            reason = e.strerror if isinstance(e, OSError) and e.strerror else \
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            then = "continue with --resume" if os.path.isdir(os.path.join(run_dir, "last")) else "run it again"
            raise DataError(f"{run_dir}: cannot write the {name}/ checkpoint ({reason}); {keep}; "
                            f"free space there and {then}") from None
        raise
    if os.path.isdir(final):
        common.remove_tree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    common.remove_tree(old)


def recover_checkpoint(run_dir, name):
    """Undo a save interrupted between its two renames; remove abandoned temporary directories."""
    final, old = os.path.join(run_dir, name), os.path.join(run_dir, f".old-{name}")
    if not os.path.isdir(final) and os.path.isdir(old):
        os.rename(old, final)
    for entry in os.listdir(run_dir):
        if entry.startswith(f".tmp-{name}-"):
            common.remove_tree(os.path.join(run_dir, entry))
    return final if os.path.isdir(final) else None


def load_train_state(checkpoint_dir):
    """train_state.pt: tensors, numbers, strings, lists, tuples and dicts only. It is loaded with
    weights_only=True, so a file from elsewhere cannot run code when it is unpickled."""
    path = os.path.join(checkpoint_dir, "train_state.pt")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found; the checkpoint cannot be resumed")
    hint = "start the run again, or resume from a copy of an intact checkpoint"
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the pickle names a Python object to build: code, not data
            raise DataError(f"{path}: refused: it holds Python objects, not only tensors and numbers "
                            f"(unpickling it could run code); {hint}") from None
        raise DataError(f"{path}: truncated or corrupt (not a readable pickle); {hint}") from None
    except Exception as e:  # noqa: BLE001 -- garbage bytes fail in many ways inside the unpickler
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{path}: truncated or corrupt ({type(e).__name__}{': ' + reason if reason else ''}); "
                        f"{hint}") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "stream", "rng"} <= set(state):
        raise DataError(f"{path}: not an xlgen training state; {hint}")
    return state


# -----------------------------------------------------------------------------
# Generation for evaluation: length-sorted batches under a token budget

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


# Settings of a model's generation config that change greedy decoding beyond what greedy_batch does
# (forced BOS and EOS): with any of them set, model.generate decodes instead.
GREEDY_UNSUPPORTED = ("min_length", "min_new_tokens", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
                      "repetition_penalty", "encoder_repetition_penalty", "bad_words_ids", "suppress_tokens",
                      "begin_suppress_tokens", "sequence_bias", "exponential_decay_length_penalty",
                      "forced_decoder_ids", "max_time", "stop_strings")


def greedy_supported(model):
    """Whether greedy_batch decodes exactly as model.generate(num_beams=1) for this model."""
    changed = model.generation_config.to_diff_dict()
    return not any(changed.get(name) not in (None, 0, 1.0, [], False) for name in GREEDY_UNSUPPORTED)


# ... and beam search beyond what decode.StaticDecoder.beam_search does (length penalty, early stopping)
BEAM_UNSUPPORTED = ("renormalize_logits", "remove_invalid_values", "diversity_penalty", "constraints",
                    "force_words_ids", "watermarking_config", "low_memory", "guidance_scale")


def beam_supported(model):
    """Whether decode.StaticDecoder.beam_search decodes exactly as model.generate(num_beams>1)."""
    changed = model.generation_config.to_diff_dict()
    return (greedy_supported(model) and isinstance(model.generation_config.eos_token_id, int)
            and changed.get("num_return_sequences") in (None, 1) and changed.get("num_beam_groups") in (None, 1)
            and not any(changed.get(name) not in (None, 0, 0.0, [], False) for name in BEAM_UNSUPPORTED))


@torch.no_grad()
def greedy_batch(model, input_ids, attention_mask, generation_kwargs, max_new_tokens, logits_fn=None):
    """Greedy decoding of one right-padded batch: the encoder once, then one decoder position per
    step with the key/value cache. A row leaves the batch as soon as it has written </s> (its cache
    rows, encoder states and mask are dropped), so a batch costs what its rows still need; HF
    generate keeps computing finished rows until the last one ends. The same tokens as
    model.generate(num_beams=1, do_sample=False, max_new_tokens=...) with the model's forced BOS
    (the target language code) and forced EOS (</s> as the last allowed token, mBART's config).

    logits_fn(rows, step, scores): optional, changes the next-token scores (batch, vocab) in place
    for `rows` (indices into the batch) at `step` (tokens written so far), after the forced tokens,
    as a LogitsProcessor given to generate would. Returns generate's layout: (batch, 1 + length)
    ids, the decoder start token first, padding after </s>.
    """
    start, forced_bos, forced_eos, eos, pad = decode.greedy_tokens(model, generation_kwargs)
    batch_size, device = input_ids.shape[0], input_ids.device
    encoder_states = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    from transformers import DynamicCache, EncoderDecoderCache
    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    out = torch.full((batch_size, 1 + max_new_tokens), pad, dtype=torch.long, device=device)
    out[:, 0] = start
    rows = torch.arange(batch_size, device=device)     # which rows of `out` are still being written
    last = out[:, :1]
    length = 1
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for step in range(max_new_tokens):
        logits = model(encoder_outputs=(encoder_states,), attention_mask=attention_mask, decoder_input_ids=last,
                       use_cache=True, **{cache_arg: cache}).logits[:, -1, :].float()
        decode.force_token(logits, step, max_new_tokens, forced_bos, forced_eos)
        if logits_fn is not None:
            logits_fn(rows, step, logits)
        tokens = logits.argmax(dim=-1)
        out[rows, step + 1] = tokens
        length = step + 2
        going = tokens != eos
        if not bool(going.all()):
            if not bool(going.any()):
                break
            keep = going.nonzero().squeeze(1)
            cache.reorder_cache(keep)
            encoder_states, attention_mask, rows, tokens = (encoder_states[keep], attention_mask[keep], rows[keep],
                                                            tokens[keep])
        last = tokens[:, None]
    return out[:, :length]


def generate_batch(model, tokenizer, sources, generation_kwargs, device, max_new_tokens, num_beams=1, logits_fn=None,
                   precision=None, decoder=None):
    """Generated ids (batch, length) for a list of source id lists, padded on the right: greedy_batch
    (or `decoder`, a decode.StaticDecoder, which does beam search too), or model.generate for beam
    search without one and for generation configs these do not follow."""
    tensors = data.collate([{"input_ids": ids, "labels": [0]} for ids in sources], tokenizer.pad_token_id)
    input_ids, attention_mask = tensors["input_ids"].to(device), tensors["attention_mask"].to(device)
    with autocast(device, precision):
        if num_beams == 1 and greedy_supported(model):
            if decoder is not None:
                return decoder(input_ids, attention_mask, generation_kwargs, max_new_tokens, logits_fn).cpu()
            return greedy_batch(model, input_ids, attention_mask, generation_kwargs, max_new_tokens, logits_fn).cpu()
        if num_beams > 1 and decoder is not None and beam_supported(model):
            return decoder(input_ids, attention_mask, generation_kwargs, max_new_tokens, logits_fn, num_beams).cpu()
        if logits_fn is not None:
            raise ValueError("logits_fn needs greedy decoding that greedy_batch supports, or a StaticDecoder")
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              num_beams=num_beams, do_sample=False, **generation_kwargs).cpu()


# How loop.generate decodes (--decoder): "dynamic": greedy_batch, finished rows dropped at once
# (shapes change every step), and HF generate for beam search; "static": decode.StaticDecoder, fixed
# shapes, greedy or beam search; "compiled": the same with its decoder step compiled (CUDA graphs on
# a GPU); "auto": compiled on CUDA; on CPU dynamic for greedy decoding and static for beam search,
# the fastest there (bench/generate_throughput.py: greedy 1.22x HF generate against the static
# decoder's 0.99x; beam search, translate-train's work, static 1.15x-1.63x).
DECODERS = ("auto", "dynamic", "static", "compiled")


def resolve_decoder(name, device, num_beams=1):
    if name == "auto":
        return "compiled" if device.type == "cuda" else "dynamic" if num_beams == 1 else "static"
    return name


def static_decoder(model, name, device, num_beams=1):
    """The decode.StaticDecoder that --decoder `name` asks for on `device` (None: "dynamic")."""
    compiled = {"dynamic": None, "static": False, "compiled": True}[resolve_decoder(name, device, num_beams)]
    return None if compiled is None else decode.StaticDecoder(model, compile=compiled)


def generate(model, tokenizer, encoded, generation_kwargs, device, max_new_tokens, num_beams=1,
             max_tokens=None, max_batch_size=None, desc="generate", logits_fn=None, precision=None,
             decoder="auto"):
    """Predictions for encoded sources (list of {"input_ids"}), in input order, generated in
    length-sorted batches of at most `max_tokens` source tokens and `max_batch_size` sources (None:
    what the device's memory holds, decode.batch_limits). `decoder`: one of DECODERS, or a
    decode.StaticDecoder.
    logits_fn(indices, step, scores): as greedy_batch's, with `indices` into `encoded` (a benchmark
    uses it to make each output as long as its reference)."""
    model.eval()
    lengths = [len(e["input_ids"]) for e in encoded]
    if not lengths:
        return []
    if max_tokens is None or max_batch_size is None:
        auto_tokens, auto_rows = decode.batch_limits(model, device, lengths, max_new_tokens,
                                                     resolve_precision(precision, device), num_beams)
        max_tokens, max_batch_size = max_tokens or auto_tokens, max_batch_size or auto_rows
    # one the caller built (a compile backend of its own), or the one `decoder` names (None: greedy_batch)
    static = decoder if isinstance(decoder, decode.StaticDecoder) else static_decoder(model, decoder, device,
                                                                                       num_beams)
    batches = data.generation_batches(lengths, max_tokens, max_batch_size)
    if static is not None:   # its buffers sized for the largest batch at once: they stay where they are
        static.reserve([(len(batch), max(lengths[i] for i in batch), max_new_tokens) for batch in batches], num_beams)
    predictions = [None] * len(encoded)
    for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2, file=sys.stderr):
        batch_fn = None if logits_fn is None else _rows_to_examples(logits_fn, torch.tensor(batch))
        out = generate_batch(model, tokenizer, [encoded[i]["input_ids"] for i in batch], generation_kwargs,
                             device, max_new_tokens, num_beams, batch_fn, precision, static)
        for i, text in zip(batch, decode_generated(tokenizer, out, generation_kwargs)):
            predictions[i] = text
    return predictions


def _rows_to_examples(logits_fn, index):
    """logits_fn sees example numbers in the whole input, not row numbers in this batch."""
    return lambda rows, step, scores: logits_fn(index[rows.cpu()], step, scores)


# -----------------------------------------------------------------------------
# The loop

@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What train() needs besides the model and the data: the flags of add_training_args, where the
    run writes, and how its metric compares. Made by from_args, so both stages pass the same."""
    run_dir: str
    base_model: str          # recorded in adapter checkpoints (the model the added weights go on)
    device: object
    lr: float
    warmup_steps: int
    max_steps: int
    eval_every: int
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    update_freq: int = 1
    log_every: int = 10
    resume: bool = False
    eval_at_start: bool = False
    metric_mode: str = "max"  # "max": a higher metric is better (task metrics); "min": a loss (IT)
    stop_at_step: int | None = None
    stop_after_steps: int | None = None
    precision: str = "fp32"  # as start_run resolved --precision (resolve_precision)
    tensorboard: bool = False
    compile: bool = False    # --compile: bucketed shapes, compiled loss, fused AdamW on CUDA
    card: object = None      # card(step, metric, name) -> README.md of checkpoint `name` (best/last); None: no card

    @classmethod
    def from_args(cls, args, base_model, device, metric_mode="max", card=None):
        return cls(run_dir=args.out_dir, base_model=base_model, device=device, lr=args.lr,
                   warmup_steps=args.warmup_steps, max_steps=args.max_steps, eval_every=args.eval_every,
                   grad_clip=args.grad_clip, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                   eps=args.adam_eps, update_freq=args.update_freq, log_every=args.log_every, resume=args.resume,
                   eval_at_start=getattr(args, "eval_at_start", False), metric_mode=metric_mode,
                   stop_at_step=args.stop_at_step, stop_after_steps=args.stop_after_steps,
                   precision=args.precision, tensorboard=args.tensorboard, compile=args.compile, card=card)


class Terminated(BaseException):
    """SIGTERM came during an evaluation (TermSignal.raising). A BaseException, as KeyboardInterrupt is:
    no `except Exception` of the code it interrupts takes it for that code's own error."""


class TermSignal:
    """SIGTERM while training (scancel, a job's time limit, preemption: SLURM sends SIGTERM, and SIGKILL
    some seconds later): noted, and acted on at the next step boundary, where train() saves last/;
    during an evaluation (`raising`), which can outlast the SIGKILL's delay, it interrupts the
    evaluation at once (Terminated), so that train() saves the step before the SIGKILL comes. On
    leaving, the previous handler is restored, and a SIGTERM that came is delivered again, so the
    process ends as it would have without this (exit -15), only later. Only in the main thread, where
    handlers can be set; elsewhere SIGTERM acts at once, as before."""

    def __init__(self):
        self.received, self.installed, self.previous, self.raise_now = False, False, None, False

    def _note(self, signum, frame):
        self.received = True
        if self.raise_now:
            self.raise_now = False  # (once: a second SIGTERM during the save that follows is only noted)
            raise Terminated()

    @contextlib.contextmanager
    def raising(self):
        """Within: a SIGTERM raises Terminated (one that came already, at once)."""
        if self.received and self.installed:
            raise Terminated()
        self.raise_now = self.installed
        try:
            yield
        finally:
            self.raise_now = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous, self.installed = signal.signal(signal.SIGTERM, self._note), True
        return self

    def __exit__(self, *exc):
        if self.installed:
            # (None: a handler not set from Python, which cannot be set again; the default one then)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
            if self.received:
                os.kill(os.getpid(), signal.SIGTERM)


def train(model, tokenizer, stream, evaluate_fn, settings):
    """Train `model` on batches from `stream` (a data.Mixture); returns (best_step, best_metric, stopped_at):
    stopped_at is the step of the checkpoint it stopped at (stop_at_step / stop_after_steps), else None.

    evaluate_fn(step) -> a scalar to select best/ by (higher is better for metric_mode "max"),
    or None to keep only last/. Resuming restores weights (from last/, loaded by the caller),
    optimizer, schedule position, RNG and data-iterator state, and the sums of the log row in
    progress, so the run continues bit for bit, log rows included (all but their tokens/s);
    with a larger max_steps it extends a finished run. `stop_at_step` (an evaluation step):
    return right after its checkpoint, as a job with a time limit would; --resume continues it.
    `stop_after_steps`: the same at the first evaluation step at least that many steps after this
    session's start. A SIGTERM saves last/ at the next step boundary and then ends the process
    (TermSignal); --resume continues from that step, bit for bit. One during an evaluation stops it
    and saves the step at once, marked not evaluated: --resume evaluates that step first.
    """
    run_dir, base_model, device, lr, warmup_steps = (settings.run_dir, settings.base_model, settings.device,
                                                      settings.lr, settings.warmup_steps)
    max_steps, eval_every, update_freq, resume = settings.max_steps, settings.eval_every, settings.update_freq, settings.resume
    stop_at_step, stop_after_steps = settings.stop_at_step, settings.stop_after_steps
    model.to(device)
    fused = True if settings.compile and torch.device(device).type == "cuda" else None
    optimizer = make_optimizer(model, lr, settings.weight_decay, settings.betas, settings.eps, fused=fused)
    loss_fn = compiled_loss() if settings.compile else loss_sum
    start_step, best_step, best_metric, evaluated = 0, None, None, True
    if resume:
        state = load_train_state(os.path.join(run_dir, "last"))
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        start_step, best_step, best_metric = state["step"], state["best_step"], state["best_metric"]
        # (False: a SIGTERM stopped the run during this step's evaluation, which is done again now)
        evaluated = state.get("evaluated", True)
        print(f"resuming from step {start_step} (best step {best_step}, metric {best_metric})"
              + ("; its evaluation, stopped by SIGTERM, first" if not evaluated else ""))
    log = RunLog(run_dir, resume_step=start_step if resume else None, tensorboard=settings.tensorboard)
    card = settings.card or (lambda step, metric, name: None)
    better = (lambda a, b: a > b) if settings.metric_mode == "max" else (lambda a, b: a < b)

    def state_at(step):  # what --resume needs to continue from `step` bit for bit (its log rows too)
        return {"step": step, "optimizer": optimizer.state_dict(), "stream": stream.state_dict(), "rng": rng_state(),
                "best_step": best_step, "best_metric": best_metric,
                "log_window": dict({k: v for k, v in window.items() if k != "time"},
                                   seconds=time.perf_counter() - window["time"])}

    def new_window(carried=None):
        """The sums of the log row being gathered; `carried`: those of the steps before a checkpoint that
        is not a log step (a SIGTERM's), so that the resumed run's next row is the straight run's (its
        tokens/s over the training time of both sessions)."""
        carried = carried or {}
        window = {"loss_sum": 0.0, "tokens": 0, "real": 0, "padded": 0}
        window.update({k: carried[k] for k in window if k in carried})
        return dict(window, streams=collections.Counter(carried.get("streams", {})),
                    time=time.perf_counter() - carried.get("seconds", 0.0))

    def stopped_by_sigterm(step, during_evaluation):  # (last/ holds `step`; the process ends on leaving TermSignal)
        bar.close()
        log.close()
        print(f"SIGTERM: stopped at the checkpoint of step {step}" + (", during its evaluation" if during_evaluation else "")
              + f" ({os.path.join(run_dir, 'last')}); --resume "
              + ("evaluates it again and goes on" if during_evaluation else "continues from there"), flush=True)
        return best_step, best_metric, step

    bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
    window = new_window(state.get("log_window") if resume else None)
    model.train()
    with TermSignal() as term:
        for step in range(start_step, max_steps + 1):
            # ---- evaluation and checkpoints, before stepping ----
            is_eval_step = ((step % eval_every == 0 and step > 0) or step == max_steps
                            or (step == 0 and settings.eval_at_start))
            at_start = resume and step == start_step  # (last/ holds this step: the run resumed from it)
            if is_eval_step and not (at_start and evaluated):
                before = rng_state()  # (what the evaluation starts from: a resume starts it again from here)
                try:
                    with term.raising():
                        metric = evaluate_fn(step)
                except Terminated:
                    # the weights, optimizer and data are this step's still: save them (not the evaluation's
                    # RNG), so that --resume evaluates this step again and goes on bit for bit
                    save_checkpoint(run_dir, "last", model, tokenizer, base_model,
                                    dict(state_at(step), rng=before, evaluated=False), card=card(step, None, "last"))
                    return stopped_by_sigterm(step, during_evaluation=True)
                if metric is not None and (best_metric is None or better(metric, best_metric)):
                    best_step, best_metric = step, metric
                    save_checkpoint(run_dir, "best", model, tokenizer, base_model, card=card(step, metric, "best"))
                save_checkpoint(run_dir, "last", model, tokenizer, base_model, state_at(step),
                                card=card(step, metric, "last"))
                model.train()
                session_done = stop_after_steps is not None and step >= start_step + stop_after_steps
                if (step == stop_at_step or session_done) and step < max_steps:
                    bar.close()
                    log.close()
                    return best_step, best_metric, step
            if term.received and step < max_steps:
                # SIGTERM (scancel, the job's time limit, preemption): keep this step's state (last/ holds it
                # already at an evaluation step, or when the run resumed here), then end as SIGTERM ends a
                # process (TermSignal's exit): the job fails as before, but --resume goes on from here
                if not (is_eval_step or at_start):
                    save_checkpoint(run_dir, "last", model, tokenizer, base_model, state_at(step),
                                    card=card(step, None, "last"))
                return stopped_by_sigterm(step, during_evaluation=False)
            if step == max_steps:
                break

            # ---- one optimisation step ----
            drawn = [next(stream) for _ in range(update_freq)]                   # [(path, indices)]
            collated = [stream.stream(path).collate(indices, tokenizer.pad_token_id) for path, indices in drawn]
            if settings.compile:                                                 # a few shapes: the graph is reused
                collated = [data.pad_to_buckets(batch, tokenizer.pad_token_id) for batch in collated]
            batches = [{k: v.to(device) for k, v in batch.items()} for batch in collated]
            step_lr = get_lr(step + 1, lr, warmup_steps)
            try:
                loss, num_tokens, grad_norm = train_step(model, optimizer, batches, step_lr, settings.grad_clip, device,
                                                         settings.precision, loss_fn)
            except FloatingPointError as e:
                bar.close()
                log.close()
                last = os.path.join(run_dir, "last")
                where = f"the last good checkpoint is {last}" if os.path.isdir(last) else "no checkpoint was written yet"
                raise common.TrainingError(f"{e} at step {step + 1} (lr {step_lr:.3e}); stopped; {where}") from None

            # ---- diagnostics only below here ----
            bar.update(1)
            window["loss_sum"] += loss * num_tokens
            window["tokens"] += num_tokens
            for (path, _), batch in zip(drawn, batches):
                window["real"] += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
                window["padded"] += batch["input_ids"].numel() + batch["labels"].numel()
                window["streams"]["/".join(path)] += 1
            if (step + 1) % settings.log_every == 0 or step + 1 == max_steps:
                elapsed = time.perf_counter() - window["time"]
                row = {"step": step + 1, "loss": window["loss_sum"] / window["tokens"], "lr": step_lr,
                       "grad_norm": grad_norm, "tokens_per_s": window["real"] / elapsed,
                       "padding_efficiency": window["real"] / window["padded"],
                       "streams": dict(sorted(window["streams"].items()))}
                log.write(row, bar)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{step_lr:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}")
                window = new_window()
        bar.close()
        log.close()
    return best_step, best_metric, None
