"""The training step's gradient accumulation and the evaluation decoder, against independent references:
HF's own loss on one big batch, and HF's own model.generate."""

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import adapt
import data
import decode
import loop
import models
from conftest import DATA_DIR, FAMILIES, sharpened

CPU = torch.device("cpu")


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was stepped with (the update, before the LR)."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_update_freq_2_at_2000_tokens_is_the_update_of_one_4000_token_batch(squad_train):
    """--update-freq 2 --max-tokens 2000 against --max-tokens 4000 over the same examples: the two
    2000-token batches the stream draws, and one batch of all their examples. The reference
    gradient is HF's own loss on the big batch (CrossEntropyLoss(ignore_index=-100): the mean over
    all its target tokens), not ours. Equal within 1e-5 relative for every trainable tensor; the
    mean of the two batches' own means (what plain accumulation of per-batch losses gives) is not."""
    torch.manual_seed(0)
    model = models.load_model("tiny-mt5", DATA_DIR).eval()  # dropout off: both sides see the same network
    tokenizer = models.load_tokenizer("tiny-mt5", DATA_DIR)
    encoded = models.Seq2SeqEncoder(tokenizer, "mt5").encode(data.qa_examples(squad_train[:300], "en"))
    stream = data.TokenBatches(encoded, max_tokens=2000, seed=0)
    small = [next(stream), next(stream)]
    big = data.collate([encoded[i] for i in small[0] + small[1]], tokenizer.pad_token_id)
    assert big["input_ids"].numel() + big["labels"].numel() <= 2 * 2 * 2000  # within the 4000-token budget's reach
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    model(input_ids=big["input_ids"], attention_mask=big["attention_mask"], labels=big["labels"]).loss.backward()
    reference = [p.grad.detach().clone() for p in params]

    model.zero_grad()
    optimizer = RecordingSGD(params, lr=0.0)  # lr 0: the weights stay, so the naive check below sees the same model
    batches = [stream.collate(b, tokenizer.pad_token_id) for b in small]
    tokens = [int((b["labels"] != -100).sum()) for b in batches]
    loss, num_tokens, _ = loop.train_step(model, optimizer, batches, 0.0, 0.0, CPU)
    assert num_tokens == sum(tokens) == int((big["labels"] != -100).sum()) and tokens[0] != tokens[1]
    errors = [relative_error(g, r) for g, r in zip(optimizer.grads, reference)]
    assert max(errors) < 1e-5, max(errors)

    model.zero_grad()  # the naive accumulation, (mean_1 + mean_2) / 2, weighs the smaller batch's tokens more
    for b in batches:
        (model(**b).loss / 2).backward()
    naive = [p.grad.detach().clone() for p in params]
    assert max(relative_error(g, r) for g, r in zip(naive, reference)) > 1e-3


@pytest.mark.parametrize("name", ["tiny-mt5", "tiny-mbart", "tiny-nllb"])
def test_a_bucketed_batch_with_empty_rows_has_the_loss_of_the_batch_as_collated(name, squad_train):
    """--compile pads 17 rows to 18 (data.train_shape): the 18th has no source token and no target.
    Its loss is the collated batch's. (mBART's shift of the labels starts each row with its last
    target token; on a row without one HF's gather indexed -1 and the step failed.)"""
    model, tokenizer = adapted(name, "full")
    encoded = models.Seq2SeqEncoder(tokenizer, FAMILIES[name]).encode(data.qa_examples(squad_train[:17], "en"))
    batch = data.collate(encoded, tokenizer.pad_token_id)
    padded = data.pad_to_buckets(batch, tokenizer.pad_token_id)
    assert padded["input_ids"].shape[0] == 18 and int(padded["attention_mask"][17].sum()) == 0
    with torch.no_grad():
        expected = loop.loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = loop.loss_sum(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [("tiny-mt5", "full"), ("tiny-mbart", "adapters")])  # ~70 s each
def test_compiled_step_on_bucketed_batches_is_the_eager_step(name, method, squad_train):
    """--compile's training step (batches padded to data.train_shape, loss_sum compiled) against the
    eager step on the batches as collated: the same loss and gradients within float tolerance over
    five batches of different shapes, dropout off (bucketing changes which numbers dropout draws, not
    the loss). The compiled function is reused: 1 graph for the 5 shapes, whose rows, source and
    target lengths all differ (torch's automatic dynamic shapes alone: 3, a graph per dimension's
    change), one of them a batch of one row padded to two (a size of 1 would get a graph of its own).
    Backend aot_eager (dynamo's and AOT autograd's forward and backward graphs, without inductor's
    C++ code generation, minutes on 2 cores for a backward; the decoder test runs inductor)."""
    model, tokenizer = adapted(name, method)
    encoded = models.Seq2SeqEncoder(tokenizer, FAMILIES[name]).encode(data.qa_examples(squad_train[:400], "en"))
    stream = data.TokenBatches(encoded, max_tokens=800, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = loop.compiled_loss("aot_eager")
    shapes, collated_rows = [], []
    for _ in range(5):
        batch = stream.collate(next(stream), tokenizer.pad_token_id)
        collated_rows.append(batch["input_ids"].shape[0])
        padded = data.pad_to_buckets(batch, tokenizer.pad_token_id)
        shapes.append(tuple(padded["input_ids"].shape) + (padded["labels"].shape[1],))
        results = []
        for batches, loss_fn in (([batch], loop.loss_sum), ([padded], compiled)):
            optimizer = RecordingSGD(params, lr=0.0)
            loss, num_tokens, _ = loop.train_step(model, optimizer, batches, 0.0, 0.0, CPU, loss_fn=loss_fn)
            results.append((loss, num_tokens, optimizer.grads))
        (eager_loss, eager_tokens, eager_grads), (ours_loss, ours_tokens, ours_grads) = results
        assert ours_tokens == eager_tokens and ours_loss == pytest.approx(eager_loss, rel=1e-5)
        # against the whole gradient's norm: a key projection's bias has a true gradient of 0 (softmax
        # ignores a shift shared by all keys), its computed one is float noise on both sides
        scale = torch.cat([g.flatten() for g in eager_grads]).norm()
        assert max(float((g - r).norm() / scale) for g, r in zip(ours_grads, eager_grads)) < 1e-5
    rows, sources, targets = zip(*shapes)
    assert collated_rows.count(1) == 1 and 1 not in rows, (collated_rows, shapes)
    assert len(set(shapes)) == 5 and len(set(rows)) == 3 and len(set(sources)) == 5 and len(set(targets)) == 2, shapes
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------- the evaluation decoder

class Lengths:
    """</s> suppressed until step L_i of example i, then forced: rows end at different steps."""

    def __init__(self, lengths, eos):
        self.lengths, self.eos = torch.tensor(lengths), eos

    def __call__(self, indices, step, scores):
        length = self.lengths[indices]
        scores[step < length, self.eos] = -math.inf
        scores[step >= length] = -math.inf
        scores[step >= length, self.eos] = 0.0


class HFLengths(LogitsProcessor):
    def __init__(self, rule, indices):
        self.rule, self.indices = rule, torch.tensor(indices)

    def __call__(self, input_ids, scores):
        self.rule(self.indices, input_ids.shape[1] - 1, scores)
        return scores


def one_by_one(model, tokenizer, encoded, generation, max_new_tokens, rule=None, beams=1):
    """HF generate, one source at a time (no padding, no batching), greedy or with `beams` beams (the
    rule sees each of them as the source's row): the reference."""
    texts = []
    for i, e in enumerate(encoded):
        extra = {"logits_processor": LogitsProcessorList([HFLengths(rule, [i] * beams)])} if rule else {}
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([e["input_ids"]]), max_new_tokens=max_new_tokens,
                                 num_beams=beams, do_sample=False, **generation, **extra)
        texts += loop.decode_generated(tokenizer, out, generation)
    return texts


def adapted(name, method):
    """A tiny model of `name` with `method`'s module surgery (random weights, seed 0; eval mode) and
    its tokenizer."""
    torch.manual_seed(0)
    model = models.load_model(name, DATA_DIR)
    if method != "full":
        adapt.apply(model, method, verbose=False, **({"prompt_length": 8} if method == "prompt" else {}))
    model.eval()
    return model, models.load_tokenizer(name, DATA_DIR)


def adapted_and_encoded(name, method, lang, n):
    """adapted(), the first `n` XQuAD questions of `lang` encoded for it, and its generation settings
    for `lang`."""
    model, tokenizer = adapted(name, method)
    encoder = models.Seq2SeqEncoder(tokenizer, FAMILIES[name])
    encoded = encoder.encode(data.qa_examples(data.read_squad(data.xquad_path(DATA_DIR, lang))[:n], lang))
    return model, tokenizer, encoded, encoder.generation_kwargs(lang)


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", ["full"] + [name for name, m in adapt.REGISTRY.items() if m.add is not None])
def test_greedy_batch_decodes_exactly_as_hf_generate(name, method, decoder):
    """loop.generate (sorted batches; greedy_batch with finished rows dropped from the batch, or
    decode.StaticDecoder with bucketed shapes, a preallocated cache and re-packing) against HF
    generate on each source alone, each family (mBART's forced BOS and forced EOS, NLLB's BOS) and
    each kind of module surgery that changes the forward (prompt's mask, adapters' hooks)."""
    model, tokenizer, encoded, generation = adapted_and_encoded(name, method, "es", 12)
    assert loop.greedy_supported(model)
    ours = loop.generate(model, tokenizer, encoded, generation, CPU, 12, max_tokens=2000, max_batch_size=256,
                         decoder=decoder)
    assert ours == one_by_one(model, tokenizer, encoded, generation, 12)

    rule = Lengths([2 + (5 * i) % 9 for i in range(len(encoded))], tokenizer.eos_token_id)  # ends at steps 2..10
    sizes = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    ours = loop.generate(model, tokenizer, encoded, generation, CPU, 12, max_tokens=100_000, max_batch_size=256,
                         logits_fn=rule, decoder=decoder)
    hook.remove()
    assert ours == one_by_one(model, tokenizer, encoded, generation, 12, rule)
    # the batch shrinks as rows end: at once (dynamic), or at the buckets 12, 10, 8, 7, ... (static)
    assert sizes[0] == len(encoded) and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(encoded)
    if decoder == "static":
        assert set(sizes) <= {decode.bucket(n) for n in range(1, 13)} and len(set(sizes)) > 2


def test_generation_configs_greedy_batch_does_not_follow_go_to_hf_generate():
    model = models.load_model("tiny-mt5", DATA_DIR)
    assert loop.greedy_supported(model)
    model.generation_config.no_repeat_ngram_size = 3
    assert not loop.greedy_supported(model)


@pytest.mark.slow
@pytest.mark.parametrize("name,method,backend", [("tiny-mt5", "prompt", "aot_eager"), ("tiny-mbart", "adapters", "aot_eager"),
                                                 ("tiny-nllb", "lora", "aot_eager"), ("tiny-nllb", "full", "inductor")])
def test_compiled_static_decoder_decodes_exactly_as_hf_generate(name, method, backend):
    """The static decoder with its step compiled by torch.compile against HF generate on each source
    alone, the rows ending one by one so the batch re-packs through every bucket from 10 rows down to
    one row (each a new shape). aot_eager: dynamo's graphs of the real modules, hooks and static
    cache, run as traced; inductor (once, its C++ code generation is slow on 2 cores): the code a GPU
    run compiles too, there captured as CUDA graphs (mode "reduce-overhead"). Dynamo compiles one
    graph for all those shapes (decode.mark_dynamic; unmarked it compiled 3: the first shape's, a
    general one, and one row's)."""
    model, tokenizer, encoded, generation = adapted_and_encoded(name, method, "de", 9)
    rule = Lengths([2 + i for i in range(len(encoded))], tokenizer.eos_token_id)  # rows end at steps 2..10
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    static = decode.StaticDecoder(model, compile=True, backend=backend)
    ours = loop.generate(model, tokenizer, encoded, generation, CPU, 12, max_tokens=100_000, max_batch_size=256,
                         logits_fn=rule, decoder=static)
    assert ours == one_by_one(model, tokenizer, encoded, generation, 12, rule)
    assert static.step is not decode._step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_static_decoder_under_bf16_autocast_decodes_as_hf_generate():
    """--precision bf16, a GPU's default (tried here on CPU, which has bf16 autocast too): the
    attention projections compute in bf16 while the weights stay fp32, so the static cache holds bf16
    keys and values, as HF generate's does. Greedy (static; compiled with aot_eager for mT5) and beam
    search (static) against HF generate on each source alone under the same autocast, each family with a
    module surgery. Before, the cache took the encoder states' dtype (fp32: mT5's and mBART's final
    layer norm gives fp32 under autocast) and the first write raised "index_copy_(): self and source
    expected to have the same dtype", so every GPU validation with the default decoder failed. The
    bf16 tokens are not all fp32's (mT5's, checked), so the comparison is one at bf16's numerics."""
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    for name, method in (("tiny-mt5", "prompt"), ("tiny-mbart", "adapters"), ("tiny-nllb", "lora")):
        model, tokenizer, encoded, generation = adapted_and_encoded(name, method, "es", 8)
        rule = Lengths([2 + (5 * i) % 9 for i in range(len(encoded))], tokenizer.eos_token_id)  # ends at steps 2..10
        with bf16():
            reference = one_by_one(model, tokenizer, encoded, generation, 12, rule)
            beams = one_by_one(model, tokenizer, encoded, generation, 12, rule, beams=4)
        decoders = [decode.StaticDecoder(model)]
        if name == "tiny-mt5":  # (compiled once: dynamo takes ~3 s a family here, and the graphs are the fp32 tests')
            unlike_fp32 = sum(a != b for a, b in zip(reference, one_by_one(model, tokenizer, encoded, generation, 12, rule)))
            torch._dynamo.reset()
            decoders.append(decode.StaticDecoder(model, compile=True, backend="aot_eager"))
        for decoder in decoders:
            ours = loop.generate(model, tokenizer, encoded, generation, CPU, 12, max_tokens=100_000, max_batch_size=256,
                                 logits_fn=rule, precision="bf16", decoder=decoder)
            assert ours == reference, (name, decoder.step)
            assert {buffer.dtype for key, buffer in decoder.buffers.items() if key[:4] in ("self", "cros")} == {torch.bfloat16}
        assert loop.generate(model, tokenizer, encoded, generation, CPU, 12, num_beams=4, max_tokens=100_000,
                             max_batch_size=256, logits_fn=rule, precision="bf16", decoder="static") == beams, name
    assert unlike_fp32 > 0
    # In bf16 a static cache's attention over its masked positions rounds otherwise than a cache as
    # long as what is written, and near-ties can flip: on a sharpened mT5 HF generate's own static
    # cache decodes one of these 8 sources otherwise than its dynamic one, and ours decodes as the
    # static one, token for token (bench/generate_throughput.py meets this at random weights)
    model, tokenizer, encoded, generation = adapted_and_encoded("tiny-mt5", "prompt", "es", 8)
    sharpened(model)
    rule = Ends([2 + (5 * i) % 23 for i in range(len(encoded))], tokenizer.eos_token_id)
    with bf16():
        dynamic = one_by_one(model, tokenizer, encoded, generation, 30, rule, beams=4)
        static = one_by_one(model, tokenizer, encoded, {**generation, "cache_implementation": "static"}, 30, rule, beams=4)
    assert static != dynamic
    assert loop.generate(model, tokenizer, encoded, generation, CPU, 30, num_beams=4, max_tokens=100_000,
                         max_batch_size=256, logits_fn=rule, precision="bf16", decoder="static") == static


def test_one_compiled_graph_serves_every_max_new_tokens():
    """One decoder, calls of 12, 7 and 20 new tokens (as a process decodes validation, test and
    another task): the tokens of HF generate and one graph. The self-attention cache is
    max_new_tokens long; when its length was an int of transformers' StaticLayer, dynamo compiled
    a second graph at the first other length (decode._view_layer)."""
    model, tokenizer, encoded, generation = adapted_and_encoded("tiny-mt5", "full", "de", 4)
    rule = Lengths([2 + 2 * i for i in range(len(encoded))], tokenizer.eos_token_id)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    static = decode.StaticDecoder(model, compile=True, backend="aot_eager")
    for max_new_tokens in (12, 7, 20):
        ours = loop.generate(model, tokenizer, encoded, generation, CPU, max_new_tokens, max_tokens=100_000,
                             max_batch_size=256, logits_fn=rule, decoder=static)
        assert ours == one_by_one(model, tokenizer, encoded, generation, max_new_tokens, rule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------- beam search

class Ends:
    """</s> impossible before step L_i of example i, then likely (log-probability -0.1 - 0.05 x step,
    a little less likely each step): a source's beams end at different steps, and sources at different
    steps, so hypotheses are compared across lengths and sources leave the batch one by one."""

    def __init__(self, lengths, eos):
        self.lengths, self.eos = torch.tensor(lengths), eos

    def __call__(self, indices, step, scores):
        length = self.lengths[indices]
        scores[step < length, self.eos] = -math.inf
        scores[step >= length, self.eos] = -0.1 - 0.05 * step


@pytest.mark.parametrize("name,method,settings", [("tiny-mt5", "prompt", {}), ("tiny-mbart", "adapters", {"early_stopping": True}),
                                                  ("tiny-nllb", "lora", {"length_penalty": 0.6, "early_stopping": "never"}),
                                                  ("tiny-mt5", "full", {"early_stopping": True, "length_penalty": 2.0})])
def test_static_beam_search_decodes_exactly_as_hf_generate(name, method, settings):
    """decode.StaticDecoder.beam_search (4 beams, sources leaving the batch once their best hypothesis
    is final, the batch re-packed at buckets, the self-attention cache reordered in place) against
    HF generate on each source alone: each family, a module surgery that changes the forward, and
    generate's three stopping rules (the default heuristic, early_stopping=True, and "never" with a
    length penalty, which changes both the scores and the heuristic's best length). Up to 30 new
    tokens, and </s> impossible before step 24 for some sources: the self-attention cache starts at
    16 positions and doubles to 32, more than is ever written."""
    model, tokenizer, encoded, generation = adapted_and_encoded(name, method, "es", 12)
    sharpened(model)
    generation = {**generation, **settings}
    rule = Ends([2 + (5 * i) % 23 for i in range(len(encoded))], tokenizer.eos_token_id)   # 2..24
    assert loop.beam_supported(model)
    sizes = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    ours = loop.generate(model, tokenizer, encoded, generation, CPU, 30, num_beams=4, max_tokens=100_000,
                         max_batch_size=256, logits_fn=rule, decoder="static")
    hook.remove()
    assert ours == one_by_one(model, tokenizer, encoded, generation, 30, rule, beams=4)
    assert ours != one_by_one(model, tokenizer, encoded, generation, 30, rule)   # not greedy's
    # one batch of 12 sources x 4 beams, shrinking through the buckets as sources finish
    assert sizes[0] == 48 and sizes == sorted(sizes, reverse=True) and len(set(sizes)) > 2
    assert set(sizes) <= {4 * decode.bucket(n) for n in range(1, 13)}


@pytest.mark.slow
def test_compiled_beam_search_decodes_exactly_as_hf_generate():
    """The beam search with its step compiled (aot_eager: dynamo's graphs of the real modules and the
    static cache, with the in-place reorder between steps) against HF generate, re-packing down to
    one source and the self-attention cache growing from 16 positions to 32 included. Dynamo
    compiles 1 graph for all those shapes. Unmarked (decode.mark_dynamic) it compiled 5: one per
    dimension that changed, and one source's; with the cache's length an int of transformers'
    StaticLayer (not read from its keys: decode._view_layer), 2: a second one for the grown cache."""
    model, tokenizer, encoded, generation = adapted_and_encoded("tiny-mbart", "full", "de", 9)
    sharpened(model)
    rule = Ends([2 + 2 * i for i in range(len(encoded))], tokenizer.eos_token_id)   # </s> possible from steps 2..18
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    static = decode.StaticDecoder(model, compile=True, backend="aot_eager")
    ours = loop.generate(model, tokenizer, encoded, generation, CPU, 20, num_beams=4, max_tokens=100_000,
                         max_batch_size=256, logits_fn=rule, decoder=static)
    assert ours == one_by_one(model, tokenizer, encoded, generation, 20, rule, beams=4)
    assert static.step is not decode._step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_beam_configs_the_static_decoder_does_not_follow_go_to_hf_generate():
    """A generation config the static beam search does not implement (several returned sequences,
    renormalised scores) is decoded by HF generate, whatever the decoder asked for."""
    model, tokenizer, encoded, generation = adapted_and_encoded("tiny-nllb", "full", "es", 3)
    assert loop.beam_supported(model)
    for name, value in (("num_return_sequences", 2), ("renormalize_logits", True)):
        original = getattr(model.generation_config, name)
        setattr(model.generation_config, name, value)
        assert not loop.beam_supported(model)
        setattr(model.generation_config, name, original)
    model.generation_config.renormalize_logits = True
    static = decode.StaticDecoder(model)
    static.beam_search = None          # would raise if called
    out = loop.generate_batch(model, tokenizer, [e["input_ids"] for e in encoded], generation, CPU, 6, 2,
                              decoder=static)
    with torch.no_grad():
        reference = model.generate(input_ids=torch.tensor([encoded[0]["input_ids"]]), max_new_tokens=6, num_beams=2,
                                   do_sample=False, **generation)
    assert loop.decode_generated(tokenizer, out[:1], generation) == loop.decode_generated(tokenizer, reference,
                                                                                          generation)
