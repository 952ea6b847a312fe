"""Inputs at full length: XL-Sum articles are often longer than a model takes. Sources are cut so
that the encoder never sees more positions than the model has, for every family and method; the
prompt's vectors take positions too (paper: 100 of them; mBART has 1024 learned positions)."""

import json

import pytest
import torch

import adapt
import data
import finetune
import loop
import models
from conftest import DATA_DIR, FAMILIES

# every method that trains on one source language (multisrc is mix-like on the data side only)
METHODS = [name for name, method in adapt.REGISTRY.items() if not method.several_sources]


def long_articles(lang, num, min_chars=9000):
    """XL-Sum-format records whose text is consecutive real paragraphs of ../shared/data/text, at
    least `min_chars` characters long (over 1,100 tokens for every tiny tokenizer), with a summary."""
    lines = data.read_text(data.text_path(DATA_DIR, lang))
    records, start = [], 0
    for i in range(num):
        text, end = "", start
        while len(text) < min_chars:
            text, end = (text + "\n" + lines[end]).strip(), end + 1
        records.append({"id": f"long-{lang}-{i}", "url": "", "title": "", "text": text, "summary": lines[end]})
        start = end + 1
    return records


@pytest.fixture(scope="module")
def articles():
    return long_articles("en", 2)


def adapted(name, method):
    options = {"prompt": {"prompt_length": 100}, "adapters": {"bottleneck": 8}, "mix": {"mix_langs": ["fr"]}}
    return adapt.apply(models.load_model(name, DATA_DIR), method, verbose=False, **options.get(method, {}))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_training_step_and_a_generation_on_articles_over_1100_tokens(name, method, articles, tokenizers):
    torch.manual_seed(0)
    tokenizer, family = tokenizers[name], FAMILIES[name]
    model = adapted(name, method)
    examples = data.summarization_examples(articles, "en")
    assert min(len(tokenizer(ex.source)["input_ids"]) for ex in examples) > 1100
    encoder = models.Seq2SeqEncoder(tokenizer, family, adapt.max_source_length(model), models.max_length(model.config))
    stats = {}
    encoded = encoder.encode(examples, stats)
    prompt = 100 if method == "prompt" else 0
    assert stats["num_cut_sources"] == 2 and all(len(e["input_ids"]) + prompt == models.max_length(model.config)
                                                 for e in encoded)
    assert model.config.to_dict().get("max_position_embeddings", 1024) == 1024  # the real position tables
    if family != "mt5":  # the language code and </s> survive the cut
        assert [e["input_ids"][0] for e in encoded] == [tokenizer.convert_tokens_to_ids(models.language_code(family, "en"))] * 2
    assert all(e["input_ids"][-1] == tokenizer.eos_token_id for e in encoded)
    optimizer = loop.make_optimizer(model, 1e-3)
    model.train()
    batch = data.collate(encoded, tokenizer.pad_token_id)
    loss, num_tokens, grad_norm = loop.train_step(model, optimizer, [batch], 1e-3, 1.0, torch.device("cpu"))
    assert torch.isfinite(torch.tensor(loss)) and num_tokens > 0
    texts = loop.generate(model, tokenizer, encoded, encoder.generation_kwargs("en"), torch.device("cpu"), max_new_tokens=4)
    assert len(texts) == 2


def test_without_room_for_the_prompt_mbart_runs_past_its_position_table(articles, tokenizers):
    """The control: a 1024-token source plus 100 prompt vectors asks for position 1124 of 1024."""
    model = adapted("tiny-mbart", "prompt")
    encoder = models.Seq2SeqEncoder(tokenizers["tiny-mbart"], "mbart", max_source_length=1024)
    batch = data.collate(encoder.encode(data.summarization_examples(articles, "en")), tokenizers["tiny-mbart"].pad_token_id)
    with pytest.raises(IndexError):
        loop.token_loss(model, batch)


@pytest.mark.slow
def test_mbart_prompt_tuning_on_long_articles_end_to_end(tmp_path, capsys):
    xlsum = tmp_path / "xlsum"
    xlsum.mkdir()
    for lang, split, num in (("en", "train", 4), ("fr", "val", 2), ("fr", "test", 2)):
        folder = data.get_language(lang).xlsum
        with open(xlsum / f"{folder}_{split}.jsonl", "w", encoding="utf-8") as f:
            for record in long_articles(lang, num, min_chars=9000 if lang == "en" else 5000):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    results = finetune.main(finetune.parse_args([
        "--model", "tiny-mbart", "--task", "xlsum", "--method", "prompt", "--data-dir", DATA_DIR, "--xlsum-dir", str(xlsum),
        "--val-langs", "fr", "--test-langs", "fr", "--max-steps", "2", "--eval-every", "2", "--warmup-steps", "1",
        "--max-tokens", "4000", "--max-new-tokens", "6", "--out-dir", str(tmp_path / "run")]))
    out = capsys.readouterr().out
    assert "4 sources cut to 924" in out  # 1024 positions - 100 prompt vectors
    assert results["data"]["task/en"]["num_cut_sources"] == 4 and results["test"]["fr"]["num_predictions"] == 2
