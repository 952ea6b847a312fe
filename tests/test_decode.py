"""decode.py: the bucket ladder, what a generation row costs in memory against what the static
decoder really allocates, and the batch limits it derives from a device's memory."""

import random

import torch

import data
import decode
import loop
import models
from conftest import DATA_DIR, FAMILIES

CPU = torch.device("cpu")


def test_bucket_ladder_is_four_sizes_per_octave():
    assert [decode.bucket(n) for n in range(1, 18)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16, 20]
    assert [decode.bucket(n) for n in (100, 256, 257, 300, 400, 450, 512, 513, 1000)] == \
        [112, 256, 320, 320, 448, 512, 512, 640, 1024]
    # at most 1.25 x what it holds past the first octaves, and the sizes of a batch's life are few
    assert max(decode.bucket(n) / n for n in range(8, 5000)) < 1.25
    assert len({decode.bucket(n) for n in range(1, 513)}) == 4 + 4 * 7


def test_cache_bytes_is_what_the_static_decoder_allocates():
    """cache_bytes per row (fp32 tiny models) against the bytes of the cache buffers the decoder
    really holds after a batch of 8 rows (no early end: the buffers keep their first bucket)."""
    for name in FAMILIES:
        model = models.load_model(name, DATA_DIR).eval()
        tokenizer = models.load_tokenizer(name, DATA_DIR)
        encoder = models.Seq2SeqEncoder(tokenizer, FAMILIES[name])
        encoded = encoder.encode(data.qa_examples(data.read_squad(data.xquad_path(DATA_DIR, "ru"))[:8], "ru"))
        static = decode.StaticDecoder(model)
        generation = {k: v for k, v in encoder.generation_kwargs("ru").items() if k != "forced_eos_token_id"}
        out = loop.generate_batch(model, tokenizer, [e["input_ids"] for e in encoded], generation, CPU, 6,
                                  decoder=static)
        source = decode.bucket(max(len(e["input_ids"]) for e in encoded))
        allocated = sum(t.numel() * t.element_size() for key, t in static.buffers.items()
                        if key.startswith(("self", "cross")))
        assert out.shape[0] == 8
        assert allocated == 8 * decode.cache_bytes(model.config, source, 6, dtype_bytes=4), name


def test_every_static_input_of_the_step_is_where_the_first_batch_had_it():
    """On a GPU the compiled decoder step is replayed as CUDA graphs (torch.compile's mode
    "reduce-overhead": cudagraph trees), one recording per shape. A recording replays only while each
    input marked a static address (mark_static_address: the caches' keys, values and positions
    written, the encoder states, the mask) is where it was when recorded; where one has moved, the
    step is recorded anew (torch/_inductor/cudagraph_trees.py, check_invariants:
    StaticInputIdxMismatch), a capture of the whole decoder step. So each lives in a buffer of the
    decoder, which outlasts a batch: a second batch of the same shapes, greedy and beam search, hands
    every step of every bucket the tensors at the first batch's addresses. (Before, the caches'
    positions written were new tensors in each batch, 24 of them at mT5-base's 12 layers: every shape
    of every batch would have been recorded again, at least 37 batches of up to 31 row buckets in a
    device-sized validation of XL-Sum.) The first batch's tensors are kept, so no address of theirs
    is reused."""
    model = models.load_model("tiny-mt5", DATA_DIR).eval()
    tokenizer = models.load_tokenizer("tiny-mt5", DATA_DIR)
    encoder = models.Seq2SeqEncoder(tokenizer, "mt5")
    eos = tokenizer.eos_token_id
    encoded = encoder.encode(data.qa_examples(data.read_squad(data.xquad_path(DATA_DIR, "de"))[:9], "de"))
    sources = [e["input_ids"][:30] + [eos] for e in encoded]
    generation = encoder.generation_kwargs("de")

    def ends(rows, step, scores):  # row i ends at step 2 + i: the batch re-packs through the buckets
        done = step >= 2 + rows
        scores[done] = -float("inf")
        scores[done, eos] = 0.0
    static, calls = decode.StaticDecoder(model), []

    def step(model, encoder_states, mask, last, cache):
        tensors = [encoder_states, mask] + [getattr(layer, attr) for part in (cache.self_attention_cache,
                                                                             cache.cross_attention_cache)
                                           for layer in part.layers for attr in ("keys", "values", "cumulative_length")]
        assert all(getattr(t, "_dynamo_static_input_type", None) for t in tensors)
        calls[-1].append(tensors)
        return decode._step(model, encoder_states, mask, last, cache)
    static.step = step
    for beams in (1, 4):
        for _ in range(2):
            calls.append([])
            loop.generate_batch(model, tokenizer, sources, generation, CPU, 12, beams, ends, decoder=static)
        first, second = calls[-2:]
        assert [[t.shape for t in ts] for ts in first] == [[t.shape for t in ts] for ts in second]
        assert len({tuple(ts[0].shape) for ts in first}) > 3, beams     # several buckets
        assert [[t.data_ptr() for t in ts] for ts in first] == [[t.data_ptr() for t in ts] for ts in second], beams


def test_buffers_are_allocated_once_for_the_largest_batch_of_a_generate_call():
    """loop.generate sorts its sources by length, so later batches hold longer sources: the encoder's
    and the cross-attention's buffers needed more room in about half of them, and were allocated
    anew, at new addresses (so every later shape recorded again on a GPU, as above). Now generate
    reserves each buffer for the largest batch before the first: no buffer moves from the first step
    to the last, and each is the size that growing batch by batch ends at (the same batches decoded
    one by one, without the reservation, where buffers did move)."""
    model = models.load_model("tiny-mt5", DATA_DIR).eval()
    tokenizer = models.load_tokenizer("tiny-mt5", DATA_DIR)
    encoder = models.Seq2SeqEncoder(tokenizer, "mt5")
    encoded = encoder.encode(data.qa_examples(data.read_squad(data.xquad_path(DATA_DIR, "de"))[:9], "de"))
    encoded = [{"input_ids": e["input_ids"][:10 * (i + 1)] + [tokenizer.eos_token_id]} for i, e in enumerate(encoded)]
    generation = encoder.generation_kwargs("de")
    lengths = [len(e["input_ids"]) for e in encoded]
    batches = data.generation_batches(lengths, 100_000, 3)
    assert len({decode.bucket(max(lengths[i] for i in batch)) for batch in batches}) == 3   # 3 lengths
    for beams in (1, 4):
        reserved, grown = decode.StaticDecoder(model), decode.StaticDecoder(model)
        first = {}

        def step(*args):
            if not first:   # the buffers as the first step finds them
                first.update(reserved.buffers)
            return decode._step(*args)
        reserved.step = step
        loop.generate(model, tokenizer, encoded, generation, CPU, 6, beams, max_tokens=100_000, max_batch_size=3,
                      decoder=reserved)
        assert first and [name for name, buffer in first.items() if reserved.buffers[name] is not buffer] == [], beams
        moved = 0
        for batch in batches:
            before = dict(grown.buffers)
            loop.generate_batch(model, tokenizer, [encoded[i]["input_ids"] for i in batch], generation, CPU,
                                6, beams, decoder=grown)
            moved += sum(grown.buffers[name] is not buffer for name, buffer in before.items())
        assert moved > 0 and {name: b.numel() for name, b in reserved.buffers.items()} == {
            name: b.numel() for name, b in grown.buffers.items()}, beams


def test_mt5_base_cache_per_row_is_the_issue_figure():
    """Issue 23: ~20 MB of bf16 cache per row at 512 source tokens (12 decoder layers, 12 x 64 wide)
    for mT5-base: 12 x 2 x 768 x (512 + 84) x 2 bytes = 21.97 MB by hand."""
    config = models.real_architecture("google/mt5-base").config
    assert decode.cache_bytes(config, 512, 84) == 12 * 2 * 768 * (512 + 84) * 2


def test_batches_cut_under_the_limits_fit_the_memory():
    """For real source lengths (XQuAD, tiny-mT5 tokens) and several memory sizes at the real mT5-base
    dimensions: every batch data.generation_batches cuts under limits_for_memory fits the memory
    (rows x row_bytes of its padded length); an H200's share holds hundreds of rows."""
    config = models.real_architecture("google/mt5-base").config
    tokenizer = models.load_tokenizer("tiny-mt5", DATA_DIR)
    encoder = models.Seq2SeqEncoder(tokenizer, "mt5")
    lengths = [len(e["input_ids"]) for e in encoder.encode(
        data.qa_examples(data.read_squad(data.xquad_path(DATA_DIR, "zh")), "zh"))]
    rng = random.Random(0)
    lengths += [rng.randint(3, 40) for _ in range(300)]               # and short ones, the row cap's case
    for memory in (2e9, 16e9, decode.MEMORY_SHARE * 141e9):
        max_tokens, max_rows = decode.limits_for_memory(config, memory, lengths, 84)
        batches = data.generation_batches(lengths, max_tokens, max_rows)
        worst = max(len(b) * decode.row_bytes(config, decode.bucket(max(lengths[i] for i in b)), 84) for b in batches)
        assert worst <= memory, (memory, worst)
    assert max_rows == decode.MAX_ROWS and max(len(b) for b in batches) >= 256
    # beam search: a source is 4 rows, each with a larger logits share; the same rows fit, not more
    for memory in (2e9, 16e9, decode.MEMORY_SHARE * 141e9):
        max_tokens, max_sources = decode.limits_for_memory(config, memory, lengths, 84, beams=4)
        batches = data.generation_batches(lengths, max_tokens, max_sources)
        worst = max(4 * len(b) * decode.row_bytes(config, decode.bucket(max(lengths[i] for i in b)), 84, beams=4)
                    for b in batches)
        assert worst <= memory, (memory, worst)
    assert max_sources == decode.MAX_ROWS // 4 and max(4 * len(b) for b in batches) >= 256


def test_cpu_keeps_the_benchmarked_budget():
    model = models.load_model("tiny-mt5", DATA_DIR)
    assert decode.batch_limits(model, CPU, [10, 500], 84) == decode.CPU_LIMITS == (8000, 256)
