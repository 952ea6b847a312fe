"""The benchmarks bench/gpu.sh runs on a lent GPU keep what they measured when a step is cut: each
configuration's row is printed and its rates written as soon as it is measured."""

import json
import os
import subprocess
import sys
import time
import types

import pytest

from conftest import DATA_DIR, REPO

sys.path.insert(0, os.path.join(REPO, "bench"))

import generate_throughput  # noqa: E402
import train_throughput  # noqa: E402


def eager_row(seconds):
    """A training configuration's row as its child process prints it on an H200 (made-up figures)."""
    return {"mode": "ours", "flops": 6.0e14, "steps": 200, "real_tokens": 800_000, "padded_tokens": 850_000,
            "seconds": seconds, "first_pass_seconds": seconds + 1, "losses": None, "tokens_per_s": 800_000 / seconds,
            "padding_efficiency": 800_000 / 850_000, "peak_memory_mb": 30_000, "params": 582_000_000,
            "device": "cuda:0", "machine": "NVIDIA H200"}


@pytest.mark.parametrize("eager_seconds", [80, 215])
def test_training_bench_keeps_a_configuration_measured_before_the_step_is_cut(eager_seconds, tmp_path, monkeypatch,
                                                                             capsys):
    """gpu.sh gives training 220 s. Eager mT5-base takes ~80 s there and --mode-timeout gives the
    compiled configuration 150 s: when its compile ran long, the step was killed before the bench
    printed anything, and eager's rate, written at the end, was lost too. Now eager's row, its MFU
    (6e14 FLOPs in 40 s on a 989 TFLOP/s card: 1.5%) and its rate are out before the compiled one
    starts, and --budget 210 gives that one only what is left: 210 - 80 = 130 s; none after 215 s.
    (The configurations' processes are stood in for; the clock is the bench's, moved by hand.)"""
    rates = tmp_path / "rates.json"
    clock = [1000.0]
    monkeypatch.setattr(train_throughput, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                                          strftime=time.strftime))
    calls = []

    def run(argv, capture_output, text, timeout):
        mode = argv[argv.index("--mode") + 1]
        calls.append((mode, timeout))
        if mode == "ours":
            clock[0] += eager_seconds
            row = eager_row(40.0)
            return subprocess.CompletedProcess(argv, 0, stdout="log line\n" + json.dumps(row) + "\n", stderr="")
        recorded = json.loads(rates.read_text())          # eager's rate is on disk before this one runs
        assert recorded["train"]["eager"]["seconds"] == 40.0 and recorded["gpu"] == "NVIDIA H200"
        raise subprocess.TimeoutExpired(argv, timeout)
    monkeypatch.setattr(train_throughput.subprocess, "run", run)
    train_throughput.main(train_throughput.parse_args(
        ["--dims", "mt5-base", "--device", "cuda", "--modes", "ours,ours-compiled", "--mode-timeout", "150",
         "--budget", "210", "--rates", str(rates)]))
    out = capsys.readouterr().out
    assert "machine: NVIDIA H200" in out and "model FLOPs utilisation of ours" in out and ": 1.5% (15 TFLOP/s)" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("ours ")] == [["ours", "200"]]
    raw = json.loads(rates.read_text())
    assert raw["peak_flops"] == 989e12 and set(raw["train"]) == {"eager"} and raw["train"]["eager"]["flops"] == 6.0e14
    if eager_seconds == 80:
        assert calls == [("ours", 150), ("ours-compiled", 130)]
        assert "ours-compiled: did not finish in 130 s" in out
    else:
        assert calls == [("ours", 150)]
        assert "ours-compiled: not run, the --budget of 210 s is spent" in out


def test_decoding_bench_hands_each_configuration_over_before_the_next_runs(capsys):
    """generate_throughput.run_workload gives each configuration's row to on_row (where main writes
    its rates) as soon as it is measured: a bench cut during the third configuration has recorded
    the first two. Real run on CPU: the benchmark model, 3 XQuAD questions per language."""
    import loop
    import models
    args = generate_throughput.parse_args(["--data-dir", DATA_DIR, "--workloads", "xquad", "--per-lang", "3",
                                           "--configurations", "hf-sorted,ours,static"])
    device = loop.pick_device("cpu")
    tokenizer = models.load_tokenizer("tiny-mt5", DATA_DIR)
    model, family = generate_throughput.build_model("bench", tokenizer, device)
    model.eval()
    encoder = models.Seq2SeqEncoder(tokenizer, family, models.max_length(model.config))
    seen = []

    class Cut(Exception):
        pass

    def on_row(key, row):
        seen.append((key, row["same"], row["examples"], row["compared_with"]))
        if key == "ours":
            raise Cut   # as if the step's time limit ended the bench here
    with pytest.raises(Cut):
        generate_throughput.run_workload("xquad", args, model, tokenizer, encoder, device, on_row)
    # 3 questions x th, ro, vi; each decoded as the first, hf-sorted (what cost.py says beside a rate)
    assert seen == [("hf-sorted", 9, 9, "hf-sorted"), ("ours", 9, 9, "hf-sorted")]
    table = capsys.readouterr().out.split("configuration")[1].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["hf-sorted", "ours"]
