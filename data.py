"""Data handling for xlgen: languages, readers, task formatting, encoding, self-supervision, batching.

Every stage imports this module; nothing else reads data files or builds batches.

    python data.py smoke --model tiny-mt5 --data-dir ../shared/data      # read, encode, batch, report
    python data.py download --data-dir data --tasks xquad,squad,xlsum    # official files (needs internet)

Sections:
  1. Language table           our code -> mBART-50 code, NLLB code, fastText label, XL-Sum folder
  2. Readers                  SQuAD/XQuAD JSON (.json or .json.gz), XL-Sum jsonl, raw text
  3. Task formatting          (paper Section 3) summarisation: article -> summary;
                              QA: paragraph + question appended at its end -> answer
  4. Self-supervised examples Prefix-LM (Vu et al. 2022) and the ZmBART-like objective (Appendix B)
  5. Encoding per family      mT5 / mBART-50 / NLLB: language codes, truncation, generation settings
  6. Token-budget batching    fairseq `batch_by_size` semantics, resumable, plus a stream mixer
  7. Download                 official XQuAD, SQuAD v1.1 and XL-Sum files
"""

import argparse
import dataclasses
import gzip
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request

import numpy as np
import torch


class DataError(ValueError):
    """Bad input data or arguments; the message is one line naming the file, line or flag."""


# -----------------------------------------------------------------------------
# 1. Language table
# Columns: mBART-50 code, NLLB-200 code, fastText lid.176 label, XL-Sum folder name.
# None means the resource does not cover the language (mBART-50 has no Greek; XL-Sum has no
# German, Romanian or Greek), and asking for it is an error, not a silent fallback.

@dataclasses.dataclass(frozen=True)
class Language:
    code: str           # our code: ISO 639-1, as in XQuAD file names
    name: str
    mbart: str | None   # facebook/mbart-large-50 language code
    nllb: str           # facebook/nllb-200-* language code (FLORES-200)
    fasttext: str       # label of lid.176 without the "__label__" prefix
    xlsum: str | None   # folder / file prefix in the XL-Sum v2.0 release


LANGUAGES = {lang.code: lang for lang in [
    Language("en", "English", "en_XX", "eng_Latn", "en", "english"),
    Language("fr", "French", "fr_XX", "fra_Latn", "fr", "french"),
    Language("es", "Spanish", "es_XX", "spa_Latn", "es", "spanish"),
    Language("ru", "Russian", "ru_RU", "rus_Cyrl", "ru", "russian"),
    Language("zh", "Chinese (simplified)", "zh_CN", "zho_Hans", "zh", "chinese_simplified"),
    Language("ko", "Korean", "ko_KR", "kor_Hang", "ko", "korean"),
    Language("ja", "Japanese", "ja_XX", "jpn_Jpan", "ja", "japanese"),
    Language("ar", "Arabic", "ar_AR", "arb_Arab", "ar", "arabic"),
    Language("de", "German", "de_DE", "deu_Latn", "de", None),
    Language("th", "Thai", "th_TH", "tha_Thai", "th", "thai"),
    Language("ro", "Romanian", "ro_RO", "ron_Latn", "ro", None),
    Language("vi", "Vietnamese", "vi_VN", "vie_Latn", "vi", "vietnamese"),
    Language("el", "Greek", None, "ell_Grek", "el", None),
    Language("hi", "Hindi", "hi_IN", "hin_Deva", "hi", "hindi"),
    Language("tr", "Turkish", "tr_TR", "tur_Latn", "tr", "turkish"),
]}

# Languages written without spaces between words: Prefix-LM splits them between characters.
UNSEGMENTED_SCRIPTS = {"zh", "ja", "th"}


def get_language(code, flag="--lang"):
    """Look up a language by our code; an unknown code is a one-line error listing the supported ones."""
    if code not in LANGUAGES:
        raise DataError(f"{flag}: unknown language '{code}'; supported: {', '.join(LANGUAGES)}")
    return LANGUAGES[code]


def parse_langs(text, flag="--langs"):
    """'fr,zh, ko' (or an already split list) -> ['fr', 'zh', 'ko'], each checked against the table."""
    items = text if isinstance(text, (list, tuple)) else text.split(",")
    codes = [c.strip() for c in items if c.strip()]
    if not codes:
        raise DataError(f"{flag}: empty language list")
    for code in codes:
        get_language(code, flag)
    return codes


# -----------------------------------------------------------------------------
# 2. Readers for the official formats

def _open_text(path):
    """Open .json/.jsonl/.txt, gzip-compressed when the name ends in .gz."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_squad(path):
    """Read SQuAD v1.1 / XQuAD JSON into a flat list of questions.

    Returns dicts {id, title, context, question, answers: [text, ...], answer_starts: [int, ...]},
    in file order, every gold answer kept (the metric takes the max over them).
    """
    try:
        with _open_text(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise DataError(f"{path}: not SQuAD JSON (expected an object with a 'data' list)")
    questions = []
    for a, article in enumerate(raw["data"]):
        where = f"data[{a}]"
        try:
            for p, paragraph in enumerate(article["paragraphs"]):
                where = f"data[{a}].paragraphs[{p}]"
                context = paragraph["context"]
                for q, qa in enumerate(paragraph["qas"]):
                    where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                    answers = qa["answers"]
                    if not isinstance(qa["id"], str) or not isinstance(qa["question"], str) or not answers:
                        raise TypeError("id/question must be strings and answers non-empty")
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


def read_xlsum(path, limit=None):
    """Read XL-Sum jsonl (one {id, url, title, summary, text} object per line), at most `limit` records."""
    records = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object")
            missing = [k for k in ("id", "summary", "text") if not isinstance(record.get(k), str)]
            if missing:
                raise DataError(f"{path}:{line_no}: missing or non-string field(s) {', '.join(missing)}")
            records.append({k: record.get(k, "") for k in XLSUM_FIELDS})
    return records


def read_text(path, limit=None):
    """Raw monolingual text, one paragraph per line; blank lines skipped."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    lines = []
    # Decoded line by line (not through a text stream) so an encoding error names its real line.
    with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
            if line:
                lines.append(line)
            if limit is not None and len(lines) >= limit:
                break
    return lines


# Where each task's files live below --data-dir (the layout of ../shared/data and of `download`).
def xquad_path(data_dir, lang):
    return os.path.join(data_dir, "xquad", f"xquad.{lang}.json")


def squad_path(data_dir, split):
    """SQuAD v1.1 `train` or `dev`; offline, `train` falls back to the stand-in of ../shared/data."""
    for name in (f"{split}-v1.1.json", f"{split}-v1.1.json.gz", f"{split}-standin-v1.1.json.gz"):
        path = os.path.join(data_dir, "squad", name)
        if os.path.isfile(path):
            return path
    return os.path.join(data_dir, "squad", f"{split}-v1.1.json")


def xlsum_path(data_dir, lang, split):
    """XL-Sum `train`/`val`/`test` jsonl of a language, as unpacked by `download`."""
    folder = get_language(lang).xlsum
    if folder is None:
        raise DataError(f"--lang: XL-Sum has no data for '{lang}'")
    return os.path.join(data_dir, "xlsum", f"{folder}_{split}.jsonl")


def text_path(data_dir, lang):
    return os.path.join(data_dir, "text", f"{lang}.txt")


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
    if lang in UNSEGMENTED_SCRIPTS:
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
    joiner = "" if lang in UNSEGMENTED_SCRIPTS else " "
    return Example(id=id_, source=text.strip(), target=joiner.join(sentences[i] for i in chosen),
                   src_lang=lang, tgt_lang=lang)


SELF_SUPERVISED_OBJECTIVES = {"prefix_lm": prefix_lm_example, "zmbart": zmbart_example}


def self_supervised_examples(paragraphs, lang, objective="prefix_lm", seed=0):
    """One self-supervised example per paragraph (those too short to split are skipped), seeded."""
    if objective not in SELF_SUPERVISED_OBJECTIVES:
        raise DataError(f"--objective: unknown objective '{objective}'; "
                        f"choose from {', '.join(SELF_SUPERVISED_OBJECTIVES)}")
    make = SELF_SUPERVISED_OBJECTIVES[objective]
    rng = np.random.default_rng([seed, sum(map(ord, lang))])
    examples = (make(text, lang, rng, id_=f"{lang}-{i}") for i, text in enumerate(paragraphs))
    return [ex for ex in examples if ex is not None]


# -----------------------------------------------------------------------------
# 5. Encoding per model family
#
#   family  source ids                    labels                       decoder start  forced 1st token
#   mt5     X </s>                        Y </s>                       <pad>          -
#   mbart   [src_code] X </s>             [tgt_code] Y </s>            </s>           [tgt_code]
#   nllb    [src_code] X </s>             [tgt_code] Y </s>            </s>           [tgt_code]
#
# mBART-50 and NLLB (non-legacy) tokenizers produce exactly these layouts; we take the prefix and
# suffix ids from the tokenizer itself (`prefix_tokens`, `suffix_tokens`) so we cannot drift from it.
# During training the model shifts the labels right behind the decoder start token, so the decoder
# reads "</s> [tgt_code] Y" and must predict "[tgt_code] Y </s>"; at generation the decoder starts
# from </s> and `forced_bos_token_id` makes the first generated token the target-language code.

FAMILY_MAX_LENGTH = {"mt5": 512, "mbart": 1024, "nllb": 512}  # paper Appendix A
MODEL_TYPE_TO_FAMILY = {"mt5": "mt5", "t5": "mt5", "mbart": "mbart", "m2m_100": "nllb"}


def family_of(config):
    """'mt5', 'mbart' or 'nllb' from a model config (or a config's model_type string)."""
    model_type = config if isinstance(config, str) else config.model_type
    if model_type not in MODEL_TYPE_TO_FAMILY:
        raise DataError(f"--model: unsupported model type '{model_type}'; "
                        f"supported: {', '.join(sorted(MODEL_TYPE_TO_FAMILY))}")
    return MODEL_TYPE_TO_FAMILY[model_type]


def language_code(family, lang):
    """The model's code for a language (None for mT5, which has no language codes)."""
    language = get_language(lang)
    if family == "mt5":
        return None
    code = language.mbart if family == "mbart" else language.nllb
    if code is None:
        raise DataError(f"--lang: {family} has no language code for '{lang}'")
    return code


def truncate(ids, max_len):
    """Cut a token list to `max_len`, keeping its last token (</s>) at the end."""
    if len(ids) <= max_len:
        return ids
    return ids[:max_len - 1] + ids[-1:]


class Seq2SeqEncoder:
    """Turns Examples into token ids for one model family, and knows how that family generates.

    >>> enc = Seq2SeqEncoder(tokenizer, "mbart")
    >>> enc.encode([example])[0]      # {"input_ids": [...], "labels": [...]}
    >>> enc.generation_kwargs("fr")   # {"decoder_start_token_id": 2, "forced_bos_token_id": ...}
    """

    def __init__(self, tokenizer, family, max_source_length=None, max_target_length=None):
        self.tokenizer = tokenizer
        self.family = family
        self.max_source_length = max_source_length or FAMILY_MAX_LENGTH[family]
        self.max_target_length = max_target_length or FAMILY_MAX_LENGTH[family]
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        # A language code that is not a token of the vocabulary would silently encode as <unk>.
        for code in family_language_codes(family):
            if tokenizer.convert_tokens_to_ids(code) in (None, tokenizer.unk_token_id):
                raise DataError(f"--model: tokenizer has no token for language code '{code}'")

    def _affixes(self, lang, side):
        """Special ids the tokenizer puts before/after a text of `lang` on the source or target side."""
        if self.family == "mt5":
            return [], [self.eos_token_id]
        code_id = self.tokenizer.convert_tokens_to_ids(language_code(self.family, lang))
        return [code_id], [self.eos_token_id]

    def _tokenize(self, texts):
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, examples):
        """Encode Examples to [{"input_ids", "labels"}], truncated to the family's maxima.

        For QA the paragraph is cut, not the question: source = [prefix] paragraph question [suffix].
        """
        bodies = self._tokenize([ex.source for ex in examples])
        tails = self._tokenize([ex.source_tail for ex in examples])
        targets = self._tokenize([ex.target for ex in examples])
        encoded = []
        for i, ex in enumerate(examples):
            prefix, suffix = self._affixes(ex.src_lang, "source")
            tail = tails[i] if ex.source_tail else []
            room = self.max_source_length - len(prefix) - len(suffix) - len(tail)
            body = bodies[i][:max(room, 0)]
            input_ids = truncate(prefix + body + tail + suffix, self.max_source_length)
            t_prefix, t_suffix = self._affixes(ex.tgt_lang, "target")
            labels = truncate(t_prefix + targets[i] + t_suffix, self.max_target_length)
            encoded.append({"input_ids": input_ids, "labels": labels})
        return encoded

    def generation_kwargs(self, tgt_lang):
        """What `model.generate` needs to produce text in `tgt_lang` for this family."""
        if self.family == "mt5":
            return {"decoder_start_token_id": self.pad_token_id}
        code_id = self.tokenizer.convert_tokens_to_ids(language_code(self.family, tgt_lang))
        return {"decoder_start_token_id": self.eos_token_id, "forced_bos_token_id": code_id}


def family_language_codes(family):
    """The language codes of our table that a family's tokenizer must have (none for mT5)."""
    if family == "mt5":
        return []
    codes = [lang.mbart if family == "mbart" else lang.nllb for lang in LANGUAGES.values()]
    return [code for code in codes if code is not None]


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


# -----------------------------------------------------------------------------
# 6. Token-budget batching (fairseq `data_utils.batch_by_size` semantics)
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
# max_tokens on its own is truncated to max_tokens (it could never fit otherwise).

def num_tokens(example):
    return max(len(example["input_ids"]), len(example["labels"]))


def batch_by_size(encoded, max_tokens, order):
    """Greedy fairseq-style batching of `order` (already length-sorted indices) under `max_tokens`."""
    batches, batch, batch_max = [], [], 0
    for idx in order:
        length = num_tokens(encoded[idx])
        new_max = max(batch_max, length)
        if batch and new_max * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, new_max = [], length
        batch.append(idx)
        batch_max = new_max
    if batch:
        batches.append(batch)
    return batches


def padding_efficiency(encoded, batches):
    """Real tokens / padded tokens over source and target tensors (1.0 = no padding)."""
    real = padded = 0
    for batch in batches:
        src = [len(encoded[i]["input_ids"]) for i in batch]
        tgt = [len(encoded[i]["labels"]) for i in batch]
        real += sum(src) + sum(tgt)
        padded += len(batch) * (max(src) + max(tgt))
    return real / max(padded, 1)


class TokenBatches:
    """Endless, seeded, resumable stream of token-budget batches over encoded examples.

    `next()` returns a list of example indices; `collate(indices)` the padded tensors.
    `state_dict()` / `load_state_dict()` save and restore (epoch, position) exactly.
    """

    def __init__(self, encoded, max_tokens=4000, seed=0, shuffle=True, name="task"):
        if max_tokens < 1:
            raise DataError(f"--max-tokens: must be positive, got {max_tokens}")
        if not encoded:
            raise DataError(f"no examples to batch for stream '{name}'")
        self.encoded = [
            {"input_ids": truncate(e["input_ids"], max_tokens), "labels": truncate(e["labels"], max_tokens)}
            for e in encoded]
        self.max_tokens, self.seed, self.shuffle, self.name = max_tokens, seed, shuffle, name
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches(self.epoch)

    def _epoch_batches(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        src = np.array([len(e["input_ids"]) for e in self.encoded])
        tgt = np.array([len(e["labels"]) for e in self.encoded])
        tiebreak = rng.permutation(len(self.encoded)) if self.shuffle else np.arange(len(self.encoded))
        order = np.lexsort((tiebreak, tgt, src))  # by source length, then target length, then random
        batches = batch_by_size(self.encoded, self.max_tokens, order.tolist())
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def epoch_batches(self, epoch=0):
        """All batches of one epoch, in order (for inspection and tests)."""
        return self._epoch_batches(epoch)

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def collate(self, indices, pad_token_id):
        return collate([self.encoded[i] for i in indices], pad_token_id)

    def padding_efficiency(self, epoch=0):
        return padding_efficiency(self.encoded, self._epoch_batches(epoch))

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
            raise DataError(f"mixture weights must be non-negative with a positive sum: {weights.tolist()}")
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

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state,
                "streams": {name: s.state_dict() for name, s in zip(self.names, self.streams)}}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        for name, stream in zip(self.names, self.streams):
            stream.load_state_dict(state["streams"][name])


# -----------------------------------------------------------------------------
# Writing results: never a half-written file

def write_text(path, text):
    """Write via a temporary file beside `path` and a rename: a reader never sees half a file, and
    an interrupted write leaves the previous file in place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".part-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def write_jsonl(path, rows):
    """One JSON object per line."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# -----------------------------------------------------------------------------
# 7. Download of the official files (for users with internet access)

OFFICIAL_URLS = {
    "xquad": "https://raw.githubusercontent.com/google-deepmind/xquad/master/xquad.{lang}.json",
    "squad": "https://rajpurkar.github.io/SQuAD-explorer/dataset/{split}-v1.1.json",
    "xlsum": "https://huggingface.co/datasets/csebuetnlp/xlsum/resolve/main/data/{folder}_XLSum_v2.0.tar.bz2",
}
XQUAD_LANGS = ["ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"]
XLSUM_DEFAULT_LANGS = ["en", "fr", "es", "ru", "zh", "ko", "ja", "ar"]


def download_plan(tasks, xlsum_langs, mirror=None):
    """(url, destination relative to --data-dir) for each file. With a mirror, files are fetched
    from {mirror}/{destination}, i.e. a copy of a --data-dir laid out as `download` writes it."""
    plan = []
    for task in tasks:
        if task == "xquad":
            plan += [(OFFICIAL_URLS["xquad"].format(lang=lang), f"xquad/xquad.{lang}.json") for lang in XQUAD_LANGS]
        elif task == "squad":
            plan += [(OFFICIAL_URLS["squad"].format(split=s), f"squad/{s}-v1.1.json") for s in ("train", "dev")]
        elif task == "xlsum":
            for lang in xlsum_langs:
                folder = get_language(lang, "--xlsum-langs").xlsum
                if folder is None:
                    raise DataError(f"--xlsum-langs: XL-Sum has no data for '{lang}'")
                plan.append((OFFICIAL_URLS["xlsum"].format(folder=folder), f"xlsum/{folder}_XLSum_v2.0.tar.bz2"))
        else:
            raise DataError(f"--tasks: unknown task '{task}'; choose from xquad, squad, xlsum")
    if mirror:
        plan = [(f"{mirror.rstrip('/')}/{dest}", dest) for _, dest in plan]
    return plan


def fetch(url, dest, timeout=60):
    """Download `url` to `dest` atomically: into a temporary file, checked, then renamed."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        if dest.endswith(".json"):
            read_squad(tmp) if "/squad/" in dest or "/xquad/" in dest else json.load(open(tmp))
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, DataError) as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} ({e.reason})"
        else:
            reason = getattr(e, "reason", e)
        raise DataError(f"download {url}: {reason}") from None


def unpack_xlsum(archive, out_dir):
    """Extract the {folder}_{train,val,test}.jsonl files of an XL-Sum archive into out_dir."""
    with tarfile.open(archive, "r:bz2") as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if member.isfile() and name.endswith(".jsonl"):
                fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".part-")
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(member), out)
                os.replace(tmp, os.path.join(out_dir, name))


def download(data_dir, tasks, xlsum_langs, mirror=None, force=False):
    """Fetch the official files into data_dir; files already there are kept unless `force`."""
    for url, rel in download_plan(tasks, xlsum_langs, mirror):
        dest = os.path.join(data_dir, rel)
        if os.path.exists(dest) and not force:
            print(f"have {dest}")
            continue
        print(f"get  {url} -> {dest}")
        fetch(url, dest)
        if dest.endswith(".tar.bz2"):
            unpack_xlsum(dest, os.path.dirname(dest))


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help="read the data, encode it for a model and report batching")
    smoke.add_argument("--model", default="tiny-mt5", help="tiny-mt5, tiny-mbart, tiny-nllb or a checkpoint")
    smoke.add_argument("--data-dir", default=os.path.join("..", "shared", "data"), help="data directory")
    smoke.add_argument("--max-tokens", type=int, default=4000, help="token budget per batch")
    smoke.add_argument("--seed", type=int, default=0, help="random seed")
    dl = sub.add_parser("download", help="fetch official XQuAD, SQuAD v1.1 and XL-Sum files")
    dl.add_argument("--data-dir", required=True, help="where to write the files")
    dl.add_argument("--tasks", default="xquad,squad,xlsum", help="comma-separated: xquad, squad, xlsum")
    dl.add_argument("--xlsum-langs", default=",".join(XLSUM_DEFAULT_LANGS), help="XL-Sum languages to fetch")
    dl.add_argument("--mirror", default=None, help="fetch from this base URL instead of the official hosts")
    dl.add_argument("--force", action="store_true", help="download again files that already exist")
    return parser.parse_args(argv)


def smoke(args):
    """Read every real file, encode SQuAD for the model, batch it and print what a user should see."""
    import models  # local import: models.py imports this module
    for lang in XQUAD_LANGS:
        print(f"xquad.{lang}: {len(read_squad(xquad_path(args.data_dir, lang)))} questions")
    train = read_squad(squad_path(args.data_dir, "train"))
    print(f"squad train: {len(train)} questions ({squad_path(args.data_dir, 'train')})")
    tokenizer = models.load_tokenizer(args.model, data_dir=args.data_dir)
    family = models.family_of_name(args.model, data_dir=args.data_dir)
    encoder = Seq2SeqEncoder(tokenizer, family)
    encoded = encoder.encode(qa_examples(train, "en"))
    batches = TokenBatches(encoded, max_tokens=args.max_tokens, seed=args.seed)
    epoch = batches.epoch_batches(0)
    print(f"{args.model} ({family}): {len(encoded)} examples -> {len(epoch)} batches of <= {args.max_tokens} "
          f"tokens, padding efficiency {batches.padding_efficiency():.3f}")
    first = encoded[0]
    print("first source:", tokenizer.convert_ids_to_tokens(first["input_ids"])[:8], "...")
    print("first labels:", tokenizer.convert_ids_to_tokens(first["labels"]))


def main(args):
    try:
        if args.command == "smoke":
            smoke(args)
        else:
            download(args.data_dir, [t.strip() for t in args.tasks.split(",") if t.strip()],
                     parse_langs(args.xlsum_langs, "--xlsum-langs"), mirror=args.mirror, force=args.force)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(parse_args())
