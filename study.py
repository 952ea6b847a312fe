"""The paper's protocol (Section 3 and Appendix A), automated: which runs, in which order, at which LR.

    bash run_all.sh --out-dir study                          # the whole study, on the local GPU
    bash run_all.sh --tiny --data-dir ../shared/data --xlsum-dir tests/fixtures/xlsum --out-dir study-tiny
    LAUNCH="sbatch --gres=gpu:1 --wrap" bash run_all.sh --out-dir study     # dispatch to a cluster
    bash run_all.sh --dry-run                                # print every command of the study
    python study.py methods --out-dir study                  # one stage

Stages (`python study.py all` runs them in this order; STAGES below is the one place it is written):
  guard      each model learns to reproduce a few English examples through the real generation,
             clean-up and scoring path (F1 >= 90, ROUGE-2 >= 80), or the study reports it broken
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
Without LAUNCH, runs go one after another here. With LAUNCH, a stage submits `LAUNCH '<command>'`
for all its runs at once and watches them before deciding what comes next.

Runs on a cluster. Each command runs inside `study.py exec`, which leaves in the run directory:

    run.log          the command's output (appended, one `$ command` line per attempt)
    submission.json  attempt number, the scheduler's job id (sbatch's "Submitted batch job N")
    started.json     host, pid, job id: the job has started
    heartbeat        touched every few seconds while the command runs
    status.json      exit status and whether the run is done: the command has ended
    attempts.jsonl   the status of every attempt that ended, one line each

A stage reads them at every poll: status.json says done, stopped (exit 0 before the end: a chunk of
--chunk-steps) or failed; a started run whose heartbeat is older than --heartbeat-timeout, or whose
job the scheduler reports ended (cancelled, timed out, preempted, out of memory, node failure)
without a status, is dead. Stopped runs are resubmitted with --resume; dead and failed ones too, at
most --max-retries times, then reported failed with their log. A submission the launcher refuses
(bad partition, quota, no sbatch) is reported at once with the scheduler's message. No wait is
endless: a stage gives up on what is not finished after --max-wait hours, and prints what it is
waiting for (running, queued, done, failed) at most once a minute.
A failed run is reported with its log path and the stage goes on (a missing result never wins);
a search in which every run failed gives no PLR, and the runs that depend on it are not launched.
The study exits with status 1 when any run failed, after finishing everything it can.
"""

import collections
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import socket
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

    # ---- execution: see "Runs on a cluster" below ----
    def execute(self, runs):
        """runs: [Run]. Launch those not done, watch them until each is done or has failed for good,
        resubmitting dead, killed, failed and stopped ones with --resume; report failures."""
        runs = [run if isinstance(run, Run) else Run(*run) for run in runs]
        todo = [run for run in runs if not os.path.exists(run.done)]
        if not self.args.dry_run:
            for run in runs:
                if run not in todo:
                    print(f"skip (done)  {os.path.relpath(run.dir, self.out)}")
        if self.args.dry_run:
            for run in todo:
                if run.dir not in self.printed:
                    self.printed.add(run.dir)
                    print(f"RUN {self.launch_line(run, first=True)}")
            return
        pending = []
        for run in todo:
            if alive(run.dir, self.args.heartbeat_timeout):  # started by an earlier invocation, still running
                print(f"running (started earlier)  {os.path.relpath(run.dir, self.out)}", flush=True)
                run.attempts = 1
                pending.append(run)
            elif self.submit(run):
                pending.append(run)
        self.watch(pending)

    def command(self, run):
        """The run's command for its next attempt: --resume once it has a checkpoint, and a step
        budget per job when --chunk-steps is set."""
        argv = list(run.argv)
        if run.resumable and os.path.isdir(os.path.join(run.dir, "last")):
            argv.append("--resume")
        if run.resumable and self.args.chunk_steps:
            argv += ["--stop-after-steps", str(self.args.chunk_steps)]
        return argv

    def launch_line(self, run, first=False):
        wrapped = [self.python, os.path.join(HERE, "study.py"), "exec", "--run-dir", run.dir, "--done", run.done,
                   "--heartbeat-seconds", f"{self.heartbeat_seconds():g}", "--"] + (
                       run.argv if first else self.command(run))
        if first and run.resumable and self.args.chunk_steps:
            wrapped += ["--stop-after-steps", str(self.args.chunk_steps)]
        launch = os.environ.get("LAUNCH", "").strip()
        return f"{launch} {shlex.quote(shlex.join(wrapped))}" if launch else shlex.join(wrapped)

    def heartbeat_seconds(self):
        return max(1.0, min(30.0, self.args.heartbeat_timeout / 5))

    def submit(self, run):
        """Start one attempt of `run`. Without LAUNCH it runs here, to the end; with LAUNCH the
        command's exit status and output are checked at once (a bad partition, a quota, a missing
        sbatch: reported now, never waited for). Returns whether the attempt started."""
        for name in ("status.json", "started.json", "heartbeat"):
            _remove(os.path.join(run.dir, name))
        os.makedirs(run.dir, exist_ok=True)
        run.attempts += 1
        run.job_id, run.ended_seen = None, None
        resumed = " with --resume" if "--resume" in self.command(run) else ""
        print(f"run  {os.path.relpath(run.dir, self.out)}" + (f" (attempt {run.attempts}{resumed})" if run.attempts > 1 else ""),
              flush=True)
        launch = os.environ.get("LAUNCH", "").strip()
        line = self.launch_line(run)
        if not launch:
            subprocess.run(shlex.split(line), check=False)
            return True
        result = subprocess.run(line, shell=True, capture_output=True, text=True)
        started = os.path.isfile(os.path.join(run.dir, "started.json"))  # a launcher that ran the command itself
        if result.returncode != 0 and not started:
            message = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
            self.fail(run.dir, f"SUBMIT FAILED: {os.path.relpath(run.dir, self.out)}: {launch.split()[0]} says: {message}")
            return False
        job = re.search(r"(\d+)\s*$", result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
        run.job_id = job.group(1) if job and "sbatch" in launch else None
        if run.job_id:
            print(f"     submitted as job {run.job_id}", flush=True)
        common.write_json(os.path.join(run.dir, "submission.json"),
                          {"attempt": run.attempts, "job_id": run.job_id, "time": time.time(), "launch": launch})
        return True

    def state(self, run):
        """done | stopped | failed (...) | dead (...) | running | queued, from the run's files, its
        heartbeat and, for a SLURM job, the scheduler's word."""
        if os.path.exists(run.done):
            return "done"
        status = _read_status(run.dir)
        if status is not None:
            if status.get("done"):
                return "done"
            code = status.get("returncode")
            return "stopped" if code == 0 else f"failed (exit {code})"
        started = os.path.isfile(os.path.join(run.dir, "started.json"))
        if started and not alive(run.dir, self.args.heartbeat_timeout):
            return f"dead (no heartbeat for over {self.args.heartbeat_timeout:g} s)"
        job_state = slurm_job_state(run.job_id) if run.job_id else None
        if job_state is not None and (job_state in SLURM_ENDED or job_state == "GONE"):
            # the scheduler says the job ended, yet no status.json: give a shared filesystem a moment
            run.ended_seen = run.ended_seen or time.time()
            if time.time() - run.ended_seen > max(10.0, 2 * self.args.poll_seconds):
                return f"dead (job {run.job_id} {job_state.lower()} without a status)"
        return "running" if started else "queued"

    def watch(self, pending):
        """Poll until every run is done or failed for good, at most --max-wait hours."""
        deadline = time.time() + self.args.max_wait * 3600
        last_print, counts = 0.0, collections.Counter()
        finished = failed = 0
        while pending:
            states = {}
            for run in list(pending):
                state = states[run.dir] = self.state(run)
                if state == "done":
                    pending.remove(run)
                    finished += 1
                elif state not in ("running", "queued"):
                    log = os.path.join(run.dir, "run.log")
                    if state != "stopped":
                        run.failures += 1
                    if run.failures > self.args.max_retries:
                        code = state.split("exit ")[1].rstrip(")") if state.startswith("failed (exit") else "?"
                        self.fail(run.dir, f"FAILED (exit {code}): {os.path.relpath(run.dir, self.out)} -- {state}"
                                           f"{'' if run.attempts == 1 else f' after {run.attempts} attempts'} -- log: {log}")
                        pending.remove(run)
                        failed += 1
                        continue
                    if state != "stopped":
                        print(f"RETRY {os.path.relpath(run.dir, self.out)}: {state}; retry {run.failures} of "
                              f"{self.args.max_retries} -- log: {log}", flush=True)
                    if not self.submit(run):
                        pending.remove(run)
                        failed += 1
            if not pending:
                break
            counts = collections.Counter(s for d, s in states.items() if any(r.dir == d for r in pending))
            if time.time() - last_print >= self.args.status_seconds:
                last_print = time.time()
                print(f"waiting for {len(pending)} run(s): {counts['running']} running, {counts['queued']} queued, "
                      f"{finished} done, {failed} failed", flush=True)
            if time.time() > deadline:
                for run in pending:
                    self.fail(run.dir, f"FAILED: {os.path.relpath(run.dir, self.out)} not finished within --max-wait "
                                       f"{self.args.max_wait:g} h ({states.get(run.dir)}) -- log: {os.path.join(run.dir, 'run.log')}")
                break
            time.sleep(self.args.poll_seconds)

    def fail(self, run_dir, message):
        print(message, flush=True)
        self.failures.append((run_dir, message))


@dataclasses.dataclass(eq=False)
class Run:
    """One command of the study and its attempts. `resumable`: the command takes --resume and
    --stop-after-steps (finetune.py, pretrain_it.py); translate_train.py resumes by itself."""
    dir: str
    argv: list
    done: str
    resumable: bool = True
    attempts: int = 0
    failures: int = 0
    job_id: str = None
    ended_seen: float = None


# SLURM job states after which a job runs no more (squeue --states; GONE: purged from squeue)
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}


def slurm_job_state(job_id):
    """The scheduler's state of a job (PENDING, RUNNING, CANCELLED, ...), "GONE" when squeue no
    longer knows it, None when squeue cannot be asked."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return "GONE" if "Invalid job id" in result.stderr else None
    return result.stdout.strip().split()[0] if result.stdout.strip() else "GONE"


def alive(run_dir, timeout):
    """The run's exec wrapper has refreshed its heartbeat within `timeout` seconds."""
    path = os.path.join(run_dir, "heartbeat")
    return os.path.isfile(path) and time.time() - os.path.getmtime(path) <= timeout


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


def _read_status(run_dir):
    path = os.path.join(run_dir, "status.json")
    return common.read_json(path, "status.json") if os.path.isfile(path) else None


# -----------------------------------------------------------------------------
# Stages

# The learning guard (first stage): before GPU-hours are spent on the study, every model must learn
# to reproduce a few English training examples through the real generation, clean-up and scoring
# path. A break anywhere in that path (a wrong decoder start, a clean-up that eats answers, a metric
# that scores nothing) then fails loudly here instead of printing zeros in every table.
GUARD = {"xquad": ("f1", 90.0, 4), "xlsum": ("rouge2", 80.0, 2)}  # metric, threshold, number of examples


def guard_files(data_dir, xlsum_dir, out_dir):
    """{task: file of the guard's examples}. XQuAD: the first question of each of the first four
    paragraphs of XQuAD en (one per paragraph, so the sources differ in more than their question),
    written in SQuAD format; XL-Sum: the first articles of the English validation file."""
    path = os.path.join(out_dir, "guard", "xquad.en.json")
    if not os.path.isfile(path):
        raw = data.read_json_document(data.xquad_path(data_dir, "en"), "XQuAD JSON")
        paragraphs = [(a["title"], p) for a in raw["data"] for p in a["paragraphs"]][:GUARD["xquad"][2]]
        common.write_json(path, {"version": "1.1", "data": [
            {"title": title, "paragraphs": [{"context": p["context"], "qas": p["qas"][:1]}]} for title, p in paragraphs]})
    return {"xquad": path, "xlsum": data.task_file("xlsum", "val", "en", data_dir, xlsum_dir)}


def guard_argv(python, model_name, task, guard_file, data_dir, xlsum_dir, run_dir, tiny):
    """The guard's finetune.py command: train, validate and test on the same English examples,
    constant LR (no warm-up), full finetuning."""
    num = GUARD[task][2]
    steps, lr = ("100", "3e-3") if tiny else ("300", "1e-4")
    return [python, os.path.join(HERE, "finetune.py"), "--model", model_name, "--task", task, "--method", "full",
            "--lr", lr, "--warmup-steps", "0", "--max-steps", steps, "--eval-every", str(int(steps) // 2),
            "--train-file", guard_file, "--val-file", guard_file, "--test-file", guard_file, "--val-langs", "en",
            "--test-langs", "en", "--max-train-examples", str(num), "--max-eval-examples", str(num),
            "--data-dir", data_dir, "--xlsum-dir", xlsum_dir, "--out-dir", run_dir]


def guard_value(results, task):
    """What the guard reached: its metric on the examples it was trained on."""
    return results["test"]["en"][GUARD[task][0]]


def stage_guard(study):
    files = None if study.args.dry_run else guard_files(study.data_dir, study.xlsum_dir, study.out)
    runs = []
    for model in study.models:
        for task in TASKS:
            d = os.path.join(study.out, "runs", "guard", model, task)
            study.record(d, stage="guard", task=task, model=model)
            guard_file = files[task] if files else os.path.join(study.out, "guard", f"{task}.en")
            runs.append(Run(d, guard_argv(study.python, study.all_models()[model], task, guard_file, study.data_dir,
                                          study.xlsum_dir, d, study.args.tiny), os.path.join(d, "results.json")))
    study.execute(runs)
    if study.args.dry_run:
        return
    for run in runs:
        results = load_results(run.dir)
        meta = study.plan[run.dir]
        if results is None:
            continue  # reported as a failed run already
        metric, threshold, _ = GUARD[meta["task"]]
        value = guard_value(results, meta["task"])
        if value >= threshold:
            print(f"GUARD ok      {meta['model']:<10} {meta['task']:<6} {metric} {value:.1f} >= {threshold:g}")
        else:
            study.fail(run.dir, f"GUARD FAILED  {meta['model']} {meta['task']}: {metric} {value:.1f} < {threshold:g} on the "
                                f"examples it was trained on: generation, clean-up or scoring is broken -- {run.dir}")


def stage_it(study):
    runs = []
    for model in study.models:
        d = study.it_dir(model)
        study.record(d, stage="it", model=model)
        runs.append((d, study.it_argv(model), os.path.join(d, "results.json")))
    study.execute(runs)


def search_combos(models, methods):
    return [(task, model, method) for task in TASKS for model in models for method in methods]


def stage_lr_search(study, models=None, methods=None, execute=True):
    """Rounds: ask select_lr for each (task, model, method), launch all next LRs, wait, repeat.
    Returns {(task, model, method): PLR} for the searches that found one. With execute=False
    (later stages re-deriving the PLRs) nothing is launched."""
    combos = search_combos(models or study.models, methods or SEARCH_METHODS)
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
            runs.append(Run(d, argv, out, resumable=False))  # translate_train.py resumes from its progress file
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
    argv = [study.python, os.path.join(HERE, "report.py"), "--out-dir", study.out]
    predictions = [d for d in (os.path.join(study.data_dir, "xquad", "predictions"), os.path.join(study.data_dir, "squad", "predictions"))
                   if os.path.isdir(d)]
    if predictions:  # published systems' outputs, when the data directory has them (../shared/data does)
        argv += ["--predictions"] + predictions + ["--data-dir", study.data_dir]
    code = subprocess.run(argv).returncode
    if code != 0:
        study.fail(None, f"FAILED (exit {code}): report.py --out-dir {study.out}")


# The order of the study: each stage decides its runs from the results of the ones before it.
STAGES = {"guard": stage_guard, "it": stage_it, "lr-search": stage_lr_search, "methods": stage_methods, "translate": stage_translate,
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
        s.add_argument("--max-retries", type=common.non_negative_int, default=2,
                       help="resubmissions of a run that died, was killed or failed, before it is reported failed")
        s.add_argument("--max-wait", type=common.positive_float, default=72.0,
                       help="hours a stage waits for its runs at most; what is not finished then is reported failed")
        s.add_argument("--heartbeat-timeout", type=common.positive_float, default=300.0,
                       help="seconds without a heartbeat after which a started run is dead (killed, node lost)")
        s.add_argument("--chunk-steps", type=common.positive_int, default=None,
                       help="each job trains about N steps (--stop-after-steps), then is resubmitted with --resume: "
                            "for partitions whose time limit is shorter than a run")
        s.add_argument("--poll-seconds", type=common.positive_float, default=30, help="with LAUNCH: how often to check on runs")
        s.add_argument("--status-seconds", type=common.positive_float, default=60,
                       help="with LAUNCH: at most how often to print what the stage waits for")
    ex = sub.add_parser("exec", help="(internal) run one command, with run.log, started.json, heartbeat and status.json")
    ex.add_argument("--run-dir", required=True)
    ex.add_argument("--done", required=True)
    ex.add_argument("--heartbeat-seconds", type=common.positive_float, default=30)
    ex.add_argument("command", nargs="...")
    return p.parse_args(argv)


def exec_run(args):
    """Run one command of the study, as a job would: its output into RUN/run.log; RUN/started.json
    (host, pid, the scheduler's job id) when it starts; RUN/heartbeat touched every few seconds while
    it runs; RUN/status.json (exit status, done or not) when it ends. SIGTERM (scancel, a time
    limit, preemption) is passed on to the command, which then ends with a status too; a SIGKILL or a
    lost node leaves no status, and the stale heartbeat tells the study. Under SLURM the command gets
    OMP_NUM_THREADS = the job's CPUs, unless it is set already."""
    os.makedirs(args.run_dir, exist_ok=True)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    heartbeat = os.path.join(args.run_dir, "heartbeat")
    start = time.time()
    common.write_json(os.path.join(args.run_dir, "started.json"),
                      {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
                       "time": start, "command": command})
    with open(heartbeat, "w"):
        pass
    with open(os.path.join(args.run_dir, "run.log"), "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        env = dict(os.environ)
        cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE")
        if cpus and "OMP_NUM_THREADS" not in env:
            # as many threads as the job has CPUs: two jobs on one node must not both spin on all cores
            env["OMP_NUM_THREADS"] = cpus
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
        while True:
            try:
                code = child.wait(timeout=args.heartbeat_seconds)
                break
            except subprocess.TimeoutExpired:
                os.utime(heartbeat)
    status = {"returncode": code, "seconds": round(time.time() - start, 1), "done": os.path.exists(args.done),
              "host": socket.gethostname(), "job_id": os.environ.get("SLURM_JOB_ID")}
    with open(os.path.join(args.run_dir, "attempts.jsonl"), "a") as history:  # one line per attempt that ended
        history.write(json.dumps(status) + "\n")
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
