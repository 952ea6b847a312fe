"""The six adaptation methods of the paper (Section 3, Table 4), and LoRA, by module surgery on HF models.

    python adapt.py --model tiny-mbart --method adapters      # apply a method, print what is trained

One entry point, `apply(model, method, **options)`, for MT5ForConditionalGeneration,
MBartForConditionalGeneration and M2M100ForConditionalGeneration (NLLB):

  full      every weight is trained.
  freeze    (ZmBART, Maurya et al. 2021) only the encoder is trained; decoder, shared token
            embeddings and output layer are frozen.
  adapters  (Bapna & Firat 2019) a bottleneck adapter after every self-attention, cross-attention
            and feed-forward sublayer of encoder and decoder; the base model is frozen.
  prompt    (Lester et al. 2021; Vu et al. 2022) learned vectors prepended to the encoder input
            embeddings; everything else frozen.
  lora      (Hu et al. 2022) a low-rank update B A beside the query and value projections of every
            attention (encoder self, decoder self and cross); the base model is frozen.
  mix       weights as `full`; finetune.py mixes Prefix-LM batches of the target languages in.
  multisrc  weights as `full`; finetune.py trains on several source languages.

Where an adapter sits in a block (the same in every family: the sublayer's output passes through the
adapter before it joins the residual stream; mT5 blocks shown, mBART/NLLB layers are alike):

        x ─────────────────────────────────────────────────┐
        │                                                   │ residual
        └─ LayerNorm ─ Self-Attention ─ [ADAPTER] ─ dropout ─(+)─ h
        h ─────────────────────────────────────────────────┐
        └─ LayerNorm ─ Cross-Attention ─ [ADAPTER] ─ dropout ─(+)─ g     (decoder only)
        g ─────────────────────────────────────────────────┐
        └─ LayerNorm ─ Feed-Forward ── [ADAPTER] ─ dropout ─(+)─ out

        ADAPTER(y) = y + Up(ReLU(Down(LayerNorm(y))))     Down: d -> 64, Up: 64 -> d, Up = 0 at init

With Up zero-initialised, ADAPTER(y) = y: the adapted model computes exactly the base model until
training moves Up. Adapters are child modules of the layers (`...adapter_self_attn.down.weight`),
wired in with forward hooks, so the base weights keep their names and load as usual. (Bapna & Firat
put the adapter after the residual addition; a hook cannot reach that point inside mBART/NLLB
layers without rewriting their forward, so all three families use the position drawn above.)

The encoder input with a prompt of P vectors (mBART/NLLB; mT5 has no language code):

        input_ids:        [fr_XX]  X1  X2 ... Xn  </s>
        encoder input:  [p1 ... pP] [fr_XX] X1 X2 ... Xn </s>       (embeddings, P + n + 2 positions)
        attention mask: [1  ...  1] [1 ... 1 0 0 pad]               (P ones prepended)

The prompt goes *before* the language code: the pretrained model then still reads the exact
sequence it was trained on ("[code] X </s>", contiguous), and one prompt serves every source
language unchanged, which is what zero-shot transfer needs. Prompt vectors are initialised from
randomly chosen (seeded) rows of the embedding matrix, as the encoder sees them (mBART and NLLB
scale embeddings by sqrt(d_model), so the prompt starts at the same scale).

The prompt takes encoder positions: with P vectors the encoder sees P + n of them. mBART has 1024
learned positions, so a 1024-token source plus a prompt of 100 would index past the table (an
IndexError on the CPU, a device-side assert on a GPU). `max_source_length(model)` is therefore the
model's maximum length minus P: the source is cut to leave room for the prompt (the language code
and </s> are kept; see models.Seq2SeqEncoder.encode), so the encoder never sees more positions
than the model has. The same budget applies to every family.

After `apply`, `model.xlgen_adaptation` is {"method": ..., "options": {...}}: the one record of how
a model was adapted, read by `save` (added weights only, or a full checkpoint) and `adaptation_of`.
"""

import dataclasses
import math
import os

import torch
from torch import nn

import common
import data
import models
from common import DataError, UsageError

SUPPORTED = {"mt5": "MT5ForConditionalGeneration", "mbart": "MBartForConditionalGeneration",
             "m2m_100": "M2M100ForConditionalGeneration"}


# -----------------------------------------------------------------------------
# The method registry: everything the other modules know about a method is its entry in REGISTRY
# (finetune.py's flags and data, the study's LR search, the report's rows, the tests' cases).
# To add a method: write its surgery (a function `add(model, options)`) and its trainable set, then
# one Method(...) at the end of this file. Nothing outside adapt.py needs to change.

@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method: its apply() keyword, the command-line flag that sets it and a check."""
    name: str                    # keyword of apply(), key of "options" in xlgen_adaptation.json
    flag: str                    # e.g. "--adapter-dim"; "--seed" is finetune's own flag (not added here)
    default: object
    help: str = ""
    type: object = None          # argparse type of the flag
    check: object = None         # value -> value (normalised); raises UsageError naming the flag


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str                   # how prose names it ("prompt tuning")
    summary: str                 # one line, for --help
    options: tuple = ()          # Option(...) of the method
    add: object = None           # module surgery: add(model, options) adds modules (None: nothing added)
    trainable: object = None     # trainable(model) -> names of the parameters trained (None: every weight)
    added: object = None         # added(param_name) -> bool: the parameters `add` created; when set,
                                 # checkpoints hold only these (see "Checkpoints" below)
    peft: object = None          # PeftFormat: the method's checkpoints in PEFT's format (None: xlgen's)
    lr_search: str = "own"       # "own": the study searches its LR; else the method whose PLR it uses
    mixes_text: bool = False     # finetune.py mixes self-supervised batches of raw text in (mix)
    several_sources: bool = False  # finetune.py trains on several source languages (multisrc)
    in_paper: bool = True        # the paper ran it (study.py --scope paper runs only these)

    def defaults(self):
        return {option.name: option.default for option in self.options}

    def applies_to(self, task):
        """multisrc needs training data in several source languages (XL-Sum has it; XQuAD has only
        English, paper Section 3)."""
        return not self.several_sources or len(data.get_task(task).source_langs) > 1


REGISTRY = {}  # name -> Method, in the paper's order; filled at the end of this module


def register(method):
    REGISTRY[method.name] = method
    return method


def get_method(name, flag="--method"):
    if name not in REGISTRY:
        raise UsageError(f"{flag}: unknown method '{name}'; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def methods_for(task):
    """The methods that apply to a task, in registry order."""
    return [name for name, method in REGISTRY.items() if method.applies_to(task)]


def searched_methods():
    """The methods whose LR the study searches (the others borrow one, see lr_source)."""
    return [name for name, method in REGISTRY.items() if method.lr_search == "own"]


def lr_search_note():
    """Where each method's PLR comes from, in words: "the LR search of full finetuning, adapters or
    prompt tuning (freeze, mix and multisrc use full finetuning's)"."""
    def words(items, last):
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {last} " + items[-1]
    searched = [REGISTRY[name].label for name in searched_methods()]
    borrowers = {}
    for name, method in REGISTRY.items():
        if method.lr_search != "own":
            borrowers.setdefault(method.lr_search, []).append(name)
    uses = "; ".join(f"{words(names, 'and')} use{'s' if len(names) == 1 else ''} {REGISTRY[source].label}'s"
                     for source, names in borrowers.items())
    return f"the LR search of {words(searched, 'or')}" + (f" ({uses})" if uses else "")


def lr_source(name):
    """The method whose PLR `name` uses: its own, or e.g. full finetuning's for freeze, mix, multisrc."""
    method = get_method(name)
    return name if method.lr_search == "own" else method.lr_search


# -----------------------------------------------------------------------------
# Flags and checks

def add_method_args(parser):
    """The flags of the methods and their options, for every command that adapts a model."""
    parser.add_argument("--method", default="full", choices=list(REGISTRY),
                        help="adaptation method: " + "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values()))
    seen = {"--seed"}
    for method in REGISTRY.values():
        for option in method.options:
            if option.flag in seen:
                continue
            seen.add(option.flag)
            parser.add_argument(option.flag, type=option.type, default=option.default,
                                help=f"{method.name}: {option.help}")


def _dest(flag):
    return flag.lstrip("-").replace("-", "_")


def options_from_args(args):
    """The apply() options that the command-line flags give for args.method."""
    return {option.name: getattr(args, _dest(option.flag)) for option in get_method(args.method).options}


def _check_model(model, method):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED or type(model).__name__ != SUPPORTED[model_type]:
        raise UsageError(f"--method {method}: unsupported model class {type(model).__name__}; "
                         f"supported: {', '.join(SUPPORTED.values())}")


def check_options(method, options):
    """Validate a method's options; returns them with defaults filled in."""
    entry = get_method(method)
    allowed = entry.defaults()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UsageError(f"--method {method}: unknown option(s) {', '.join(unknown)}")
    options = {**allowed, **options}
    for option in entry.options:
        if option.check is not None:
            options[option.name] = option.check(options[option.name])
    return options


def _number_check(flag, kinds, valid, expected):
    """The check of a numeric option given to apply() (the flags' own types check the command line):
    a number of `kinds` (never a bool) for which valid(value) holds, else one line naming the flag."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, kinds) or not valid(value):
            raise UsageError(f"{flag}: must be {expected}, got {value}")
        return value
    return check


def _langs(flag, at_least, what):
    def check(value):
        langs = data.parse_langs(value, flag) if value else []
        if len(langs) < at_least:
            raise UsageError(f"{flag}: {what}, got {langs}")
        return langs
    return check


# -----------------------------------------------------------------------------
# Adapters

class Adapter(nn.Module):
    """Bottleneck adapter (Bapna & Firat 2019): y + Up(ReLU(Down(LayerNorm(y)))), Up zero-initialised."""

    def __init__(self, d_model, bottleneck):
        super().__init__()
        self.layer_norm = nn.LayerNorm(d_model)
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states):                      # (batch, seq, d_model)
        return hidden_states + self.up(torch.relu(self.down(self.layer_norm(hidden_states))))


def _adapter_hook(adapter):
    """Forward hook that passes a sublayer's output (a tensor, or a tuple led by one) through `adapter`."""
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + output[1:]
        return adapter(output)
    return hook


def adapter_sites(model):
    """(parent module, adapter attribute name, sublayer to hook) for every sublayer of the model."""
    sites = []
    if model.config.model_type == "mt5":
        for stack in (model.encoder, model.decoder):
            for block in stack.block:
                self_attn, *cross, ff = block.layer  # decoder blocks have a cross-attention layer
                sites.append((self_attn, "adapter", self_attn.SelfAttention))
                for layer in cross:
                    sites.append((layer, "adapter", layer.EncDecAttention))
                sites.append((ff, "adapter", ff.DenseReluDense))
    else:  # mBART and NLLB layers hold all sublayers; fc2 is the last linear of the feed-forward
        inner = model.model
        for layer in list(inner.encoder.layers) + list(inner.decoder.layers):
            sites.append((layer, "adapter_self_attn", layer.self_attn))
            if hasattr(layer, "encoder_attn"):
                sites.append((layer, "adapter_cross_attn", layer.encoder_attn))
            sites.append((layer, "adapter_ffn", layer.fc2))
    return sites


def add_adapters(model, options):
    d_model, bottleneck = model.config.d_model, options["bottleneck"]
    reference = next(model.parameters())
    for parent, name, sublayer in adapter_sites(model):
        adapter = Adapter(d_model, bottleneck).to(device=reference.device, dtype=reference.dtype)
        setattr(parent, name, adapter)
        sublayer.register_forward_hook(_adapter_hook(adapter))


# -----------------------------------------------------------------------------
# Prompt tuning

class Prompt(nn.Module):
    """P learned vectors, prepended to the encoder input embeddings."""

    def __init__(self, init):                             # init: (P, d_model)
        super().__init__()
        self.weight = nn.Parameter(init.clone())

    def forward(self, batch_size):                        # -> (batch, P, d_model)
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


def _extend_mask(attention_mask, num_prompt):
    ones = attention_mask.new_ones(attention_mask.shape[0], num_prompt)
    return torch.cat([ones, attention_mask], dim=1)


def _encoder_pre_hook(model):
    """input_ids -> inputs_embeds = [prompt; embed(input_ids)], and the mask extended to match."""
    def hook(encoder, args, kwargs):
        if args:
            raise TypeError("prompt tuning: call the encoder with keyword arguments (input_ids=...)")
        input_ids = kwargs.get("input_ids")
        if input_ids is None:  # already embeddings: assume the caller prepended the prompt
            return args, kwargs
        num_prompt = model.prompt.weight.shape[0]
        embeds = encoder.embed_tokens(input_ids)          # (batch, n, d), scaled for mBART/NLLB
        kwargs["inputs_embeds"] = torch.cat([model.prompt(input_ids.shape[0]).to(embeds.dtype), embeds], dim=1)
        kwargs["input_ids"] = None
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        if mask.shape[1] == input_ids.shape[1]:           # not yet extended by the model-level hook
            mask = _extend_mask(mask, num_prompt)
        kwargs["attention_mask"] = mask
        return args, kwargs
    return hook


def _model_pre_hook(model):
    """Extend the attention mask that the decoder's cross-attention uses (forward and generate)."""
    def hook(module, args, kwargs):
        if args:
            raise TypeError("prompt tuning: call the model with keyword arguments (input_ids=..., ...)")
        mask = kwargs.get("attention_mask")
        if mask is None:
            return args, kwargs
        num_prompt = model.prompt.weight.shape[0]
        encoder_outputs = kwargs.get("encoder_outputs")
        if encoder_outputs is not None:
            encoded_len = encoder_outputs[0].shape[1]      # P + n after the encoder hook
            if mask.shape[1] + num_prompt == encoded_len:
                kwargs["attention_mask"] = _extend_mask(mask, num_prompt)
        elif kwargs.get("input_ids") is not None and mask.shape[1] == kwargs["input_ids"].shape[1]:
            kwargs["attention_mask"] = _extend_mask(mask, num_prompt)
        return args, kwargs
    return hook


def add_prompt(model, options):
    prompt_length, seed = options["prompt_length"], options["seed"]
    embed = model.get_encoder().embed_tokens
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, embed.num_embeddings, (prompt_length,), generator=generator)
    with torch.no_grad():
        init = embed(rows.to(embed.weight.device)).detach()  # (P, d): rows as the encoder sees them
    model.prompt = Prompt(init)
    model.get_encoder().register_forward_pre_hook(_encoder_pre_hook(model), with_kwargs=True)
    model.register_forward_pre_hook(_model_pre_hook(model), with_kwargs=True)


def max_source_length(model):
    """The longest source the adapted model may be given: its maximum length, minus the prompt's
    positions for prompt tuning (see the module docstring)."""
    num_prompt = model.prompt.weight.shape[0] if adaptation_of(model)["method"] == "prompt" else 0
    budget = models.max_length(model.config) - num_prompt
    if budget < 8:
        raise UsageError(f"--prompt-length {num_prompt}: leaves {budget} of the model's "
                         f"{models.max_length(model.config)} positions for the source")
    return budget


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2022), as PEFT does it for T5 and mBART by default: on the query and value
# projections of every attention (encoder self-attention, decoder self- and cross-attention)
#
#        x ──── W (frozen) ────────────────────────(+)── W x + (alpha / r) B A dropout(x)
#        └── dropout ── A (d_in -> r) ── B (r -> d_out) ─┘       B = 0 at init: the base model
#
# A and B are child modules of the projection (`...SelfAttention.q.lora_A.weight`, PEFT's names
# without its ".default"), wired in with a forward hook as the adapters are, so the base weights
# keep their names. A is initialised as PEFT does (Kaiming-uniform, a = sqrt(5)), B with zeros.

LORA_PROJECTIONS = {"mt5": {"q": "q", "k": "k", "v": "v", "o": "o"},  # what q, k, v, o are called per family
                    "mbart": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}}
LORA_PROJECTIONS["m2m_100"] = LORA_PROJECTIONS["mbart"]


def attentions(model):
    """Every attention module: encoder self, decoder self and cross-attention."""
    if model.config.model_type == "mt5":
        return [layer.SelfAttention if hasattr(layer, "SelfAttention") else layer.EncDecAttention
                for stack in (model.encoder, model.decoder) for block in stack.block for layer in block.layer
                if hasattr(layer, "SelfAttention") or hasattr(layer, "EncDecAttention")]
    inner = model.model
    return [attention for layer in list(inner.encoder.layers) + list(inner.decoder.layers)
            for attention in (layer.self_attn, getattr(layer, "encoder_attn", None)) if attention is not None]


def _lora_hook(scaling):
    def hook(linear, inputs, output):                   # inputs[0]: (batch, seq, d_in)
        update = linear.lora_B(linear.lora_A(linear.lora_dropout(inputs[0])))
        return output + scaling * update.to(output.dtype)
    return hook


def add_lora(model, options):
    rank, targets = options["rank"], options["targets"]
    reference = next(model.parameters())
    names = LORA_PROJECTIONS[model.config.model_type]
    for attention in attentions(model):
        for target in targets:
            linear = getattr(attention, names[target])
            linear.lora_dropout = nn.Dropout(options["dropout"]).train(model.training)  # the model's mode
            linear.lora_A = nn.Linear(linear.in_features, rank, bias=False).to(device=reference.device, dtype=reference.dtype)
            linear.lora_B = nn.Linear(rank, linear.out_features, bias=False).to(device=reference.device, dtype=reference.dtype)
            if reference.device.type != "meta":
                nn.init.kaiming_uniform_(linear.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(linear.lora_B.weight)
            linear.register_forward_hook(_lora_hook(options["alpha"] / rank))


def _lora_targets(value):
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    targets = [t.strip() for t in items if t.strip()]
    unknown = [t for t in targets if t not in ("q", "k", "v", "o")]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise UsageError(f"--lora-targets: give projections among q,k,v,o, each once, e.g. q,v; got {value!r}")
    return targets


# -----------------------------------------------------------------------------
# The entry point

def set_trainable(model, method):
    """requires_grad per method (after any modules were added): the method's trainable set."""
    trainable = get_method(method).trainable
    names = None if trainable is None else set(trainable(model))
    for name, param in model.named_parameters():
        param.requires_grad = names is None or name in names


def _encoder_only(model):
    """freeze: only the encoder is trained. Per family, the borderline parameters:
      mT5:   encoder.embed_tokens IS shared.weight -> frozen; the encoder's relative position
             bias (block 0) and final_layer_norm -> trained; the untied lm_head -> frozen.
      mBART: encoder.embed_tokens IS the shared (tied) embedding -> frozen, and with it the
             output layer; the encoder's learned positions (embed_positions),
             layernorm_embedding and final layer_norm -> trained; their decoder twins frozen.
      NLLB:  as mBART, but positions are sinusoidal buffers (no parameters) and there is no
             layernorm_embedding; the encoder's final layer_norm -> trained."""
    encoder = {id(p) for p in model.get_encoder().parameters()}
    frozen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return [name for name, p in model.named_parameters() if id(p) in encoder and id(p) not in frozen]


def _added_only(added):
    """The trainable set of a method that trains only what it added (the base model frozen)."""
    return lambda model: [name for name, _ in model.named_parameters() if added(name)]


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def adaptation_of(model):
    """{"method", "options"} recorded by `apply`, or method None for a model not adapted."""
    return getattr(model, "xlgen_adaptation", None) or {"method": None, "options": {}}


def apply(model, method, verbose=True, **options):
    """Adapt `model` in place for `method` and return it. The options are the method's
    (REGISTRY[method].options), e.g. adapters: bottleneck=64; prompt: prompt_length=100, seed=0."""
    options = check_options(method, options)
    _check_model(model, method)
    if adaptation_of(model)["method"] is not None:
        raise UsageError(f"--method {method}: model was already adapted with '{adaptation_of(model)['method']}'")
    entry = get_method(method)
    if entry.add is not None:
        entry.add(model, options)
    set_trainable(model, method)
    model.xlgen_adaptation = {"method": method, "options": options}
    if verbose:
        trainable, total = count_parameters(model)
        print(f"adapt: method {method}: trainable parameters {trainable:,} of {total:,} "
              f"({100.0 * trainable / total:.2f}%)")
    return model


# -----------------------------------------------------------------------------
# Checkpoints: added weights only (adapters, prompt, LoRA) or the whole model
#
#   full, freeze, mix, multisrc:  save_pretrained (config.json, model.safetensors, generation_config.json)
#   prompt, lora:   adapter_config.json + adapter_model.safetensors in PEFT's format: PeftModel.from_pretrained
#                   (base, CHECKPOINT) computes xlgen's logits (tests/test_portable.py)
#   adapters:       adapters.safetensors (PEFT has no bottleneck adapters; AdapterHub's format needs its
#                   package, which pins transformers 4.57, so it is not written)
#   every added-weights checkpoint: xlgen_adaptation.json {"base_model", "base_model_path", "method", "options"}
#
# base_model is the base model's name (tiny or hub) or, for a local checkpoint (an IT run), its path
# relative to the checkpoint directory, so that a study directory that is moved or copied as a whole
# still loads; base_model_path is the absolute path it had, tried second. A PEFT-written directory
# (no xlgen_adaptation.json) loads too: method and options from its adapter_config.json.

@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How a method's checkpoint is written in PEFT's format (PEFT is not needed to write or read it).
    config(model, options) -> adapter_config.json's method fields; options(config, model_type) -> the
    method's options from a PEFT config (a DataError for PEFT settings xlgen's method does not have);
    to_peft(name) / from_peft(key): parameter name <-> PEFT's key in adapter_model.safetensors."""
    peft_type: str
    config: object
    options: object
    to_peft: object
    from_peft: object


def saves_added_weights(method):
    """Whether a method's checkpoints hold only the weights it added (adapters, prompt, ...)."""
    return method is not None and get_method(method).added is not None


def added_state_dict(model):
    """The weights that the model's method added to the base model."""
    added = get_method(adaptation_of(model)["method"]).added
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if added(name)}


def _recorded_base(base_model, directory):
    """(base_model, base_model_path) as recorded: a local directory relative to the checkpoint."""
    if not os.path.isdir(base_model):
        return base_model, None
    absolute = os.path.abspath(base_model)
    return os.path.relpath(absolute, os.path.abspath(directory)), absolute


def save(model, directory, base_model):
    """Write the model into `directory` (see "Checkpoints" above): the added weights and their record
    for adapters, prompt and LoRA, otherwise a save_pretrained checkpoint. Files follow the umask."""
    adaptation = adaptation_of(model)
    if not saves_added_weights(adaptation["method"]):
        models.save_pretrained(model, directory)
        return
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    base, base_path = _recorded_base(base_model, directory)
    weights, peft = added_state_dict(model), get_method(adaptation["method"]).peft
    if peft is None:
        save_file(weights, os.path.join(directory, ADAPTERS_WEIGHTS_FILE))
    else:
        save_file({peft.to_peft(name): value for name, value in weights.items()},
                  os.path.join(directory, models.PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        common.write_json(os.path.join(directory, models.PEFT_CONFIG_FILE),
                          {"peft_type": peft.peft_type, "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base,
                           "revision": None, "inference_mode": True, **peft.config(model, adaptation["options"])})
    common.write_json(os.path.join(directory, models.ADAPTATION_FILE),
                      {"base_model": base, "base_model_path": base_path, **adaptation})
    common.follow_umask(directory)


def _resolve_base(path, record):
    """The base model to load: the recorded name, or the recorded path (relative to the checkpoint
    first, then as it was when saved)."""
    base = record.get("base_model")
    if not isinstance(base, str) or not base:
        raise DataError(f"{path}: the checkpoint does not name its base model")
    candidates = [os.path.join(path, base)] if not os.path.isabs(base) else [base]
    candidates += [record["base_model_path"]] if isinstance(record.get("base_model_path"), str) else []
    for candidate in candidates:
        if os.path.isdir(candidate):
            return os.path.normpath(candidate)
    if record.get("base_model_path") or base.startswith((".", os.sep)):
        raise DataError(f"{path}: its base model {base} (relative to the checkpoint) is not there"
                        + (f", nor at {record['base_model_path']}" if record.get("base_model_path") else "")
                        + "; move the checkpoint together with the run it was trained on")
    return base  # a tiny or hub name


def read_adaptation(path):
    """{"base_model" (loadable), "method", "options", "weights" (file), "keys" (saved key -> name)} of an
    added-weights checkpoint: xlgen's (xlgen_adaptation.json), one PEFT wrote (prompt tuning or LoRA:
    adapter_config.json with a peft_type), or xlgen's before it wrote PEFT's format (an
    adapter_config.json with a method: xlgen's names in adapter_model.safetensors)."""
    record_path, peft_path = os.path.join(path, models.ADAPTATION_FILE), os.path.join(path, models.PEFT_CONFIG_FILE)
    source = record_path if os.path.isfile(record_path) else peft_path
    record = common.read_json(source, "xlgen adaptation record" if source == record_path else "adapter config")
    written_by_peft = source == peft_path and isinstance(record, dict) and "peft_type" in record
    if written_by_peft:
        by_type = {m.peft.peft_type: m for m in REGISTRY.values() if m.peft is not None}
        method = by_type.get(str(record["peft_type"]))
        if method is None:
            raise DataError(f"{peft_path}: PEFT type {record['peft_type']} is not an xlgen method "
                            f"(xlgen reads {', '.join(sorted(by_type))})")
        if record.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
            raise DataError(f"{peft_path}: task_type {record['task_type']}; xlgen's models are SEQ_2_SEQ_LM")
        base = _resolve_base(path, {"base_model": record.get("base_model_name_or_path")})
        try:
            options = method.peft.options(record, models.load_config(base).model_type)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{peft_path}: not a complete PEFT {record['peft_type']} config ({type(e).__name__}: {e})") from None
        record = {"base_model": base, "method": method.name, "options": options}
    else:
        if not isinstance(record, dict) or not {"base_model", "method", "options"} <= set(record):
            raise DataError(f"{source}: expected base_model, method and options")
        base = _resolve_base(path, record)  # (resolved once: a resolved path is not relative to the checkpoint)
    method = get_method(record["method"], flag=f"{source}: method")
    if source == peft_path and not written_by_peft:
        weights, keys = models.PEFT_WEIGHTS_FILE, (lambda key: key)  # xlgen's names in PEFT's file name
    elif method.peft is not None:
        weights, keys = models.PEFT_WEIGHTS_FILE, method.peft.from_peft
    else:
        weights, keys = ADAPTERS_WEIGHTS_FILE, (lambda key: key)
    return {"base_model": base, "method": record["method"], "options": record["options"],
            "weights": os.path.join(path, weights), "keys": keys}


def load_added(path, data_dir=None):
    """Base model (by the saved name or relative path) + saved method + added weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    record = read_adaptation(path)
    model = models.load_model(record["base_model"], data_dir)
    apply(model, record["method"], verbose=False, **record["options"])
    weights_path = record["weights"]
    try:
        weights = {record["keys"](key): value for key, value in load_file(weights_path).items()}
    except (SafetensorError, OSError) as e:
        raise DataError(f"{weights_path}: cannot load the added weights ({e}); the checkpoint is truncated "
                        f"or corrupt: use another one (e.g. best/ instead of last/) or remove it") from None
    _, unexpected = model.load_state_dict(weights, strict=False)
    expected = set(added_state_dict(model))
    if unexpected or expected - set(weights):
        raise DataError(f"{path}: added weights do not match method {record['method']} "
                        f"(missing {sorted(expected - set(weights))[:3]}, unexpected {unexpected[:3]})")
    return model


def load(path, data_dir=None):
    """Any checkpoint: an added-weights one (with its base model) or a full one."""
    if os.path.isdir(path) and models.is_added_checkpoint(path):
        return load_added(path, data_dir)
    return models.load_model(path, data_dir)


ADAPTERS_WEIGHTS_FILE = "adapters.safetensors"


# PEFT's formats of prompt tuning and LoRA. Prompt tuning: PEFT's PromptTuningConfig with
# num_transformer_submodules=1 (the prompt before the encoder input only, as ours; PEFT's seq2seq
# default, 2, also prompts the decoder), the prompt as "prompt_embeddings". LoRA: LoraConfig on the
# family's projection names, keys "base_model.model." + ours.

def _prompt_options(config, model_type):
    if config.get("num_transformer_submodules", 1) != 1:
        raise DataError(f"PEFT prompt tuning with num_transformer_submodules {config['num_transformer_submodules']} "
                        f"(a prompt on the decoder too): xlgen's prompt is on the encoder input only (1)")
    return {"prompt_length": int(config["num_virtual_tokens"]), "seed": 0}


def _lora_options(config, model_type):
    unsupported = {key: config.get(key) for key in ("use_rslora", "use_dora", "fan_in_fan_out") if config.get(key)}
    unsupported |= {key: config.get(key) for key in ("rank_pattern", "alpha_pattern", "layers_to_transform")
                    if config.get(key)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise DataError(f"PEFT LoRA with {unsupported}: not xlgen's LoRA (rank r on whole layers, no bias)")
    names = {name: target for target, name in LORA_PROJECTIONS[model_type or "mt5"].items()}
    modules = config.get("target_modules") or []
    if isinstance(modules, str) or any(m not in names for m in modules):
        raise DataError(f"PEFT LoRA target_modules {modules}: xlgen puts LoRA on attention projections "
                        f"({', '.join(names)})")
    return {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]), "dropout": float(config.get("lora_dropout", 0.0)),
            "targets": [names[m] for m in modules]}


PROMPT_PEFT = PeftFormat(
    "PROMPT_TUNING",
    config=lambda model, options: {"num_virtual_tokens": options["prompt_length"], "num_transformer_submodules": 1,
                                   "token_dim": model.config.d_model, "prompt_tuning_init": "RANDOM"},
    options=_prompt_options,
    to_peft=lambda name: "prompt_embeddings", from_peft=lambda key: "prompt.weight" if key == "prompt_embeddings" else key)
LORA_PEFT = PeftFormat(
    "LORA",
    config=lambda model, options: {
        "r": options["rank"], "lora_alpha": options["alpha"], "lora_dropout": options["dropout"],
        "target_modules": [LORA_PROJECTIONS[model.config.model_type][t] for t in options["targets"]], "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None},
    options=_lora_options,
    to_peft=lambda name: "base_model.model." + name, from_peft=lambda key: key.removeprefix("base_model.model."))


# -----------------------------------------------------------------------------
# The registry's entries (paper Section 3, Table 4), in the paper's order

def _is_adapter(name):
    return ".adapter" in name


def _objective_check(flag):
    def check(value):
        if value not in data.SELF_SUPERVISED_OBJECTIVES:
            raise UsageError(f"{flag}: unknown objective '{value}'; choose from {', '.join(data.SELF_SUPERVISED_OBJECTIVES)}")
        return value
    return check


def paper_methods(task):
    """The methods of methods_for(task) that the paper ran (LoRA is ours)."""
    return [name for name in methods_for(task) if REGISTRY[name].in_paper]


def _is_prompt(name):
    return name.startswith("prompt.")


def _is_lora(name):
    return ".lora_" in name


register(Method("full", "full finetuning", "every weight is trained"))
register(Method("freeze", "freeze", "only the encoder is trained (ZmBART)", trainable=_encoder_only, lr_search="full"))
register(Method("adapters", "adapters", "bottleneck adapters after every sublayer; the base model frozen",
                options=(Option("bottleneck", "--adapter-dim", 64, "bottleneck size", common.positive_int,
                                _number_check("--adapter-dim", int, lambda v: v >= 1, "a positive integer")),),
                add=add_adapters, trainable=_added_only(_is_adapter), added=_is_adapter))
register(Method("prompt", "prompt tuning", "learned vectors before the encoder input; the base model frozen",
                options=(Option("prompt_length", "--prompt-length", 100, "number of prompt vectors", common.positive_int,
                                _number_check("--prompt-length", int, lambda v: v >= 1, "at least 1")),
                         Option("seed", "--seed", 0, "seed of the prompt initialisation")),
                add=add_prompt, trainable=_added_only(_is_prompt), added=_is_prompt, peft=PROMPT_PEFT))
register(Method("lora", "LoRA", "a low-rank update of the query and value projections; the base model frozen",
                options=(Option("rank", "--lora-rank", 8, "rank r of the update", common.positive_int,
                                _number_check("--lora-rank", int, lambda v: v >= 1, "a positive integer")),
                         Option("alpha", "--lora-alpha", 16.0, "scaling alpha (the update is alpha / r * B A)",
                                common.positive_float, _number_check("--lora-alpha", (int, float), lambda v: v > 0, "a positive number")),
                         Option("dropout", "--lora-dropout", 0.1, "dropout on the update's input",
                                common.non_negative_float,
                                _number_check("--lora-dropout", (int, float), lambda v: 0 <= v < 1, "in [0, 1)")),
                         Option("targets", "--lora-targets", "q,v", "projections of every attention that get an "
                                "update, among q,k,v,o", None, _lora_targets)),
                add=add_lora, trainable=_added_only(_is_lora), added=_is_lora, peft=LORA_PEFT, in_paper=False))
register(Method("mix", "mix", "as full, with self-supervised batches of the target languages mixed in",
                options=(Option("mix_prob", "--mix-prob", 0.01, "probability of a self-supervised batch (paper: 0.01)",
                                common.probability, _number_check("--mix-prob", (int, float), lambda v: 0 < v < 1, "in (0, 1)")),
                         Option("mix_langs", "--mix-langs", None, "languages of raw text mixed in (default: the "
                                "validation and test languages)", None,
                                _langs("--mix-langs", 1, "method mix needs at least one target language to mix in")),
                         Option("mix_objective", "--mix-objective", "prefix_lm", "the self-supervised task mixed in: "
                                "prefix_lm (the paper's, as in IT), or a base model's own pretraining task, "
                                "span_corruption (mT5) or mbart_denoising (mBART; paper Appendix C)", None,
                                _objective_check("--mix-objective"))),
                lr_search="full", mixes_text=True))
register(Method("multisrc", "multisrc", "as full, trained on several source languages (XL-Sum)",
                options=(Option("src_langs", "--src-langs", None, "source languages, sampled uniformly (default: the "
                                "task's, XL-Sum: en,ja,ar)", None,
                                _langs("--src-langs", 2, "method multisrc needs at least two source languages")),),
                lr_search="full", several_sources=True))


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-mt5",
                        help="tiny-mt5, tiny-mbart, tiny-nllb, a checkpoint (full or added weights) or a hub name")
    parser.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="data directory (for building tiny models)")
    parser.add_argument("--seed", type=common.seed, default=0, help="seed of the prompt initialisation")
    add_method_args(parser)
    parser.set_defaults(method="adapters")
    return parser.parse_args(argv)


@common.exits_on_error
def main(args):
    if os.path.isdir(args.model) and models.is_added_checkpoint(args.model):
        model = load_added(args.model, args.data_dir)  # already adapted: describe what it trains
        adaptation = adaptation_of(model)
        trainable, total = count_parameters(model)
        print(f"{args.model}: {adaptation['method']} checkpoint of {read_adaptation(args.model)['base_model']}, "
              f"options {adaptation['options']}: trainable parameters {trainable:,} of {total:,}")
    else:
        mix_langs = args.mix_langs or ",".join(data.target_langs()[1:])  # defaults as finetune.py would give
        src_langs = args.src_langs or ",".join(data.get_task("xlsum").source_langs)
        args.mix_langs, args.src_langs = mix_langs, src_langs
        options = check_options(args.method, options_from_args(args))
        model = apply(models.load_model(args.model, args.data_dir), args.method, **options)
    for name, param in model.named_parameters():
        if param.requires_grad:
            print(f"  trained  {name:<70} {tuple(param.shape)}")


if __name__ == "__main__":
    main(parse_args())
