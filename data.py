"""Data for xlgen: languages, tasks, readers, task formatting, self-supervision and batching.

    python -c "import data; print(len(data.read_squad(data.xquad_path('../shared/data', 'zh'))))"

Every stage reads its files and builds its batches through this module. Model-specific encoding
(language codes, maximum lengths) lives in models.py; fetching the files lives in download.py.

Sections:
  1. Languages and tasks      our code -> mBART-50 code, NLLB code, fastText label, XL-Sum folder,
                              script; per task: languages, main metric, generation length
  2. Readers                  SQuAD/XQuAD JSON (.json or .json.gz), XL-Sum jsonl, raw text,
                              predictions; where each file lives below a data directory
  3. Task formatting          (paper Section 3) summarisation: article -> summary;
                              QA: paragraph + question appended at its end -> answer
  4. Self-supervised examples Prefix-LM (Vu et al. 2022), the ZmBART-like objective (Appendix B),
                              mT5's span corruption and mBART's denoising (Appendix C)
  5. Token-budget batching    fairseq `batch_by_size` semantics, resumable, a stream mixer, and the
                              length-sorted batches of generation
"""

import dataclasses
import gzip
import itertools
import json
import math
import os
import re

import numpy as np
import torch

import common
from common import DataError, UsageError

REPO = os.path.dirname(os.path.abspath(__file__))
# Where `python download.py` puts the data, and so where every stage looks by default.
DEFAULT_DATA_DIR = os.environ.get("XLGEN_DATA_DIR") or os.path.join(REPO, "data")


# -----------------------------------------------------------------------------
# 1. Languages and tasks
# A language's mBART-50 code, NLLB-200 code, fastText lid.176 label, XL-Sum folder and CC-100 file. None
# means the resource does not cover the language (mBART-50 has no Greek; XL-Sum has no German,
# Romanian or Greek), and asking for it is an error, not a silent fallback.

@dataclasses.dataclass(frozen=True)
class Language:
    code: str           # our code: ISO 639-1, as in XQuAD file names
    name: str
    mbart: str | None   # facebook/mbart-large-50 language code
    nllb: str           # facebook/nllb-200-* language code (FLORES-200: language_Script)
    fasttext: str       # label of lid.176 without the "__label__" prefix
    xlsum: str | None   # folder / file prefix in the XL-Sum v2.0 release
    spaces: bool = True  # written with spaces between words (no: zh, ja, th)
    xquad: bool = False  # one of the 12 XQuAD languages
    cc100: str = ""      # file name in CommonCrawl CC-100 when it differs from our code (zh: zh-Hans)

    @property
    def xlsum_scorer_name(self):
        """The language name XL-Sum's multilingual ROUGE takes (its folder name, where the scorer maps
        it: chinese_simplified -> chinese), or the English name for a language XL-Sum lacks."""
        return {"chinese_simplified": "chinese"}.get(self.xlsum, self.xlsum) or self.name.lower()

    @property
    def script(self):
        """ISO 15924 script, from the NLLB code: 'Latn', 'Cyrl', 'Hans', ..."""
        return self.nllb.split("_")[1]


LANGUAGES = {lang.code: lang for lang in [
    Language("en", "English", "en_XX", "eng_Latn", "en", "english", xquad=True),
    Language("fr", "French", "fr_XX", "fra_Latn", "fr", "french"),
    Language("es", "Spanish", "es_XX", "spa_Latn", "es", "spanish", xquad=True),
    Language("ru", "Russian", "ru_RU", "rus_Cyrl", "ru", "russian", xquad=True),
    Language("zh", "Chinese (simplified)", "zh_CN", "zho_Hans", "zh", "chinese_simplified", spaces=False, xquad=True,
             cc100="zh-Hans"),
    Language("ko", "Korean", "ko_KR", "kor_Hang", "ko", "korean"),
    Language("ja", "Japanese", "ja_XX", "jpn_Jpan", "ja", "japanese", spaces=False),
    Language("ar", "Arabic", "ar_AR", "arb_Arab", "ar", "arabic", xquad=True),
    Language("de", "German", "de_DE", "deu_Latn", "de", None, xquad=True),
    Language("th", "Thai", "th_TH", "tha_Thai", "th", "thai", spaces=False, xquad=True),
    Language("ro", "Romanian", "ro_RO", "ron_Latn", "ro", None, xquad=True),
    Language("vi", "Vietnamese", "vi_VN", "vie_Latn", "vi", "vietnamese", xquad=True),
    Language("el", "Greek", None, "ell_Grek", "el", None, xquad=True),
    Language("hi", "Hindi", "hi_IN", "hin_Deva", "hi", "hindi", xquad=True),
    Language("tr", "Turkish", "tr_TR", "tur_Latn", "tr", "turkish", xquad=True),
]}
XQUAD_LANGS = [code for code, lang in LANGUAGES.items() if lang.xquad]


def get_language(code, flag="--lang"):
    """Look up a language by our code; an unknown code is a one-line error listing the supported ones."""
    if code not in LANGUAGES:
        raise UsageError(f"{flag}: unknown language '{code}'; supported: {', '.join(LANGUAGES)}")
    return LANGUAGES[code]


def parse_langs(text, flag="--langs"):
    """'fr,zh, ko' (or an already split list) -> ['fr', 'zh', 'ko'], each checked against the table."""
    items = text if isinstance(text, (list, tuple)) else text.split(",")
    codes = [c.strip() for c in items if c.strip()]
    if not codes:
        raise UsageError(f"{flag}: empty language list")
    for code in codes:
        get_language(code, flag)
    if len(set(codes)) != len(codes):
        raise UsageError(f"{flag}: a language is listed twice: {','.join(codes)}")
    return codes


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything the stages know about a task (paper Section 3 and Appendix A): one entry of TASKS.
    No stage branches on a task's name: what differs between tasks is a field here, and what
    differs between kinds of task (QA, summarisation) is an entry of KINDS below.

    files(split, lang, data_dir, task_dir) gives the file of a split ("train", "val", "test") in a
    language; task_dir is --xlsum-dir (default DATA/xlsum) for tasks that keep their files there.
    sizes: examples per split and language of the full data sets (cost.py prices the study from
    them); lengths: mean tokens per example under the real vocabularies (estimates): the source
    before the family's cut, the reference target, and what a trained model generates."""
    name: str
    kind: str               # "qa" or "summarization": reader, formatting, metric (KINDS)
    main_metric: str        # what model selection and the tables use
    metric_label: str       # how tables and figures name it
    main_lcr: str           # the language-correct rate the tables use (QA: on the filtered set, as the paper)
    val_langs: tuple = ()   # validation languages: the checkpoint and LR are chosen on their average
    test_langs: tuple = ()
    source_langs: tuple = ("en",)  # languages with training data (multisrc samples them uniformly)
    max_new_tokens: int = 32       # generation length limit
    test_limit: int | None = None  # XL-Sum: "first 2k examples per language"
    files: object = None           # files(split, lang, data_dir, task_dir) -> path
    download: str = ""             # the download.py flags that fetch its files
    sizes: dict = dataclasses.field(default_factory=dict)    # {"train"/"val"/"test": {lang: examples}}
    lengths: dict = dataclasses.field(default_factory=dict)  # {"source", "target", "generated": tokens}
    guard: tuple = ()              # the learning guard: (metric, threshold, number of examples)
    # English validation (Appendix D needs the best LR for English) when English is a test set only:
    # heldout_english(data_dir, path) writes a held-out English set in the task's format
    heldout_english: object = None
    heldout_name: str = ""         # its name in file names ("squad-dev": OUT/heldout/squad-dev.en.json)

    @property
    def format(self):
        return KINDS[self.kind]


@dataclasses.dataclass(frozen=True)
class Kind:
    """What tasks of one kind share: the official file format and the formatting into seq2seq
    examples. (The metric of a kind is evaluate.SCORERS[kind]; its translation, translate_train.UNITS.)"""
    read: object        # read(path, limit) -> references (dicts with an "id")
    iterate: object     # iterate(path) -> the same references one at a time (the token cache streams big files)
    examples: object    # examples(references, lang) -> [Example]
    extension: str      # of its files ("json": SQuAD format; "jsonl": XL-Sum format)
    guard_examples: object  # guard_examples(task, data_dir, task_dir, path, num): write the learning guard's
                            # `num` English examples to `path` in this format
    # Inputs without references (predict.py's jsonl): the fields of the source (and of its tail, the
    # QA question), the field a reference would be in; and how a model card describes the input.
    input_fields: tuple = ()
    reference_field: str = ""
    input_format: str = ""      # prose
    input_expression: str = ""  # the Python expression a model card passes to the tokenizer
    # Whether its results carry every ROUGE mode (evaluate.ROUGE_MODES) beside the one that selected:
    # the report then tabulates the modes; else (QA) the filtered question set its tables are scored on
    rouge_modes: bool = False


def _xquad_files(split, lang, data_dir, task_dir):
    return squad_path(data_dir, "train") if split == "train" else xquad_path(data_dir, lang)


def _xlsum_files(split, lang, data_dir, task_dir):
    """XL-Sum jsonl in task_dir (default DATA/xlsum). Without XL-Sum English training data, the GUM
    summaries of ../shared/data stand in for it, so that the offline pipeline runs."""
    path = xlsum_path(task_dir or os.path.join(data_dir, "xlsum"), lang, split)
    if split == "train" and lang == "en" and not os.path.isfile(path) and os.path.isfile(gum_path(data_dir)):
        return gum_path(data_dir)
    return path


def _squad_dev_files(split, lang, data_dir, task_dir):
    return squad_path(data_dir, "dev")


XQUAD_SIZE = 1190  # questions per XQuAD language (XQuAD translates 240 SQuAD v1.1 dev paragraphs)
TASKS = {task.name: task for task in [
    Task("xlsum", "summarization", "rouge2", "ROUGE-2", "lcr", ("zh", "fr", "ko", "ru", "es"), ("zh", "fr", "ko", "ru", "es"),
         source_langs=("en", "ja", "ar"), max_new_tokens=84, test_limit=2000, files=_xlsum_files,
         download="--tasks xlsum",
         # XL-Sum's tables (train, validation, test per language)
         sizes={split: {lang: sizes[i] for lang, sizes in {
             "en": (306522, 11535, 11535), "zh": (37362, 4670, 4670), "fr": (8697, 1086, 1086),
             "ko": (4407, 550, 550), "ru": (62243, 7780, 7780), "es": (38110, 4763, 4763), "ja": (7113, 889, 889),
             "ar": (37519, 4689, 4689)}.items()} for i, split in enumerate(("train", "val", "test"))},
         lengths={"source": 640, "target": 34, "generated": 40}, guard=("rouge2", 80.0, 2)),
    # XQuAD: trained on SQuAD; no validation set in other languages, so the held-out XQuAD
    # languages th, ro, vi select; the paper's F-measure on the filtered question set. English is
    # validated on a held-out slice of SQuAD v1.1 dev (XQuAD's English is a test set).
    Task("xquad", "qa", "f1_filtered", "F1 (filtered)", "lcr_filtered", ("th", "ro", "vi"), ("ar", "zh", "de", "ru", "es"),
         max_new_tokens=32, files=_xquad_files, download="--tasks squad,xquad",
         sizes={"train": {"en": 87599}, "val": dict.fromkeys(XQUAD_LANGS, XQUAD_SIZE),
                "test": dict.fromkeys(XQUAD_LANGS, XQUAD_SIZE)},
         lengths={"source": 210, "target": 7, "generated": 8}, guard=("f1", 90.0, 4),
         heldout_english=lambda data_dir, path: squad_dev_heldout(data_dir, path), heldout_name="squad-dev"),
    # SQuAD v1.1 dev: English QA, for scoring only (evaluate.py)
    Task("squad", "qa", "f1", "F1", "lcr_filtered", files=_squad_dev_files, download="--tasks squad"),
]}


def register_task(task):
    """Add a task to the table (e.g. a fork's own data set; tests/test_tasks.py adds one)."""
    TASKS[task.name] = task
    return task


def finetune_tasks():
    """The tasks a model can be finetuned and validated on (those with validation languages)."""
    return [name for name, task in TASKS.items() if task.val_langs]


def get_task(name, flag="--task", choices=None):
    choices = choices or list(TASKS)
    if name not in choices:
        raise UsageError(f"{flag}: unknown task '{name}'; choose from {', '.join(choices)}")
    return TASKS[name]


def target_langs():
    """English and every language a task validates or tests on: what intermediate tuning covers
    (paper Section 3: "uniformly sampled across all target languages and English")."""
    langs = {"en": None}
    for task in TASKS.values():
        langs.update(dict.fromkeys(task.val_langs + task.test_langs))
    return list(langs)


# -----------------------------------------------------------------------------
# 2. Readers for the official formats

def _read_lines(path):
    """(line number, decoded line) of a text file, gzip-compressed when the name ends in .gz.
    Lines are decoded one by one so an encoding error names its real line."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:  # e.g. a truncated or corrupt .gz
        raise DataError(f"{path}: cannot read ({e})") from None


def read_json_document(path, what):
    """A whole JSON file (.json or .json.gz), with errors that name the file and line."""
    text = "".join(line for _, line in _read_lines(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected {what}") from None


def read_squad(path):
    """Read SQuAD v1.1 / XQuAD JSON into a flat list of questions.

    Returns dicts {id, title, context, question, answers: [text, ...], answer_starts: [int, ...]},
    in file order, every gold answer kept (the metric takes the max over them).
    """
    raw = read_json_document(path, "SQuAD v1.1 JSON")
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise DataError(f"{path}: not SQuAD JSON (expected an object with a 'data' list)")
    questions, seen = [], set()
    for a, article in enumerate(raw["data"]):
        where = f"data[{a}]"
        try:
            for p, paragraph in enumerate(article["paragraphs"]):
                where = f"data[{a}].paragraphs[{p}]"
                context = paragraph["context"]
                if not isinstance(context, str):
                    raise TypeError("context must be a string")
                for q, qa in enumerate(paragraph["qas"]):
                    where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                    answers = qa["answers"]
                    if not isinstance(qa["id"], str) or not isinstance(qa["question"], str) or not answers:
                        raise TypeError("id/question must be strings and answers non-empty")
                    if not isinstance(answers, list) or not all(isinstance(ans, dict) for ans in answers):
                        raise TypeError(f"question '{qa['id']}': answers must be a list of objects")
                    for ans in answers:
                        if not isinstance(ans["text"], str):
                            raise TypeError(f"question '{qa['id']}': answer text {json.dumps(ans['text'])} is not a string")
                    if qa["id"] in seen:
                        raise ValueError(f"duplicate question id '{qa['id']}'")
                    seen.add(qa["id"])
                    questions.append({
                        "id": qa["id"], "title": article.get("title", ""), "context": context,
                        "question": qa["question"],
                        "answers": [ans["text"] for ans in answers],
                        "answer_starts": [int(ans.get("answer_start", -1)) for ans in answers],
                    })
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{path}: record {where}: {detail}") from None
    return questions


XLSUM_FIELDS = ("id", "url", "title", "summary", "text")


def jsonl_objects(path, what, lines=None):
    """(line number, object) for each non-empty line of a jsonl file; a line that is not a JSON
    object is an error naming it."""
    for line_no, line in (lines if lines is not None else _read_lines(path)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg}); expected {what}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object ({what})")
        yield line_no, row


def iter_xlsum(path):
    """XL-Sum jsonl records (one {id, url, title, summary, text} object per line) one at a time, checked."""
    seen = {}
    for line_no, record in jsonl_objects(path, "XL-Sum jsonl"):
        missing = [k for k in ("id", "summary", "text") if not isinstance(record.get(k), str)]
        if missing:
            raise DataError(f"{path}:{line_no}: missing or non-string field(s) {', '.join(missing)}")
        if record["id"] in seen:
            raise DataError(f"{path}:{line_no}: duplicate id '{record['id']}' (first on line {seen[record['id']]})")
        seen[record["id"]] = line_no
        yield {k: record.get(k, "") for k in XLSUM_FIELDS}


def read_xlsum(path, limit=None):
    """Read XL-Sum jsonl into a list, at most `limit` records."""
    return list(itertools.islice(iter_xlsum(path), limit))


def iter_text(path):
    """Raw monolingual text, one paragraph per line, stripped; blank lines skipped."""
    for _, line in _read_lines(path):
        if line.strip():
            yield line.strip()


def read_text(path, limit=None):
    return list(itertools.islice(iter_text(path), limit))


def read_references(task, path, limit=None):
    """A task's references from its official file: QA questions (read_squad) or XL-Sum records."""
    return get_task(task).format.read(path, limit)


def _read_squad_limit(path, limit=None):
    references = read_squad(path)
    return references[:limit] if limit is not None else references


PREDICTIONS_FORMAT = "{id: text} JSON, or jsonl with one {\"id\", \"prediction\"} object per line"


def read_predictions(path):
    """Predictions as {id: text} JSON, or jsonl with one {"id", "prediction"} object per line.
    An id given twice is an error (which one would count?)."""
    lines = list(_read_lines(path))
    text = "".join(line for _, line in lines)

    def unique_keys(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            duplicate = next(k for k in keys if keys.count(k) > 1)
            raise DataError(f"{path}: prediction id '{duplicate}' is given twice")
        return dict(pairs)
    try:
        obj = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError:
        obj = None  # not one JSON document: read it as jsonl below
    if isinstance(obj, dict) and set(obj) != {"id", "prediction"}:  # (a one-line jsonl is read below)
        bad = [k for k, v in obj.items() if not isinstance(v, str)]
        if bad:
            raise DataError(f"{path}: prediction for id '{bad[0]}' is not a string (expected {PREDICTIONS_FORMAT})")
        return obj
    if obj is not None and not isinstance(obj, dict):
        raise DataError(f"{path}: expected {PREDICTIONS_FORMAT}, got a JSON {type(obj).__name__}")
    predictions, first_line = {}, {}
    for line_no, row in jsonl_objects(path, PREDICTIONS_FORMAT, lines):
        if not isinstance(row.get("prediction"), str) or "id" not in row:
            raise DataError(f"{path}:{line_no}: expected an object with 'id' and a string 'prediction'")
        if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):  # str(None) would be the id "None"
            raise DataError(f"{path}:{line_no}: id {json.dumps(row['id'])} is not a string or an integer")
        key = str(row["id"])
        if key in predictions:
            raise DataError(f"{path}:{line_no}: prediction id '{key}' is given twice (first on line {first_line[key]})")
        predictions[key], first_line[key] = row["prediction"], line_no
    return predictions


# Where each file lives below a data directory (the layout `python download.py` writes).

def xquad_path(data_dir, lang):
    return os.path.join(data_dir, "xquad", f"xquad.{lang}.json")


def squad_path(data_dir, split):
    """SQuAD v1.1 `train` or `dev`; offline, `train` falls back to the stand-in of ../shared/data."""
    for name in (f"{split}-v1.1.json", f"{split}-v1.1.json.gz", f"{split}-standin-v1.1.json.gz"):
        path = os.path.join(data_dir, "squad", name)
        if os.path.isfile(path):
            return path
    return os.path.join(data_dir, "squad", f"{split}-v1.1.json")


def xlsum_path(xlsum_dir, lang, split):
    """XL-Sum `train`/`val`/`test` jsonl of a language, as download.py unpacks it into DATA/xlsum."""
    folder = get_language(lang).xlsum
    if folder is None:
        raise UsageError(f"--task xlsum: XL-Sum has no data for '{lang}'")
    return os.path.join(xlsum_dir, f"{folder}_{split}.jsonl")


def text_path(data_dir, lang):
    return os.path.join(data_dir, "text", f"{lang}.txt")


def gum_path(data_dir):
    """141 English documents with human one-sentence summaries in XL-Sum format (../shared/data)."""
    return os.path.join(data_dir, "summarization", "gum_en.jsonl")


def task_file(task, split, lang, data_dir, xlsum_dir=None):
    """The file of a task's split in a language (the task's `files`): e.g. XQuAD / SQuAD JSON, or
    XL-Sum jsonl in xlsum_dir (default DATA/xlsum)."""
    return get_task(task).files(split, lang, data_dir, xlsum_dir)


def squad_dev_heldout(data_dir, path, size=XQUAD_SIZE):
    """Write to `path` a held-out slice of SQuAD v1.1 dev in English: its first `size` questions
    (XQuAD's size) from the paragraphs XQuAD does not use (XQuAD translates 240 SQuAD dev
    paragraphs, so those are its test set). English validation for XQuAD, and, translated,
    translate-train's validation per language (no XQuAD validation set exists in the target languages)."""
    xquad_ids = {q["id"] for q in read_squad(xquad_path(data_dir, "en"))}
    raw = read_json_document(squad_path(data_dir, "dev"), "SQuAD v1.1 JSON")
    articles, count = [], 0
    for article in raw["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if count >= size or any(qa["id"] in xquad_ids for qa in paragraph["qas"]):
                continue
            qas = paragraph["qas"][:size - count]
            paragraphs.append({"context": paragraph["context"], "qas": qas})
            count += len(qas)
        if paragraphs:
            articles.append({"title": article.get("title", ""), "paragraphs": paragraphs})
    common.write_json(path, {"version": "1.1", "held_out_from": "SQuAD v1.1 dev minus XQuAD's paragraphs",
                             "data": articles})
    return path


# -----------------------------------------------------------------------------
# 3. Task formatting (paper Section 3 and Appendix A)

@dataclasses.dataclass
class Example:
    """One seq2seq example before tokenisation.

    `source_tail` is text that must survive truncation (the QA question, appended at the end of
    the paragraph): when the source is too long, `source` is cut, never `source_tail`.
    """
    id: str
    source: str
    target: str
    src_lang: str
    tgt_lang: str
    source_tail: str = ""
    references: list = dataclasses.field(default_factory=list)


def qa_examples(questions, lang):
    """QA: paragraph with the question appended at its end -> the first gold answer (all kept)."""
    return [Example(id=q["id"], source=q["context"], source_tail=q["question"], target=q["answers"][0],
                    src_lang=lang, tgt_lang=lang, references=list(q["answers"])) for q in questions]


def summarization_examples(records, lang):
    """Summarisation: article -> summary."""
    return [Example(id=r["id"], source=r["text"], target=r["summary"], src_lang=lang, tgt_lang=lang,
                    references=[r["summary"]]) for r in records]


def task_examples(task, references, lang):
    """Examples of a task from its references (read_references)."""
    return get_task(task).format.examples(references, lang)


def first_questions(task, data_dir, task_dir, path, num):
    """QA guard examples: the first question of each of the first `num` paragraphs of the English
    test file (one per paragraph, so the sources differ in more than their question), SQuAD format."""
    raw = read_json_document(task_file(task, "test", "en", data_dir, task_dir), "SQuAD-format JSON")
    paragraphs = [(a["title"], p) for a in raw["data"] for p in a["paragraphs"]][:num]
    common.write_json(path, {"version": "1.1", "data": [
        {"title": title, "paragraphs": [{"context": p["context"], "qas": p["qas"][:1]}]} for title, p in paragraphs]})


def first_records(task, data_dir, task_dir, path, num):
    """Summarisation guard examples: the first `num` records of the English validation file."""
    common.write_jsonl(path, read_xlsum(task_file(task, "val", "en", data_dir, task_dir), limit=num))


KINDS = {"qa": Kind(read=_read_squad_limit, iterate=lambda path: iter(read_squad(path)), examples=qa_examples,
                    extension="json", guard_examples=first_questions, input_fields=("context", "question"),
                    reference_field="answers",
                    input_format="the paragraph, then the question (tokenized apart and joined: the same ids as "
                                 "`tokenizer(paragraph + \" \" + question)` for a source that is not cut); a source longer "
                                 "than the model's maximum is cut in the paragraph, never in the question",
                    input_expression="paragraph + \" \" + question"),
         "summarization": Kind(read=read_xlsum, iterate=iter_xlsum, examples=summarization_examples, extension="jsonl",
                               guard_examples=first_records, input_fields=("text",), reference_field="summary",
                               input_format="the article; a longer one is cut at its end", input_expression="article",
                               rouge_modes=True)}


# -----------------------------------------------------------------------------
# 4. Self-supervised examples from raw text, and sentence splitting

# Abbreviations after which a full stop does not end a sentence (lower-cased, without the dot).
ABBREVIATIONS = {
    "dr", "mr", "mrs", "ms", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "u.s", "u.k", "u.n",
    "no", "fig", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "mt", "gen", "col", "lt", "sgt", "capt", "gov", "sen", "rep", "approx",
    "cf", "al", "ca", "p", "pp", "vol", "ed", "eds", "art", "nr", "bzw", "z.b", "usw", "mme", "mlle",
    "av", "sra", "dra", "dña", "nr", "z.b", "г", "гг", "им", "т.е", "т.д", "т.к", "др", "ул", "стр", "чел",
    "букв", "англ", "см", "тыс", "млн", "млрд", "руб", "проф", "св",
}
_SENTENCE_END = re.compile(r"([.!?؟…]+[\"'”’»)\]]*)(\s+)|([。！？][。！？」』”’）]*)")


def split_sentences(text):
    """Split a paragraph into sentences, keeping every character.

    A break follows `.`, `!`, `?`, `؟` or `…` (plus closing quotes/brackets) and whitespace, or a CJK
    full stop `。！？` (no space needed). No break after a known abbreviation ("Dr.", "U.S."), a
    single capital initial ("J. Smith"), or inside a number ("3.5" has no space after the dot).
    `"".join(split_sentences(t)) == t`.
    """
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if match.group(1):  # Western punctuation followed by whitespace
            word = text[start:match.start()].split()[-1:] or [""]
            last_word = re.sub(r"^[\"'“‘«(\[]+", "", word[0]).lower()
            if match.group(1) == "." and (last_word in ABBREVIATIONS or re.fullmatch(r"\w", last_word)):
                continue
            next_char = text[match.end():match.end() + 1]
            if next_char and next_char.islower():  # "approx. five", "enfin... les", "Yahoo! is": no end
                continue
            end = match.end(1) + len(match.group(2))
        else:
            end = match.end()
        if text[start:end].strip():
            sentences.append(text[start:end])
            start = end
    if start < len(text):
        if sentences and not any(ch.isalnum() for ch in text[start:]):  # trailing space or a lone quote
            sentences[-1] += text[start:]
        else:
            sentences.append(text[start:])
    return sentences


def prefix_lm_example(text, lang, rng, id_=""):
    """Prefix-LM (Vu et al. 2022; paper Section 3): input = beginning, target = continuation.

    The split point is drawn uniformly among word boundaries (character boundaries for zh/ja/th)
    so that both sides are non-empty. Returns None for a text too short to split.
    """
    if not get_language(lang).spaces:
        points = list(range(1, len(text)))
    else:
        points = [m.start() for m in re.finditer(r"\s+", text.strip())]
        text = text.strip()
    if not points:
        return None
    cut = points[int(rng.integers(len(points)))]
    source, target = text[:cut].strip(), text[cut:].strip()
    if not source or not target:
        return None
    return Example(id=id_, source=source, target=target, src_lang=lang, tgt_lang=lang)


def zmbart_example(text, lang, rng, id_="", ratio=0.2):
    """ZmBART-like objective (Maurya et al. 2021; paper Appendix B): from a chunk of text, generate
    randomly chosen sentences of it (about `ratio` of them, at least one, in their original order)."""
    sentences = [s.strip() for s in split_sentences(text) if s.strip()]
    if not sentences:
        return None
    k = max(1, round(ratio * len(sentences)))
    chosen = sorted(rng.choice(len(sentences), size=k, replace=False).tolist())
    joiner = " " if get_language(lang).spaces else ""
    return Example(id=id_, source=text.strip(), target=joiner.join(sentences[i] for i in chosen),
                   src_lang=lang, tgt_lang=lang)


# The base models' own pretraining tasks (paper Appendix C mixes them in), on words -- characters in
# languages written without spaces, as prefix_lm_example cuts -- and made as text: the sentinel and
# mask strings below are special tokens of the real tokenizers (mT5's 100 <extra_id_N>; mBART-50's
# and NLLB's <mask>), so the tokenizer turns each into its one id.
SPAN_SENTINEL = "<extra_id_{}>"
MASK_TOKEN = "<mask>"


def _units(text, lang):
    """(units, joiner): the words of a text, or its characters where the language has no spaces."""
    if get_language(lang).spaces:
        return text.split(), " "
    return list(text.strip()), ""


def random_spans_noise_mask(length, rng, noise_density=0.15, mean_noise_span_length=3.0):
    """T5's span-corruption mask (Raffel et al. 2020, t5.data.preprocessors.random_spans_noise_mask):
    round(length * noise_density) noise units (at least 1, at most length - 1) in
    round(noise / mean_noise_span_length) spans (at least 1); the noise and the non-noise units are
    each cut into that many non-empty spans at random, interleaved starting with non-noise, so the
    sequence never starts with noise and always ends with it. Returns a boolean array, True = noise."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)

    def segment_lengths(num_items, num_segments):  # a random partition into non-empty segments
        starts = np.zeros(num_items, dtype=bool)
        starts[1 + rng.permutation(num_items - 1)[:num_segments - 1]] = True
        return np.bincount(np.cumsum(starts), minlength=num_segments)

    noise = segment_lengths(num_noise, num_spans)
    keep = segment_lengths(length - num_noise, num_spans)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for kept, noisy in zip(keep, noise):
        position += kept
        mask[position:position + noisy] = True
        position += noisy
    return mask


def span_corruption(units, mask, joiner=" "):
    """(source, target) of T5's span corruption for a noise mask: each noise span is replaced by the
    next sentinel in the source; the target lists each sentinel followed by the span it replaced
    (T5 replaces the non-noise spans of the target with the same sentinels, in the same order).

    units "a b c d e f g", noise at c d and g -> source "a b <extra_id_0> e f <extra_id_1>",
    target "<extra_id_0> c d <extra_id_1> g"."""
    source, target, sentinel = [], [], 0
    for i, unit in enumerate(units):
        if not mask[i]:
            source.append(unit)
            continue
        if i == 0 or not mask[i - 1]:  # a span starts
            source.append(SPAN_SENTINEL.format(sentinel))
            target.append(SPAN_SENTINEL.format(sentinel))
            sentinel += 1
        target.append(unit)
    return joiner.join(source), joiner.join(target)


def span_corruption_example(text, lang, rng, id_=""):
    """mT5's pretraining task (span corruption, 15% noise in spans of mean length 3): the source
    keeps the text with each noised span replaced by a sentinel, the target gives the spans back.
    None for a text of fewer than two units."""
    units, joiner = _units(text, lang)
    if len(units) < 2:
        return None
    source, target = span_corruption(units, random_spans_noise_mask(len(units), rng), joiner)
    return Example(id=id_, source=source, target=target, src_lang=lang, tgt_lang=lang)


def permute_sentences(sentences, order):
    """Sentence permutation (mBART): the sentences in the given order."""
    return [sentences[i] for i in order]


def text_infilling(units, spans):
    """Text infilling (BART, as mBART's pretraining runs it: one <mask> per span): each (start,
    length) span of units is replaced by a single <mask>; a span of length 0 inserts a <mask> before
    `start`; spans that overlap or touch become one <mask>.

    units "a b c d e f", spans (1, 2) and (5, 0) -> "a <mask> d e <mask> f"."""
    masked = np.zeros(len(units), dtype=bool)
    inserts = set()
    for start, length in spans:
        if length == 0:
            inserts.add(start)
        masked[start:start + length] = True
    out = []
    for i, unit in enumerate(units):
        if i in inserts and not (out and out[-1] == MASK_TOKEN):
            out.append(MASK_TOKEN)
        if masked[i]:
            if not (out and out[-1] == MASK_TOKEN):
                out.append(MASK_TOKEN)
            continue
        out.append(unit)
    return out


def mbart_denoising_example(text, lang, rng, id_="", mask_ratio=0.35, poisson_lambda=3.5):
    """mBART's pretraining task (Liu et al. 2020): the sentences of the text permuted, then 35% of
    its units masked in spans of Poisson(3.5) length, each span one <mask> (text infilling); the
    target is the original text. Span lengths are drawn until they cover ceil(35%) of the units (the
    last one cut to fit), each span starting at a unit drawn without replacement. None for an empty text."""
    sentences = [s.strip() for s in split_sentences(text) if s.strip()]
    if not sentences:
        return None
    joiner = " " if get_language(lang).spaces else ""
    permuted = joiner.join(permute_sentences(sentences, rng.permutation(len(sentences))))
    units, joiner = _units(permuted, lang)
    to_mask = int(np.ceil(mask_ratio * len(units)))
    lengths = []
    while sum(lengths) < to_mask:
        lengths.append(int(rng.poisson(poisson_lambda)))
    if lengths:
        lengths[-1] -= sum(lengths) - to_mask
    starts = rng.choice(len(units), size=min(len(lengths), len(units)), replace=False)
    source = joiner.join(text_infilling(units, list(zip(starts.tolist(), lengths))))
    return Example(id=id_, source=source, target=joiner.join(sentences), src_lang=lang, tgt_lang=lang)


SELF_SUPERVISED_OBJECTIVES = {"prefix_lm": prefix_lm_example, "zmbart": zmbart_example,
                              "span_corruption": span_corruption_example, "mbart_denoising": mbart_denoising_example}
OBJECTIVE_LABEL = {"prefix_lm": "Prefix-LM", "zmbart": "ZmBART-like", "span_corruption": "span-corruption",
                   "mbart_denoising": "mBART-denoising"}  # how messages name them
# The special token an objective's examples need in the tokenizer (checked before training)
OBJECTIVE_TOKEN = {"span_corruption": SPAN_SENTINEL.format(0), "mbart_denoising": MASK_TOKEN}


def iter_self_supervised(paragraphs, lang, objective="prefix_lm", seed=0):
    """One self-supervised example per paragraph (those too short to split are skipped), seeded, one at a time."""
    if objective not in SELF_SUPERVISED_OBJECTIVES:
        raise UsageError(f"--objective: unknown objective '{objective}'; "
                        f"choose from {', '.join(SELF_SUPERVISED_OBJECTIVES)}")
    make = SELF_SUPERVISED_OBJECTIVES[objective]
    rng = np.random.default_rng([seed, sum(map(ord, lang))])
    examples = (make(text, lang, rng, id_=f"{lang}-{i}") for i, text in enumerate(paragraphs))
    return (ex for ex in examples if ex is not None)


def self_supervised_examples(paragraphs, lang, objective="prefix_lm", seed=0):
    return list(iter_self_supervised(paragraphs, lang, objective, seed))


class PrefixLMExamples:
    """Prefix-LM examples made in token space from cached paragraphs, as batches need them.

    `paragraphs`: EncodedExamples of raw paragraph ids (token_cache.text; src_lengths = paragraph
    lengths). One cut per paragraph, drawn once from (seed, lang) among its word starts -- tokens
    whose piece begins with "▁", so the split falls on a space as prefix_lm_example's does; any token
    boundary in a language written without spaces -- never right after a lone "▁" piece (that side
    would decode to nothing). Paragraphs with no such cut are skipped. Only the cut (and the lengths)
    is kept per example; examples[i] encodes  [prefix] para[:cut] [</s>]  ->  [prefix] para[cut:] [</s>]
    with the encoder's affixes and maximum lengths (Seq2SeqEncoder.encode_ids), so src_lengths and
    tgt_lengths are known without reading a token (TokenBatches batches on them)."""

    CHUNK_TOKENS = 1 << 22  # paragraphs are read in groups of about this many tokens (16 MB)

    def __init__(self, paragraphs, lang, encoder, seed=0, rows=None, cuts=None):
        self.paragraphs, self.lang, self.encoder = paragraphs, lang, encoder
        if rows is None:
            rows, cuts = self._draw_cuts(paragraphs, get_language(lang).spaces, encoder.word_starts, seed, lang)
        self.rows, self.cuts = rows, cuts
        prefix, suffix = encoder.affixes(lang)
        room = encoder.max_source_length - len(prefix) - len(suffix)
        lengths = paragraphs.src_lengths[rows].astype(np.int64)
        target = len(prefix) + (lengths - cuts) + len(suffix)
        self.src_lengths = np.minimum(len(prefix) + np.minimum(cuts, room) + len(suffix),
                                      encoder.max_source_length).astype(np.int32)
        self.tgt_lengths = np.minimum(target, encoder.max_target_length).astype(np.int32)
        self.flags = ((cuts > room).astype(np.uint8) | (target > encoder.max_target_length).astype(np.uint8) << 1)

    @classmethod
    def _draw_cuts(cls, paragraphs, spaces, word_starts, seed, lang):
        """(rows, cuts): the paragraphs that can be split and the token position of each one's split."""
        is_word_start, spacer = word_starts
        rng = np.random.default_rng([seed, sum(map(ord, lang))])
        rows, cuts, start, num = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0, len(paragraphs)
        while start < num:  # a group of whole paragraphs, about CHUNK_TOKENS tokens
            first = int(paragraphs.offsets[start])
            stop = max(start + 1, int(np.searchsorted(paragraphs.offsets, first + cls.CHUNK_TOKENS)))
            lengths = paragraphs.src_lengths[start:stop].astype(np.int64)
            ids = paragraphs.tokens.read(first, int(paragraphs.offsets[stop - 1]) - first + int(lengths[-1]))
            begin = paragraphs.offsets[start:stop] - first                      # each paragraph's first token
            ok = is_word_start[ids] if spaces else np.ones(len(ids), dtype=bool)  # where a cut may go
            ok[1:] &= ids[:-1] != spacer
            nonempty = lengths > 0
            ok[begin[nonempty]] = False                                         # not before the first token
            counts = np.zeros(stop - start, np.int64)
            if nonempty.any():
                counts[nonempty] = np.add.reduceat(ok.astype(np.int64), begin[nonempty])
            u = rng.random(stop - start)
            choice = np.minimum((u * counts).astype(np.int64), np.maximum(counts - 1, 0))  # the k-th cut point
            seen = np.cumsum(ok)                                                # cut points up to each token
            before = np.concatenate([[0], seen])[begin]                         # ... before each paragraph
            where = np.searchsorted(seen, before + choice + 1)                  # position of the (k+1)-th
            keep = counts > 0
            rows.append(np.arange(start, stop)[keep])
            cuts.append((where - begin)[keep])
            start = stop
        return np.concatenate(rows).astype(np.int32), np.concatenate(cuts).astype(np.int32)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        para = self.paragraphs[int(self.rows[i])]["input_ids"]
        cut = int(self.cuts[i])
        input_ids, labels, _ = self.encoder.encode_ids(para[:cut], [], para[cut:], self.lang, self.lang)
        return {"input_ids": input_ids, "labels": labels}

    def subset(self, start, stop=None):
        part = slice(start, stop)
        return PrefixLMExamples(self.paragraphs, self.lang, self.encoder, rows=self.rows[part], cuts=self.cuts[part])

    def stats(self):
        return cut_stats(self.flags)


# -----------------------------------------------------------------------------
# 5. Token-budget batching (fairseq `data_utils.batch_by_size` semantics)
#
# An example costs num_tokens = max(source length, target length), as in fairseq. Examples are
# sorted by length, then cut into batches greedily so that a batch's padded size,
# num_examples * max(num_tokens in batch), never exceeds max_tokens:
#
#   sorted by length:  [s s s s s s][m m m m][l l l][x x]      <- each [] is one batch
#   padded size:        6 x 600     4 x 900  3 x 1200 2 x 1900   all <= max_tokens (4000)
#
# Within a length class ties are broken by a seeded permutation, so each epoch builds different
# batches; the batch order is then shuffled with the same seeded RNG. An example longer than
# max_tokens on its own is truncated to max_tokens (it could never fit otherwise); how many were
# cut is counted and reported.

def truncate(ids, max_len):
    """Cut a token list to `max_len`, keeping its last token (</s>) at the end."""
    if len(ids) <= max_len:
        return ids
    return ids[:max_len - 1] + ids[-1:]


def collate(encoded, pad_token_id):
    """Pad a list of {"input_ids", "labels"} into tensors; labels are padded with -100 (ignored)."""
    num = len(encoded)
    max_src = max(len(e["input_ids"]) for e in encoded)
    max_tgt = max(len(e["labels"]) for e in encoded)
    input_ids = torch.full((num, max_src), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((num, max_src), dtype=torch.long)
    labels = torch.full((num, max_tgt), -100, dtype=torch.long)
    for i, e in enumerate(encoded):
        input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attention_mask[i, :len(e["input_ids"])] = 1
        labels[i, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# Shape buckets: a size is rounded up to a ladder of `per_octave` sizes an octave (decode.py: 4 for
# generation). Training (--compile) pads rows to 8 sizes an octave and lengths to multiples of 8 up
# to 64, then 8 sizes an octave (all multiples of 8, as tensor cores like): on the SQuAD stand-in at
# 4000 tokens, 151 shapes an epoch instead of 641 and a padding efficiency of 0.91 instead of 0.96
# (tests/test_data.py).
TRAIN_BUCKETS = {"rows": (8, 1), "length": (8, 8)}   # (sizes an octave, multiple below 8 of them)
TRAIN_MIN_ROWS = 2   # a batch of one row is padded to two: torch.compile specializes a size of 1 (a graph of its own)


def bucket(n, per_octave=4, multiple=1):
    """The smallest size of the ladder that holds n: multiples of `multiple` up to multiple x
    per_octave, then per_octave sizes an octave. per_octave 4: 1, 2, ..., 8, 10, 12, 14, 16, 20, 24, ...;
    per_octave 8, multiple 8: 8, 16, ..., 64, 72, 80, ..., 128, 144, ..."""
    if n <= per_octave * multiple:
        return -(-n // multiple) * multiple
    octave = 2 ** (n.bit_length() - 1)
    return next(size for size in (math.ceil(octave * (1 + k / per_octave)) for k in range(per_octave + 1))
                if size >= n)


def train_shape(rows, src_len, tgt_len):
    """The bucketed (rows, source length, target length) of a training batch (TRAIN_BUCKETS, at
    least TRAIN_MIN_ROWS rows)."""
    return (max(TRAIN_MIN_ROWS, bucket(rows, *TRAIN_BUCKETS["rows"])), bucket(src_len, *TRAIN_BUCKETS["length"]),
            bucket(tgt_len, *TRAIN_BUCKETS["length"]))


def pad_to_buckets(batch, pad_token_id):
    """A collated batch padded to its train_shape: empty rows (no source token, every label -100),
    padding after each source and target. The loss is the same sum over the same target tokens; the
    training step sees few shapes, so a compiled step is reused (--compile).

        rows x source x target   9 x 37 x 5  ->  9 x 40 x 8
                                 17 x 230 x 3 -> 18 x 240 x 8   (one empty row)
                                 1 x 300 x 12 ->  2 x 320 x 16  (one empty row: TRAIN_MIN_ROWS)
    """
    rows, src_len = batch["input_ids"].shape
    rows_to, src_to, tgt_to = train_shape(rows, src_len, batch["labels"].shape[1])
    shape = {"input_ids": (rows_to, src_to), "attention_mask": (rows_to, src_to), "labels": (rows_to, tgt_to)}
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    padded = {}
    for key, tensor in batch.items():
        out = tensor.new_full(shape[key], fill[key])
        out[:tensor.shape[0], :tensor.shape[1]] = tensor
        padded[key] = out
    return padded


def num_tokens(example):
    return max(len(example["input_ids"]), len(example["labels"]))


class ArrayTokens:
    """Token ids in RAM, with the read(start, count) of a token cache's file (token_cache.TokenFile)."""

    def __init__(self, ids):
        self.ids = np.asarray(ids, dtype=np.int32)

    def read(self, start, count):
        return self.ids[start:start + count]


class EncodedExamples:
    """Encoded examples as one flat array of token ids plus, per example, where it starts and how long
    its two sides are -- the layout of fairseq's binarized datasets:

        tokens:   [ src 0 ...... | tgt 0 .. | src 1 .... | tgt 1 . | src 2 ... ]
        offsets:    ^ 0                       ^ 1                    ^ 2          (int64)
        src_lengths, tgt_lengths                                                 (int32)

    Only offsets, lengths and cut flags are in RAM (17 bytes an example); `tokens` is an ArrayTokens
    or a token cache's file, read when a batch is built. `flags`: bit 0 set where the source was cut
    to the model's maximum length, bit 1 where the target was. examples[i] -> {"input_ids", "labels"}.
    """

    def __init__(self, tokens, src_lengths, tgt_lengths, flags=None, offsets=None):
        self.tokens = tokens
        self.src_lengths = np.asarray(src_lengths, dtype=np.int32)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int32)
        self.flags = np.zeros(len(self.src_lengths), np.uint8) if flags is None else np.asarray(flags, np.uint8)
        if offsets is None:
            offsets = np.concatenate([[0], np.cumsum(self.src_lengths + self.tgt_lengths, dtype=np.int64)[:-1]])
        self.offsets = np.asarray(offsets, dtype=np.int64)[:len(self.src_lengths)]

    @classmethod
    def from_lists(cls, encoded, flags=None):
        """From [{"input_ids", "labels"}] (Seq2SeqEncoder.encode's output)."""
        ids = [i for e in encoded for i in e["input_ids"] + e["labels"]]
        return cls(ArrayTokens(ids), [len(e["input_ids"]) for e in encoded], [len(e["labels"]) for e in encoded], flags)

    def __len__(self):
        return len(self.src_lengths)

    def __getitem__(self, i):
        src, tgt = int(self.src_lengths[i]), int(self.tgt_lengths[i])
        ids = self.tokens.read(int(self.offsets[i]), src + tgt).tolist()
        return {"input_ids": ids[:src], "labels": ids[src:]}

    def subset(self, start, stop=None):
        """Examples start..stop-1 (a view: the token ids are not copied)."""
        part = slice(start, stop)
        return EncodedExamples(self.tokens, self.src_lengths[part], self.tgt_lengths[part], self.flags[part],
                               self.offsets[part])

    def stats(self):
        return cut_stats(self.flags)


def cut_stats(flags):
    """What Seq2SeqEncoder.encode's `stats` holds, from per-example cut flags (bit 0 source, bit 1 target)."""
    return {"num_examples": len(flags), "num_cut_sources": int((flags & 1).astype(bool).sum()),
            "num_cut_targets": int((flags & 2).astype(bool).sum())}


def as_examples(encoded):
    """EncodedExamples (or PrefixLMExamples) as they are; a list of {"input_ids", "labels"} converted."""
    return encoded if hasattr(encoded, "src_lengths") else EncodedExamples.from_lists(encoded)


def batch_by_size(lengths, max_tokens, order):
    """Greedy fairseq-style batching of `order` (length-sorted indices, an array) under `max_tokens`;
    lengths[i] = num_tokens of example i. Returns the start of each batch in `order` (and len(order)):
    batch k is order[starts[k]:starts[k + 1]]."""
    starts, size, batch_max, position = [0], 0, 0, 0
    for block in range(0, len(order), 1 << 16):  # as Python ints a block at a time (not a list per example)
        for length in lengths[order[block:block + (1 << 16)]].tolist():
            new_max = max(batch_max, length)
            if size and new_max * (size + 1) > max_tokens:
                starts.append(position)
                size, new_max = 0, length
            size += 1
            batch_max = new_max
            position += 1
    starts.append(len(order))
    return np.array(starts, dtype=np.int64)


class _BudgetView:
    """examples[i] cut to the batch budget (what a TokenBatches collates)."""

    def __init__(self, examples, max_tokens):
        self.examples, self.max_tokens = examples, max_tokens

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        e = self.examples[i]
        return {"input_ids": truncate(e["input_ids"], self.max_tokens), "labels": truncate(e["labels"], self.max_tokens)}


class TokenBatches:
    """Endless, seeded, resumable stream of token-budget batches over encoded examples.

    `encoded`: EncodedExamples (e.g. from the token cache), PrefixLMExamples, or a list of
    {"input_ids", "labels"}. Only lengths are held per example; ids are read in `collate`.
    `next()` returns a list of example indices; `collate(indices)` the padded tensors.
    `state_dict()` / `load_state_dict()` save and restore (epoch, position) exactly.
    `num_truncated`: how many examples were cut to fit `max_tokens` on their own.
    """

    def __init__(self, encoded, max_tokens=4000, seed=0, shuffle=True, name="task"):
        if max_tokens < 1:
            raise UsageError(f"--max-tokens: must be positive, got {max_tokens}")
        if not len(encoded):
            raise DataError(f"no examples to batch for stream '{name}'")
        examples = as_examples(encoded)
        self.num_truncated = int((np.maximum(examples.src_lengths, examples.tgt_lengths) > max_tokens).sum())
        self.src_lengths = np.minimum(examples.src_lengths, max_tokens)
        self.tgt_lengths = np.minimum(examples.tgt_lengths, max_tokens)
        self.encoded = _BudgetView(examples, max_tokens)
        self.max_tokens, self.seed, self.shuffle, self.name = max_tokens, seed, shuffle, name
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches(self.epoch)

    def _epoch_batches(self, epoch):
        """(order, starts, batch order) of an epoch: its k-th batch is order[starts[j]:starts[j + 1]] for
        j = batch_order[k] (arrays, 8 bytes an example, not a list of lists)."""
        rng = np.random.default_rng([self.seed, epoch])
        num = len(self.src_lengths)
        tiebreak = rng.permutation(num) if self.shuffle else np.arange(num)
        order = np.lexsort((tiebreak, self.tgt_lengths, self.src_lengths))  # by source, then target length, then random
        starts = batch_by_size(np.maximum(self.src_lengths, self.tgt_lengths), self.max_tokens, order)
        num_batches = len(starts) - 1
        batch_order = rng.permutation(num_batches) if self.shuffle else np.arange(num_batches)
        return order, starts, batch_order

    @staticmethod
    def _batch(batches, k):
        order, starts, batch_order = batches
        j = batch_order[k]
        return order[starts[j]:starts[j + 1]].tolist()

    def epoch_batches(self, epoch=0):
        """All batches of one epoch, in order (for inspection and tests)."""
        batches = self._epoch_batches(epoch)
        return [self._batch(batches, k) for k in range(len(batches[2]))]

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self._batches[2]):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batch(self._batches, self.position)
        self.position += 1
        return batch

    def collate(self, indices, pad_token_id):
        return collate([self.encoded[i] for i in indices], pad_token_id)

    def padding_efficiency(self, epoch=0, bucketed=False):
        """Real tokens / padded tokens over an epoch's source and target tensors (from the lengths);
        `bucketed`: with every batch padded to its train_shape (pad_to_buckets, --compile)."""
        order, starts, _ = self._epoch_batches(epoch)
        src, tgt = self.src_lengths[order].astype(np.int64), self.tgt_lengths[order].astype(np.int64)
        shapes = self.batch_shapes(epoch, bucketed)
        padded = (shapes[:, 0] * (shapes[:, 1] + shapes[:, 2])).sum()
        return float((src.sum() + tgt.sum()) / max(padded, 1))

    def batch_shapes(self, epoch=0, bucketed=False):
        """(rows, source length, target length) of each batch of an epoch, an array (batches, 3); with
        `bucketed`, each padded to its train_shape (pad_to_buckets)."""
        order, starts, _ = self._epoch_batches(epoch)
        src, tgt = self.src_lengths[order], self.tgt_lengths[order]
        shapes = np.stack([np.diff(starts), np.maximum.reduceat(src, starts[:-1]),
                           np.maximum.reduceat(tgt, starts[:-1])], axis=1).astype(np.int64)
        if bucketed:
            shapes = np.array([train_shape(*(int(n) for n in shape)) for shape in shapes], dtype=np.int64)
        return shapes.reshape(-1, 3)

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches(self.epoch)


class Mixture:
    """Draws each batch from one of several streams, chosen at random with fixed weights.

    Streams are TokenBatches or nested Mixtures, so the paper's mixing (Section 3) is
        Mixture({"task": (1 - p, task), "self_supervised": (p, Mixture.uniform(per_language))})
    and several source languages are Mixture.uniform({lang: TokenBatches, ...}).
    `next()` returns (path, indices), e.g. (("self_supervised", "fr"), [3, 17, 5]).
    """

    def __init__(self, streams, seed=0):
        self.names = list(streams)
        self.streams = [streams[name][1] for name in self.names]
        weights = np.array([streams[name][0] for name in self.names], dtype=float)
        if (weights < 0).any() or weights.sum() <= 0:
            raise UsageError(f"mixture weights must be non-negative with a positive sum: {weights.tolist()}")
        self.probs = weights / weights.sum()
        self.rng = np.random.default_rng(seed)

    @classmethod
    def uniform(cls, streams, seed=0):
        return cls({name: (1.0, stream) for name, stream in streams.items()}, seed=seed)

    def __iter__(self):
        return self

    def __next__(self):
        k = int(self.rng.choice(len(self.streams), p=self.probs))
        item = next(self.streams[k])
        if isinstance(self.streams[k], Mixture):
            path, indices = item
            return (self.names[k],) + path, indices
        return (self.names[k],), item

    def stream(self, path):
        """The TokenBatches at the end of a path returned by next()."""
        node = self
        for name in path:
            node = node.streams[node.names.index(name)]
        return node

    def leaves(self, prefix=()):
        """{path: TokenBatches} of every stream at the bottom of the tree."""
        out = {}
        for name, stream in zip(self.names, self.streams):
            if isinstance(stream, Mixture):
                out.update(stream.leaves(prefix + (name,)))
            else:
                out[prefix + (name,)] = stream
        return out

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state,
                "streams": {name: s.state_dict() for name, s in zip(self.names, self.streams)}}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        for name, stream in zip(self.names, self.streams):
            stream.load_state_dict(state["streams"][name])


def generation_batches(lengths, max_tokens, max_batch_size=256):
    """Batches for generation: indices sorted by source length, cut so that
    batch_size * longest source <= max_tokens and batch_size <= max_batch_size. Sorting puts
    sources of similar length together, so little of each batch is padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, batch = [], []
    for i in order:
        if batch and ((len(batch) + 1) * lengths[i] > max_tokens or len(batch) >= max_batch_size):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches
