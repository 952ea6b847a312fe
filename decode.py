"""Greedy decoding at the speed of the device: batches sized by its free memory, and a decoder step
of fixed shapes that torch.compile captures once and replays (CUDA graphs on a GPU).

    python -c "import decode; print([decode.bucket(n) for n in (1, 5, 100, 300, 512)])"

loop.generate is the entry point; this module holds what it needs to go fast:

- **batch_limits**: how many rows (and source tokens) a generation batch may hold, from the device's
  free memory and what one row costs -- its key/value cache (decoder layers x 2 x heads x d_kv x
  (new tokens + source tokens)), its encoder states, the encoder's attention scores while it runs,
  and its row of logits. A GPU decodes hundreds of rows at once; on CPU the budget is the one
  bench/generate_throughput.py found best there.
- **StaticDecoder**: the greedy decode of one batch with every shape fixed in advance. The batch is
  padded to a bucket of rows and its sources to a bucket of lengths (`bucket`: 4 sizes an octave);
  the cache is preallocated (one flat buffer per tensor, so every bucket's cache is a view at the
  same address); a finished row keeps its place, writing padding, until the rows still going fit
  a smaller bucket -- only then is the batch re-packed (copied to the front of the buffers):

        rows still going    16   15   14   13   12   11   10    9  ...
        bucket (shape)      16   16   14   14   12   12   10   10  ...   re-packed at 14, 12, 10

  So the decoder step sees a few shapes only; torch.compile(mode="reduce-overhead") records one
  CUDA graph per shape and replays it, instead of launching a few hundred small kernels per token.
  Tokens are those of HF generate (tests/test_loop.py, every family and method, compiled or not).

The first step (decoder start token) runs eagerly: it fills the cross-attention cache from the
encoder states, a different code path from every later step.
"""

import math

import torch

import adapt
import data

# Rows of a batch and tokens of a source are rounded up to data.bucket's ladder, 4 sizes an octave
# (1, 2, ..., 8, 10, 12, 14, 16, 20, ...: under 25% padding, a few shapes in a batch's life).
BUCKETS_PER_OCTAVE = 4
MAX_ROWS = 512           # rows of one generation batch, whatever the memory (beyond: no gain, bench/)
MEMORY_SHARE = 0.8       # of the device's free memory, for generation (the rest: allocator slack)
# CPU: a source-token budget and a row cap (bench/generate_throughput.py on 2 cores).
CPU_LIMITS = (8000, 256)


def bucket(n):
    return data.bucket(n, BUCKETS_PER_OCTAVE)


def _decoder_dims(config):
    """(decoder layers, heads, d_kv) of a config of any family."""
    heads = getattr(config, "num_heads", None) or config.decoder_attention_heads
    d_kv = getattr(config, "d_kv", None) or config.d_model // heads
    layers = getattr(config, "num_decoder_layers", None) or config.decoder_layers
    return layers, heads, d_kv


def row_bytes(config, source_len, max_new_tokens, dtype_bytes=2):
    """Bytes one row of a generation batch needs on the device (a model config of any family):

        cache     decoder layers x 2 (keys, values) x heads x d_kv x (new tokens + source tokens)
        encoder   its output (source x d_model) and, while it runs, one layer's attention scores
                  (heads x source^2, fp32) and feed-forward activations (source x d_ff)
        logits    one row of the vocabulary, fp32, twice (the step's output and its argmax copy)
    """
    d_model, heads = config.d_model, _decoder_dims(config)[1]
    d_ff = getattr(config, "d_ff", None) or config.encoder_ffn_dim
    encoder = source_len * d_model * dtype_bytes + heads * source_len ** 2 * 4 + source_len * d_ff * dtype_bytes
    logits = 2 * config.vocab_size * 4
    return cache_bytes(config, source_len, max_new_tokens, dtype_bytes) + encoder + logits


def cache_bytes(config, source_len, max_new_tokens, dtype_bytes=2):
    """Key/value cache of one row: decoder layers x 2 x heads x d_kv x (new tokens + source tokens)."""
    layers, heads, d_kv = _decoder_dims(config)
    return layers * 2 * heads * d_kv * (max_new_tokens + source_len) * dtype_bytes


def batch_limits(model, device, lengths, max_new_tokens, precision=None):
    """(max source tokens, max rows) of a generation batch for sources of `lengths` on `device`: on a
    GPU what MEMORY_SHARE of its free memory holds (limits_for_memory; `precision` "bf16" halves the
    bytes of "fp32", loop.resolve_precision's names, None: fp32's, an upper bound), on CPU CPU_LIMITS."""
    if device.type != "cuda":
        return CPU_LIMITS
    free, _ = torch.cuda.mem_get_info(device)
    return limits_for_memory(model.config, MEMORY_SHARE * free, lengths, max_new_tokens,
                             2 if precision == "bf16" else 4)


def limits_for_memory(config, memory, lengths, max_new_tokens, dtype_bytes=2):
    """(max source tokens, max rows) such that rows x row_bytes(bucket(longest source)) <= `memory`
    for every batch the length-sorted batcher (data.generation_batches) cuts under them.

    row_bytes(s) / s is convex in s, so its largest value over [shortest, longest] is at one end: a
    token budget of memory / that value holds for every batch, and the row cap memory /
    row_bytes(shortest) for the batches of short sources (clipped to MAX_ROWS)."""
    shortest, longest = bucket(max(1, min(lengths))), bucket(max(lengths))
    per_row = [row_bytes(config, s, max_new_tokens, dtype_bytes) for s in (shortest, longest)]
    per_token = max(per_row[0] / shortest, per_row[1] / longest)
    max_rows = max(1, min(MAX_ROWS, int(memory // per_row[0])))
    return max(longest, int(memory // per_token)), max_rows


# -----------------------------------------------------------------------------
# The static-shape decoder

def greedy_tokens(model, generation_kwargs):
    """(decoder start, forced BOS, forced EOS, </s>, padding) ids of greedy decoding: the call's
    generation kwargs over the model's generation config (loop.greedy_batch and StaticDecoder)."""
    config = model.generation_config
    return (generation_kwargs.get("decoder_start_token_id", config.decoder_start_token_id),
            generation_kwargs.get("forced_bos_token_id", config.forced_bos_token_id),
            generation_kwargs.get("forced_eos_token_id", config.forced_eos_token_id),
            config.eos_token_id, config.pad_token_id)


def force_token(logits, step, max_new_tokens, forced_bos, forced_eos):
    """Make the forced token the only choice, in place: the target language code at the first step
    (forced BOS), </s> at the last allowed one (forced EOS), as generate's logits processors do."""
    forced = forced_eos if forced_eos is not None and step == max_new_tokens - 1 else (
        forced_bos if forced_bos is not None and step == 0 else None)
    if forced is not None:
        logits.fill_(-math.inf)
        logits[:, forced] = 0.0


def _step(model, encoder_states, attention_mask, decoder_input_ids, cache):
    """One decoder position for every row: next-token scores (rows, vocab), fp32."""
    return model(encoder_outputs=(encoder_states,), attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                 use_cache=True, cache=cache).logits[:, -1, :].float()


class StaticDecoder:
    """Greedy decoding with fixed shapes, for one call of loop.generate (its buffers live as long as
    it does). `compile`: torch.compile the decoder step (mode "reduce-overhead" on CUDA: CUDA graphs);
    `backend`: torch.compile's (tests: "aot_eager", the graphs without inductor's code generation).

        decoder = StaticDecoder(model, compile=True)
        ids = decoder(input_ids, attention_mask, generation_kwargs, max_new_tokens)   # as greedy_batch
    """

    def __init__(self, model, compile=False, backend="inductor"):
        self.model = model
        self.max_source = adapt.max_source_length(model)   # a bucket never passes the positions the model has
        self.buffers = {}       # name -> flat tensor; every bucket's cache is a view at its start
        self.step = _step
        if compile:
            cuda = next(model.parameters()).device.type == "cuda"
            mode = "reduce-overhead" if cuda and backend == "inductor" else None
            self.step = torch.compile(_step, mode=mode, backend=backend)

    def _view(self, name, shape, dtype, device):
        """A tensor of `shape` at the start of the flat buffer `name` (grown when too small)."""
        numel = math.prod(shape)
        flat = self.buffers.get(name)
        if flat is None or flat.numel() < numel or flat.dtype != dtype:
            flat = self.buffers[name] = torch.zeros(numel, dtype=dtype, device=device)
        view = flat[:numel].view(shape)
        torch._dynamo.mark_static_address(view)
        return view

    def _cache(self, rows, self_len, cross_len, dtype, device):
        """An EncoderDecoderCache of StaticCache layers whose keys and values are buffer views."""
        from transformers import EncoderDecoderCache, StaticCache
        layers, heads, d_kv = _decoder_dims(self.model.config)
        caches = []
        for kind, length in (("self", self_len), ("cross", cross_len)):
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            for i, layer in enumerate(cache.layers):
                layer.keys = self._view(f"{kind}{i}k", (rows, heads, length, d_kv), dtype, device)
                layer.values = self._view(f"{kind}{i}v", (rows, heads, length, d_kv), dtype, device)
                layer.keys.zero_()
                layer.values.zero_()
                layer.device, layer.batch_size, layer.num_heads = device, rows, heads
                layer.k_head_dim = layer.v_head_dim = d_kv
                layer.cumulative_length = torch.zeros((), dtype=torch.long, device=device)
                torch._dynamo.mark_static_address(layer.cumulative_length)
                layer.is_initialized = True
            caches.append(cache)
        return EncoderDecoderCache(*caches)

    def _repack(self, cache, keep, rows, encoder_states, attention_mask):
        """Move rows `keep` of every tensor to the front of a `rows`-row bucket (the tail: copies of
        the first kept row, finished). Returns the new cache, encoder states and mask."""
        index = torch.cat([keep, keep[:1].expand(rows - len(keep))])
        for part in (cache.self_attention_cache, cache.cross_attention_cache):
            for layer in part.layers:
                for attr in ("keys", "values"):
                    old = getattr(layer, attr)
                    moved = old.index_select(0, index)                  # a copy: old and new share storage
                    new = old.view(-1)[:moved.numel()].view(moved.shape)
                    new.copy_(moved)
                    torch._dynamo.mark_static_address(new)
                    setattr(layer, attr, new)
                layer.batch_size = rows
        states = self._view("encoder", (rows,) + encoder_states.shape[1:], encoder_states.dtype, encoder_states.device)
        states.copy_(encoder_states.index_select(0, index))
        mask = self._view("mask", (rows, attention_mask.shape[1]), attention_mask.dtype, attention_mask.device)
        mask.copy_(attention_mask.index_select(0, index))
        return cache, states, mask

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, generation_kwargs, max_new_tokens, logits_fn=None):
        """Greedy ids of one right-padded batch, generate's layout (batch, 1 + length) with the decoder
        start token first and padding after </s>: the tokens of loop.greedy_batch and HF generate."""
        model = self.model
        start, forced_bos, forced_eos, eos, pad = greedy_tokens(model, generation_kwargs)
        batch_size, source_len = input_ids.shape
        device = input_ids.device

        # ---- pad to the buckets: rows (copies of row 0) and source positions (padding, masked) ----
        rows, length = bucket(batch_size), max(source_len, min(bucket(source_len), self.max_source))
        index = torch.cat([torch.arange(batch_size, device=device),
                           torch.zeros(rows - batch_size, dtype=torch.long, device=device)])
        padded_ids = torch.full((rows, length), pad, dtype=input_ids.dtype, device=device)
        padded_ids[:, :source_len] = input_ids[index]
        padded_mask = torch.zeros((rows, length), dtype=attention_mask.dtype, device=device)
        padded_mask[:, :source_len] = attention_mask[index]
        encoded = model.get_encoder()(input_ids=padded_ids, attention_mask=padded_mask).last_hidden_state
        encoder_states = self._view("encoder", encoded.shape, encoded.dtype, device)
        encoder_states.copy_(encoded)
        mask = self._view("mask", padded_mask.shape, padded_mask.dtype, device)
        mask.copy_(padded_mask)
        del encoded

        cache = self._cache(rows, max_new_tokens, encoder_states.shape[1], encoder_states.dtype, device)
        out = torch.full((batch_size, 1 + max_new_tokens), pad, dtype=torch.long, device=device)
        out[:, 0] = start
        slot_row = index.clone()                                       # row of `out` each slot writes
        going = torch.arange(rows, device=device) < batch_size         # slots still writing
        last = torch.full((rows, 1), start, dtype=torch.long, device=device)
        written = 1
        for step in range(max_new_tokens):
            step_fn = _step if step == 0 else self.step               # step 0 fills the cross cache
            logits = step_fn(model, encoder_states, mask, last, cache)
            if step > 0 and self.step is not _step:
                logits = logits.clone()                                # a CUDA graph's output is reused
            force_token(logits, step, max_new_tokens, forced_bos, forced_eos)
            if logits_fn is not None:
                logits_fn(slot_row, step, logits)
            tokens = torch.where(going, logits.argmax(dim=-1), pad)
            out[slot_row[going], step + 1] = tokens[going]
            written = step + 2
            going &= tokens != eos
            num_going = int(going.sum())
            if num_going == 0:
                break
            if bucket(num_going) < rows:                                # re-pack into a smaller bucket
                keep = going.nonzero().squeeze(1)
                rows = bucket(num_going)
                cache, encoder_states, mask = self._repack(cache, keep, rows, encoder_states, mask)
                tokens = tokens[torch.cat([keep, keep[:1].expand(rows - num_going)])]
                slot_row = slot_row[torch.cat([keep, keep[:1].expand(rows - num_going)])]
                going = torch.arange(rows, device=device) < num_going
            last = tokens[:, None]
        return out[:, :written]
