"""evaluate.py: the official SQuAD metric, ROUGE in two modes, fastText LID, clean-up, bad input."""

import glob
import gzip
import json
import os

import pytest
from rouge_score import rouge_scorer

import common
import data
import evaluate
from conftest import DATA_DIR, TEXT_LANGS
from squad_v11_reference import official_evaluate


def _raw(path):
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        return json.load(f)["data"]


SQUAD_DEV = os.path.join(DATA_DIR, "squad", "dev-v1.1.json.gz")
CASES = [(p, SQUAD_DEV, "squad", "en") for p in sorted(glob.glob(os.path.join(DATA_DIR, "squad", "predictions", "*.json")))]
CASES += [(p, os.path.join(DATA_DIR, "xquad", f"xquad.{p.split('.')[-2]}.json"), "xquad", p.split(".")[-2])
          for p in sorted(glob.glob(os.path.join(DATA_DIR, "xquad", "predictions", "*.json")))]


@pytest.mark.parametrize("pred_path,ref_path,task,lang", CASES, ids=[os.path.basename(c[0]) for c in CASES])
def test_qa_equals_official_squad_script(pred_path, ref_path, task, lang):
    with open(pred_path, encoding="utf-8") as f:
        predictions = json.load(f)
    expected = official_evaluate(_raw(ref_path), predictions)
    metrics, _ = evaluate.score(task, lang, predictions, data.read_squad(ref_path))
    assert round(metrics["em"], 2) == round(expected["exact_match"], 2)
    assert round(metrics["f1"], 2) == round(expected["f1"], 2)
    assert abs(metrics["f1"] - expected["f1"]) < 1e-9


def test_missing_predictions_score_zero_and_are_reported():
    path = os.path.join(DATA_DIR, "squad", "predictions", "Logistic_Regression_Baseline.json")
    with open(path) as f:
        predictions = json.load(f)
    metrics, _ = evaluate.score("squad", "en", predictions, data.read_squad(SQUAD_DEV))
    assert metrics["num_missing"] == 13 and metrics["num_references"] == 10570


def test_qa_filtered_set_rules():
    # The digit answer comes first: its LID label must still be consumed in order (regression).
    questions = [
        {"id": "b", "answers": ["en 1889"]},                                  # digit: dropped
        {"id": "a", "answers": ["la capitale de la France"]},                 # French, no digit: kept
        {"id": "c", "answers": ["the Eiffel tower"]},                         # identified as English: dropped
        {"id": "d", "answers": ["la capitale", "la capitale de la France"]},  # all answers French: kept
        {"id": "e", "answers": ["la capitale", "1889"]},                      # one answer with a digit: dropped
    ]
    assert evaluate.qa_filter(questions, "fr", evaluate.get_lid()) == {"a", "d"}
    metrics, details = evaluate.score("xquad", "fr", {"a": "la capitale de la France", "b": "1889", "c": "x"},
                                      [dict(q, context="", question="") for q in questions[:3]])
    assert metrics["num_filtered"] == 1 and metrics["f1_filtered"] == 100.0
    assert [row["in_filtered_set"] for row in details] == [False, True, False]


# ----------------------------------------------------------------------------- ROUGE

def _gum(n=60):
    return data.read_xlsum(os.path.join(DATA_DIR, "summarization", "gum_en.jsonl"), limit=n)


def test_gem_mode_equals_rouge_score_with_stemmer():
    records = _gum()
    predictions = {r["id"]: data.split_sentences(r["text"])[0] for r in records}  # lead-1 baseline
    metrics, _ = evaluate.score("xlsum", "en", predictions, records, rouge_mode="gem")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(scorer.score(r["summary"], " ".join(predictions[r["id"]].split()))[name].fmeasure
                             for r in records) / len(records)
        assert metrics[name] == pytest.approx(expected, abs=1e-12)
    assert metrics["rouge2"] > 0 and "rouge_warning" not in metrics


# Worked examples, values derived by hand in the comments (ROUGE-n F = 2PR / (P + R)).
ROUGE_CASES = [
    # zh: ideographs one by one. ref 我 喜 欢 猫 / pred 我 喜 欢 狗: bigrams 我喜 喜欢 欢猫 vs 我喜 喜欢 欢狗,
    # 2 of 3 shared -> P = R = 2/3 -> 66.67; unigrams 3 of 4 -> 75.
    ("zh", "我喜欢猫。", "我喜欢狗。", 75.0, 200 / 3),
    # ko: ref [나는 고양이를 좋아한다] (2 bigrams), pred [나는 고양이를 정말 좋아한다] (3 bigrams),
    # shared bigram "나는 고양이를": P = 1/3, R = 1/2 -> F = 2/5 = 40; unigrams P = 3/4, R = 1 -> 6/7.
    ("ko", "나는 고양이를 좋아한다.", "나는 고양이를 정말 좋아한다", 600 / 7, 40.0),
    # ru: lower-cased, full stop removed. [кошка спит на диване] vs [кошка спит на полу]:
    # bigrams 2 of 3 shared -> 66.67; unigrams 3 of 4 -> 75.
    ("ru", "Кошка спит на диване.", "кошка спит на полу", 75.0, 200 / 3),
    # ar: [القط ينام على الأريكة] vs [القط ينام على الأرض]: same shape -> 75 and 66.67.
    ("ar", "القط ينام على الأريكة.", "القط ينام على الأرض", 75.0, 200 / 3),
]


@pytest.mark.parametrize("lang,reference,prediction,rouge1,rouge2", ROUGE_CASES, ids=[c[0] for c in ROUGE_CASES])
def test_multilingual_rouge_worked_examples(lang, reference, prediction, rouge1, rouge2):
    records = [{"id": "1", "url": "", "title": "", "summary": reference, "text": ""}]
    metrics, _ = evaluate.score("xlsum", lang, {"1": prediction}, records)
    assert metrics["rouge1"] == pytest.approx(rouge1)
    assert metrics["rouge2"] == pytest.approx(rouge2)
    gem, _ = evaluate.score("xlsum", lang, {"1": prediction}, records, rouge_mode="gem")
    assert gem["rouge2"] == 0.0 and "deletes every" in gem["rouge_warning"]  # what the paper's tooling did
    # every result carries the other mode too: the paper's numbers beside the right ones
    assert metrics["gem"]["rouge2"] == 0.0 and metrics["gem"]["rouge1"] == 0.0
    assert gem["multilingual"]["rouge2"] == pytest.approx(rouge2) and gem["multilingual"]["rouge1"] == pytest.approx(rouge1)


def test_multilingual_tokenizer_keeps_combining_marks():
    tokenizer = evaluate.MultilingualTokenizer()
    assert tokenizer.tokenize("हिन्दी भाषा, नमस्ते!") == ["हिन्दी", "भाषा", "नमस्ते"]
    assert tokenizer.tokenize("Hello, World! 北京2008") == ["hello", "world", "北", "京", "2008"]


# ----------------------------------------------------------------------------- LID and LCR

@pytest.mark.parametrize("lang", TEXT_LANGS)
def test_lid_on_real_text_at_least_95_percent(lang):
    lines = data.read_text(data.text_path(DATA_DIR, lang))
    detected = evaluate.get_lid().identify(lines)
    accuracy = sum(label == data.get_language(lang).fasttext for label, _ in detected) / len(lines)
    print(f"lid.176.ftz on text/{lang}.txt: {accuracy:.2%} of {len(lines)} lines")
    assert accuracy >= 0.95


def test_lcr_counts_empty_as_wrong_and_folds_newlines():
    records = [{"id": str(i), "url": "", "title": "", "summary": "Le chat dort sur le canapé.", "text": ""}
               for i in range(4)]
    predictions = {"0": "Le chat dort\nsur le canapé du salon.", "1": "", "2": "The cat sleeps on the sofa.",
                   "3": "<extra_id_0> fr_XX Le chien dort dans le jardin. </s>"}
    metrics, details = evaluate.score("xlsum", "fr", predictions, records)
    assert [row["lang"] for row in details] == ["fr", "", "en", "fr"]
    assert metrics["lcr"] == 50.0 and metrics["empty_rate"] == 25.0
    assert metrics["detected_langs"] == {"fr": 50.0, "(empty)": 25.0, "en": 25.0}
    assert metrics["num_with_rudiments"] == 1
    assert details[3]["prediction"] == "Le chien dort dans le jardin."
    assert metrics["avg_len"] == pytest.approx(sum(len(r["prediction"]) for r in details) / 4)


def test_clean_prediction_rudiments():
    assert evaluate.clean_prediction("<pad> zho_Hans 北京 <sep> </s>") == ("北京", True)
    assert evaluate.clean_prediction("<extra_id_12>") == ("", True)
    assert evaluate.clean_prediction("Paris, France") == ("Paris, France", False)
    # decoded special tokens are glued together; every code of both families is known
    assert evaluate.clean_prediction("fra_Latnfra_Latnfra_Latn") == ("", True)
    assert evaluate.clean_prediction("ja_XXko_KR Tokyo") == ("Tokyo", True)
    assert evaluate.clean_prediction("zul_Latn ace_Arab x") == ("x", True)
    # Vietnamese word-segmented text keeps its underscores
    assert evaluate.clean_prediction("thanh_Hoang Hà_Nội") == ("thanh_Hoang Hà_Nội", False)


# ----------------------------------------------------------------------------- CLI and bad input

XQUAD_ES = os.path.join(DATA_DIR, "xquad", "xquad.es.json")
PRED_ES = os.path.join(DATA_DIR, "xquad", "predictions", "CL-mt5base.es.json")


def test_cli_writes_metrics_and_details(tmp_path, capsys):
    out = tmp_path / "m.json"
    evaluate.main(evaluate.parse_args(["--task", "xquad", "--lang", "es", "--references", XQUAD_ES,
                                       "--predictions", PRED_ES, "--out", str(out)]))
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    for key in ("em", "f1", "f1_filtered", "num_filtered", "lcr", "avg_len", "empty_rate", "num_predictions"):
        assert key in printed
    details = [json.loads(line) for line in open(tmp_path / "m.details.jsonl")]
    assert len(details) == 1190 and {"id", "prediction", "lang", "f1"} <= set(details[0])


def test_jsonl_predictions(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "prediction": "y"}\n')
    assert data.read_predictions(str(path)) == {"a": "x", "b": "y"}
    one = tmp_path / "one.jsonl"
    one.write_text('{"id": "a", "prediction": "x"}\n')
    assert data.read_predictions(str(one)) == {"a": "x"}
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "prediction": "y"}\n{"id": "a", "prediction": "z"}\n')
    with pytest.raises(data.DataError, match=r"twice.jsonl:3: prediction id 'a' is given twice \(first on line 1\)"):
        data.read_predictions(str(twice))
    twice_json = tmp_path / "twice.json"
    twice_json.write_text('{"a": "x", "b": "y", "a": "z"}')
    with pytest.raises(data.DataError, match="prediction id 'a' is given twice"):
        data.read_predictions(str(twice_json))


def _run(tmp_path, *argv):
    out = tmp_path / "bad.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main(evaluate.parse_args(list(argv) + ["--out", str(out)]))
    assert not out.exists() and not list(tmp_path.glob("*.details.jsonl"))  # nothing written on error
    return str(e.value.code)


def test_bad_input_errors(tmp_path, capsys):
    wrong = tmp_path / "wrong.json"
    wrong.write_text('["a", "b"]')
    assert "wrong.json: expected {id: text} JSON, or jsonl" in _run(
        tmp_path, "--task", "xquad", "--lang", "es", "--references", XQUAD_ES, "--predictions", str(wrong))
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"id": "a", "prediction": "x"}\n{"id": "b"}\n')
    assert "bad.jsonl:2: expected an object with 'id'" in _run(
        tmp_path, "--task", "xquad", "--lang", "es", "--references", XQUAD_ES, "--predictions", str(bad_line))
    assert "nope.json: file not found" in _run(
        tmp_path, "--task", "xquad", "--lang", "es", "--references", str(tmp_path / "nope.json"), "--predictions", PRED_ES)
    assert "unknown language 'xx'" in _run(
        tmp_path, "--task", "xquad", "--lang", "xx", "--references", XQUAD_ES, "--predictions", PRED_ES)
    for message in [_run(tmp_path, "--task", "xquad", "--lang", "es", "--references", XQUAD_ES,
                         "--predictions", PRED_ES, "--lid-model", str(tmp_path / "lid.bin"))]:
        assert "--lid-model" in message and "\n" not in message
    # unknown ids: a warning with counts, and the scores still come out
    unknown = tmp_path / "unknown.json"
    with open(PRED_ES) as f:
        predictions = json.load(f)
    predictions.update({"not-an-id-1": "x", "not-an-id-2": "y"})
    del predictions[next(iter(predictions))]
    unknown.write_text(json.dumps(predictions))
    capsys.readouterr()
    metrics = evaluate.main(evaluate.parse_args(["--task", "xquad", "--lang", "es", "--references", XQUAD_ES,
                                                 "--predictions", str(unknown)]))
    err = capsys.readouterr().err
    assert "2 prediction id(s) are not in" in err and "1 of 1190 references have no prediction" in err
    assert metrics["num_unknown_ids"] == 2 and metrics["num_missing"] == 1


def test_gem_warning_says_what_gem_mode_really_scores():
    """rouge-score's default tokenizer keeps a-z0-9 only: Cyrillic words vanish, but Latin-letter
    words and digits inside Russian text still count. Hand-worked: gem tokens of the reference are
    [2018, helsinki], of the prediction [helsinki, 2018]: ROUGE-1 100, ROUGE-2 0 (bigrams differ)."""
    records = [{"id": "1", "url": "", "title": "", "text": "",
                "summary": "Путин встретился с Трампом в 2018 году в Helsinki."}]
    metrics, _ = evaluate.score("xlsum", "ru", {"1": "Встреча прошла в Helsinki в 2018 году."}, records,
                                rouge_mode="gem")
    assert metrics["rouge1"] == pytest.approx(100.0) and metrics["rouge2"] == 0.0
    assert "only Latin-letter words and digits" in metrics["rouge_warning"]
    assert "scores 0" not in metrics["rouge_warning"]


# --rouge-mode xlsum: XL-Sum's official multilingual ROUGE. Expected tokens and ROUGE-2 below are the
# official scorer's own output (csebuetnlp/xl-sum multilingual_rouge_scoring, run apart from this
# project with use_stemmer and NLTK's Snowball stemmer, without NLTK's stopwords corpus, as here),
# and were checked by hand against its rules (e.g. en: 5 of the prediction's 6 bigrams are among the
# reference's 7: F = 2 * 5/6 * 5/7 / (5/6 + 5/7) = 0.769231; zh: jieba words, not characters).
XLSUM_OFFICIAL = [
    ["zh", "我爱北京天安门。", "我爱北京。", ["我", "爱", "北京", "天安门"], 0.8],
    ["ja", "私は東京に住んでいます。", "私は東京に住む。", ["私", "は", "東京", "に", "住ん", "で", "い", "ます"], 0.545455],
    ["th", "สวัสดีครับ ผมชื่อสมชาย", "สวัสดีครับ ผมชื่อ", ["สวัสดี", "ครับ", " ", "ผม", "ชื่อ", "สม", "ชาย"], 0.8],
    ["ko", "서울은 한국의 수도이다.", "서울은 수도이다.", ["서울은", "한국의", "수도이다"], 0.0],
    ["fr", "Les présidents ont été élus continuellement.", "Le président est élu continuellement.",
     ["les", "président", "ont", "été", "élus", "continuel"], 0.0],
    ["ru", "Президенты были избраны в 2019 году.", "Президент избран в 2019 году.",
     ["президент", "был", "избра", "в", "2019", "год"], 0.666667],
    ["es", "Los gobiernos anunciaron 3,5 millones.", "El gobierno anunció 3,5 millones.",
     ["los", "gobi", "anunci", "3", "5", "millon"], 0.4],
    ["en", "The governments were running 3.5 million programs.", "The government runs 3.5 million programs.",
     ["the", "govern", "were", "run", "3", "5", "million", "program"], 0.769231],
    ["ar", "أعلنت الحكومة عن برامج جديدة.", "الحكومة تعلن برنامج جديد.", ["اعلن", "حكوم", "عن", "رامج", "جديد"], 0.0],
]


@pytest.fixture
def no_nltk_stopwords(tmp_path, monkeypatch):
    """NLTK's stopwords corpus absent whatever this machine has, as where the expectations were made."""
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(evaluate, "_XLSUM_TOKENIZERS", {})


@pytest.mark.parametrize("lang,reference,prediction,tokens,rouge2", XLSUM_OFFICIAL, ids=[e[0] for e in XLSUM_OFFICIAL])
def test_xlsum_mode_equals_the_official_xlsum_scorer(lang, reference, prediction, tokens, rouge2, no_nltk_stopwords):
    tokenizer = evaluate.XLSumTokenizer(data.get_language(lang))
    assert tokenizer.tokenize(reference) == tokens
    scorer = evaluate.rouge_scorer("xlsum", data.get_language(lang))
    assert round(scorer.score(reference, prediction)["rouge2"].fmeasure, 6) == rouge2
    assert tokenizer.stopwords is (None if lang in ("zh", "ja", "th", "ko") else False)


def test_xlsum_mode_beside_the_others_and_its_missing_parts_named(no_nltk_stopwords, monkeypatch):
    records = [{"id": "1", "summary": "我爱北京天安门。", "text": "x"}]
    metrics, _ = evaluate.score("xlsum", "zh", {"1": "我爱北京。"}, records, rouge_mode="gem")
    assert metrics["xlsum"]["rouge2"] == pytest.approx(80.0)  # jieba words: 2 of 3 bigrams
    assert metrics["multilingual"]["rouge2"] == pytest.approx(100 * 2 * (3 / 3) * (3 / 6) / (3 / 3 + 3 / 6))  # characters
    metrics, _ = evaluate.score("xlsum", "fr", {"1": "Le président est élu."}, [{"id": "1", "summary": "Le président est élu.",
                                                                               "text": "x"}], rouge_mode="xlsum")
    assert metrics["rouge2"] == 100.0 and metrics["rouge_mode"] == "xlsum" and metrics["xlsum_stopwords"] is False
    import sys
    monkeypatch.setitem(sys.modules, "jieba", None)
    monkeypatch.setattr(evaluate, "_XLSUM_TOKENIZERS", {})  # (the Chinese one above is cached)
    with pytest.raises(common.UsageError, match=r"^--rouge-mode xlsum: Chinese needs the jieba package "
                                                r"\(pip install -r requirements-xlsum.txt\)$"):
        evaluate.rouge_scorer("xlsum", data.get_language("zh"))
    metrics, _ = evaluate.score("xlsum", "zh", {"1": "我爱北京。"}, records, rouge_mode="gem")
    assert "xlsum" not in metrics and "jieba" in metrics["rouge_unavailable"]["xlsum"]
    with pytest.raises(common.UsageError, match="stems Hindi with a stemmer of its own"):
        evaluate.rouge_scorer("xlsum", data.get_language("hi"))
