"""Translate-train: translate English task data (or English predictions) into a target language.

    python translate_train.py --model facebook/nllb-200-3.3B --task xquad \\
        --train-file data/squad/train-v1.1.json --tgt-lang fr --out-file data/translated/squad.fr.json
    python translate_train.py --model tiny-nllb --task xquad --data-dir ../shared/data \\
        --train-file ../shared/data/squad/train-standin-v1.1.json.gz --tgt-lang fr --out-file fr.json --limit 30
    python translate_train.py --model facebook/nllb-200-3.3B --predictions preds.en.json --tgt-lang fr \\
        --out-file preds.fr.json                                      # Appendix D: translate outputs

The paper's upper baseline (Section 4, "Comparison versus data translation"; Appendix D): every text
field the task uses is translated sentence by sentence with NLLB (XL-Sum: text and summary; QA:
context, question and each answer separately, since answers are generated, not extracted), keeping
paragraph structure, and finetune.py trains on the result (`--train-file G --train-lang fr`).

How the work is organised (so that a long job survives being killed):

    examples (paragraphs / articles), in order, in chunks of --chunk-size
      -> the chunk's sentences, deduplicated
      -> sorted by length, cut into batches of <= --max-tokens source tokens, beam 4,
         target language forced, output <= ratio * input + offset tokens
      -> each finished batch is appended to OUT.progress.jsonl (chunk, sentence -> translation)
      -> each finished example is appended to OUT.progress.jsonl
    all examples done -> OUT written via a temporary file and a rename; progress file removed.

A rerun with the same arguments skips finished examples and batches: a kill loses at most the batch
in flight, and an existing good OUT is never replaced by a partial one. A batch is made from its
chunk alone (never from what other chunks did), so each example's translation is the same whether
the job ran straight, was killed and resumed, or was one shard of many.

A long translation is split into jobs (the study does this; cost.py sizes them):

    python translate_train.py ... --out-file OUT --shard 2/3     # the 2nd third of the chunks -> OUT.shard-2-of-3.jsonl
    python translate_train.py ... --out-file OUT --merge 3       # the 3 shards -> OUT, byte for byte an unsharded run's

Each shard resumes by itself (its own progress file); the merge checks that every shard was made
from the same input and settings and that together they hold every example, writes OUT atomically
and removes the shard files.
"""

import hashlib
import json
import os
import sys

import torch
from tqdm import tqdm

import common
import data
import evaluate
import loop
import models
from common import DataError, UsageError

TRANSLATION_HUB = ("facebook/nllb-200-", "facebook/m2m100", "facebook/mbart-large-50-many-to-many",
                   "facebook/mbart-large-50-one-to-many")


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="facebook/nllb-200-3.3B", help="NLLB/M2M100 or mBART-50 many-to-many checkpoint, or tiny-nllb")
    p.add_argument("--task", default=None, choices=data.finetune_tasks(),
                   help="xquad (SQuAD JSON) or xlsum (XL-Sum jsonl); not with --predictions")
    p.add_argument("--train-file", default=None, help="the English file to translate")
    p.add_argument("--predictions", default=None, help="translate these {id: text} predictions instead (Appendix D)")
    p.add_argument("--src-lang", default="en", help="source language")
    p.add_argument("--tgt-lang", required=True, help="target language, e.g. fr")
    p.add_argument("--out-file", required=True, help="output file, same format as the input")
    p.add_argument("--limit", type=common.positive_int, default=None,
                   help="translate only the first N questions (QA) or records (default: all)")
    p.add_argument("--num-beams", "--beam", type=common.positive_int, default=4, help="beam size")
    p.add_argument("--max-tokens", type=common.positive_int, default=4000, help="source-token budget of a generation batch")
    loop.add_decoder_arg(p)   # how the beams are searched (decode.StaticDecoder.beam_search or HF generate)
    p.add_argument("--chunk-size", type=common.positive_int, default=64, help="examples per chunk (progress is saved per example)")
    p.add_argument("--max-length-ratio", type=common.positive_float, default=2.0,
                   help="output tokens <= ratio * input tokens + offset")
    p.add_argument("--max-length-offset", type=common.non_negative_int, default=10, help="see --max-length-ratio")
    p.add_argument("--shard", type=shard_spec, default=None, metavar="I/N",
                   help="translate only shard I of N (1 <= I <= N: the I-th of N equal runs of whole chunks) into "
                        "OUT.shard-I-of-N.jsonl, resumably; --merge N joins the shards")
    p.add_argument("--merge", type=common.positive_int, default=None, metavar="N",
                   help="join the N shard files of --out-file into --out-file (exactly the file an unsharded run "
                        "writes) and remove them; translates nothing")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="data directory (for tiny models)")
    loop.add_device_args(p)
    return p.parse_args(argv)


def shard_spec(text):
    """--shard I/N -> (I, N), 1 <= I <= N."""
    import argparse
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 2/3, got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, got {text!r}")
    return index, count


def shard_chunks(num_chunks, index, count):
    """The chunk indices of shard `index` of `count` (1-based): consecutive, as equal as can be."""
    return range((index - 1) * num_chunks // count, index * num_chunks // count)


def shard_path(out_file, index, count):
    return f"{out_file}.shard-{index}-of-{count}.jsonl"


# -----------------------------------------------------------------------------
# Units of work: an "example" is a list of segments to translate and a function that rebuilds it

def paragraphs_and_sentences(text):
    """[[sentence, ...] per paragraph]: the translation units of a long text, structure kept."""
    return [[s.strip() for s in data.split_sentences(p) if s.strip()] for p in text.split("\n")]


def join_translation(paragraphs, translate, tgt_lang):
    glue = " " if data.get_language(tgt_lang).spaces else ""
    return "\n".join(glue.join(translate[s] for s in sentences) for sentences in paragraphs)


def find_answer(context, answer):
    """Character offset of the translated answer in the translated context, or -1."""
    start = context.find(answer)
    if start < 0 and answer:
        start = context.lower().find(answer.lower())
    return start


def qa_units(path, limit):
    """One unit per paragraph of the SQuAD JSON: its context, questions and answers."""
    data.read_squad(path)  # validates the file first: a bad one gives a file:line / record error
    raw = data.read_json_document(path, "SQuAD v1.1 JSON")
    units, count = [], 0
    for a, article in enumerate(raw["data"]):
        for p, paragraph in enumerate(article["paragraphs"]):
            if limit is not None and count >= limit:
                return raw, units
            qas = paragraph["qas"][:None if limit is None else limit - count]
            count += len(qas)
            units.append({"key": f"{a}/{p}", "title": article.get("title", ""), "context": paragraph["context"], "qas": qas})
    return raw, units


def qa_segments(unit):
    segments = [s for para in paragraphs_and_sentences(unit["context"]) for s in para]
    for qa in unit["qas"]:
        segments.append(qa["question"].strip())
        segments += [ans["text"].strip() for ans in qa["answers"]]
    return segments


def qa_rebuild(unit, translate, tgt_lang):
    context = join_translation(paragraphs_and_sentences(unit["context"]), translate, tgt_lang)
    qas = []
    for qa in unit["qas"]:
        answers = []
        for ans in qa["answers"]:
            text = translate[ans["text"].strip()]
            start = find_answer(context, text)
            answers.append({"text": text, "answer_start": start, "answer_in_context": start >= 0})
        qas.append({"id": qa["id"], "question": translate[qa["question"].strip()], "answers": answers})
    return {"title": unit["title"], "context": context, "qas": qas}


def xlsum_segments(record):
    return [s for field in ("text", "summary") for para in paragraphs_and_sentences(record[field]) for s in para]


def xlsum_rebuild(record, translate, tgt_lang):
    out = dict(record)
    for field in ("text", "summary"):
        out[field] = join_translation(paragraphs_and_sentences(record[field]), translate, tgt_lang)
    return out


def prediction_segments(item):
    return [s for para in paragraphs_and_sentences(item["text"]) for s in para]


def prediction_rebuild(item, translate, tgt_lang):
    return join_translation(paragraphs_and_sentences(item["text"]), translate, tgt_lang)


# -----------------------------------------------------------------------------
# Checks

def check_args(args):
    """Input file, output path, languages and model family, before the model is loaded."""
    if (args.train_file is None) == (args.predictions is None):
        raise UsageError("give exactly one of --train-file (with --task) and --predictions")
    if args.train_file is not None and args.task is None:
        raise UsageError("--task: xquad or xlsum is needed with --train-file")
    models.refuse_added_checkpoint(args.model, "--model", "a translation model")
    family = models.family_of_name(args.model, args.data_dir)
    if family == "mt5":
        raise UsageError(f"--model: {args.model} is an mT5 model, not a translation model (no language codes); "
                         f"use an NLLB/M2M100 or mBART-50 many-to-many checkpoint")
    if (args.model.startswith("facebook/") and not args.model.startswith(TRANSLATION_HUB)):
        raise UsageError(f"--model: {args.model} is not a translation checkpoint; use e.g. facebook/nllb-200-3.3B "
                         f"or facebook/mbart-large-50-many-to-many-mmt")
    for flag, lang in (("--src-lang", args.src_lang), ("--tgt-lang", args.tgt_lang)):
        models.language_code(family, lang, flag)
    source = args.train_file or args.predictions
    if os.path.isdir(source):
        raise UsageError(f"{source}: is a directory, expected a file")
    if not os.path.isfile(source):
        raise UsageError(f"{source}: file not found")
    if args.shard and args.merge:
        raise UsageError("--shard and --merge: give one (translate a shard, or join the shards)")
    target = shard_path(args.out_file, *args.shard) if args.shard else args.out_file
    common.check_output_file(args.out_file, "--out-file")
    common.check_output_file(target + ".progress.jsonl", "--out-file")
    source_flag = "--train-file" if args.train_file else "--predictions"
    common.refuse_overwriting_inputs(
        {f"--out-file {args.out_file}": args.out_file, f"--out-file {args.out_file}: {target}": target,
         f"--out-file {args.out_file}: its progress file {target}.progress.jsonl": target + ".progress.jsonl"},
        {f"{source_flag} {source}": source})
    return family


def load_units(args):
    """(units, segment function, rebuild function, writer of the final file)."""
    if args.predictions is not None:
        predictions = data.read_predictions(args.predictions)
        items = [{"key": pid, "text": text} for pid, text in list(predictions.items())[:args.limit]]
        def write(rebuilt):
            common.write_json(args.out_file, {item["key"]: rebuilt[item["key"]] for item in items})
        return items, prediction_segments, prediction_rebuild, write
    return UNITS[data.get_task(args.task).kind](args)


def summarization_units(args):
    records = data.read_xlsum(args.train_file, limit=args.limit)
    units = [dict(r, key=r["id"]) for r in records]
    def write(rebuilt):
        common.write_jsonl(args.out_file, [rebuilt[u["key"]] for u in units])
    return units, xlsum_segments, xlsum_rebuild, write


def squad_units(args):
    raw, units = qa_units(args.train_file, args.limit)
    def write(rebuilt):
        articles = []
        for unit in units:
            a = int(unit["key"].split("/")[0])
            if not articles or articles[-1][0] != a:
                articles.append((a, {"title": rebuilt[unit["key"]]["title"], "paragraphs": []}))
            paragraph = dict(rebuilt[unit["key"]])
            paragraph.pop("title")
            articles[-1][1]["paragraphs"].append(paragraph)
        common.write_json(args.out_file, {"version": raw.get("version", "1.1"), "translated_to": args.tgt_lang,
                                        "translated_with": args.model, "data": [art for _, art in articles]})
        answers = [a for p in rebuilt.values() for qa in p["qas"] for a in qa["answers"]]
        missing = sum(not a["answer_in_context"] for a in answers)
        print(f"{missing} of {len(answers)} translated answers not found in their translated context "
              f"(kept, with answer_start -1 and answer_in_context false)")
    return units, qa_segments, qa_rebuild, write


# How each kind of task (data.KINDS) is cut into units of translation and written back
UNITS = {"qa": squad_units, "summarization": summarization_units}


# -----------------------------------------------------------------------------
# Progress file

class Progress:
    """OUT.progress.jsonl: a header with the settings, then sentence lines (per chunk: `sentences`
    is {chunk: {source: translation}}) and example lines, appended.
    A kill can cut the last line anywhere, even inside a UTF-8 character: that line is ignored.
    Any other line that cannot be read is an error naming it."""

    def __init__(self, out_file, settings):
        self.path = out_file + ".progress.jsonl"
        self.sentences, self.examples = {}, {}
        header = {"kind": "header", "settings": settings}
        if os.path.exists(self.path):
            self._read(header)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._append([header])

    def _read(self, header):
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        complete = len(lines) - 1  # every line but the last ends in a newline: only the last can be cut
        fix = f"delete {self.path} to start over"
        rows = []
        for i, raw in enumerate(lines):
            try:
                rows.append(json.loads(raw.decode("utf-8")) if raw.strip() else None)
            except (UnicodeDecodeError, json.JSONDecodeError):
                if i < complete:
                    raise DataError(f"{self.path}:{i + 1}: not a progress line; {fix}") from None
                rows.append(None)  # a line cut by a kill: ignored
        if rows[0] is None:  # killed while the header was written: nothing was done yet
            with open(self.path, "wb"):
                pass
            self._append([header])
            return
        if rows[0] != header:
            raise DataError(f"{self.path}: made with other settings; delete it or choose another --out-file")
        for i, row in enumerate(rows[1:], 2):
            if row is None:
                continue
            if not isinstance(row, dict):
                raise DataError(f"{self.path}:{i}: not a progress line; {fix}")
            if row.get("kind") == "sentence" and isinstance(row.get("chunk"), int) and isinstance(row.get("src"), str) \
                    and isinstance(row.get("tgt"), str):
                self.sentences.setdefault(row["chunk"], {})[row["src"]] = row["tgt"]
            elif row.get("kind") == "example" and "key" in row and "value" in row:
                self.examples[row["key"]] = row["value"]
            else:
                raise DataError(f"{self.path}:{i}: a progress line without its fields; {fix}")
        if lines[-1].strip():  # drop the cut line, so that what is appended next starts on a line of its own
            with open(self.path, "r+b") as f:
                f.truncate(sum(len(line) + 1 for line in lines[:-1]))

    def _append(self, rows):
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_sentences(self, chunk, pairs):
        self.sentences.setdefault(chunk, {}).update(pairs)
        self._append([{"kind": "sentence", "chunk": chunk, "src": s, "tgt": t} for s, t in pairs.items()])

    def add_example(self, key, value):
        self.examples[key] = value
        self._append([{"kind": "example", "key": key, "value": value}])


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------

def unique_sentences(units, segments):
    """The sentences of `units` a chunk translates: each distinct one once, in first-seen order."""
    return list(dict.fromkeys(s for unit in units for s in segments(unit)))


def translate_sentences(model, tokenizer, encoder, sentences, args, device, bar, done=None, decoder=None):
    """Translate unique sentences with length-sorted, token-budget batches; yields {src: tgt} per batch.
    A batch whose sentences are all in `done` (translated before a kill) is skipped: the batches
    depend on `sentences` only, so a resumed chunk translates what remains exactly as it would have.
    `decoder`: a decode.StaticDecoder (loop.static_decoder), or None for HF generate: the same tokens."""
    examples = [data.Example(id=str(i), source=s, target="", src_lang=args.src_lang, tgt_lang=args.tgt_lang)
                for i, s in enumerate(sentences)]
    encoded = encoder.encode(examples)
    generation = encoder.generation_kwargs(args.tgt_lang)
    lengths = [len(e["input_ids"]) for e in encoded]
    batches = data.generation_batches(lengths, args.max_tokens)
    longest = [max(lengths[i] for i in batch) for batch in batches]
    limits = [min(encoder.max_target_length, int(args.max_length_ratio * n) + args.max_length_offset) for n in longest]
    if decoder is not None:   # its buffers sized for the chunk's largest batch at once: they stay where they are
        decoder.reserve(list(zip(map(len, batches), longest, limits)), args.num_beams)
    for batch, limit in zip(batches, limits):
        if done and all(sentences[i] in done for i in batch):
            continue
        out = loop.generate_batch(model, tokenizer, [encoded[i]["input_ids"] for i in batch], generation, device,
                                  limit, args.num_beams, precision=args.precision, decoder=decoder)
        texts = loop.decode_generated(tokenizer, out, generation)
        bar.update(len(batch))
        yield {sentences[i]: " ".join(evaluate.clean_prediction(t)[0].split()) for i, t in zip(batch, texts)}


def settings_of(args):
    """What the progress and shard files record; a resume or a merge must find the same."""
    return {"model": args.model, "src": args.src_lang, "tgt": args.tgt_lang, "beams": args.num_beams,
            "input": file_digest(args.train_file or args.predictions), "limit": args.limit,
            "chunk_size": args.chunk_size, "max_tokens": args.max_tokens,
            "ratio": args.max_length_ratio, "offset": args.max_length_offset}


@common.exits_on_error(interrupted=common.RERUN_HINT)
def main(args):
    # ---- setup ----
    family = check_args(args)
    device = loop.pick_device(args.device)
    args.precision = loop.resolve_precision(args.precision, device)  # printed as resolved
    common.print_settings(vars(args))
    units, segments_of, rebuild, write = load_units(args)
    settings = settings_of(args)
    chunks = [units[start:start + args.chunk_size] for start in range(0, len(units), args.chunk_size)]
    if args.merge:
        return merge(args, units, settings, write)
    if args.shard and args.shard[1] > len(chunks):
        raise UsageError(f"--shard {args.shard[0]}/{args.shard[1]}: the input has {len(chunks)} chunks of "
                         f"--chunk-size {args.chunk_size} examples; give at most {len(chunks)} shards")
    target = shard_path(args.out_file, *args.shard) if args.shard else args.out_file
    selected = shard_chunks(len(chunks), *args.shard) if args.shard else range(len(chunks))
    if args.shard and os.path.isfile(target):
        print(f"{target} exists: shard {args.shard[0]} of {args.shard[1]} already done, skipped")
        return
    tokenizer = models.load_tokenizer(args.model, args.data_dir)
    model = models.load_model(args.model, args.data_dir).to(device).eval()
    progress = Progress(target, settings)  # (once the model is there: a failure before leaves no file)
    encoder = models.Seq2SeqEncoder(tokenizer, family, models.max_length(model.config), models.max_length(model.config))
    mine = [u for k in selected for u in chunks[k]]
    print(f"{len(mine)} examples" + (f" (shard {args.shard[0]} of {args.shard[1]}: chunks {selected.start}-"
                                     f"{selected.stop - 1} of {len(chunks)})" if args.shard else "")
          + f", {sum(u['key'] in progress.examples for u in mine)} already done; "
          f"{sum(map(len, progress.sentences.values()))} sentences cached in {progress.path}")

    # ---- translation, chunk by chunk ----
    todo_chunks = [k for k in selected if any(u["key"] not in progress.examples for u in chunks[k])]
    sentences_of = {k: unique_sentences(chunks[k], segments_of) for k in todo_chunks}
    bar = tqdm(total=sum(len(v) - len(set(v) & set(progress.sentences.get(k, {}))) for k, v in sentences_of.items()),
               desc=f"translate {args.src_lang}->{args.tgt_lang}", unit="sent", dynamic_ncols=True, file=sys.stderr)
    decoder = loop.static_decoder(model, args.decoder, device, args.num_beams)   # one for the job: buffers reused
    for k in todo_chunks:
        with torch.no_grad():
            for translated in translate_sentences(model, tokenizer, encoder, sentences_of[k], args, device, bar,
                                                  done=progress.sentences.get(k), decoder=decoder):
                progress.add_sentences(k, translated)
        for unit in chunks[k]:
            if unit["key"] not in progress.examples:
                progress.add_example(unit["key"], rebuild(unit, progress.sentences.get(k, {}), args.tgt_lang))
    bar.close()

    # ---- the output file, atomically ----
    if args.shard:
        common.write_jsonl(target, [{"kind": "shard", "shard": list(args.shard), "settings": settings}]
                           + [{"key": u["key"], "value": progress.examples[u["key"]]} for u in mine])
    else:
        write(progress.examples)
    os.remove(progress.path)
    print(f"wrote {target}")


def merge(args, units, settings, write):
    """--merge N: the N shard files -> --out-file, the file an unsharded run writes; then the shards
    are removed. Every shard must be there, made from the same input and settings."""
    count = args.merge
    paths = [shard_path(args.out_file, i, count) for i in range(1, count + 1)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"--merge {count}: {len(missing)} of the {count} shards are not there (e.g. {missing[0]}); "
                         f"translate them first (--shard I/{count})")
    rebuilt = {}
    for i, path in enumerate(paths, 1):
        rows = [row for _, row in data.jsonl_objects(path, "shard of a translation")]
        header = rows[0] if rows else None
        if not isinstance(header, dict) or header.get("kind") != "shard" or header.get("shard") != [i, count]:
            raise DataError(f"{path}:1: not the header of shard {i} of {count}; translate that shard again")
        if header.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(header.get("settings") or {})
                             if (header.get("settings") or {}).get(k) != settings.get(k))
            raise DataError(f"{path}: made with other settings or input ({', '.join(changed)}); translate that shard "
                            f"again with these")
        for row in rows[1:]:
            rebuilt[row["key"]] = row["value"]
    missing = [u["key"] for u in units if u["key"] not in rebuilt]
    if missing:
        raise DataError(f"--merge {count}: the shards lack {len(missing)} of the {len(units)} examples (e.g. "
                        f"{missing[0]}); translate the shards again")
    write(rebuilt)
    for path in paths:
        os.remove(path)
    print(f"wrote {args.out_file} from {count} shards")


if __name__ == "__main__":
    main(parse_args())
