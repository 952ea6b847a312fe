"""What a run produces works outside xlgen: plain transformers and PEFT load its checkpoints,
predict.py reproduces its predictions, a moved study still loads, logs as CSV and TensorBoard,
--precision, and HF's / fairseq's flag names."""

import csv
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

import adapt
import common
import data
import evaluate
import finetune
import loop
import models
import predict
import pretrain_it
import translate_train
from conftest import DATA_DIR, FAMILIES, error_lines, run_cli

QUICK = ["--data-dir", DATA_DIR, "--max-steps", "20", "--eval-every", "10", "--warmup-steps", "5",
         "--max-tokens", "1500", "--max-eval-examples", "6", "--max-new-tokens", "8", "--log-every", "5",
         "--lr", "1e-3", "--max-train-examples", "300", "--task", "xquad", "--val-langs", "th", "--test-langs", "en"]
N_TEST = 6  # the English XQuAD questions a run is tested on (--max-eval-examples)


def finetune_run(out_dir, *extra):
    return finetune.main(finetune.parse_args(QUICK + ["--out-dir", str(out_dir)] + list(extra)))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small 'study directory': a full run per family, and a prompt-tuning run of mT5 that starts
    from the full mT5 run's best/ (as a finetuning run starts from an IT run), with --tensorboard.
    Made under umask 022."""
    root = tmp_path_factory.mktemp("study")
    old = os.umask(0o022)
    try:
        for name in FAMILIES:
            finetune_run(root / "full" / name, "--model", name)
        finetune_run(root / "prompt", "--model", "tiny-mt5", "--method", "prompt", "--prompt-length", "4",
                     "--init", str(root / "full" / "tiny-mt5" / "best"), "--tensorboard")
        finetune_run(root / "adapters", "--model", "tiny-mbart", "--method", "adapters", "--adapter-dim", "8")
    finally:
        os.umask(old)
    return root


def plain_text(tokenizer, model, ids):
    """Generated ids -> text, by hand: without the decoder start token, the forced language code,
    </s> and what follows (padding); other special tokens kept, as xlgen's predictions keep them."""
    ids = ids.tolist()[1:]
    if model.generation_config.forced_bos_token_id is not None:
        assert ids[0] == model.generation_config.forced_bos_token_id
        ids = ids[1:]
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def english_questions():
    return data.read_references("xquad", data.xquad_path(DATA_DIR, "en"), N_TEST)


@pytest.mark.xdist_group("portable-study")  # (one worker: the module fixture is made once, not once per worker)
@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_full_runs_best_generates_its_predictions_with_plain_transformers(name, study):
    """AutoTokenizer + AutoModelForSeq2SeqLM + generate(**inputs), no other argument: xlgen's test
    predictions, string for string (the run's max_new_tokens, beams and forced language code are in
    generation_config.json; the tokenizer's src_lang is the training language's code)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    best = study / "full" / name / "best"
    predictions = json.loads((study / "full" / name / "predictions" / "test.en.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(best)
    model = AutoModelForSeq2SeqLM.from_pretrained(best).eval()
    assert model.generation_config.max_new_tokens == 8 and model.generation_config.num_beams == 1
    encoder = models.Seq2SeqEncoder(tokenizer, FAMILIES[name], models.max_length(model.config))
    examples = data.task_examples("xquad", english_questions(), "en")
    same = 0
    for question, example, encoded in zip(english_questions(), examples, encoder.encode(examples)):
        inputs = tokenizer(question["context"] + " " + question["question"], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == encoded["input_ids"]  # the model card's input format
        with torch.no_grad():
            out = model.generate(**inputs)
        same += plain_text(tokenizer, model, out[0]) == predictions[question["id"]]
    assert same == N_TEST
    # and the card says how
    card = (best / "README.md").read_text()
    assert "AutoModelForSeq2SeqLM.from_pretrained" in card and "| en |" in card
    if name != "tiny-mt5":
        assert models.language_code(FAMILIES[name], "en") in card


@pytest.mark.xdist_group("portable-study")
@pytest.mark.slow
def test_mt5_checkpoints_say_their_head_is_untied_and_weights_follow_the_umask(study):
    """config.json of an mT5 checkpoint says tie_word_embeddings false (what transformers 4.x reads
    to keep lm_head apart; 5.x forces true and loads the untied head either way), the reloaded model
    has its own head; every file of every checkpoint is 0644 under umask 022 (safetensors writes 0600)."""
    best = study / "full" / "tiny-mt5" / "best"
    assert json.loads((best / "config.json").read_text())["tie_word_embeddings"] is False
    model = models.load_model(str(best))
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    for run in ("full/tiny-mt5", "full/tiny-mbart", "prompt", "adapters"):
        for checkpoint in ("best", "last"):
            for entry in os.scandir(study / run / checkpoint):
                assert oct(os.stat(entry.path).st_mode & 0o777) == "0o644", entry.path


@pytest.mark.xdist_group("portable-study")
@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["full/tiny-nllb", "adapters"])
def test_predict_reproduces_a_runs_test_predictions_and_scores(run_name, study, tmp_path, capsys):
    run = study / run_name
    out = tmp_path / "predict.json"
    code, _, err = run_cli(predict, [str(run), "--input", data.xquad_path(DATA_DIR, "en"), "--lang", "en",
                                     "--limit", str(N_TEST), "--out", str(out)], capsys)
    assert code == 0, err
    raw = json.loads((run / "predictions" / "test.en.json").read_text())
    assert json.loads(out.read_text()) == {k: evaluate.clean_prediction(v)[0] for k, v in raw.items()}
    scores = json.loads((tmp_path / "predict.scores.json").read_text())
    results = json.loads((run / "results.json").read_text())["test"]["en"]
    assert {k: scores[k] for k in results} == results


@pytest.mark.xdist_group("portable-study")
@pytest.mark.slow
def test_a_moved_study_still_loads_and_predicts_and_its_prompt_loads_with_peft(study, tmp_path, capsys):
    """The prompt run's base model is the full run's best/, recorded relative to the checkpoint: the
    study directory moved as a whole still loads (the old path is gone); predict.py reproduces the
    run's predictions there; PeftModel.from_pretrained(base, best/) computes xlgen's logits."""
    record = json.loads((study / "prompt" / "best" / models.ADAPTATION_FILE).read_text())
    assert record["base_model"] == os.path.join("..", "..", "full", "tiny-mt5", "best")
    moved = tmp_path / "moved"
    shutil.copytree(study, moved)
    hidden = study.parent / (study.name + "-hidden")
    os.rename(study, hidden)  # the original place no longer exists
    try:
        code, _, err = run_cli(predict, [str(moved / "prompt"), "--input", data.xquad_path(DATA_DIR, "en"), "--lang",
                                         "en", "--limit", str(N_TEST), "--out", str(tmp_path / "p.json")], capsys)
        assert code == 0, err
        raw = json.loads((moved / "prompt" / "predictions" / "test.en.json").read_text())
        assert json.loads((tmp_path / "p.json").read_text()) == {k: evaluate.clean_prediction(v)[0] for k, v in raw.items()}
        from peft import PeftModel
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        best = moved / "prompt" / "best"
        ours = adapt.load(str(best)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(moved / "full" / "tiny-mt5" / "best"),
                                               str(best)).eval()
        tokenizer = AutoTokenizer.from_pretrained(best)
        inputs = tokenizer(["Where is Paris? Paris is in France.", "Qui?"], return_tensors="pt", padding=True)
        decoder_input_ids = torch.tensor([[0, 5, 9]] * 2)
        with torch.no_grad():
            assert torch.equal(ours(**inputs, decoder_input_ids=decoder_input_ids).logits,
                               theirs(**inputs, decoder_input_ids=decoder_input_ids).logits)
    finally:
        os.rename(hidden, study)


@pytest.mark.xdist_group("portable-study")
@pytest.mark.slow
def test_tensorboard_events_and_log_csv_hold_the_log_jsonl_scalars(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = study / "prompt"
    rows = [row for row in map(json.loads, open(run / "log.jsonl")) if "step" in row and "event" not in row]
    assert [row["step"] for row in rows] == [5, 10, 15, 20]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "padding_efficiency"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in logged] == [row["step"] for row in rows]
        assert [v for _, v in logged] == pytest.approx([row[key] for row in rows], rel=1e-6)  # float32 events
    assert [e.value for e in events.Scalars("streams/task/en")] == [5, 5, 5, 5]
    with open(run / "log.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [5, 10, 15, 20]
    assert [float(r["loss"]) for r in table] == [row["loss"] for row in rows]  # exact: repr of the float
    assert [int(r["streams/task/en"]) for r in table] == [5, 5, 5, 5]


@pytest.mark.parametrize("method", ["prompt", "lora"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_prompt_and_lora_checkpoints_are_peft_checkpoints_both_ways(name, method, tokenizers, tmp_path):
    """xlgen writes PEFT's format (PeftModel.from_pretrained gives xlgen's logits exactly), and reads
    what PEFT writes (PeftModel.save_pretrained -> adapt.load: the same logits)."""
    from peft import PeftModel
    torch.manual_seed(3)
    options = {"prompt": {"prompt_length": 5}, "lora": {"rank": 4, "targets": "q,k,v,o"}}[method]
    model = adapt.apply(models.load_model(name, DATA_DIR), method, verbose=False, **options)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    adapt.save(model, str(tmp_path / "ours"), base_model=name)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "lora": "LORA"}[method]
    inputs = tokenizers[name](["Hello world, this is a test.", "Bonjour"], return_tensors="pt", padding=True)
    start = 0 if name == "tiny-mt5" else 2
    decoder_input_ids = torch.tensor([[start, 5, 7, 9]] * 2)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model(**inputs, decoder_input_ids=decoder_input_ids).logits
        theirs = PeftModel.from_pretrained(models.load_model(name, DATA_DIR), str(tmp_path / "ours")).eval()
        assert torch.equal(theirs(**inputs, decoder_input_ids=decoder_input_ids).logits, expected)
        theirs.save_pretrained(str(tmp_path / "peft"))
        assert not (tmp_path / "peft" / models.ADAPTATION_FILE).exists()
        loaded = adapt.load(str(tmp_path / "peft"), DATA_DIR).eval()
        assert adapt.adaptation_of(loaded)["method"] == method
        assert torch.equal(loaded(**inputs, decoder_input_ids=decoder_input_ids).logits, expected)


def test_adapters_files_do_not_pretend_to_be_peft_and_old_checkpoints_still_load(tokenizers, tmp_path):
    torch.manual_seed(4)
    model = adapt.apply(models.load_model("tiny-mbart", DATA_DIR), "adapters", verbose=False, bottleneck=8)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    adapt.save(model, str(tmp_path / "new"), base_model="tiny-mbart")
    assert sorted(os.listdir(tmp_path / "new")) == ["adapters.safetensors", models.ADAPTATION_FILE]
    # the layout xlgen wrote before: adapter_config.json with method/options, xlgen's names in adapter_model.safetensors
    old = tmp_path / "old"
    old.mkdir()
    common.write_json(str(old / "adapter_config.json"), {"base_model": "tiny-mbart", **adapt.adaptation_of(model)})
    save_file(adapt.added_state_dict(model), str(old / "adapter_model.safetensors"))
    inputs = tokenizers["tiny-mbart"](["Hello world"], return_tensors="pt")
    decoder_input_ids = torch.tensor([[2, 5, 7]])
    model.eval()
    with torch.no_grad():
        expected = model(**inputs, decoder_input_ids=decoder_input_ids).logits
        for path in (tmp_path / "new", old):
            loaded = adapt.load(str(path), DATA_DIR).eval()
            assert torch.equal(loaded(**inputs, decoder_input_ids=decoder_input_ids).logits, expected), path


def test_predict_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(predict, [str(tmp_path / "empty"), "--input", data.xquad_path(DATA_DIR, "en"),
                                     "--lang", "en"], capsys)
    assert code == 1
    assert error_lines(err) == [f"error: RUN_DIR {tmp_path / 'empty'}: not a checkpoint directory (no config.json or "
                                f"{models.ADAPTATION_FILE}) and no best/ or last/ checkpoint in it"]


def test_precision_flag_resolves_per_device_and_bf16_changes_the_numbers(tokenizers):
    """auto is fp32 on a CPU; an explicit bf16 is honoured there too (autocast): the loss moves by
    bf16's rounding, not more. fp16 is not offered (mT5 overflows in it)."""
    cpu = torch.device("cpu")
    assert loop.resolve_precision("auto", cpu) == "fp32"
    assert loop.resolve_precision("bf16", cpu) == "bf16"
    args = finetune.parse_args(QUICK + ["--model", "tiny-mt5", "--precision", "bf16"])
    assert args.precision == "bf16"
    with pytest.raises(SystemExit):
        finetune.parse_args(QUICK + ["--precision", "fp16"])
    model = models.load_model("tiny-mt5", DATA_DIR).eval()
    batch = tokenizers["tiny-mt5"](["The cat sat on the mat."] * 2, text_target=["a cat"] * 2, return_tensors="pt")
    with torch.no_grad():
        with loop.autocast(cpu, "fp32"):
            fp32 = loop.token_loss(model, batch)[0].item()
        with loop.autocast(cpu, "bf16"):
            bf16 = loop.token_loss(model, batch)[0].item()
        with loop.autocast(cpu):
            auto = loop.token_loss(model, batch)[0].item()
    assert auto == fp32 and bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)


ALIASES = [("--learning-rate", "--lr", "3e-4"), ("--output-dir", "--out-dir", "/tmp/x"),
           ("--gradient-accumulation-steps", "--update-freq", "3"), ("--max-grad-norm", "--grad-clip", "0.5"),
           ("--clip-norm", "--grad-clip", "0.25"), ("--max-update", "--max-steps", "123"),
           ("--warmup-updates", "--warmup-steps", "7"), ("--eval-steps", "--eval-every", "11"),
           ("--logging-steps", "--log-every", "2")]


@pytest.mark.parametrize("module", [finetune, pretrain_it])
def test_hf_and_fairseq_flag_names_mean_ours(module, capsys):
    for alias, ours, value in ALIASES:
        assert vars(module.parse_args([alias, value])) == vars(module.parse_args([ours, value])), alias
    assert vars(finetune.parse_args(["--beam", "4"])) == vars(finetune.parse_args(["--num-beams", "4"]))
    required = ["--tgt-lang", "fr", "--out-file", "x.json"]
    assert translate_train.parse_args(required + ["--beam", "2"]).num_beams == 2
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert all(alias in shown for alias, _, _ in ALIASES)


def test_tensorboard_missing_is_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: `import tensorboard` raises ImportError
    code, _, err = run_cli(finetune, QUICK + ["--model", "tiny-mt5", "--tensorboard", "--out-dir", str(tmp_path / "r")],
                           capsys)
    assert code == 1
    assert error_lines(err) == ["error: --tensorboard: needs the tensorboard package (pip install -r "
                                "requirements-extra.txt)"]
    assert not (tmp_path / "r" / "log.jsonl").exists()


@pytest.mark.xdist_group("portable-study")
@pytest.mark.slow
def test_predict_takes_inputs_without_references(study, tmp_path, capsys):
    """jsonl of {"id", "context", "question"} (QA): the same predictions as the official file gives,
    and no scores (there is nothing to score against)."""
    inputs = tmp_path / "inputs.jsonl"
    common.write_jsonl(str(inputs), [{"id": q["id"], "context": q["context"], "question": q["question"]}
                                     for q in english_questions()])
    code, out, err = run_cli(predict, [str(study / "full" / "tiny-mt5"), "--input", str(inputs), "--lang", "en",
                                       "--out", str(tmp_path / "p.json")], capsys)
    assert code == 0, err
    raw = json.loads((study / "full" / "tiny-mt5" / "predictions" / "test.en.json").read_text())
    assert json.loads((tmp_path / "p.json").read_text()) == {k: evaluate.clean_prediction(v)[0] for k, v in raw.items()}
    assert not (tmp_path / "p.scores.json").exists()
    common.write_jsonl(str(inputs), [{"id": "a", "context": "x"}])
    code, _, err = run_cli(predict, [str(study / "full" / "tiny-mt5"), "--input", str(inputs), "--lang", "en",
                                     "--out", str(tmp_path / "q.json")], capsys)
    assert error_lines(err) == [f"error: {inputs}:1: missing or non-string field(s) question (inputs without "
                                f"references: {{\"id\", 'context', 'question'}})"]


def test_a_peft_written_checkpoint_with_a_relative_base_loads_from_a_relative_path(tmp_path, monkeypatch):
    """PEFT's base_model_name_or_path relative to the checkpoint, the checkpoint named by a relative
    path from another directory: the base is resolved once (regression: it was joined to the
    checkpoint's path twice, and refused)."""
    shutil.copytree(models.resolve("tiny-mt5", DATA_DIR), tmp_path / "study" / "it" / "last")
    model = adapt.apply(models.load_model(str(tmp_path / "study" / "it" / "last")), "lora", verbose=False, rank=4)
    checkpoint = tmp_path / "study" / "run" / "best"
    adapt.save(model, str(checkpoint), str(tmp_path / "study" / "it" / "last"))
    os.remove(checkpoint / models.ADAPTATION_FILE)  # as PEFT writes it: its own config only
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.join("..", "..", "it", "last")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    relative = os.path.join("..", "study", "run", "best")
    assert adapt.read_adaptation(relative)["base_model"] == os.path.join("..", "study", "it", "last")
    assert adapt.adaptation_of(adapt.load(relative))["options"]["rank"] == 4
