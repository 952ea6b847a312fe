"""The six adaptation methods of the paper (Section 3, Table 4), by module surgery on HF models.

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
wired in with forward hooks, so the base weights keep their names and load as usual.

The encoder input with a prompt of P vectors (mBART/NLLB; mT5 has no language code):

        input_ids:        [fr_XX]  X1  X2 ... Xn  </s>
        encoder input:  [p1 ... pP] [fr_XX] X1 X2 ... Xn </s>       (embeddings, P + n + 2 positions)
        attention mask: [1  ...  1] [1 ... 1 0 0 pad]               (P ones prepended)

The prompt goes *before* the language code: the pretrained model then still reads the exact
sequence it was trained on ("[code] X </s>", contiguous), and one prompt serves every source
language unchanged, which is what zero-shot transfer needs. Prompt vectors are initialised from
randomly chosen (seeded) rows of the embedding matrix, as the encoder sees them (mBART and NLLB
scale embeddings by sqrt(d_model), so the prompt starts at the same scale).
"""

import argparse
import json
import os
import sys
import tempfile

import torch
from torch import nn

import data
from data import DataError

METHODS = ("full", "freeze", "adapters", "prompt", "mix", "multisrc")
SUPPORTED = {"mt5": "MT5ForConditionalGeneration", "mbart": "MBartForConditionalGeneration",
             "m2m_100": "M2M100ForConditionalGeneration"}
ADDED_WEIGHTS_FILE = "adapter_model.safetensors"
ADDED_CONFIG_FILE = "adapter_config.json"


# -----------------------------------------------------------------------------
# Checks

def _check_model(model, method):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED or type(model).__name__ != SUPPORTED[model_type]:
        raise DataError(f"--method {method}: unsupported model class {type(model).__name__}; "
                        f"supported: {', '.join(SUPPORTED.values())}")


def check_options(method, options):
    """Validate a method's options; returns them with defaults filled in."""
    defaults = {"adapters": {"bottleneck": 64}, "prompt": {"prompt_length": 100, "seed": 0},
                "mix": {"mix_prob": 0.01, "mix_langs": None}, "multisrc": {"src_langs": None}}
    if method not in METHODS:
        raise DataError(f"--method: unknown method '{method}'; choose from {', '.join(METHODS)}")
    allowed = defaults.get(method, {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"--method {method}: unknown option(s) {', '.join(unknown)}")
    options = {**allowed, **options}
    if method == "adapters" and not (isinstance(options["bottleneck"], int) and options["bottleneck"] >= 1):
        raise DataError(f"--adapter-dim: must be a positive integer, got {options['bottleneck']}")
    if method == "prompt" and not (isinstance(options["prompt_length"], int) and options["prompt_length"] >= 1):
        raise DataError(f"--prompt-length: must be at least 1, got {options['prompt_length']}")
    if method == "mix":
        if not 0.0 < float(options["mix_prob"]) < 1.0:
            raise DataError(f"--mix-prob: must be in (0, 1), got {options['mix_prob']}")
        if not options["mix_langs"]:
            raise DataError("--mix-langs: method mix needs at least one target language to mix in")
        for lang in options["mix_langs"]:
            data.get_language(lang, "--mix-langs")
    if method == "multisrc":
        langs = options["src_langs"] or []
        if len(langs) < 2:
            raise DataError(f"--src-langs: method multisrc needs at least two source languages, got {langs}")
        for lang in langs:
            data.get_language(lang, "--src-langs")
    return options


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


def add_adapters(model, bottleneck=64):
    d_model = model.config.d_model
    reference = next(model.parameters())
    for parent, name, sublayer in adapter_sites(model):
        adapter = Adapter(d_model, bottleneck).to(device=reference.device, dtype=reference.dtype)
        setattr(parent, name, adapter)
        model._xlgen_hooks.append(sublayer.register_forward_hook(_adapter_hook(adapter)))


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


def add_prompt(model, prompt_length=100, seed=0):
    embed = model.get_encoder().embed_tokens
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, embed.num_embeddings, (prompt_length,), generator=generator)
    with torch.no_grad():
        init = embed(rows.to(embed.weight.device)).detach()  # (P, d): rows as the encoder sees them
    model.prompt = Prompt(init)
    model._xlgen_hooks.append(model.get_encoder().register_forward_pre_hook(_encoder_pre_hook(model), with_kwargs=True))
    model._xlgen_hooks.append(model.register_forward_pre_hook(_model_pre_hook(model), with_kwargs=True))


# -----------------------------------------------------------------------------
# The entry point

def set_trainable(model, method):
    """requires_grad per method (after any modules were added)."""
    for param in model.parameters():
        param.requires_grad = method in ("full", "mix", "multisrc")
    if method == "freeze":
        # Only the encoder is trained. Per family, the borderline parameters:
        #   mT5:   encoder.embed_tokens IS shared.weight -> frozen; the encoder's relative position
        #          bias (block 0) and final_layer_norm -> trained; the untied lm_head -> frozen.
        #   mBART: encoder.embed_tokens IS the shared (tied) embedding -> frozen, and with it the
        #          output layer; the encoder's learned positions (embed_positions),
        #          layernorm_embedding and final layer_norm -> trained; their decoder twins frozen.
        #   NLLB:  as mBART, but positions are sinusoidal buffers (no parameters) and there is no
        #          layernorm_embedding; the encoder's final layer_norm -> trained.
        for param in model.get_encoder().parameters():
            param.requires_grad = True
        model.get_input_embeddings().weight.requires_grad = False
        model.get_output_embeddings().weight.requires_grad = False
    elif method == "adapters":
        for name, param in model.named_parameters():
            param.requires_grad = ".adapter" in name
    elif method == "prompt":
        model.prompt.weight.requires_grad = True


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def apply(model, method, verbose=True, **options):
    """Adapt `model` in place for `method` and return it. Options: adapters: bottleneck=64;
    prompt: prompt_length=100, seed=0; mix: mix_prob=0.01, mix_langs=[...]; multisrc: src_langs=[...]."""
    options = check_options(method, options)
    _check_model(model, method)
    if getattr(model, "_xlgen_method", None) is not None:
        raise DataError(f"--method {method}: model was already adapted with '{model._xlgen_method}'")
    model._xlgen_hooks = []
    if method == "adapters":
        add_adapters(model, options["bottleneck"])
    elif method == "prompt":
        add_prompt(model, options["prompt_length"], options["seed"])
    set_trainable(model, method)
    model._xlgen_method, model._xlgen_options = method, options
    if verbose:
        trainable, total = count_parameters(model)
        print(f"adapt: method {method}: trainable parameters {trainable:,} of {total:,} "
              f"({100.0 * trainable / total:.2f}%)")
    return model


# -----------------------------------------------------------------------------
# Saving and loading the added weights only (adapters, prompt)

def added_state_dict(model):
    """The weights that `adapters` / `prompt` added to the base model."""
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters()
            if ".adapter" in name or name.startswith("prompt.")}


def save_added(model, out_dir, base_model):
    """Write adapter_model.safetensors (added weights only) and adapter_config.json (base model
    name, method, options) into out_dir, each via a temporary file and a rename."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".part-")
    os.close(fd)
    save_file(added_state_dict(model), tmp)
    os.replace(tmp, os.path.join(out_dir, ADDED_WEIGHTS_FILE))
    config = {"base_model": base_model, "method": model._xlgen_method, "options": model._xlgen_options}
    data.write_json(os.path.join(out_dir, ADDED_CONFIG_FILE), config)


def is_added_checkpoint(path):
    return os.path.isfile(os.path.join(path, ADDED_CONFIG_FILE))


def load_added(path, base_model=None, data_dir=None):
    """Base model (by the saved name, or `base_model` if given) + saved method + added weights."""
    import models
    from safetensors.torch import load_file
    with open(os.path.join(path, ADDED_CONFIG_FILE)) as f:
        config = json.load(f)
    model = models.load_model(base_model or config["base_model"], data_dir)
    apply(model, config["method"], verbose=False, **config["options"])
    weights = load_file(os.path.join(path, ADDED_WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    expected = set(added_state_dict(model))
    if unexpected or expected - set(weights):
        raise DataError(f"{path}: added weights do not match method {config['method']} "
                        f"(missing {sorted(expected - set(weights))[:3]}, unexpected {unexpected[:3]})")
    return model


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mt5", help="tiny-mt5, tiny-mbart, tiny-nllb or a checkpoint")
    parser.add_argument("--method", default="adapters", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--adapter-dim", type=int, default=64, help="adapter bottleneck size")
    parser.add_argument("--prompt-length", type=int, default=100, help="number of prompt vectors")
    parser.add_argument("--data-dir", default=None, help="data directory (for building tiny models)")
    return parser.parse_args(argv)


def options_from_args(args):
    """The apply() options that the command-line flags give for args.method."""
    if args.method == "adapters":
        return {"bottleneck": args.adapter_dim}
    if args.method == "prompt":
        return {"prompt_length": args.prompt_length, "seed": getattr(args, "seed", 0)}
    if args.method == "mix":
        return {"mix_prob": args.mix_prob, "mix_langs": args.mix_langs}
    if args.method == "multisrc":
        return {"src_langs": args.src_langs}
    return {}


def main(args):
    import models
    try:
        check_options(args.method, options_from_args(args))
        model = models.load_model(args.model, args.data_dir)
        apply(model, args.method, **options_from_args(args))
    except DataError as e:
        sys.exit(f"error: {e}")
    for name, param in model.named_parameters():
        if param.requires_grad:
            print(f"  trained  {name:<70} {tuple(param.shape)}")


if __name__ == "__main__":
    main(parse_args())
