"""finetune.py, pretrain_it.py and loop.py: every method on every family, the schedule, it learns,
determinism, resume, kill-safety, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

import adapt
import data
import finetune
import loop
import models
import pretrain_it
from conftest import DATA_DIR, FAMILIES, FIXTURES, REPO, run_cli

QUICK = ["--data-dir", DATA_DIR, "--max-steps", "20", "--eval-every", "10", "--warmup-steps", "5",
         "--max-tokens", "1500", "--max-eval-examples", "4", "--max-new-tokens", "8", "--log-every", "5",
         "--lr", "1e-3", "--adapter-dim", "8", "--prompt-length", "4", "--max-train-examples", "300"]
TASK_ARGS = {"xquad": ["--task", "xquad", "--val-langs", "th,vi", "--test-langs", "zh,de"],
             "xlsum": ["--task", "xlsum", "--xlsum-dir", FIXTURES, "--val-langs", "fr,zh", "--test-langs", "ko,ru"]}
METHOD_ARGS = {"mix": ["--mix-langs", "fr,zh"], "multisrc": ["--src-langs", "en,es"]}


def run_finetune(out_dir, *extra, task="xquad", method="full", model="tiny-mt5"):
    argv = QUICK + TASK_ARGS[task] + ["--model", model, "--method", method, "--out-dir", str(out_dir)]
    return finetune.main(finetune.parse_args(argv + METHOD_ARGS.get(method, []) + list(extra)))


def steps(run_dir):
    """The step rows of a run's log.jsonl (the first line records what the data streams read)."""
    return [row for row in map(json.loads, open(os.path.join(run_dir, "log.jsonl"))) if "step" in row]


# One end-to-end run per method, each family twice, both tasks (test_adapt.py covers every method
# on every family at the module level).
# Every method of the registry, families in turn, tasks in turn where the method applies to both.
CASES = [(list(FAMILIES)[i % 3], method, task) for i, method in enumerate(adapt.REGISTRY)
         for task in [["xquad", "xlsum"][i % 2] if adapt.get_method(method).applies_to(["xquad", "xlsum"][i % 2])
                      else "xlsum"]]


@pytest.mark.slow
@pytest.mark.parametrize("name,method,task", CASES, ids=["-".join(c) for c in CASES])
def test_every_method_produces_the_run_directory(name, method, task, tmp_path):
    results = run_finetune(tmp_path, task=task, method=method, model=name)
    for path in ("args.json", "log.jsonl", "eval/step_10.json", "eval/step_20.json", "results.json",
                 "last/tokenizer.json", "best/tokenizer.json"):
        assert (tmp_path / path).exists(), path
    assert not (tmp_path / "last" / "train_state.pt").exists()  # a finished run keeps weights only
    weights = {"adapters": "adapters.safetensors", "prompt": "adapter_model.safetensors",
               "lora": "adapter_model.safetensors"}.get(method, "model.safetensors")
    assert (tmp_path / "last" / weights).exists() and (tmp_path / "best" / weights).exists()
    log = steps(tmp_path)
    assert [row["step"] for row in log] == [5, 10, 15, 20]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "padding_efficiency", "streams"} <= set(log[0])
    assert sum(log[0]["streams"].values()) == 5  # five batches in the window of five steps
    first = json.loads(open(tmp_path / "log.jsonl").readline())
    assert first["event"] == "data" and all("num_cut_sources" in s for s in first["streams"].values())
    main = "f1_filtered" if task == "xquad" else "rouge2"
    test_langs = ["zh", "de"] if task == "xquad" else ["ko", "ru"]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    for lang in test_langs:
        assert {main, "lcr", "avg_len"} <= set(results["test"][lang])
        assert (tmp_path / "predictions" / f"test.{lang}.json").exists()
    assert results["best_step"] in (10, 20) and results["main_metric"] == main


def test_a_run_at_a_gpus_precision_decodes_its_validations_and_test(tmp_path):
    """A GPU's settings bar the compile, here on CPU: bf16 autocast (--precision bf16) and the static
    decoder (--decoder static; a GPU's auto is it, compiled). Training, the validations at steps 10
    and 20 and the test all run in bf16, and results.json records the precision. Before
    decode.cache_dtype the first validation raised ("index_copy_(): self and source expected to have
    the same dtype ... Float and ... BFloat16"): every GPU run would have failed there."""
    results = run_finetune(tmp_path, "--precision", "bf16", "--decoder", "static", task="xlsum", method="adapters",
                           model="tiny-mbart")
    assert results["provenance"]["precision"] == "bf16" and results["config"]["decoder"] == "static"
    assert [json.loads((tmp_path / "eval" / f"step_{s}.json").read_text())["step"] for s in (10, 20)] == [10, 20]
    assert set(results["test"]) == {"ko", "ru"}
    assert all((tmp_path / "predictions" / f"test.{lang}.json").exists() for lang in ("ko", "ru"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_finetunes_on_every_family(name, tmp_path):
    """finetune.py --method lora on each family: the checkpoint holds the update alone, with the
    options it was made with, B has moved from zero (something was learnt), the test languages are scored."""
    results = run_finetune(tmp_path, "--lora-rank", "4", "--max-steps", "10", "--eval-every", "5", task="xquad",
                           method="lora", model=name)
    files = os.listdir(tmp_path / "best")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    config = json.loads((tmp_path / "best" / models.ADAPTATION_FILE).read_text())
    assert config["method"] == "lora" and config["options"] == {"rank": 4, "alpha": 16.0, "dropout": 0.1,
                                                                  "targets": ["q", "v"]}
    peft_config = json.loads((tmp_path / "best" / "adapter_config.json").read_text())  # PEFT's own format
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4 and peft_config["lora_alpha"] == 16.0
    saved = load_file(tmp_path / "best" / "adapter_model.safetensors")
    assert saved and all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in saved)
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if ".lora_B." in k)
    assert sorted(results["test"]) == ["de", "zh"] and "f1_filtered" in results["test"]["zh"]


def test_mix_draws_prefix_lm_batches(tmp_path):
    run_finetune(tmp_path, "--mix-prob", "0.5", "--log-every", "20", method="mix")
    (row,) = steps(tmp_path)  # one window of 20 steps: every batch of it is counted by stream
    streams = row["streams"]
    assert sum(streams.values()) == 20
    assert {s.split("/")[0] for s in streams} == {"prefix_lm", "task"} and set(streams) - {"task/en"} <= {"prefix_lm/fr", "prefix_lm/zh"}


@pytest.mark.parametrize("model,objective", [("tiny-mt5", "span_corruption"), ("tiny-nllb", "mbart_denoising")])
def test_mix_draws_the_models_own_pretraining_task(model, objective, tmp_path):
    """Appendix C: --mix-objective mixes the base model's pretraining task in instead of Prefix-LM;
    the batches drawn are of that stream, and the wrong model's objective is refused before training."""
    run_finetune(tmp_path / "ok", "--mix-prob", "0.5", "--log-every", "20", "--mix-objective", objective,
                 method="mix", model=model)
    (row,) = steps(tmp_path / "ok")
    assert {s.split("/")[0] for s in row["streams"]} == {objective, "task"}
    first = json.loads(open(tmp_path / "ok" / "log.jsonl").readline())
    assert {name.split("/")[0] for name in first["streams"]} == {objective, "task"}
    other = "mbart_denoising" if objective == "span_corruption" else "span_corruption"
    with pytest.raises(SystemExit) as exit_:
        run_finetune(tmp_path / "bad", "--mix-objective", other, method="mix", model=model)
    assert exit_.value.code == (f"error: --mix-objective {other}: the tokenizer of {model} has no "
                                f"{data.OBJECTIVE_TOKEN[other]} token (span_corruption is mT5's task, mbart_denoising mBART's)")


# ----------------------------------------------------------------------------- schedule and loss

class FairseqInverseSqrt:
    """fairseq's InverseSquareRootSchedule, transcribed: warmup_init_lr = 0, lr_step =
    lr / warmup_updates, decay_factor = lr * sqrt(warmup_updates); step_update(num_updates)."""

    def __init__(self, lr, warmup_updates):
        self.warmup_updates, self.lr_step = warmup_updates, lr / warmup_updates
        self.decay_factor = lr * warmup_updates ** 0.5

    def step_update(self, num_updates):
        if num_updates < self.warmup_updates:
            return 0.0 + num_updates * self.lr_step
        return self.decay_factor * num_updates ** -0.5


def test_get_lr_equals_fairseq_inverse_sqrt():
    fairseq = FairseqInverseSqrt(1e-3, 4000)
    for step in (1, 4000, 16000, 2000, 20000):
        assert loop.get_lr(step, 1e-3, 4000) == pytest.approx(fairseq.step_update(step), rel=1e-12)
    assert loop.get_lr(1, 1e-3, 4000) == pytest.approx(2.5e-7)
    assert loop.get_lr(4000, 1e-3, 4000) == pytest.approx(1e-3)
    assert loop.get_lr(16000, 1e-3, 4000) == pytest.approx(5e-4)


def test_schedule_is_hfs_inverse_sqrt_one_update_earlier():
    """HF's get_inverse_sqrt_schedule gives update k the LR we give update k - 1 (its first update is
    at 0, ours at lr / warmup), exactly, through warm-up and decay."""
    from transformers import get_inverse_sqrt_schedule
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-3)
    schedule = get_inverse_sqrt_schedule(optimizer, num_warmup_steps=40)
    theirs = []
    for _ in range(200):
        theirs.append(optimizer.param_groups[0]["lr"])  # the LR the next update uses
        optimizer.step()
        schedule.step()
    ours = [loop.get_lr(k, 1e-3, 40) for k in range(1, 201)]
    assert theirs[0] == 0.0 and ours[0] == pytest.approx(1e-3 / 40)
    assert ours[:-1] == pytest.approx(theirs[1:], rel=1e-12)


def test_loss_is_token_normalised(tokenizers):
    model = models.load_model("tiny-nllb", DATA_DIR).eval()
    encoder = models.Seq2SeqEncoder(tokenizers["tiny-nllb"], "nllb")
    examples = [data.Example("1", "Hello.", "A much longer target sentence here.", "en", "fr"),
                data.Example("2", "Hi there, friend.", "Short.", "en", "fr")]
    batch = data.collate(encoder.encode(examples), tokenizers["tiny-nllb"].pad_token_id)
    with torch.no_grad():
        loss, num_tokens = loop.token_loss(model, batch)
        hf = model(**batch).loss  # HF's mean over non-ignored tokens = our sum / count for one batch
    assert num_tokens == int((batch["labels"] != -100).sum()) and torch.allclose(loss, hf, atol=1e-5)


def test_overfitting_one_batch_halves_the_loss(tokenizers, squad_train):
    torch.manual_seed(0)
    model = adapt.apply(models.load_model("tiny-mt5", DATA_DIR), "full", verbose=False)
    encoder = models.Seq2SeqEncoder(tokenizers["tiny-mt5"], "mt5")
    batch = data.collate(encoder.encode(data.qa_examples(squad_train[:8], "en")), 0)
    optimizer = loop.make_optimizer(model, 1e-3)
    model.train()
    losses = []
    for _ in range(50):  # (halved in 25 steps here; 50 at most)
        loss, _ = loop.token_loss(model, batch)
        losses.append(loss.item())
        if losses[-1] < losses[0] / 2:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"overfitting one batch: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses) - 1} steps")
    assert losses[-1] < losses[0] / 2


# ----------------------------------------------------------------------------- determinism and resume

def _weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_same_seed_bitwise_equal_and_resume_bitwise_equal(tmp_path, capsys):
    run_finetune(tmp_path / "a", "--seed", "3")
    run_finetune(tmp_path / "b", "--seed", "3")
    assert _equal(_weights(tmp_path / "a" / "last"), _weights(tmp_path / "b" / "last"))
    run_finetune(tmp_path / "c", "--seed", "4")
    assert not _equal(_weights(tmp_path / "a" / "last"), _weights(tmp_path / "c" / "last"))
    # 10 steps, stop, then --resume for the other 10: the same weights, log and results as 20 straight
    capsys.readouterr()
    assert run_finetune(tmp_path / "r", "--seed", "3", "--stop-at-step", "10") is None
    assert "stopped after the checkpoint of step 10; continue with --resume" in capsys.readouterr().out
    assert loop.load_train_state(str(tmp_path / "r" / "last"))["step"] == 10
    assert not (tmp_path / "r" / "results.json").exists()
    resumed = run_finetune(tmp_path / "r", "--seed", "3", "--resume")
    assert _equal(_weights(tmp_path / "a" / "last"), _weights(tmp_path / "r" / "last"))
    assert steps(tmp_path / "a") == [dict(row, tokens_per_s=a["tokens_per_s"]) for row, a in
                                     zip(steps(tmp_path / "r"), steps(tmp_path / "a"))]
    straight = json.loads((tmp_path / "a" / "results.json").read_text())
    assert resumed["test"] == straight["test"] and resumed["best_step"] == straight["best_step"]
    # a finished run is skipped
    assert run_finetune(tmp_path / "a", "--seed", "3")["best_step"] == straight["best_step"]


def stopped_by_sigterm(tmp_path, monkeypatch, capsys, module, name, call):
    """Run finetune.py into tmp_path/t with a SIGTERM sent in the `call`-th call of module.name, under a
    handler that notes when it is delivered (the default one would end pytest). Returns (the calls
    made when the SIGTERM reached that handler, the calls in all, the run's output)."""
    delivered, calls, real = [], [], getattr(module, name)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: delivered.append(len(calls)))

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    try:
        assert run_finetune(tmp_path / "t", "--seed", "5") is None
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.setattr(module, name, real)
    return delivered, len(calls), capsys.readouterr().out


def resumed_as_straight(tmp_path, capsys):
    """--resume the run in tmp_path/t to its end, and check it against a straight run: the same
    weights, test scores and best step, and the same log rows (all but tokens/s, a time: the row
    after a resume between log steps sums the steps on both sides of it). Returns the resumed run's
    output."""
    resumed = run_finetune(tmp_path / "t", "--seed", "5", "--resume")
    out = capsys.readouterr().out
    straight = run_finetune(tmp_path / "straight", "--seed", "5")
    assert _equal(_weights(tmp_path / "t" / "last"), _weights(tmp_path / "straight" / "last"))
    assert resumed["test"] == straight["test"] and resumed["best_step"] == straight["best_step"]
    rows = [[{k: v for k, v in row.items() if k != "tokens_per_s"} for row in steps(tmp_path / run)]
            for run in ("t", "straight")]
    assert rows[0] == rows[1] and [row["step"] for row in rows[0]] == [5, 10, 15, 20], rows
    return out


@pytest.mark.slow
def test_sigterm_saves_the_step_it_came_in_and_resume_goes_on_bitwise(tmp_path, monkeypatch, capsys):
    """SIGTERM (scancel, a job's time limit, preemption; SIGKILL follows some seconds later) during
    the 13th of 20 steps, checkpoints every 10: the run saves last/ at step 13 and then delivers the
    SIGTERM again to the handler that was there before (the default one ends the process: exit -15,
    the study's killed job, tests/test_cluster.py; here, a handler that notes it), and --resume goes
    on from step 13 to a straight run's weights, scores and log rows (its row of step 15 sums steps
    11-15, as the straight run's does: the checkpoint carries the sums of steps 11-13). Before,
    SIGTERM came to that handler at once, training went on to its end, and a job's resume went back
    to step 10."""
    delivered, calls, out = stopped_by_sigterm(tmp_path, monkeypatch, capsys, loop, "train_step", 13)
    assert delivered == [13] and calls == 13, (delivered, calls)
    assert f"SIGTERM: stopped at the checkpoint of step 13 ({tmp_path / 't' / 'last'})" in out, out
    assert loop.load_train_state(str(tmp_path / "t" / "last"))["step"] == 13
    assert not (tmp_path / "t" / "results.json").exists()
    resumed_as_straight(tmp_path, capsys)


@pytest.mark.slow
def test_sigterm_during_an_evaluation_stops_it_at_once_and_resume_evaluates_that_step_again(tmp_path, monkeypatch,
                                                                                              capsys):
    """SLURM's SIGKILL follows its SIGTERM after KillWait (30 s by default), long before a real model's
    validation ends (minutes: XL-Sum's decodes thousands of summaries). SIGTERM in step 10's
    validation stops the validation at once; last/ holds step 10 (weights, optimizer, data, and the
    RNG the validation started from), marked not evaluated; --resume validates step 10 and goes on
    to a straight run's weights, validation scores and test scores. Before, the validation went on
    to its end after the SIGTERM (eval/step_10.json written), which a real job does not live to see:
    it was SIGKILLed, and its resume went back to the checkpoint before (here: none, step 0)."""
    delivered, _, out = stopped_by_sigterm(tmp_path, monkeypatch, capsys, finetune, "evaluate_split", 1)
    assert delivered == [1], delivered
    assert not (tmp_path / "t" / "eval" / "step_10.json").exists(), out
    assert f"SIGTERM: stopped at the checkpoint of step 10, during its evaluation ({tmp_path / 't' / 'last'})" in out, out
    state = loop.load_train_state(str(tmp_path / "t" / "last"))
    assert (state["step"], state["evaluated"]) == (10, False)
    out = resumed_as_straight(tmp_path, capsys)
    assert "resuming from step 10 (best step None, metric None); its evaluation, stopped by SIGTERM, first" in out, out
    for step in (10, 20):
        assert (json.loads((tmp_path / "t" / "eval" / f"step_{step}.json").read_text())["langs"]
                == json.loads((tmp_path / "straight" / "eval" / f"step_{step}.json").read_text())["langs"])


@pytest.mark.slow
def test_resume_with_adapters_is_bitwise_equal(tmp_path):
    run_finetune(tmp_path / "a", method="adapters")
    run_finetune(tmp_path / "r", "--stop-at-step", "10", method="adapters")
    run_finetune(tmp_path / "r", "--resume", method="adapters")
    a = load_file(str(tmp_path / "a" / "last" / adapt.ADAPTERS_WEIGHTS_FILE))
    r = load_file(str(tmp_path / "r" / "last" / adapt.ADAPTERS_WEIGHTS_FILE))
    assert _equal(a, r) and len(a) > 0


KILL_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
import finetune, loop
import adapt
save, calls = adapt.save, []
def slow_save(model, directory, base_model):
    save(model, directory, base_model)
    calls.append(directory)
    if ".tmp-last-" in directory and len([c for c in calls if ".tmp-last-" in c]) == 2:
        open({marker!r}, "w").close()   # the second last/ is half-saved: now kill us
        time.sleep(120)
adapt.save = slow_save
finetune.main(finetune.parse_args({argv!r}))
"""


@pytest.mark.slow
def test_sigkill_while_saving_leaves_a_loadable_last(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "saving"
    argv = QUICK + TASK_ARGS["xquad"] + ["--model", "tiny-mt5", "--out-dir", str(out)]
    script = KILL_SCRIPT.format(repo=REPO, marker=str(marker), argv=argv)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.name.startswith(".tmp-last-") for p in out.iterdir())  # the interrupted save
    model = models.load_model(str(out / "last"))                        # the previous one loads
    assert loop.load_train_state(str(out / "last"))["step"] == 10 and model is not None
    results = run_finetune(out, "--resume")                              # and the run completes
    assert results["best_step"] in (10, 20)
    assert not any(p.name.startswith(".tmp-last-") for p in out.iterdir())


def test_recover_checkpoint_between_the_two_renames(tmp_path):
    (tmp_path / ".old-last").mkdir()
    (tmp_path / ".old-last" / "config.json").write_text("{}")
    (tmp_path / ".tmp-last-abc").mkdir()
    assert loop.recover_checkpoint(str(tmp_path), "last") == str(tmp_path / "last")
    assert (tmp_path / "last" / "config.json").exists() and not (tmp_path / ".tmp-last-abc").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    token_loss_sum, calls = loop.token_loss_sum, []

    def poisoned(model, batch, loss_fn=loop.loss_sum):
        calls.append(1)
        loss, n = token_loss_sum(model, batch, loss_fn)
        return (loss * float("nan") if len(calls) > 13 else loss), n
    monkeypatch.setattr(loop, "token_loss_sum", poisoned)
    with pytest.raises(SystemExit) as e:
        run_finetune(tmp_path)
    message = str(e.value.code)
    assert "non-finite loss (nan) at step 14" in message and "last good checkpoint" in message
    assert "\n" not in message
    assert loop.load_train_state(str(tmp_path / "last"))["step"] == 10
    assert models.load_model(str(tmp_path / "last")) is not None


# ----------------------------------------------------------------------------- pretrain_it

@pytest.mark.slow
def test_pretrain_it_loss_falls_and_finetune_init_loads_it(tmp_path):
    out = tmp_path / "it"
    pretrain_it.main(pretrain_it.parse_args([
        "--model", "tiny-mt5", "--data-dir", DATA_DIR, "--langs", "en,fr,zh", "--max-steps", "50",
        "--warmup-steps", "10", "--eval-every", "25", "--lr", "3e-3", "--max-tokens", "1000",
        "--log-every", "10", "--out-dir", str(out), "--num-samples", "2", "--max-new-tokens", "8"]))
    log = steps(out)
    print("Prefix-LM loss by 10 steps:", [round(r["loss"], 3) for r in log])
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    evals = [json.loads((out / "eval" / f"step_{s}.json").read_text()) for s in (25, 50)]
    assert evals[1]["average"] < evals[0]["average"]
    assert set(evals[1]["samples"]) == {"en", "fr", "zh"}
    # finetune --init takes the run directory; training starts from the intermediate-tuned weights
    args = finetune.parse_args(QUICK + TASK_ARGS["xquad"] + ["--model", "tiny-mt5", "--init", str(out),
                                                             "--out-dir", str(tmp_path / "ft")])
    finetune.check_args(args)
    assert args.init == str(out / "last")
    assert args.lr == 1e-3 and args.out_dir == str(tmp_path / "ft")
    started = finetune.build_model(args)
    it_weights = _weights(out / "last")
    assert torch.equal(started.state_dict()["shared.weight"], it_weights["shared.weight"])
    assert not torch.equal(it_weights["shared.weight"], _weights(models.resolve("tiny-mt5"))["shared.weight"])
    results = finetune.main(args)
    assert results["config"]["init"] == str(out / "last")


def test_zmbart_objective_runs(tmp_path):
    pretrain_it.main(pretrain_it.parse_args([
        "--model", "tiny-nllb", "--data-dir", DATA_DIR, "--langs", "en,ru", "--objective", "zmbart",
        "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2", "--out-dir", str(tmp_path),
        "--max-tokens", "2000", "--num-samples", "1", "--max-new-tokens", "4"]))
    assert (tmp_path / "last" / "model.safetensors").exists() and (tmp_path / "results.json").exists()


# ----------------------------------------------------------------------------- bad input

BAD = [
    (["--model", "gpt-2"], "--model: cannot find model 'gpt-2'"),
    (["--method", "no-such-method"], "argument --method: invalid choice: 'no-such-method'"),
    (["--val-langs", "th,xx"], "--val-langs: unknown language 'xx'"),
    (["--task", "glue"], "argument --task: invalid choice: 'glue'"),
    (["--lr", "0"], "argument --lr/--learning-rate: must be a finite number > 0, got 0"),
    (["--lr=-1e-3"], "argument --lr/--learning-rate: must be a finite number > 0"),
    (["--train-file", "/nonexistent/train.json"], "/nonexistent/train.json: file not found"),
    (["--method", "multisrc"], "--method multisrc: xquad has training data only in English"),
    (["--model", "tiny-mbart", "--test-langs", "el"], "mbart has no language code for 'el'"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_fails_before_any_model_loads(extra, message, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(models, "load_tokenizer", no_loading)
    argv = QUICK + TASK_ARGS["xquad"] + ["--model", "tiny-mt5", "--out-dir", str(tmp_path / "run")]
    code, _, err = run_cli(finetune, argv + extra, capsys)
    assert code != 0 and message in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "run").exists()


def test_missing_xlsum_data_points_at_download(tmp_path, capsys):
    code, _, err = run_cli(finetune, ["--model", "tiny-mt5", "--task", "xlsum", "--data-dir", str(tmp_path),
                                      "--out-dir", str(tmp_path / "run")], capsys)
    assert code == 1 and "python download.py --tasks xlsum" in err


def test_existing_checkpoint_needs_resume(tmp_path):
    run_finetune(tmp_path, "--stop-at-step", "10")
    with pytest.raises(SystemExit, match="pass --resume"):
        run_finetune(tmp_path)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_and_generation_agree_on_the_decoder_layout(name, tokenizers, squad_train):
    """Overfit four examples with the training loss, then generate them back with the evaluation
    settings (decoder start, forced target code): teacher forcing and generation must agree."""
    torch.manual_seed(0)
    family, tokenizer = FAMILIES[name], tokenizers[name]
    distinct = list({q["context"]: q for q in squad_train}.values())[:4]       # one question per paragraph
    examples = data.qa_examples(distinct, "fr")                                   # exercise the language codes
    encoder = models.Seq2SeqEncoder(tokenizer, family, max_source_length=64)
    encoded = encoder.encode(examples)
    batch = data.collate(encoded, tokenizer.pad_token_id)
    model = adapt.apply(models.load_model(name, DATA_DIR), "full", verbose=False)
    optimizer = loop.make_optimizer(model, 3e-3)
    model.train()
    for _ in range(100):
        loss, _ = loop.token_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    predictions = loop.generate(model, tokenizer, encoded, encoder.generation_kwargs("fr"), torch.device("cpu"), 16)
    assert sum(p == ex.target for p, ex in zip(predictions, examples)) >= 3, list(zip(predictions, [e.target for e in examples]))


def test_a_step_without_trainable_path_is_skipped_not_fatal(tmp_path, monkeypatch):
    """Prompt tuning with LayerDrop can draw a step where every decoder layer is skipped: the loss
    then does not depend on the prompt. The loop skips that update instead of crashing the run."""
    load_model = models.load_model

    def with_full_layerdrop(name, data_dir=None):
        model = load_model(name, data_dir)
        model.model.decoder.layerdrop = 1.0  # every decoder layer skipped in training
        return model
    monkeypatch.setattr(models, "load_model", with_full_layerdrop)
    run_finetune(tmp_path, method="prompt", model="tiny-nllb")
    log = steps(tmp_path)
    assert len(log) == 4 and all(row["grad_norm"] == 0.0 for row in log)


# ----------------------------------------------------------------------------- settings and checkpoints

class RunsCode:
    """Unpickling this object would run a shell command (what a booby-trapped train_state.pt does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_train_state_is_loaded_without_running_code(tmp_path):
    run_finetune(tmp_path / "run", "--max-steps", "10", "--keep-train-state")  # (a finished run keeps it only so)
    state_path = tmp_path / "run" / "last" / "train_state.pt"
    state = torch.load(state_path, weights_only=True)  # a real state holds only plain data: it loads
    assert state["step"] == 10 and set(state) >= {"optimizer", "stream", "rng"}
    marker = tmp_path / "pwned"
    torch.save(dict(state, extra=RunsCode(marker)), state_path)
    with pytest.raises(data.DataError, match="refused: it holds Python objects"):
        loop.load_train_state(str(tmp_path / "run" / "last"))
    assert not marker.exists()
    state_path.write_bytes(b"garbage, not a pickle")
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        loop.load_train_state(str(tmp_path / "run" / "last"))


def test_resolved_settings_are_printed_and_args_json_reruns_the_run(tmp_path, capsys):
    run_finetune(tmp_path / "a", "--max-steps", "10", "--seed", "5")
    out = capsys.readouterr().out
    for setting in ("adam_beta1", "adam_beta2", "adam_eps", "max_gen_batch_size", "update_freq", "val_langs"):
        assert f"\n  {setting} " in out, setting
    saved = json.loads((tmp_path / "a" / "args.json").read_text())
    assert saved["adam_beta2"] == 0.999 and saved["val_langs"] == ["th", "vi"] and saved["seed"] == 5
    finetune.main(finetune.parse_args(["--config", str(tmp_path / "a" / "args.json"), "--out-dir", str(tmp_path / "b")]))
    again = json.loads((tmp_path / "b" / "args.json").read_text())
    assert {k: v for k, v in again.items() if k != "out_dir"} == {k: v for k, v in saved.items() if k != "out_dir"}
    assert _equal(_weights(tmp_path / "a" / "last"), _weights(tmp_path / "b" / "last"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(saved, lr=-1.0)))
    with pytest.raises(SystemExit):
        finetune.parse_args(["--config", str(bad)])
    assert "lr: must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_more_steps_extends_a_finished_run_bitwise(tmp_path, capsys):
    """With --keep-train-state a finished run can be extended, bit for bit; without it the optimizer
    state is gone, and asking to extend says which flag it needed."""
    run_finetune(tmp_path / "straight", "--max-steps", "20")
    first = run_finetune(tmp_path / "ext", "--max-steps", "10", "--keep-train-state")
    assert first["config"]["max_steps"] == 10 and (tmp_path / "ext" / "results.json").exists()
    assert (tmp_path / "ext" / "last" / "train_state.pt").exists()
    again = run_finetune(tmp_path / "ext", "--max-steps", "10", "--keep-train-state")  # same settings: skipped
    assert again == first and "run already finished, skipped" in capsys.readouterr().out
    pruned = run_finetune(tmp_path / "pruned", "--max-steps", "10")
    assert not (tmp_path / "pruned" / "last" / "train_state.pt").exists() and pruned["best_step"] in (5, 10)
    with pytest.raises(SystemExit) as e:
        run_finetune(tmp_path / "pruned", "--max-steps", "20", "--resume")
    assert "was run with --keep-train-state" in str(e.value) and str(e.value).startswith("error: ")
    extended = run_finetune(tmp_path / "ext", "--max-steps", "20", "--resume", "--keep-train-state")
    assert _equal(_weights(tmp_path / "straight" / "last"), _weights(tmp_path / "ext" / "last"))
    assert extended["config"]["max_steps"] == 20 and loop.load_train_state(str(tmp_path / "ext" / "last"))["step"] == 20
    assert [r["step"] for r in steps(tmp_path / "ext")] == [5, 10, 15, 20]
    assert json.loads((tmp_path / "ext" / "args.json").read_text())["max_steps"] == 20


@pytest.mark.slow
def test_a_finished_run_keeps_one_copy_of_its_weights_and_says_how_it_was_made(tmp_path):
    """The optimizer state is removed at the end; when the best step is the last, best/ and last/
    are the same files on disk (hard links, equal bytes); results.json records the commit of the
    code, the requirements' versions, the device and the model's revision."""
    results = run_finetune(tmp_path / "run", "--max-steps", "10", "--eval-every", "10")  # one evaluation: best = last
    run = tmp_path / "run"
    assert results["best_step"] == 10 and not (run / "last" / "train_state.pt").exists()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert os.path.samefile(run / "best" / name, run / "last" / name), name
    assert _equal(_weights(run / "best"), _weights(run / "last"))
    loaded = adapt.load(str(run / "best"))  # a linked checkpoint loads like any other
    assert sum(p.numel() for p in loaded.parameters()) > 0
    made = json.loads((run / "results.json").read_text())["provenance"]
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert made["git_commit"] == (head or None)
    assert made["versions"]["torch"] == torch.__version__
    assert made["versions"]["transformers"] == transformers.__version__ and made["versions"]["pytest"] == pytest.__version__
    assert made["device"].startswith("cpu") and made["model"] == "tiny-mt5"
    assert made["model_revision"] == f"tiny-v{models.TINY_VERSION}"
