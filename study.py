"""The paper's protocol (Section 3 and Appendix A), automated: which runs, in which order, at which LR.

    bash run_all.sh --out-dir study                          # the whole study, on the local GPU
    bash run_all.sh --tiny --data-dir ../shared/data --xlsum-dir tests/fixtures/xlsum --out-dir study-tiny
    LAUNCH="sbatch --gres=gpu:1 --wrap" bash run_all.sh --out-dir study     # dispatch to a cluster
    bash run_all.sh --dry-run                                # print every command of the study
    python study.py methods --out-dir study                  # one stage

Stages (`python study.py all` runs them in this order; STAGES below is the one place it is written):
  it         intermediate tuning (Prefix-LM) of every model, once per model
  lr-search  per task x model, the LR search for full finetuning, adapters and prompt tuning,
             without IT: {1e-3, 1e-4, 1e-5}, extended to 1e-2, 1e-1 or 1e-6, 1e-7 while the average
             non-English validation metric improves, then 3*10^-k* for full finetuning -> the PLR
  methods    per task x model x method, the best of {PLR, 10*PLR} x {without IT, with IT}
             (freeze, mix and multisrc use full finetuning's PLR; multisrc is XL-Sum only)
  translate  translate-train: the English training data translated into each test language
             (NLLB-3.3B), then full finetuning on it at full finetuning's chosen setting
  large      the LR search of full finetuning for mT5-large
  report     report.py: the tables and figures

Every run is one command and is skipped when its results exist, so a stage can be rerun at will.
With LAUNCH set, a stage submits `LAUNCH '<command>'` for all its runs at once and waits for each
run's status.json before deciding what comes next; without it, runs go one after another here.
A failed run is reported with its log path and the stage goes on (a missing result never wins);
a search in which every run failed gives no PLR, and the runs that depend on it are not launched.
The study exits with status 1 when any run failed, after finishing everything it can.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time

import adapt
import common
import data

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"mt5-base": "google/mt5-base", "mbart-pt": "facebook/mbart-large-50",
          "mbart-tr": "facebook/mbart-large-50-many-to-many-mmt", "nllb-600m": "facebook/nllb-200-distilled-600M"}
LARGE_MODELS = {"mt5-large": "google/mt5-large"}
TASKS = data.FINETUNE_TASKS
SEARCH_METHODS = ("full", "adapters", "prompt")
TRANSLATOR = "facebook/nllb-200-3.3B"


def rank(score):
    """Sort key of a validation score: a missing score (failed or unfinished run) never wins."""
    return -math.inf if score is None else score


def load_results(run_dir):
    """A run's results.json, or None if it has none (not run, failed, or still running)."""
    path = os.path.join(run_dir, "results.json")
    return common.read_json(path, "results.json") if os.path.isfile(path) else None


# -----------------------------------------------------------------------------
# The LR-selection rule (Appendix A, "Hyperparameter search")

def select_lr(scores, method, grid=(3, 4, 5), k_range=(1, 7)):
    """Next LRs to try, or the chosen preliminary LR (PLR).

    scores: {lr: average non-English validation metric, or None for a failed/missing run}.
    Returns ("run", [lrs]), ("done", plr), or ("failed", None) when every run of the search failed
    (there is nothing to choose from: walking on to smaller LRs would report noise as the PLR). The rule:
      1. try 10^-k for k in `grid`;
      2. k* = the best power of ten tried (ties: the smaller LR); if k* is the largest LR tried
         and k* > k_range[0], try 10^-(k*-1); if it is the smallest and k* < k_range[1], try
         10^-(k*+1) -- i.e. extend while the metric improves;
      3. full finetuning only: then try 3 * 10^-k*; PLR = the better of 10^-k* and 3 * 10^-k*.
    """
    pending = [_lr(1, k) for k in grid if not _tried(scores, _lr(1, k))]
    if pending:
        return "run", pending
    if all(score is None for score in scores.values()):
        return "failed", None
    powers = {lr: s for lr, s in scores.items() if _is_power_of_ten(lr)}
    best_lr = _best(powers)
    k_best = round(-math.log10(best_lr))
    tried_k = sorted(round(-math.log10(lr)) for lr in powers)
    if k_best == tried_k[0] and k_best > k_range[0]:
        return "run", [_lr(1, k_best - 1)]
    if k_best == tried_k[-1] and k_best < k_range[1]:
        return "run", [_lr(1, k_best + 1)]
    if method != "full":
        return "done", best_lr
    three = _lr(3, k_best)
    if not _tried(scores, three):
        return "run", [three]
    return "done", _best({best_lr: scores[best_lr], three: scores[_key(scores, three)]})


def _lr(mantissa, k):
    """mantissa * 10^-k as the float its decimal spelling gives (3e-4, not 3.0000000000000003e-4)."""
    return float(f"{mantissa}e-{k}")


def _key(scores, lr):
    return next(x for x in scores if math.isclose(x, lr, rel_tol=1e-9))


def _tried(scores, lr):
    return any(math.isclose(x, lr, rel_tol=1e-9) for x in scores)


def _is_power_of_ten(lr):
    return math.isclose(10.0 ** round(math.log10(lr)), lr, rel_tol=1e-9)


def _best(scores):
    """The LR with the highest score; a missing score never wins; ties go to the smaller LR."""
    return max(sorted(scores), key=lambda lr: rank(scores[lr]))


def assumed_score(lr):
    """For --dry-run: a made-up metric peaking at 1e-4, so the plan shows the search's usual course."""
    return -abs(math.log10(lr) + 4)


# -----------------------------------------------------------------------------
# Runs: one command each, one directory each

class Study:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out_dir)
        self.data_dir = os.path.abspath(args.data_dir)
        self.xlsum_dir = os.path.abspath(args.xlsum_dir or os.path.join(self.data_dir, "xlsum"))
        self.python = sys.executable
        if args.tiny:
            self.models = {"tiny-mt5": "tiny-mt5", "tiny-nllb": "tiny-nllb"}
            self.large = {}
            self.grid, self.k_range = (2, 3), (2, 3)
        else:
            self.models, self.large = dict(MODELS), dict(LARGE_MODELS)
            self.grid, self.k_range = (3, 4, 5), (1, 7)
        self.printed = set()  # --dry-run: each run is printed once, by the first stage that needs it
        self.failures = []    # (run directory, what happened), reported at the end; the exit status
        self.plan_path = os.path.join(self.out, "plan.json")
        self.plan = common.read_json(self.plan_path, "plan.json") if os.path.isfile(self.plan_path) else {}

    # ---- commands ----
    def finetune_argv(self, task, model, method, lr, it, train_file=None, train_lang=None):
        argv = [self.python, os.path.join(HERE, "finetune.py"), "--model", self.all_models()[model],
                "--task", task, "--method", method, "--lr", f"{lr:g}", "--data-dir", self.data_dir,
                "--xlsum-dir", self.xlsum_dir, "--out-dir", self.run_dir(task, model, method, lr, it, train_lang)]
        if it:
            argv += ["--init", self.it_dir(model)]
        if train_file:
            argv += ["--train-file", train_file, "--train-lang", train_lang]
        if method == "multisrc":
            argv += ["--src-langs", "en,es" if self.args.tiny else ",".join(data.TASKS[task].source_langs)]
        if self.args.tiny:
            argv += ["--max-steps", "20", "--eval-every", "10", "--warmup-steps", "5", "--max-tokens", "1500",
                     "--max-train-examples", "400", "--max-eval-examples", "6", "--max-new-tokens", "8",
                     "--prompt-length", "10", "--log-every", "10"]
        return argv

    def it_argv(self, model):
        argv = [self.python, os.path.join(HERE, "pretrain_it.py"), "--model", self.all_models()[model],
                "--data-dir", self.data_dir, "--out-dir", self.it_dir(model)]
        if self.args.tiny:
            argv += ["--max-steps", "40", "--eval-every", "20", "--warmup-steps", "5", "--max-tokens", "1500",
                     "--lr", "3e-3", "--num-samples", "1", "--max-new-tokens", "8", "--log-every", "10"]
        return argv

    def all_models(self):
        return {**self.models, **self.large}

    def run_dir(self, task, model, method, lr, it, train_lang=None):
        name = f"{method}-lr{lr:g}" + ("-it" if it else "") + (f"-train_{train_lang}" if train_lang else "")
        return os.path.join(self.out, "runs", task, model, name)

    def it_dir(self, model):
        return os.path.join(self.out, "runs", "it", model)

    # ---- bookkeeping ----
    def record(self, run_dir, **meta):
        self.plan[run_dir] = meta
        if not self.args.dry_run:
            common.write_json(self.plan_path, self.plan)

    def val_metric(self, run_dir):
        """The run's selection metric (average non-English validation metric), None if it has none."""
        if self.args.dry_run:
            return assumed_score(self.plan[run_dir]["lr"]) + (0.1 if self.plan[run_dir].get("it") else 0.0)
        results = load_results(run_dir)
        return None if results is None else results.get("best_val_metric")

    # ---- execution ----
    def execute(self, runs):
        """runs: [(run_dir, argv, done_path)]. Launch those not done; wait for all; report failures."""
        todo = [(d, argv, done) for d, argv, done in runs if not os.path.exists(done)]
        for d, argv, done in runs:
            if os.path.exists(done) and not self.args.dry_run:
                print(f"skip (done)  {os.path.relpath(d, self.out)}")
        launch = os.environ.get("LAUNCH", "").strip()
        for d, argv, done in todo:
            wrapped = [self.python, os.path.join(HERE, "study.py"), "exec", "--run-dir", d, "--done", done, "--"] + argv
            line = shlex.join(wrapped)
            command = f"{launch} {shlex.quote(line)}" if launch else line
            if self.args.dry_run:
                if d not in self.printed:
                    self.printed.add(d)
                    print(f"RUN {command}")
                continue
            print(f"run  {os.path.relpath(d, self.out)}", flush=True)
            os.makedirs(d, exist_ok=True)
            _remove(os.path.join(d, "status.json"))
            if launch:
                subprocess.run(command, shell=True, check=False)
            else:
                subprocess.run(wrapped, check=False)
        if self.args.dry_run:
            return
        if launch:
            self.wait([d for d, _, _ in todo])
        for d, _, done in todo:
            status = _read_status(d)
            if not os.path.exists(done):
                code = status.get("returncode") if status else "?"
                self.fail(d, f"FAILED (exit {code}): {os.path.relpath(d, self.out)} -- log: {os.path.join(d, 'run.log')}")

    def fail(self, run_dir, message):
        print(message, flush=True)
        self.failures.append((run_dir, message))

    def wait(self, run_dirs):
        waiting = set(run_dirs)
        while waiting:
            waiting = {d for d in waiting if _read_status(d) is None}
            if waiting:
                print(f"waiting for {len(waiting)} run(s)...", flush=True)
                time.sleep(self.args.poll_seconds)


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


def _read_status(run_dir):
    path = os.path.join(run_dir, "status.json")
    return common.read_json(path, "status.json") if os.path.isfile(path) else None


# -----------------------------------------------------------------------------
# Stages

def stage_it(study):
    runs = []
    for model in study.models:
        d = study.it_dir(model)
        study.record(d, stage="it", model=model)
        runs.append((d, study.it_argv(model), os.path.join(d, "results.json")))
    study.execute(runs)


def search_combos(models, methods=SEARCH_METHODS):
    return [(task, model, method) for task in TASKS for model in models for method in methods]


def stage_lr_search(study, models=None, methods=SEARCH_METHODS, execute=True):
    """Rounds: ask select_lr for each (task, model, method), launch all next LRs, wait, repeat.
    Returns {(task, model, method): PLR} for the searches that found one. With execute=False
    (later stages re-deriving the PLRs) nothing is launched."""
    combos = search_combos(models or study.models, methods)
    plr, failed = {}, {}
    while True:
        runs = []
        for task, model, method in combos:
            if (task, model, method) in plr or (task, model, method) in failed:
                continue
            scores, dirs = {}, {}
            for d, meta in study.plan.items():
                if meta.get("stage") == "lr-search" and (meta["task"], meta["model"], meta["method"]) == (task, model, method):
                    scores[meta["lr"]], dirs[meta["lr"]] = study.val_metric(d), d
            decision, value = select_lr(scores, method, study.grid, study.k_range)
            if decision == "done":
                plr[(task, model, method)] = value
                continue
            if decision == "failed":
                failed[(task, model, method)] = sorted(dirs.values())
                continue
            for lr in value:
                d = study.run_dir(task, model, method, lr, False)
                study.record(d, stage="lr-search", task=task, model=model, method=method, lr=lr, it=False)
                runs.append((d, study.finetune_argv(task, model, method, lr, False), os.path.join(d, "results.json")))
        if not runs:
            break
        if execute:
            study.execute(runs)
        elif not study.args.dry_run:
            raise common.UsageError(f"the LR search is not finished ({len(runs)} runs to go); run the lr-search stage first")
    if execute:
        for (task, model, method), lr in sorted(plr.items()):
            print(f"PLR {task:<6} {model:<10} {method:<9} {lr:g}")
        for (task, model, method), dirs in sorted(failed.items()):
            logs = ", ".join(os.path.join(d, "run.log") for d in dirs)
            study.fail(None, f"NO PLR {task} {model} {method}: every run of the search failed; logs: {logs}")
    return plr


def chosen_plr(task, model, method, plr):
    """Full finetuning's PLR serves freeze, mix and multisrc (they also train all or most weights);
    None when the search it comes from found none."""
    return plr.get((task, model, method if method in SEARCH_METHODS else "full"))


def stage_methods(study):
    plr = stage_lr_search(study, execute=False)  # the PLRs found by the lr-search stage
    runs, configs = [], {}
    for task in TASKS:
        for model in study.models:
            for method in adapt.methods_for(task):
                base = chosen_plr(task, model, method, plr)
                if base is None:
                    source = method if method in SEARCH_METHODS else "full"
                    print(f"skip {task} {model} {method}: no PLR (every run of the {source} search failed)")
                    continue
                for lr in (base, float(f"{10 * base:g}")):
                    for it in (False, True):
                        d = study.run_dir(task, model, method, lr, it)
                        stage = study.plan.get(d, {}).get("stage", "methods")
                        study.record(d, stage=stage, task=task, model=model, method=method, lr=lr, it=it, plr=base)
                        configs.setdefault((task, model, method), []).append(d)
                        runs.append((d, study.finetune_argv(task, model, method, lr, it), os.path.join(d, "results.json")))
    study.execute(runs)
    chosen = {}
    for (task, model, method), dirs in configs.items():
        best = max(dirs, key=lambda d: rank(study.val_metric(d)))
        chosen[f"{task}/{model}/{method}"] = {"run": best, "lr": study.plan[best]["lr"], "it": study.plan[best]["it"],
                                              "plr": study.plan[best]["plr"], "val_metric": study.val_metric(best)}
    if not study.args.dry_run:
        common.write_json(os.path.join(study.out, "chosen.json"), chosen)
    return chosen


def translated_file(study, task, lang):
    ext = "json" if task == "xquad" else "jsonl"
    return os.path.join(study.out, "translated", f"{task}.{lang}.{ext}")


def stage_translate(study):
    chosen_path = os.path.join(study.out, "chosen.json")
    chosen = stage_methods(study) if study.args.dry_run else common.read_json(chosen_path, "chosen.json")
    tiny = study.args.tiny
    translator = "tiny-nllb" if tiny else TRANSLATOR
    runs, finetunes = [], []
    for task in TASKS:
        langs = ["es"] if tiny else list(data.TASKS[task].test_langs)
        source = data.task_file(task, "train", "en", study.data_dir, study.xlsum_dir)
        for lang in langs:
            out = translated_file(study, task, lang)
            argv = [study.python, os.path.join(HERE, "translate_train.py"), "--model", translator, "--task", task,
                    "--train-file", source, "--tgt-lang", lang, "--out-file", out, "--data-dir", study.data_dir]
            if tiny:
                argv += ["--limit", "60", "--max-length-ratio", "1.0"]
            d = os.path.join(study.out, "runs", "translate", f"{task}.{lang}")
            study.record(d, stage="translate-data", task=task, lang=lang, translator=translator)
            runs.append((d, argv, out))
            for model in (["tiny-mt5"] if tiny else study.models):
                best = chosen.get(f"{task}/{model}/full")
                if best is None:
                    continue
                d = study.run_dir(task, model, "full", best["lr"], best["it"], train_lang=lang)
                study.record(d, stage="translate-train", task=task, model=model, method="full", lr=best["lr"],
                             it=best["it"], train_lang=lang)
                argv = study.finetune_argv(task, model, "full", best["lr"], best["it"], train_file=out, train_lang=lang)
                argv += ["--test-langs", lang]
                finetunes.append((d, argv, os.path.join(d, "results.json")))
    study.execute(runs)
    study.execute(finetunes)


def stage_large(study):
    if not study.large:
        print("large: no large model in this configuration (--tiny); skipped")
        return
    stage_lr_search(study, models=study.large, methods=("full",))


def stage_report(study):
    """report.py, as its own process: it reads only what the stages wrote into the study directory."""
    if study.args.dry_run:
        print(f"report: would write tables and figures into {os.path.join(study.out, 'report')}")
        return
    code = subprocess.run([study.python, os.path.join(HERE, "report.py"), "--out-dir", study.out]).returncode
    if code != 0:
        study.fail(None, f"FAILED (exit {code}): report.py --out-dir {study.out}")


# The order of the study: each stage decides its runs from the results of the ones before it.
STAGES = {"it": stage_it, "lr-search": stage_lr_search, "methods": stage_methods, "translate": stage_translate,
          "large": stage_large, "report": stage_report}


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="stage", required=True)
    for name in list(STAGES) + ["all"]:
        s = sub.add_parser(name, help=f"run the {name} stage" if name != "all" else "every stage, in order")
        s.add_argument("--out-dir", default="study", help="where runs, plan.json, chosen.json and the report go")
        s.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="data directory (download.py's layout)")
        s.add_argument("--xlsum-dir", default=None, help="XL-Sum jsonl files (default DATA_DIR/xlsum)")
        s.add_argument("--tiny", action="store_true", help="tiny models, offline data, CPU-sized runs")
        s.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
        s.add_argument("--poll-seconds", type=common.positive_float, default=30, help="with LAUNCH: how often to check on runs")
    ex = sub.add_parser("exec", help="(internal) run one command, logging to RUN_DIR/run.log and status.json")
    ex.add_argument("--run-dir", required=True)
    ex.add_argument("--done", required=True)
    ex.add_argument("command", nargs="...")
    return p.parse_args(argv)


def exec_run(args):
    """Run one command with its output in run.log, then write status.json (what a stage waits for)."""
    os.makedirs(args.run_dir, exist_ok=True)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.time()
    with open(os.path.join(args.run_dir, "run.log"), "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    status = {"returncode": code, "seconds": round(time.time() - start, 1), "done": os.path.exists(args.done)}
    common.write_json(os.path.join(args.run_dir, "status.json"), status)
    return code


@common.exits_on_error
def main(args):
    if args.stage == "exec":
        sys.exit(exec_run(args))
    study = Study(args)
    common.print_settings({k: v for k, v in vars(args).items() if k != "stage"} | {"LAUNCH": os.environ.get("LAUNCH", "")})
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    for name in stages:
        print(f"== stage {name} ==", flush=True)
        STAGES[name](study)
    if study.failures:
        print(f"{len(study.failures)} failure(s):")
        for _, message in study.failures:
            print(f"  {message}")
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
