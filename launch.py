"""Running the study's commands: here, one after another, or through a scheduler (SLURM), with
heartbeats, retries and resumption; or not at all (the dry run records and prints them).

    python launch.py exec --run-dir RUN --done RUN/results.json -- python finetune.py ...   # one run, as a job runs it

study.py decides which runs the protocol needs and hands them to a launcher (`Launcher.execute`);
this module is the only one that knows how a command is run. Without LAUNCH, runs go one after
another here, each forked from a forkserver that has torch and the stages imported (run_local).
With LAUNCH (e.g. "sbatch --gres=gpu:1 --wrap"), a stage submits `LAUNCH '<command>'` for its runs
(at most --max-queued at a time; a submission refused for the scheduler's submit limit is tried
again later), each job with its kind's resources (Resources: --resources, the cost model's time),
and watches them with one squeue call per poll (one per cluster, for jobs sent to other clusters
with sbatch -M). The dry run (DryRun) prints each command once and answers the protocol's questions
about results with made-up scores, so the plan shows the search's usual course.

Each command runs inside `launch.py exec`, which leaves in the run directory:

    run.log          the command's output (appended, one `$ command` line per attempt)
    command.json     the command of its first attempt (before --resume and --stop-after-steps)
    submission.json  attempt number, the scheduler's job id (sbatch's "Submitted batch job N"; "N;CLUSTER"
                     for a job sent to another cluster with -M)
    started.json     host, pid, job id: the job has started
    heartbeat        touched every few seconds while the command runs
    status.json      exit status and whether the run is done: the command has ended
    attempts.jsonl   the status of every attempt that ended, one line each

A stage reads them at every poll: status.json says done, stopped (exit 0 before the end: a chunk of
--chunk-steps) or failed; a started run whose heartbeat is older than --heartbeat-timeout, or whose
job the scheduler reports ended (cancelled, timed out, preempted, out of memory, node failure)
without a status, is dead (a job the scheduler has suspended is waited for; one it still shows
running is cancelled, and the run retried once the job has ended). Stopped runs are
resubmitted with --resume; dead and failed ones too, at most --max-retries times, then reported
failed with their log; a run that ended with an `error:` line (a usage or data error: the same on
every attempt) is reported at once. A submission the launcher refuses (bad partition, quota, no
sbatch) is reported at once with the scheduler's message. No wait is endless: a stage gives up on
what is not finished after --max-wait hours, and prints what it is waiting for (running, queued,
done, failed) at most once a minute. A stage run again (after the study was stopped, or gave up)
watches the jobs the earlier one left queued or running (submission.json's job, if the scheduler
still has it) instead of submitting them again.
"""

import collections
import dataclasses
import difflib
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

import common
import plan

HERE = os.path.dirname(os.path.abspath(__file__))


def add_launch_args(parser):
    """The flags of how runs are launched and watched (study.py's, for every stage)."""
    parser.add_argument("--max-retries", type=common.non_negative_int, default=2,
                        help="resubmissions of a run that died, was killed or failed, before it is reported failed")
    parser.add_argument("--max-wait", type=common.positive_float, default=72.0,
                        help="hours a stage waits for its runs at most; what is not finished then is reported failed")
    parser.add_argument("--heartbeat-timeout", type=common.positive_float, default=300.0,
                        help="seconds without a heartbeat after which a started run is dead (killed, node lost)")
    parser.add_argument("--stall-timeout", type=common.positive_float, default=1800.0,
                        help="seconds without any output (a log line, a progress bar's update) after which a running "
                             "command is taken for hung (a GPU or a filesystem that stopped answering), killed and "
                             "retried like a dead one")
    parser.add_argument("--chunk-steps", type=common.positive_int, default=None,
                        help="each job trains about N steps (--stop-after-steps), then is resubmitted with --resume: "
                             "for partitions whose time limit is shorter than a run")
    parser.add_argument("--max-queued", type=common.positive_int, default=None,
                        help="with LAUNCH: at most N of the study's jobs submitted and not ended (pending or running, "
                             "a done run's job too while squeue shows it running) at a time; the rest wait here "
                             "(default: no limit). A submission the scheduler refuses for a limit (e.g. "
                             "QOSMaxSubmitJobPerUserLimit) waits and is retried in any case")
    parser.add_argument("--resources", default=None, metavar="FILE",
                        help="JSON: per kind of job (guard, it, finetune, large, translate) its max_hours (the "
                             "partition's time limit; default 12), and optionally partition, mem, cpus, gpus, time, "
                             "extra (sbatch options); see docs/cluster.md")
    parser.add_argument("--poll-seconds", type=common.positive_float, default=30,
                        help="with LAUNCH: how often to check on runs (one squeue call for all of them)")
    parser.add_argument("--status-seconds", type=common.positive_float, default=60,
                        help="with LAUNCH: at most how often to print what the stage waits for")


# -----------------------------------------------------------------------------
# The launcher: runs commands and reads what they left

class Launcher:
    """args: the study's flags (add_launch_args); out: the study directory (for relative names)."""

    runs_commands = True  # (the dry run's: False)

    def __init__(self, args, out):
        self.args, self.out = args, out
        self.failures = []  # (run directory, what happened): reported at the end; the exit status
        self.resources = Resources(getattr(args, "resources", None))
        # SLURM jobs whose run is done (its done file is written) but which squeue still shows running
        # (the job's last seconds, after its done file). The scheduler's submit limit still counts
        # them, so --max-queued does too, in this stage and the next, until squeue shows them
        # COMPLETING (the epilog) or ended: the limit frees a job's slot as it completes (_counted).
        self.draining = set()

    # ---- what the protocol asks of finished runs ----
    def results(self, run_dir):
        """The run's results.json, or None (not run, failed, or still running)."""
        return plan.load_results(run_dir)

    def val_metric(self, run_dir, meta):
        """The run's selection metric (average non-English validation metric), None if it has none."""
        results = self.results(run_dir)
        return None if results is None else results.get("best_val_metric")

    def last_step_metric(self, run_dir, meta, lang):
        """The run's validation metric in `lang` at its last step (eval/step_N.json), or None."""
        results = self.results(run_dir)
        if results is None:
            return None
        path = os.path.join(run_dir, "eval", f"step_{results['config']['max_steps']}.json")
        if not os.path.isfile(path):
            return None
        evaluation = common.read_json(path)
        scores = evaluation["langs"].get(lang)
        return None if scores is None else scores[evaluation["main_metric"]]

    def make_file(self, path, build):
        """A file the study writes itself (the guard's examples, a held-out slice): built once."""
        if not os.path.isfile(path):
            build(path)
        return path

    def run_here(self, argv, what):
        """A command of the study's own that is not a run (the report), here; False if it failed."""
        code = subprocess.run(argv).returncode
        if code != 0:
            self.fail(None, f"FAILED (exit {code}): {what}")
        return code == 0

    def execute(self, runs):
        """runs: [Run]. Launch those not done (at most --max-queued at a time), watch them until each
        is done or has failed for good, resubmitting dead, killed, crashed and stopped ones with
        --resume; report failures. A run that ended with an `error:` line (a usage or data error,
        a model not found) is not retried: the same command would fail the same way."""
        runs = [run if isinstance(run, Run) else Run(*run) for run in runs]
        todo = [run for run in runs if not os.path.exists(run.done_file)]
        for run in runs:
            if run not in todo:
                check_same_command(run, self.out)
                print(f"skip (done)  {os.path.relpath(run.dir, self.out)}")
        # what an earlier invocation (stopped, or past its --max-wait) submitted: its jobs may still be
        # queued or running, and are watched, not submitted again (one squeue call for all of them)
        earlier = {run.dir: _read_submission(run.dir) for run in todo}
        jobs = [submission["job_id"] for submission in earlier.values() if submission.get("job_id")]
        job_states = (slurm_job_states(jobs) if jobs else None) or {}
        pending, waiting = [], []
        for run in todo:
            submission = earlier[run.dir]
            # attempts go on counting from the earlier invocation's, so that a job of its attempt can
            # tell that the run was submitted again since (exec_run)
            run.attempts = submission.get("attempt", 0)
            job = submission.get("job_id")
            name = os.path.relpath(run.dir, self.out)
            ended = os.path.isfile(os.path.join(run.dir, "status.json"))  # (its last attempt ended: submitted anew)
            if not ended and alive(run.dir, self.args.heartbeat_timeout):  # started by an earlier invocation, running
                print(f"running (started earlier{f' as {job_name(job)}' if job else ''})  {name}", flush=True)
                run.attempts, run.job_id = max(1, run.attempts), job
                pending.append(run)
            elif not ended and job and job_states.get(job) is not None and not _ended(job_states[job]):
                print(f"{job_states[job].lower()} (submitted earlier as {job_name(job)})  {name}", flush=True)
                run.job_id = job
                pending.append(run)
            else:
                waiting.append(run)
        self.watch(pending, waiting)

    def command(self, run, resume=True):
        """The run's command for its next attempt: --resume once it has a checkpoint (unless
        resume=False: the dry run prints first attempts), and a step budget per job when
        --chunk-steps is set."""
        argv = list(run.argv)
        if resume and run.resumable and os.path.isdir(os.path.join(run.dir, "last")):
            argv.append("--resume")
        steps = self.args.chunk_steps or (self.resources.chunk_steps(run) if os.environ.get("LAUNCH", "").strip()
                                          or not self.runs_commands else None)
        if run.resumable and steps:
            argv += ["--stop-after-steps", str(steps)]
        return argv

    def launch_line(self, run, command, attempt):
        wrapped = [sys.executable, os.path.join(HERE, "launch.py"), "exec", "--run-dir", run.dir, "--done", run.done_file,
                   "--heartbeat-seconds", f"{self.heartbeat_seconds():g}", "--stall-seconds", f"{self.stall_seconds():g}",
                   "--attempt", str(attempt), "--"] + command
        launch = os.environ.get("LAUNCH", "").strip()
        if not launch:
            return shlex.join(wrapped)
        words = shlex.split(launch)
        if os.path.basename(words[0]) == "sbatch":
            # the kind's resources first, so that an option LAUNCH gives itself wins (sbatch: the last one counts)
            # --no-requeue: the study resubmits a preempted or failed run itself (with --resume). A job that
            # SLURM requeued would start again ~2 minutes later with its first command, beside the
            # resubmission (exec_run ends such a job at once, should LAUNCH ask for --requeue)
            options = self.resources.sbatch_options(run) + ["--no-requeue"]
            if not any(w in ("-o", "--output") or w.startswith(("-o", "--output=")) for w in words[1:]):
                # sbatch's own log (slurm-JOBID.out) goes beside the run, not into the directory it was called from
                options.append(f"--output={os.path.join(run.dir, 'slurm-%j.out')}")
            launch = " ".join([words[0]] + [shlex.quote(o) for o in options] + [launch[len(words[0]):].lstrip()])
        return f"{launch} {shlex.quote(shlex.join(wrapped))}"

    def heartbeat_seconds(self):
        return max(1.0, min(30.0, self.args.heartbeat_timeout / 5))

    def stall_seconds(self):
        return self.args.stall_timeout

    def no_heartbeat(self):
        """Why a started run without a status is dead, its heartbeat stale (state)."""
        return f"no heartbeat for over {self.args.heartbeat_timeout:g} s"

    def submit(self, run):
        """Start one attempt of `run`. Without LAUNCH it runs here, to the end; with LAUNCH the
        command's exit status and output are checked at once: a submission refused for a limit of
        the scheduler (too many jobs of this user) is "deferred", to be tried again at a later poll;
        any other refusal (a bad partition, no sbatch) is reported now, never waited for. A run whose
        directory another process holds (its lock, common.DirectoryLock: a finetune.py started by
        hand, or a job still alive) is not started: it is reported, never run twice at once.
        Returns "started", "deferred" or "failed"."""
        holder = common.lock_holder(run.dir)
        if holder is not None:
            self.fail(run.dir, f"LOCKED: {os.path.relpath(run.dir, self.out)} is in use by {holder}; not started "
                               f"(run the stage again when that process has ended)")
            return "failed"
        os.makedirs(run.dir, exist_ok=True)
        run.attempts += 1
        # the new attempt's number first: from now on a job of an earlier attempt leaves the run alone
        # (exec_run, run_wrapped), so the files removed next are the new attempt's alone
        submission = os.path.join(run.dir, "submission.json")
        earlier = _read_submission(run.dir)  # (put back should the scheduler defer this attempt)
        common.write_json(submission, {"attempt": run.attempts, "job_id": None, "time": time.time(), "launch": ""})
        for name in ("status.json", "started.json", "heartbeat"):
            _remove(os.path.join(run.dir, name))
        if not os.path.isfile(os.path.join(run.dir, COMMAND_FILE)):
            common.write_json(os.path.join(run.dir, COMMAND_FILE), {"argv": portable(run.argv, self.out)})
        run.job_id, run.ended_seen, run.suspended_seen, run.cancelled = None, None, None, None
        command = self.command(run)
        resumed = " with --resume" if "--resume" in command else ""
        print(f"run  {os.path.relpath(run.dir, self.out)}" + (f" (attempt {run.attempts}{resumed})" if run.attempts > 1 else ""),
              flush=True)
        launch = os.environ.get("LAUNCH", "").strip()
        if not launch:  # here, to its end, in a forked child (see run_local)
            run_local(run.dir, run.done_file, command, self.heartbeat_seconds(), self.stall_seconds())
            return "started"
        # SLURM sets SLURM_RESTART_COUNT in a job only once it has been requeued, and sbatch hands the
        # submitting shell's environment on to the job (measured: a 1 in sbatch's environment reaches a
        # fresh job unchanged). A study that runs in a requeued job of its own must not hand its count
        # on: its runs' jobs would take themselves for restarts and end at once (exec_run)
        env = {name: value for name, value in os.environ.items() if name != "SLURM_RESTART_COUNT"}
        result = subprocess.run(self.launch_line(run, command, run.attempts), shell=True, capture_output=True, text=True,
                                env=dict(env, **self.resources.variables(run)))
        started = os.path.isfile(os.path.join(run.dir, "started.json"))  # a launcher that ran the command itself
        if result.returncode != 0 and not started:
            message = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
            if SUBMIT_LIMIT.search(message):  # the scheduler's per-user limit: wait for our own jobs to end
                # no attempt was made: the earlier submission stands, so that a study stopped before the
                # next try counts on from it (else it would skip this attempt's number)
                run.attempts -= 1
                if earlier:
                    common.write_json(submission, earlier)
                else:
                    _remove(submission)
                print(f"     deferred: {launch.split()[0]} says: {message} (tried again when a job has ended)", flush=True)
                return "deferred"
            self.fail(run.dir, f"SUBMIT FAILED: {os.path.relpath(run.dir, self.out)}: {launch.split()[0]} says: {message}")
            return "failed"
        run.job_id = submitted_job(result.stdout) if "sbatch" in launch else None
        if run.job_id:
            print(f"     submitted as {job_name(run.job_id)}", flush=True)
        common.write_json(submission, {"attempt": run.attempts, "job_id": run.job_id, "time": time.time(), "launch": launch})
        return "started"

    def state(self, run, job_states):
        """done | stopped | failed (...) | error (...) | dead (...) | running | suspended | queued, from
        the run's files, its heartbeat and, for a SLURM job, the scheduler's word (`job_states`: {job
        id: state} of the poll's one squeue call for all its jobs)."""
        if os.path.exists(run.done_file):
            return "done"
        status = _read_status(run.dir)
        if status is not None:
            if status.get("done"):
                return "done"
            code = status.get("returncode")
            if status.get("hung"):  # (run_wrapped's watchdog killed it: a dead run, retried)
                return f"hung (exit {code}): no output for over {status['hung']:g} s, killed (--stall-timeout)"
            if code != 0 and status.get("error"):
                return f"error (exit {code}): {status['error'][len('error: '):]}"
            return "stopped" if code == 0 else f"failed (exit {code})"
        started = os.path.isfile(os.path.join(run.dir, "started.json"))
        job_state = job_states.get(run.job_id) if run.job_id else None
        if job_state == "SUSPENDED":
            # (scontrol suspend, or preemption by gang scheduling: SIGSTOP, and later SIGCONT) its heartbeat
            # stops while it is suspended; the time until it is seen running again does not count
            run.suspended_seen = time.time()
            return "suspended"
        if started and not alive(run.dir, self.args.heartbeat_timeout, since=run.suspended_seen):
            return f"dead ({self.no_heartbeat()})"
        if _ended(job_state):
            # the scheduler says the job ended, yet no status.json: give a shared filesystem a moment
            run.ended_seen = run.ended_seen or time.time()
            if time.time() - run.ended_seen > max(10.0, 2 * self.args.poll_seconds):
                return f"dead ({job_name(run.job_id)} {job_state.lower()} without a status)"
        return "running" if started else "queued"

    def stale(self, run, state, job_states):
        """`state`, or "cancelling" while the job of a run taken for dead is being cancelled. A run whose
        heartbeat stopped while squeue still shows its job running (its processes stopped outside
        SLURM, a node whose filesystem hangs, a node lost that SLURM has not noticed yet) is not
        resubmitted beside it: the job would go on holding the run's lock (the resubmission then
        fails, LOCKED) and its GPU, to its time limit. It is cancelled (scancel), and the run is
        retried once the job has ended (a status, or squeue), or --heartbeat-timeout seconds later at
        the latest; as the death it was, whatever status the cancellation left (failed, exit -15)."""
        job_state = job_states.get(run.job_id) if run.job_id else None
        if run.cancelled is None:
            if state != f"dead ({self.no_heartbeat()})" or job_state is None or _ended(job_state):
                return state
            name = os.path.relpath(run.dir, self.out)
            run.cancelled = (time.time(), f"dead ({self.no_heartbeat()}; {job_name(run.job_id)} still {job_state.lower()}: "
                                          f"cancelled)")
            said = cancel_job(run.job_id)
            print(f"CANCEL {name}: {state}, yet squeue shows {job_name(run.job_id)} {job_state.lower()}; "
                  + (f"scancel says: {said}" if said else "scancel'd") + "; retried once it has ended", flush=True)
            return "cancelling"
        if state == "done":
            return state
        ended = os.path.isfile(os.path.join(run.dir, "status.json")) or _ended(job_state)
        if not ended and time.time() - run.cancelled[0] < self.args.heartbeat_timeout:
            return "cancelling"
        return run.cancelled[1]

    def fill(self, pending, waiting):
        """Submit waiting runs while fewer than --max-queued jobs are pending or draining; stop at the
        first one the scheduler defers (its limit is reached: the next poll tries again). Runs whose
        submission failed for good are dropped. Returns the number of runs that failed so."""
        failed = 0
        while waiting and (self.args.max_queued is None or len(pending) + len(self.draining) < self.args.max_queued):
            run = waiting[0]
            outcome = self.submit(run)
            if outcome == "deferred":
                break
            waiting.pop(0)
            if outcome == "started":
                pending.append(run)
            else:
                failed += 1
        return failed

    def watch(self, pending, waiting=()):
        """Submit and poll until every run is done or failed for good, at most --max-wait hours:
        one squeue call per poll for all jobs; a run to retry goes back to the front of the queue."""
        waiting = list(waiting)
        deadline = time.time() + self.args.max_wait * 3600
        last_print, finished, failed = 0.0, 0, 0
        while pending or waiting:
            failed += self.fill(pending, waiting)
            jobs = [run.job_id for run in pending if run.job_id] + sorted(self.draining)
            job_states = (slurm_job_states(jobs) if jobs else None) or {}
            self.draining = {job for job in self.draining if _counted(job_states.get(job))}
            states, requeued = {}, False
            for run in list(pending):
                state = states[run.dir] = self.stale(run, self.state(run, job_states), job_states)
                if state == "done":
                    pending.remove(run)
                    finished += 1
                    if self.args.max_queued and run.job_id and _counted(job_states.get(run.job_id)):
                        self.draining.add(run.job_id)  # the scheduler still counts it
                elif state not in ("running", "suspended", "queued", "cancelling"):
                    log = os.path.join(run.dir, "run.log")
                    if state != "stopped":
                        run.failures += 1
                    permanent = state.startswith("error")  # a usage or data error: the same again on a retry
                    if permanent or run.failures > self.args.max_retries:
                        code = state.split("exit ")[1].split(")")[0].split(":")[0] if "(exit" in state else "?"
                        why = " (not retried: a usage or data error, the same on every attempt)" if permanent else ""
                        self.fail(run.dir, f"FAILED (exit {code}): {os.path.relpath(run.dir, self.out)} -- {state}{why}"
                                           f"{'' if run.attempts == 1 else f' after {run.attempts} attempts'} -- log: {log}")
                        pending.remove(run)
                        failed += 1
                        continue
                    if state != "stopped":
                        print(f"RETRY {os.path.relpath(run.dir, self.out)}: {state}; retry {run.failures} of "
                              f"{self.args.max_retries} -- log: {log}", flush=True)
                    pending.remove(run)
                    waiting.insert(0, run)
                    requeued = True
            if not pending and not waiting:
                break
            if requeued and not os.environ.get("LAUNCH", "").strip():
                continue  # here: the next attempt now, no poll to wait for
            counts = collections.Counter(s for d, s in states.items() if any(r.dir == d for r in pending))
            if time.time() - last_print >= self.args.status_seconds:
                last_print = time.time()
                print(f"waiting for {len(pending) + len(waiting)} run(s): {counts['running']} running, "
                      + (f"{counts['suspended']} suspended, " if counts["suspended"] else "")
                      + (f"{counts['cancelling']} being cancelled, " if counts["cancelling"] else "")
                      + f"{counts['queued']} queued, " + (f"{len(waiting)} not submitted yet, " if waiting else "")
                      + f"{finished} done, {failed} failed", flush=True)
            if time.time() > deadline:
                for run in pending + waiting:
                    # (a job is left to the scheduler: the stage run again watches it, see execute)
                    left = f"; {job_name(run.job_id)} is left in the queue" if run in pending and run.job_id else ""
                    self.fail(run.dir, f"FAILED: {os.path.relpath(run.dir, self.out)} not finished within --max-wait "
                                       f"{self.args.max_wait:g} h ({states.get(run.dir, 'not submitted')}{left}) -- log: "
                                       f"{os.path.join(run.dir, 'run.log')}")
                break
            time.sleep(self.args.poll_seconds)

    def fail(self, run_dir, message):
        print(message, flush=True)
        self.failures.append((run_dir, message))


# A finished run is skipped only if the study asks for it with the command that made it: a study
# run again with other flags (--val-cap, --rouge, --lid-model, another --data-dir) names the same run
# directories, and silently keeping their results would mix two protocols in one report.
COMMAND_FILE = "command.json"


def check_same_command(run, out):
    """UsageError if `run` finished with another command than its argv, compared as portable()
    writes them; runs launched before command.json existed pass."""
    path = os.path.join(run.dir, COMMAND_FILE)
    if not os.path.isfile(path):
        return
    recorded = common.read_json(path, "command.json")
    recorded = recorded.get("argv") if isinstance(recorded, dict) else None
    if recorded == portable(run.argv, out):
        return
    if not isinstance(recorded, list):
        raise common.DataError(f"{path}: expected {{\"argv\": [...]}}, the command the run was launched with")
    raise common.UsageError(f"--out-dir {out}: {os.path.relpath(run.dir, out)} finished with another command "
                            f"({command_difference(recorded, portable(run.argv, out))}; {path}); run the study with the "
                            f"flags it was run with, or in another --out-dir")


def portable(argv, out):
    """argv as command.json records it: without the interpreter (the same study from another
    environment), paths inside the study directory and inside xlgen's as $STUDY/... and $XLGEN/...
    (either moved elsewhere)."""
    def place(word):
        for root, name in ((os.path.abspath(out), "$STUDY"), (HERE, "$XLGEN")):
            if word == root or word.startswith(root + os.sep):
                return name + word[len(root):]
        return word
    return [place(word) for word in argv[1:]]


def command_difference(then, now):
    """What changed between two commands, each change with the flag it belongs to:
    '--rouge-mode gem -> --rouge-mode xlsum', '(none) -> --max-val-examples 1000'."""
    changes = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=then, b=now, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        before = then[i1 - 1] if i1 else ""
        values_only = not any(word.startswith("--") for word in then[i1:i2][:1] + now[j1:j2][:1])
        flag = [before] if before.startswith("--") and values_only else []  # a value changed: name its flag
        changes.append(f"{shlex.join(flag + then[i1:i2]) or '(none)'} -> {shlex.join(flag + now[j1:j2]) or '(none)'}")
    return ", ".join(changes)


# -----------------------------------------------------------------------------
# Resources per kind of job

JOB_KINDS = ("guard", "it", "finetune", "large", "translate")
DEFAULT_MAX_HOURS = 12.0  # a common partition limit; --resources gives a cluster's own
TIME_MARGIN = 1.5         # a job asks for 1.5 x its estimate (+ 10 minutes to load and save), within max_hours
RESOURCE_KEYS = {"max_hours": (int, float), "time": str, "partition": str, "mem": str, "cpus": int, "gpus": int,
                 "extra": str}


class Resources:
    """What each kind of job asks the scheduler for (--resources FILE, JSON), e.g.

        {"it":        {"partition": "gpu-long", "max_hours": 48, "mem": "64G", "cpus": 8, "gpus": 1},
         "finetune":  {"partition": "gpu", "max_hours": 12, "mem": "32G", "cpus": 8, "gpus": 1},
         "translate": {"partition": "gpu", "max_hours": 12, "mem": "48G", "cpus": 8, "gpus": 1}}

    Kinds not given keep the defaults: max_hours 12, nothing else. A job's time is 1.5 x the cost
    model's estimate of the job (cost.py) + 10 minutes, at most max_hours (or `time`, when given:
    "HH:MM:SS" as sbatch takes it). A run whose estimate does not fit in max_hours is cut into
    chunks of whole evaluation intervals that do (--stop-after-steps, then --resume), unless
    --chunk-steps says how. With sbatch the settings become options before LAUNCH's own (which win);
    any other LAUNCH finds them in the environment: XLGEN_KIND, XLGEN_TIME_MINUTES, XLGEN_PARTITION,
    XLGEN_MEM, XLGEN_CPUS, XLGEN_GPUS."""

    def __init__(self, path=None):
        self.kinds = {kind: {"max_hours": DEFAULT_MAX_HOURS} for kind in JOB_KINDS}
        if path is None:
            return
        given = common.read_json(path, "--resources JSON")
        if not isinstance(given, dict):
            raise common.UsageError(f"--resources {path}: expected a JSON object {{kind: {{setting: value}}}}")
        for kind, settings in given.items():
            if kind not in JOB_KINDS:
                raise common.UsageError(f"--resources {path}: unknown kind of job '{kind}'; the kinds are "
                                        f"{', '.join(JOB_KINDS)}")
            if not isinstance(settings, dict):
                raise common.UsageError(f"--resources {path}: '{kind}' must be an object of settings")
            for key, value in settings.items():
                kind_of = RESOURCE_KEYS.get(key)
                if kind_of is None:
                    raise common.UsageError(f"--resources {path}: {kind}.{key}: unknown setting; the settings are "
                                            f"{', '.join(RESOURCE_KEYS)}")
                if not isinstance(value, kind_of) or isinstance(value, bool) or (
                        isinstance(value, (int, float)) and value <= 0):
                    raise common.UsageError(f"--resources {path}: {kind}.{key}: {value!r} is not a valid value "
                                            f"(expected a {'string' if kind_of is str else 'positive number'})")
            self.kinds[kind] = {**self.kinds[kind], **settings}

    def of(self, run):
        return self.kinds[run.kind]

    def estimate(self, run):
        """(hours of the whole run, its steps, its evaluation interval) by the cost model, or None
        (tiny models, or a command cost.py does not price)."""
        if run.estimate is None:
            import cost
            run.estimate = cost.run_estimate(run.argv) or ()
        return run.estimate or None

    def chunk_steps(self, run):
        """Steps per job for a run too long for its kind's max_hours (whole evaluation intervals),
        else None."""
        estimate = self.estimate(run) if run.resumable else None
        if estimate is None:
            return None
        hours, steps, eval_every = estimate
        budget = self.of(run)["max_hours"] / TIME_MARGIN - 1 / 6
        if hours <= budget:
            return None
        intervals = max(1, int(budget / (hours * eval_every / steps)))
        return intervals * eval_every

    def job_hours(self, run):
        """The cost model's hours of one job of the run (a chunk, when it is chunked), or None."""
        estimate = self.estimate(run)
        if estimate is None:
            return None
        hours, steps, _ = estimate
        chunk = self.chunk_steps(run)
        return hours if chunk is None else hours * min(1.0, chunk / steps)

    def minutes(self, run):
        """The job's time limit in minutes: `time` if given, else the estimate with its margin,
        within max_hours; None (the scheduler's default) for a run without an estimate."""
        spec = self.of(run)
        if "time" in spec:
            return None
        hours = self.job_hours(run)
        if hours is None:
            return None
        return math.ceil(min(spec["max_hours"], hours * TIME_MARGIN + 1 / 6) * 60)

    def sbatch_options(self, run):
        spec, minutes = self.of(run), self.minutes(run)
        options = []
        if "partition" in spec:
            options.append(f"--partition={spec['partition']}")
        if "time" in spec:
            options.append(f"--time={spec['time']}")
        elif minutes is not None:
            options.append(f"--time={minutes // 60}:{minutes % 60:02d}:00")
        if "mem" in spec:
            options.append(f"--mem={spec['mem']}")
        if "cpus" in spec:
            options.append(f"--cpus-per-task={spec['cpus']}")
        if "gpus" in spec:
            options.append(f"--gres=gpu:{spec['gpus']}")
        return options + shlex.split(spec.get("extra", ""))

    def variables(self, run):
        spec, minutes = self.of(run), self.minutes(run)
        values = {"XLGEN_KIND": run.kind, "XLGEN_TIME_MINUTES": minutes, "XLGEN_PARTITION": spec.get("partition"),
                  "XLGEN_MEM": spec.get("mem"), "XLGEN_CPUS": spec.get("cpus"), "XLGEN_GPUS": spec.get("gpus")}
        return {k: str(v) for k, v in values.items() if v is not None}


class DryRun(Launcher):
    """--dry-run: every command is printed once (by the first stage that needs it) and recorded;
    nothing runs, nothing is written. A run's metric is made up from its LR (assumed_score), so the
    protocol's decisions take their usual course and every stage's commands can be shown."""

    runs_commands = False

    def __init__(self, args, out):
        super().__init__(args, out)
        self.printed = {}  # {run dir: Run}, in the order printed

    def execute(self, runs):
        for run in runs:
            if not os.path.exists(run.done_file) and run.dir not in self.printed:
                self.printed[run.dir] = run
                print(f"RUN {self.launch_line(run, self.command(run, resume=False), 1)}")

    def results(self, run_dir):
        return None

    def val_metric(self, run_dir, meta):
        return assumed_score(meta["lr"]) + (0.1 if meta.get("it") else 0.0)

    def last_step_metric(self, run_dir, meta, lang):
        return assumed_score(meta["lr"] / 10)  # assume English likes a 10x larger LR (the paper's finding)

    def make_file(self, path, build):
        return path

    def run_here(self, argv, what):
        print(f"would run: {what}")
        return True


def assumed_score(lr):
    """For --dry-run: a made-up metric peaking at 1e-4, so the plan shows the search's usual course."""
    return -abs(math.log10(lr) + 4)


# -----------------------------------------------------------------------------
# Runs, and what SLURM and the heartbeat say about them

@dataclasses.dataclass(eq=False)
class Run:
    """One command of the study and its attempts. `resumable`: the command takes --resume and
    --stop-after-steps (finetune.py, pretrain_it.py); translate_train.py resumes by itself."""
    dir: str
    argv: list
    done_file: str              # the file whose existence says the run is done (results.json, a translation)
    resumable: bool = True
    stage: str = "?"            # the stage of the study that made it (the dry run's cost table)
    kind: str = "finetune"      # the kind of job (Resources): guard, it, finetune, large, translate
    estimate: tuple = None      # (hours, steps, evaluation interval) by the cost model, once asked
    attempts: int = 0
    failures: int = 0
    job_id: str = None
    ended_seen: float = None
    suspended_seen: float = None
    cancelled: tuple = None     # (time, why): the study cancelled its job, taken for dead yet running (Launcher.stale)


# SLURM job states after which a job runs no more (squeue --states; GONE: purged from squeue)
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}


# What sbatch says when a per-user or per-account limit refuses a job (QOS or association limits):
# not a failure of the run; it is submitted again once some of the study's jobs have ended
SUBMIT_LIMIT = re.compile(r"MaxSubmitJob|SubmitJobLimit|job submit limit|Job violates accounting/QOS policy|"
                          r"temporarily unable to accept job", re.IGNORECASE)


def submitted_job(stdout):
    """The job that sbatch's output names: "N", or "N;CLUSTER" for a job sent to another cluster of a
    multi-cluster site (sbatch -M/--clusters; the form `sbatch --parsable` prints then). None when it
    names none. sbatch prints "Submitted batch job N[ on cluster CLUSTER]", or with --parsable
    "N[;CLUSTER]" (SLURM 22.05). The cluster matters: job numbers are per cluster, and squeue sees
    another cluster's jobs only when asked with -M (slurm_job_states)."""
    for line in reversed([line.strip() for line in stdout.splitlines()]):
        job = (re.fullmatch(r"Submitted batch job (\d+)(?: on cluster (\S+))?", line)
               or re.fullmatch(r"(\d+)(?:;(\S+))?", line))
        if job:
            return job.group(1) + (f";{job.group(2)}" if job.group(2) else "")
    return None


def job_name(job_id):
    """"job N", or "job N on cluster CLUSTER" (submitted_job's "N;CLUSTER"), as sbatch says it."""
    number, _, cluster = job_id.partition(";")
    return f"job {number}" + (f" on cluster {cluster}" if cluster else "")


def slurm_job_states(job_ids):
    """{job id: the scheduler's state (PENDING, RUNNING, CANCELLED, ...)} of `job_ids` ("N", or
    "N;CLUSTER": submitted_job), from one squeue call per cluster; "GONE" for a job squeue no longer
    knows. A job whose cluster squeue cannot be asked about is left out (its state is not known);
    None when it can be asked about none."""
    clusters = {}
    for job in dict.fromkeys(job_ids):
        clusters.setdefault(job.partition(";")[2], []).append(job)
    states = {}
    for cluster, jobs in clusters.items():
        numbers = [job.partition(";")[0] for job in jobs]
        try:
            result = subprocess.run(["squeue", "-h"] + (["-M", cluster] if cluster else [])
                                    + ["-j", ",".join(numbers), "-t", "all", "-o", "%i %T"],
                                    capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:  # (one job, and squeue no longer knows it)
                states.update({job: "GONE" for job in jobs})
            continue
        known = dict(line.split()[:2] for line in result.stdout.splitlines() if len(line.split()) >= 2)
        states.update({job: known.get(number, "GONE") for job, number in zip(jobs, numbers)})
    return states or None


def cancel_job(job_id):
    """scancel the job ("N", or "N;CLUSTER": submitted_job): None, or what scancel said when it failed."""
    number, _, cluster = job_id.partition(";")
    try:
        result = subprocess.run(["scancel"] + (["-M", cluster] if cluster else []) + [number],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if result.returncode == 0 else " ".join((result.stderr or result.stdout).split()) or \
        f"exit status {result.returncode}"


def _ended(job_state):
    """squeue's state of a job (slurm_job_states) says it has ended or is gone (None: not known)."""
    return job_state in SLURM_ENDED or job_state == "GONE"


def _counted(job_state):
    """squeue's state of a job means the scheduler's submit limit (MaxSubmitJobs of an association or
    QOS) still counts it: pending, running, suspended... but not COMPLETING. slurmctld frees the slot
    when the job completes, before its epilog runs (SLURM 22.05, tests/test_cluster.py: a limit of 2,
    a 3 s epilog, and squeue shows two jobs pending or running beside a third one COMPLETING).
    None: squeue could not be asked; then the job is not waited for, and a refused submission is
    deferred as usual."""
    return job_state is not None and job_state != "COMPLETING" and not _ended(job_state)


def alive(run_dir, timeout, since=None):
    """The run's exec wrapper has refreshed its heartbeat within `timeout` seconds (of `since`, when
    later: the last time its job was seen suspended)."""
    path = os.path.join(run_dir, "heartbeat")
    return os.path.isfile(path) and time.time() - max(os.path.getmtime(path), since or 0.0) <= timeout


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


def _read_status(run_dir):
    """The run's status.json (None while its attempt has not ended)."""
    return _read_run_file(run_dir, "status.json", None)


def _read_submission(run_dir):
    """The run's submission.json ({} before its first submission): its last attempt and job id."""
    return _read_run_file(run_dir, "submission.json", {})


def _read_run_file(run_dir, name, missing):
    path = os.path.join(run_dir, name)
    return common.read_json(path, name) if os.path.isfile(path) else missing


# -----------------------------------------------------------------------------
# One run, as a job runs it

def exec_run(args):
    """`launch.py exec`: run one command of the study as a job runs it (see run_wrapped). A job that
    SLURM requeued (preemption, a failed node, scontrol requeue) and now starts again ends at once and
    leaves the run directory as it is: the study has seen the first start end (its status, or its
    heartbeat gone stale) and resubmits the run itself, with --resume; this job's command is the first
    one, and would run beside that resubmission. (The study's jobs are submitted with --no-requeue;
    this holds should LAUNCH ask for --requeue.) Likewise a job of an earlier attempt (--attempt) that
    starts after the run was submitted again: a study run again while its jobs were queued watches
    them (Launcher.execute), but one that could not ask the scheduler about them submits anew."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    if restarts not in ("", "0"):
        print(f"launch.py exec: SLURM requeued job {os.environ.get('SLURM_JOB_ID')} and started it again (restart "
              f"{restarts}); the study resubmits its runs itself, so this job ends here and leaves {args.run_dir} "
              f"as it is", flush=True)
        return 0
    latest = superseded_by(args.run_dir, args.attempt)
    if latest:
        say_superseded(args.run_dir, latest, args.attempt, "ends here and leaves the run as it is")
        return 0
    return run_wrapped(args.run_dir, args.done, command, args.heartbeat_seconds, in_process=False, attempt=args.attempt,
                       stall_seconds=args.stall_seconds)


def superseded_by(run_dir, attempt):
    """The later attempt the study has submitted the run as since this job's `attempt` (submission.json),
    or None (none; or `attempt` None: not known, never superseded)."""
    latest = _read_submission(run_dir).get("attempt", 0)
    return latest if attempt is not None and latest > attempt else None


def say_superseded(run_dir, latest, attempt, what):
    print(f"launch.py exec: {run_dir} was submitted again (attempt {latest}) after this job's attempt {attempt}, "
          f"whose job the study no longer watches; this job {what}", flush=True)


def run_wrapped(run_dir, done, command, heartbeat_seconds, in_process, attempt=None, stall_seconds=0.0):
    """Run one command of the study, as a job would: its output into RUN/run.log; RUN/started.json
    (host, pid, the scheduler's job id) when it starts; RUN/heartbeat touched every few seconds while
    it runs; RUN/status.json (exit status, done or not) and a line of RUN/attempts.jsonl when it
    ends. As a subprocess (a job), SIGTERM (scancel, a time limit, preemption) is passed on to the
    command, which then ends with a status too; a SIGKILL or a lost node leaves no status, and the
    stale heartbeat tells the study. Under SLURM the command gets OMP_NUM_THREADS = the job's CPUs,
    unless it is set already. `in_process`: a stage script of this repository runs in this process
    (a child forked for it by the local launcher, see run_local), without importing torch again. A
    job of an `attempt` that the study has since superseded (it took the job for dead: its heartbeat
    stopped, its node was lost) writes no status: status.json is the new attempt's. A command that
    writes nothing into run.log for `stall_seconds` (0: no limit) is hung (a GPU that stopped
    answering, a read from a filesystem that hangs: its heartbeat, this wrapper's, goes on): it is
    killed, and its status says "hung", which the study retries as a dead run."""
    os.makedirs(run_dir, exist_ok=True)
    watchdog = Watchdog(run_dir, heartbeat_seconds, stall_seconds)
    start = time.time()
    common.write_json(os.path.join(run_dir, "started.json"),
                      {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
                       "time": start, "command": command})
    with open(watchdog.heartbeat, "w"):
        pass
    with open(os.path.join(run_dir, "run.log"), "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        stage = STAGE_SCRIPTS.get(os.path.basename(command[1])) if len(command) > 1 and command[0] == sys.executable else None
        hung = None
        if in_process and stage is not None:
            def on_hang():  # (the stage's own thread is stuck: this process ends, with the attempt's status)
                watchdog.say(log)
                end_attempt(run_dir, done, start, -int(signal.SIGKILL), attempt, hung=stall_seconds)
                os.kill(os.getpid(), signal.SIGKILL)
            code = run_stage_here(stage, command[2:], log, watchdog, on_hang)
        else:
            env = dict(os.environ)
            cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE")
            if cpus and "OMP_NUM_THREADS" not in env:
                # as many threads as the job has CPUs: two jobs on one node must not both spin on all cores
                env["OMP_NUM_THREADS"] = cpus
            # SIGTERM (scancel, a time limit) is passed on to the command; one that comes while it starts
            # is held until it has a pid (before, it ended this wrapper there: no status, the command orphaned)
            child, held = None, []
            signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum) if child else held.append(signum))
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            for signum in held:
                child.send_signal(signum)
            while True:
                try:
                    code = child.wait(timeout=watchdog.tick)
                    break
                except subprocess.TimeoutExpired:
                    if watchdog.beat() and hung is None:
                        hung = stall_seconds
                        watchdog.say(log)
                        child.kill()
    end_attempt(run_dir, done, start, code, attempt, hung=hung)
    return code


def end_attempt(run_dir, done, start, code, attempt, hung=None):
    """Write the attempt's status (RUN/status.json, a line of RUN/attempts.jsonl), unless the study has
    superseded it. hung: the watchdog's limit, when it killed the command."""
    status = {"returncode": code, "seconds": round(time.time() - start, 1), "done": os.path.exists(done),
              "host": socket.gethostname(), "job_id": os.environ.get("SLURM_JOB_ID")}
    latest = superseded_by(run_dir, attempt)
    if latest:
        say_superseded(run_dir, latest, attempt, "leaves no status")
        return
    if hung:
        status["hung"] = hung
    elif code != 0:
        status["error"] = error_line(os.path.join(run_dir, "run.log"))
    with open(os.path.join(run_dir, "attempts.jsonl"), "a") as history:  # one line per attempt that ended
        history.write(json.dumps(status) + "\n")
    common.write_json(os.path.join(run_dir, "status.json"), status)


class Watchdog:
    """A running command's heartbeat (RUN/heartbeat, touched every `heartbeat_seconds`), and whether
    it is hung: nothing written into RUN/run.log for `stall_seconds` (0: never)."""

    def __init__(self, run_dir, heartbeat_seconds, stall_seconds):
        self.heartbeat, self.log = os.path.join(run_dir, "heartbeat"), os.path.join(run_dir, "run.log")
        self.stall = stall_seconds
        # how often to look: the heartbeat's period, or often enough to see a short limit in time
        self.tick = min(heartbeat_seconds, max(0.25, stall_seconds / 4)) if stall_seconds else heartbeat_seconds

    def beat(self):
        """Touch the heartbeat; True if the command is hung."""
        os.utime(self.heartbeat)
        if not self.stall:
            return False
        try:
            return time.time() - os.path.getmtime(self.log) > self.stall
        except OSError:  # (run.log removed by hand: the command's output goes on into the removed file)
            return False

    def say(self, log):
        log.write(f"\nlaunch.py exec: no output for over {self.stall:g} s: the command is taken for hung and "
                  f"killed (the study's --stall-timeout); the study retries it\n")
        log.flush()


def error_line(log_path):
    """The `error: ...` line a stage script ends with when it refuses its input (a usage or data
    error, a model not found: common.exits_on_error, argparse), or None: it crashed, was killed or
    preempted, which a retry may not repeat. Only the attempt's last line counts."""
    with open(log_path, "rb") as f:
        f.seek(max(0, os.path.getsize(log_path) - 4096))
        lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines and lines[-1].startswith("error: ") else None


# The study's own stage scripts, which the local launcher runs in a forked child instead of a new interpreter
STAGE_SCRIPTS = {"finetune.py": "finetune", "pretrain_it.py": "pretrain_it", "translate_train.py": "translate_train"}


def run_stage_here(module_name, argv, log, watchdog, on_hang):
    """`python STAGE.py ARGV` in this process, as its own program would end: the exit status of
    SystemExit, 1 with a traceback for any other exception. Output goes to `log`; a thread keeps the
    heartbeat (`watchdog`) and calls on_hang() when the stage has written nothing for too long."""
    import importlib
    import threading
    import traceback
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    beating = threading.Event()

    def beat():
        while not beating.wait(watchdog.tick):
            if watchdog.beat():
                on_hang()
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


def run_local(run_dir, done, command, heartbeat_seconds, stall_seconds=0.0):
    """Run one command here, to its end, in a child process forked from a forkserver that has the
    stage modules imported (Python's multiprocessing; the server itself never runs torch, so each
    child starts clean). The child gets this process's current environment and directory."""
    import multiprocessing
    if not _LAUNCHER:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _LAUNCHER.append(context)
    child = _LAUNCHER[0].Process(target=_local_child, args=(run_dir, done, command, heartbeat_seconds, stall_seconds,
                                                           dict(os.environ), os.getcwd()))
    child.start()
    child.join()
    return child.exitcode


def _local_child(run_dir, done, command, heartbeat_seconds, stall_seconds, env, cwd):
    import threading
    from tqdm import tqdm
    # tqdm would make a multiprocessing lock, which a child ending with os._exit leaves to the
    # resource tracker ("leaked semaphore objects" at the study's end); one process needs a thread lock
    tqdm.set_lock(threading.RLock())
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    code = run_wrapped(run_dir, done, command, heartbeat_seconds, in_process=True, stall_seconds=stall_seconds)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command_name", required=True)
    ex = sub.add_parser("exec", help="run one command, with run.log, started.json, heartbeat and status.json")
    ex.add_argument("--run-dir", required=True)
    ex.add_argument("--done", required=True)
    ex.add_argument("--heartbeat-seconds", type=common.positive_float, default=30)
    ex.add_argument("--stall-seconds", type=common.non_negative_float, default=0.0,
                    help="kill the command when it has written nothing for this many seconds (0: never)")
    ex.add_argument("--attempt", type=common.positive_int, default=None,
                    help="the study's attempt number of this job: a job whose run was submitted again since "
                         "(a later attempt in RUN/submission.json) ends at once")
    ex.add_argument("command", nargs="...")
    return p.parse_args(argv)


def exit_status(code):
    """The wrapper's own exit status for its command's: a command ended by signal N exits 128 + N, as
    a shell reports it (143 for SIGTERM, where sys.exit(-15) gave 241)."""
    return 128 - code if code < 0 else code


@common.exits_on_error
def main(args):
    sys.exit(exit_status(exec_run(args)))


if __name__ == "__main__":
    main(parse_args())
