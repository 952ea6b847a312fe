"""The training step's gradient accumulation and the evaluation decoder, against independent references:
HF's own loss on one big batch, and HF's own model.generate."""

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import adapt
import data
import loop
import models
from conftest import DATA_DIR, FAMILIES

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


def one_by_one(model, tokenizer, encoded, generation, max_new_tokens, rule=None):
    """HF generate, one source at a time (no padding, no batching): the reference."""
    texts = []
    for i, e in enumerate(encoded):
        extra = {"logits_processor": LogitsProcessorList([HFLengths(rule, [i])])} if rule else {}
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([e["input_ids"]]), max_new_tokens=max_new_tokens,
                                 num_beams=1, do_sample=False, **generation, **extra)
        texts += loop.decode_generated(tokenizer, out, generation)
    return texts


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", ["full"] + [name for name, m in adapt.REGISTRY.items() if m.add is not None])
def test_greedy_batch_decodes_exactly_as_hf_generate(name, method):
    """loop.generate (sorted batches, greedy_batch, finished rows dropped from the batch) against HF
    generate on each source alone, each family (mBART's forced BOS and forced EOS, NLLB's BOS) and
    each kind of module surgery that changes the forward (prompt's mask, adapters' hooks)."""
    torch.manual_seed(0)
    model = models.load_model(name, DATA_DIR)
    if method != "full":
        adapt.apply(model, method, verbose=False, **({"prompt_length": 8} if method == "prompt" else {}))
    model.eval()
    tokenizer = models.load_tokenizer(name, DATA_DIR)
    encoder = models.Seq2SeqEncoder(tokenizer, FAMILIES[name])
    encoded = encoder.encode(data.qa_examples(data.read_squad(data.xquad_path(DATA_DIR, "es"))[:12], "es"))
    generation = encoder.generation_kwargs("es")
    assert loop.greedy_supported(model)
    ours = loop.generate(model, tokenizer, encoded, generation, CPU, 12, max_tokens=2000)
    assert ours == one_by_one(model, tokenizer, encoded, generation, 12)

    rule = Lengths([2 + (5 * i) % 9 for i in range(len(encoded))], tokenizer.eos_token_id)  # ends at steps 2..10
    sizes = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    ours = loop.generate(model, tokenizer, encoded, generation, CPU, 12, max_tokens=100_000, logits_fn=rule)
    hook.remove()
    assert ours == one_by_one(model, tokenizer, encoded, generation, 12, rule)
    assert sizes[0] == len(encoded) and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(encoded)


def test_generation_configs_greedy_batch_does_not_follow_go_to_hf_generate():
    model = models.load_model("tiny-mt5", DATA_DIR)
    assert loop.greedy_supported(model)
    model.generation_config.no_repeat_ngram_size = 3
    assert not loop.greedy_supported(model)
