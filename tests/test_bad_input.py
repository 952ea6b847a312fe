"""Bad or unusual input to every command: a one-line error (or the documented warning), never a
traceback, never a stray temporary file, and nothing that existed before is changed.

Each case builds its inputs in its own directory (copying a prepared run where it needs one), runs
the real command line in this process and checks:
  - the exit status is non-zero (or 0 with the documented warning, for the cases marked so);
  - stderr has exactly one line starting with `error:`, one line long, with the expected text;
  - no exception other than SystemExit escaped (it would be a traceback for the user);
  - no `.part-*` / `.tmp-*` file is left anywhere below the case's directory;
  - every file that existed before the command (the watched ones) is byte-identical, with the
    same mode, and no file appeared among them.
"""

import collections
import hashlib
import json
import os
import shutil
import subprocess

import pytest

import adapt
import download
import evaluate
import finetune
import models
import pretrain_it
import report
import study
import translate_train
from conftest import DATA_DIR, error_lines, run_cli

QUICK = ["--model", "tiny-mt5", "--task", "xquad", "--data-dir", DATA_DIR, "--eval-every", "10", "--warmup-steps",
         "2", "--max-tokens", "1500", "--max-eval-examples", "3", "--max-new-tokens", "4", "--max-train-examples",
         "100", "--val-langs", "th", "--test-langs", "zh", "--lr", "1e-3", "--log-every", "5"]
XQUAD_ES = os.path.join(DATA_DIR, "xquad", "xquad.es.json")
PRED_ES = os.path.join(DATA_DIR, "xquad", "predictions", "CL-mt5base.es.json")
STANDIN = os.path.join(DATA_DIR, "squad", "train-standin-v1.1.json.gz")

World = collections.namedtuple("World", "done stopped adapters nllb")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Runs the cases start from: a finished 10-step run, a run stopped at step 10 of 20, an
    adapters run stopped likewise, and the tiny NLLB checkpoint (another family)."""
    root = tmp_path_factory.mktemp("world")
    finetune.main(finetune.parse_args(QUICK + ["--max-steps", "10", "--out-dir", str(root / "done")]))
    finetune.main(finetune.parse_args(QUICK + ["--max-steps", "20", "--stop-at-step", "10", "--out-dir", str(root / "stopped")]))
    finetune.main(finetune.parse_args(QUICK + ["--max-steps", "20", "--stop-at-step", "10", "--method", "adapters",
                                               "--adapter-dim", "4", "--out-dir", str(root / "adapters")]))
    return World(str(root / "done"), str(root / "stopped"), str(root / "adapters"), models.resolve("tiny-nllb"))


def copy_run(source, tmp, name="run"):
    target = os.path.join(tmp, name)
    shutil.copytree(source, target)
    return target


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    return path


# -----------------------------------------------------------------------------
# The cases: name -> (command module, function(world, tmp) -> argv, expected text, exit status kind)

Case = collections.namedtuple("Case", "module build expected warning starts")
CASES = {}


def case(name, module, expected, warning=False, starts=False):
    """`starts`: the run gets going before it fails (or warns), so its directory records it."""
    def register(build):
        CASES[name] = Case(module, build, expected, warning, starts)
        return build
    return register


# ---- finetune.py: a run directory knows its settings
case("finetune resume with another --lr", finetune, "--lr 0.001 -> 0.0005")(
    lambda w, t: QUICK + ["--max-steps", "20", "--resume", "--lr", "5e-4", "--out-dir", copy_run(w.stopped, t)])
case("finetune resume with another --model", finetune, "--model 'tiny-mt5' -> 'tiny-nllb'")(
    lambda w, t: QUICK + ["--max-steps", "20", "--resume", "--model", "tiny-nllb", "--out-dir", copy_run(w.stopped, t)])
case("finetune --init of another family", finetune, "a nllb checkpoint, but --model tiny-mt5 is mt5")(
    lambda w, t: QUICK + ["--max-steps", "10", "--init", w.nllb, "--out-dir", os.path.join(t, "run")])
case("finetune finished run asked with other settings", finetune,
     "this finished run was started with other settings (--warmup-steps 2 -> 3)")(
    lambda w, t: QUICK + ["--max-steps", "10", "--warmup-steps", "3", "--out-dir", copy_run(w.done, t)])
case("finetune finished run asked to go further without --resume", finetune, "pass --resume to extend it")(
    lambda w, t: QUICK + ["--max-steps", "20", "--out-dir", copy_run(w.done, t)])
case("finetune --max-steps below the checkpoint", finetune, "--max-steps 5: the run in")(
    lambda w, t: QUICK + ["--max-steps", "5", "--resume", "--out-dir", copy_run(w.stopped, t)])
case("finetune existing checkpoint without --resume", finetune, "holds a checkpoint; pass --resume")(
    lambda w, t: QUICK + ["--max-steps", "20", "--out-dir", copy_run(w.stopped, t)])
case("finetune --resume where there is no run", finetune, "--resume: no last/ checkpoint")(
    lambda w, t: QUICK + ["--max-steps", "20", "--resume", "--out-dir", os.path.join(t, "run")])

# ---- finetune.py: flags checked before anything heavy
case("finetune --stop-at-step not an evaluation step", finetune, "--stop-at-step 3: not an evaluation step")(
    lambda w, t: QUICK + ["--max-steps", "20", "--stop-at-step", "3", "--eval-every", "2", "--out-dir", os.path.join(t, "r")])
case("finetune --max-eval-examples 0", finetune, "argument --max-eval-examples: must be an integer >= 1, got 0")(
    lambda w, t: QUICK + ["--max-eval-examples", "0", "--out-dir", os.path.join(t, "r")])
case("finetune --grad-clip -1", finetune, "argument --grad-clip/--max-grad-norm/--clip-norm: must be a finite number >= 0")(
    lambda w, t: QUICK + ["--grad-clip=-1", "--out-dir", os.path.join(t, "r")])
case("finetune --weight-decay nan", finetune, "argument --weight-decay: must be a finite number >= 0, got nan")(
    lambda w, t: QUICK + ["--weight-decay", "nan", "--out-dir", os.path.join(t, "r")])
case("finetune --lr inf", finetune, "argument --lr/--learning-rate: must be a finite number > 0, got inf")(
    lambda w, t: QUICK + ["--lr", "inf", "--out-dir", os.path.join(t, "r")])
case("finetune --lr abc", finetune, "argument --lr/--learning-rate: expected a finite number > 0, got 'abc'")(
    lambda w, t: QUICK + ["--lr", "abc", "--out-dir", os.path.join(t, "r")])
case("finetune --adam-beta2 1", finetune, "argument --adam-beta2: must be a number in [0, 1)")(
    lambda w, t: QUICK + ["--adam-beta2", "1", "--out-dir", os.path.join(t, "r")])
case("finetune --update-freq 0", finetune, "argument --update-freq/--gradient-accumulation-steps: must be an integer >= 1")(
    lambda w, t: QUICK + ["--update-freq", "0", "--out-dir", os.path.join(t, "r")])
case("finetune --mix-prob 1", finetune, "argument --mix-prob: must be a number in (0, 1)")(
    lambda w, t: QUICK + ["--method", "mix", "--mix-prob", "1", "--out-dir", os.path.join(t, "r")])
case("finetune --test-langs names the flag", finetune, "--test-langs: mbart has no language code for 'el'")(
    lambda w, t: QUICK + ["--model", "tiny-mbart", "--test-langs", "el", "--out-dir", os.path.join(t, "r")])
case("finetune --device cuda without CUDA", finetune, "--device: cuda requested but CUDA is not available")(
    lambda w, t: QUICK + ["--device", "cuda", "--max-steps", "10", "--out-dir", os.path.join(t, "r")])
case("finetune --device nonsense", finetune, "--device: unknown device 'tpu9'")(
    lambda w, t: QUICK + ["--device", "tpu9", "--max-steps", "10", "--out-dir", os.path.join(t, "r")])
case("finetune --lid-model garbage", finetune, "not a fastText model")(
    lambda w, t: QUICK + ["--lid-model", write(os.path.join(t, "lid.bin"), b"not a model"), "--out-dir", os.path.join(t, "r")])
case("finetune --out-dir is a file", finetune, "is a file, not a directory")(
    lambda w, t: QUICK + ["--max-steps", "10", "--out-dir", write(os.path.join(t, "a-file"), "x")])
case("finetune --out-dir below a file", finetune, "is a file, not a directory")(
    lambda w, t: QUICK + ["--max-steps", "10", "--out-dir", os.path.join(write(os.path.join(t, "a-file"), "x"), "run")])
case("finetune --max-tokens 1 says what it cuts", finetune, "examples cut to the 1-token batch budget", warning=True,
     starts=True)(
    lambda w, t: QUICK + ["--max-steps", "2", "--eval-every", "2", "--max-tokens", "1", "--out-dir", os.path.join(t, "r")])

# ---- finetune.py: every read names its file
case("finetune --train-file missing", finetune, "nope.json: file not found")(
    lambda w, t: QUICK + ["--train-file", os.path.join(t, "nope.json"), "--out-dir", os.path.join(t, "r")])
case("finetune --train-file is a directory", finetune, ": is a directory, expected a file")(
    lambda w, t: QUICK + ["--train-file", t, "--out-dir", os.path.join(t, "r")])
case("finetune --train-file truncated JSON", finetune, "cut.json:1: invalid JSON")(
    lambda w, t: QUICK + ["--max-steps", "10", "--train-file", write(os.path.join(t, "cut.json"), '{"data": [{"title": "x", "parag'),
                          "--out-dir", os.path.join(t, "r")])
case("finetune XL-Sum file with bytes that are not UTF-8", finetune, "english_train.jsonl:2: not UTF-8 text")(
    lambda w, t: ["--model", "tiny-mt5", "--task", "xlsum", "--data-dir", DATA_DIR, "--xlsum-dir", xlsum_with_latin1(t),
                  "--val-langs", "fr", "--test-langs", "fr", "--max-steps", "10", "--out-dir", os.path.join(t, "r")])
case("finetune --resume with a truncated model.safetensors", finetune, "run/last: cannot load the model (SafetensorError")(
    lambda w, t: QUICK + ["--max-steps", "20", "--resume", "--out-dir", truncated(copy_run(w.stopped, t), "last/model.safetensors")])
case("finetune --resume with a truncated train_state.pt", finetune, "train_state.pt: truncated or corrupt")(
    lambda w, t: QUICK + ["--max-steps", "20", "--resume", "--out-dir", truncated(copy_run(w.stopped, t), "last/train_state.pt")])
case("finetune --resume with a garbage train_state.pt", finetune, "train_state.pt: truncated or corrupt")(
    lambda w, t: QUICK + ["--max-steps", "20", "--resume", "--out-dir", garbage(copy_run(w.stopped, t), "last/train_state.pt")])
case("finetune finished run with a truncated results.json", finetune, "invalid results.json (")(
    lambda w, t: QUICK + ["--max-steps", "10", "--out-dir", truncated(copy_run(w.done, t), "results.json")])
# args.json cut after '{', "model": ..., "task": ..., "method": ...,: the JSON ends at line 5, column 1
case("finetune --config truncated", finetune, "argument --config: {t}/run/args.json:5: invalid JSON")(
    lambda w, t: ["--config", truncated(copy_run(w.done, t), "args.json", keep="path", lines=4)])
case("finetune --config with an unknown setting", finetune, "unknown setting(s) colour")(
    lambda w, t: ["--config", write(os.path.join(t, "args.json"), json.dumps({"colour": "red"}))])
case("finetune --init with an adapters checkpoint", finetune, "is an added-weights checkpoint (adapters")(
    lambda w, t: QUICK + ["--init", copy_run(w.adapters, t, "ad") + "/last", "--out-dir", os.path.join(t, "r")])
case("finetune --model with an adapters checkpoint", finetune, "is an added-weights checkpoint (adapters")(
    lambda w, t: QUICK + ["--model", copy_run(w.adapters, t, "ad") + "/last", "--out-dir", os.path.join(t, "r")])
case("finetune --lr 1e9 diverges before any checkpoint", finetune, "no checkpoint was written yet", starts=True)(
    lambda w, t: QUICK + ["--lr", "1e9", "--warmup-steps", "0", "--max-steps", "20", "--eval-every", "20",
                          "--out-dir", os.path.join(t, "r")])

# ---- pretrain_it.py
case("pretrain_it unknown language", pretrain_it, "--langs: unknown language 'xx'")(
    lambda w, t: ["--model", "tiny-mt5", "--data-dir", DATA_DIR, "--langs", "en,xx", "--out-dir", os.path.join(t, "r")])
case("pretrain_it no text/ directory points at download", pretrain_it, "python download.py --tasks text")(
    lambda w, t: ["--model", "tiny-mt5", "--data-dir", DATA_DIR, "--text-dir", t, "--out-dir", os.path.join(t, "r")])
case("pretrain_it --stop-at-step not an evaluation step", pretrain_it, "--stop-at-step 7: not an evaluation step")(
    lambda w, t: ["--model", "tiny-mt5", "--data-dir", DATA_DIR, "--stop-at-step", "7", "--eval-every", "5",
                  "--max-steps", "20", "--out-dir", os.path.join(t, "r")])

# ---- evaluate.py
case("evaluate --limit 0", evaluate, "argument --limit: must be an integer >= 1, got 0")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", XQUAD_ES, "--predictions", PRED_ES, "--limit", "0"])
case("evaluate --limit -5", evaluate, "argument --limit: must be an integer >= 1, got -5")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", XQUAD_ES, "--predictions", PRED_ES, "--limit=-5"])
case("evaluate --references is a directory", evaluate, ": is a directory, expected a file")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", t, "--predictions", PRED_ES])
case("evaluate predictions not UTF-8", evaluate, "preds.json:1: not UTF-8 text")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", XQUAD_ES,
                  "--predictions", write(os.path.join(t, "preds.json"), b'{"a": "caf\xe9"}')])
case("evaluate duplicate prediction ids", evaluate, "prediction id 'a' is given twice (first on line 1)")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", XQUAD_ES, "--predictions",
                  write(os.path.join(t, "p.jsonl"), '{"id": "a", "prediction": "x"}\n{"id": "a", "prediction": "y"}\n')])
case("evaluate --out is a directory", evaluate, "--out " + "{t}: is a directory; give a file name")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", XQUAD_ES, "--predictions", PRED_ES, "--out", t])
case("evaluate --lid-model garbage", evaluate, "not a fastText model")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", XQUAD_ES, "--predictions", PRED_ES,
                  "--lid-model", write(os.path.join(t, "lid.ftz"), b"\x00" * 64)])

# ---- translate_train.py
TRANSLATE = ["--model", "tiny-nllb", "--data-dir", DATA_DIR, "--task", "xquad", "--train-file", STANDIN, "--tgt-lang", "fr"]
case("translate --limit -1", translate_train, "argument --limit: must be an integer >= 1, got -1")(
    lambda w, t: TRANSLATE + ["--limit=-1", "--out-file", os.path.join(t, "o.json")])
case("translate negative --max-length-ratio", translate_train, "argument --max-length-ratio: must be a finite number > 0")(
    lambda w, t: TRANSLATE + ["--max-length-ratio=-1", "--out-file", os.path.join(t, "o.json")])
case("translate negative --max-length-offset", translate_train, "argument --max-length-offset: must be an integer >= 0")(
    lambda w, t: TRANSLATE + ["--max-length-offset=-3", "--out-file", os.path.join(t, "o.json")])
case("translate --out-file is a directory", translate_train, "--out-file " + "{t}: is a directory; give a file name")(
    lambda w, t: TRANSLATE + ["--limit", "3", "--out-file", t])
case("translate progress line without its fields", translate_train, "o.json.progress.jsonl:2: a progress line without its fields")(
    lambda w, t: TRANSLATE + ["--limit", "3", "--out-file", progress_missing_field(t)])
case("translate an mT5 model", translate_train, "is an mT5 model, not a translation model")(
    lambda w, t: ["--model", "tiny-mt5", "--data-dir", DATA_DIR, "--task", "xquad", "--train-file", STANDIN,
                  "--tgt-lang", "fr", "--out-file", os.path.join(t, "o.json")])
case("translate --shard 4/3", translate_train, "argument --shard: expected I/N with 1 <= I <= N, got '4/3'")(
    lambda w, t: TRANSLATE + ["--shard", "4/3", "--out-file", os.path.join(t, "o.json")])
case("translate --shard and --merge", translate_train, "--shard and --merge: give one")(
    lambda w, t: TRANSLATE + ["--shard", "1/3", "--merge", "3", "--out-file", os.path.join(t, "o.json")])
case("translate more shards than chunks", translate_train, "the input has 1 chunks of --chunk-size 64 examples; give at most 1")(
    lambda w, t: TRANSLATE + ["--limit", "3", "--shard", "1/2", "--out-file", os.path.join(t, "o.json")])
case("translate --merge without the shards", translate_train, "2 of the 2 shards are not there")(
    lambda w, t: TRANSLATE + ["--limit", "3", "--merge", "2", "--out-file", os.path.join(t, "o.json")])
case("study --resources of an unknown kind", study, "resources.json: unknown kind of job 'gpu'; the kinds are guard, it")(
    lambda w, t: ["it", "--out-dir", os.path.join(t, "s"), "--resources", write(os.path.join(t, "resources.json"),
                                                                                  '{"gpu": {"max_hours": 4}}')])
case("study --resources with a negative max_hours", study, "resources.json: finetune.max_hours: -1 is not a valid value")(
    lambda w, t: ["it", "--out-dir", os.path.join(t, "s"), "--resources", write(os.path.join(t, "resources.json"),
                                                                                  '{"finetune": {"max_hours": -1}}')])
case("study --resources with an unknown setting", study, "resources.json: it.memory: unknown setting")(
    lambda w, t: ["it", "--out-dir", os.path.join(t, "s"), "--resources", write(os.path.join(t, "resources.json"),
                                                                                  '{"it": {"memory": "8G"}}')])
case("study --resources that does not exist", study, "nope.json: file not found")(
    lambda w, t: ["it", "--out-dir", os.path.join(t, "s"), "--resources", os.path.join(t, "nope.json")])
case("download --models with --tasks xquad", download, "--models: only with --tasks models")(
    lambda w, t: ["--data-dir", t, "--tasks", "xquad", "--models", "google/mt5-base"])

# ---- study.py, report.py, download.py, adapt.py, models.py
case("report with a truncated plan.json", report, "plan.json:1: invalid plan.json")(
    lambda w, t: ["--out-dir", os.path.dirname(write(os.path.join(t, "study", "plan.json"), '{"/x": {"stage"'))])
case("report of a directory with no study", report, "not found; run the study stages first")(
    lambda w, t: ["--out-dir", t])
case("study with a truncated plan.json", study, "plan.json:1: invalid plan.json")(
    lambda w, t: ["methods", "--out-dir", os.path.dirname(write(os.path.join(t, "study", "plan.json"), '{"/x": {'))])
# a hand-edited plan.json or chosen.json: read through plan.py, each entry checked (one line naming file and entry)
for label, content, expected in [
        ("not an object", '[1, 2]', "plan.json: expected a JSON object, got list"),
        ("a null entry", '{"/r": null}', "plan.json: entry '/r' is not an object with a known stage"),
        ("an unknown stage", '{"/r": {"stage": "warmup", "task": "xquad"}}', "entry '/r' is not an object with a known stage"),
        ("an entry without its keys", '{"/r": {"stage": "methods", "task": "xquad"}}',
         "entry '/r' (stage methods) lacks model, method, lr, it, seed"),
        ("a non-number LR", '{"/r": {"stage": "lr-search", "task": "xquad", "model": "m", "method": "full", "lr": "1e-3", '
                            '"it": false, "seed": 0}}', "entry '/r': lr '1e-3' is not a number")]:
    case(f"report with a plan.json: {label}", report, expected)(
        lambda w, t, content=content: ["--out-dir", os.path.dirname(write(os.path.join(t, "study", "plan.json"), content))])


def study_with_bad_chosen(tmp):
    write(os.path.join(tmp, "study", "plan.json"), "{}")
    write(os.path.join(tmp, "study", "chosen.json"), '{"xquad/m/full": {"lr": 1}}')
    return os.path.join(tmp, "study")


case("report with a chosen.json entry without its keys", report, "chosen.json: entry 'xquad/m/full' is not a task/model/method")(
    lambda w, t: ["--out-dir", study_with_bad_chosen(t)])
case("finetune --lora-targets q,x", finetune, "--lora-targets: give projections among q,k,v,o")(
    lambda w, t: QUICK + ["--method", "lora", "--lora-targets", "q,x", "--out-dir", os.path.join(t, "r")])
case("study --poll-seconds 0", study, "argument --poll-seconds: must be a finite number > 0")(
    lambda w, t: ["it", "--poll-seconds", "0", "--out-dir", t])
case("download --mirror that is not a URL", download, "--mirror: expected an http://, https:// or file:// URL")(
    lambda w, t: ["--data-dir", t, "--tasks", "xquad", "--mirror", "notaurl"])
case("adapt --prompt-length 0", adapt, "argument --prompt-length: must be an integer >= 1, got 0")(
    lambda w, t: ["--model", "tiny-nllb", "--method", "prompt", "--prompt-length", "0", "--data-dir", DATA_DIR])
case("models.py --model that does not exist", models, "no such checkpoint directory")(
    lambda w, t: ["--model", os.path.join(t, "nowhere"), "--data-dir", DATA_DIR])


# -----------------------------------------------------------------------------
# Second sweep (issue 26): no command writes over its own inputs; every value of --config checked
# as on the command line; nothing to score is an error; messages name the file or flag given.

import cost  # noqa: E402 -- with the second sweep's cases

EVAL_ES = ["--task", "xquad", "--lang", "es", "--references", XQUAD_ES]


def copied(source, tmp, name):
    target = os.path.join(tmp, name)
    shutil.copyfile(source, target)
    return target


def linked(source, tmp, name):
    os.symlink(source, os.path.join(tmp, name))
    return os.path.join(tmp, name)


def squad_with(tmp, name, edit):
    """The first article of XQuAD es, edited by `edit(first_question)`."""
    with open(XQUAD_ES, encoding="utf-8") as f:
        raw = json.load(f)
    raw["data"] = raw["data"][:1]
    edit(raw["data"][0]["paragraphs"][0]["qas"][0])
    return write(os.path.join(tmp, name), json.dumps(raw, ensure_ascii=False))


def config_with(world, tmp, **changes):
    with open(os.path.join(world.done, "args.json"), encoding="utf-8") as f:
        settings = json.load(f)
    settings.update(changes)
    settings.pop("out_dir")
    return ["--config", write(os.path.join(tmp, "args.json"), json.dumps(settings)), "--out-dir", os.path.join(tmp, "r")]


# ---- outputs that are inputs: refused before anything is read or written
case("evaluate --out is --predictions", evaluate, "--out {t}/p.json: is also --predictions {t}/p.json; writing it would "
                                                   "destroy that input")(
    lambda w, t: EVAL_ES + ["--predictions", copied(PRED_ES, t, "p.json"), "--out", os.path.join(t, "p.json")])
case("evaluate --out is --references", evaluate, "is also --references")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", copied(XQUAD_ES, t, "r.json"), "--predictions", PRED_ES,
                  "--out", os.path.join(t, "r.json")])
case("evaluate --out's details file is --predictions", evaluate,
     "--out {t}/m.json: its details file {t}/m.details.jsonl: is also --predictions")(
    lambda w, t: EVAL_ES + ["--predictions", copied(PRED_ES, t, "m.details.jsonl"), "--out", os.path.join(t, "m.json")])
case("evaluate --out is a link to --predictions", evaluate, "is also --predictions")(
    lambda w, t: EVAL_ES + ["--predictions", copied(PRED_ES, t, "p.json"), "--out", linked(os.path.join(t, "p.json"), t, "m.json")])
case("evaluate --out is a hard link to --references", evaluate, "is also --references")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", copied(XQUAD_ES, t, "r.json"), "--predictions", PRED_ES,
                  "--out", (os.link(os.path.join(t, "r.json"), os.path.join(t, "m.json")), os.path.join(t, "m.json"))[1]])
case("evaluate --out is --lid-model", evaluate, "is also --lid-model")(
    lambda w, t: EVAL_ES + ["--predictions", PRED_ES, "--lid-model", write(os.path.join(t, "lid.ftz"), b"model"),
                            "--out", os.path.join(t, "lid.ftz")])
case("translate --out-file is --train-file", translate_train, "--out-file {t}/s.json.gz: is also --train-file")(
    lambda w, t: TRANSLATE[:-4] + ["--train-file", copied(STANDIN, t, "s.json.gz"), "--tgt-lang", "fr", "--limit", "3",
                                   "--out-file", os.path.join(t, "s.json.gz")])
case("translate --out-file's progress file is --predictions", translate_train, "its progress file")(
    lambda w, t: ["--model", "tiny-nllb", "--data-dir", DATA_DIR, "--tgt-lang", "fr", "--predictions",
                  write(os.path.join(t, "o.json.progress.jsonl"), '{"a": "x"}'), "--out-file", os.path.join(t, "o.json")])
case("finetune --init inside --out-dir", finetune, "--init {t}/run/last: is inside --out-dir {t}/run, which this command writes")(
    lambda w, t: QUICK + ["--max-steps", "10", "--init", copy_run(w.done, t), "--out-dir", os.path.join(t, "run")])
case("finetune --train-file inside --out-dir", finetune, "--train-file {t}/run/train.json: is inside --out-dir {t}/run")(
    lambda w, t: QUICK + ["--max-steps", "10", "--train-file", copied(XQUAD_ES, copy_run(w.done, t), "train.json"),
                          "--out-dir", os.path.join(t, "run")])
case("pretrain_it --out-dir holds its text", pretrain_it, "--langs en: text {t}/text/en.txt: is inside --out-dir {t}")(
    lambda w, t: ["--model", "tiny-mt5", "--data-dir", DATA_DIR, "--langs", "en",
                  "--text-dir", os.path.dirname(copied(os.path.join(DATA_DIR, "text", "en.txt"),
                                                       os.path.dirname(write(os.path.join(t, "text", "x"), "")), "en.txt")),
                  "--out-dir", t])

# ---- every value of --config / args.json checked as on the command line
for label, changes, expected in [
        ("max_steps true", {"max_steps": True}, "max_steps: expected an integer >= 1, got 'true'"),
        ("max_steps false", {"max_steps": False}, "max_steps: expected an integer >= 1, got 'false'"),
        ("max_steps null", {"max_steps": None}, "max_steps: expected a value (default 20000), got null"),
        ("max_steps 10.5", {"max_steps": 10.5}, "max_steps: expected an integer >= 1, got '10.5'"),
        ("lr null", {"lr": None}, "lr: expected a value (default 0.0001), got null"),
        ("lr 'fast'", {"lr": "fast"}, "lr: expected a finite number > 0, got 'fast'"),
        ("lr [0.001]", {"lr": [0.001]}, "lr: expected a finite number > 0, got '[0.001]'"),
        ("seed -1", {"seed": -1}, "seed: must be an integer in [0, 4294967295], got -1"),
        ("eval_at_start 1", {"eval_at_start": 1}, "eval_at_start: expected true or false, got 1"),
        ("resume 'no'", {"resume": "no"}, "resume: expected true or false, got \"no\""),
        ("model 5", {"model": 5}, "model: expected a string, got 5"),
        ("method null", {"method": None}, "method: expected a value (default 'full'), got null"),
        ("method 'lora2'", {"method": "lora2"}, "method: invalid choice 'lora2'"),
        ("val_langs [1]", {"val_langs": [1]}, "val_langs: expected a list of strings, got [1]"),
        ("val_file 'th=x'", {"val_file": "th=x"}, "val_file: expected a list of strings, got \"th=x\""),
        ("max_new_tokens {}", {"max_new_tokens": {}}, "max_new_tokens: expected an integer >= 1, got '{}'")]:
    literal = expected.replace("{", "{{").replace("}", "}}")  # (the expected text is formatted with t=)
    case(f"finetune --config with {label}", finetune, f"argument --config: {{t}}/args.json: {literal}")(
        lambda w, t, changes=changes: config_with(w, t, **changes))
case("finetune --seed -1", finetune, "argument --seed: must be an integer in [0, 4294967295], got -1")(
    lambda w, t: QUICK + ["--seed=-1", "--out-dir", os.path.join(t, "r")])
case("finetune --seed 2**32", finetune, "argument --seed: must be an integer in [0, 4294967295], got 4294967296")(
    lambda w, t: QUICK + ["--seed", str(2 ** 32), "--out-dir", os.path.join(t, "r")])
case("pretrain_it --seed -3", pretrain_it, "argument --seed: must be an integer in [0, 4294967295], got -3")(
    lambda w, t: ["--model", "tiny-mt5", "--data-dir", DATA_DIR, "--seed=-3", "--out-dir", os.path.join(t, "r")])
case("study --seeds 0,x", study, "--seeds 0,x: expected an integer in [0, 4294967295], got 'x'")(
    lambda w, t: ["methods", "--dry-run", "--tiny", "--seeds", "0,x", "--out-dir", t])
case("cost --model that cost.py does not know", cost, "argument --model: invalid choice: 'no-such-model'")(
    lambda w, t: ["--model", "no-such-model"])
case("cost --task nope", cost, "argument --task: invalid choice: 'nope'")(lambda w, t: ["--task", "nope"])
case("cost an unknown flag", cost, "unrecognized arguments: --steps 5")(lambda w, t: ["--steps", "5"])

# ---- nothing to score is an error
case("evaluate references with no questions", evaluate, "--references {t}/empty.json: no qa examples in it; nothing to score")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", write(os.path.join(t, "empty.json"), '{"data": []}'),
                  "--predictions", PRED_ES])
case("evaluate an empty predictions object", evaluate, "--predictions {t}/p.json: no predictions in it; nothing to score")(
    lambda w, t: EVAL_ES + ["--predictions", write(os.path.join(t, "p.json"), "{}")])
case("evaluate an empty predictions file", evaluate, "--predictions {t}/p.jsonl: no predictions in it")(
    lambda w, t: EVAL_ES + ["--predictions", write(os.path.join(t, "p.jsonl"), "")])
case("evaluate every prediction id unknown", evaluate, "none of its 2 ids is an id of --references")(
    lambda w, t: EVAL_ES + ["--predictions", write(os.path.join(t, "p.json"), '{"q1": "a", "q2": "b"}')])
case("evaluate an XL-Sum references file with no records", evaluate, "no summarization examples in it")(
    lambda w, t: ["--task", "xlsum", "--lang", "fr", "--references", write(os.path.join(t, "french_test.jsonl"), "\n"),
                  "--predictions", write(os.path.join(t, "p.json"), '{"f1": "x"}')])
case("finetune --val-file with no questions", finetune, "{t}/v.json: no qa examples in it (val language th)")(
    lambda w, t: QUICK + ["--val-file", write(os.path.join(t, "v.json"), '{"data": []}'), "--out-dir", os.path.join(t, "r")])
case("finetune --test-file with no questions", finetune, "{t}/v.json: no qa examples in it (test language zh)")(
    lambda w, t: QUICK + ["--test-file", write(os.path.join(t, "v.json"), '{"data": []}'), "--out-dir", os.path.join(t, "r")])

# ---- records of the wrong type, and messages that name what the user gave
case("evaluate a SQuAD answer whose text is a number", evaluate, "qas[0]: question '56beb4343aeaaa14008c925b': answer text 5 is not a string")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", squad_with(t, "r.json", lambda q: q["answers"][0].update(text=5)),
                  "--predictions", PRED_ES])
case("evaluate a SQuAD answer that is a string, not an object", evaluate, "answers must be a list of objects")(
    lambda w, t: ["--task", "xquad", "--lang", "es", "--references", squad_with(t, "r.json", lambda q: q.update(answers=["x"])),
                  "--predictions", PRED_ES])
case("finetune a SQuAD answer whose text is null", finetune, "v.json: record data[0].paragraphs[0].qas[0]: question "
                                                              "'56beb4343aeaaa14008c925b': answer text null is not a string")(
    lambda w, t: QUICK + ["--val-file", squad_with(t, "v.json", lambda q: q["answers"][0].update(text=None)),
                          "--out-dir", os.path.join(t, "r")])
case("finetune a training answer whose text is a list", finetune, "t.json: record data[0].paragraphs[0].qas[0]")(
    lambda w, t: QUICK + ["--train-file", squad_with(t, "t.json", lambda q: q["answers"][0].update(text=["a"])),
                          "--out-dir", os.path.join(t, "r")])
case("evaluate jsonl prediction id null", evaluate, "p.jsonl:1: id null is not a string or an integer")(
    lambda w, t: EVAL_ES + ["--predictions", write(os.path.join(t, "p.jsonl"), '{"id": null, "prediction": "x"}\n')])
case("evaluate jsonl prediction id true", evaluate, "p.jsonl:2: id true is not a string or an integer")(
    lambda w, t: EVAL_ES + ["--predictions", write(os.path.join(t, "p.jsonl"), '{"id": "a", "prediction": "x"}\n'
                                                                               '{"id": true, "prediction": "y"}\n')])
case("finetune --train-lang el on mBART names --train-lang", finetune, "--train-lang: mbart has no language code for 'el'")(
    lambda w, t: QUICK + ["--model", "tiny-mbart", "--train-lang", "el", "--out-dir", os.path.join(t, "r")])
case("finetune a hub model offline", finetune, "--model google/mt5-small: not in the local hub cache")(
    lambda w, t: QUICK + ["--model", "google/mt5-small", "--max-steps", "10", "--out-dir", os.path.join(t, "r")])
case("pretrain_it a hub model offline", pretrain_it, "--model facebook/mbart-large-50: not in the local hub cache")(
    lambda w, t: ["--model", "facebook/mbart-large-50", "--data-dir", DATA_DIR, "--max-steps", "10", "--out-dir", os.path.join(t, "r")])
case("translate a hub model offline", translate_train, "--model facebook/nllb-200-distilled-600M: not in the local hub cache")(
    lambda w, t: ["--model", "facebook/nllb-200-distilled-600M"] + TRANSLATE[2:] + ["--limit", "3", "--out-file", os.path.join(t, "o.json")])
case("finetune an empty XL-Sum training file names it", finetune, "xlsum/english_train.jsonl: no summarization examples in it "
                                                                   "(training language en)")(
    lambda w, t: ["--model", "tiny-mt5", "--task", "xlsum", "--data-dir", DATA_DIR, "--xlsum-dir", xlsum_empty_train(t),
                  "--val-langs", "fr", "--test-langs", "fr", "--max-steps", "10", "--max-eval-examples", "2",
                  "--out-dir", os.path.join(t, "r")])
case("study without the XL-Sum files says which and how to get them", study,
     "the study's data is not all there: xlsum: 12 of its 13 files missing in ")(
    lambda w, t: ["all", "--tiny", "--data-dir", DATA_DIR, "--out-dir", os.path.join(t, "study")])

case("study it without the raw text names the missing languages", study,
     "the study's data is not all there: text: en, zh, fr, ko, ru, es, th, ro, vi, ar, de missing in {t}/data/text; "
     "python download.py --data-dir {t}/data --tasks text")(
    lambda w, t: ["it", "--tiny", "--data-dir", os.path.join(t, "data"), "--out-dir", os.path.join(t, "study")])


def xlsum_empty_train(tmp):
    folder = os.path.join(tmp, "xlsum")
    for split in ("val", "test"):
        write(os.path.join(folder, f"french_{split}.jsonl"), '{"id": "f1", "summary": "s", "text": "t"}\n')
    write(os.path.join(folder, "english_train.jsonl"), "")
    return folder


def truncated(run_dir, rel, keep="run", lines=None):
    """Cut a file to its first third, or to its first `lines` lines."""
    path = os.path.join(run_dir, rel)
    with open(path, "rb") as f:
        content = f.read()
    cut = b"".join(content.splitlines(keepends=True)[:lines]) if lines else content[: max(1, len(content) // 3)]
    with open(path, "wb") as f:
        f.write(cut)
    return path if keep == "path" else run_dir


def garbage(run_dir, rel):
    write(os.path.join(run_dir, rel), b"these bytes are not a pickle")
    return run_dir


def xlsum_with_latin1(tmp):
    folder = os.path.join(tmp, "xlsum")
    for split in ("train", "val", "test"):
        write(os.path.join(folder, f"french_{split}.jsonl"), '{"id": "f1", "summary": "s", "text": "t"}\n')
    write(os.path.join(folder, "english_train.jsonl"),
          b'{"id": "1", "summary": "s", "text": "t"}\n{"id": "2", "summary": "caf\xe9", "text": "t"}\n')
    return folder


def progress_missing_field(tmp):
    """A progress file whose header matches, then a line that lost its fields."""
    out = os.path.join(tmp, "o.json")
    settings = {"model": "tiny-nllb", "src": "en", "tgt": "fr", "beams": 4, "input": translate_train.file_digest(STANDIN),
                "limit": 3, "chunk_size": 64, "max_tokens": 4000, "ratio": 2.0, "offset": 10}
    write(out + ".progress.jsonl", json.dumps({"kind": "header", "settings": settings}) + "\n"
          + json.dumps({"kind": "sentence", "chunk": 0, "src": "Hello."}) + "\n")
    return out


# -----------------------------------------------------------------------------

def snapshot(root):
    """{path: (sha1 of the content, mode)} of every file below root."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[path] = (hashlib.sha1(f.read()).hexdigest(), os.stat(path).st_mode)
    return files


def stray_files(root):
    return [os.path.join(d, n) for d, dirs, names in os.walk(root) for n in names + dirs
            if n.startswith((".part-", ".tmp-", ".old-"))]


def test_the_table_has_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c.module for c in CASES.values()}) >= 8


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, capsys):
    case = CASES[name]
    argv = case.build(world, str(tmp_path))
    before = snapshot(tmp_path)
    code, out, err = run_cli(case.module, argv, capsys)
    expected = case.expected.format(t=tmp_path)
    assert "Traceback" not in err
    if case.warning:
        assert code == 0 and expected in out + err, (out, err)
    else:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code != 0 and len(errors) == 1, (code, err)
        assert expected in errors[0], errors[0]
    assert not stray_files(tmp_path)
    after = snapshot(tmp_path)
    assert {p: v for p, v in after.items() if p in before} == before  # nothing that existed was touched
    added = sorted(set(after) - set(before))
    if case.starts:  # only the new run's own record
        assert added and all(p.startswith(os.path.join(str(tmp_path), "r") + os.sep) for p in added), added
    else:
        assert not added, added  # a command refused before it began leaves nothing behind


def read_only_dir(path):
    """A directory nobody can write to, root included: a read-only bind mount (chmod for others)."""
    os.makedirs(path)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    if subprocess.run(["mount", "--bind", path, path]).returncode != 0 or \
            subprocess.run(["mount", "-o", "remount,ro,bind", path]).returncode != 0:
        pytest.skip("cannot make a read-only directory here (no bind mounts as root)")
    return lambda: subprocess.run(["umount", path])


@pytest.mark.parametrize("module,argv,flag", [
    (finetune, QUICK + ["--max-steps", "10", "--out-dir", "{ro}/run"], "--out-dir"),
    (translate_train, TRANSLATE + ["--limit", "3", "--out-file", "{ro}/o.json"], "--out-file"),
    (evaluate, ["--task", "xquad", "--lang", "es", "--references", XQUAD_ES, "--predictions", PRED_ES, "--out", "{ro}/m.json"],
     "--out"),
])
def test_read_only_output_is_refused_before_any_work(module, argv, flag, tmp_path, capsys):
    ro = str(tmp_path / "ro")
    undo = read_only_dir(ro)
    try:
        code, _, err = run_cli(module, [a.format(ro=ro) for a in argv], capsys)
    finally:
        undo()
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert flag in err and "is not writable" in err and "Traceback" not in err
    assert os.listdir(ro) == []


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_get_the_mode_the_umask_gives(umask, file_mode, dir_mode, tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the result must be readable as the
    umask says, as open() and mkdir() would make it, so that a team can read each other's runs."""
    old = os.umask(umask)
    try:
        import common
        common.write_json(str(tmp_path / "a.json"), {"x": 1})
        checkpoint = common.make_temp_dir(str(tmp_path), ".tmp-x-")
        with open(tmp_path / "plain", "w"):
            pass
        os.mkdir(tmp_path / "plain-dir")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == file_mode == os.stat(tmp_path / "plain").st_mode & 0o777
    assert os.stat(checkpoint).st_mode & 0o777 == dir_mode == os.stat(tmp_path / "plain-dir").st_mode & 0o777


def test_a_run_directory_written_by_finetune_is_readable_by_the_group(world):
    for path in (os.path.join(world.done, "results.json"), os.path.join(world.done, "args.json"),
                 os.path.join(world.done, "last")):
        assert os.stat(path).st_mode & 0o044 == 0o044, path  # the default umask 022 gives group and others read


# -----------------------------------------------------------------------------
# One process per run directory and per study directory (common.DirectoryLock); Ctrl-C; a full disk

import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402
import launch  # noqa: E402
import loop  # noqa: E402
from conftest import FIXTURES, REPO  # noqa: E402


def wait_for(condition, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def start_finetune(argv, tmp_path, name):
    """finetune.py as a user starts it from a terminal, in its own process; its stderr goes to a file.
    SIGINT (Ctrl-C) gets its default action there. A suite started as a background job (`pytest &`,
    a script's `cmd &`) runs with SIGINT ignored; a child inherits that, and Python in a process
    that starts with SIGINT ignored never raises KeyboardInterrupt."""
    err = open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "finetune.py")] + argv, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, tmp_path / f"{name}.err"


def lock_pid(run_dir):
    try:
        with open(os.path.join(run_dir, common.LOCK_NAME)) as f:
            return f.read().split()[1]
    except (OSError, IndexError):
        return None


def hold_lock(directory):
    """Another process holding `directory`'s lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time, common; common.DirectoryLock(sys.argv[1], '--out-dir')"
                             ".__enter__(); print('held', flush=True); time.sleep(600)", str(directory)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_finetunes_on_one_directory_ctrl_c_and_a_killed_holder(tmp_path, capsys):
    """One directory, four processes: A trains; B, started while A runs, exits at once naming A's
    pid; Ctrl-C ends A with one line and status 130; C resumes and is SIGKILLed (its lock file
    stays, stale); D resumes through the stale lock to the end."""
    run = str(tmp_path / "run")
    # A cannot finish before Ctrl-C stops it, however slow the machine: a run of 100,000 steps
    argv = QUICK + ["--eval-every", "20", "--max-steps", "100000", "--out-dir", run]
    a, a_err = start_finetune(argv, tmp_path, "a")
    try:
        wait_for(lambda: os.path.isdir(os.path.join(run, "last")), "A's first checkpoint")
        assert lock_pid(run) == str(a.pid)
        code, _, err = run_cli(finetune, argv, capsys)
        assert code == 1 and error_lines(err) == [f"error: --out-dir {run}: in use by another process (pid {a.pid} on host "
                                                  f"{socket.gethostname()}, since {error_lines(err)[0].split('since ')[1]}"]
        assert a.poll() is None  # B stopped while A goes on
        a.send_signal(signal.SIGINT)
        assert a.wait(timeout=120) == 130
    finally:
        a.kill()
    a_lines = [line for line in a_err.read_text().replace("\r", "\n").splitlines() if line.strip()]
    assert a_lines[-1] == "interrupted; resume with --resume" and "Traceback" not in a_err.read_text()
    assert not os.path.exists(os.path.join(run, common.LOCK_NAME))  # a clean exit removes its lock file
    assert not stray_files(run)

    c, _ = start_finetune(argv + ["--resume"], tmp_path, "c")
    try:
        wait_for(lambda: lock_pid(run) == str(c.pid), "C's lock")
        time.sleep(2)
        c.kill()
        c.wait(timeout=60)
    finally:
        c.kill()
    assert lock_pid(run) == str(c.pid)  # the file stays behind a SIGKILL; the kernel released the lock
    end = loop.load_train_state(os.path.join(run, "last"))["step"] + 20  # D: one more evaluation, then done
    code, _, err = run_cli(finetune, QUICK + ["--eval-every", "20", "--max-steps", str(end), "--resume", "--out-dir", run],
                           capsys)
    assert code == 0, err
    assert common.read_json(os.path.join(run, "results.json"))["config"]["max_steps"] == end


def test_a_study_directory_in_use_is_refused_and_its_runs_are_not_started(tmp_path, capsys):
    study_dir = tmp_path / "study"
    holder = hold_lock(study_dir)
    try:
        code, _, err = run_cli(study, ["guard", "--tiny", "--data-dir", DATA_DIR, "--xlsum-dir", FIXTURES,
                                       "--out-dir", str(study_dir)], capsys)
        assert code == 1 and len(error_lines(err)) == 1, err
        assert f"--out-dir {study_dir}: in use by another process (pid {holder.pid} on host " in error_lines(err)[0]
        assert os.listdir(study_dir) == [common.LOCK_NAME]  # the holder's; nothing else was written
    finally:
        holder.kill()
        holder.wait()
    # a run directory whose lock is held (e.g. a finetune.py started by hand) is never started by a stage
    run_dir = tmp_path / "runs" / "r"
    holder = hold_lock(run_dir)
    try:
        launcher = launch.Launcher(study.parse_args(["guard", "--out-dir", str(tmp_path)]), str(tmp_path))
        marker = tmp_path / "ran"
        launcher.execute([launch.Run(str(run_dir), [sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                                     str(run_dir / "results.json"))])
    finally:
        holder.kill()
        holder.wait()
    assert not marker.exists() and sorted(os.listdir(run_dir)) == [common.LOCK_NAME]
    assert [m for _, m in launcher.failures] == [f"LOCKED: runs/r is in use by pid {holder.pid} on host "
                                                 f"{socket.gethostname()}, since {launcher.failures[0][1].split('since ')[1]}"]


def test_a_missing_launch_command_fails_once_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAUNCH", "no-such-sbatch --gres=gpu:1 --wrap")
    code, out, err = run_cli(study, ["guard", "--tiny", "--data-dir", DATA_DIR, "--xlsum-dir", FIXTURES,
                                     "--out-dir", str(tmp_path / "study")], capsys)
    assert code == 1 and error_lines(err) == ["error: LAUNCH='no-such-sbatch --gres=gpu:1 --wrap': command 'no-such-sbatch' "
                                              "not found on PATH; nothing was submitted"]
    assert "SUBMIT" not in out and not (tmp_path / "study").exists()


def test_a_killed_lock_holder_does_not_block_and_a_live_one_does(tmp_path):
    holder = hold_lock(tmp_path / "d")
    assert common.lock_holder(str(tmp_path / "d")).startswith(f"pid {holder.pid} on host ")
    with pytest.raises(common.UsageError, match=f"in use by another process \\(pid {holder.pid} "):
        common.DirectoryLock(str(tmp_path / "d"), "--out-dir").__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert common.lock_holder(str(tmp_path / "d")) is None and os.path.exists(tmp_path / "d" / common.LOCK_NAME)
    with common.DirectoryLock(str(tmp_path / "d"), "--out-dir"):
        assert common.lock_holder(str(tmp_path / "d")).startswith(f"pid {os.getpid()} ")
    assert os.listdir(tmp_path / "d") == []
    with common.DirectoryLock(str(tmp_path / "new" / "run"), "--out-dir"):  # made for the lock: removed with it
        assert os.path.isdir(tmp_path / "new" / "run")
    assert os.listdir(tmp_path) == ["d"]


def small_filesystem(path, size_bytes):
    """A real filesystem of `size_bytes` (tmpfs) at path: a full disk that is not simulated."""
    os.makedirs(path)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    return lambda: subprocess.run(["umount", path])


def tree_size(path):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def test_a_full_disk_while_saving_a_checkpoint_leaves_the_old_ones_and_no_temporary_directory(world, tmp_path, capsys):
    disk = str(tmp_path / "disk")
    room = tree_size(world.stopped) + 4 * 2 ** 20  # the run, and 4 MB: less than either checkpoint needs
    undo = small_filesystem(disk, room + 2 ** 20)
    try:
        run = copy_run(world.stopped, disk)
        before = {p: v for p, v in snapshot(run).items() if f"{os.sep}last{os.sep}" in p or f"{os.sep}best{os.sep}" in p}
        code, _, err = run_cli(finetune, QUICK + ["--max-steps", "20", "--resume", "--out-dir", run], capsys)
        after = snapshot(run)
        leftovers = stray_files(disk)
    finally:
        undo()
    assert code == 1 and "Traceback" not in err and len(error_lines(err)) == 1, err
    assert f"error: {run}: cannot write the " in error_lines(err)[0]
    assert "No space left on device" in error_lines(err)[0] and "continue with --resume" in error_lines(err)[0]
    assert leftovers == []
    assert {p: after[p] for p in before} == before  # last/ and best/ as they were: the run can resume from step 10


def test_a_write_interrupted_by_a_signal_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C, or a SIGTERM that stops a validation (loop.Terminated), while common.write_json writes
    a file: the previous file stays whole and no .part-* file is left beside it (before: the
    temporary stayed, a full disk's OSError alone removed it)."""
    path = tmp_path / "eval.json"
    common.write_json(str(path), {"step": 10})

    def interrupted(*args, **kwargs):
        raise loop.Terminated()
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(loop.Terminated):
        common.write_json(str(path), {"step": 20})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 10} and stray_files(str(tmp_path)) == []


def test_config_values_that_the_command_line_would_accept_are_accepted(world, tmp_path):
    """The strict --config check keeps what a saved args.json holds: numbers, strings of numbers,
    lists for the comma-separated and repeatable flags, null where the flag's default is null."""
    argv = config_with(world, str(tmp_path), max_steps="10", lr=0.001, val_langs=["th"], val_file=None, init=None,
                       eval_at_start=False)
    args = finetune.parse_args(argv)
    assert (args.max_steps, args.lr, args.val_langs, args.val_file, args.eval_at_start) == (10, 0.001, ["th"], None, False)
