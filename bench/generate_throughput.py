"""Evaluation generation at the real tasks' lengths: loop.generate against HF generate.

    python bench/generate_throughput.py --data-dir ../shared/data                      # both workloads
    python bench/generate_throughput.py --dims mt5-base --device cuda --data-dir DATA  # on a GPU
    python bench/generate_throughput.py --run-dir runs/demo   # + the evaluation share of a finished run

Same model (the benchmark model of train_throughput.py, or the real mT5-base dimensions; random
weights), same inputs, greedy decoding (--num-beams: beam search). A random model writes no </s>,
so each output is made as long as its real reference: </s> is suppressed until the reference's
token length, then forced (capped at the task's max_new_tokens). Three workloads:
  xlsum   141 real documents with a one-sentence human summary (../shared/data/summarization,
          GUM: XL-Sum itself is not available offline), sources cut at the model's limit, outputs
          as long as the summaries (capped at XL-Sum's 84 new tokens)
  xquad   XQuAD validation questions (th, ro, vi), outputs as long as the answers (capped at 32)
  translate  translate-train's work (--num-beams 4, its beam): the unique sentences of the first
          64 SQuAD training paragraphs (contexts, questions, answers; one translate_train.py chunk),
          outputs as long as their sources, at most translate_train.py's limit (2 x longest + 10)
Configurations (the first four on the same batches):
  hf-unsorted    model.generate on the sources in file order, fixed-size batches (a plain DataLoader)
  hf-sorted      model.generate on loop.generate's length-sorted token-budget batches (--max-tokens)
  ours           loop.generate --decoder dynamic: the sorted batches, decoded by loop.greedy_batch
                 (a finished row leaves its batch)
  static         --decoder static: decode.StaticDecoder (preallocated cache, bucketed shapes)
  compiled       --decoder compiled: its step compiled (CUDA graphs on a GPU)          [GPU default]
  compiled-auto  the same on batches sized by the device's memory (decode.batch_limits: the
                 study's default on a GPU, --eval-max-tokens unset)                     [GPU default]
Each configuration runs twice, the second timed (the first chooses CUDA kernels and compiles
graphs; a run decodes 10 validations, so it pays that once). Each one's predictions are compared
with the first configuration's (printed: "same as"). In fp32 all must be the same; in bf16 (a GPU's
default) a kernel of another shape rounds otherwise, and a random model's near-ties can flip tokens
(HF generate's own static cache differs from its dynamic one so: tests/test_loop.py), so bench/gpu.sh
checks the decoders' tokens with --precision fp32. Reported: seconds, generated tokens/s (tokens
written, </s> included) and, at real dimensions, FLOP/s (cost.decode_flops of each example's real
source and output lengths, x beams for the decoder). With --rates FILE (a GPU, real dimensions, the
study's precision) the xlsum rates of ours and the static decoders are written there for cost.py
(bench/gpu.sh), each with its count of predictions the same as the first configuration's; with
--num-beams > 1, the translate workload's rates, as beam search's ("ours" is HF generate there).
"""

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

import cost  # noqa: E402
import data  # noqa: E402
import decode  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import train_throughput  # noqa: E402
import translate_train  # noqa: E402

DIMS = {"mt5-base": "google/mt5-base", "mbart-large-50": "facebook/mbart-large-50",
        "nllb-600M": "facebook/nllb-200-distilled-600M"}  # --dims: real dimensions, random weights
CONFIGURATIONS = ("hf-unsorted", "hf-sorted", "ours", "static", "compiled", "compiled-auto")
CPU_CONFIGURATIONS = ("hf-unsorted", "hf-sorted", "ours", "static")  # compiling on 2 cores takes minutes a shape
RATE_PATHS = {"ours": "dynamic", "static": "static", "compiled": "compiled", "compiled-auto": "compiled-auto",
              "hf-sorted": "hf-sorted"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="data directory")
    p.add_argument("--workloads", default="xlsum,xquad", help="xlsum, xquad or both")
    p.add_argument("--per-lang", type=int, default=100, help="XQuAD questions per language")
    p.add_argument("--max-tokens", type=int, default=8000, help="source-token budget of a sorted batch")
    p.add_argument("--num-beams", type=int, default=1, help="beams (translate-train: 4); 1: greedy")
    p.add_argument("--paragraphs", type=int, default=64, help="SQuAD paragraphs of the translate workload")
    p.add_argument("--dims", default="bench", choices=["bench", *DIMS], help="model size (real ones: random weights)")
    p.add_argument("--configurations", default=None,
                   help=f"comma-separated (default: all on CUDA; {','.join(CPU_CONFIGURATIONS)} on CPU)")
    p.add_argument("--rates", default=None, metavar="FILE",
                   help="write the measured xlsum decoding rates into FILE for cost.py (bench/rates.json; GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=loop.PRECISIONS,
                   help="bf16 autocast or fp32 (auto: the study's, bf16 on a GPU that has it); fp32 on a GPU: "
                        "the check that every decoder gives HF generate's tokens where float rounding cannot "
                        "flip one (bench/gpu.sh's last step; no --rates)")
    p.add_argument("--profile", action="store_true",
                   help="instead: profile ours and hf-sorted on the first workload's two longest batches")
    p.add_argument("--run-dir", default=None, help="a finished finetune.py run to measure the evaluation share of")
    return p.parse_args(argv)


class ReferenceLengths:
    """</s> suppressed until an example's reference length, then forced: outputs of real lengths."""

    def __init__(self, lengths, eos):
        self.lengths, self.eos = torch.tensor(lengths), eos

    def __call__(self, indices, step, scores):
        length = self.lengths[indices].to(scores.device)
        scores[step < length, self.eos] = -math.inf
        done = step >= length
        scores[done] = -math.inf
        scores[done, self.eos] = 0.0


class HFReferenceLengths(LogitsProcessor):
    """The same rule as a LogitsProcessor for model.generate, for the batch of examples `indices`."""

    def __init__(self, rule, indices):
        self.rule, self.indices = rule, torch.tensor(indices)

    def __call__(self, input_ids, scores):
        self.rule(self.indices, input_ids.shape[1] - 1, scores)  # tokens written after the decoder start
        return scores


def gum_summaries(args):
    """XL-Sum-length work: the 141 GUM documents (sources at the 512-token cut, 35-84-token summaries)."""
    return data.summarization_examples(data.read_xlsum(data.gum_path(args.data_dir)), "en")


def xquad_validation(args):
    """XQuAD-length work: --per-lang questions of each XQuAD validation language."""
    examples = []
    for lang in data.TASKS["xquad"].val_langs:
        questions = data.read_squad(data.xquad_path(args.data_dir, lang))[:args.per_lang]
        examples += data.qa_examples(questions, lang)
    return examples


def task_workload(read):
    """A workload of a task's examples (`read`(args)), outputs as long as their references."""
    def make(name, args, tokenizer, encoder):
        task = data.TASKS[name]
        examples = read(args)
        encoded = encoder.encode(examples)
        lengths = [min(len(tokenizer(ex.target, add_special_tokens=False)["input_ids"]), task.max_new_tokens - 1)
                   for ex in examples]
        return encoded, lengths, task.max_new_tokens
    return make


def squad_sentences(name, args, tokenizer, encoder):
    """translate_train.py's work on one chunk: the unique sentences of the first --paragraphs SQuAD
    training paragraphs, outputs as long as their sources (a translation about as long as what it
    translates), at most its output limit: 2 x the longest source + 10 tokens."""
    path = os.path.join(args.data_dir, "squad", "train-standin-v1.1.json.gz")
    _, units = translate_train.qa_units(path, None)
    sentences = translate_train.unique_sentences(units[:args.paragraphs], translate_train.qa_segments)
    encoded = encoder.encode([data.Example(id=str(i), source=s, target="", src_lang="en", tgt_lang="de")
                              for i, s in enumerate(sentences)])
    sources = [len(e["input_ids"]) for e in encoded]
    max_new_tokens = min(encoder.max_target_length, 2 * max(sources) + 10)
    return encoded, [min(n, max_new_tokens - 1) for n in sources], max_new_tokens


# (encoded sources, reference token lengths, max_new_tokens) of a workload
WORKLOADS = {"xlsum": task_workload(gum_summaries), "xquad": task_workload(xquad_validation),
             "translate": squad_sentences}


def workload(name, args, tokenizer, encoder):
    return WORKLOADS[name](name, args, tokenizer, encoder)


def hf_generate(model, tokenizer, encoded, batches, generation, device, max_new_tokens, rule, beams=1, precision=None):
    predictions = [None] * len(encoded)
    for batch in batches:
        tensors = data.collate([{"input_ids": encoded[i]["input_ids"], "labels": [0]} for i in batch],
                               tokenizer.pad_token_id)
        rows = [i for i in batch for _ in range(beams)]                  # generate's rows: each source's beams
        with torch.no_grad(), loop.autocast(device, precision):
            out = model.generate(input_ids=tensors["input_ids"].to(device),
                                 attention_mask=tensors["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                 num_beams=beams, do_sample=False,
                                 logits_processor=LogitsProcessorList([HFReferenceLengths(rule, rows)]), **generation)
        for i, text in zip(batch, loop.decode_generated(tokenizer, out.cpu(), generation)):
            predictions[i] = text
    return predictions


def timed(fn, device):
    loop_sync(device)
    start = time.perf_counter()
    result = fn()
    loop_sync(device)
    return result, time.perf_counter() - start


def loop_sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_graphs(device):
    """(CUDA graphs recorded, cudagraph skips) so far by torch.compile's cudagraph trees (mode
    "reduce-overhead": the compiled decoder's on a GPU) on `device`; None off CUDA. A shape is run
    once without a graph (warm-up), recorded at its second call, then replayed: a timed run records
    the shapes its cold run called once only, and any whose static inputs moved (a shape captured
    again: decode.StaticDecoder.reserve); a skip is torch deciding to run a compiled function
    without graphs (TORCH_LOGS=cudagraphs says why). The recordings are a counter private to torch
    (CUDAGraphTreeManager.debug_fail_counter: each recording after a function's warm-up run), None
    where this torch has none."""
    if device.type != "cuda":
        return None
    from torch._dynamo.utils import counters
    try:
        from torch._inductor import cudagraph_trees
        manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
        recorded = 0 if manager is None else int(manager.debug_fail_counter)
    except (ImportError, AttributeError, TypeError):
        recorded = None
    return recorded, counters["inductor"]["cudagraph_skips"]


def run_workload(name, args, model, tokenizer, encoder, device, on_row=None):
    """Each configuration's row ({"seconds", "tokens_per_s", "same", ...}), by key; on_row(key, row)
    is called as each is measured, before the next starts (main records rates there, so a run cut
    short by bench/gpu.sh's time limit keeps what it measured)."""
    encoded, lengths, max_new_tokens = workload(name, args, tokenizer, encoder)
    rule = ReferenceLengths(lengths, tokenizer.eos_token_id)
    generation = encoder.generation_kwargs("en")
    source_lengths = [len(e["input_ids"]) for e in encoded]
    sorted_batches = data.generation_batches(source_lengths, args.max_tokens)
    beams, precision = args.num_beams, loop.resolve_precision(args.precision, device)
    decoders = {"static": decode.StaticDecoder(model), "compiled": decode.StaticDecoder(model, compile=True)}
    auto_batches = data.generation_batches(source_lengths, *decode.batch_limits(
        model, device, source_lengths, max_new_tokens, precision, beams))
    batch_size = math.ceil(len(encoded) / len(sorted_batches))
    file_order = [list(range(i, min(i + batch_size, len(encoded)))) for i in range(0, len(encoded), batch_size)]
    ours = lambda decoder, max_tokens=args.max_tokens: lambda: loop.generate(  # noqa: E731
        model, tokenizer, encoded, generation, device, max_new_tokens, beams, max_tokens=max_tokens, desc=name,
        logits_fn=rule, precision=precision, decoder=decoder)
    configurations = {
        "hf-unsorted": lambda: hf_generate(model, tokenizer, encoded, file_order, generation, device, max_new_tokens, rule,
                                           beams, precision),
        "hf-sorted": lambda: hf_generate(model, tokenizer, encoded, sorted_batches, generation, device, max_new_tokens,
                                         rule, beams, precision),
        "ours": ours("dynamic"), "static": ours(decoders["static"]), "compiled": ours(decoders["compiled"]),
        "compiled-auto": ours(decoders["compiled"], None),
    }
    chosen = args.configurations.split(",") if args.configurations else (
        CONFIGURATIONS if device.type == "cuda" else CPU_CONFIGURATIONS)
    if beams > 1:
        chosen = [key for key in chosen if key != "ours"]    # --decoder dynamic is HF generate for beams
    tokens = sum(length + 1 for length in lengths)
    source_tokens = sum(len(e["input_ids"]) for e in encoded)
    flops = sum(cost.decode_flops(DIMS[args.dims], len(e["input_ids"]), length + 1, beams)
                for e, length in zip(encoded, lengths)) if args.dims in DIMS else None
    print(f"\n{name}: {beams} beam{'s' if beams > 1 else ''}, {len(encoded)} examples, "
          f"{source_tokens / len(encoded):.0f} source tokens on average (max {max(len(e['input_ids']) for e in encoded)}), outputs {min(lengths) + 1}-{max(lengths) + 1} tokens "
          f"({tokens / len(encoded):.1f} on average), {len(sorted_batches)} sorted batches"
          + (f"; device-sized: {len(auto_batches)} batches of up to {max(map(len, auto_batches))} rows"
             if "compiled-auto" in chosen else ""))
    print(f"{'configuration':<15}{'cold s':>8}{'seconds':>9}{'gen. tok/s':>12}{'TFLOP/s':>9}{'speed-up':>10}"
          f"{f'same as {chosen[0]}':>24}", flush=True)
    rows, reference = {}, None
    for key in chosen:   # each row printed when measured: a configuration that hangs leaves the others'
        _, cold = timed(configurations[key], device)   # kernels chosen, graphs compiled
        graphs = cuda_graphs(device) if key.startswith("compiled") else None   # (CUDA: the counts before)
        predictions, seconds = timed(configurations[key], device)
        reference = reference or predictions
        same = sum(a == b for a, b in zip(predictions, reference))
        rows[key] = {"seconds": seconds, "cold_seconds": cold, "tokens_per_s": tokens / seconds, "same": same,
                     "compared_with": chosen[0], "examples": len(encoded), "flops": flops}
        rate = f"{flops / seconds / 1e12:>9.2f}" if flops else f"{'-':>9}"
        print(f"{key:<15}{cold:>8.2f}{seconds:>9.2f}{tokens / seconds:>12,.0f}{rate}"
              f"{rows[chosen[0]]['seconds'] / seconds:>9.2f}x{f'{same}/{len(encoded)}':>24}", flush=True)
        if graphs is not None:   # what its timed run did with CUDA graphs
            recorded, skipped = cuda_graphs(device)
            recorded = "?" if recorded is None else recorded - graphs[0]
            print(f"{'':<15}CUDA graphs recorded in the timed run: {recorded} (shapes the cold run called once, "
                  f"or whose inputs moved); cudagraph skips: {skipped - graphs[1]} (TORCH_LOGS=cudagraphs says why)",
                  flush=True)
        if on_row is not None:
            on_row(key, rows[key])
    return rows


def profile(name, args, model, tokenizer, encoder, device):
    encoded, lengths, max_new_tokens = workload(name, args, tokenizer, encoder)
    generation = encoder.generation_kwargs("en")
    batches = data.generation_batches([len(e["input_ids"]) for e in encoded], args.max_tokens)[:2]
    subset = [encoded[i] for batch in batches for i in batch]
    sub_rule = ReferenceLengths([lengths[i] for batch in batches for i in batch], tokenizer.eos_token_id)
    sub_batches = [list(range(len(batches[0]))), list(range(len(batches[0]), len(subset)))]
    runs = {"ours": lambda: loop.generate(model, tokenizer, subset, generation, device, max_new_tokens,
                                          max_tokens=args.max_tokens, logits_fn=sub_rule),
            "hf-sorted": lambda: hf_generate(model, tokenizer, subset, sub_batches, generation, device,
                                             max_new_tokens, sub_rule)}
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for key, fn in runs.items():
        fn()  # warm-up
        with torch.profiler.profile(activities=activities) as prof:
            _, seconds = timed(fn, device)
        table = prof.key_averages()
        busy = sum(e.self_device_time_total for e in table) / 1e6 if device.type == "cuda" else float("nan")
        print(f"\nprofile of {key} ({name}, {len(subset)} examples in 2 batches): {seconds:.2f} s wall "
              f"(profiler on), GPU busy {busy:.2f} s")
        print(table.table(sort_by="self_cpu_time_total", row_limit=12))


def evaluation_share(run_dir):
    """(validation + test seconds, total seconds) of a finished run, from its results.json.
    (A resumed run counts only its last session.)"""
    seconds = json.load(open(os.path.join(run_dir, "results.json")))["seconds"]
    return seconds["validation"] + seconds["test"], seconds["total"]


def build_model(dims, tokenizer, device, seed=0):
    """(model, family): the benchmark model, or a real architecture with random weights."""
    if dims not in DIMS:
        return train_throughput.build_model(dims, len(tokenizer), device, seed), "mt5"
    torch.manual_seed(seed)
    return models.real_architecture(DIMS[dims], device=device), models.REAL_CONFIGS[DIMS[dims]][0]


def main(args):
    device = loop.pick_device(args.device)
    family = models.REAL_CONFIGS[DIMS[args.dims]][0] if args.dims in DIMS else "mt5"
    tokenizer = models.load_tokenizer(f"tiny-{family}", args.data_dir)  # its ids are within any real vocabulary
    model, family = build_model(args.dims, tokenizer, device)
    model.eval()
    encoder = models.Seq2SeqEncoder(tokenizer, family, models.max_length(model.config))
    name = train_throughput.machine_name(device)
    params = sum(p.numel() for p in model.parameters())
    precision = loop.resolve_precision(args.precision, device)
    print(f"machine: {name}; model: {args.dims} ({params / 1e6:.1f}M parameters), random weights, "
          f"{'bf16 autocast' if precision == 'bf16' else 'fp32'}; source cut at {encoder.max_source_length} tokens")
    if args.profile:
        return profile(args.workloads.split(",")[0], args, model, tokenizer, encoder, device)
    # greedy rates from the XL-Sum-length work, beam search's from translate-train's, recorded as each
    # configuration is measured, at the study's precision. Every output is as long as its reference
    # (ReferenceLengths), so a configuration does the same work whichever tokens it picks: its rate is
    # recorded with how many of its predictions are the first configuration's ("same_as_first"). In
    # bf16 a GPU's kernels for other shapes round otherwise (a static cache's longer attention, other
    # batches, inductor's fused kernels), and a random model's near-ties then flip tokens: the
    # decoders' tokens are checked at fp32, where they cannot (--precision fp32; tests/test_loop.py)
    measured, section = ("xlsum", "generate") if args.num_beams == 1 else ("translate", "beam")
    recording = (bool(args.rates) and device.type == "cuda" and args.dims in DIMS
                 and precision == loop.resolve_precision(None, device))
    written = []

    def record(workload_name, key, row):
        if recording and workload_name == measured and key in RATE_PATHS:
            entry = {"flops": row["flops"], "seconds": row["seconds"], "tokens_per_s": row["tokens_per_s"],
                     "examples": row["examples"], "same_as_first": row["same"], "compared_with": row["compared_with"],
                     "model": DIMS[args.dims], "beams": args.num_beams}
            cost.record_rates(args.rates, [section, family], {RATE_PATHS[key]: entry}, name,
                              time.strftime("%Y-%m-%d"), cost.peak_flops(name))
            written.append(RATE_PATHS[key])
    summary = {}
    for key in args.workloads.split(","):
        summary[key] = run_workload(key, args, model, tokenizer, encoder, device,
                                    on_row=lambda config, row, workload_name=key: record(workload_name, config, row))
    if recording and measured in summary:
        print(f"{section} rates of {family} ({', '.join(written) or 'none'}) written to {args.rates}")
    elif args.rates:
        print("--rates: not written (rates for cost.py: a GPU, real --dims, the study's precision, the xlsum "
              "workload (greedy) or the translate workload (--num-beams > 1))")
    if args.run_dir:
        eval_s, total_s = evaluation_share(args.run_dir)
        print(f"evaluation share of {args.run_dir}: {eval_s:.1f} s of {total_s:.1f} s ({eval_s / total_s:.0%}), "
              f"(validation at every evaluation step and the final test scoring)")
    return summary


if __name__ == "__main__":
    main(parse_args())
