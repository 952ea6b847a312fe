"""data.py and models.py's encoding: readers on the real files, task formatting, encoding per family,
batching, mixing."""

import collections
import gzip
import json
import os
import re

import numpy as np
import pytest
import torch

import common
import data
import models
from conftest import DATA_DIR, FAMILIES, TEXT_LANGS


# ----------------------------------------------------------------------------- language table

def test_unknown_language_is_one_line_error_listing_supported():
    with pytest.raises(common.UsageError) as e:
        data.get_language("xx")
    message = str(e.value)
    assert "\n" not in message and "'xx'" in message and "en, fr, es" in message


def test_language_table_codes_are_the_real_tokenizers_codes():
    """Every code of the table is one of the codes the real tokenizers define (transformers' lists of
    facebook/mbart-large-50 and facebook/nllb-200), for the right language: mBART-50 codes are
    ISO 639-1 + region, NLLB codes language_Script with the script of the language's text."""
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES as MBART50
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES as NLLB
    scripts = {"zh": "Hans", "ja": "Jpan", "ko": "Hang", "ru": "Cyrl", "ar": "Arab", "th": "Thai", "el": "Grek",
               "hi": "Deva"}  # ISO 15924 codes of the scripts these languages are written in
    for code, lang in data.LANGUAGES.items():
        if lang.mbart is not None:
            assert lang.mbart in MBART50 and lang.mbart.split("_")[0] == code, lang
        assert lang.nllb in NLLB and lang.script == scripts.get(code, "Latn"), lang
    assert models.language_code("mt5", "fr") is None
    with pytest.raises(common.UsageError, match="mbart has no language code for 'el'"):
        models.language_code("mbart", "el")
    assert data.parse_langs("fr, zh,ko") == ["fr", "zh", "ko"]
    with pytest.raises(common.UsageError, match="listed twice"):
        data.parse_langs("fr,fr")


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


def test_text_reader_reads_every_line():
    """Line counts published in text/SOURCES.md (its table: | lang | file | lines | bytes | ...)."""
    with open(os.path.join(DATA_DIR, "text", "SOURCES.md"), encoding="utf-8") as f:
        published = {m.group(1): int(m.group(2).replace(",", ""))
                     for m in re.finditer(r"^\| (\w\w) \| `\w\w\.txt` \| ([\d,]+) \|", f.read(), re.M)}
    assert sorted(published) == sorted(TEXT_LANGS)
    for lang in TEXT_LANGS:
        lines = data.read_text(data.text_path(DATA_DIR, lang))
        assert len(lines) == published[lang], lang
        assert all(line == line.strip() and line for line in lines)


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
    bad_bytes = tmp_path / "latin1.jsonl"
    bad_bytes.write_bytes(b'{"id": "1", "summary": "s", "text": "t"}\n{"id": "2", "summary": "caf\xe9", "text": "t"}\n')
    with pytest.raises(data.DataError, match=r"latin1.jsonl:2: not UTF-8"):
        data.read_xlsum(str(bad_bytes))
    duplicate = tmp_path / "dup.jsonl"
    duplicate.write_text('{"id": "1", "summary": "s", "text": "t"}\n{"id": "1", "summary": "s", "text": "t"}\n')
    with pytest.raises(data.DataError, match=r"dup.jsonl:2: duplicate id '1' \(first on line 1\)"):
        data.read_xlsum(str(duplicate))
    with pytest.raises(data.DataError, match="is a directory"):
        data.read_squad(str(tmp_path))
    truncated = tmp_path / "cut.json.gz"
    truncated.write_bytes(gzip.compress(b'{"data": []}')[:-6])
    with pytest.raises(data.DataError, match="cut.json.gz: cannot read"):
        data.read_squad(str(truncated))


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
    encoder = models.Seq2SeqEncoder(tokenizer, family)
    ex = data.Example(id="1", source="Der Hund schläft.", target="Le chien dort.", src_lang="de", tgt_lang="fr")
    encoded = encoder.encode([ex])[0]
    src_code, tgt_code = models.language_code(family, "de"), models.language_code(family, "fr")
    source_tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    label_tokens = tokenizer.convert_ids_to_tokens(encoded["labels"])
    assert source_tokens[0] == src_code and source_tokens[-1] == "</s>"
    assert label_tokens[0] == tgt_code and label_tokens[-1] == "</s>"
    assert src_code not in source_tokens[1:] and tgt_code not in label_tokens[1:]
    # identical to what the HF tokenizer itself produces with src_lang / tgt_lang
    tokenizer.src_lang, tokenizer.tgt_lang = src_code, tgt_code
    reference = tokenizer(ex.source, text_target=ex.target)
    assert encoded["input_ids"] == reference["input_ids"] and encoded["labels"] == reference["labels"]
    tokenizer.src_lang, tokenizer.tgt_lang = models.language_code(family, "en"), models.language_code(family, "en")
    # every language code of our table is a real token, not <unk>
    for code in models.family_language_codes(family):
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(code)) == code


def test_mt5_has_no_language_codes(tokenizers):
    tokenizer = tokenizers["tiny-mt5"]
    encoder = models.Seq2SeqEncoder(tokenizer, "mt5")
    ex = data.Example(id="1", source="Der Hund schläft.", target="Le chien dort.", src_lang="de", tgt_lang="fr")
    encoded = encoder.encode([ex])[0]
    assert encoded["input_ids"] == tokenizer(ex.source)["input_ids"]
    assert encoded["labels"] == tokenizer(ex.target)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"] + encoded["labels"])
    assert not [t for t in tokens if t.endswith(("_XX", "_Latn")) or t.startswith("<extra_id")]
    assert encoder.generation_kwargs("fr") == {"decoder_start_token_id": tokenizer.pad_token_id}


def test_truncation_keeps_the_question(tokenizers):
    tokenizer = tokenizers["tiny-nllb"]
    encoder = models.Seq2SeqEncoder(tokenizer, "nllb", max_source_length=32)
    ex = data.Example(id="1", source="word " * 200, source_tail="Who wrote it?", target="x", src_lang="en", tgt_lang="en")
    short = data.Example(id="2", source="word", target="y " * 600, src_lang="en", tgt_lang="en")
    stats = {}
    encoded = encoder.encode([ex, short], stats)[0]
    assert len(encoded["input_ids"]) == 32
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "eng_Latn" and tokens[-1] == "</s>"
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True).endswith("Who wrote it?")
    assert stats == {"num_examples": 2, "num_cut_sources": 1, "num_cut_targets": 1}


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
    with pytest.raises(common.UsageError, match="--objective"):
        data.self_supervised_examples(paragraphs, "en", "denoise")


# Appendix C's pretraining tasks. The worked examples follow the papers' definitions by hand:
# T5 (Raffel et al. 2020, Sec. 3.1.4 and t5.data.preprocessors): noise spans -> one sentinel each in the
# input, the target "<X> span <Y> span"; BART/mBART (Lewis et al. 2020; Liu et al. 2020): sentences
# permuted, spans of Poisson(3.5) length each replaced by one <mask>, the target the original text.

def test_span_corruption_worked_example():
    units = "Thank you for inviting me to your party last week .".split()
    # T5's own example (its paper's Figure 2): "for inviting" and "last" are noise
    mask = [u in ("for", "inviting", "last") for u in units]
    source, target = data.span_corruption(units, mask)
    assert source == "Thank you <extra_id_0> me to your party <extra_id_1> week ."
    assert target == "<extra_id_0> for inviting <extra_id_1> last"
    # languages without spaces: characters
    assert data.span_corruption(list("我们去公园"), [False, True, False, False, True], "") == \
        ("我<extra_id_0>去公<extra_id_1>", "<extra_id_0>们<extra_id_1>园")


@pytest.mark.parametrize("length,noise,spans", [(100, 15, 5), (20, 3, 1), (2, 1, 1), (512, 77, 26)])
def test_t5_noise_mask_has_t5s_counts(length, noise, spans):
    """round(15% of the length) noise units (at least 1, at most all but one) in round(noise / 3)
    spans; non-noise first and noise last, as T5 interleaves them."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = data.random_spans_noise_mask(length, rng)
        starts = int(mask[0]) + int(np.sum(mask[1:] & ~mask[:-1]))
        assert (mask.sum(), starts, bool(mask[0]), bool(mask[-1])) == (noise, spans, False, True)


def test_text_infilling_and_sentence_permutation_worked_examples():
    units = "a b c d e f".split()
    assert data.text_infilling(units, [(1, 2), (5, 0)]) == ["a", "<mask>", "d", "e", "<mask>", "f"]
    assert data.text_infilling(units, [(1, 2), (2, 2)]) == ["a", "<mask>", "e", "f"]  # overlapping: one mask
    assert data.text_infilling(units, [(0, 6)]) == ["<mask>"]
    assert data.permute_sentences(["A.", "B.", "C."], [2, 0, 1]) == ["C.", "A.", "B."]


def test_mbart_denoising_masks_35_percent_and_restores_the_original():
    paragraphs = data.read_text(data.text_path(DATA_DIR, "fr"))[:200]
    examples = data.self_supervised_examples(paragraphs, "fr", "mbart_denoising", seed=0)
    masked = kept = 0
    for ex in examples:
        original = paragraphs[int(ex.id[3:])]
        sentences = [x.strip() for x in data.split_sentences(original) if x.strip()]
        assert ex.target == " ".join(sentences)
        words = ex.source.split()
        left = [w for w in words if w != data.MASK_TOKEN]
        # every word left is one of the original's; at most ceil(35%) went under masks (spans that
        # overlap or have length 0 cover fewer)
        assert collections.Counter(left) <= collections.Counter(ex.target.split())
        assert len(ex.target.split()) - len(left) <= np.ceil(0.35 * len(ex.target.split()))
        masked, kept = masked + len(ex.target.split()) - len(left), kept + len(left)
    assert 0.30 < masked / (masked + kept) < 0.40
    assert data.self_supervised_examples(paragraphs[:20], "fr", "mbart_denoising", seed=0) != \
        data.self_supervised_examples(paragraphs[:20], "fr", "mbart_denoising", seed=1)


@pytest.mark.parametrize("objective,family,token", [("span_corruption", "tiny-mt5", "<extra_id_0>"),
                                                    ("mbart_denoising", "tiny-mbart", "<mask>"),
                                                    ("mbart_denoising", "tiny-nllb", "<mask>")])
def test_sentinels_and_masks_are_one_token_each(objective, family, token, tokenizers):
    tokenizer = tokenizers[family]
    text = data.read_text(data.text_path(DATA_DIR, "es"))[:5]
    for ex in data.self_supervised_examples(text, "es", objective, seed=0):
        ids = tokenizer(ex.source, add_special_tokens=False)["input_ids"]
        special = [i for i in ids if i in tokenizer.all_special_ids or tokenizer.convert_ids_to_tokens(i).startswith("<extra_id_")]
        assert len(special) == ex.source.count(token[:9]) and tokenizer.unk_token_id not in ids
    models.check_objective_token(objective, tokenizer, family)  # no error
    other = "mbart_denoising" if objective == "span_corruption" else "span_corruption"
    with pytest.raises(common.UsageError, match=f"--mix-objective {other}: the tokenizer of {family} has no"):
        models.check_objective_token(other, tokenizer, family)


def test_sentence_splitter_worked_examples():
    assert data.split_sentences("Dr. Smith went to the U.S. in May. He paid 3.5 dollars! Fine?") == \
        ["Dr. Smith went to the U.S. in May. ", "He paid 3.5 dollars! ", "Fine?"]
    assert data.split_sentences("我们走吧。他来了！好吗？") == ["我们走吧。", "他来了！", "好吗？"]
    text = "J. R. R. Tolkien wrote it. «Oui.» Non."
    assert "".join(data.split_sentences(text)) == text


# ----------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def squad_encoded(tokenizers, squad_train):
    encoder = models.Seq2SeqEncoder(tokenizers["tiny-mt5"], "mt5")
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
    assert stream.num_truncated == 1
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


# ----------------------------------------------------------------------------- generation batches

def test_generation_batches_cover_every_source_once_within_budget():
    lengths = [5, 90, 7, 33, 33, 60, 2, 90, 41, 8] * 30
    batches = data.generation_batches(lengths, max_tokens=200, max_batch_size=16)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 16 and len(batch) * max(lengths[i] for i in batch) <= 200
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # sorted by length, so similar lengths share a batch


def test_bucketed_shapes_keep_padding_efficiency_and_are_few(squad_encoded):
    """--compile pads every batch to data.train_shape: rows to 8 sizes an octave, lengths to multiples
    of 8 up to 64 and then 8 sizes an octave. On the SQuAD stand-in at 4000 tokens: efficiency still
    >= 0.90 (0.96 unbucketed); an epoch's shapes are sizes of the ladders, under a quarter of the
    unbucketed ones; pad_to_buckets gives the shape batch_shapes counts, and keeps every real token."""
    stream = data.TokenBatches(squad_encoded, max_tokens=4000, seed=0)
    efficiency = stream.padding_efficiency(bucketed=True)
    print(f"bucketed padding efficiency {efficiency:.3f} (unbucketed {stream.padding_efficiency():.3f})")
    assert 0.90 <= efficiency < stream.padding_efficiency()
    shapes = {tuple(s) for s in stream.batch_shapes(0, bucketed=True).tolist()}
    raw = {tuple(s) for s in stream.batch_shapes(0).tolist()}
    print(f"shapes in an epoch: {len(shapes)} bucketed, {len(raw)} unbucketed")
    assert all(length % 8 == 0 for s in shapes for length in s[1:])
    assert {s[0] for s in shapes} <= {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 24, 26, 28,
                                      30, 32, 36, 40, 44, 48, 52, 56, 60, 64, 72, 80, 88, 96, 104, 112, 120, 128}
    assert len(shapes) < len(raw) / 4
    k = 5
    batch = stream.collate(stream.epoch_batches(0)[k], 0)
    padded = data.pad_to_buckets(batch, 0)
    assert tuple(padded["input_ids"].shape) + (padded["labels"].shape[1],) == \
        tuple(stream.batch_shapes(0, bucketed=True)[stream._epoch_batches(0)[2][k]])
    assert int(padded["attention_mask"].sum()) == int(batch["attention_mask"].sum())
    assert torch.equal(padded["labels"][padded["labels"] != -100], batch["labels"][batch["labels"] != -100])
