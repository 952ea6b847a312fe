"""models.py: tiny models of the real families, built in-process, loaded like hub checkpoints."""

import os

import pytest
import torch
from safetensors.torch import load_file

import data
import models
from conftest import DATA_DIR, FAMILIES

CLASSES = {"tiny-mt5": ("MT5ForConditionalGeneration", "T5Tokenizer"),
           "tiny-mbart": ("MBartForConditionalGeneration", "MBart50Tokenizer"),
           "tiny-nllb": ("M2M100ForConditionalGeneration", "NllbTokenizer")}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_models_use_the_real_classes(name, tokenizers):
    model = models.load_model(name, DATA_DIR)
    assert (type(model).__name__, type(tokenizers[name]).__name__) == CLASSES[name]
    assert data.family_of(model.config) == FAMILIES[name] == models.family_of_name(name)
    assert model.config.vocab_size == len(tokenizers[name])


def test_tiny_mt5_structure(tokenizers):
    model = models.load_model("tiny-mt5", DATA_DIR)
    # mT5: encoder and decoder input embeddings are the shared matrix; lm_head is a separate matrix
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.decoder.embed_tokens.weight is model.shared.weight
    assert model.lm_head.weight is not model.shared.weight
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    saved = load_file(os.path.join(models.resolve("tiny-mt5"), "model.safetensors"))
    assert "lm_head.weight" in saved and "shared.weight" in saved
    tokenizer = tokenizers["tiny-mt5"]
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1  # sentinels at the end, reversed
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == len(tokenizer) - 100
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", ["tiny-mbart", "tiny-nllb"])
def test_tiny_mbart_nllb_structure(name, tokenizers):
    model = models.load_model(name, DATA_DIR)
    inner = model.model
    assert model.lm_head.weight is inner.shared.weight  # tied, as in the real checkpoints
    assert inner.encoder.embed_tokens.weight is inner.shared.weight
    assert model.config.scale_embedding and model.config.decoder_start_token_id == 2
    # no LayerDrop, as in facebook/mbart-large-50 and facebook/nllb-200-* (M2M100Config's default is 0.05)
    assert model.config.encoder_layerdrop == 0.0 and model.config.decoder_layerdrop == 0.0
    tokenizer = tokenizers[name]
    # fairseq layout <s> <pad> </s> <unk>, then the pieces, then language codes and <mask>
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 3)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_reload_gives_identical_logits(name):
    a, b = models.load_model(name, DATA_DIR).eval(), models.load_model(name, DATA_DIR).eval()
    ids = torch.tensor([[7, 8, 9, 10, 2 if name != "tiny-mt5" else 1]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids, labels=ids).logits, b(input_ids=ids, labels=ids).logits)


def test_same_seed_same_model(tmp_path):
    for name in ("tiny-mt5", "tiny-nllb"):
        models.build_tiny(name, str(tmp_path / f"a-{name}"), data_dir=DATA_DIR, seed=0)
        a = load_file(str(tmp_path / f"a-{name}" / "model.safetensors"))
        b = load_file(os.path.join(models.resolve(name), "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with open(tmp_path / f"a-{name}" / "tokenizer.json") as f, \
                open(os.path.join(models.resolve(name), "tokenizer.json")) as g:
            assert f.read() == g.read()
    models.build_tiny("tiny-nllb", str(tmp_path / "seed1"), data_dir=DATA_DIR, seed=1)
    c = load_file(str(tmp_path / "seed1" / "model.safetensors"))
    assert not torch.equal(c["model.shared.weight"], b["model.shared.weight"])  # b: tiny-nllb, seed 0


@pytest.mark.parametrize("name", ["tiny-mbart", "tiny-nllb"])
def test_generation_forces_the_target_language_code(name, tokenizers):
    family = FAMILIES[name]
    model = models.load_model(name, DATA_DIR).eval()
    encoder = data.Seq2SeqEncoder(tokenizers[name], family)
    batch = data.collate(encoder.encode([data.Example("1", "Hello there.", "x", "en", "en")]), 1)
    for lang in ("fr", "zh", "ru", "ko", "es"):
        kwargs = encoder.generation_kwargs(lang)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=4, do_sample=False, **kwargs)
        assert out[0, 0].item() == 2  # decoder start </s>
        assert tokenizers[name].convert_ids_to_tokens(out[0, 1].item()) == data.language_code(family, lang)


def test_unknown_model_name_is_a_one_line_error():
    with pytest.raises(data.DataError, match="--model: unknown model 'gpt-2'"):
        models.check_model_name("gpt-2")
    models.check_model_name("google/mt5-base")  # known hub names pass without loading
