"""Cluster runs survive what clusters do: a real single-node SLURM (slurm_cluster.py), and a local
background launcher with SIGKILL where SLURM is absent.

Each test drives launch.Launcher.execute (through study.Study), the same code every stage uses, with real tiny finetune.py
runs: cancelled jobs, killed processes, time limits, failing commands and refused submissions.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import launch
import models
import report
import study
import slurm_cluster
from conftest import DATA_DIR, REPO

# with pytest-xdist (the test command's -n 2), every test here runs on one worker, so one SLURM
# cluster serves them all (the module fixture below) and the long waits overlap other files' tests
pytestmark = pytest.mark.xdist_group("slurm")

RUN = ["--model", "tiny-mt5", "--task", "xquad", "--data-dir", DATA_DIR, "--warmup-steps", "5", "--max-tokens", "1500",
       "--max-train-examples", "300", "--max-eval-examples", "3", "--max-new-tokens", "4", "--val-langs", "th",
       "--test-langs", "zh", "--lr", "1e-3", "--log-every", "10"]


def finetune_argv(out_dir, *extra):
    return [sys.executable, os.path.join(REPO, "finetune.py")] + RUN + ["--out-dir", str(out_dir)] + list(extra)


def make_study(tmp_path, **flags):
    args = study.parse_args(["it", "--out-dir", str(tmp_path / "study"), "--data-dir", DATA_DIR, "--poll-seconds", "0.5",
                             "--status-seconds", "5"] + [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))])
    return study.Study(args)


def weights(run_dir):
    return load_file(os.path.join(run_dir, "last", "model.safetensors"))


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def straight(tmp_path, name, *extra, threads="1"):
    """The uninterrupted run: the reference for bitwise equality, with the thread count of the jobs
    (a different count sums floats in another order)."""
    out = tmp_path / name
    subprocess.run(finetune_argv(out, *extra), check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS=threads))
    return weights(out)


def in_background(fn, *args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    return thread, result


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def attempts(run_dir):
    return json.loads(open(os.path.join(run_dir, "submission.json")).read())["attempt"]


# ----------------------------------------------------------------------------- a real SLURM

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not slurm_cluster.available():
        pytest.skip("SLURM is not installed (.ci/run installs slurm-wlm and munge)")
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")).start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def history(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "attempts.jsonl"))]


def timed_straight(tmp_path, name, *extra):
    """straight(), reading the run's step lines as they come: (weights, seconds per training step,
    seconds before the first step). The chunk test sizes its jobs from these, so it holds on a
    fast machine and on a loaded one alike."""
    out = tmp_path / name
    start = time.time()
    proc = subprocess.Popen(finetune_argv(out, *extra), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    seen = {}
    for line in proc.stdout:
        if line.startswith("step "):
            seen.setdefault(int(line.split()[1]), time.time())
    assert proc.wait() == 0
    first, last = min(seen), max(seen)
    per_step = (seen[last] - seen[first]) / (last - first)  # (evaluations in between included: an upper bound)
    return weights(out), per_step, seen[first] - start - first * per_step


@pytest.mark.slow
def test_slurm_cancelled_job_resumes_bitwise_and_a_time_limit_is_beaten_by_chunks(cluster, tmp_path, monkeypatch, capsys):
    """A: cancelled with scancel after its first checkpoint; it saves the step the SIGTERM came in,
    the study notices, resubmits it with --resume, and its final weights equal an uninterrupted run's. B: five chunks, longer than the
    partition's 1-minute time limit; with --chunk-steps each job trains a chunk and stops at a
    checkpoint, and B completes through automatic resubmissions, no job timed out. The chunk is
    ~20 s of training at the step rate of A's uninterrupted run measured just before (whatever the
    machine's speed), not a fixed count; its startup is left out of the sizing, as that measurement
    often meets the other worker's load (startup 8-12 s there, 4 s in a quiet run).
    Seen: jobs of 15-28 s, B 95-101 s in all (before, three chunks of "30 s" with the startup
    counted were 59 s in all once: below the limit). Then a second invocation submits nothing."""
    models.resolve("tiny-mt5", DATA_DIR)  # built before the jobs start (they share the cache)
    a_flags = ["--max-steps", "50", "--eval-every", "25", "--seed", "1"]
    reference, per_step, startup = timed_straight(tmp_path, "a-straight", *a_flags)  # the uninterrupted A
    if startup > 25:
        pytest.skip(f"a job here takes {startup:.0f} s to start: no room for chunks in a 1-minute limit")
    chunk = max(10, int(20 / per_step) // 10 * 10)  # ~20 s of training a job, after its startup
    monkeypatch.setenv("LAUNCH", "sbatch --time=1 --wrap")
    s = make_study(tmp_path, chunk_steps=chunk, heartbeat_timeout=60)
    a, b = tmp_path / "study" / "a", tmp_path / "study" / "b"
    runs = [launch.Run(str(a), finetune_argv(a, *a_flags), str(a / "results.json")),
            launch.Run(str(b), finetune_argv(b, "--max-steps", str(5 * chunk), "--eval-every", str(chunk // 2), "--seed", "2"),
                      str(b / "results.json"))]
    thread, _ = in_background(s.execute, runs)
    wait_for(lambda: (a / "last" / "train_state.pt").exists(), 120, "A's first checkpoint")
    job = json.loads((a / "started.json").read_text())["job_id"]
    assert job and cluster.jobs()[job] == "RUNNING"
    subprocess.run(["scancel", job], check=True, env=cluster.env)
    thread.join(timeout=600)
    assert not thread.is_alive()
    out = capsys.readouterr().out
    assert (a / "results.json").exists() and (b / "results.json").exists() and s.failures == [], out
    assert cluster.jobs()[job] == "CANCELLED" and attempts(a) >= 2  # (more when A's 50 steps take several chunks)
    assert "CANCELLED" in (a / f"slurm-{job}.out").read_text()  # sbatch's log beside the run, not in the cwd
    assert f"RETRY a: failed (exit -{signal.SIGTERM.value})" in out and "run  a (attempt 2 with --resume)" in out, out
    # the job saved the step scancel's SIGTERM came in (loop.TermSignal), and the retry went on from it
    log = (a / "run.log").read_text()
    stopped = int(re.search(r"SIGTERM: stopped at the checkpoint of step (\d+)", log).group(1))
    assert f"resuming from step {stopped} " in log, log[-3000:]
    assert equal(weights(a), reference)
    wait_for(lambda: (b / "status.json").exists(), 30, "B's last status")  # written just after results.json
    jobs = history(b)
    commands = [line for line in open(b / "run.log") if line.startswith("$ ")]
    assert len(jobs) == len(commands) == 5 and all(j["returncode"] == 0 for j in jobs)  # 5 chunks, each ended at a checkpoint
    assert all(f"--stop-after-steps {chunk}" in c for c in commands) and all("--resume" in c for c in commands[1:])
    assert "TIMEOUT" not in cluster.jobs().values()
    assert sum(j["seconds"] for j in jobs) > 60, (jobs, per_step, startup)  # the whole run is longer than the limit
    before = set(cluster.jobs())  # a second invocation submits nothing: every run is finished
    s.execute(runs)
    out = capsys.readouterr().out
    assert "skip (done)  a" in out and "skip (done)  b" in out and set(cluster.jobs()) == before


@pytest.mark.slow
def test_slurm_a_failing_run_is_reported_without_retry_and_its_cell_marked(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAUNCH", "sbatch --wrap")
    s = make_study(tmp_path, max_retries=1)
    root = tmp_path / "study"
    good, bad = root / "runs" / "xquad" / "tiny-mt5" / "full-lr0.001", root / "runs" / "xquad" / "tiny-mt5" / "adapters-lr0.001"
    runs = [launch.Run(str(good), finetune_argv(good, "--max-steps", "20", "--eval-every", "10"), str(good / "results.json")),
            launch.Run(str(bad), finetune_argv(bad, "--max-steps", "20", "--train-file", str(tmp_path / "missing.json")),
                      str(bad / "results.json"))]
    for run, method in zip(runs, ("full", "adapters")):
        s.plan.record(run.dir, stage="lr-search", task="xquad", model="tiny-mt5", method=method, lr=1e-3, it=False, seed=0,
                      plr=1e-3)
    s.execute(runs)
    out = capsys.readouterr().out
    assert (good / "results.json").exists() and len(history(bad)) == 1  # a data error: the same on a retry
    assert "RETRY" not in out
    assert (f"FAILED (exit 1): runs/xquad/tiny-mt5/adapters-lr0.001 -- error (exit 1): {tmp_path / 'missing.json'}: file "
            f"not found (not retried: a usage or data error, the same on every attempt) -- log: {bad / 'run.log'}") in out
    assert [d for d, _ in s.failures] == [str(bad)] and "missing.json: file not found" in open(bad / "run.log").read()
    common_chosen = {"xquad/tiny-mt5/full": {"runs": [str(good)], "lr": 1e-3, "it": False, "plr": 1e-3, "val_metric": 0.0},
                     "xquad/tiny-mt5/adapters": {"runs": [str(bad)], "lr": 1e-3, "it": False, "plr": 1e-3, "val_metric": None}}
    (root / "chosen.json").write_text(json.dumps(common_chosen))
    report.write_report(str(root))
    assert "| adapters | — |" in (root / "report" / "fig2_methods_xquad.md").read_text()
    assert f"`{bad}` failed (exit 1); log: `{bad / 'run.log'}`" in (root / "report" / "report.md").read_text()


def test_slurm_a_refused_submission_is_reported_at_once(cluster, tmp_path):
    """The real command line: every submission error printed with sbatch's message, exit status 1,
    within a minute, nothing waited for."""
    env = dict(cluster.env, LAUNCH="sbatch --partition=nonexistent --wrap")
    started = time.time()
    result = subprocess.run([sys.executable, os.path.join(REPO, "study.py"), "it", "--tiny", "--data-dir", DATA_DIR,
                             "--out-dir", str(tmp_path / "study")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.time() - started < 60
    refused = [line for line in result.stdout.splitlines() if line.startswith("SUBMIT FAILED")]
    assert len(refused) == 2 and all("sbatch says: sbatch: error: invalid partition specified: nonexistent" in line
                                     for line in refused), result.stdout
    assert "waiting for" not in result.stdout and "2 failure(s):" in result.stdout


def late_job_leaves_the_run_alone(cluster, d, job, says):
    """Start `job`, pending since the study resubmitted its run in `d` (which is done), and check that
    it ends saying `says` in its slurm-N.out and leaves the run's files as they are."""
    # the last attempt's own last files: written just after results.json, which ends the study's wait
    wait_for(lambda: (d / "status.json").exists(), 30, "the last attempt's status")
    kept = {name: (d / name).read_bytes() for name in ("status.json", "attempts.jsonl", "run.log", "started.json")}
    mtime = os.stat(d / "results.json").st_mtime_ns
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=cluster.env, check=True)
    wait_for(lambda: cluster.jobs()[job] == "COMPLETED", 60, "the late job's end")
    assert {name: (d / name).read_bytes() for name in kept} == kept
    assert os.stat(d / "results.json").st_mtime_ns == mtime
    assert says in (d / f"slurm-{job}.out").read_text()


def test_slurm_a_requeued_job_never_runs_beside_the_studys_resubmission(cluster, tmp_path, monkeypatch, capsys):
    """SLURM requeues a job on preemption (PreemptMode=REQUEUE), on a failed node (JobRequeue=1, the
    default) or by `scontrol requeue`: the job is stopped (SIGTERM) and pending again, to start ~2
    minutes later (its BeginTime) with its first command. The study resubmits the run itself, so the
    requeued job would run beside the resubmission (for a finetune.py run, in a directory whose lock
    the resubmission holds: an error that then reads as the run's own). 1. The study's jobs are not
    requeueable: `scontrol requeue` is refused and the job runs to its end, one attempt, nothing
    left pending (before: requeued, retried, and the first job pending to start again). 2. With a
    LAUNCH that asks for --requeue, the requeued job, started again at once (StartTime=now), ends at
    once (SLURM_RESTART_COUNT) and leaves the run as the study's retry left it (before: it ran the
    command again, a third attempt). In 1 the study itself runs as in a job that SLURM requeued: its
    own SLURM_RESTART_COUNT must not reach its runs' jobs (sbatch hands its environment on, and the
    jobs would take themselves for restarts and end at once)."""
    for phase, launcher in (("default", "sbatch --wrap"), ("requeue", "sbatch --requeue --wrap")):
        monkeypatch.setenv("LAUNCH", launcher)
        if phase == "default":
            monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        else:
            monkeypatch.delenv("SLURM_RESTART_COUNT")
        s = make_study(tmp_path / phase)
        d = tmp_path / phase / "study" / "r"
        # (the command's own first file: the wrapper has started it and passes SIGTERM on by then)
        write = (f"import json, time; open({str(d / 'running')!r}, 'w'); time.sleep(4); "
                 f"json.dump({{}}, open({str(d / 'results.json')!r}, 'w'))")
        thread, _ = in_background(s.execute, [launch.Run(str(d), [sys.executable, "-c", write], str(d / "results.json"),
                                                         resumable=False)])
        wait_for(lambda: (d / "running").exists(), 60, "the job's command")
        first = json.loads((d / "started.json").read_text())["job_id"]
        requeue = subprocess.run(["scontrol", "requeue", first], env=cluster.env, capture_output=True, text=True)
        thread.join(timeout=120)
        out = capsys.readouterr().out
        assert not thread.is_alive() and s.failures == [] and (d / "results.json").exists(), out
        if phase == "default":
            assert requeue.returncode != 0, requeue  # "Requested operation is presently disabled"
            assert "RETRY" not in out and attempts(d) == 1, out
            wait_for(lambda: cluster.jobs()[first] not in ("RUNNING", "COMPLETING"), 30, "the job's end")  # (its last second)
            assert cluster.jobs()[first] == "COMPLETED"
        else:
            assert requeue.returncode == 0 and "RETRY r: failed (exit -15)" in out and attempts(d) == 2, out
            assert cluster.jobs()[first] == "PENDING"
            late_job_leaves_the_run_alone(cluster, d, first, "SLURM requeued job")


def test_slurm_jobs_an_earlier_invocation_left_queued_are_watched_not_submitted_again(cluster, tmp_path, monkeypatch, capsys):
    """A study stopped (a lost login session, Ctrl-C) or past its --max-wait leaves its jobs in the
    queue, and is run again. 1. The stage run again watches the queued job (submission.json's), and
    submits nothing: one job ran the run (before: it submitted a second job, and the first one,
    pending, would have run the command again later, beside or after it). 2. When the scheduler cannot
    be asked (squeue fails: a controller that does not answer), the stage submits the run again, as
    attempt 2, and the first job, once it starts, ends at once and leaves the run as attempt 2 left
    it (its `launch.py exec --attempt 1` finds attempt 2 in submission.json; before, it ran the
    command again). The first invocation gives up after --max-wait (~2 s) with its job pending
    (--begin an hour ahead), saying the job is left in the queue; the test starts it with
    `scontrol update StartTime=now` once the second invocation has asked the scheduler."""
    asked = threading.Event()
    real = launch.slurm_job_states
    monkeypatch.setattr(launch, "slurm_job_states", lambda jobs: (real(jobs), asked.set())[0])  # (a spy: squeue runs)
    for phase in ("watched", "unknown"):
        d = tmp_path / phase / "r"
        write = (f"import json, time; time.sleep(1); json.dump({{}}, open({str(d / 'results.json')!r}, 'w'))")
        run = lambda: launch.Run(str(d), [sys.executable, "-c", write], str(d / "results.json"), resumable=False)
        monkeypatch.setenv("LAUNCH", "sbatch --begin=now+3600 --wrap")
        first_study = make_study(tmp_path / phase, max_wait=0.0005)
        first_study.execute([run()])
        first = json.loads((d / "submission.json").read_text())["job_id"]
        out = capsys.readouterr().out
        assert cluster.jobs()[first] == "PENDING", out
        (_, message), = first_study.failures
        assert message.startswith("FAILED: ../r not finished within --max-wait 0.0005 h"), message
        assert f"(queued; job {first} is left in the queue)" in message, message
        monkeypatch.setenv("LAUNCH", "sbatch --wrap")
        if phase == "unknown":
            failing_squeue(tmp_path, monkeypatch)
        before = set(cluster.jobs())
        asked.clear()
        s = make_study(tmp_path / phase)
        thread, _ = in_background(s.execute, [run()])
        wait_for(asked.is_set, 60, "the second invocation's question to the scheduler")
        if phase == "watched":
            subprocess.run(["scontrol", "update", f"jobid={first}", "StartTime=now"], env=cluster.env, check=True)
        thread.join(timeout=120)
        out = capsys.readouterr().out
        assert not thread.is_alive() and s.failures == [] and (d / "results.json").exists(), out
        if phase == "watched":
            assert f"pending (submitted earlier as job {first})  ../r" in out and "run  ../r" not in out, out
            assert set(cluster.jobs()) == before, (before, cluster.jobs())  # no job submitted
            assert json.loads((d / "submission.json").read_text())["job_id"] == first
            wait_for(lambda: cluster.jobs()[first] == "COMPLETED", 30, "the job's end")
        else:
            monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
            assert "run  ../r (attempt 2)" in out and attempts(d) == 2, out
            second = json.loads((d / "submission.json").read_text())["job_id"]
            assert second != first and set(cluster.jobs()) - before == {second}
            late_job_leaves_the_run_alone(cluster, d, first, "was submitted again (attempt 2) after this job's attempt 1")


def failing_squeue(tmp_path, monkeypatch):
    """squeue fails from now on, as when the controller does not answer (a shim first on PATH)."""
    shim = tmp_path / "bin" / "squeue"
    shim.parent.mkdir()
    shim.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out on send/recv operation' >&2\nexit 1\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")


def test_slurm_a_suspended_job_is_waited_for_and_a_superseded_one_leaves_no_status(cluster, tmp_path, monkeypatch, capsys):
    """SLURM suspends a job (`scontrol suspend`; gang scheduling's preemption, PreemptMode=SUSPEND)
    with SIGSTOP, and resumes it later: its heartbeat stops meanwhile. 1. The study waits for a
    suspended job (squeue: SUSPENDED; the status line counts it) and its heartbeat timeout (2 s)
    starts again when it runs again (suspended for 6 s): one job, one attempt (before: it was called
    dead after 2 s and resubmitted while the first job, once resumed, ran on beside it). 2. When squeue
    cannot say so (it fails), the study takes the suspended job for dead and submits attempt 2;
    the first job, resumed after attempt 2 has ended, ends without writing status.json or a line of
    attempts.jsonl, which stay attempt 2's (before: its status replaced attempt 2's)."""
    monkeypatch.setenv("LAUNCH", "sbatch --wrap")
    for phase in ("suspended", "unknown"):
        d = tmp_path / phase / "r"
        write = (f"import json, time; open({str(d / 'running')!r}, 'w'); time.sleep(3); "
                 f"json.dump({{}}, open({str(d / 'results.json')!r}, 'w'))")
        s = make_study(tmp_path / phase, heartbeat_timeout=2, status_seconds=0.5)
        thread, _ = in_background(s.execute, [launch.Run(str(d), [sys.executable, "-c", write], str(d / "results.json"),
                                                         resumable=False)])
        wait_for(lambda: (d / "running").exists(), 60, "the job's command")
        first = json.loads((d / "started.json").read_text())["job_id"]
        if phase == "unknown":
            failing_squeue(tmp_path, monkeypatch)
        subprocess.run(["scontrol", "suspend", first], env=cluster.env, check=True)
        if phase == "suspended":
            time.sleep(6)
            assert cluster.jobs()[first] == "SUSPENDED"
            subprocess.run(["scontrol", "resume", first], env=cluster.env, check=True)
        thread.join(timeout=120)
        out = capsys.readouterr().out
        assert not thread.is_alive() and s.failures == [] and (d / "results.json").exists(), out
        if phase == "suspended":
            assert "RETRY" not in out and attempts(d) == 1 and "1 suspended" in out, out
            continue
        monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
        assert "RETRY ../r: dead (no heartbeat for over 2 s)" in out and attempts(d) == 2, out
        wait_for(lambda: (d / "status.json").exists(), 30, "attempt 2's status")  # (just after results.json)
        kept = {name: (d / name).read_bytes() for name in ("status.json", "attempts.jsonl")}
        assert json.loads(kept["status.json"])["job_id"] != first
        subprocess.run(["scontrol", "resume", first], env=cluster.env, check=True)
        wait_for(lambda: cluster.jobs()[first] == "COMPLETED", 60, "the first job's end")
        assert {name: (d / name).read_bytes() for name in kept} == kept
        assert "was submitted again (attempt 2) after this job's attempt 1, whose job the study no longer watches; " \
               "this job leaves no status" in (d / f"slurm-{first}.out").read_text()


def test_slurm_a_job_without_heartbeat_that_squeue_shows_running_is_cancelled_before_its_retry(cluster, tmp_path,
                                                                                                 monkeypatch, capsys):
    """A run whose heartbeat stops while its job runs on (its processes stopped outside SLURM, here by
    SIGSTOP; a node whose filesystem hangs; a lost node SLURM has not noticed yet) is taken for dead.
    Its job is cancelled (scancel) and the run retried once the job has ended: attempt 2 runs and
    the run is done, the first job CANCELLED. Before, the study resubmitted at once, beside the job
    still holding the run's lock (the command takes common.DirectoryLock, as finetune.py does): the
    run was reported LOCKED, for good, and the first job held its node to its time limit."""
    monkeypatch.setenv("LAUNCH", "sbatch --wrap")
    d = tmp_path / "r"
    write = (f"import json, sys, time; sys.path.insert(0, {REPO!r}); import common\n"
             f"with common.DirectoryLock({str(d)!r}, '--out-dir'):\n"
             f"    open({str(d / 'running')!r}, 'w'); time.sleep(3); json.dump({{}}, open({str(d / 'results.json')!r}, 'w'))\n")
    s = make_study(tmp_path, heartbeat_timeout=2, status_seconds=0.5)
    thread, _ = in_background(s.execute, [launch.Run(str(d), [sys.executable, "-c", write], str(d / "results.json"),
                                                     resumable=False)])
    wait_for(lambda: (d / "running").exists(), 60, "the job's command")
    first = json.loads((d / "started.json").read_text())["job_id"]
    pids = subprocess.run(["scontrol", "listpids", first], env=cluster.env, capture_output=True, text=True, check=True)
    for line in pids.stdout.splitlines()[1:]:  # (PID JOBID STEPID ...: the batch script, launch.py exec, the command)
        os.kill(int(line.split()[0]), signal.SIGSTOP)
    thread.join(timeout=120)
    out = capsys.readouterr().out
    assert not thread.is_alive() and s.failures == [] and (d / "results.json").exists(), out
    assert f"CANCEL ../r: dead (no heartbeat for over 2 s), yet squeue shows job {first} running; scancel'd" in out, out
    assert f"RETRY ../r: dead (no heartbeat for over 2 s; job {first} still running: cancelled); retry 1 of 2" in out, out
    assert "being cancelled" in out and attempts(d) == 2, out
    assert cluster.jobs()[first] == "CANCELLED"


# ----------------------------------------------------------------------------- no scheduler: a local background launcher

BACKGROUND = "sh -c 'setsid sh -c \"$0\" >/dev/null 2>&1 &'"  # starts the command and returns at once


@pytest.mark.slow
def test_local_sigkilled_run_is_found_dead_and_resumed_bitwise(tmp_path, monkeypatch, capsys):
    """No scheduler to ask: the killed run (SIGKILL to its whole process group, as a lost node) leaves
    no status.json; its heartbeat goes stale, and the study resubmits it with --resume."""
    models.resolve("tiny-mt5", DATA_DIR)
    monkeypatch.setenv("LAUNCH", BACKGROUND)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two runs on two cores
    s = make_study(tmp_path, heartbeat_timeout=3)
    a, b = tmp_path / "study" / "a", tmp_path / "study" / "b"
    a_flags = ["--max-steps", "60", "--eval-every", "20", "--seed", "1"]
    runs = [launch.Run(str(a), finetune_argv(a, *a_flags), str(a / "results.json")),
            launch.Run(str(b), finetune_argv(b, "--max-steps", "20", "--eval-every", "10"), str(b / "results.json"))]
    thread, _ = in_background(s.execute, runs)
    reference, _ = in_background(straight, tmp_path, "a-straight", *a_flags)
    wait_for(lambda: (a / "last" / "train_state.pt").exists(), 120, "A's first checkpoint")
    pid = json.loads((a / "started.json").read_text())["pid"]
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    out = capsys.readouterr().out
    assert s.failures == [] and (a / "results.json").exists() and (b / "results.json").exists(), out
    assert "RETRY a: dead (no heartbeat for over 3 s)" in out and "run  a (attempt 2 with --resume)" in out
    wait_for(lambda: (a / "status.json").exists(), 30, "the wrapper's status")  # written just after results.json
    assert len(history(a)) == 1  # the killed attempt left no status; the second one did
    reference.join(timeout=300)
    assert equal(weights(a), weights(tmp_path / "a-straight"))


def test_exec_a_sigterm_while_it_starts_its_command_is_passed_on_once_the_command_has_a_pid(tmp_path):
    """`launch.py exec` passes SIGTERM (scancel, a time limit) on to its command. One that comes while
    the command is being started -- sent here by the wrapper to itself as subprocess.Popen has started
    the command, before Popen returns -- is held and passed on once the command has a pid: the
    command ends by it, and the attempt's status says so. Before, the signal ended the wrapper there:
    no status.json, and the command ran on, orphaned."""
    run_dir, marker = tmp_path / "r", tmp_path / "still-running"
    command = [sys.executable, "-c", f"import pathlib, time; time.sleep(1.5); pathlib.Path({str(marker)!r}).touch()"]
    script = f"""
import os, signal, subprocess, sys
sys.path.insert(0, {REPO!r})
import launch

class Popen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)      # the command has started; Popen has not returned
subprocess.Popen = Popen
launch.main(launch.parse_args(["exec", "--run-dir", {str(run_dir)!r}, "--done", {str(tmp_path / "done")!r},
                               "--heartbeat-seconds", "1", "--"] + {command!r}))
"""
    wrapper = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    time.sleep(2)   # (an orphaned command would have touched the marker by now)
    assert (run_dir / "status.json").exists(), (wrapper.returncode, wrapper.stderr)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["returncode"] == -signal.SIGTERM and not status["done"], status
    # the wrapper ends as a shell reports a command killed by a signal, 128 + 15 (before: sys.exit(-15), 241)
    assert wrapper.returncode == 143 and not marker.exists(), (wrapper.returncode, wrapper.stderr)


def test_local_a_command_silent_past_the_stall_timeout_is_killed_and_retried(tmp_path, monkeypatch, capsys):
    """A command whose process hangs (a GPU or a filesystem that stopped answering) keeps its wrapper's
    heartbeat fresh: without a watchdog the study waits for it forever (a job, to its time limit).
    `launch.py exec` kills a command that writes nothing for --stall-timeout seconds (2 here) and
    says "hung" in its status; the study retries it: attempt 1 prints a line and sleeps, attempt 2
    prints a line every 0.5 s for 4 s (silent never more than 2 s: not killed) and is done."""
    monkeypatch.delenv("LAUNCH", raising=False)  # the local launcher: a `python -c` command runs as a subprocess
    d = tmp_path / "r"
    code = (f"import json, os, time\nif not os.path.exists({str(d / 'first')!r}):\n"
            f"    open({str(d / 'first')!r}, 'w'); print('started', flush=True); time.sleep(600)\n"
            f"for i in range(8):\n    print('working', i, flush=True); time.sleep(0.5)\n"
            f"json.dump({{}}, open({str(d / 'results.json')!r}, 'w'))\n")
    s = make_study(tmp_path, stall_timeout=2)
    thread, _ = in_background(s.execute, [launch.Run(str(d), [sys.executable, "-c", code], str(d / "results.json"),
                                                     resumable=False)])
    thread.join(timeout=120)
    out = capsys.readouterr().out
    assert not thread.is_alive() and s.failures == [] and (d / "results.json").exists(), out
    assert "RETRY ../r: hung (exit -9): no output for over 2 s, killed (--stall-timeout); retry 1 of 2" in out, out
    assert [(h["returncode"], h.get("hung")) for h in history(d)] == [(-9, 2), (0, None)]
    assert "launch.py exec: no output for over 2 s: the command is taken for hung and killed" in (d / "run.log").read_text()


@pytest.mark.slow
def test_local_a_stage_hung_in_the_launchers_own_process_is_killed_and_reported(tmp_path, capsys):
    """The local launcher runs the study's stage scripts in a forked child (run_stage_here), where the
    watchdog is a thread beside the hung stage: it writes the attempt's status and kills its own
    process. The hang is real: finetune.py waits for a token-cache entry's lock, which another
    process (this test) holds and never releases, as a job on a node that stopped would. With
    --max-retries 0 the study reports the run failed, hung, after --stall-timeout (3 s) of silence
    (before: it waited forever)."""
    cache = tmp_path / "tokens"
    subprocess.run(finetune_argv(tmp_path / "warm", "--token-cache", str(cache), "--max-steps", "1"), check=True,
                   capture_output=True)  # (builds the run's cache entries: their names and lock files)
    locks = [open(p, "a") for p in cache.glob("*.lock")]
    assert locks
    for lock in locks:
        shutil.rmtree(lock.name[:-len(".lock")])  # (the entry: built again, under its lock, by the next run)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        d = tmp_path / "r"
        s = make_study(tmp_path, stall_timeout=3, max_retries=0)
        thread, _ = in_background(s.execute, [launch.Run(str(d), finetune_argv(d, "--token-cache", str(cache)),
                                                         str(d / "results.json"))])
        thread.join(timeout=120)
        out = capsys.readouterr().out
        assert not thread.is_alive(), out
    finally:
        for lock in locks:
            lock.close()
    (_, message), = s.failures
    assert message == (f"FAILED (exit -9): ../r -- hung (exit -9): no output for over 3 s, killed (--stall-timeout) "
                       f"-- log: {d / 'run.log'}")
    assert json.loads((d / "status.json").read_text())["hung"] == 3
    log = (d / "run.log").read_text()
    assert "no output for over 3 s: the command is taken for hung and killed" in log and "Traceback" not in log, log


# ----------------------------------------------------------------------------- translation shards, a submit limit

STANDIN = os.path.join(DATA_DIR, "squad", "train-standin-v1.1.json.gz")


@pytest.mark.slow
def test_slurm_a_translation_in_three_shards_one_cancelled_merges_into_the_unsharded_file(cluster, tmp_path, monkeypatch,
                                                                                          capsys):
    """The study's translate path (Study.translation, execute_translations) with 3 shards as 3 SLURM
    jobs: shard 2 is cancelled with scancel after its first example, resubmitted, resumes from its
    progress file; the shards are merged into the file an unsharded run writes, byte for byte. The
    jobs ask for the translate kind's resources (--resources: time limit, CPUs)."""
    models.resolve("tiny-nllb", DATA_DIR)
    out = str(tmp_path / "study" / "translated" / "xquad.de.json")
    argv = [sys.executable, os.path.join(REPO, "translate_train.py"), "--model", "tiny-nllb", "--task", "xquad",
            "--train-file", STANDIN, "--tgt-lang", "de", "--limit", "300", "--chunk-size", "1", "--num-beams", "1",
            "--max-length-ratio", "0.5", "--data-dir", DATA_DIR, "--out-file", out]  # 15 paragraphs, ~20 s
    straight = str(tmp_path / "straight.json")
    subprocess.run(argv[:-1] + [straight], check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    monkeypatch.setenv("LAUNCH", "sbatch --wrap")
    resources = tmp_path / "resources.json"  # the translate kind's time limit and CPUs, as a cluster would give them
    resources.write_text(json.dumps({"translate": {"time": "0:20:00", "cpus": 1}}))
    s = make_study(tmp_path, translate_shards=3, heartbeat_timeout=60, resources=resources)
    runs, count = s.translation("xquad.de", argv, out, "translate-data")
    assert count == 3 and [r.argv[-2:] for r in runs] == [["--shard", f"{i}/3"] for i in (1, 2, 3)]
    thread, _ = in_background(s.execute_translations, [(argv, out, runs, count)])
    second = runs[1]
    progress = second.done_file + ".progress.jsonl"
    wait_for(lambda: os.path.exists(progress) and '"kind": "example"' in open(progress).read(), 180,
             "shard 2's first example")
    job = json.loads(open(os.path.join(second.dir, "started.json")).read())["job_id"]
    limits = subprocess.run(["squeue", "-h", "-j", job, "-o", "%l %C"], env=cluster.env, capture_output=True, text=True)
    assert limits.stdout.split() == ["20:00", "1"]  # the scheduler got the kind's resources
    subprocess.run(["scancel", job], check=True, env=cluster.env)
    thread.join(timeout=600)
    assert not thread.is_alive()
    printed = capsys.readouterr().out
    assert s.failures == [] and f"RETRY runs/translate/xquad.de.shard-2-of-3: failed (exit -{signal.SIGTERM.value})" in printed
    log = open(os.path.join(second.dir, "run.log")).read()
    assert log.count("$ ") == 2 and "already done" in log.split("$ ")[-1]
    resumed = int(log.split("$ ")[-1].split(" already done")[0].split(", ")[-1])
    assert 1 <= resumed < 5  # the second attempt went on from the first one's examples (of 5)
    assert open(out, "rb").read() == open(straight, "rb").read()
    assert not any(os.path.exists(r.done_file) for r in runs)  # the merge removed the shards


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A second real SLURM, with accounting (slurmdbd on MariaDB), and two clusters: "gpu2", whose node
    runs the jobs, with MaxSubmitJobs=2 for this user and a 3 s epilog after each job; and "login",
    a controller of its own on the same slurmdbd whose node runs nothing (a multi-cluster site).
    `site.env`: the environment of gpu2's login node; `site.login`: login's."""
    if not slurm_cluster.available(accounting=True):
        pytest.skip("SLURM accounting is not installed (.ci/run installs slurmdbd and mariadb-server)")
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm-site"), name="gpu2", max_submit_jobs=2,
                                    epilog_seconds=3).start()
    cluster.login = cluster.other_cluster("login")
    yield cluster
    cluster.stop()


@pytest.fixture
def limited_cluster(site, monkeypatch):
    """The study on gpu2's login node."""
    monkeypatch.setenv("SLURM_CONF", site.env["SLURM_CONF"])
    return site


def test_slurm_a_submit_limit_is_waited_out_and_max_queued_stays_under_it(limited_cluster, tmp_path, monkeypatch, capsys):
    """MaxSubmitJobs=2, five runs: sbatch refuses the third submission (AssocMaxSubmitJobLimit); the
    study defers it and submits again as jobs end: all five complete, none failed, and squeue never
    shows more than 2 of them pending or running. With --max-queued 2 the study never meets the
    refusal, although each job outlives its done file by 1.5 s (the scheduler still counts it; before,
    the study submitted the next run at once and was refused), and not across stages either: the
    throttled runs are two stages of one study. Yet it does not wait for a job's epilog (COMPLETING,
    which the limit does not count): it submits beside one. Each poll asks squeue once about all
    the stage's jobs."""
    monkeypatch.setenv("LAUNCH", "sbatch --wrap")
    calls = tmp_path / "squeue.calls"  # the study's squeue calls, through a shim that logs them and runs squeue
    shim = tmp_path / "bin" / "squeue"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec {shutil.which('squeue')} \"$@\"\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")
    seen, watching = [], threading.Event()

    def active():  # the user's jobs the scheduler's limit counts, and those in their epilog
        states = list(limited_cluster.jobs().values())
        return sum(state in ("PENDING", "RUNNING", "CONFIGURING") for state in states), states.count("COMPLETING")

    def sample():
        while not watching.is_set():
            seen.append(active())
            time.sleep(0.2)
    for phase, flags in (("refused", {}), ("throttled", {"max_queued": 2})):
        s = make_study(tmp_path / phase, **flags)
        runs = []
        for i in range(5):
            d = tmp_path / phase / f"r{i}"
            write = (f"import json, time; time.sleep(1); json.dump({{}}, open({str(d / 'results.json')!r}, 'w')); "
                     f"time.sleep(1.5)")  # the job's last seconds, after the run is done (3 polls)
            runs.append(launch.Run(str(d), [sys.executable, "-c", write], str(d / "results.json")))
        # the limit counts all this user's jobs, --max-queued the study's: start with none in the queue
        wait_for(lambda: active() == (0, 0), 60, "an empty queue")
        seen.clear()
        watching.clear()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for stage in ((runs,) if phase == "refused" else (runs[:3], runs[3:])):
            s.execute(stage)
        watching.set()
        sampler.join()
        out = capsys.readouterr().out
        assert s.failures == [] and all(os.path.exists(r.done_file) for r in runs), out
        assert max(counted for counted, _ in seen) == 2, seen
        deferred = out.count("deferred: sbatch says: sbatch: error: AssocMaxSubmitJobLimit")
        if phase == "refused":
            assert deferred >= 1, out
        else:
            assert deferred == 0, out
            # a slot used again during a job's epilog: the study's poll and sbatch take ~1 s of its
            # 3 s, so ~6 samples see it (1.5 s: 3 samples, too few on a loaded machine)
            assert (2, 1) in seen or (2, 2) in seen, seen
    # one squeue call per poll asks about every job the stage waits for, not one call per job
    asked = [line.split("-j ")[1].split()[0].split(",") for line in calls.read_text().splitlines() if "-j " in line]
    assert asked and max(len(jobs) for jobs in asked) >= 2, asked  # (before: one call per job, one id each)


def test_slurm_a_study_stopped_while_its_submission_is_deferred_counts_no_attempt(limited_cluster, tmp_path,
                                                                                   monkeypatch, capsys):
    """Two held jobs fill MaxSubmitJobs=2: the run's submission is deferred, and the study stops
    there (the launcher's submit, then nothing). The next invocation, the jobs gone, runs it as its
    first attempt: `run  r`, submission.json's attempt 1 (before: `run  r (attempt 2)`, as the
    deferred submission had left its number in submission.json)."""
    monkeypatch.setenv("LAUNCH", "sbatch --wrap")
    wait_for(lambda: not limited_cluster.jobs() or set(limited_cluster.jobs().values()) <= set(launch.SLURM_ENDED),
             60, "an empty queue")
    held = [launch.submitted_job(subprocess.run(["sbatch", "--hold", "--wrap", "true"], env=limited_cluster.env,
                                                check=True, capture_output=True, text=True).stdout) for _ in range(2)]
    d = tmp_path / "study" / "r"
    run = launch.Run(str(d), [sys.executable, "-c", f"open({str(d / 'results.json')!r}, 'w').write('{{}}')"],
                     str(d / "results.json"), resumable=False)
    try:
        assert make_study(tmp_path).launcher.submit(run) == "deferred"
    finally:
        subprocess.run(["scancel"] + held, env=limited_cluster.env, check=True)
    assert "deferred: sbatch says: sbatch: error: AssocMaxSubmitJobLimit" in capsys.readouterr().out
    s = make_study(tmp_path)
    s.execute([launch.Run(run.dir, run.argv, run.done_file, resumable=False)])
    out = capsys.readouterr().out
    assert s.failures == [] and os.path.exists(run.done_file), out
    assert "run  r\n" in out and "attempt 2" not in out, out
    assert attempts(d) == 1


@pytest.fixture
def two_clusters(site, monkeypatch):
    """The study on login's login node; its jobs go to gpu2 (whose limit of 2 and epilog do not
    matter to one job at a time)."""
    monkeypatch.setenv("SLURM_CONF", site.login["SLURM_CONF"])
    return site


def test_slurm_jobs_sent_to_another_cluster_are_watched_there(two_clusters, tmp_path, monkeypatch, capsys):
    """From cluster "login", the study sends its jobs to cluster "gpu2" (sbatch -M gpu2 or
    --clusters=gpu2). Job numbers are per cluster, and squeue on the login node sees gpu2's jobs
    only with -M gpu2. sbatch says "Submitted batch job N on cluster gpu2" (with --parsable:
    "N;gpu2"). Each run's submission must name the job that SLURM ran (its slurm-N.out), and a job
    that runs 12 s must not be taken for gone. Before, the trailing digits of the cluster's name were
    read as the job number (job 2), which squeue on the login node did not know: after 10 s the
    running job was called dead and retried. (A cluster name without digits gave no job number at all:
    only the heartbeat watched the job.)"""
    for phase, launcher, seconds in (("m", "sbatch -M gpu2 --wrap", 12), ("parsable", "sbatch --parsable --clusters=gpu2 --wrap", 1)):
        monkeypatch.setenv("LAUNCH", launcher)
        s = make_study(tmp_path / phase)
        d = tmp_path / phase / "r"
        write = f"import json, time; time.sleep({seconds}); json.dump({{}}, open({str(d / 'results.json')!r}, 'w'))"
        s.execute([launch.Run(str(d), [sys.executable, "-c", write], str(d / "results.json"))])
        out = capsys.readouterr().out
        assert s.failures == [] and "RETRY" not in out and attempts(d) == 1, out
        logs = [name for name in os.listdir(d) if name.startswith("slurm-")]  # sbatch's own log: slurm-N.out
        assert len(logs) == 1, logs
        number = logs[0][len("slurm-"):-len(".out")]
        assert json.loads((d / "submission.json").read_text())["job_id"] == f"{number};gpu2"
        assert f"submitted as job {number} on cluster gpu2" in out, out
