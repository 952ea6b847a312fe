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
