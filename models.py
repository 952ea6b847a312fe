"""Model loading for xlgen: real checkpoints by name, and tiny offline models of the real families.

    python models.py --model tiny-nllb --data-dir ../shared/data      # build (or find) and describe

`tiny-mt5`, `tiny-mbart` and `tiny-nllb` are built on first use into the cache directory
($XLGEN_CACHE, default ~/.cache/xlgen) and loaded from there with `from_pretrained`, exactly like a
hub checkpoint. They use the real classes and mirror the real structure at a tiny size:

  name        model class                     tokenizer class    SentencePiece   embeddings
  tiny-mt5    MT5ForConditionalGeneration     T5Tokenizer        unigram         shared in/out of encoder and
                                                                 <pad></s><unk>  decoder; lm_head UNTIED (as mT5)
  tiny-mbart  MBartForConditionalGeneration   MBart50Tokenizer   unigram         tied, scaled by sqrt(d_model)
                                                                 <unk><s></s>    + 52 language codes, <mask>
  tiny-nllb   M2M100ForConditionalGeneration  NllbTokenizer      BPE             tied, scaled by sqrt(d_model)
                                                                 <unk><s></s>    + 202 language codes, <mask>

The SentencePiece models are trained on ../shared/data/text (12 languages), with full character
coverage and no normalisation so every character of the 12 languages has a piece and text
round-trips. Same seed, same model.
"""

import argparse
import glob
import io
import os
import shutil
import sys
import tempfile

import torch

import data
from data import DataError

TINY_MODELS = ("tiny-mt5", "tiny-mbart", "tiny-nllb")
# Hub names whose family we know; anything else must be a local checkpoint directory.
HUB_PREFIXES = {"google/mt5-": "mt5", "facebook/mbart-large-50": "mbart", "facebook/nllb-200-": "nllb"}

TINY_VERSION = 2         # bump when the tiny builds change: caches of older builds are not reused
TINY_VOCAB_SIZE = 16000  # SentencePiece pieces, before the family's special tokens
TINY_DIMS = dict(d_model=64, num_layers=2, num_heads=4, d_ff=128)


def cache_dir():
    return os.environ.get("XLGEN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "xlgen"))


def default_data_dir():
    """../shared/data beside the repository, unless $XLGEN_DATA_DIR says otherwise."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("XLGEN_DATA_DIR", os.path.join(here, "..", "shared", "data"))


# -----------------------------------------------------------------------------
# SentencePiece models of the tiny tokenizers

def _train_sentencepiece(lines, model_type, **ids):
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=TINY_VOCAB_SIZE, model_type=model_type,
        character_coverage=1.0, normalization_rule_name="identity", input_sentence_size=0,
        max_sentence_length=20000, num_threads=2, minloglevel=2, **ids)
    return buf.getvalue()


def _fairseq_layout(t5_layout_model):
    """Same pieces, with ids 0-2 renamed from T5's <pad></s><unk> to fairseq's <unk><s></s>.

    mBART-50's converter expects the fairseq layout (its vocab is <s><pad></s><unk> + pieces[3:]
    shifted by one, then the language codes), exactly as in facebook/mbart-large-50.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(t5_layout_model)
    piece_type = pb.ModelProto.SentencePiece
    for i, (piece, kind) in enumerate([("<unk>", piece_type.UNKNOWN), ("<s>", piece_type.CONTROL),
                                       ("</s>", piece_type.CONTROL)]):
        proto.pieces[i].piece, proto.pieces[i].type = piece, kind
    spec = proto.trainer_spec
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    return proto.SerializeToString()


def build_sentencepiece(text_dir, out_dir):
    """Train the tiny SentencePiece models on every text/<lang>.txt; write them into out_dir."""
    files = sorted(glob.glob(os.path.join(text_dir, "*.txt")))
    if not files:
        raise DataError(f"{text_dir}: no <lang>.txt files to train the tiny tokenizers on")
    lines = [line for path in files for line in data.read_text(path)]
    unigram = _train_sentencepiece(lines, "unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)  # mT5 layout
    bpe = _train_sentencepiece(lines, "bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)           # NLLB: BPE
    outputs = {"unigram-t5.model": unigram, "unigram-fairseq.model": _fairseq_layout(unigram),
               "bpe-fairseq.model": bpe}
    for name, blob in outputs.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(blob)


# -----------------------------------------------------------------------------
# Tiny models

def _tiny_tokenizer(name, spm_dir):
    """Real tokenizer class converted from our SentencePiece model (needs protobuf)."""
    from transformers import MBart50Tokenizer, NllbTokenizer, T5Tokenizer
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES as NLLB_CODES
    with tempfile.TemporaryDirectory() as tmp:
        # T5Tokenizer(vocab_file=...) silently ignores the file in transformers 5: go through
        # from_pretrained on a directory holding the file under the class's expected name.
        if name == "tiny-mt5":
            shutil.copy(os.path.join(spm_dir, "unigram-t5.model"), os.path.join(tmp, "spiece.model"))
            tokenizer = T5Tokenizer.from_pretrained(tmp)  # 100 <extra_id_N> sentinels appended
        elif name == "tiny-mbart":
            shutil.copy(os.path.join(spm_dir, "unigram-fairseq.model"), os.path.join(tmp, "sentencepiece.bpe.model"))
            tokenizer = MBart50Tokenizer.from_pretrained(tmp, src_lang="en_XX", tgt_lang="en_XX")
        else:
            shutil.copy(os.path.join(spm_dir, "bpe-fairseq.model"), os.path.join(tmp, "sentencepiece.bpe.model"))
            tokenizer = NllbTokenizer.from_pretrained(tmp, src_lang="eng_Latn", tgt_lang="eng_Latn")
            # Converting from the .model file drops NLLB's 202 language codes, which would then
            # encode as <unk>: add them back as special tokens, as facebook/nllb-200-* has them.
            tokenizer.add_special_tokens({"additional_special_tokens": list(NLLB_CODES)})
            tokenizer.src_lang = "eng_Latn"
    tokenizer.model_max_length = data.FAMILY_MAX_LENGTH[name.split("-")[1]]
    return tokenizer


def untie_lm_head(model):
    """Give an mT5 model built from a config its own lm_head, as google/mt5-* checkpoints have.

    MT5Config forces tie_word_embeddings=True, and setting it False would also untie the
    encoder/decoder input embeddings from `shared`. So we keep the config and replace lm_head's
    weight; from_pretrained then keeps it untied. Initialised with std d_model**-0.5 (mT5 uses 1.0),
    so a random model starts with logits of unit scale; created on the model's device.
    """
    vocab_size, d_model = model.lm_head.weight.shape
    weight = torch.randn(vocab_size, d_model, device=model.lm_head.weight.device) * d_model ** -0.5
    model.lm_head.weight = torch.nn.Parameter(weight)
    return model


def _tiny_model(name, tokenizer, seed):
    from transformers import (M2M100Config, M2M100ForConditionalGeneration, MBartConfig,
                              MBartForConditionalGeneration, MT5Config, MT5ForConditionalGeneration)
    d, layers, heads, ff = TINY_DIMS["d_model"], TINY_DIMS["num_layers"], TINY_DIMS["num_heads"], TINY_DIMS["d_ff"]
    torch.manual_seed(seed)
    if name == "tiny-mt5":
        config = MT5Config(vocab_size=len(tokenizer), d_model=d, d_kv=d // heads, d_ff=ff, num_layers=layers,
                           num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        return untie_lm_head(MT5ForConditionalGeneration(config))
    common = dict(vocab_size=len(tokenizer), d_model=d, encoder_layers=layers, decoder_layers=layers,
                  encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ff,
                  decoder_ffn_dim=ff, max_position_embeddings=1024, scale_embedding=True,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                  forced_eos_token_id=2, tie_word_embeddings=True,
                  # no LayerDrop, as in the real checkpoints (M2M100Config defaults to 0.05; with two
                  # decoder layers both can be skipped, cutting the decoder off from the encoder)
                  encoder_layerdrop=0.0, decoder_layerdrop=0.0)
    if name == "tiny-mbart":
        return MBartForConditionalGeneration(MBartConfig(activation_function="gelu", **common))
    return M2M100ForConditionalGeneration(M2M100Config(activation_function="relu", **common))


def build_tiny(name, out_dir, data_dir=None, seed=0):
    """Build a tiny model + tokenizer into out_dir (atomically: temporary directory, then rename)."""
    text_dir = os.path.join(data_dir or default_data_dir(), "text")
    # The SentencePiece models do not depend on the seed (training is deterministic): shared by all.
    spm_dir = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "spm")
    if not os.path.isfile(os.path.join(spm_dir, "bpe-fairseq.model")):
        os.makedirs(os.path.dirname(spm_dir), exist_ok=True)
        tmp_spm = tempfile.mkdtemp(dir=os.path.dirname(spm_dir), prefix=".spm-")
        build_sentencepiece(text_dir, tmp_spm)
        _rename_into_place(tmp_spm, spm_dir)
    tokenizer = _tiny_tokenizer(name, spm_dir)
    model = _tiny_model(name, tokenizer, seed)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=f".{name}-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _rename_into_place(tmp, out_dir)


def _rename_into_place(tmp, final):
    try:
        os.rename(tmp, final)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(final):
            raise


# -----------------------------------------------------------------------------
# Loading by name

def check_model_name(name):
    """Fail early, before any loading, on a name that is neither tiny, a directory nor a known hub model."""
    if name in TINY_MODELS or os.path.isdir(name) or any(name.startswith(p) for p in HUB_PREFIXES):
        return
    raise DataError(f"--model: unknown model '{name}'; use {', '.join(TINY_MODELS)}, a checkpoint "
                    f"directory, or a hub name starting with {', '.join(HUB_PREFIXES)}")


def resolve(name, data_dir=None):
    """Path or hub name to hand to from_pretrained; tiny models are built on first use."""
    check_model_name(name)
    if name not in TINY_MODELS:
        return name
    path = os.path.join(cache_dir(), f"tiny-v{TINY_VERSION}", name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"building {name} into {path} (first use)", file=sys.stderr)
        build_tiny(name, path, data_dir=data_dir)
    return path


def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(name, data_dir=None):
    from transformers import AutoTokenizer
    _quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve(name, data_dir))


def load_model(name, data_dir=None):
    from transformers import AutoModelForSeq2SeqLM
    _quiet_transformers()
    return AutoModelForSeq2SeqLM.from_pretrained(resolve(name, data_dir))


def family_of_name(name, data_dir=None):
    """Model family without loading weights: from the config of a checkpoint or the hub name."""
    if name in TINY_MODELS:
        return name.split("-")[1]
    for prefix, family in HUB_PREFIXES.items():
        if name.startswith(prefix):
            return family
    from transformers import AutoConfig
    return data.family_of(AutoConfig.from_pretrained(resolve(name, data_dir)))


# -----------------------------------------------------------------------------
# Real architectures without weights (meta device): parameter counts, memory and speed benchmarks

REAL_CONFIGS = {
    # config.json values of the hub checkpoints
    "google/mt5-base": ("mt5", dict(vocab_size=250112, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                                    num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu")),
    "google/mt5-large": ("mt5", dict(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                                     num_decoder_layers=24, num_heads=16, feed_forward_proj="gated-gelu")),
    "facebook/mbart-large-50": ("mbart", dict(vocab_size=250054, d_model=1024, encoder_layers=12, decoder_layers=12,
                                              encoder_attention_heads=16, decoder_attention_heads=16,
                                              encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                                              scale_embedding=True, activation_function="gelu")),
    "facebook/nllb-200-distilled-600M": ("nllb", dict(vocab_size=256206, d_model=1024, encoder_layers=12,
                                                      decoder_layers=12, encoder_attention_heads=16,
                                                      decoder_attention_heads=16, encoder_ffn_dim=4096,
                                                      decoder_ffn_dim=4096, max_position_embeddings=1024,
                                                      scale_embedding=True, activation_function="relu",
                                                      encoder_layerdrop=0.0, decoder_layerdrop=0.0)),
}


def real_architecture(name, device="meta"):
    """The model of a real checkpoint with its real dimensions and random (or, on meta, no) weights."""
    from transformers import (M2M100Config, M2M100ForConditionalGeneration, MBartConfig,
                              MBartForConditionalGeneration, MT5Config, MT5ForConditionalGeneration)
    family, kwargs = REAL_CONFIGS[name]
    with torch.device(device):
        if family == "mt5":
            model = untie_lm_head(MT5ForConditionalGeneration(MT5Config(**kwargs)))
        elif family == "mbart":
            model = MBartForConditionalGeneration(MBartConfig(**kwargs))
        else:
            model = M2M100ForConditionalGeneration(M2M100Config(**kwargs))
    return model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mt5", help="tiny-mt5, tiny-mbart, tiny-nllb or a checkpoint")
    parser.add_argument("--data-dir", default=None, help="data directory with text/ (default ../shared/data)")
    return parser.parse_args(argv)


def main(args):
    try:
        model, tokenizer = load_model(args.model, args.data_dir), load_tokenizer(args.model, args.data_dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {type(model).__name__}, {type(tokenizer).__name__}, vocab {len(tokenizer)}, "
          f"{num_params:,} parameters, at {resolve(args.model)}")


if __name__ == "__main__":
    main(parse_args())
