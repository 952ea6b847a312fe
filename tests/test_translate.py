"""translate_train.py: valid output in the official formats, resume without retranslation,
sentence splitting on real text, forced target language, bad input."""

import json
import os

import pytest
import torch

import data
import decode
import loop
import models
import translate_train
from conftest import DATA_DIR, REPO, sharpened

STANDIN = os.path.join(DATA_DIR, "squad", "train-standin-v1.1.json.gz")
FIXTURE_EN = os.path.join(REPO, "tests", "fixtures", "xlsum", "english_train.jsonl")


def run(*argv):
    return translate_train.main(translate_train.parse_args(["--model", "tiny-nllb", "--data-dir", DATA_DIR,
                                                            "--max-length-ratio", "0.5", "--max-length-offset", "4"]
                                                           + list(argv)))


def test_thirty_squad_examples_translate_into_valid_squad_json(tmp_path, capsys):
    out = tmp_path / "squad.fr.json"
    run("--task", "xquad", "--train-file", STANDIN, "--tgt-lang", "fr", "--out-file", str(out), "--limit", "30")
    source = data.read_squad(STANDIN)[:30]
    translated = data.read_squad(str(out))              # the reader loads it
    assert [q["id"] for q in translated] == [q["id"] for q in source]
    assert [len(q["answers"]) for q in translated] == [len(q["answers"]) for q in source]
    assert len({q["context"] for q in translated}) == len({q["context"] for q in source})
    assert [q["title"] for q in translated] == [q["title"] for q in source]
    raw = json.loads(out.read_text())
    assert raw["translated_to"] == "fr" and not os.path.exists(str(out) + ".progress.jsonl")
    for paragraph in (p for article in raw["data"] for p in article["paragraphs"]):
        for qa in paragraph["qas"]:
            for answer in qa["answers"]:  # position in the translated context when found, else flagged
                if answer["answer_in_context"]:
                    assert paragraph["context"][answer["answer_start"]:].startswith(answer["text"]) or \
                        paragraph["context"].lower()[answer["answer_start"]:].startswith(answer["text"].lower())
                else:
                    assert answer["answer_start"] == -1
    assert "translated answers not found in their translated context" in capsys.readouterr().out


def test_find_answer():
    assert translate_train.find_answer("La tour Eiffel est à Paris.", "Paris") == 21
    assert translate_train.find_answer("La tour Eiffel est à Paris.", "la tour") == 0
    assert translate_train.find_answer("La tour Eiffel", "Londres") == -1


class Counter:
    """Counts the sentences the model is asked to translate; can stop the run like a kill."""

    def __init__(self, monkeypatch, stop_after_examples=None):
        self.sentences = 0
        generate_batch = loop.generate_batch

        def counting(model, tokenizer, sources, *args, **kwargs):
            self.sentences += len(sources)
            return generate_batch(model, tokenizer, sources, *args, **kwargs)
        monkeypatch.setattr(loop, "generate_batch", counting)
        if stop_after_examples is not None:
            add_example, done = translate_train.Progress.add_example, []

            def interrupted(progress, key, value):
                add_example(progress, key, value)
                done.append(key)
                if len(done) == stop_after_examples:
                    raise KeyboardInterrupt("killed")
            monkeypatch.setattr(translate_train.Progress, "add_example", interrupted)


@pytest.mark.parametrize("task,train_file,limit", [("xlsum", FIXTURE_EN, "4"), ("xquad", STANDIN, "90")])
def test_resume_gives_the_same_file_without_retranslating(task, train_file, limit, tmp_path, monkeypatch):
    common = ["--task", task, "--train-file", train_file, "--tgt-lang", "de", "--limit", limit, "--chunk-size", "1"]
    straight = Counter(monkeypatch)
    run(*common, "--out-file", str(tmp_path / "straight"))
    monkeypatch.undo()

    first = Counter(monkeypatch, stop_after_examples=2)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: status 130, resumable
        run(*common, "--out-file", str(tmp_path / "resumed"))
    monkeypatch.undo()
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.progress.jsonl").exists()
    second = Counter(monkeypatch)
    run(*common, "--out-file", str(tmp_path / "resumed"))
    assert (tmp_path / "resumed").read_bytes() == (tmp_path / "straight").read_bytes()
    assert first.sentences > 0 and second.sentences > 0
    assert first.sentences + second.sentences == straight.sentences  # nothing translated twice


def test_a_kill_loses_at_most_the_batch_in_flight(tmp_path, monkeypatch):
    common = ["--task", "xlsum", "--train-file", FIXTURE_EN, "--tgt-lang", "fr", "--max-tokens", "60"]
    generate_batch, calls = loop.generate_batch, []

    def dies_on_third_batch(model, tokenizer, sources, *args, **kwargs):
        calls.append(len(sources))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed mid-batch")
        return generate_batch(model, tokenizer, sources, *args, **kwargs)
    monkeypatch.setattr(loop, "generate_batch", dies_on_third_batch)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: status 130, resumable
        run(*common, "--out-file", str(tmp_path / "out.jsonl"))
    monkeypatch.undo()
    cached = [json.loads(l) for l in open(tmp_path / "out.jsonl.progress.jsonl") if '"sentence"' in l]
    assert len(cached) == calls[0] + calls[1]  # the two finished batches are kept
    counter = Counter(monkeypatch)
    run(*common, "--out-file", str(tmp_path / "out.jsonl"))
    total = len({s for r in data.read_xlsum(FIXTURE_EN) for s in translate_train.xlsum_segments(r)})
    assert counter.sentences == total - len(cached)
    assert len(data.read_xlsum(str(tmp_path / "out.jsonl"))) == 4


# Real paragraphs of ../shared/data/text: (language, line index, expected number of sentences).
SPLITS = [
    ("en", 1334, 6),   # "(i.e. U.S. and U.K. branches)" and "the U.S.." inside sentences
    ("fr", 32, 2),     # "... Les plats": an ellipsis before a capital ends the sentence
    ("ru", 169, 1),    # "(2008 г.)" and "13 чел. / км2.": abbreviations, no break
    ("zh", 2141, 5),   # CJK full stops, no spaces
    ("ja", 1051, 4),
    ("ar", 49, 2),
]


@pytest.mark.parametrize("lang,index,expected", SPLITS, ids=[s[0] for s in SPLITS])
def test_sentence_splitting_on_real_paragraphs(lang, index, expected):
    text = data.read_text(data.text_path(DATA_DIR, lang))[index]
    sentences = data.split_sentences(text)
    assert "".join(sentences) == text and len(sentences) == expected, sentences
    for sentence in sentences[:-1]:
        assert sentence.rstrip()[-1] in ".!?。！？」』”’）\"'»)", sentence


def test_sentence_splitting_worked_examples():
    split = data.split_sentences
    assert split("Dr. Watson met Mr. Holmes. They talked.") == ["Dr. Watson met Mr. Holmes. ", "They talked."]
    assert split("Prices rose 3.5 percent in the U.S. last year. Analysts agreed.") == \
        ["Prices rose 3.5 percent in the U.S. last year. ", "Analysts agreed."]
    assert split("Il est arrivé. Elle est partie !") == ["Il est arrivé. ", "Elle est partie !"]
    assert split("Он пришёл. Она ушла.") == ["Он пришёл. ", "Она ушла."]
    assert split("他来了。她走了！") == ["他来了。", "她走了！"]
    assert split("「行こう。」と彼は言った。") == ["「行こう。」", "と彼は言った。"]
    assert split("وصل الرجل. غادرت المرأة؟ نعم.") == ["وصل الرجل. ", "غادرت المرأة؟ ", "نعم."]


def test_forced_target_language_is_the_first_generated_token(tokenizers):
    tokenizer = tokenizers["tiny-nllb"]
    model = models.load_model("tiny-nllb", DATA_DIR).eval()
    encoder = models.Seq2SeqEncoder(tokenizer, "nllb")
    sources = [e["input_ids"] for e in encoder.encode([data.Example("1", "The cat sleeps.", "", "en", "en"),
                                                       data.Example("2", "Hello.", "", "en", "en")])]
    for lang in ("fr", "zh", "ko", "ru", "ar"):
        out = loop.generate_batch(model, tokenizer, sources, encoder.generation_kwargs(lang), torch.device("cpu"),
                                  5, num_beams=4)
        assert out[:, 0].tolist() == [2, 2]  # decoder start </s>
        assert tokenizer.convert_ids_to_tokens(out[:, 1].tolist()) == [models.language_code("nllb", lang)] * 2


def test_predictions_mode(tmp_path):
    predictions = os.path.join(DATA_DIR, "xquad", "predictions", "CL-mt5base.en.json")
    out = tmp_path / "preds.fr.json"
    run("--predictions", predictions, "--tgt-lang", "fr", "--out-file", str(out), "--limit", "12")
    translated = data.read_predictions(str(out))
    assert list(translated) == list(data.read_predictions(predictions))[:12]


def test_the_static_beam_search_translates_byte_for_byte_as_hf_generate(tmp_path, monkeypatch):
    """--decoder static (decode.StaticDecoder.beam_search: 4 beams, each batch its own output limit),
    and auto, which is static on CPU, write the file HF generate writes (--decoder dynamic), for a
    sharpened tiny NLLB (conftest.sharpened: its translations depend on the source and on each
    beam's history). The decoder's buffers are the first batch's in every batch (decode.reserve:
    on a GPU a buffer that moved would make CUDA graphs record every shape again; at --max-tokens
    100 a later batch needs more room than the first, and before the reservation the buffers moved)."""
    load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: sharpened(load(*args, **kwargs)))
    searched, buffers = [], []
    search = decode.StaticDecoder.beam_search

    def counted(self, input_ids, *args, **kwargs):
        searched.append(input_ids.shape[0])
        out = search(self, input_ids, *args, **kwargs)
        buffers.append(dict(self.buffers))    # (kept: a buffer freed and allocated again could reuse its address)
        return out

    monkeypatch.setattr(decode.StaticDecoder, "beam_search", counted)
    predictions = os.path.join(DATA_DIR, "xquad", "predictions", "CL-mt5base.en.json")
    files, sources = {}, {}
    for decoder in ("dynamic", "static", "auto"):       # auto: static on CPU (faster than HF generate there)
        files[decoder] = tmp_path / f"preds.{decoder}.json"
        searched.clear()
        buffers.clear()
        run("--predictions", predictions, "--tgt-lang", "de", "--out-file", str(files[decoder]), "--limit", "40",
            "--max-tokens", "100", "--decoder", decoder)
        sources[decoder] = list(searched)
        assert [name for later in buffers[1:] for name, buffer in later.items() if buffer is not buffers[0][name]] == []
    # every batch but HF generate's: the 25 distinct sentences of the 40, in several batches
    assert sources["dynamic"] == [] and sum(sources["static"]) == 25 and len(sources["static"]) > 1
    assert sources["auto"] == sources["static"]
    assert files["static"].read_bytes() == files["dynamic"].read_bytes() == files["auto"].read_bytes()
    assert len(set(data.read_predictions(str(files["static"])).values())) > 3   # not one output for all (6 of 25)


def test_bad_input(tmp_path, monkeypatch):
    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            run(*argv)
        assert "\n" not in str(e.value.code)
        return str(e.value.code)
    out = tmp_path / "good.json"
    out.write_text('{"already": "good"}')
    common = ["--task", "xquad", "--train-file", STANDIN, "--out-file", str(out)]
    assert "unknown language 'xx'" in fails(*common, "--tgt-lang", "xx")
    assert "not a translation model" in fails("--model", "tiny-mt5", *common, "--tgt-lang", "fr")
    assert "not a translation checkpoint" in fails("--model", "facebook/mbart-large-50", *common, "--tgt-lang", "fr")
    assert "mbart has no language code for 'el'" in fails("--model", "tiny-mbart", *common, "--tgt-lang", "el")
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [\n oops')
    assert "broken.json:2: invalid JSON" in fails("--task", "xquad", "--train-file", str(broken), "--tgt-lang", "fr",
                                                   "--out-file", str(out))
    assert out.read_text() == '{"already": "good"}'
    # an interrupted run never replaces a good output file
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(loop, "generate_batch", killed)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: status 130, resumable
        run(*common, "--tgt-lang", "fr", "--limit", "5")
    assert out.read_text() == '{"already": "good"}'


def test_a_progress_line_cut_inside_a_utf8_character_is_ignored(tmp_path, monkeypatch):
    """A kill can cut the last line of OUT.progress.jsonl anywhere, even between the bytes of one
    character (here inside 'é'): the rerun ignores that line and produces the file of an
    uninterrupted run."""
    common = ["--task", "xlsum", "--train-file", FIXTURE_EN, "--tgt-lang", "fr", "--chunk-size", "1"]
    run(*common, "--out-file", str(tmp_path / "straight.jsonl"))
    Counter(monkeypatch, stop_after_examples=2)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: status 130, resumable
        run(*common, "--out-file", str(tmp_path / "cut.jsonl"))
    monkeypatch.undo()
    progress = tmp_path / "cut.jsonl.progress.jsonl"
    line = json.dumps({"kind": "sentence", "src": "Café au lait.", "tgt": "Café crème."}, ensure_ascii=False).encode()
    cut = line[:line.index("é".encode()) + 1]  # the first byte of the two-byte 'é'
    with pytest.raises(UnicodeDecodeError):
        cut.decode("utf-8")
    with open(progress, "ab") as f:
        f.write(cut)
    run(*common, "--out-file", str(tmp_path / "cut.jsonl"))
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert not progress.exists()


def test_shards_merge_into_exactly_the_unsharded_file(tmp_path, monkeypatch, capsys):
    """A translation in 3 shards, the second interrupted after 2 examples and run again, merged:
    the same bytes as one unsharded run. The merge refuses a missing shard and one made from other
    settings, and removes the shards once it has written the file."""
    common = ["--task", "xquad", "--train-file", STANDIN, "--tgt-lang", "de", "--limit", "150", "--chunk-size", "1"]
    run(*common, "--out-file", str(tmp_path / "straight.json"))
    out = str(tmp_path / "sharded.json")
    for i in (1, 3):
        run(*common, "--out-file", out, "--shard", f"{i}/3")
    with pytest.raises(SystemExit) as e:
        run(*common, "--out-file", out, "--merge", "3")
    assert "1 of the 3 shards are not there" in str(e.value) and f"{out}.shard-2-of-3.jsonl" in str(e.value)
    Counter(monkeypatch, stop_after_examples=2)
    with pytest.raises(SystemExit, match="^130$"):
        run(*common, "--out-file", out, "--shard", "2/3")
    monkeypatch.undo()
    assert not os.path.exists(f"{out}.shard-2-of-3.jsonl") and os.path.exists(f"{out}.shard-2-of-3.jsonl.progress.jsonl")
    run(*common, "--out-file", out, "--shard", "2/3")
    shards = [f"{out}.shard-{i}-of-3.jsonl" for i in (1, 2, 3)]
    keys = [[json.loads(line)["key"] for line in open(path).readlines()[1:]] for path in shards]
    assert all(keys) and sum(map(len, keys)) == len({k for ks in keys for k in ks})  # disjoint, none empty
    # a shard made from another input (here: another --limit) is refused by name
    run("--task", "xquad", "--train-file", STANDIN, "--tgt-lang", "de", "--limit", "60", "--chunk-size", "1",
        "--out-file", str(tmp_path / "other.json"), "--shard", "1/3")
    good = open(shards[0], "rb").read()
    os.replace(f"{tmp_path / 'other.json'}.shard-1-of-3.jsonl", shards[0])
    with pytest.raises(SystemExit) as e:
        run(*common, "--out-file", out, "--merge", "3")
    assert f"{shards[0]}: made with other settings or input (limit)" in str(e.value)
    with open(shards[0], "wb") as f:
        f.write(good)
    run(*common, "--out-file", out, "--merge", "3")
    assert open(out, "rb").read() == (tmp_path / "straight.json").read_bytes()
    assert not any(os.path.exists(path) for path in shards)
