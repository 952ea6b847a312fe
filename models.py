"""Models for xlgen: what each family needs, checkpoints by name, and tiny offline models.

    python models.py --model tiny-nllb --data-dir ../shared/data     # build or find it, describe it,
                                                                      # encode and batch SQuAD with it

Sections:
  1. Model families      mT5 / mBART-50 / NLLB-200: maximum lengths, language codes, how a source,
                         the labels and the decoder input are laid out, how generation is started
  2. Tiny models         `tiny-mt5`, `tiny-mbart`, `tiny-nllb`, built on first use
  3. Loading by name     tiny names, checkpoint directories, any hub name of a supported class
  4. Real architectures  the published models' dimensions without weights (meta device)

The tiny models are built into the cache directory ($XLGEN_CACHE, default ~/.cache/xlgen) and
loaded from there with `from_pretrained`, exactly like a hub checkpoint. They use the real classes
and mirror the real structure at a tiny size, including the real maximum lengths and position tables:

  name        model class                     tokenizer class    SentencePiece   embeddings
  tiny-mt5    MT5ForConditionalGeneration     T5Tokenizer        unigram         shared in/out of encoder and
                                                                 <pad></s><unk>  decoder; lm_head UNTIED (as mT5)
  tiny-mt5-large  the same as tiny-mt5 at d_model 96 and 3+3 layers: the stand-in for mT5-large
  tiny-mbart  MBartForConditionalGeneration   MBart50Tokenizer   unigram         tied, scaled by sqrt(d_model)
                                                                 <unk><s></s>    + 52 language codes, <mask>
  tiny-nllb   M2M100ForConditionalGeneration  NllbTokenizer      BPE             tied, scaled by sqrt(d_model)
                                                                 <unk><s></s>    + 202 language codes, <mask>

The SentencePiece models are trained on DATA/text (../shared/data/text offline: 12 languages), with
full character coverage and no normalisation so every character of the 12 languages has a piece
and text round-trips. Same seed, same model.
"""

import functools
import glob
import io
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

import common
import data
from common import DataError, UsageError


# -----------------------------------------------------------------------------
# 1. Model families
#
#   family  source ids                    labels                       decoder start  forced 1st token
#   mt5     X </s>                        Y </s>                       <pad>          -
#   mbart   [src_code] X </s>             [tgt_code] Y </s>            </s>           [tgt_code]
#   nllb    [src_code] X </s>             [tgt_code] Y </s>            </s>           [tgt_code]
#
# mBART-50 and NLLB (non-legacy) tokenizers produce exactly these layouts. During training the
# model reads the labels shifted right behind the decoder start token (decoder_inputs), so the
# decoder sees "</s> [tgt_code] Y" and must predict "[tgt_code] Y </s>"; at generation the decoder
# starts from </s> and `forced_bos_token_id` makes the first generated token the target code.

FAMILY_MAX_LENGTH = {"mt5": 512, "mbart": 1024, "nllb": 512}  # paper Appendix A: inputs are cut to this
MODEL_TYPE_TO_FAMILY = {"mt5": "mt5", "mbart": "mbart", "m2m_100": "nllb"}


def family_of(config):
    """'mt5', 'mbart' or 'nllb' from a model config (or a config's model_type string)."""
    model_type = config if isinstance(config, str) else config.model_type
    if model_type not in MODEL_TYPE_TO_FAMILY:
        raise UsageError(f"--model: unsupported model type '{model_type}'; supported: "
                         f"{', '.join(sorted(MODEL_TYPE_TO_FAMILY))} (mT5, mBART-50, NLLB-200)")
    return MODEL_TYPE_TO_FAMILY[model_type]


def max_length(config):
    """Longest source or target a model takes: the paper's cut for its family (Appendix A), and
    never more than its position table (learned for mBART, sinusoidal for NLLB; mT5 has relative
    positions and no table)."""
    length = FAMILY_MAX_LENGTH[family_of(config)]
    return min(length, getattr(config, "max_position_embeddings", None) or length)


def language_code(family, lang, flag="--lang"):
    """The model's code for a language (None for mT5, which has no language codes)."""
    language = data.get_language(lang, flag)
    if family == "mt5":
        return None
    code = language.mbart if family == "mbart" else language.nllb
    if code is None:
        raise UsageError(f"{flag}: {family} has no language code for '{lang}'")
    return code


def family_language_codes(family):
    """The language codes of our table that a family's tokenizer must have (none for mT5)."""
    if family == "mt5":
        return []
    codes = [lang.mbart if family == "mbart" else lang.nllb for lang in data.LANGUAGES.values()]
    return [code for code in codes if code is not None]


def check_objective_token(objective, tokenizer, model_name, flag="--mix-objective"):
    """An objective made of sentinels or masks (data.OBJECTIVE_TOKEN) needs them as tokens of the
    model's tokenizer: mT5's <extra_id_N>, mBART-50's and NLLB's <mask>; else its examples would
    encode them as text."""
    token = data.OBJECTIVE_TOKEN.get(objective)
    if token is None:
        return
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise UsageError(f"{flag} {objective}: the tokenizer of {model_name} has no {token} token (span_corruption "
                         f"is mT5's task, mbart_denoising mBART's)")

class Seq2SeqEncoder:
    """Turns data.Examples into token ids for one model family, and knows how that family generates.

    >>> enc = Seq2SeqEncoder(tokenizer, "mbart", max_source_length=924)
    >>> enc.encode([example])[0]      # {"input_ids": [...], "labels": [...]}
    >>> enc.generation_kwargs("fr")   # {"decoder_start_token_id": 2, "forced_bos_token_id": ...}
    """

    def __init__(self, tokenizer, family, max_source_length=None, max_target_length=None):
        self.tokenizer = tokenizer
        self.family = family
        self.max_source_length = max_source_length or FAMILY_MAX_LENGTH[family]
        self.max_target_length = max_target_length or FAMILY_MAX_LENGTH[family]
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        # A language code that is not a token of the vocabulary would silently encode as <unk>.
        for code in family_language_codes(family):
            if tokenizer.convert_tokens_to_ids(code) in (None, tokenizer.unk_token_id):
                raise DataError(f"--model: tokenizer has no token for language code '{code}'")

    def affixes(self, lang):
        """Special ids the tokenizer puts before and after a text of `lang`."""
        if self.family == "mt5":
            return [], [self.eos_token_id]
        return [self.tokenizer.convert_tokens_to_ids(language_code(self.family, lang))], [self.eos_token_id]

    def _tokenize(self, texts):
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_ids(self, body, tail, target, src_lang, tgt_lang):
        """One example from token ids (without special tokens): (input_ids, labels, cut flags), where
        input_ids = [prefix] body tail [suffix] with the body cut to fit max_source_length, labels =
        [prefix] target [suffix] cut to max_target_length (keeping </s>); flags: bit 0 the source was
        cut, bit 1 the target was."""
        prefix, suffix = self.affixes(src_lang)
        room = self.max_source_length - len(prefix) - len(suffix) - len(tail)
        input_ids = data.truncate(prefix + body[:max(room, 0)] + tail + suffix, self.max_source_length)
        t_prefix, t_suffix = self.affixes(tgt_lang)
        labels = t_prefix + target + t_suffix
        flags = int(len(body) > max(room, 0)) | int(len(labels) > self.max_target_length) << 1
        return input_ids, data.truncate(labels, self.max_target_length), flags

    def encode(self, examples, stats=None, flags=None):
        """Encode Examples to [{"input_ids", "labels"}], each cut to the maximum lengths.

        Source = [prefix] body tail [suffix]: the body (a QA paragraph, an article) is cut, never the
        language code, the tail (the QA question appended at the end) or </s>. `stats`, if given,
        is a dict that gets the counts of cut sources and targets; `flags`, if given, a list that
        gets each example's cut flags (encode_ids).
        """
        bodies = self._tokenize([ex.source for ex in examples])
        tails = self._tokenize([ex.source_tail for ex in examples])
        targets = self._tokenize([ex.target for ex in examples])
        encoded, cut = [], []
        for i, ex in enumerate(examples):
            input_ids, labels, flag = self.encode_ids(bodies[i], tails[i] if ex.source_tail else [], targets[i],
                                                      ex.src_lang, ex.tgt_lang)
            encoded.append({"input_ids": input_ids, "labels": labels})
            cut.append(flag)
        if stats is not None:
            stats.update(num_examples=len(examples), num_cut_sources=sum(f & 1 for f in cut),
                         num_cut_targets=sum(f >> 1 & 1 for f in cut))
        if flags is not None:
            flags.extend(cut)
        return encoded

    @functools.cached_property
    def word_starts(self):
        """(is_word_start, spacer): per vocabulary id, whether its piece begins a word (SentencePiece's
        "▁" prefix), and the id of the lone "▁" piece (SentencePiece puts it before a word it cannot
        glue the space to, e.g. at the start of a Chinese line)."""
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        starts = np.array([isinstance(p, str) and p.startswith("\u2581") for p in pieces], dtype=bool)
        return starts, self.tokenizer.convert_tokens_to_ids("\u2581")

    def generation_kwargs(self, tgt_lang):
        """What `model.generate` needs to produce text in `tgt_lang` for this family."""
        if self.family == "mt5":
            return {"decoder_start_token_id": self.pad_token_id}
        code_id = self.tokenizer.convert_tokens_to_ids(language_code(self.family, tgt_lang))
        return {"decoder_start_token_id": self.eos_token_id, "forced_bos_token_id": code_id}


def decoder_inputs(model, labels):
    """Labels shifted right behind the decoder start token, exactly as each model class does it:
    mT5 "<pad> Y", mBART/NLLB "</s> [tgt_code] Y" (labels are "[tgt_code] Y </s>")."""
    family = family_of(model.config)
    if family == "mt5":
        return model._shift_right(labels)
    if family == "mbart":
        from transformers.models.mbart.modeling_mbart import shift_tokens_right
        # mBART's decoder starts with the row's last target token (its </s>). A row with no target
        # -- an empty row of a bucketed batch, data.pad_to_buckets -- has none (HF gathers at index
        # -1 and fails): it gets a </s> of its own, whose outputs the loss ignores (labels -100).
        empty = (labels == -100).all(dim=1, keepdim=True)
        first = torch.arange(labels.shape[1], device=labels.device) == 0
        labels = torch.where(empty & first, model.config.eos_token_id, labels)
        return shift_tokens_right(labels, model.config.pad_token_id)
    from transformers.models.m2m_100.modeling_m2m_100 import shift_tokens_right
    return shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)


# -----------------------------------------------------------------------------
# 2. Tiny models

TINY_MODELS = ("tiny-mt5", "tiny-mbart", "tiny-nllb", "tiny-mt5-large")
TINY_VERSION = 2         # bump when the tiny builds change: caches of older builds are not reused
TINY_VOCAB_SIZE = 16000  # SentencePiece pieces, before the family's special tokens
TINY_DIMS = dict(d_model=64, num_layers=2, num_heads=4, d_ff=128)
# tiny-mt5-large: the stand-in for mT5-large in the tiny study (same classes and tokenizer, larger)
TINY_LARGE_DIMS = dict(d_model=96, num_layers=3, num_heads=4, d_ff=192)


def cache_dir():
    return os.environ.get("XLGEN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "xlgen"))


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
        raise DataError(f"{text_dir}: no <lang>.txt files to train the tiny tokenizers on "
                        f"(pass --data-dir ../shared/data, or run python download.py --tasks text)")
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
        if name.startswith("tiny-mt5"):
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
    tokenizer.model_max_length = FAMILY_MAX_LENGTH[name.split("-")[1]]
    return tokenizer


def save_pretrained(model, directory):
    """model.save_pretrained, with a config that every transformers version reads the same way.

    transformers 5 forces MT5Config.tie_word_embeddings to True (and loads an untied lm_head when
    the checkpoint has one), so it writes `true` even for mT5's untied head; transformers 4.x would
    then tie lm_head to the embeddings on load (and rescale the decoder output by d_model**-0.5):
    other logits, no error. google/mt5-* checkpoints say `false`, and so do ours when the head is
    untied. The weight files get the umask's mode (common.follow_umask)."""
    model.save_pretrained(directory)
    head, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if family_of(model.config) == "mt5" and head.weight.data_ptr() != inputs.weight.data_ptr():
        path = os.path.join(directory, "config.json")
        config = common.read_json(path, "model config")
        config["tie_word_embeddings"] = False
        common.write_json(path, config)
    common.follow_umask(directory)


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
    dims = TINY_LARGE_DIMS if name == "tiny-mt5-large" else TINY_DIMS
    d, layers, heads, ff = dims["d_model"], dims["num_layers"], dims["num_heads"], dims["d_ff"]
    torch.manual_seed(seed)
    if name.startswith("tiny-mt5"):
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
    """Build a tiny model + tokenizer into out_dir (atomically: temporary directory, then rename).
    The caller's random state is left as it was: a run that happens to build the model on first
    use must train exactly like one that finds it built."""
    text_dir = os.path.join(data_dir or data.DEFAULT_DATA_DIR, "text")
    # The SentencePiece models do not depend on the seed (training is deterministic): shared by all.
    spm_dir = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "spm")
    if not os.path.isfile(os.path.join(spm_dir, "bpe-fairseq.model")):
        tmp_spm = common.make_temp_dir(os.path.dirname(spm_dir), prefix=".spm-")
        build_sentencepiece(text_dir, tmp_spm)
        _rename_into_place(tmp_spm, spm_dir)
    tokenizer = _tiny_tokenizer(name, spm_dir)
    with torch.random.fork_rng(devices=[]):  # _tiny_model seeds torch's global generator
        model = _tiny_model(name, tokenizer, seed)
    tmp = common.make_temp_dir(os.path.dirname(os.path.abspath(out_dir)), prefix=f".{name}-")
    save_pretrained(model, tmp)
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
# 3. Loading by name
#
# A model name is a tiny model, a checkpoint directory, or a hub name. The paper's hub checkpoints
# are known by name; any other hub name of a supported class (e.g. bigscience/mt0-base, an mT5)
# is recognised by its config's model_type (from the hub, or from the local hub cache offline).
# A checkpoint directory is either a full save_pretrained checkpoint (config.json) or an
# added-weights checkpoint of adapters / prompt / LoRA (xlgen_adaptation.json or PEFT's adapter_config.json, see adapt.py).

PAPER_HUB_PREFIXES = {"google/mt5-": "mt5", "facebook/mbart-large-50": "mbart", "facebook/nllb-200-": "nllb"}
# An added-weights checkpoint (adapt.py) holds xlgen's record of it, ADAPTATION_FILE (base model,
# method, options), and the method's weights: in PEFT's format where PEFT has the method (prompt
# tuning, LoRA: PEFT_CONFIG_FILE + PEFT_WEIGHTS_FILE, so `PeftModel.from_pretrained` loads them), in
# xlgen's own files otherwise (adapters). A directory PEFT wrote (no ADAPTATION_FILE) is one too.
ADAPTATION_FILE = "xlgen_adaptation.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def is_added_checkpoint(path):
    """An adapters / prompt / LoRA checkpoint: only the added weights and the name of their base model."""
    return any(os.path.isfile(os.path.join(path, name)) for name in (ADAPTATION_FILE, PEFT_CONFIG_FILE))


def describe_added(path):
    """'METHOD: only the added weights, for base model BASE', from whichever record the directory has."""
    for name in (ADAPTATION_FILE, PEFT_CONFIG_FILE):  # xlgen's record; PEFT's config (or xlgen's older one)
        file = os.path.join(path, name)
        if os.path.isfile(file):
            record = common.read_json(file, "adapter config")
            if isinstance(record, dict):
                method = record.get("method", record.get("peft_type", "?"))
                base = record.get("base_model", record.get("base_model_name_or_path", "?"))
                return f"{str(method).lower()}: only the added weights, for base model {base}"
    return "only the added weights"


def refuse_added_checkpoint(name, flag, wanted):
    """A one-line error when an added-weights checkpoint is given where `wanted` is needed."""
    if os.path.isdir(name) and is_added_checkpoint(name):
        raise UsageError(f"{flag}: {name} is an added-weights checkpoint ({describe_added(name)}); {flag} takes {wanted}")


def resolve(name, data_dir=None):
    """Path or hub name to hand to from_pretrained; tiny models are built on first use."""
    if name in TINY_MODELS:
        path = os.path.join(cache_dir(), f"tiny-v{TINY_VERSION}", name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            print(f"building {name} into {path} (first use)", file=sys.stderr)
            build_tiny(name, path, data_dir=data_dir)
        return path
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        refuse_added_checkpoint(name, "--model", "a full checkpoint")
        raise UsageError(f"--model: {name} is not a checkpoint directory (no config.json)")
    if not os.path.isdir(name) and (os.path.isabs(name) or name.startswith(".")):
        raise UsageError(f"--model: {name}: no such checkpoint directory")
    return name


def hub_missing_message(name, error):
    """One line for a hub model that cannot be had: which name, why, and how to fetch it."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    why = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached or has no such model ({first})"
    return (f"--model {name}: not in the local hub cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and "
            f"{why}; on a machine with internet run `python download.py --models {name}` with the same HF_HOME, or give a "
            f"checkpoint directory")


def load_config(name, data_dir=None):
    from transformers import AutoConfig
    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(resolve(name, data_dir))
    except OSError as e:
        if not os.path.isdir(name) and "/" in name:
            raise UsageError(hub_missing_message(name, e)) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model: cannot find model '{name}': not a tiny model ({', '.join(TINY_MODELS)}), "
                         f"a checkpoint directory, or a model on the hub or in the local hub cache ({reason})") from None
    except ValueError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model: cannot find model '{name}': not a tiny model ({', '.join(TINY_MODELS)}), "
                         f"a checkpoint directory, or a model on the hub or in the local hub cache ({reason})") from None


def family_of_name(name, data_dir=None):
    """Model family without loading weights: tiny names and the paper's hub names by their name,
    anything else by its config's model_type."""
    if name in TINY_MODELS:
        return name.split("-")[1]
    if not os.path.isdir(name):
        for prefix, family in PAPER_HUB_PREFIXES.items():
            if name.startswith(prefix):
                return family
    return family_of(load_config(name, data_dir))


def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(loader, name, data_dir, what, path=None):
    path = path or resolve(name, data_dir)
    try:
        return loader.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- any failure to read a checkpoint on disk gets its path
        if not os.path.isdir(path):
            if isinstance(e, OSError):  # a hub name: not in the local hub cache, and the hub is offline or unreachable
                raise UsageError(hub_missing_message(name, e)) from None
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot load the {what} ({type(e).__name__}: {reason}); the checkpoint is "
                        f"truncated or corrupt: use another one (e.g. best/ instead of last/) or remove it") from None


def load_tokenizer(name, data_dir=None):
    from transformers import AutoTokenizer
    _quiet_transformers()
    # a directory with a tokenizer is read as it is (an added-weights checkpoint has one, and no config.json)
    path = name if os.path.isfile(os.path.join(name, "tokenizer_config.json")) else None
    return _load(AutoTokenizer, name, data_dir, "tokenizer", path)


def model_revision(name):
    """Which weights `name` stands for: the hub commit of the cached snapshot (a hub name), "tiny-vN"
    (a tiny model, built in-process by this version of models.py), or None (a local directory)."""
    if name in TINY_MODELS:
        return f"tiny-v{TINY_VERSION}"
    if os.path.isdir(name):
        return None
    from huggingface_hub import try_to_load_from_cache
    try:
        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 -- not a valid repository name: nothing cached to name
        return None
    return os.path.basename(os.path.dirname(path)) if isinstance(path, str) else None


def load_model(name, data_dir=None):
    from transformers import AutoModelForSeq2SeqLM
    _quiet_transformers()
    return _load(AutoModelForSeq2SeqLM, name, data_dir, "model")


# -----------------------------------------------------------------------------
# 4. Real architectures without weights (meta device): parameter counts, memory and speed benchmarks

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
    "facebook/nllb-200-3.3B": ("nllb", dict(vocab_size=256206, d_model=2048, encoder_layers=24, decoder_layers=24,
                                            encoder_attention_heads=16, decoder_attention_heads=16,
                                            encoder_ffn_dim=8192, decoder_ffn_dim=8192, max_position_embeddings=1024,
                                            scale_embedding=True, activation_function="relu",
                                            encoder_layerdrop=0.0, decoder_layerdrop=0.0)),
}


REAL_CONFIGS["facebook/mbart-large-50-many-to-many-mmt"] = REAL_CONFIGS["facebook/mbart-large-50"]  # same architecture


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


# -----------------------------------------------------------------------------
# Command line: describe a model, then read, encode and batch the SQuAD training set with it

def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-mt5", help="tiny-mt5, tiny-mbart, tiny-nllb, a checkpoint or a hub name")
    parser.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="data directory (text/ for tiny models, squad/)")
    parser.add_argument("--max-tokens", type=common.positive_int, default=4000, help="token budget per batch")
    parser.add_argument("--seed", type=common.seed, default=0, help="random seed of the batch order")
    return parser.parse_args(argv)


@common.exits_on_error
def main(args):
    model, tokenizer = load_model(args.model, args.data_dir), load_tokenizer(args.model, args.data_dir)
    family = family_of(model.config)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {type(model).__name__}, {type(tokenizer).__name__}, vocab {len(tokenizer)}, "
          f"{num_params:,} parameters, family {family}, maximum length {max_length(model.config)}, "
          f"at {resolve(args.model)}")
    path = data.squad_path(args.data_dir, "train")
    encoder = Seq2SeqEncoder(tokenizer, family, max_length(model.config), max_length(model.config))
    stats = {}
    encoded = encoder.encode(data.qa_examples(data.read_squad(path), "en"), stats)
    batches = data.TokenBatches(encoded, max_tokens=args.max_tokens, seed=args.seed)
    print(f"squad train ({path}): {len(encoded)} examples, {stats['num_cut_sources']} sources cut to "
          f"{encoder.max_source_length} tokens -> {len(batches.epoch_batches(0))} batches of <= {args.max_tokens} "
          f"tokens, padding efficiency {batches.padding_efficiency():.3f}")
    print("first source:", tokenizer.convert_ids_to_tokens(encoded[0]["input_ids"])[:8], "...")
    print("first labels:", tokenizer.convert_ids_to_tokens(encoded[0]["labels"]))


if __name__ == "__main__":
    main(parse_args())
