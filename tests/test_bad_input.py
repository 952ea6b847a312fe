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
import gzip
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
from conftest import DATA_DIR, run_cli

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
case("finetune --grad-clip -1", finetune, "argument --grad-clip: must be a finite number >= 0")(
    lambda w, t: QUICK + ["--grad-clip=-1", "--out-dir", os.path.join(t, "r")])
case("finetune --weight-decay nan", finetune, "argument --weight-decay: must be a finite number >= 0, got nan")(
    lambda w, t: QUICK + ["--weight-decay", "nan", "--out-dir", os.path.join(t, "r")])
case("finetune --lr inf", finetune, "argument --lr: must be a finite number > 0, got inf")(
    lambda w, t: QUICK + ["--lr", "inf", "--out-dir", os.path.join(t, "r")])
case("finetune --lr abc", finetune, "argument --lr: expected a finite number > 0, got 'abc'")(
    lambda w, t: QUICK + ["--lr", "abc", "--out-dir", os.path.join(t, "r")])
case("finetune --adam-beta2 1", finetune, "argument --adam-beta2: must be a number in [0, 1)")(
    lambda w, t: QUICK + ["--adam-beta2", "1", "--out-dir", os.path.join(t, "r")])
case("finetune --update-freq 0", finetune, "argument --update-freq: must be an integer >= 1")(
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
                "ratio": 2.0, "offset": 10}
    write(out + ".progress.jsonl", json.dumps({"kind": "header", "settings": settings}) + "\n"
          + json.dumps({"kind": "sentence", "src": "Hello."}) + "\n")
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
