"""data.py: readers on the real files, task formatting, encoding per family, batching, mixing, download."""

import collections
import functools
import gzip
import http.server
import json
import os
import threading

import pytest
import torch

import data
from conftest import DATA_DIR, FAMILIES, TEXT_LANGS


# ----------------------------------------------------------------------------- language table

def test_unknown_language_is_one_line_error_listing_supported():
    with pytest.raises(data.DataError) as e:
        data.get_language("xx")
    message = str(e.value)
    assert "\n" not in message and "'xx'" in message and "en, fr, es" in message


def test_language_table_codes():
    assert data.language_code("nllb", "zh") == "zho_Hans"
    assert data.language_code("nllb", "ko") == "kor_Hang"
    assert data.language_code("mbart", "fr") == "fr_XX"
    assert data.language_code("mt5", "fr") is None
    assert data.LANGUAGES["zh"].xlsum == "chinese_simplified"
    with pytest.raises(data.DataError, match="mbart has no language code for 'el'"):
        data.language_code("mbart", "el")
    assert data.parse_langs("fr, zh,ko") == ["fr", "zh", "ko"]


# ----------------------------------------------------------------------------- readers

@pytest.mark.parametrize("lang", data.XQUAD_LANGS)
def test_xquad_has_1190_questions(lang):
    questions = data.read_squad(data.xquad_path(DATA_DIR, lang))
    assert len(questions) == 1190
    assert all(q["answers"] and q["question"] and q["context"] for q in questions)


def test_xquad_is_parallel():
    en = data.read_squad(data.xquad_path(DATA_DIR, "en"))
    zh = data.read_squad(data.xquad_path(DATA_DIR, "zh"))
    assert [q["id"] for q in en] == [q["id"] for q in zh]


def test_squad_standin_and_dev(squad_train):
    assert len(squad_train) == 9380
    dev = data.read_squad(os.path.join(DATA_DIR, "squad", "dev-v1.1.json.gz"))
    assert len(dev) == 10570
    assert sum(len(q["answers"]) for q in dev) == 34726


@pytest.mark.parametrize("lang", TEXT_LANGS)
def test_text_reader_reads_every_line(lang):
    path = data.text_path(DATA_DIR, lang)
    with open(path, encoding="utf-8") as f:
        expected = [line.strip() for line in f if line.strip()]
    assert data.read_text(path) == expected and len(expected) > 1000


def test_xlsum_reader(tmp_path):
    path = tmp_path / "english_test.jsonl"
    rows = [{"id": f"a{i}", "url": "u", "title": "t", "summary": "s", "text": "x"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["id"] for r in data.read_xlsum(str(path))] == ["a0", "a1", "a2"]
    assert len(data.read_xlsum(str(path), limit=2)) == 2


def test_malformed_inputs_name_file_and_line(tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"id": "1", "summary": "s", "text": "t"}\n{"id": "2", "summary": "s"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: missing or non-string field\(s\) text"):
        data.read_xlsum(str(bad_jsonl))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "1", "summary": "s", "text": "t"}\n\n{"id": oops}\n')
    with pytest.raises(data.DataError, match=r"broken.jsonl:3: invalid JSON"):
        data.read_xlsum(str(broken))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"data": [\n{"paragraphs": [}\n]}')
    with pytest.raises(data.DataError, match=r"bad.json:2: invalid JSON"):
        data.read_squad(str(bad_json))
    no_question = tmp_path / "noq.json.gz"
    with gzip.open(no_question, "wt") as f:
        json.dump({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q", "answers": [{"text": "a"}]}]}]}]}, f)
    with pytest.raises(data.DataError, match=r"noq.json.gz: record data\[0\].paragraphs\[0\].qas\[0\]: missing field 'question'"):
        data.read_squad(str(no_question))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\nalso ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1.txt:3: not UTF-8"):
        data.read_text(str(latin1))
    with pytest.raises(data.DataError, match=r"missing.json: file not found"):
        data.read_squad(str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------- task formatting

def test_qa_formatting_appends_question_and_keeps_all_answers():
    dev = data.read_squad(os.path.join(DATA_DIR, "squad", "dev-v1.1.json.gz"))
    ex = data.qa_examples(dev[:1], "en")[0]
    assert ex.source == dev[0]["context"] and ex.source_tail == dev[0]["question"]
    assert ex.target == dev[0]["answers"][0] and ex.references == dev[0]["answers"]
    assert len(ex.references) == 3


# ----------------------------------------------------------------------------- tokenizers and encoding

@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_tokenizer_round_trips_12_languages(tokenizers, name):
    tokenizer = tokenizers[name]
    for lang in TEXT_LANGS:
        lines = data.read_text(data.text_path(DATA_DIR, lang))[:300]
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
        num_unk = sum(i == tokenizer.unk_token_id for seq in ids for i in seq)
        assert num_unk / sum(map(len, ids)) < 0.01, (name, lang)
        decoded = tokenizer.batch_decode(ids)
        mismatches = [x for x, y in zip(lines, decoded) if " ".join(x.split()) != " ".join(y.split())]
        assert not mismatches, (name, lang, mismatches[:1])


@pytest.mark.parametrize("name", ["tiny-mbart", "tiny-nllb"])
def test_language_codes_where_real_tokenizers_put_them(tokenizers, name):
    family = FAMILIES[name]
    tokenizer = tokenizers[name]
    encoder = data.Seq2SeqEncoder(tokenizer, family)
    ex = data.Example(id="1", source="Der Hund schläft.", target="Le chien dort.", src_lang="de", tgt_lang="fr")
    encoded = encoder.encode([ex])[0]
    src_code, tgt_code = data.language_code(family, "de"), data.language_code(family, "fr")
    source_tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    label_tokens = tokenizer.convert_ids_to_tokens(encoded["labels"])
    assert source_tokens[0] == src_code and source_tokens[-1] == "</s>"
    assert label_tokens[0] == tgt_code and label_tokens[-1] == "</s>"
    assert src_code not in source_tokens[1:] and tgt_code not in label_tokens[1:]
    # identical to what the HF tokenizer itself produces with src_lang / tgt_lang
    tokenizer.src_lang, tokenizer.tgt_lang = src_code, tgt_code
    reference = tokenizer(ex.source, text_target=ex.target)
    assert encoded["input_ids"] == reference["input_ids"] and encoded["labels"] == reference["labels"]
    tokenizer.src_lang, tokenizer.tgt_lang = data.language_code(family, "en"), data.language_code(family, "en")
    # every language code of our table is a real token, not <unk>
    for code in data.family_language_codes(family):
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(code)) == code


def test_mt5_has_no_language_codes(tokenizers):
    tokenizer = tokenizers["tiny-mt5"]
    encoder = data.Seq2SeqEncoder(tokenizer, "mt5")
    ex = data.Example(id="1", source="Der Hund schläft.", target="Le chien dort.", src_lang="de", tgt_lang="fr")
    encoded = encoder.encode([ex])[0]
    assert encoded["input_ids"] == tokenizer(ex.source)["input_ids"]
    assert encoded["labels"] == tokenizer(ex.target)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"] + encoded["labels"])
    assert not [t for t in tokens if t.endswith(("_XX", "_Latn")) or t.startswith("<extra_id")]
    assert encoder.generation_kwargs("fr") == {"decoder_start_token_id": tokenizer.pad_token_id}


def test_truncation_keeps_the_question(tokenizers):
    tokenizer = tokenizers["tiny-nllb"]
    encoder = data.Seq2SeqEncoder(tokenizer, "nllb", max_source_length=32)
    ex = data.Example(id="1", source="word " * 200, source_tail="Who wrote it?", target="x", src_lang="en", tgt_lang="en")
    encoded = encoder.encode([ex])[0]
    assert len(encoded["input_ids"]) == 32
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "eng_Latn" and tokens[-1] == "</s>"
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True).endswith("Who wrote it?")
    assert data.FAMILY_MAX_LENGTH == {"mt5": 512, "mbart": 1024, "nllb": 512}


# ----------------------------------------------------------------------------- self-supervised

def test_prefix_lm_splits_at_word_boundaries_and_is_seeded():
    paragraphs = data.read_text(data.text_path(DATA_DIR, "fr"))[:200]
    a = data.self_supervised_examples(paragraphs, "fr", "prefix_lm", seed=1)
    b = data.self_supervised_examples(paragraphs, "fr", "prefix_lm", seed=1)
    c = data.self_supervised_examples(paragraphs, "fr", "prefix_lm", seed=2)
    assert [(x.source, x.target) for x in a] == [(x.source, x.target) for x in b]
    assert [(x.source, x.target) for x in a] != [(x.source, x.target) for x in c]
    by_id = {f"fr-{i}": p for i, p in enumerate(paragraphs)}
    for ex in a:  # beginning + continuation is the paragraph, cut at one whitespace run
        assert ex.source and ex.target and ex.src_lang == ex.tgt_lang == "fr"
        assert " ".join(f"{ex.source} {ex.target}".split()) == " ".join(by_id[ex.id].split())
    zh_lines = data.read_text(data.text_path(DATA_DIR, "zh"))[:50]
    for ex in data.self_supervised_examples(zh_lines, "zh", "prefix_lm"):  # cut between characters
        assert ex.source + ex.target == zh_lines[int(ex.id[3:])].strip()


def test_zmbart_targets_are_sentences_of_the_input():
    paragraphs = data.read_text(data.text_path(DATA_DIR, "en"))[:100]
    examples = data.self_supervised_examples(paragraphs, "en", "zmbart", seed=0)
    assert len(examples) == 100
    for ex in examples:  # the target is a subsequence of the source's sentences, about 20% of them
        sentences = [x.strip() for x in data.split_sentences(ex.source) if x.strip()]
        remaining, chosen = ex.target, 0
        for sentence in sentences:
            if remaining.startswith(sentence):
                remaining, chosen = remaining[len(sentence):].lstrip(), chosen + 1
        assert remaining == "" and chosen == max(1, round(0.2 * len(sentences)))
    with pytest.raises(data.DataError, match="--objective"):
        data.self_supervised_examples(paragraphs, "en", "span_corruption")


def test_sentence_splitter_worked_examples():
    assert data.split_sentences("Dr. Smith went to the U.S. in May. He paid 3.5 dollars! Fine?") == \
        ["Dr. Smith went to the U.S. in May. ", "He paid 3.5 dollars! ", "Fine?"]
    assert data.split_sentences("我们走吧。他来了！好吗？") == ["我们走吧。", "他来了！", "好吗？"]
    text = "J. R. R. Tolkien wrote it. «Oui.» Non."
    assert "".join(data.split_sentences(text)) == text


# ----------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def squad_encoded(tokenizers, squad_train):
    encoder = data.Seq2SeqEncoder(tokenizers["tiny-mt5"], "mt5")
    return encoder.encode(data.qa_examples(squad_train, "en"))


def test_batches_respect_budget_and_cover_each_example_once(squad_encoded):
    for max_tokens in (4000, 1500):
        stream = data.TokenBatches(squad_encoded, max_tokens=max_tokens, seed=3)
        for epoch in (0, 1):
            batches = stream.epoch_batches(epoch)
            for batch in batches:
                padded = len(batch) * max(data.num_tokens(stream.encoded[i]) for i in batch)
                assert padded <= max_tokens
            flat = sorted(i for batch in batches for i in batch)
            assert flat == list(range(len(squad_encoded)))


def test_padding_efficiency_on_squad_at_4000(squad_encoded):
    efficiency = data.TokenBatches(squad_encoded, max_tokens=4000, seed=0).padding_efficiency()
    print(f"padding efficiency on the SQuAD stand-in at 4000 tokens (tiny-mt5): {efficiency:.3f}")
    assert efficiency >= 0.90


def test_batches_are_seeded_and_shuffled(squad_encoded):
    a = data.TokenBatches(squad_encoded, seed=0).epoch_batches(0)
    b = data.TokenBatches(squad_encoded, seed=0).epoch_batches(0)
    c = data.TokenBatches(squad_encoded, seed=1).epoch_batches(0)
    assert a == b and a != c
    assert a != data.TokenBatches(squad_encoded, seed=0).epoch_batches(1)
    lengths = [max(len(squad_encoded[i]["input_ids"]) for i in batch) for batch in a]
    assert lengths != sorted(lengths)  # batch order is shuffled, not by length


def test_restored_iterator_continues_identically(squad_encoded):
    stream = data.TokenBatches(squad_encoded, seed=5)
    num_batches = len(stream.epoch_batches(0))
    for _ in range(num_batches - 3):  # stop just before an epoch boundary
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream) for _ in range(10)]
    restored = data.TokenBatches(squad_encoded, seed=5)
    restored.load_state_dict(state)
    assert [next(restored) for _ in range(10)] == expected
    assert restored.epoch == 1


def test_over_long_example_is_truncated_to_the_budget():
    encoded = [{"input_ids": list(range(3, 103)) + [1], "labels": [5, 1]}, {"input_ids": [4, 1], "labels": [6, 1]}]
    stream = data.TokenBatches(encoded, max_tokens=50, seed=0)
    assert len(stream.encoded[0]["input_ids"]) == 50 and stream.encoded[0]["input_ids"][-1] == 1
    batches = stream.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == [0, 1]
    tensors = stream.collate([0, 1], pad_token_id=0)
    assert tensors["input_ids"].shape == (2, 50) and tensors["labels"][1].tolist() == [6, 1]
    assert tensors["attention_mask"][1].tolist() == [1, 1] + [0] * 48
    assert data.collate(encoded[:1] + encoded[1:], 0)["labels"].dtype == torch.long


def _toy_stream(num, seed):
    return data.TokenBatches([{"input_ids": [5] * (3 + i % 7), "labels": [1]} for i in range(num)],
                             max_tokens=20, seed=seed)


def test_mixing_one_percent_self_supervised_uniform_over_languages():
    langs = ["fr", "es", "ru", "zh", "ko"]
    self_supervised = data.Mixture.uniform({lang: _toy_stream(40, i) for i, lang in enumerate(langs)}, seed=1)
    mixture = data.Mixture({"task": (0.99, _toy_stream(100, 9)), "self_supervised": (0.01, self_supervised)}, seed=2)
    draws = [next(mixture)[0] for _ in range(100_000)]
    counts = collections.Counter(path[0] for path in draws)
    share = counts["self_supervised"] / len(draws)
    print(f"self-supervised share over 100k draws: {share:.4%}")
    assert abs(share - 0.01) <= 0.002
    per_lang = collections.Counter(path[1] for path in draws if path[0] == "self_supervised")
    assert set(per_lang) == set(langs)
    expected = counts["self_supervised"] / len(langs)
    assert all(abs(n - expected) < 0.25 * expected for n in per_lang.values()), per_lang
    # uniform over languages, measured tightly on the inner sampler alone
    inner = collections.Counter(next(self_supervised)[0][0] for _ in range(100_000))
    assert all(abs(n / 100_000 - 0.2) < 0.01 for n in inner.values()), inner


def test_mixture_state_restores_exactly():
    def make():
        inner = data.Mixture.uniform({"fr": _toy_stream(30, 1), "zh": _toy_stream(30, 2)}, seed=3)
        return data.Mixture({"task": (0.7, _toy_stream(50, 4)), "ss": (0.3, inner)}, seed=5)
    a = make()
    for _ in range(37):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(50)]
    b = make()
    b.load_state_dict(state)
    assert [next(b) for _ in range(50)] == expected
    path, indices = expected[0]
    assert isinstance(b.stream(path), data.TokenBatches)


# ----------------------------------------------------------------------------- download

@pytest.fixture()
def local_server():
    handler = functools.partial(QuietHandler, directory=DATA_DIR)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_a_local_mirror(tmp_path, local_server):
    out = tmp_path / "dl"
    data.main(data.parse_args(["download", "--data-dir", str(out), "--tasks", "xquad", "--mirror", local_server]))
    for lang in data.XQUAD_LANGS:
        with open(data.xquad_path(str(out), lang), "rb") as got, open(data.xquad_path(DATA_DIR, lang), "rb") as ref:
            assert got.read() == ref.read()
    # the mirror has no plain train-v1.1.json: a clear error, and nothing half-written is left
    with pytest.raises(SystemExit, match=r"download http://127\.0\.0\.1:\d+/squad/train-v1.1.json: HTTP 404"):
        data.main(data.parse_args(["download", "--data-dir", str(out), "--tasks", "squad", "--mirror", local_server]))
    assert os.listdir(out / "squad") == []
    # official URLs are formed as documented
    plan = data.download_plan(["xlsum"], ["fr"])
    assert plan == [("https://huggingface.co/datasets/csebuetnlp/xlsum/resolve/main/data/french_XLSum_v2.0.tar.bz2",
                     "xlsum/french_XLSum_v2.0.tar.bz2")]
    with pytest.raises(data.DataError, match="XL-Sum has no data for 'de'"):
        data.download_plan(["xlsum"], ["de"])


def test_smoke_cli(capsys):
    data.main(data.parse_args(["smoke", "--model", "tiny-nllb", "--data-dir", DATA_DIR]))
    out = capsys.readouterr().out
    assert "xquad.zh: 1190 questions" in out and "squad train: 9380 questions" in out
    assert "padding efficiency" in out and "'eng_Latn'" in out
