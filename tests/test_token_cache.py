"""The token cache (token_cache.py): cached batches equal in-memory batches, Prefix-LM cut in token
space on word boundaries, safe builds (two at once, killed, cut short, corrupt), memory per example."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch

import data
import finetune
import models
import token_cache
from conftest import DATA_DIR, FAMILIES, FIXTURES, REPO


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One cache for the module's read-only uses (the tests that damage entries use their own)."""
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="module")
def encoders(tokenizers):
    """Per family: (encoder at the model's maximum length, encoder at short lengths that cut)."""
    out = {}
    for name, family in FAMILIES.items():
        length = models.max_length(models.load_config(name, DATA_DIR))
        out[name] = (models.Seq2SeqEncoder(tokenizers[name], family, length, length),
                     models.Seq2SeqEncoder(tokenizers[name], family, 128, 24))
    return out


TASK_FILES = [("xquad", lambda: data.squad_path(DATA_DIR, "train"), "en"),
              ("xquad", lambda: data.xquad_path(DATA_DIR, "zh"), "zh"),
              ("xlsum", lambda: data.gum_path(DATA_DIR), "en"),
              ("xlsum", lambda: os.path.join(FIXTURES, "russian_train.jsonl"), "ru")]


def batch_bytes(stream, pad_token_id, epochs=(0, 1)):
    """Every batch of some epochs, indices and padded tensors, as one hash (and the batches)."""
    digest, batches = hashlib.sha256(), []
    for epoch in epochs:
        for batch in stream.epoch_batches(epoch):
            batches.append(batch)
            digest.update(json.dumps(batch).encode())
            for tensor in stream.collate(batch, pad_token_id).values():
                digest.update(tensor.numpy().tobytes())
    return digest.hexdigest(), batches


def reference_epoch_batches(encoded, max_tokens, seed, epoch):
    """The batches of one epoch as data.TokenBatches made them before the token cache (d0c873a:
    lists of lists over truncated examples), kept here as the reference the array version must equal."""
    encoded = [{"input_ids": data.truncate(e["input_ids"], max_tokens), "labels": data.truncate(e["labels"], max_tokens)}
               for e in encoded]
    rng = np.random.default_rng([seed, epoch])
    src = np.array([len(e["input_ids"]) for e in encoded])
    tgt = np.array([len(e["labels"]) for e in encoded])
    order = np.lexsort((rng.permutation(len(encoded)), tgt, src)).tolist()
    batches, batch, batch_max = [], [], 0
    for idx in order:
        length = max(len(encoded[idx]["input_ids"]), len(encoded[idx]["labels"]))
        new_max = max(batch_max, length)
        if batch and new_max * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, new_max = [], length
        batch.append(idx)
        batch_max = new_max
    batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]


def reference_padding_efficiency(encoded, max_tokens, batches):
    """Real / padded tokens over sources and targets, as d0c873a computed it, example by example."""
    real = padded = 0
    for batch in batches:
        src = [min(len(encoded[i]["input_ids"]), max_tokens) for i in batch]
        tgt = [min(len(encoded[i]["labels"]), max_tokens) for i in batch]
        real += sum(src) + sum(tgt)
        padded += len(batch) * (max(src) + max(tgt))
    return real / padded


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_task_batches_are_the_in_memory_batches_bit_for_bit(name, encoders, root):
    """Today's path (read the file, encode every example into lists, batch) against the cache's, for
    each family, both tasks, two languages, and lengths that cut: the same examples, the same
    batches in the same order (those of the list implementation before the cache), the same tensors,
    the same counts of what was cut, the same resume."""
    full, short = encoders[name]
    cases = [(encoder, files, 300) for encoder in (full, short) for files in TASK_FILES[1:]]
    if name == "tiny-mt5":  # the study's QA training file, at the paper's budget (9,380 examples: one family)
        cases.append((full, TASK_FILES[0], 4000))
    for encoder, (task, path, lang), max_tokens in cases:
        examples, _ = finetune.read_task(task, path(), lang)
        stats = {}
        in_memory = encoder.encode(examples, stats)
        cached = token_cache.task_examples(task, path(), lang, encoder, root)
        assert [cached[i] for i in range(len(cached))] == in_memory
        assert cached.stats() == stats
        old = data.TokenBatches(in_memory, max_tokens, seed=3)
        new = data.TokenBatches(cached, max_tokens, seed=3)
        hashed, batches = batch_bytes(new, encoder.pad_token_id)
        assert (hashed, batches) == batch_bytes(old, encoder.pad_token_id)
        assert batches == reference_epoch_batches(in_memory, max_tokens, 3, 0) + \
               reference_epoch_batches(in_memory, max_tokens, 3, 1)
        assert new.num_truncated == old.num_truncated
        assert new.padding_efficiency() == reference_padding_efficiency(in_memory, max_tokens, batches[:len(new.epoch_batches(0))])
        # resume mid-epoch 1 from a JSON round trip of the state, continuing across the end of epoch 1
        for _ in range(len(old.epoch_batches(0)) + 2):
            next(old)
        state = json.loads(json.dumps(old.state_dict()))
        resumed = data.TokenBatches(token_cache.task_examples(task, path(), lang, encoder, root), max_tokens, seed=3)
        resumed.load_state_dict(state)
        assert [next(resumed) for _ in range(len(old.epoch_batches(1)))] == \
               [next(old) for _ in range(len(old.epoch_batches(1)))]
    # the limit of --max-train-examples / the test sets' cut: the first N examples of the file
    examples, _ = finetune.read_task("xquad", data.xquad_path(DATA_DIR, "zh"), "zh", limit=100)
    head = token_cache.task_examples("xquad", data.xquad_path(DATA_DIR, "zh"), "zh", full, root, limit=100)
    assert len(head) == 100 and [head[i] for i in range(len(head))] == full.encode(examples)


def _prefix_lm(name, lang, tokenizers, encoder, root, seed=0):
    path = data.text_path(DATA_DIR, lang)
    paragraphs = token_cache.text_paragraphs(path, tokenizers[name], root)
    return data.read_text(path), paragraphs, data.PrefixLMExamples(paragraphs, lang, encoder, seed=seed)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefix_lm_splits_every_paragraph_at_a_word_boundary(name, tokenizers, encoders, root):
    """Decoded, each source and continuation are the beginning and the end of their paragraph's text:
    split at a space in languages written with spaces, anywhere between characters in zh, ja and th,
    neither side empty; the paragraphs that cannot be split are those of one word."""
    long_encoder = models.Seq2SeqEncoder(tokenizers[name], FAMILIES[name], 10 ** 6, 10 ** 6)  # nothing cut
    tokenizer = tokenizers[name]
    for lang in ("en", "ru", "zh", "th"):
        texts, paragraphs, examples = _prefix_lm(name, lang, tokenizers, long_encoder, root)
        assert len(paragraphs) == len(texts)
        spaces = data.get_language(lang).spaces
        skipped = set(range(len(texts))) - set(examples.rows.tolist())
        assert all(len(texts[i].split()) == 1 for i in skipped) if spaces else not skipped
        for i in range(len(examples)):
            text = texts[int(examples.rows[i])]
            example = examples[i]
            source = tokenizer.decode(example["input_ids"], skip_special_tokens=True)
            target = tokenizer.decode(example["labels"], skip_special_tokens=True)
            assert source.strip() and target.strip(), (lang, text)
            if spaces:
                assert text == source + " " + target, (lang, text, source, target)
            else:  # between two characters, or at a space between words in Latin letters ("3.33 m")
                assert text in (source + target, source + " " + target), (lang, text, source, target)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefix_lm_lengths_and_cuts_match_the_encoded_examples(name, tokenizers, encoders, root):
    """The lengths a stream batches on (computed without reading a token) are those of the examples it
    collates, with the family's affixes, and the counts of cut sources and targets are right, at the
    model's length and at short lengths that cut most examples."""
    for encoder in encoders[name]:
        for lang in ("en", "zh"):
            _, paragraphs, examples = _prefix_lm(name, lang, tokenizers, encoder, root)
            prefix, suffix = encoder.affixes(lang)
            cut_sources = cut_targets = 0
            for i in range(len(examples)):
                example = examples[i]
                assert (len(example["input_ids"]), len(example["labels"])) == \
                       (examples.src_lengths[i], examples.tgt_lengths[i])
                assert example["input_ids"][:len(prefix)] == prefix and example["input_ids"][-1] == suffix[-1]
                assert example["labels"][:len(prefix)] == prefix and example["labels"][-1] == encoder.eos_token_id
                para = paragraphs[int(examples.rows[i])]["input_ids"]
                cut = int(examples.cuts[i])
                cut_sources += cut > encoder.max_source_length - len(prefix) - len(suffix)
                cut_targets += len(para) - cut + len(prefix) + len(suffix) > encoder.max_target_length
            assert examples.stats() == {"num_examples": len(examples), "num_cut_sources": cut_sources,
                                        "num_cut_targets": cut_targets}
        assert encoder.max_target_length != 24 or cut_targets > 0  # the short encoder does cut


def test_prefix_lm_is_seeded_and_its_stream_resumes_exactly(tokenizers, encoders, root):
    encoder = encoders["tiny-mt5"][0]
    _, _, a = _prefix_lm("tiny-mt5", "fr", tokenizers, encoder, root, seed=0)
    _, _, b = _prefix_lm("tiny-mt5", "fr", tokenizers, encoder, root, seed=0)
    _, _, c = _prefix_lm("tiny-mt5", "fr", tokenizers, encoder, root, seed=1)
    assert np.array_equal(a.cuts, b.cuts) and not np.array_equal(a.cuts, c.cuts)
    stream = data.TokenBatches(a, 2000, seed=4)
    for _ in range(len(stream.epoch_batches(0)) - 2):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [stream.collate(next(stream), 0)["labels"] for _ in range(6)]
    resumed = data.TokenBatches(b, 2000, seed=4)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.collate(next(resumed), 0)["labels"], labels) for labels in expected)


def test_cuts_are_drawn_the_same_whatever_the_reading_chunk(tokenizers, encoders, root, monkeypatch):
    """Paragraphs are read in groups of CHUNK_TOKENS tokens; a group boundary changes nothing
    but the draw order's grouping, which the seeded draw does not depend on."""
    encoder = encoders["tiny-nllb"][0]
    _, paragraphs, whole = _prefix_lm("tiny-nllb", "ru", tokenizers, encoder, root)
    monkeypatch.setattr(data.PrefixLMExamples, "CHUNK_TOKENS", 997)  # many groups, cut mid-paragraph
    small = data.PrefixLMExamples(paragraphs, "ru", encoder, seed=0)
    assert np.array_equal(whole.rows, small.rows) and np.array_equal(whole.cuts, small.cuts)


def test_zmbart_examples_from_the_cache_are_the_in_memory_ones(tokenizers, encoders, root):
    encoder = encoders["tiny-mbart"][1]
    path = data.text_path(DATA_DIR, "es")
    expected = encoder.encode(data.self_supervised_examples(data.read_text(path), "es", "zmbart", seed=2))
    cached = token_cache.self_supervised(path, "es", "zmbart", encoder, root, seed=2)
    assert [cached[i] for i in range(len(cached))] == expected


# ----------------------------------------------------------------------------- a cache entry's life

def _big_text(path, megabytes):
    """Real text repeated to a size (each copy of a line numbered, so the file is not one repeated block)."""
    lines = data.read_text(data.text_path(DATA_DIR, "en"))
    with open(path, "w", encoding="utf-8") as f:
        written, copy = 0, 0
        while written < megabytes * 2 ** 20:
            block = "".join(f"{line} ({copy})\n" for line in lines)
            f.write(block)
            written, copy = written + len(block.encode()), copy + 1
    return str(path)


BUILD = """
import sys; sys.path.insert(0, {repo!r})
import models, token_cache
tokenizer = models.load_tokenizer("tiny-mt5", {data!r})
entry = token_cache.text_paragraphs({path!r}, tokenizer, {root!r})
print("RESULT", len(entry), entry.meta["num_tokens"], entry.directory)
"""


def _build_process(path, root):
    return subprocess.Popen([sys.executable, "-c", BUILD.format(repo=REPO, data=DATA_DIR, path=path, root=root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _entry_bytes(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in ("tokens.bin", "index.npy")}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_tokenizers_cache_key_does_not_depend_on_the_calls_before_it(name, tokenizers, tmp_path):
    """Two loads of one tokenizer, one of them called with truncation and padding first (as a run's
    evaluation encoder calls it): HF leaves those settings on the backend, and they were part of the
    key, so a process that had tokenized with truncation built a second entry for the same text (the
    IT corpus: ~30 min at real size) and did not find the first one's leftovers (seen in CI)."""
    fresh, used = (models.load_tokenizer(name, DATA_DIR) for _ in range(2))
    used(["one two three four five six", "seven"], truncation=True, max_length=4, padding=True)
    assert json.loads(used.backend_tokenizer.to_str())["truncation"] is not None  # the state is there
    assert token_cache.tokenizer_digest(used) == token_cache.tokenizer_digest(fresh)
    path = tmp_path / "text.txt"
    path.write_text("\n".join(data.read_text(data.text_path(DATA_DIR, "en"))[:200]) + "\n", encoding="utf-8")
    first = token_cache.text_paragraphs(str(path), fresh, str(tmp_path / "cache"))
    assert token_cache.text_paragraphs(str(path), used, str(tmp_path / "cache")).directory == first.directory


@pytest.mark.slow
def test_two_jobs_building_one_entry_at_once_build_it_once(tokenizers, tmp_path):
    path, root = _big_text(tmp_path / "text.txt", 3), str(tmp_path / "cache")
    jobs = [_build_process(path, root) for _ in range(2)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    results = [next(line for line in out.splitlines() if line.startswith("RESULT")) for out, _ in outputs]
    assert results[0] == results[1]
    builds = sum(out.count("token cache: text.txt.text.") for out, _ in outputs)
    assert builds == 1  # one built it, the other waited on the lock and read it
    entries = [name for name in os.listdir(root) if name.startswith("text.txt.")]
    assert sorted(entries) == sorted([os.path.basename(results[0].split()[-1]), os.path.basename(results[0].split()[-1]) + ".lock"])
    fresh = token_cache.text_paragraphs(path, tokenizers["tiny-mt5"], str(tmp_path / "other"))
    assert _entry_bytes(results[0].split()[-1]) == _entry_bytes(fresh.directory)


@pytest.mark.slow
def test_a_build_killed_midway_leaves_nothing_that_is_read(tokenizers, tmp_path):
    path, root = _big_text(tmp_path / "text.txt", 6), str(tmp_path / "cache")
    job = _build_process(path, root)
    def writing():  # the build's first tokens are in its temporary tokens.bin (~2 s before it ends, here)
        temporary = [name for name in os.listdir(root) if ".tmp-" in name] if os.path.isdir(root) else []
        tokens = [os.path.join(root, name, "tokens.bin") for name in temporary]
        return any(os.path.isfile(f) and os.path.getsize(f) > 0 for f in tokens)
    deadline = time.time() + 120
    while time.time() < deadline and not writing():
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.communicate()
    assert job.returncode == -signal.SIGKILL
    assert not [name for name in os.listdir(root) if name.startswith("text.txt.text.") and
                not name.endswith(".lock") and ".tmp-" not in name]  # killed before it finished
    entry = token_cache.text_paragraphs(path, tokenizers["tiny-mt5"], root)
    assert [name for name in os.listdir(root) if ".tmp-" in name] == []  # the killed job's leftovers removed
    fresh = token_cache.text_paragraphs(path, tokenizers["tiny-mt5"], str(tmp_path / "other"))
    assert _entry_bytes(entry.directory) == _entry_bytes(fresh.directory)


def test_an_entry_cut_short_or_corrupt_is_rebuilt_not_read(tokenizers, encoders, tmp_path, capsys):
    encoder, root = encoders["tiny-mt5"][0], str(tmp_path)
    path = data.gum_path(DATA_DIR)
    good = token_cache.task_examples("xlsum", path, "en", encoder, root)
    expected = [good[i] for i in range(len(good))]
    tokens = os.path.join(good.directory, "tokens.bin")
    damages = {
        "cut short": lambda: os.truncate(tokens, os.path.getsize(tokens) // 2),
        "corrupt": lambda: _flip_byte(tokens, os.path.getsize(tokens) // 3),
        "index cut": lambda: os.truncate(os.path.join(good.directory, "index.npy"), 100),
        "no meta": lambda: os.remove(os.path.join(good.directory, "meta.json")),
        "meta garbage": lambda: open(os.path.join(good.directory, "meta.json"), "w").write("{"),
    }
    for what, damage in damages.items():
        damage()
        capsys.readouterr()
        again = token_cache.task_examples("xlsum", path, "en", encoder, root)
        assert "rebuilding" in capsys.readouterr().out, what
        assert [again[i] for i in range(len(again))] == expected, what
    assert sorted(os.listdir(root)) == sorted(["digests", os.path.basename(good.directory),
                                               os.path.basename(good.directory) + ".lock"])


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_an_entry_belongs_to_a_file_content_a_tokenizer_and_lengths(tokenizers, encoders, tmp_path):
    root = str(tmp_path / "cache")
    copy = str(tmp_path / "gum_en.jsonl")
    shutil.copy(data.gum_path(DATA_DIR), copy)
    first = token_cache.task_examples("xlsum", copy, "en", encoders["tiny-mt5"][0], root)
    assert token_cache.task_examples("xlsum", copy, "en", encoders["tiny-mt5"][0], root).directory == first.directory
    assert token_cache.task_examples("xlsum", data.gum_path(DATA_DIR), "en", encoders["tiny-mt5"][0], root).directory \
        == first.directory  # same content elsewhere: the same entry
    others = {token_cache.task_examples("xlsum", copy, "en", encoders["tiny-mt5"][1], root).directory,  # lengths
              token_cache.task_examples("xlsum", copy, "en", encoders["tiny-nllb"][0], root).directory,  # tokenizer
              token_cache.task_examples("xlsum", copy, "fr", encoders["tiny-mt5"][0], root).directory}   # language
    assert len(others) == 3 and first.directory not in others
    with open(copy, "a", encoding="utf-8") as f:  # the file changes: a new entry, with the new record
        f.write(json.dumps({"id": "new", "url": "", "title": "", "summary": "A new one.", "text": "It is new."}) + "\n")
    changed = token_cache.task_examples("xlsum", copy, "en", encoders["tiny-mt5"][0], root)
    assert changed.directory != first.directory and len(changed) == len(first) + 1


def test_a_bad_file_is_the_readers_one_line_error_and_no_entry_is_left(encoders, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "summary": "s", "text": "t"}\n{"id": "2", "summary": 3, "text": "t"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: missing or non-string field\(s\) summary"):
        token_cache.task_examples("xlsum", str(bad), "en", encoders["tiny-mt5"][0], str(tmp_path / "cache"))
    left = sorted(os.listdir(tmp_path / "cache"))
    assert len(left) == 2 and left[0].endswith(".lock") and left[1] == "digests"  # no entry, no temporary directory


def _stream_peak(path, encoder, root):
    """Peak bytes allocated (tracemalloc sees numpy's buffers too) by opening a warm entry, cutting its
    Prefix-LM examples and making their batches."""
    token_cache.text_paragraphs(path, encoder.tokenizer, root)  # built (cold) before measuring
    tracemalloc.start()
    examples = token_cache.self_supervised(path, "en", "prefix_lm", encoder, root)
    next(data.TokenBatches(examples, 4000, seed=0))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, len(examples), token_cache.text_paragraphs(path, encoder.tokenizer, root).meta["num_tokens"]


def test_a_stream_holds_lengths_not_tokens(encoders, tmp_path, monkeypatch):
    """Four times the text (1 -> 4 MB) costs a few dozen bytes more per added example (lengths, offsets, cut, one
    epoch's order), not per token: the in-memory path held every token id as a Python int in lists
    (~36 bytes a token, ~10 kB for a 300-token paragraph). The paragraphs are read in groups of
    CHUNK_TOKENS tokens, so what reading costs does not grow with the file either."""
    monkeypatch.setattr(data.PrefixLMExamples, "CHUNK_TOKENS", 1 << 16)
    encoder, root = encoders["tiny-mt5"][0], str(tmp_path)
    small = _stream_peak(_big_text(tmp_path / "small.txt", 1), encoder, root)
    large = _stream_peak(_big_text(tmp_path / "large.txt", 4), encoder, root)
    per_example = (large[0] - small[0]) / (large[1] - small[1])
    per_token = (large[0] - small[0]) / (large[2] - small[2])
    print(f"{small[1]:,} -> {large[1]:,} examples ({small[2]:,} -> {large[2]:,} tokens): peak "
          f"{small[0] / 2 ** 20:.1f} -> {large[0] / 2 ** 20:.1f} MB, {per_example:.0f} bytes per added example, "
          f"{per_token:.2f} per added token")
    assert per_example < 100
    assert per_token < 1.0


def test_the_cache_lives_beside_writable_data_else_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XLGEN_TOKEN_CACHE", raising=False)
    monkeypatch.setenv("XLGEN_CACHE", str(tmp_path / "user"))
    assert token_cache.cache_root(None, str(tmp_path)) == str(tmp_path / "token-cache")
    assert token_cache.cache_root(None, DATA_DIR) == str(tmp_path / "user" / "tokens")  # ../shared/data is read-only
    assert token_cache.cache_root(str(tmp_path / "mine"), DATA_DIR) == str(tmp_path / "mine")
    monkeypatch.setenv("XLGEN_TOKEN_CACHE", str(tmp_path / "env"))
    assert token_cache.cache_root(None, str(tmp_path)) == str(tmp_path / "env")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(data.UsageError, match=r"--token-cache .*a-file/x: cannot create the token cache"):
        token_cache.cache_root(str(tmp_path / "a-file" / "x"), None)


def test_a_full_disk_is_one_line_naming_the_cache_and_leaves_nothing(encoders, tmp_path, monkeypatch):
    def full(self, sources, targets, flags):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(token_cache.EntryWriter, "add", full)
    root = str(tmp_path / "cache")
    with pytest.raises(data.DataError, match=r"cache/gum_en.jsonl.xlsum-en.\w+.tmp-\d+: cannot write the token cache "
                                             r"\(No space left on device\); free space there or pass another --token-cache"):
        token_cache.task_examples("xlsum", data.gum_path(DATA_DIR), "en", encoders["tiny-mt5"][0], root)
    assert not [name for name in os.listdir(root) if name.startswith("gum_en") and not name.endswith(".lock")]


def test_the_command_builds_a_models_entries_ahead_of_a_run(root, capsys):
    from conftest import run_cli
    code, out, _ = run_cli(token_cache, ["--model", "tiny-mt5", "--data-dir", DATA_DIR, "--task", "xquad",
                                         "--text-langs", "fr", "--token-cache", root], capsys)
    assert code == 0
    assert "train-standin-v1.1.json.gz: 9,380 examples in " in out
    fr = len(data.read_text(data.text_path(DATA_DIR, "fr")))
    assert f"fr: {fr:,} paragraphs" in out


def test_a_quick_run_encodes_its_first_examples_only_unless_the_whole_file_is_cached(encoders, tmp_path):
    """--max-train-examples 50 without the whole file's entry: an entry of those 50 (a quick run does not
    tokenize all 9,380); once the whole file is cached, the first 50 of it. Both equal encoding them."""
    encoder, root, path = encoders["tiny-nllb"][1], str(tmp_path), data.squad_path(DATA_DIR, "train")
    expected = encoder.encode(finetune.read_task("xquad", path, "en", limit=50)[0])
    quick = token_cache.task_examples("xquad", path, "en", encoder, root, limit=50)
    assert quick.meta["num_examples"] == 50 and "-first50." in quick.directory
    assert [quick[i] for i in range(50)] == expected
    whole = token_cache.task_examples("xquad", path, "en", encoder, root)
    assert len(whole) == 9380
    head = token_cache.task_examples("xquad", path, "en", encoder, root, limit=50)
    assert not hasattr(head, "directory") and [head[i] for i in range(50)] == expected  # a view of the whole entry
