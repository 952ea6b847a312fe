"""models.py: tiny models of the real families, built in-process, loaded like hub checkpoints."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import models
from conftest import DATA_DIR, FAMILIES, run_cli

CLASSES = {"tiny-mt5": ("MT5ForConditionalGeneration", "T5Tokenizer"),
           "tiny-mbart": ("MBartForConditionalGeneration", "MBart50Tokenizer"),
           "tiny-nllb": ("M2M100ForConditionalGeneration", "NllbTokenizer")}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_models_use_the_real_classes(name, tokenizers):
    model = models.load_model(name, DATA_DIR)
    assert (type(model).__name__, type(tokenizers[name]).__name__) == CLASSES[name]
    assert models.family_of(model.config) == FAMILIES[name] == models.family_of_name(name)
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
    """...and building leaves the caller's random state alone: a run that builds tiny-mt5 on first
    use must train like one that finds it built (regression: the builder called torch.manual_seed).
    The builds here reuse the session's SentencePiece models (a minute to train on 2 cores), as the
    builds of a cache do; the tokenizers are still converted from them afresh and compared."""
    models.resolve("tiny-mt5", DATA_DIR)  # the session's cache holds spm/ beside its tiny models
    shutil.copytree(os.path.join(os.path.dirname(models.resolve("tiny-mt5")), "spm"), tmp_path / "spm")
    for name in ("tiny-mt5", "tiny-nllb"):
        torch.manual_seed(1234)
        before = torch.get_rng_state()
        models.build_tiny(name, str(tmp_path / f"a-{name}"), data_dir=DATA_DIR, seed=0)
        assert torch.equal(torch.get_rng_state(), before)
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
    encoder = models.Seq2SeqEncoder(tokenizers[name], family)
    batch = data.collate(encoder.encode([data.Example("1", "Hello there.", "x", "en", "en")]), 1)
    for lang in ("fr", "zh", "ru", "ko", "es"):
        kwargs = encoder.generation_kwargs(lang)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=4, do_sample=False, **kwargs)
        assert out[0, 0].item() == 2  # decoder start </s>
        assert tokenizers[name].convert_ids_to_tokens(out[0, 1].item()) == models.language_code(family, lang)


def test_unknown_model_name_is_a_one_line_error():
    with pytest.raises(common.UsageError, match="--model: cannot find model 'gpt-2'") as e:
        models.family_of_name("gpt-2")
    assert "\n" not in str(e.value)
    assert models.family_of_name("google/mt5-base") == "mt5"  # the paper's hub names: no config needed


def test_any_hub_model_of_a_supported_class_is_recognised_by_its_config(tmp_path, monkeypatch):
    """A hub name outside the paper's three prefixes (here 'bigscience/mt0-tiny', an mT5) is
    recognised by its config's model_type, read from the local hub cache as an offline user has it."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--bigscience--mt0-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(models.resolve("tiny-mt5"), snapshot)
    (cache / "models--bigscience--mt0-tiny" / "refs").mkdir()
    (cache / "models--bigscience--mt0-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants
    import transformers.utils.hub as transformers_hub
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(cache), raising=False)
    assert models.family_of_name("bigscience/mt0-tiny") == "mt5"
    assert type(models.load_model("bigscience/mt0-tiny")).__name__ == "MT5ForConditionalGeneration"
    # a hub model of another class is refused by its model_type, in one line
    gpt = cache / "models--someone--gpt-tiny" / "snapshots" / ("1" * 40)
    gpt.mkdir(parents=True)
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (cache / "models--someone--gpt-tiny" / "refs").mkdir()
    (cache / "models--someone--gpt-tiny" / "refs" / "main").write_text("1" * 40)
    with pytest.raises(common.UsageError, match="unsupported model type 'gpt2'"):
        models.family_of_name("someone/gpt-tiny")


def test_corrupt_checkpoint_is_a_one_line_error_with_a_hint(tmp_path):
    checkpoint = tmp_path / "last"
    shutil.copytree(models.resolve("tiny-nllb"), checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(common.DataError, match=r"cannot load the model .*truncated or corrupt.*best/") as e:
        models.load_model(str(checkpoint))
    assert "\n" not in str(e.value)


def test_cli_describes_the_model_and_batches_squad(capsys):
    code, out, err = run_cli(models, ["--model", "tiny-nllb", "--data-dir", DATA_DIR], capsys)
    assert code == 0, err
    assert "M2M100ForConditionalGeneration" in out and "maximum length 512" in out
    assert "squad train" in out and "9380 examples" in out and "padding efficiency" in out and "'eng_Latn'" in out

