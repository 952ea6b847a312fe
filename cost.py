"""Where a real run's GPU-hours go: FLOP counts of the real architectures, turned into hours by
the rates bench/ measured on a GPU.

    python cost.py                               # one paper run of each task (mT5-base), itemised
    python cost.py --model google/mt5-large --task xquad
    bash run_all.sh --dry-run                    # the whole study: hours per stage and in total

A training step costs 6 FLOPs per weight per token (forward 2, backward 4) for the weights that
token passes through -- the encoder's for source tokens, the decoder's and the output layer's for
target tokens (the input embeddings are lookups, not products) -- plus the attention products
(4 x context x width per token and layer forward, 3 times that with the backward). Generating one
token costs 2 FLOPs per decoder and output-layer weight plus its attention over the source and the
tokens before it; the encoder runs once per source. Dividing by what one GPU does per second gives
hours: training at the model FLOPs utilisation (MFU) bench/train_throughput.py measured, generation
(memory-bound: each step reads all decoder weights for a small batch) at the FLOP rate
bench/generate_throughput.py measured at the tasks' real lengths.

The example counts are the real data sets' (XL-Sum: Hasan et al. 2021; SQuAD v1.1; XQuAD); the
token lengths are estimates for the real SentencePiece vocabularies (data.TASKS' `lengths`,
IT_LENGTHS here), stated so a reader can change them.
"""

import dataclasses
import functools
import json
import math
import os

import common
import data
import models

# One GPU's rates, measured: bench/gpu.sh writes bench/rates.json (training FLOPs and seconds at
# mT5-base dimensions per training path, eager and --compile; decoding FLOPs and seconds of the 141
# XL-Sum-length documents per family and decoder), and cost.py prices every run from the fastest path
# measured there. The file ships with the H200 figures of 2026-11-26 (eager training 6.01e14 FLOPs in
# 40.5 s, 1.5% MFU: eager HF modules launch ~4,000 small kernels a step; dynamic decoding 2.06e13
# FLOPs in 11.5 s): the paper-scope study at 5,388 GPU-hours (README, "The rates it is priced at").
RATES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "rates.json")


@dataclasses.dataclass(frozen=True)
class Rates:
    gpu: str
    date: str
    peak_flops: float          # dense bf16 FLOP/s of the GPU
    train_mfu: float           # model FLOPs utilisation of the fastest training path measured
    train_path: str            # "eager" or "compiled"
    generate: dict             # family: (FLOP/s, decoder) of greedy decoding's fastest decoder measured
    beam: dict                 # family: (FLOP/s, decoder) of beam search (translations): its fastest decoder
                               # measured, or where none was, greedy's "dynamic" rate (HF-generate-like)
    agreement: dict = dataclasses.field(default_factory=dict)
                               # (section, family): "139/141 as hf-sorted", the predictions of the decoder
                               # priced that were its bench run's first configuration's (same_as_first)

    def decoding(self, name, beams=1):
        """FLOP/s of decoding with model `name`: its family's rate, or mT5's when the family was not
        measured (the decoder step is the same kind of memory-bound work)."""
        table = self.generate if beams == 1 else self.beam
        family = models.REAL_CONFIGS[name][0] if name in models.REAL_CONFIGS else "mt5"
        return (table.get(family) or table.get("mt5") or next(iter(table.values())))[0]

    def describe(self):
        def listed(section, table):  # "mt5 41.2 (compiled-auto; 139/141 as hf-sorted)", the count where known
            agreement = {family: f"; {text}" for (part, family), text in self.agreement.items() if part == section}
            return ", ".join(f"{family} {rate / 1e12:.1f} ({path}{agreement.get(family, '')})"
                             for family, (rate, path) in table.items())
        greedy, beam = listed("generate", self.generate), listed("beam", self.beam)
        return (f"GPU: {self.gpu}, training at {self.train_mfu:.1%} MFU of {self.peak_flops / 1e12:.0f} TFLOP/s "
                f"({self.train_path}); greedy decoding TFLOP/s {greedy}; beam search {beam} (measured {self.date}, "
                f"bench/gpu.sh -> {os.path.relpath(RATES_FILE)})")


# dense bf16 FLOP/s by GPU name (NVIDIA's datasheets give twice these, "with sparsity"); the PCIe and
# NVL cards run at lower clocks than the SXM ones (torch names those "NVIDIA H100 80GB HBM3", "NVIDIA H200")
PEAK_BF16 = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
             "A100": 312e12}


def peak_flops(gpu):
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name(): the longest name that matches."""
    known = [key for key in PEAK_BF16 if key in gpu]
    if not known:
        raise common.UsageError(f"cost: no bf16 peak known for '{gpu}'; add it to cost.PEAK_BF16")
    return PEAK_BF16[max(known, key=len)]


def _fastest(measured, where):
    """(rate in FLOP/s, path) of the fastest {path: {"flops", "seconds"}} entry measured."""
    rates = {path: m["flops"] / m["seconds"] for path, m in measured.items() if m}
    if not rates:
        raise common.UsageError(f"cost: {where} has no measured rate; run bash bench/gpu.sh on a GPU")
    path = max(rates, key=rates.get)
    return rates[path], path


def _agreement(entry, path):
    """"139/141 as hf-sorted": how many of a measured decoder's predictions were those of the first
    configuration of its bench run (generate_throughput.py's "same as" column), when that was
    another configuration; None for an entry that does not say (or was compared with itself)."""
    if not entry or "same_as_first" not in entry or entry.get("compared_with") in (None, path):
        return None
    return f"{entry['same_as_first']}/{entry['examples']} as {entry['compared_with']}"


@functools.lru_cache(maxsize=None)
def read_rates(path=None):
    """The rates of bench/rates.json (or `path`); a missing or malformed file is a one-line error."""
    path = path or RATES_FILE
    try:
        with open(path) as f:
            raw = json.load(f)
        train, train_path = _fastest(raw["train"], f"{path} 'train'")
        generate = {family: _fastest(paths, f"{path} 'generate' '{family}'")
                    for family, paths in raw["generate"].items()}
        # beam search: measured (bench/generate_throughput.py --num-beams 4, the "beam" section), or
        # greedy's dynamic rate, which is what HF generate's beam search was priced at before
        beam = {family: (paths["dynamic"]["flops"] / paths["dynamic"]["seconds"], "greedy dynamic")
                for family, paths in raw["generate"].items() if paths.get("dynamic")}
        beam.update({family: _fastest(paths, f"{path} 'beam' '{family}'")
                     for family, paths in raw.get("beam", {}).items()})
        if not beam:
            raise KeyError("no 'beam' rate and no family with a 'dynamic' decoding rate (beam search is priced at one)")
        agreement = {(section, family): _agreement(raw[section][family].get(path), path)
                     for section, table in (("generate", generate), ("beam", beam))
                     for family, (_, path) in table.items() if family in raw.get(section, {})}
        return Rates(raw["gpu"], raw["date"], raw["peak_flops"], train / raw["peak_flops"], train_path, generate, beam,
                     {key: text for key, text in agreement.items() if text})
    except FileNotFoundError:
        raise common.UsageError(f"cost: no rates file {path}; bash bench/gpu.sh writes it on a GPU") from None
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
        raise common.UsageError(f"cost: {path} is not a rates file bench/gpu.sh writes ({type(e).__name__}: {e})") from None


def rates():
    """The rates cost.py prices with: bench/rates.json, or the file $XLGEN_RATES names (another GPU's)."""
    return read_rates(os.environ.get("XLGEN_RATES") or RATES_FILE)


def record_rates(path, section, entries, gpu, date, peak_flops):
    """Merges {path: measurement} into `section` ("train", or "generate" and a family) of the rates
    file and rewrites it whole (temp file, then rename): a bench run adds or replaces its own paths
    and keeps the others'. A file measured on another GPU is replaced, not mixed."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raw = {}
    if raw.get("gpu") != gpu:
        raw = {"about": "Rates measured by bash bench/gpu.sh; cost.py prices every run from the fastest path here."}
    raw.update(gpu=gpu, date=date, peak_flops=peak_flops)
    node = raw
    for key in section:
        node = node.setdefault(key, {})
    node.update(entries)
    common.write_text(path, json.dumps(raw, indent=2) + "\n")
    read_rates.cache_clear()


# Examples per split and language, and mean tokens per example: the task table's sizes and lengths
# (data.TASKS); intermediate tuning's lengths here.
IT_LENGTHS = {"source": 250, "target": 250, "generated": 32}


def lengths(task):
    """Mean tokens per example of a task ("it": intermediate tuning's text)."""
    return {"it": IT_LENGTHS}.get(task) or data.get_task(task).lengths


@functools.lru_cache(maxsize=None)
def weights(name):
    """(encoder, decoder, output layer) weights of a real architecture, embeddings left out; and its
    (encoder layers, decoder layers, attention width)."""
    model = models.real_architecture(name)  # on the meta device: shapes only
    encoder, decoder = model.get_encoder(), model.get_decoder()

    def count(module, skip):
        return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))
    config = model.config
    width = getattr(config, "num_heads", 0) * getattr(config, "d_kv", 0) or config.d_model
    layers = (getattr(config, "num_layers", None) or config.encoder_layers,
              getattr(config, "num_decoder_layers", None) or config.decoder_layers)
    head = model.lm_head.weight.numel()
    return (count(encoder, ("embed_tokens", "embed_positions")), count(decoder, ("embed_tokens", "embed_positions")),
            head), layers + (width,)


def batch_flops(name, batch):
    """Training FLOPs of one collated batch, counted on its real (non-pad) tokens."""
    (enc, dec, head), (enc_layers, dec_layers, width) = weights(name)
    src = batch["attention_mask"].sum(1).tolist()
    tgt = (batch["labels"] != -100).sum(1).tolist()
    forward = sum(2 * enc * s + 2 * (dec + head) * t + 4 * width * (enc_layers * s * s + dec_layers * t * (t + s))
                  for s, t in zip(src, tgt))
    return 3 * forward


def source_length(name, task):
    return min(lengths(task)["source"], models.FAMILY_MAX_LENGTH[models.REAL_CONFIGS[name][0]])


def train_step_flops(name, task, max_tokens):
    """FLOPs of one training step on a `max_tokens` batch (fairseq budget: longest side x examples)."""
    (enc, dec, head), (enc_layers, dec_layers, width) = weights(name)
    src, tgt = source_length(name, task), lengths(task)["target"]
    n = max_tokens / max(src, tgt)
    forward = n * (2 * enc * src + 2 * (dec + head) * tgt
                   + 4 * width * (enc_layers * src * src + dec_layers * tgt * (tgt + src)))
    return 3 * forward


def generation_flops(name, task, examples, generated=None, beams=1):
    """FLOPs of generating for `examples` sources of `task` (cache, finished rows dropped): the
    encoder once per source, the decoder once per beam (greedy: 1)."""
    src, out = source_length(name, task), generated or lengths(task)["generated"]
    return examples * decode_flops(name, src, out, beams)


def decode_flops(name, source, generated, beams=1):
    """FLOPs of generating `generated` tokens for one `source`-token source: the encoder once, each
    new token through the decoder and output layer, attending to the source and the tokens before."""
    (enc, dec, head), (enc_layers, dec_layers, width) = weights(name)
    encoder = 2 * enc * source + 4 * width * enc_layers * source * source
    decoder = generated * (2 * (dec + head) + 4 * width * dec_layers * (source + generated / 2))
    return encoder + beams * decoder


@functools.lru_cache(maxsize=None)
def parsed(script, flags=()):
    """The settings of `python SCRIPT FLAGS` (finetune.py, pretrain_it.py, translate_train.py), as
    its own parser reads them. Cached: the study prices each command several times (its hours, its
    job's time and chunks, its disk), and building a parser of 70 flags costs more than the pricing.
    The caller must not change what it gets."""
    import importlib
    return importlib.import_module(os.path.basename(script)[:-3]).parse_args(list(flags))


def stage_defaults(stage):
    """The default settings of a stage script (finetune, pretrain_it): its parser with no flags."""
    return parsed(f"{stage}.py")


def train_hours(flops):
    r = rates()
    return flops / (r.peak_flops * r.train_mfu) / 3600


def generate_hours(flops, name, beams=1):
    """Hours of generating `flops` with model `name`: greedy at its family's fastest decoder measured,
    beam search at its own (bench/gpu.sh measures translate-train's), else at greedy's dynamic rate."""
    return flops / rates().decoding(name, beams) / 3600


def split_size(task, split, lang):
    """Examples of a task's split in a language (data.TASKS' `sizes`); a language the table has no
    size for is a one-line error naming where to add it, not a KeyError in the middle of a dry run."""
    sizes = data.get_task(task).sizes.get(split, {})
    if lang not in sizes:
        raise common.UsageError(f"cost: data.TASKS['{task}'].sizes['{split}'] has no size for '{lang}'; add the "
                                f"number of examples of that split there to price runs that use it")
    return sizes[lang]


def validation_examples(task, langs, cap=None):
    """Examples in the validation sets of `langs` (XQuAD's English: the held-out SQuAD dev slice),
    each language cut to its first `cap` as finetune.py cuts them (--max-val-examples)."""
    return sum(min(split_size(task, "val", lang), cap or math.inf) for lang in langs)


def test_examples(task, langs):
    limit = data.get_task(task).test_limit
    return sum(min(split_size(task, "test", lang), limit or math.inf) for lang in langs)


def finetune_hours(name, task, max_steps=None, max_tokens=None, eval_every=None, val_langs=None, test_langs=None,
                   test_last=False, max_eval_examples=None, max_val_examples=None):
    """(training hours, evaluation hours) of one finetune.py run (steps, budget and evaluation interval
    default to finetune.py's own defaults, the paper's)."""
    defaults = stage_defaults("finetune")
    max_steps, max_tokens = max_steps or defaults.max_steps, max_tokens or defaults.max_tokens
    eval_every = eval_every or defaults.eval_every
    spec = data.TASKS[task]
    val_langs, test_langs = val_langs or spec.val_langs, test_langs or spec.test_langs
    evaluations = max_steps // eval_every
    # finetune.py's caps apply to each language: --max-eval-examples to validation and test sets,
    # --max-val-examples (study.py --val-cap) to validation sets only
    val = validation_examples(task, val_langs, min(max_eval_examples or math.inf, max_val_examples or math.inf))
    test = sum(min(max_eval_examples or math.inf, test_examples(task, [lang])) for lang in test_langs)
    test *= 2 if test_last else 1
    return (train_hours(max_steps * train_step_flops(name, task, max_tokens)),
            generate_hours(generation_flops(name, task, evaluations * val + test), name))


def it_hours(name, max_steps=None, max_tokens=None, eval_every=None):
    """Intermediate tuning: Prefix-LM on raw text (evaluation: held-out loss and a few generations);
    the settings default to pretrain_it.py's."""
    defaults = stage_defaults("pretrain_it")
    max_steps, max_tokens = max_steps or defaults.max_steps, max_tokens or defaults.max_tokens
    eval_every = eval_every or defaults.eval_every
    held_out = max_steps // eval_every * train_step_flops(name, "it", max_tokens) / 3 * 20  # 20 forward batches
    return train_hours(max_steps * train_step_flops(name, "it", max_tokens) + held_out), 0.0


def translate_hours(translator, task, examples, beams=4):
    """Translating `examples` training examples (every source and target sentence) with `translator`,
    beam search with `beams` beams (translate_train.py's default: 4)."""
    tokens = lengths(task)["source"] + lengths(task)["target"]
    return 0.0, generate_hours(generation_flops(translator, "it", examples, generated=tokens, beams=beams), translator,
                               beams)


@functools.lru_cache(maxsize=None)
def saved_weights(name, method):
    """Weights a checkpoint of `method` holds: all of them (a save_pretrained checkpoint), or only
    those the method added (adapters, prompt, lora: adapt.saves_added_weights); and the weights the
    optimizer keeps state for (the trainable ones)."""
    import torch
    import adapt
    model = models.real_architecture(name)
    if method not in (None, "full"):
        try:
            with torch.device("meta"):
                adapt.apply(model, method, verbose=False)
        except common.UsageError:  # a method that needs its data's options (mix, multisrc) trains every weight
            pass
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if adapt.saves_added_weights(method):
        added = adapt.get_method(method).added
        return sum(p.numel() for n, p in model.named_parameters() if added(n)), trainable
    return sum(p.numel() for p in model.parameters()), trainable


def run_disk(argv):
    """(bytes a finished run keeps, bytes it needs while it runs) for one command of the study, or
    None (tiny models; translations: a text file). A finished run keeps best/ and last/, fp32
    weights (one copy when they are the same step: loop.finish_checkpoints links them); while it
    runs, last/ also has the AdamW state (two fp32 moments per trainable weight) and a save writes
    a new checkpoint beside the old one."""
    script = os.path.basename(argv[1])
    if script not in ("finetune.py", "pretrain_it.py"):
        return None
    args = parsed(script, tuple(argv[2:]))
    if args.model not in models.REAL_CONFIGS:
        return None
    saved, trainable = saved_weights(args.model, getattr(args, "method", None))
    weights_bytes, state_bytes = 4 * saved, 8 * trainable
    return 2 * weights_bytes, 3 * weights_bytes + 2 * state_bytes


def run_estimate(argv):
    """(hours, training steps, evaluation interval) of one command of the study, what the launcher
    sizes a job's time and chunks by (launch.Resources); None where run_hours has no estimate. A
    translation has no steps: (hours, 1, 1)."""
    hours = run_hours(argv)
    if hours is None:
        return None
    script = os.path.basename(argv[1])
    if script in ("finetune.py", "pretrain_it.py"):
        args = parsed(script, tuple(argv[2:]))
        return sum(hours), args.max_steps, args.eval_every
    return sum(hours), 1, 1


def run_hours(argv):
    """(training hours, generation hours) of one command of the study (python SCRIPT.py ARGS), from its
    own parsed arguments; None for tiny models (nothing to estimate). A translation shard
    (--shard I/N) costs 1/N of the whole."""
    script, flags = os.path.basename(argv[1]), argv[2:]
    if script == "finetune.py":
        args = parsed(script, tuple(flags))
        if args.model not in models.REAL_CONFIGS:
            return None
        langs = [data.parse_langs(flag) if flag else None for flag in (args.val_langs, args.test_langs)]
        return finetune_hours(args.model, args.task, args.max_steps, args.max_tokens * args.update_freq,
                              args.eval_every, *langs, args.test_last, args.max_eval_examples,
                              args.max_val_examples)
    if script == "pretrain_it.py":
        args = parsed(script, tuple(flags))
        if args.model not in models.REAL_CONFIGS:
            return None
        return it_hours(args.model, args.max_steps, args.max_tokens * args.update_freq, args.eval_every)
    if script == "translate_train.py":
        args = parsed(script, tuple(flags))
        if args.model not in models.REAL_CONFIGS:
            return None
        if args.predictions:  # a run's test predictions (Appendix D): short outputs, not examples
            task = next(t for t in data.finetune_tasks() if f"{os.sep}{t}{os.sep}" in args.predictions)
            examples = test_examples(task, [args.tgt_lang])
            return 0.0, generate_hours(generation_flops(args.model, "it", examples, lengths(task)["generated"],
                                                        beams=args.num_beams), args.model, args.num_beams)
        if args.merge:
            return 0.0, 0.0
        # the English training set, or a held-out English validation set (study.py writes it into heldout/)
        split = "val" if f"{os.sep}heldout{os.sep}" in args.train_file else "train"
        examples = min(args.limit or math.inf, split_size(args.task, split, "en"))
        share = 1 / args.shard[1] if args.shard else 1.0
        return 0.0, translate_hours(args.model, args.task, examples * share, args.num_beams)[1]
    return None


def validation_hours(name, task, evaluations=10, cap=None):
    """Generation hours of a run's validations, each language capped at `cap` examples."""
    langs = data.get_task(task).val_langs
    return generate_hours(generation_flops(name, task, evaluations * validation_examples(task, langs, cap)), name)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="google/mt5-base", choices=list(models.REAL_CONFIGS),
                   help="a model whose real dimensions cost.py knows (models.REAL_CONFIGS)")
    p.add_argument("--task", default=None, choices=data.finetune_tasks(), help="one task (default: each)")
    return p.parse_args(argv)


@common.exits_on_error
def main(args):
    print(rates().describe())
    name = args.model
    for task in [args.task] if args.task else data.finetune_tasks():
        train, evaluation = finetune_hours(name, task, test_last=True)
        print(f"one {name} run, {task}: 20k steps of 4000 tokens {train:.2f} h + 10 validations and the test "
              f"{evaluation:.2f} h = {train + evaluation:.2f} h (evaluation {evaluation / (train + evaluation):.0%}); "
              f"the validations alone {validation_hours(name, task):.2f} h; with study.py --val-cap 1000 "
              f"{validation_hours(name, task, cap=1000):.2f} h, --val-cap 500 {validation_hours(name, task, cap=500):.2f} h")


if __name__ == "__main__":
    main(parse_args())
