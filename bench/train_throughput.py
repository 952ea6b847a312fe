"""Training throughput: our loop (token-budget batches) against HF Seq2SeqTrainer, same work.

    pip install -r bench/requirements.txt      # accelerate, which Seq2SeqTrainer needs
    python bench/train_throughput.py --data-dir ../shared/data
    python bench/train_throughput.py --data-dir ../shared/data --dims mt5-base --device cuda   # on a GPU

Same model (the tiny-mt5 architecture scaled to d_model 256, 4+4 layers, with the tiny tokenizer;
or `--dims mt5-base`: the real mT5-base dimensions, random weights), same SQuAD stand-in examples
(each seen exactly once, so both process the same real tokens), same AdamW, same fairseq
inverse-sqrt schedule (handed to the Trainer as a LambdaLR), same gradient clipping, fp32 on CPU /
bf16 on CUDA. Four configurations, each in its own process (clean peak-memory figures):
  ours              data.TokenBatches, --max-tokens per batch, loop.train_step (the loop's own step)
  ours-compiled     the same with finetune.py --compile: batches padded to data.train_shape, the loss
                    compiled (loop.compiled_loss), fused AdamW on CUDA
  trainer           Seq2SeqTrainer, random sampler, batch size = our average examples per batch
  trainer-grouped   the same with train_sampling_strategy="group_by_length"
Reported: real (non-pad) tokens/s, padding efficiency (real / padded, sources + targets), peak
memory (CUDA: max allocated; CPU: peak RSS of the process), and our speed-up over each. Ours and
ours-compiled go over the batches twice: the first pass (cold: CUDA kernels chosen, graphs compiled)
is printed beside, the second is the steady rate a 20k-step run sees; the Trainer runs once. With
--curve, ours and ours-compiled first make one pass with dropout off from the same initial weights
(dropout draws differ between padded and unpadded shapes by construction), and their loss curves
are compared step by step; that pass is eager ours' cold pass (so it makes one more, not two),
while ours-compiled, whose train-mode graphs are compiled anew, still makes two. With
--rates FILE (a GPU, --dims mt5-base), ours' and ours-compiled's FLOPs and seconds are written there
for cost.py (bench/gpu.sh).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import data  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402

MODES = ("ours", "ours-compiled", "trainer", "trainer-grouped")
PASSES = {"ours": 2, "ours-compiled": 2}  # the others: one


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="data directory")
    p.add_argument("--num-examples", type=int, default=1200, help="SQuAD stand-in examples, each trained on once")
    p.add_argument("--max-tokens", type=int, default=4000, help="our token budget per batch (the paper's 4000)")
    p.add_argument("--dims", default="bench", choices=["bench", "mt5-base"], help="model size")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--lr", type=float, default=1e-4, help="peak LR")
    p.add_argument("--warmup-steps", type=int, default=20, help="warm-up steps")
    p.add_argument("--foreach", action="store_true", help="attempt: AdamW's multi-tensor step (both loops)")
    p.add_argument("--compile", action="store_true",
                   help="attempt: torch.compile(dynamic=True) for ours, torch_compile=True for the Trainer")
    p.add_argument("--modes", default=",".join(MODES), help="configurations to run, comma-separated")
    p.add_argument("--curve", action="store_true",
                   help="first a pass with dropout off, whose loss curves (ours, ours-compiled) are compared")
    p.add_argument("--mode-timeout", type=float, default=None, help="seconds a configuration may take (then left out)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds all configurations may take together: each is cut at what is left (bench/gpu.sh)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of ours-compiled")
    p.add_argument("--rates", default=None, metavar="FILE",
                   help="write the measured training rates into FILE for cost.py (bench/rates.json; GPU, mt5-base)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="instead: profile STEPS steps of ours (after 3 warm-up steps) and print where the time goes")
    p.add_argument("--mode", default=None, choices=MODES, help="(internal) run one configuration and print JSON")
    return p.parse_args(argv)


def build_model(dims, vocab_size, device, seed=0):
    from transformers import MT5Config, MT5ForConditionalGeneration
    torch.manual_seed(seed)
    if dims == "mt5-base":
        return models.real_architecture("google/mt5-base", device=device)
    config = MT5Config(vocab_size=vocab_size, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_decoder_layers=4,
                       num_heads=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                       decoder_start_token_id=0)
    with torch.device(device):
        return models.untie_lm_head(MT5ForConditionalGeneration(config))


def encoded_examples(args):
    tokenizer = models.load_tokenizer("tiny-mt5", args.data_dir)
    questions = data.read_squad(data.squad_path(args.data_dir, "train"))[:args.num_examples]
    return tokenizer, models.Seq2SeqEncoder(tokenizer, "mt5").encode(data.qa_examples(questions, "en"))


def padding_of(batches):
    real = padded = 0
    for batch in batches:
        real += int((batch["labels"] != -100).sum()) + int(batch["attention_mask"].sum())
        padded += batch["labels"].numel() + batch["input_ids"].numel()
    return real, padded


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_ours(args, model, tokenizer, encoded, device, compiled=False):
    """Ours (compiled: --compile's path) over the batches: with --curve first a pass with dropout off
    (its loss per step: deterministic, comparable between eager and compiled), then PASSES passes
    with dropout on, the last timed. (seconds of each timed pass, steps, padding (real, padded) of
    the batches trained on, the curve pass's losses or None)."""
    stream = data.TokenBatches(encoded, args.max_tokens, seed=0)
    batches = [stream.collate(b, tokenizer.pad_token_id) for b in stream.epoch_batches(0)]
    if compiled:
        batches = [data.pad_to_buckets(batch, tokenizer.pad_token_id) for batch in batches]
    fused = True if compiled and device.type == "cuda" else None
    optimizer = loop.make_optimizer(model, args.lr, foreach=args.foreach or None, fused=fused)
    loss_fn = loop.compiled_loss(args.backend) if compiled else loop.loss_sum
    if args.compile:
        model = torch.compile(model, dynamic=True)
    model.train()

    def one_pass():
        sync(device)
        start, losses = time.perf_counter(), []
        for step, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, _, _ = loop.train_step(model, optimizer, [batch], loop.get_lr(step + 1, args.lr, args.warmup_steps),
                                         1.0, device, loss_fn=loss_fn)
            losses.append(loss)
        sync(device)
        return time.perf_counter() - start, losses
    curve, seconds = None, []
    if args.curve:   # eval mode: every dropout off (HF attention calls functional dropout on self.training)
        model.eval()
        cold, curve = one_pass()
        model.train()
        if not compiled:   # eager's kernels are chosen by now: this was its cold pass
            seconds.append(cold)
    while len(seconds) < PASSES["ours-compiled" if compiled else "ours"]:   # compiled: train mode compiles anew
        seconds.append(one_pass()[0])
    return seconds, len(batches), padding_of(batches), curve


def run_trainer(args, model, tokenizer, encoded, device, grouped):
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
    num_batches = len(data.TokenBatches(encoded, args.max_tokens, seed=0).epoch_batches(0))
    batch_size = max(1, round(len(encoded) / num_batches))  # the same number of optimizer steps as ours
    dataset = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded]
    training_args = Seq2SeqTrainingArguments(
        output_dir=os.path.join("/tmp", "xlgen-bench-trainer"), per_device_train_batch_size=batch_size,
        num_train_epochs=1, max_grad_norm=1.0, use_cpu=device.type == "cpu", bf16=device.type == "cuda",
        train_sampling_strategy="group_by_length" if grouped else "random", dataloader_num_workers=0,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        torch_compile=args.compile)
    optimizer = loop.make_optimizer(model, args.lr, foreach=args.foreach or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: loop.get_lr(step + 1, 1.0, args.warmup_steps))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                             optimizers=(optimizer, schedule))
    batches = list(trainer.get_train_dataloader())  # the batches it builds (sampler is seeded)
    sync(device)
    start = time.perf_counter()
    trainer.train()
    sync(device)
    return [time.perf_counter() - start], len(batches), padding_of(batches), None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_mode(args):
    device = loop.pick_device(args.device)
    tokenizer, encoded = encoded_examples(args)
    model = build_model(args.dims, len(tokenizer), device)
    if args.mode in PASSES:
        passes, steps, (real, padded), losses = run_ours(args, model, tokenizer, encoded, device,
                                                         args.mode == "ours-compiled")
    else:
        passes, steps, (real, padded), losses = run_trainer(args, model, tokenizer, encoded, device,
                                                            args.mode == "trainer-grouped")
    seconds = passes[-1]
    params = sum(p.numel() for p in model.parameters())
    flops = None
    if args.dims == "mt5-base":
        import cost
        stream = data.TokenBatches(encoded, args.max_tokens, seed=0)
        flops = sum(cost.batch_flops("google/mt5-base", stream.collate(b, tokenizer.pad_token_id))
                    for b in stream.epoch_batches(0))   # real tokens only: bucket padding is not work done
    print(json.dumps({"mode": args.mode, "flops": flops, "steps": steps, "real_tokens": real, "padded_tokens": padded,
                      "seconds": seconds, "first_pass_seconds": passes[0], "losses": losses, "tokens_per_s": real / seconds, "padding_efficiency": real / padded,
                      "peak_memory_mb": peak_memory_mb(device), "params": params, "device": str(device),
                      "machine": machine_name(device)}))


def machine_name(device):
    """The benches' name of the machine: the GPU's as torch gives it (cost.peak_flops reads it), or
    the CPU's architecture and cores."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {os.cpu_count()} cores"


def profile_ours(args):
    """torch.profiler over `args.profile` steps of ours: the operators with the most self time (CPU,
    and on CUDA the GPU's), and the step's wall time against its GPU busy time."""
    device = loop.pick_device(args.device)
    tokenizer, encoded = encoded_examples(args)
    model = build_model(args.dims, len(tokenizer), device).train()
    stream = data.TokenBatches(encoded, args.max_tokens, seed=0)
    batches = [stream.collate(b, tokenizer.pad_token_id) for b in stream.epoch_batches(0)][:3 + args.profile]
    optimizer = loop.make_optimizer(model, args.lr)

    def step(i, batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        loop.train_step(model, optimizer, [batch], loop.get_lr(i + 1, args.lr, args.warmup_steps), 1.0, device)
    for i, batch in enumerate(batches[:3]):
        step(i, batch)
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for i, batch in enumerate(batches[3:]):
            step(i + 3, batch)
        sync(device)
    wall = (time.perf_counter() - start) / args.profile
    table = prof.key_averages()
    print(f"profile of ours: {args.profile} steps, {wall * 1000:.0f} ms per step (wall, profiler on)")
    print(table.table(sort_by="self_cpu_time_total", row_limit=15))
    if device.type == "cuda":
        busy = sum(e.self_device_time_total for e in table) / 1e3 / args.profile
        print(f"GPU busy {busy:.0f} ms per step of {wall * 1000:.0f} ms")
        print(table.table(sort_by="self_cuda_time_total", row_limit=12))


def main(args):
    if args.profile:
        return profile_ours(args)
    if args.mode:
        return run_mode(args)
    # Each configuration's row is printed, and its rates recorded, as soon as it finishes: a run cut
    # short (bench/gpu.sh's time limit) keeps what it measured.
    started, rows = time.monotonic(), []
    for mode in args.modes.split(","):
        timeout = mode_timeout(args, time.monotonic() - started)
        if timeout is not None and timeout <= 0:
            print(f"{mode}: not run, the --budget of {args.budget:.0f} s is spent; left out", flush=True)
            continue
        argv = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--data-dir", args.data_dir,
                "--num-examples", str(args.num_examples), "--max-tokens", str(args.max_tokens), "--dims", args.dims,
                "--device", args.device, "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps)]
        argv += ["--foreach"] * args.foreach + ["--compile"] * args.compile + ["--backend", args.backend] + ["--curve"] * args.curve
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode}: did not finish in {timeout:.0f} s (--mode-timeout, --budget); left out", flush=True)
            continue
        if out.returncode != 0:
            sys.exit(f"error: {mode} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        report_row(args, rows)
    if not rows:
        sys.exit("error: no configuration finished (--mode-timeout, --budget)")
    curves = {r["mode"]: r["losses"] for r in rows if r["losses"]}
    if "ours" in curves and "ours-compiled" in curves:
        eager, compiled = curves["ours"], curves["ours-compiled"]
        gaps = [abs(a - b) / abs(a) for a, b in zip(eager, compiled)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        print(f"loss curves, ours-compiled against ours over {len(gaps)} steps: largest relative difference "
              f"{gaps[worst]:.2e} (step {worst + 1}: {compiled[worst]:.4f} against {eager[worst]:.4f}); mean "
              f"{sum(gaps) / len(gaps):.2e}; first {eager[0]:.4f}, last {eager[-1]:.4f} (eager)")
    if args.rates and not measures_rates(args, rows[0]):
        print("--rates: not written (rates for cost.py are measured on a GPU at --dims mt5-base)")


def mode_timeout(args, elapsed):
    """Seconds the next configuration may take: --mode-timeout, and no more than what is left of
    --budget after `elapsed` (None: no limit)."""
    limits = [t for t in (args.mode_timeout, None if args.budget is None else args.budget - elapsed) if t is not None]
    return min(limits) if limits else None


def measures_rates(args, row):
    """Whether a configuration's row holds rates for cost.py: a GPU, the real mT5-base dimensions."""
    return args.dims == "mt5-base" and row["device"].startswith("cuda")


def report_row(args, rows):
    """Print the newest row of `rows` (after the table's header, with the first row), its model FLOPs
    utilisation on a GPU at real dimensions, and record its rates (--rates)."""
    row, first = rows[-1], rows[0]
    if len(rows) == 1:
        print(f"machine: {row['machine']}; model: {args.dims} ({row['params'] / 1e6:.1f}M parameters); "
              f"{args.num_examples} SQuAD stand-in examples once each; {row['real_tokens']:,} real tokens")
        print(f"{'configuration':<17}{'steps':>7}{'1st pass s':>12}{'seconds':>9}{'real tok/s':>12}{'pad. eff.':>11}"
              f"{'peak MB':>10}{first['mode'] + ' / this':>{max(13, len(first['mode']) + 9)}}")
    print(f"{row['mode']:<17}{row['steps']:>7}{row['first_pass_seconds']:>12.1f}{row['seconds']:>9.1f}"
          f"{row['tokens_per_s']:>12,.0f}{row['padding_efficiency']:>11.3f}{row['peak_memory_mb']:>10,.0f}"
          f"{row['seconds'] / first['seconds']:>{max(12, len(first['mode']) + 8)}.2f}x", flush=True)
    if row["mode"] not in PASSES or not measures_rates(args, row):
        return
    import cost
    peak = cost.peak_flops(row["machine"])
    mfu = row["flops"] / row["seconds"] / peak
    hours = 20000 * row["real_tokens"] / row["steps"] / row["tokens_per_s"] / 3600
    print(f"model FLOPs utilisation of {row['mode']} (cost.batch_flops: 6 FLOPs per weight and real token, "
          f"embeddings left out, + attention; dense bf16 peak): {mfu:.1%} "
          f"({row['flops'] / row['seconds'] / 1e12:.0f} TFLOP/s); projected 20k-step run at "
          f"{row['real_tokens'] / row['steps']:,.0f} real tokens/step: {hours:.2f} h", flush=True)
    if args.rates:
        path = {"ours": "eager", "ours-compiled": "compiled"}[row["mode"]]
        entry = {k: row[k] for k in ("flops", "seconds", "real_tokens", "steps")} | {
            "model": "google/mt5-base", "max_tokens": args.max_tokens}
        cost.record_rates(args.rates, ["train"], {path: entry}, row["machine"], time.strftime("%Y-%m-%d"), peak)
        print(f"training rate ({path}) written to {args.rates}", flush=True)


if __name__ == "__main__":
    main(parse_args())
