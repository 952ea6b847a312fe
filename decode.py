"""Decoding at the speed of the device: batches sized by its free memory, and a decoder step of
fixed shapes that torch.compile captures once and replays (CUDA graphs on a GPU), for greedy
decoding and beam search.

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
  same address), once per loop.generate call for its largest batch (`reserve`), so no input of the
  step ever moves and a shape's CUDA graph replays in every batch; a finished row keeps its place,
  writing padding, until the rows still going fit a smaller bucket -- only then is the batch
  re-packed (copied to the front of the buffers):

        rows still going    16   15   14   13   12   11   10    9  ...
        bucket (shape)      16   16   14   14   12   12   10   10  ...   re-packed at 14, 12, 10

  So the decoder step sees a few shapes only; torch.compile(mode="reduce-overhead") compiles one
  graph for all of them (their rows and positions marked dynamic: mark_dynamic), records one CUDA graph
  per shape and replays it, instead of launching a few hundred small kernels per token.
  Tokens are those of HF generate (tests/test_loop.py, every family and method, compiled or not).
- **StaticDecoder.beam_search**: the same for beam search (translate_train.py's beam of 4): HF
  generate's vectorised algorithm, step for step, on rows = sources x beams; a source leaves once
  its best hypothesis can no longer change, and the batch re-packs at the buckets of sources.

The first step (decoder start token) runs eagerly: it fills the cross-attention cache from the
encoder states, a different code path from every later step.
"""

import functools
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
SELF_CACHE_START = 16    # positions of beam search's self-attention cache before it first doubles
MIN_ROWS = 2             # a batch of one row (beam search: one source) is padded to two: see mark_dynamic


def bucket(n):
    return data.bucket(n, BUCKETS_PER_OCTAVE)


def row_bucket(n):
    """Rows (beam search: sources) of a static batch holding `n`: bucket(n), at least MIN_ROWS."""
    return max(MIN_ROWS, bucket(n))


def mark_dynamic(tensor, *dims):
    """Mark `dims` of `tensor` as sizes that differ between a decoder's shapes (rows, source positions,
    beam search's self-attention positions), so that torch.compile's first graph is already general
    in them, and returns it. Unmarked, dynamo compiles a graph for the first shape, then once more
    for each dimension that changes (beam search: 5 graphs, greedy: 2; marked, and the cache's
    length read from its keys (_view_layer): 1 each, compile time a GPU saves on each process). A
    size of 1 is still specialized (one more graph): hence MIN_ROWS. The compiled training step
    marks its batches' rows and lengths too (loop.compiled_loss)."""
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def _decoder_dims(config):
    """(decoder layers, heads, d_kv) of a config of any family."""
    heads = getattr(config, "num_heads", None) or config.decoder_attention_heads
    d_kv = getattr(config, "d_kv", None) or config.d_model // heads
    layers = getattr(config, "num_decoder_layers", None) or config.decoder_layers
    return layers, heads, d_kv


def cache_dtype(model, device):
    """The dtype of the keys and values that the decoder's attention writes into its cache: under
    autocast (--precision bf16) its projections compute in bf16 while the weights stay fp32, so bf16,
    as in HF generate's cache; otherwise the weights'. (Not the encoder states': mT5's and mBART's
    final layer norm gives fp32 under autocast too.)"""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def row_bytes(config, source_len, max_new_tokens, dtype_bytes=2, beams=1):
    """Bytes one row of a generation batch needs on the device (a model config of any family):

        cache     decoder layers x 2 (keys, values) x heads x d_kv x (new tokens + source tokens)
        encoder   its output (source x d_model) and, while it runs, one layer's attention scores
                  (heads x source^2, fp32) and feed-forward activations (source x d_ff)
        logits    one row of the vocabulary, fp32, twice (the step's output and its argmax copy);
                  beam search: five times (also the log-probabilities, their sum with the beam's
                  score, and top-k's work on it)
    """
    d_model, heads = config.d_model, _decoder_dims(config)[1]
    d_ff = getattr(config, "d_ff", None) or config.encoder_ffn_dim
    encoder = source_len * d_model * dtype_bytes + heads * source_len ** 2 * 4 + source_len * d_ff * dtype_bytes
    logits = (2 if beams == 1 else 5) * config.vocab_size * 4
    return cache_bytes(config, source_len, max_new_tokens, dtype_bytes) + encoder + logits


def cache_bytes(config, source_len, max_new_tokens, dtype_bytes=2):
    """Key/value cache of one row: decoder layers x 2 x heads x d_kv x (new tokens + source tokens)."""
    layers, heads, d_kv = _decoder_dims(config)
    return layers * 2 * heads * d_kv * (max_new_tokens + source_len) * dtype_bytes


def batch_limits(model, device, lengths, max_new_tokens, precision=None, beams=1):
    """(max source tokens, max sources) of a generation batch for sources of `lengths` on `device`: on
    a GPU what MEMORY_SHARE of its free memory holds (limits_for_memory; `precision` "bf16" halves
    the bytes of "fp32", loop.resolve_precision's names, None: fp32's, an upper bound), on CPU
    CPU_LIMITS (greedy's, whatever the beams: what the CPU decoded before); with `beams` beams a
    source takes that many rows."""
    if device.type != "cuda":
        return CPU_LIMITS
    # memory torch's caching allocator holds without using it (a validation follows training steps,
    # whose activations it keeps cached) is the driver's again first, so that "free" counts it
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return limits_for_memory(model.config, MEMORY_SHARE * free, lengths, max_new_tokens,
                             2 if precision == "bf16" else 4, beams)


def limits_for_memory(config, memory, lengths, max_new_tokens, dtype_bytes=2, beams=1):
    """(max source tokens, max sources) such that sources x beams x row_bytes(bucket(longest source))
    <= `memory` for every batch the length-sorted batcher (data.generation_batches) cuts under them.

    row_bytes(s) / s is convex in s, so its largest value over [shortest, longest] is at one end: a
    token budget of memory / that value holds for every batch, and the row cap memory /
    row_bytes(shortest) for the batches of short sources (clipped to MAX_ROWS rows)."""
    shortest, longest = bucket(max(1, min(lengths))), bucket(max(lengths))
    per_row = [beams * row_bytes(config, s, max_new_tokens, dtype_bytes, beams) for s in (shortest, longest)]
    per_token = max(per_row[0] / shortest, per_row[1] / longest)
    max_rows = max(1, min(MAX_ROWS // beams, int(memory // per_row[0])))
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
        self.reserved = {}      # name -> elements a buffer is allocated with at least (reserve)
        self.step = _step
        if compile:
            cuda = next(model.parameters()).device.type == "cuda"
            mode = "reduce-overhead" if cuda and backend == "inductor" else None
            self.step = torch.compile(_step, mode=mode, backend=backend)

    def _padded(self, batch_size, source_len):
        """(rows, source positions) of a batch of `batch_size` sources, the longest `source_len` tokens,
        padded to the buckets (never past the positions the model has)."""
        return row_bucket(batch_size), max(source_len, min(bucket(source_len), self.max_source))

    def reserve(self, batches, beams=1):
        """Allocate each buffer, when next allocated, for the largest of the `batches` to come ((sources,
        longest source's tokens, new tokens) each: loop.generate's, translate_train.py's), so that none
        is reallocated between them. A buffer that moved would hand the step its static inputs at new
        addresses, and CUDA graphs record anew every shape after that (test_decode.py). Grown batch by
        batch instead, the encoder's and the cross-attention's buffers moved 6 times in the 14
        length-sorted batches of XQuAD's 7,140 questions (6 languages) at mT5-base's limits on an
        80 GB GPU."""
        layers, heads, d_kv = _decoder_dims(self.model.config)
        for batch_size, source_len, max_new_tokens in batches:
            rows, length = self._padded(batch_size, source_len)
            rows *= beams
            positions = bucket(max_new_tokens) if beams > 1 else max_new_tokens   # beam_search's capacity
            need = {"encoder": rows * length * self.model.config.d_model, "mask": rows * length}
            for i in range(layers):
                for attr in "kv":
                    need[f"self{i}{attr}"] = rows * heads * positions * d_kv
                    need[f"cross{i}{attr}"] = rows * heads * length * d_kv
            for name, numel in need.items():
                self.reserved[name] = max(numel, self.reserved.get(name, 0))

    def _view(self, name, shape, dtype, device, capacity=0, dynamic=()):
        """A tensor of `shape` at the start of the flat buffer `name` (grown when too small, to at least
        `capacity` elements: what the tensor may grow to in this batch), its `dynamic` dimensions
        marked (mark_dynamic)."""
        numel = math.prod(shape)
        flat = self.buffers.get(name)
        if flat is None or flat.numel() < max(numel, capacity) or flat.dtype != dtype:
            flat = self.buffers[name] = torch.zeros(max(numel, capacity, self.reserved.get(name, 0)), dtype=dtype,
                                                    device=device)
        view = flat[:numel].view(shape)
        torch._dynamo.mark_static_address(view)
        return mark_dynamic(view, *dynamic)

    def _cache(self, rows, self_len, cross_len, device, self_capacity=0):
        """An EncoderDecoderCache of StaticCache layers whose keys and values are buffer views (the
        self-attention buffers room for `self_capacity` positions, _grow_self_cache's), and whose
        length is their keys' (_view_layer), in the dtype the attention writes (cache_dtype)."""
        from transformers import EncoderDecoderCache, StaticCache
        dtype = cache_dtype(self.model, device)
        layers, heads, d_kv = _decoder_dims(self.model.config)
        caches = []
        for kind, length, capacity in (("self", self_len, self_capacity), ("cross", cross_len, 0)):
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            for i, layer in enumerate(cache.layers):
                del layer.max_cache_len                      # now the keys' length: _view_layer
                layer.__class__ = _view_layer()
                for attr in ("keys", "values"):
                    setattr(layer, attr, self._view(f"{kind}{i}{attr[0]}", (rows, heads, length, d_kv), dtype, device,
                                                    rows * heads * capacity * d_kv, dynamic=(0, 2)))
                layer.keys.zero_()
                layer.values.zero_()
                layer.device, layer.batch_size, layer.num_heads = device, rows, heads
                layer.k_head_dim = layer.v_head_dim = d_kv
                # positions written: a buffer too, so that it stays where the recorded step saw it
                layer.cumulative_length = self._view(f"length-{kind}{i}", (), torch.long, device)
                layer.cumulative_length.zero_()
                layer.is_initialized = True
            caches.append(cache)
        return EncoderDecoderCache(*caches)

    def _repack(self, cache, index, encoder_states, attention_mask, self_rows=None):
        """Row i of every tensor becomes row index[i], in a batch of len(index) rows (a bucket: see
        _fill). self_rows, when given, are the self-attention cache's rows instead (beam search: the
        kept beams' parents, so the step's reorder and the re-pack are one copy). Returns the new
        cache, encoder states and mask."""
        rows = len(index)
        self_index = index if self_rows is None else self_rows
        for part, part_index in ((cache.self_attention_cache, self_index), (cache.cross_attention_cache, index)):
            for layer in part.layers:
                for attr in ("keys", "values"):
                    old = getattr(layer, attr)
                    moved = old.index_select(0, part_index)             # a copy: old and new share storage
                    new = old.view(-1)[:moved.numel()].view(moved.shape)
                    new.copy_(moved)
                    torch._dynamo.mark_static_address(new)
                    setattr(layer, attr, mark_dynamic(new, 0, 2))
                layer.batch_size = rows
        states = self._view("encoder", (rows,) + encoder_states.shape[1:], encoder_states.dtype, encoder_states.device,
                            dynamic=(0, 1))
        states.copy_(encoder_states.index_select(0, index))
        mask = self._view("mask", (rows, attention_mask.shape[1]), attention_mask.dtype, attention_mask.device,
                          dynamic=(0, 1))
        mask.copy_(attention_mask.index_select(0, index))
        return cache, states, mask

    def _grow_self_cache(self, cache, length):
        """Lengthen every self-attention cache to `length` positions in place in its buffer: the ones
        written keep their values, the new ones are zero (masked until written)."""
        for i, layer in enumerate(cache.self_attention_cache.layers):
            for attr in ("keys", "values"):
                old = getattr(layer, attr)
                written = old.clone()                            # old and new share storage
                rows, heads, _, d_kv = old.shape
                new = self._view(f"self{i}{attr[0]}", (rows, heads, length, d_kv), old.dtype, old.device,
                                 dynamic=(0, 2))
                new.zero_()
                new[:, :, :written.shape[2]].copy_(written)
                setattr(layer, attr, new)

    def _encode(self, input_ids, attention_mask, pad, beams=1):
        """Encoder states and mask of a batch padded to the buckets -- rows (copies of row 0) and source
        positions (padding, masked) -- each row repeated `beams` times, in the buffers. Returns the
        states, the mask and, per slot before the repeat, the row of the batch it holds."""
        batch_size, source_len = input_ids.shape
        device = input_ids.device
        rows, length = self._padded(batch_size, source_len)
        index = torch.cat([torch.arange(batch_size, device=device),
                           torch.zeros(rows - batch_size, dtype=torch.long, device=device)])
        padded_ids = torch.full((rows, length), pad, dtype=input_ids.dtype, device=device)
        padded_ids[:, :source_len] = input_ids[index]
        padded_mask = torch.zeros((rows, length), dtype=attention_mask.dtype, device=device)
        padded_mask[:, :source_len] = attention_mask[index]
        encoded = self.model.get_encoder()(input_ids=padded_ids, attention_mask=padded_mask).last_hidden_state
        # generate runs the encoder once per source and repeats its output for the beams, as here
        encoder_states = self._view("encoder", (rows * beams,) + encoded.shape[1:], encoded.dtype, device,
                                    dynamic=(0, 1))
        encoder_states.copy_(encoded if beams == 1 else encoded.repeat_interleave(beams, dim=0))
        mask = self._view("mask", (rows * beams, length), padded_mask.dtype, device, dynamic=(0, 1))
        mask.copy_(padded_mask if beams == 1 else padded_mask.repeat_interleave(beams, dim=0))
        return encoder_states, mask, index

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, generation_kwargs, max_new_tokens, logits_fn=None, num_beams=1):
        """Greedy ids (num_beams > 1: beam_search's) of one right-padded batch, generate's layout
        (batch, 1 + length) with the decoder start token first and padding after </s>: the tokens of
        loop.greedy_batch and HF generate."""
        if num_beams > 1:
            return self.beam_search(input_ids, attention_mask, generation_kwargs, max_new_tokens, num_beams, logits_fn)
        model = self.model
        start, forced_bos, forced_eos, eos, pad = greedy_tokens(model, generation_kwargs)
        batch_size = input_ids.shape[0]
        device = input_ids.device
        encoder_states, mask, index = self._encode(input_ids, attention_mask, pad)
        rows = len(index)

        cache = self._cache(rows, max_new_tokens, encoder_states.shape[1], device)
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
            if row_bucket(num_going) < rows:                            # re-pack into a smaller bucket
                rows = row_bucket(num_going)
                kept = _fill(going.nonzero().squeeze(1), rows)
                cache, encoder_states, mask = self._repack(cache, kept, encoder_states, mask)
                tokens, slot_row = tokens[kept], slot_row[kept]
                going = torch.arange(rows, device=device) < num_going
            last = mark_dynamic(tokens[:, None], 0)
        return out[:, :written]

    @torch.no_grad()
    def beam_search(self, input_ids, attention_mask, generation_kwargs, max_new_tokens, beams, logits_fn=None):
        """Beam search of one right-padded batch with fixed shapes: the tokens of HF generate(num_beams=
        beams), whose algorithm this is, step for step (transformers' vectorised _beam_search: the
        same candidates, scores, length penalty and early-stopping heuristic). What differs is what a
        step costs:

        - a source leaves the batch as soon as its best hypothesis can no longer change (the
          heuristic says no running beam can beat its finished ones, or early_stopping=True and it
          has `beams` of them): generate computes it until the last source ends. The batch is
          re-packed at bucket boundaries, as greedy rows are (sources, each with its `beams` rows);
        - the self-attention cache is reordered in place and only over the positions written (at a
          re-pack, in the re-pack's one copy); the cross-attention cache not at all (a source's
          beams share its encoder states, so their rows are equal);
        - that cache starts at SELF_CACHE_START positions and doubles when a step needs more, so a
          step attends to about what was written, not to max_new_tokens of masked positions;
        - the step is the compiled one when the decoder is (fixed shapes between re-packs).

        logits_fn(rows, step, scores): as in __call__, on the log-probabilities (rows x beams), as a
        LogitsProcessor given to generate is. Returns generate's layout: (batch, 1 + length) ids."""
        model = self.model
        start, forced_bos, forced_eos, eos, pad = greedy_tokens(model, generation_kwargs)
        length_penalty, early_stopping = beam_settings(model, generation_kwargs)
        batch_size, device = input_ids.shape[0], input_ids.device
        encoder_states, mask, item = self._encode(input_ids, attention_mask, pad, beams)
        items, width = len(item), 1 + max_new_tokens
        # the self-attention cache starts short and doubles when a step needs it, up to a bucket over
        # max_new_tokens: every step attends to all of it (masked where not written), and
        # translate_train.py's limit (2 x the longest source + 10) is about twice what is written
        capacity = bucket(max_new_tokens)
        length = min(capacity, SELF_CACHE_START)
        cache = self._cache(items * beams, length, encoder_states.shape[1], device, capacity)
        keep = 2 * beams                      # candidates per source: `beams` of them do not end in </s>
        top = torch.arange(keep, device=device) < beams          # only these may become hypotheses
        # per source: running beams (ids, log-probability) and finished hypotheses (ids, score, set)
        running = torch.full((items, beams, width), pad, dtype=torch.long, device=device)
        running[:, :, 0] = start
        running_scores = torch.zeros((items, beams), device=device)
        running_scores[:, 1:] = -1.0e9                           # step 0 extends beam 0 only
        hyps, hyp_scores = running.clone(), torch.full((items, beams), -1.0e9, device=device)
        finished = torch.zeros((items, beams), dtype=torch.bool, device=device)
        improvable = torch.ones((items, 1), dtype=torch.bool, device=device)   # HF: heuristic unsatisfied
        live = torch.arange(items, device=device) < batch_size   # real sources still searching
        num_live = batch_size
        out = torch.full((batch_size, width), pad, dtype=torch.long, device=device)
        written = 1
        for step in range(max_new_tokens):
            if step == length:                                   # position `step` is written now
                length = min(capacity, 2 * length)
                self._grow_self_cache(cache, length)
            step_fn = _step if step == 0 else self.step          # step 0 fills the cross cache
            last = mark_dynamic(running[:, :, step].reshape(-1, 1), 0)
            log_probs = torch.log_softmax(step_fn(model, encoder_states, mask, last, cache),
                                          dim=-1)                # a new tensor: a CUDA graph's output is reused
            force_token(log_probs, step, max_new_tokens, forced_bos, forced_eos)
            if logits_fn is not None:
                logits_fn(item.repeat_interleave(beams), step, log_probs)
            vocab = log_probs.shape[-1]

            # the `keep` best continuations of all beams of a source
            scores = (log_probs.view(items, beams, vocab) + running_scores[:, :, None]).view(items, -1)
            cand_scores, cand = torch.topk(scores, keep)
            parent, token = cand // vocab, cand % vocab
            cand_ids = torch.take_along_dim(running, parent[:, :, None], dim=1)
            cand_ids[:, :, step + 1] = token
            ends = (token == eos) | (step == max_new_tokens - 1)

            # the `beams` best that do not end go on
            go_scores = cand_scores + ends.to(torch.float32) * -1.0e9
            chosen = torch.topk(go_scores, beams)[1]
            running = torch.take_along_dim(cand_ids, chosen[:, :, None], dim=1)
            running_scores = torch.take_along_dim(go_scores, chosen, dim=1)
            parent = torch.take_along_dim(parent, chosen, dim=1)

            # the `beams` best finished hypotheses: those kept, and the top candidates that end now
            # (length-penalised; none once the source is full or cannot improve)
            now = ends & top[None, :]
            new_scores = cand_scores / ((step + 1) ** length_penalty)
            new_scores += (finished.all(-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * -1.0e9
            new_scores += (~improvable).to(torch.float32) * -1.0e9
            new_scores += (~now) * -1.0e9
            merged = torch.topk(torch.cat((hyp_scores, new_scores), dim=1), beams)[1]
            hyps = torch.take_along_dim(torch.cat((hyps, cand_ids), dim=1), merged[:, :, None], dim=1)
            hyp_scores = torch.take_along_dim(torch.cat((hyp_scores, new_scores), dim=1), merged, dim=1)
            finished = torch.take_along_dim(torch.cat((finished, now), dim=1), merged, dim=1)

            # can a running beam still beat the worst finished one? (HF's heuristic, its lengths)
            best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else step + 1
            best_running = running_scores[:, :1] / (best_length ** length_penalty)
            worst = torch.where(finished, hyp_scores.min(dim=1, keepdim=True)[0], -1.0e9)
            improvable = improvable & (best_running > worst).any(dim=-1, keepdim=True)

            # a source whose best hypothesis is final leaves the batch (one device sync a step)
            going = improvable.squeeze(1) & ~(finished.all(-1) & (early_stopping is True)) & (
                step < max_new_tokens - 1)
            was_live, live = live, live & going
            previous, num_live = num_live, int(live.sum())
            if num_live < previous:
                done = was_live & ~live
                out[item[done]] = hyps[done, 0]
                written = step + 2
            if num_live == 0:
                break
            rows = (parent + torch.arange(items, device=device)[:, None] * beams).view(-1)   # each beam's parent row
            if row_bucket(num_live) >= items:
                _reorder_self_cache(cache, rows, step + 1)
            else:                                                # re-pack the sources still searching
                items = row_bucket(num_live)
                kept = _fill(live.nonzero().squeeze(1), items)
                slots = (kept[:, None] * beams + torch.arange(beams, device=device)).view(-1)
                # slot j takes the cross cache, states and mask of row slots[j] and the self cache of
                # its parent, rows[slots[j]]: the reorder and the re-pack in one copy
                cache, encoder_states, mask = self._repack(cache, slots, encoder_states, mask,
                                                           self_rows=rows.index_select(0, slots))
                running, running_scores, hyps, hyp_scores, finished, improvable, item = (
                    t.index_select(0, kept) for t in (running, running_scores, hyps, hyp_scores, finished,
                                                      improvable, item))
                live = torch.arange(items, device=device) < num_live
        return out[:, :written]


@functools.cache
def _view_layer():
    """transformers' StaticLayer whose length (max_cache_len: the attention mask's width) is read from
    its keys, not stored as an int. Dynamo treats an int attribute as a constant of the graph, so
    beam search's cache growing from 16 positions to 32 compiled a second graph; a tensor's size is
    one of the dimensions mark_dynamic made general, so one graph serves every length (and every
    max_new_tokens a greedy call asks for)."""
    from transformers.cache_utils import StaticLayer

    class ViewLayer(StaticLayer):
        @property
        def max_cache_len(self):
            return self.keys.shape[2]
    return ViewLayer


def _fill(keep, rows):
    """The rows `keep` then copies of the first of them, `rows` in all: a re-packed bucket whose tail
    repeats a kept row (finished, its output unused)."""
    return torch.cat([keep, keep[:1].expand(rows - len(keep))])


def _reorder_self_cache(cache, rows, length):
    """Row i of the self-attention cache becomes row rows[i] (the beam it extends), in place and over
    the `length` positions written only."""
    for layer in cache.self_attention_cache.layers:
        for tensor in (layer.keys, layer.values):
            written = tensor[:, :, :length]
            written.copy_(written.index_select(0, rows))


def beam_settings(model, generation_kwargs):
    """(length_penalty, early_stopping) of beam search: the call's, the model's generation config's,
    or generate's defaults (1.0, False)."""
    config = model.generation_config
    penalty = generation_kwargs.get("length_penalty", config.length_penalty)
    early = generation_kwargs.get("early_stopping", config.early_stopping)
    return (1.0 if penalty is None else penalty), (False if early is None else early)
