"""adapt.py: exactly the right parameters are trained, adapters start as the identity, prompts work
in forward and generate, added weights save and load, counts match the real architectures."""

import os

import pytest
import torch
import torch.nn.functional as F

import adapt
import common
import data
import models
from conftest import DATA_DIR, FAMILIES, run_cli

NUM_LAYERS = models.TINY_DIMS["num_layers"]


# ----------------------------------------------------------------------------- expected sets, by name

def _mt5_block(stack, i, cross):
    names = [f"{stack}.block.{i}.layer.0.SelfAttention.{p}.weight" for p in "qkvo"]
    names += [f"{stack}.block.{i}.layer.0.layer_norm.weight"]
    if cross:
        names += [f"{stack}.block.{i}.layer.1.EncDecAttention.{p}.weight" for p in "qkvo"]
        names += [f"{stack}.block.{i}.layer.1.layer_norm.weight"]
    ff = 2 if cross else 1
    names += [f"{stack}.block.{i}.layer.{ff}.DenseReluDense.{p}.weight" for p in ("wi_0", "wi_1", "wo")]
    names += [f"{stack}.block.{i}.layer.{ff}.layer_norm.weight"]
    return names


def _bart_layer(stack, i, cross):
    pre = f"model.{stack}.layers.{i}"
    names = [f"{pre}.self_attn.{p}_proj.{w}" for p in ("k", "v", "q", "out") for w in ("weight", "bias")]
    names += [f"{pre}.self_attn_layer_norm.{w}" for w in ("weight", "bias")]
    if cross:
        names += [f"{pre}.encoder_attn.{p}_proj.{w}" for p in ("k", "v", "q", "out") for w in ("weight", "bias")]
        names += [f"{pre}.encoder_attn_layer_norm.{w}" for w in ("weight", "bias")]
    names += [f"{pre}.{fc}.{w}" for fc in ("fc1", "fc2") for w in ("weight", "bias")]
    names += [f"{pre}.final_layer_norm.{w}" for w in ("weight", "bias")]
    return names


ADAPTER_PARAMS = [f"{m}.{w}" for m in ("layer_norm", "down", "up") for w in ("weight", "bias")]


def expected_trainable(name, method, all_names):
    family = FAMILIES[name]
    if method in ("full", "mix", "multisrc"):
        return set(all_names)
    if method == "prompt":
        return {"prompt.weight"}
    if method == "freeze":
        if family == "mt5":
            names = [n for i in range(NUM_LAYERS) for n in _mt5_block("encoder", i, cross=False)]
            return set(names + ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                "encoder.final_layer_norm.weight"])
        names = [n for i in range(NUM_LAYERS) for n in _bart_layer("encoder", i, cross=False)]
        names += ["model.encoder.layer_norm.weight", "model.encoder.layer_norm.bias"]
        if family == "mbart":  # learned positions and the embedding layer norm; NLLB has neither
            names += ["model.encoder.embed_positions.weight", "model.encoder.layernorm_embedding.weight",
                      "model.encoder.layernorm_embedding.bias"]
        return set(names)
    if method == "lora":  # A and B beside q and v of every attention: encoder self, decoder self and cross
        if family == "mt5":
            attentions = [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(NUM_LAYERS)]
            attentions += [f"decoder.block.{i}.layer.{j}.{a}" for i in range(NUM_LAYERS)
                           for j, a in ((0, "SelfAttention"), (1, "EncDecAttention"))]
            projections = ("q", "v")
        else:
            attentions = [f"model.encoder.layers.{i}.self_attn" for i in range(NUM_LAYERS)]
            attentions += [f"model.decoder.layers.{i}.{a}" for i in range(NUM_LAYERS) for a in ("self_attn", "encoder_attn")]
            projections = ("q_proj", "v_proj")
        return {f"{a}.{p}.lora_{m}.weight" for a in attentions for p in projections for m in "AB"}
    assert method == "adapters"
    sites = []
    for i in range(NUM_LAYERS):
        if family == "mt5":
            sites += [f"encoder.block.{i}.layer.{j}.adapter" for j in (0, 1)]
            sites += [f"decoder.block.{i}.layer.{j}.adapter" for j in (0, 1, 2)]
        else:
            sites += [f"model.encoder.layers.{i}.adapter_{s}" for s in ("self_attn", "ffn")]
            sites += [f"model.decoder.layers.{i}.adapter_{s}" for s in ("self_attn", "cross_attn", "ffn")]
    return {f"{site}.{p}" for site in sites for p in ADAPTER_PARAMS}


def _batch(name, tokenizers, texts=("Hello there, my friend.", "Short one."), target="Bonjour à tous."):
    family = FAMILIES[name]
    encoder = models.Seq2SeqEncoder(tokenizers[name], family)
    examples = [data.Example(str(i), t, target, "en", "fr") for i, t in enumerate(texts)]
    return data.collate(encoder.encode(examples), tokenizers[name].pad_token_id), encoder


OPTIONS = {"mix": {"mix_langs": ["fr", "zh"]}, "multisrc": {"src_langs": ["en", "ja", "ar"]},
           "prompt": {"prompt_length": 7}}


@pytest.mark.parametrize("method", list(adapt.REGISTRY))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_trainable_set_and_only_it_changes(name, method, tokenizers):
    torch.manual_seed(0)
    model = models.load_model(name, DATA_DIR)
    base_names = [n for n, _ in model.named_parameters()]
    adapt.apply(model, method, verbose=False, **OPTIONS.get(method, {}))
    all_names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(name, method, all_names)
    if adapt.get_method(method).add is None:
        assert all_names == base_names  # nothing added
    # two AdamW steps (the first moves the zero-initialised adapter Up; the second reaches the rest)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, _ = _batch(name, tokenizers)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


# ----------------------------------------------------------------------------- real dimensions

PUBLISHED = {"google/mt5-base": 582_401_280, "google/mt5-large": 1_229_581_312,
             "facebook/mbart-large-50": 610_879_488, "facebook/nllb-200-distilled-600M": 615_073_792}


def closed_form(name, method, bottleneck=64, prompt_length=100, rank=8):
    family, c = models.REAL_CONFIGS[name]
    d = c["d_model"]
    enc_layers = c.get("num_layers", c.get("encoder_layers"))
    dec_layers = c.get("num_decoder_layers", c.get("decoder_layers"))
    if method == "lora":
        # per updated projection d_in -> d_out: A (rank x d_in) + B (d_out x rank); q and v of each
        # attention: 1 per encoder layer, 2 per decoder layer (self, cross); q, v: d -> heads x d_kv
        inner = c["num_heads"] * c["d_kv"] if family == "mt5" else d
        return (enc_layers + 2 * dec_layers) * 2 * rank * (d + inner)
    if method == "adapters":
        # per adapter: LayerNorm 2d + Down (d*b + b) + Up (b*d + d); after 2 sublayers per encoder
        # layer and 3 per decoder layer
        return (2 * enc_layers + 3 * dec_layers) * ((2 * bottleneck + 3) * d + bottleneck)
    if method == "prompt":
        return prompt_length * d
    assert method == "freeze"
    if family == "mt5":
        inner = c["num_heads"] * c["d_kv"]
        # per block: q,k,v,o (4*d*inner) + 2 layer norms (2d) + gated FFN wi_0, wi_1, wo (3*d*d_ff);
        # plus the relative attention bias (32 buckets x heads) and the final layer norm (d)
        return enc_layers * (4 * d * inner + 3 * d * c["d_ff"] + 2 * d) + 32 * c["num_heads"] + d
    ff = c["encoder_ffn_dim"]
    # per layer: q,k,v,out with biases 4(d^2 + d), fc1 d*ff + ff, fc2 ff*d + d, two layer norms 4d
    per_layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d
    total = enc_layers * per_layer + 2 * d  # + final layer norm
    if family == "mbart":  # + learned positions (1024 + 2 offset) and layernorm_embedding
        total += (c["max_position_embeddings"] + 2) * d + 2 * d
    return total


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_real_architectures_on_meta(name):
    model = models.real_architecture(name)
    assert next(model.parameters()).device.type == "meta"
    assert adapt.count_parameters(model)[1] == PUBLISHED[name]
    for method in ("adapters", "prompt", "freeze", "lora"):
        adapted = adapt.apply(models.real_architecture(name), method, verbose=False)
        trainable, total = adapt.count_parameters(adapted)
        assert trainable == closed_form(name, method), method
        if method == "adapters":  # the saved file (float32 added weights) is ~1% of the model's
            assert trainable / PUBLISHED[name] < 0.05
    assert closed_form("google/mt5-base", "adapters") == 6_040_320
    # LoRA on mT5-base by hand: 12 + 2 x 12 = 36 attentions, q and v each, 8 x (768 + 768) per projection
    assert closed_form("google/mt5-base", "lora") == 36 * 2 * 8 * 1536 == 884_736


# ----------------------------------------------------------------------------- behaviour

@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapters_at_init_equal_the_base_model(name, tokenizers):
    batch, _ = _batch(name, tokenizers)
    base = models.load_model(name, DATA_DIR).eval()
    adapted = adapt.apply(models.load_model(name, DATA_DIR).eval(), "adapters", verbose=False)
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, adapted(**batch).logits)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_at_init_is_the_base_model_and_trained_equals_the_merged_weights(name, tokenizers):
    """B = 0 at init: the base model's logits exactly. After A and B move, the adapted model in eval
    mode (no dropout) equals the base model whose q and v weights are W + (alpha / r) B A -- LoRA's
    merged form (Hu et al. 2022, eq. 3), computed here independently of the hooks."""
    torch.manual_seed(0)
    batch, _ = _batch(name, tokenizers)
    base = models.load_model(name, DATA_DIR).eval()
    lora = adapt.apply(models.load_model(name, DATA_DIR).eval(), "lora", rank=4, alpha=12.0, verbose=False)
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, lora(**batch).logits)
        for param in lora.parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn_like(param))
        merged = dict(base.named_parameters())
        updated = 0
        for module_name, module in lora.named_modules():
            if hasattr(module, "lora_A"):
                merged[f"{module_name}.weight"].add_(12.0 / 4 * module.lora_B.weight @ module.lora_A.weight)
                updated += 1
        assert updated == (2 + 2 * 2) * NUM_LAYERS  # q, v of the encoder's self and the decoder's self and cross
        assert torch.allclose(lora(**batch).logits, base(**batch).logits, atol=1e-5)
        assert not torch.allclose(lora(**batch).logits, models.load_model(name, DATA_DIR).eval()(**batch).logits, atol=1e-3)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prompt_is_prepended_with_extended_mask(name, tokenizers):
    batch, encoder = _batch(name, tokenizers)
    base = models.load_model(name, DATA_DIR).eval()
    prompted = adapt.apply(models.load_model(name, DATA_DIR).eval(), "prompt", prompt_length=5, verbose=False)
    # reference: the base model fed [prompt; embed(input_ids)] and a mask with 5 ones prepended
    embeds = base.get_encoder().embed_tokens(batch["input_ids"])
    inputs_embeds = torch.cat([prompted.prompt.weight.unsqueeze(0).expand(2, -1, -1), embeds], dim=1)
    mask = torch.cat([torch.ones(2, 5, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=inputs_embeds, attention_mask=mask, labels=batch["labels"]).logits
        assert torch.allclose(prompted(**batch).logits, expected, atol=1e-6)
    # generate, greedy and beam, equals the base model generating from the same embeddings
    gen = encoder.generation_kwargs("fr")
    for beams in (1, 3):
        out = prompted.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                num_beams=beams, max_new_tokens=6, do_sample=False, **gen)
        ref = base.generate(inputs_embeds=inputs_embeds, attention_mask=mask, num_beams=beams,
                            max_new_tokens=6, do_sample=False, **gen)
        assert out.shape[0] == 2 and torch.equal(out, ref)
    # initialised from rows of the embedding matrix, as the encoder sees them (scaled for mBART/NLLB)
    rows = torch.randint(0, base.config.vocab_size, (5,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(prompted.prompt.weight.detach(), base.get_encoder().embed_tokens(rows).detach())


def test_training_only_the_prompt_lowers_the_loss(tokenizers):
    torch.manual_seed(0)
    batch, _ = _batch("tiny-mt5", tokenizers, texts=("What is the capital of France? Paris is.",) * 4, target="Paris")
    model = adapt.apply(models.load_model("tiny-mt5", DATA_DIR), "prompt", prompt_length=10, verbose=False)
    model.train()
    optimizer = torch.optim.AdamW([model.prompt.weight], lr=0.3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("method", ["adapters", "prompt", "lora"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_load_added_weights_round_trip(name, method, tokenizers, tmp_path):
    torch.manual_seed(1)
    options = {"adapters": {"bottleneck": 16}, "prompt": {"prompt_length": 20}, "lora": {"rank": 4}}[method]
    model = adapt.apply(models.load_model(name, DATA_DIR), method, verbose=False, **options)
    with torch.no_grad():  # move the added weights away from their initial values
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    adapt.save(model, str(tmp_path), base_model=name)
    weights = "adapters.safetensors" if method == "adapters" else models.PEFT_WEIGHTS_FILE
    expected = [weights, models.ADAPTATION_FILE] + ([models.PEFT_CONFIG_FILE] if method != "adapters" else [])
    assert sorted(os.listdir(tmp_path)) == sorted(expected)
    loaded = adapt.load(str(tmp_path), data_dir=DATA_DIR)
    assert adapt.adaptation_of(loaded) == adapt.adaptation_of(model)
    batch, _ = _batch(name, tokenizers)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    added = os.path.getsize(tmp_path / weights)
    full = os.path.getsize(os.path.join(models.resolve(name), "model.safetensors"))
    assert added < 0.05 * full, (added, full)


def test_bad_input_errors(tokenizers):
    model = models.load_model("tiny-mt5", DATA_DIR)
    with pytest.raises(common.UsageError, match="unknown method 'no-such-method'"):
        adapt.apply(model, "no-such-method")
    with pytest.raises(common.UsageError, match="--prompt-length: must be at least 1"):
        adapt.apply(model, "prompt", prompt_length=0)
    with pytest.raises(common.UsageError, match="--mix-prob"):
        adapt.apply(model, "mix", mix_prob=1.5, mix_langs=["fr"])
    with pytest.raises(common.UsageError, match="--src-langs"):
        adapt.apply(model, "multisrc", src_langs=["en"])
    with pytest.raises(common.UsageError, match="unknown option"):
        adapt.apply(model, "adapters", prompt_length=3)
    with pytest.raises(common.UsageError, match="--lora-rank: must be a positive integer, got 0"):
        adapt.apply(model, "lora", rank=0)
    with pytest.raises(common.UsageError, match="--lora-targets: give projections among q,k,v,o"):
        adapt.apply(model, "lora", targets="q,x")
    with pytest.raises(common.UsageError, match=r"--lora-dropout: must be in \[0, 1\), got 1.0"):
        adapt.apply(model, "lora", dropout=1.0)
    from transformers import T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    with pytest.raises(common.UsageError, match="unsupported model class T5ForConditionalGeneration"):
        adapt.apply(t5, "adapters")
    adapt.apply(model, "adapters", verbose=False)
    with pytest.raises(common.UsageError, match="already adapted"):
        adapt.apply(model, "prompt")


@pytest.mark.parametrize("method,expected", [("prompt", "trainable parameters 256 of"),
                                             ("mix", "method mix: trainable parameters"),
                                             ("multisrc", "method multisrc: trainable parameters")])
def test_cli_prints_trainable_parameters(method, expected, capsys):
    code, out, err = run_cli(adapt, ["--model", "tiny-nllb", "--method", method, "--prompt-length", "4",
                                     "--data-dir", DATA_DIR], capsys)
    assert code == 0, err
    assert expected in out and "  trained  " in out


def test_cli_describes_an_added_weights_checkpoint(tmp_path, capsys):
    model = adapt.apply(models.load_model("tiny-nllb", DATA_DIR), "adapters", bottleneck=4, verbose=False)
    adapt.save(model, str(tmp_path), base_model="tiny-nllb")
    code, out, err = run_cli(adapt, ["--model", str(tmp_path), "--data-dir", DATA_DIR], capsys)
    assert code == 0, err
    assert f"{tmp_path}: adapters checkpoint of tiny-nllb" in out and ".adapter_ffn.up.weight" in out


# Where the docstring's diagram puts an adapter: between a sublayer and its residual addition.
# For each family and kind of site: a module whose forward input (or output) is the block output
# "residual + sublayer output" of that sublayer.
def _site_and_block(model, family, kind):
    """(sublayer, adapter, block-output probe, whether the probe's *input* is the block output, layer)."""
    if family == "mt5":
        stack = model.encoder if kind == "encoder self-attention" else model.decoder
        block = stack.block[1]
        index = {"encoder self-attention": 0, "decoder cross-attention": 1, "decoder feed-forward": 2}[kind]
        layer = block.layer[index]
        sublayer = {0: layer.SelfAttention if index == 0 else None, 1: getattr(layer, "EncDecAttention", None),
                    2: getattr(layer, "DenseReluDense", None)}[index]
        return sublayer, getattr(layer, "adapter", None), layer, False, block
    inner = model.model
    if kind == "encoder self-attention":
        layer = inner.encoder.layers[1]
        return layer.self_attn, getattr(layer, "adapter_self_attn", None), layer.final_layer_norm, True, layer
    layer = inner.decoder.layers[1]
    if kind == "decoder cross-attention":
        return layer.encoder_attn, getattr(layer, "adapter_cross_attn", None), layer.final_layer_norm, True, layer
    return layer.fc2, getattr(layer, "adapter_ffn", None), layer, False, layer


def _capture(module, use_input):
    """Record the first input (use_input) or output tensor of `module`'s first call; change nothing."""
    store = {}

    def pre_hook(m, args):
        store.setdefault("x", args[0].detach().clone())

    def hook(m, args, out):
        store.setdefault("x", (out[0] if isinstance(out, tuple) else out).detach().clone())
    handle = module.register_forward_pre_hook(pre_hook) if use_input else module.register_forward_hook(hook)
    return store, handle


@pytest.mark.parametrize("kind", ["encoder self-attention", "decoder cross-attention", "decoder feed-forward"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_trained_adapter_acts_between_its_sublayer_and_the_residual(name, kind, tokenizers):
    family = FAMILIES[name]
    batch, _ = _batch(name, tokenizers)
    base = models.load_model(name, DATA_DIR).eval()
    adapted = adapt.apply(models.load_model(name, DATA_DIR).eval(), "adapters", bottleneck=8, verbose=False)
    sublayer, adapter, probe, probe_input, layer = _site_and_block(adapted, family, kind)
    b_sublayer, _, b_probe, _, b_layer = _site_and_block(base, family, kind)
    torch.manual_seed(3)
    with torch.no_grad():  # move this one adapter away from the identity
        adapter.up.weight.normal_(std=0.5)
        adapter.up.bias.normal_(std=0.5)
    captured = {}
    handles = []
    for key, module, use_input in (("y", b_sublayer, False), ("block_base", b_probe, probe_input),
                                   ("block", probe, probe_input), ("layer_in_base", b_layer, True),
                                   ("layer_in", layer, True)):
        store, handle = _capture(module, use_input)
        captured[key] = store
        handles.append(handle)
    with torch.no_grad():
        base_logits, logits = base(**batch).logits, adapted(**batch).logits
    for handle in handles:
        handle.remove()
    # nothing before the layer changes ...
    assert torch.equal(captured["layer_in"]["x"], captured["layer_in_base"]["x"])
    # ... the block output gains exactly Up(ReLU(Down(LayerNorm(y)))), y the sublayer's output ...
    y = captured["y"]["x"]
    a = adapter
    expected = F.linear(torch.relu(F.linear(F.layer_norm(y, y.shape[-1:], a.layer_norm.weight, a.layer_norm.bias,
                                                         a.layer_norm.eps), a.down.weight, a.down.bias)),
                        a.up.weight, a.up.bias)
    assert torch.allclose(captured["block"]["x"] - captured["block_base"]["x"], expected, atol=1e-5)
    # ... and the model's output changes
    assert not torch.allclose(logits, base_logits)
