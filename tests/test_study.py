"""study.py and report.py: the LR-selection rule, the protocol's run count, the launcher, the report."""

import csv
import json
import statistics
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

import common
import finetune
import launch
import plan
import report
import adapt
import data
import study
from conftest import DATA_DIR, FIXTURES, REPO, run_cli


# ----------------------------------------------------------------------------- the LR-selection rule

def run_search(curve, method, grid=(3, 4, 5), k_range=(1, 7)):
    """Drive select_lr with a metric curve {lr: metric}; returns (LRs in the order tried, PLR)."""
    scores, order = {}, []
    while True:
        decision, value = plan.select_lr(scores, method, grid, k_range)
        if decision == "done":
            return order, value
        for lr in value:
            order.append(lr)
            scores[lr] = curve[lr]


def test_interior_optimum_then_three_times_for_full_finetuning():
    curve = {1e-3: 10.0, 1e-4: 20.0, 1e-5: 15.0, 3e-4: 25.0}
    assert run_search(curve, "adapters") == ([1e-3, 1e-4, 1e-5], 1e-4)
    order, plr = run_search(curve, "full")
    assert order == [1e-3, 1e-4, 1e-5, 3e-4] and plr == pytest.approx(3e-4)
    worse = {**curve, 3e-4: 5.0}
    assert run_search(worse, "full")[1] == 1e-4


def test_extension_to_larger_lrs_while_improving():
    # k* = 3 at the edge -> try 1e-2 (better) -> try 1e-1 (worse): k* = 2; full also tries 3e-2
    curve = {1e-3: 30.0, 1e-4: 20.0, 1e-5: 10.0, 1e-2: 35.0, 1e-1: 0.0, 3e-2: 36.0}
    assert run_search(curve, "prompt") == ([1e-3, 1e-4, 1e-5, 1e-2, 1e-1], 1e-2)
    order, plr = run_search(curve, "full")
    assert order[-1] == pytest.approx(3e-2) and plr == pytest.approx(3e-2)


def test_extension_to_smaller_lrs_stops_at_1e_7():
    # the metric keeps improving downwards: 1e-6, then 1e-7, and no further (k <= 7)
    curve = {1e-3: 0.0, 1e-4: 5.0, 1e-5: 9.0, 1e-6: 12.0, 1e-7: 13.0, 3e-7: 11.0}
    assert run_search(curve, "adapters") == ([1e-3, 1e-4, 1e-5, 1e-6, 1e-7], 1e-7)
    order, plr = run_search(curve, "full")
    assert order[-1] == pytest.approx(3e-7) and plr == 1e-7


def test_extension_upwards_stops_at_1e_1_and_failed_runs_never_win():
    curve = {1e-3: 3.0, 1e-4: 2.0, 1e-5: 1.0, 1e-2: 4.0, 1e-1: 5.0}
    assert run_search(curve, "adapters") == ([1e-3, 1e-4, 1e-5, 1e-2, 1e-1], 1e-1)
    assert plan.select_lr({1e-3: None, 1e-4: 10.0, 1e-5: 5.0}, "adapters") == ("done", 1e-4)
    assert plan.select_lr({}, "full") == ("run", [1e-3, 1e-4, 1e-5])
    assert plan.select_lr({1e-4: 1.0}, "full") == ("run", [1e-3, 1e-5])


def test_tiny_grid_searches_two_lrs():
    curve = {1e-2: 1.0, 1e-3: 2.0, 3e-3: 0.5}
    assert run_search(curve, "full", grid=(2, 3), k_range=(2, 3)) == ([1e-2, 1e-3, 3e-3], 1e-3)


# ----------------------------------------------------------------------------- the protocol's size

def expected_study_size():
    """The paper's protocol, two seeds, every search stopping at its initial grid (k* = 4, PLR = 1e-4):
      S = 2 seeds, M = 4 models, L = 5 target languages per task
      learning guard           1 per model and task                                        2 M = 8
      intermediate tuning      1 per model                                                     M = 4
      LR search                full 4 LRs (grid + 3e-4), adapters 3, prompt 3, LoRA 3; x S  2 x M x 13 S = 208
      methods                  {1e-4, 1e-3} x {no IT, IT}; the search has the no-IT pair of full,
                               adapters, prompt and LoRA (2 new settings each), freeze, mix, multisrc 4:
                               XL-Sum 4 x 2 + 3 x 4 = 20, XQuAD 4 x 2 + 2 x 4 = 16 settings; x M x S  = 288
      translations             the training data into L languages per task, and XQuAD's held-out
                               SQuAD dev slice into L                                      L + 2 L = 15
      translate-train search   4 LRs x L languages x S, per task and model            2 x M x 4 x L x S = 320
      mT5-large                its IT; per task IT + ft, XL-Sum IT + multisrc, data translation in L
                               languages, at 1e-5, x S; and the LR search of full, 4 LRs x S      1 + 14 + 12 + 16 = 43
      Appendix D               the best-for-English run's outputs translated, per task x 3 models x L = 30
      figures                  Figure 1's freeze and mix at 1e-3 are the methods stage's 10 x PLR runs; Figure 3's
                               third run of full finetuning at the PLR per task x model     2 x M = 8
      Appendix B               ZmBART-like IT per model, then freeze at the PLR per task x S  M + 2 x M x S = 20
      Appendix C               XL-Sum, mT5-base and mBART: mix at the PLR, {Prefix-LM, own task} x {0.01, 0.1,
                               0.5}, Prefix-LM at 0.01 being the methods stage's run; x S     2 x 5 x S = 20
    """
    S, M, L = 2, 4, 5
    guard, it = 2 * M, M
    search = 2 * M * 13 * S
    methods = (20 + 16) * M * S
    translations = L + 2 * L
    translate_search = 2 * M * 4 * L * S
    large = 1 + (S + S + L * S) + (S + L * S) + 2 * 4 * S
    appendix_d = 2 * 3 * L
    figures, appendix_b, appendix_c = 2 * M, M + 2 * M * S, 2 * 5 * S
    return guard + it + search + methods + translations + translate_search + large + appendix_d + figures + \
        appendix_b + appendix_c


def run_dry_run(out_dir, *flags):
    """The stdout of `run_all.sh --dry-run --out-dir OUT_DIR FLAGS`."""
    return subprocess.run(["bash", os.path.join(REPO, "run_all.sh"), "--dry-run", "--out-dir", str(out_dir), *flags],
                          capture_output=True, text=True, check=True).stdout


def dry_run_here(out_dir, capsys, *flags):
    """The stdout of run_dry_run, from study.py's stage list `all` in this process: the imports are
    paid once per test worker, not once per dry run (~1-3 s instead of ~7-10 s). That it lists what
    run_all.sh lists: test_full_scope_lists_the_same_runs_under_every_rouge_mode."""
    from conftest import run_cli
    code, out, err = run_cli(study, ["all", "--dry-run", "--out-dir", str(out_dir), *flags], capsys)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def full_dry_run(tmp_path_factory):
    """(study directory, stdout) of the full study's dry run, shared by the tests that read it."""
    out_dir = tmp_path_factory.mktemp("dry-run")
    return out_dir, run_dry_run(out_dir, "--scope", "full")


@pytest.mark.xdist_group("full-dry-run")  # (one worker: the module fixture is made once, not once per worker)
def test_dry_run_lists_every_run_of_the_protocol(full_dry_run):
    tmp_path, out = full_dry_run
    commands = [line for line in out.splitlines() if line.startswith("RUN ")]
    assert len(set(commands)) == len(commands)
    assert sum("pretrain_it.py" in c for c in commands) == 5 + 4  # 4 models and mT5-large; Appendix B's 4
    # each translation is one job or several shards (--shard I/N), each of them within --shard-hours
    translations = {}
    for c in commands:
        if "translate_train.py" in c:
            argv = shlex.split(c.split(" -- ", 1)[1])
            translations.setdefault(argv[argv.index("--out-file") + 1], []).append(argv)
    assert len(translations) == 15 + 30 and all("facebook/nllb-200-3.3B" in argv for jobs in translations.values() for argv in jobs)
    shards = sum(len(jobs) for jobs in translations.values())
    assert len(commands) - shards + len(translations) == expected_study_size() == 964
    assert_shards_fit(translations, 12 / 1.5 - 1 / 6)
    assert sum("--model google/mt5-large" in c for c in commands) == 43
    assert sum("--method multisrc" in c and "--task xquad" in c for c in commands) == 0
    assert not os.listdir(tmp_path)  # a dry run writes nothing
    finetunes = [finetune.parse_args(shlex.split(c.split(" -- ", 1)[1])[2:]) for c in commands if "finetune.py" in c]
    assert {a.seed for a in finetunes} == {0, 1, 2} and all(a.lr > 0 for a in finetunes)  # 2: Figure 3's third run
    # translate-train: trained on its language's translation, validated and tested in that language
    translate_train = [a for a in finetunes if a.train_lang != "en"]
    assert len(translate_train) == 320 + 2 * 5 * 2
    for a in translate_train:
        assert a.val_langs == a.test_langs == a.train_lang and f"translated/{a.task}.{a.train_lang}." in a.train_file
        if a.task == "xquad":  # no XQuAD validation set in other languages: the translated SQuAD dev slice
            assert a.val_file == [f"{a.train_lang}={tmp_path}/translated/squad-dev-heldout.{a.train_lang}.json"]
    # full finetuning's search validates in English too (XQuAD: the held-out SQuAD dev slice) and tests its last step
    search_full = [a for a in finetunes if a.method == "full" and a.init is None and a.train_lang == "en"
                   and a.model != "google/mt5-large" and "guard" not in a.out_dir]
    assert search_full and all(a.test_last and a.val_langs.endswith(",en") for a in search_full)
    assert all(a.val_file == [f"en={tmp_path}/heldout/squad-dev.en.json"] for a in search_full if a.task == "xquad")
    # mT5-large at the paper's 1e-5, after IT
    large = [a for a in finetunes if a.model == "google/mt5-large" and a.init is not None]
    assert len(large) == 2 * (1 + 5) * 2 + 2 and {a.lr for a in large} == {1e-5}
    # the cost table: every run counted once, in the stage that printed it, every one of them estimated
    table = out[out.index("estimated GPU-hours"):].split("\n\n")[0].splitlines()[1:]
    counts = {line.split()[0]: int(line.split()[1]) for line in table if line.strip()}
    assert counts.pop("total") == sum(counts.values()) == 964 and "not estimated" not in out
    # LoRA is searched like adapters: its own grid in the lr-search stage, then its four settings
    lora = [a for a in finetunes if a.method == "lora"]
    assert sorted({(a.lr, a.init is not None) for a in lora}) == [(1e-5, False), (1e-4, False), (1e-4, True),
                                                                   (1e-3, False), (1e-3, True)]
    assert sum("/lora-lr1e-05-seed" in a.out_dir for a in lora) == 2 * 4 * 2  # searched only: tasks x models x seeds
    assert counts["it"] == 5 and counts["appendix-d"] == 30
    assert counts["translate-data"] == 15  # translations, each one run of one or more shards (jobs)
    shards = sum(len(jobs) for out, jobs in translations.items() if "/translated/" in out)
    assert f"in {shards} shards" in [line for line in table if "translate-data" in line][0]


def assert_shards_fit(translations, shard_hours):
    """Each translation's shards: 1/N of it each, N the fewest whose estimate fits `shard_hours`
    (N - 1 would not), shards 1..N of N; XL-Sum's (306,522 articles) need many."""
    import cost
    for out, jobs in translations.items():
        argv = list(jobs[0])
        if "--shard" in argv:  # the whole translation: the same command without its shard
            del argv[argv.index("--shard"):argv.index("--shard") + 2]
        whole = sum(cost.run_hours(argv))
        count = len(jobs)
        if count == 1:
            assert "--shard" not in jobs[0] and whole <= shard_hours, out
            continue
        assert sorted(argv[argv.index("--shard") + 1] for argv in jobs) == sorted(f"{i}/{count}" for i in range(1, count + 1))
        assert whole / count <= shard_hours < whole / (count - 1), (out, whole, count)
    xlsum = [jobs for out, jobs in translations.items() if out.endswith("/translated/xlsum.fr.jsonl")]
    assert len(xlsum) == 1 and len(xlsum[0]) > 50


@pytest.mark.xdist_group("full-dry-run")
def test_dry_run_fits_every_job_in_its_kinds_time_limit_and_prints_the_disk_need(full_dry_run, tmp_path, monkeypatch,
                                                                                  capsys):
    """The jobs-per-kind table of the real study: no job's estimate times the margin exceeds its
    kind's limit (12 h by default); IT (~37 h a run) is cut into chunks of whole evaluation
    intervals. With --resources giving 4-hour finetuning partitions and LAUNCH=sbatch, the
    finetuning runs are cut finer, and each sbatch line carries its kind's partition, time, memory,
    CPUs and GPUs before LAUNCH's own options."""
    _, out = full_dry_run
    table = out[out.index("jobs per kind"):].splitlines()[1:]
    rows = {line.split()[0]: line for line in table if line.startswith("  ")}
    assert set(rows) == {"guard", "it", "finetune", "large", "translate"} and "EXCEEDS" not in out
    for kind, line in rows.items():
        longest, limit = float(line.split("longest job")[1].split()[0]), float(line.split("limit")[1].split()[0])
        assert longest * 1.5 + 1 / 6 <= limit + 0.05, line
    assert int(rows["translate"].split()[1]) == 45  # translations (XL-Sum's in many shards: jobs)
    runs, jobs = int(rows["it"].split()[1]), int(rows["it"].split()[3])
    assert runs == 5 + 4 and jobs >= 4 * runs  # (with Appendix B's) ~37-60 h of IT each: at least 4 jobs of under 8 h
    its = [line for line in out.splitlines() if line.startswith("RUN ") and "pretrain_it.py" in line]
    assert all("--stop-after-steps" in line for line in its)
    # the disk need: a finished mT5-base full run keeps best/ and last/ of 582,401,280 fp32 weights (mT5-base's
    # published 580M parameters, untied output layer); the study's total is printed beside the hours
    import cost
    argv = [None, "finetune.py", "--model", "google/mt5-base", "--task", "xquad", "--method", "full"]
    assert cost.run_disk(argv)[0] == 2 * 4 * 582_401_280
    adapters = cost.run_disk(argv[:-1] + ["adapters"])[0]
    assert adapters < cost.run_disk(argv)[0] / 50  # only the added weights are saved
    disk = float(out.split("\ndisk: ")[1].split(" TB")[0])
    assert 1 < disk < 10
    # a cluster's own limits
    resources = tmp_path / "resources.json"
    resources.write_text(json.dumps({"finetune": {"max_hours": 4, "partition": "gpu-short", "mem": "32G", "cpus": 8,
                                                  "gpus": 1},
                                     "it": {"max_hours": 48, "partition": "gpu-long", "time": "48:00:00"}}))
    monkeypatch.setenv("LAUNCH", "sbatch --account=lab --wrap")
    code, short, _ = run_cli(study, ["guard", "it", "lr-search", "--dry-run", "--out-dir", str(tmp_path / "s"),
                                     "--resources", str(resources)], capsys)
    assert code == 0
    table = short[short.index("jobs per kind"):].splitlines()[1:]
    rows = {line.split()[0]: line for line in table if line.startswith("  ")}
    assert "limit 4 h" in rows["finetune"] and "limit 48 h" in rows["it"] and "EXCEEDS" not in short
    lines = [line for line in short.splitlines() if line.startswith("RUN ")]
    finetunes = [line for line in lines if "finetune.py" in line and "/guard/" not in line]
    assert finetunes and all(line.startswith("RUN sbatch --partition=gpu-short --time=") for line in finetunes)
    assert all("--mem=32G --cpus-per-task=8 --gres=gpu:1 --no-requeue --output=" in line and " --account=lab --wrap '" in line
               for line in finetunes)
    hours = [int(line.split("--time=")[1].split(":")[0]) + int(line.split("--time=")[1].split(":")[1]) / 60
             for line in finetunes]
    assert max(hours) <= 4
    assert all(line.startswith("RUN sbatch --partition=gpu-long --time=48:00:00 --no-requeue --output=") for line in lines
               if "pretrain_it.py" in line)


def test_cost_model_counts_the_beam():
    """A beam of 4 decodes 4 hypotheses per source; the encoder still runs once: the FLOPs grow by
    3 decoder passes, not 4 times the whole (worked from beams 0, 1 and 4)."""
    import cost
    encoder = cost.generation_flops("facebook/nllb-200-3.3B", "it", 1000, generated=500, beams=0)
    greedy = cost.generation_flops("facebook/nllb-200-3.3B", "it", 1000, generated=500, beams=1)
    beam = cost.generation_flops("facebook/nllb-200-3.3B", "it", 1000, generated=500, beams=4)
    assert 0 < encoder < greedy and beam - encoder == 4 * (greedy - encoder)
    assert cost.translate_hours("facebook/nllb-200-3.3B", "xlsum", 1000)[1] == \
        cost.translate_hours("facebook/nllb-200-3.3B", "xlsum", 1000, beams=4)[1]  # translate_train.py's default beam


def test_cost_model_counts_the_real_weights():
    """mT5-base by hand: an encoder layer has 4 x 768 x 768 attention weights, 3 x 768 x 2048 gated
    feed-forward weights and 2 layer norms of 768; the first adds 32 x 12 relative-position
    buckets, the stack a final norm. The output layer: 250,112 x 768."""
    import cost
    (encoder, decoder, head), (enc_layers, dec_layers, width) = cost.weights("google/mt5-base")
    assert encoder == 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 32 * 12 + 768 == 84_954_240
    assert decoder == 12 * (8 * 768 * 768 + 3 * 768 * 2048 + 3 * 768) + 32 * 12 + 768  # + cross-attention, 3rd norm
    assert head == 250_112 * 768 and (enc_layers, dec_layers, width) == (12, 12, 768)


def _rates_file(tmp_path, monkeypatch, train, generate, gpu="NVIDIA H200", beam=None):
    """A rates file as bench/gpu.sh writes it, made the one cost.py prices with."""
    import cost
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"gpu": gpu, "date": "2026-12-03", "peak_flops": 989e12, "train": train,
                                "generate": generate, **({"beam": beam} if beam else {})}))
    monkeypatch.setenv("XLGEN_RATES", str(path))
    cost.read_rates.cache_clear()
    return path


EAGER = {"flops": 6.01e14, "seconds": 40.5}        # the H200's eager mT5-base training, 2026-11-26
DYNAMIC = {"flops": 2.06e13, "seconds": 11.5}      # its dynamic decoding of the 141 XL-Sum-length documents


def test_cost_prices_from_the_rates_file_bench_writes(tmp_path, monkeypatch):
    """The shipped rates are the 2026-11-26 measurement (1.5% MFU, the README's figure); a file with
    a compiled training path 4x as fast quarters a run's training hours and leaves its decoding; a
    compiled decoder 20x as fast cuts greedy decoding 20x for its family only, and beam search
    (translations) stays at the dynamic rate until a beam rate is measured."""
    import cost
    monkeypatch.delenv("XLGEN_RATES")
    cost.read_rates.cache_clear()
    shipped = cost.rates()
    assert round(shipped.train_mfu, 4) == 0.0150 and shipped.train_path == "eager"
    base = cost.finetune_hours("google/mt5-base", "xlsum")
    translation = cost.translate_hours("facebook/nllb-200-3.3B", "xlsum", 1000)[1]
    _rates_file(tmp_path, monkeypatch, {"eager": EAGER, "compiled": {"flops": 6.01e14, "seconds": 40.5 / 4}},
                {"mt5": {"dynamic": DYNAMIC, "compiled": {"flops": 2.06e13, "seconds": 11.5 / 20}},
                 "nllb": {"dynamic": DYNAMIC}})
    assert cost.rates().train_path == "compiled"
    fast = cost.finetune_hours("google/mt5-base", "xlsum")
    assert fast[0] == pytest.approx(base[0] / 4, rel=1e-12) and fast[1] == pytest.approx(base[1] / 20, rel=1e-12)
    assert cost.finetune_hours("facebook/nllb-200-distilled-600M", "xlsum")[1] == pytest.approx(
        20 * cost.finetune_hours("google/mt5-base", "xlsum")[1] * cost.generation_flops(
            "facebook/nllb-200-distilled-600M", "xlsum", 1) / cost.generation_flops("google/mt5-base", "xlsum", 1))
    assert cost.translate_hours("facebook/nllb-200-3.3B", "xlsum", 1000)[1] == pytest.approx(translation, rel=1e-12)
    # mBART was not measured: priced at mT5's rate
    assert cost.rates().decoding("facebook/mbart-large-50") == cost.rates().decoding("google/mt5-base")
    # a measured beam search (bench/gpu.sh's translate workload: HF generate, and the compiled static
    # decoder 8x as fast) prices translations at its fastest path, no longer at greedy's
    _rates_file(tmp_path, monkeypatch, {"eager": EAGER}, {"mt5": {"dynamic": DYNAMIC}, "nllb": {"dynamic": DYNAMIC}},
                beam={"nllb": {"hf-sorted": DYNAMIC, "compiled": {"flops": 2.06e13, "seconds": 11.5 / 8}}})
    assert cost.rates().beam["nllb"][1] == "compiled"
    assert cost.translate_hours("facebook/nllb-200-3.3B", "xlsum", 1000)[1] == pytest.approx(translation / 8, rel=1e-12)


def test_cost_says_how_many_predictions_of_each_priced_decoder_were_hf_generates(tmp_path, monkeypatch):
    """bench/gpu.sh's step 2 compares every decoder's predictions with HF generate's (its first
    configuration): the rate cost.py prices with is printed with that count, so a fast decoder whose
    tokens were not HF's shows it in the pricing. A decoder measured alone (step 3's compiled-auto
    for mBART: compared with itself) and the shipped file's entries (no count) say nothing."""
    import cost
    fast = {"flops": 2.06e13, "seconds": 0.5, "examples": 141, "same_as_first": 139, "compared_with": "hf-sorted"}
    alone = {"flops": 2.06e13, "seconds": 1.0, "examples": 141, "same_as_first": 141, "compared_with": "compiled-auto"}
    slow = {"flops": 2.06e13, "seconds": 11.5, "examples": 141, "same_as_first": 141, "compared_with": "hf-sorted"}
    _rates_file(tmp_path, monkeypatch, {"eager": EAGER},
                {"mt5": {"hf-sorted": slow, "compiled-auto": fast}, "mbart": {"compiled-auto": alone}},
                beam={"nllb": {"hf-sorted": slow, "compiled": dict(fast, same_as_first=281, examples=297)}})
    described = cost.rates().describe()
    assert "mt5 41.2 (compiled-auto; 139/141 as hf-sorted)" in described, described
    assert "mbart 20.6 (compiled-auto)" in described and "nllb 41.2 (compiled; 281/297 as hf-sorted)" in described
    monkeypatch.delenv("XLGEN_RATES")
    cost.read_rates.cache_clear()
    assert "decoding TFLOP/s mt5 1.8 (dynamic);" in cost.rates().describe()


def test_rates_file_errors_and_merges(tmp_path, monkeypatch):
    """A missing or malformed rates file is a one-line error naming it; record_rates adds a bench's
    paths beside the others' (temp file, then rename), and starts over for another GPU."""
    import common
    import cost
    path = _rates_file(tmp_path, monkeypatch, {"eager": EAGER}, {"mt5": {"dynamic": DYNAMIC}})
    cost.record_rates(str(path), ["generate", "mbart"], {"compiled": DYNAMIC}, "NVIDIA H200", "2026-12-04", 989e12)
    raw = json.loads(path.read_text())
    assert raw["train"] == {"eager": EAGER} and set(raw["generate"]) == {"mt5", "mbart"} and raw["date"] == "2026-12-04"
    cost.record_rates(str(path), ["train"], {"eager": EAGER}, "NVIDIA A100-SXM4-80GB", "2026-12-05", 312e12)
    raw = json.loads(path.read_text())
    assert raw["gpu"].startswith("NVIDIA A100") and "generate" not in raw and raw["peak_flops"] == 312e12
    with pytest.raises(common.UsageError, match=r"rates.json is not a rates file bench/gpu.sh writes \(KeyError"):
        cost.read_rates(str(path))   # no decoding rate measured on the A100 yet
    with pytest.raises(common.UsageError, match="no rates file .*nowhere.json; bash bench/gpu.sh writes it"):
        cost.read_rates(str(tmp_path / "nowhere.json"))
    assert cost.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    # the PCIe card: 1,513 TFLOP/s bf16 "with sparsity" on NVIDIA's H100 datasheet, half of it dense
    assert cost.peak_flops("NVIDIA H100 PCIe") == pytest.approx(1513e12 / 2, rel=1e-3)
    assert cost.peak_flops("NVIDIA H200 NVL") == pytest.approx(1671e12 / 2, rel=1e-3)
    with pytest.raises(common.UsageError, match="no bf16 peak known for 'Tesla T4'"):
        cost.peak_flops("Tesla T4")


def test_val_cap_reaches_every_finetuning_run_and_its_price(tmp_path, capsys):
    """study.py --val-cap N: every finetuning command validates on N examples per language
    (finetune.py --max-val-examples), its test sets untouched; cost.py prices the capped run: XL-Sum's
    five validation languages hold zh 4,670, fr 1,086, ko 550, ru 7,780 and es 4,763 examples, so a
    cap of 1,000 validates 4 x 1,000 + 550 = 4,550 of 18,849."""
    import cost
    out = run_cli(study, ["methods", "--dry-run", "--val-cap", "1000", "--out-dir", str(tmp_path)], capsys)[1]
    runs = [shlex.split(line[4:]) for line in out.splitlines() if line.startswith("RUN ") and "finetune.py" in line]
    assert runs and all(argv[argv.index("--max-val-examples") + 1] == "1000" for argv in runs)
    argv = [None, "finetune.py", "--model", "google/mt5-base", "--task", "xlsum"]
    (train, full), (train_capped, capped) = cost.run_hours(argv), cost.run_hours(argv + ["--max-val-examples", "1000"])
    test = cost.generate_hours(cost.generation_flops("google/mt5-base", "xlsum", cost.test_examples(
        "xlsum", data.TASKS["xlsum"].test_langs)), "google/mt5-base")
    per_example = cost.generate_hours(cost.generation_flops("google/mt5-base", "xlsum", 1), "google/mt5-base")
    assert train_capped == train and full - test == pytest.approx(10 * 18_849 * per_example)
    assert capped - test == pytest.approx(10 * 4_550 * per_example)
    args = finetune.parse_args(["--model", "tiny-mt5", "--task", "xquad", "--max-val-examples", "7", "--data-dir", DATA_DIR])
    corpus = finetune.read_corpus(args, finetune.check_args(args))
    assert {lang: len(refs) for lang, (_, refs) in corpus["val"].items()} == {"th": 7, "ro": 7, "vi": 7}
    assert all(len(refs) == 1190 for _, refs in corpus["test"].values())


def test_launch_prefix_in_dry_run(tmp_path, monkeypatch, capsys):
    from conftest import run_cli
    monkeypatch.setenv("LAUNCH", "sbatch --gres=gpu:1 --wrap")
    out = run_cli(study, ["it", "--dry-run", "--out-dir", str(tmp_path)], capsys)[1]
    lines = [line for line in out.splitlines() if line.startswith("RUN ")]
    assert len(lines) == 2  # --scope paper: IT of mT5-base and mBART
    for line in lines:
        wrapped = shlex.split(shlex.split(line)[-1])  # the command sbatch --wrap runs
        run_dir = wrapped[wrapped.index("--run-dir") + 1]
        log = os.path.join(run_dir, "slurm-%j.out")  # sbatch's log beside the run
        assert line.startswith("RUN sbatch --time=") and f" --output={log} --gres=gpu:1 --wrap '" in line, line
    monkeypatch.setenv("LAUNCH", "sbatch -o /logs/%j.out --wrap")  # the user's own --output is kept
    out = run_cli(study, ["it", "--dry-run", "--out-dir", str(tmp_path)], capsys)[1]
    lines = [line for line in out.splitlines() if line.startswith("RUN ")]
    assert lines and all(line.startswith("RUN sbatch --time=")
                         and line.split(None, 3)[3].startswith("--no-requeue -o /logs/%j.out --wrap '") for line in lines)


# ----------------------------------------------------------------------------- the launcher

def _study(tmp_path, **overrides):
    args = study.parse_args(["it", "--out-dir", str(tmp_path), "--data-dir", DATA_DIR, "--poll-seconds", "0.2"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return study.Study(args)


def _runs(tmp_path):
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    write = f"import json; json.dump({{'best_val_metric': 1.0}}, open({str(ok / 'results.json')!r}, 'w'))"
    return [(str(ok), [sys.executable, "-c", write], str(ok / "results.json")),
            (str(bad), [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], str(bad / "results.json"))]


@pytest.mark.parametrize("launch", ["", "bash -c"])
def test_runs_are_skipped_when_done_and_failures_retried_then_reported(tmp_path, capsys, monkeypatch, launch):
    """Here (no LAUNCH) and through a launcher that runs the command and returns (`bash -c`): the
    failing run is tried 1 + --max-retries times, then reported with its log; the good one is done."""
    monkeypatch.setenv("LAUNCH", launch)
    s = _study(tmp_path, max_retries=2)
    s.execute(_runs(tmp_path))
    out = capsys.readouterr().out
    assert (tmp_path / "ok" / "results.json").exists()
    log = tmp_path / "bad" / "run.log"
    assert out.count("RETRY bad: failed (exit 3)") == 2
    assert f"FAILED (exit 3): bad -- failed (exit 3) after 3 attempts -- log: {log}" in out
    assert log.read_text().splitlines().count("boom") == 3 and log.read_text().count("$ ") == 3
    assert [json.loads(line)["returncode"] for line in open(tmp_path / "bad" / "attempts.jsonl")] == [3, 3, 3]
    assert [run for run, _ in s.failures] == [str(tmp_path / "bad")]
    s.execute(_runs(tmp_path))  # again: the finished run is skipped, the failed one tried anew
    out = capsys.readouterr().out
    assert "skip (done)  ok" in out
    # (attempts go on counting: 3 more, the 4th to the 6th)
    assert "run  bad (attempt 4)" in out and "run  ok" not in out and "started earlier" not in out, out
    assert f"FAILED (exit 3): bad -- failed (exit 3) after 6 attempts -- log: {log}" in out
    assert log.read_text().count("$ ") == 6


def _writer(run_dir, *flags):
    """A run that writes its results.json, the file named by a word of its own (as a study's paths are)."""
    write = "import json, sys; json.dump({'best_val_metric': 1.0}, open(sys.argv[1], 'w'))"
    return launch.Run(str(run_dir), [sys.executable, "-c", write, str(run_dir / "results.json"), *flags],
                      str(run_dir / "results.json"))


def test_a_finished_run_asked_with_another_command_is_refused_not_skipped(tmp_path, capsys):
    """A study run again with other flags (here --max-val-examples, as --val-cap adds) names the same
    run directories: their results were made otherwise, so the stage stops with one line naming the
    run, the change and the file that recorded it, and leaves the run as it was. The same command
    is skipped, also from another interpreter and with the study directory moved (command.json keeps
    paths relative to it)."""
    study_dir = tmp_path / "study"
    s = _study(study_dir)
    run = _writer(study_dir / "runs" / "a", "--rouge-mode", "gem")
    s.execute([run])
    assert json.loads((study_dir / "runs" / "a" / "command.json").read_text()) == \
        {"argv": ["-c", run.argv[2], "$STUDY/runs/a/results.json", "--rouge-mode", "gem"]}
    results = (study_dir / "runs" / "a" / "results.json").read_text()
    capsys.readouterr()
    for flags, change in ((["--rouge-mode", "gem", "--max-val-examples", "1000"], "(none) -> --max-val-examples 1000"),
                          (["--rouge-mode", "xlsum"], "--rouge-mode gem -> --rouge-mode xlsum")):
        with pytest.raises(common.UsageError) as e:
            s.execute([_writer(study_dir / "runs" / "a", *flags)])
        assert str(e.value) == (f"--out-dir {study_dir}: runs/a finished with another command ({change}; "
                                f"{study_dir / 'runs' / 'a' / 'command.json'}); run the study with the flags it was "
                                f"run with, or in another --out-dir")
    assert "run  " not in capsys.readouterr().out
    command = study_dir / "runs" / "a" / "command.json"
    recorded = command.read_text()
    command.write_text('{"argv": "-c"}')  # hand-edited: not a list of words
    with pytest.raises(common.DataError, match=re.escape(f'{command}: expected {{"argv": [...]}}, the command')):
        s.execute([run])
    command.write_text(recorded)
    assert (study_dir / "runs" / "a" / "results.json").read_text() == results
    assert open(study_dir / "runs" / "a" / "run.log").read().count("$ ") == 1
    moved = tmp_path / "moved"
    os.rename(study_dir, moved)
    again = _writer(moved / "runs" / "a", "--rouge-mode", "gem")
    again.argv[0] = "/elsewhere/bin/python3"
    _study(moved).execute([again])
    assert capsys.readouterr().out.splitlines() == ["skip (done)  runs/a"]


def test_a_usage_or_data_error_is_not_retried(tmp_path, capsys, monkeypatch):
    """A command that refuses its input (its last line `error: ...`, as every stage script ends on a
    usage or data error) fails the same way on every attempt: reported at once, no retry; a crash
    (exit 3 after other output, the test above) is retried."""
    refuse = "import sys; print('loading'); sys.exit('error: --train-file x.json: file not found')"
    bad = tmp_path / "bad"
    s = _study(tmp_path, max_retries=2)
    s.execute([(str(bad), [sys.executable, "-c", refuse], str(bad / "results.json"))])
    out = capsys.readouterr().out
    assert "RETRY" not in out and len(open(bad / "attempts.jsonl").readlines()) == 1
    assert (f"FAILED (exit 1): bad -- error (exit 1): --train-file x.json: file not found (not retried: a usage or "
            f"data error, the same on every attempt) -- log: {bad / 'run.log'}") in out


def test_never_more_than_max_queued_jobs_at_once(tmp_path, capsys, monkeypatch):
    """--max-queued 2 through a launcher that starts each job in the background and returns: five
    jobs of about a second; the times each wrapper recorded (started.json, status.json) never
    overlap three deep, and all five complete."""
    monkeypatch.setenv("LAUNCH", "sh -c 'setsid sh -c \"$0\" >/dev/null 2>&1 &'")
    s = _study(tmp_path, max_queued=2, heartbeat_timeout=30.0)
    runs = []
    for i in range(5):
        d = tmp_path / f"r{i}"
        write = f"import json, time; time.sleep(1); json.dump({{}}, open({str(d / 'results.json')!r}, 'w'))"
        runs.append((str(d), [sys.executable, "-c", write], str(d / "results.json")))
    s.execute(runs)
    assert s.failures == [] and all(os.path.exists(done) for _, _, done in runs)
    for d, _, _ in runs:  # the status is written just after the result
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(d, "status.json")) and time.time() < deadline:
            time.sleep(0.1)
    spans = []
    for d, _, _ in runs:
        started = json.loads(open(os.path.join(d, "started.json")).read())["time"]
        ended = os.path.getmtime(os.path.join(d, "status.json"))
        spans.append((started, ended))
    deepest = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert deepest == 2, spans  # two at a time: never three, and the limit was used
    assert "3 not submitted yet" in capsys.readouterr().out  # the study said what waits


def test_a_failed_guard_stops_the_study_before_intermediate_tuning(tmp_path, capsys, monkeypatch):
    """Every guard run fails (here a missing --lid-model: a usage error, so each is tried once):
    the study stops after the guard with status 1 and the guard's logs, and starts no IT run;
    with --skip-guard it goes on to IT."""
    monkeypatch.delenv("LAUNCH", raising=False)
    flags = ["--tiny", "--data-dir", DATA_DIR, "--xlsum-dir", FIXTURES, "--lid-model", str(tmp_path / "no-lid.ftz")]
    code, out, _ = run_cli(study, ["guard", "it", "--out-dir", str(tmp_path / "s")] + flags, capsys)
    assert code == 1 and "GUARD: 4 guard run(s) failed" in out and "--skip-guard" in out
    assert "== stage it ==" not in out and not (tmp_path / "s" / "runs" / "it").exists()
    logs = [line for line in out.splitlines() if line.startswith("FAILED (exit 1): runs/guard/")]
    assert len(logs) == 4 and all("no-lid.ftz: file not found" in line and "log: " in line for line in logs)
    for model in ("tiny-mt5", "tiny-nllb"):
        assert len(open(tmp_path / "s" / "runs" / "guard" / model / "xquad" / "attempts.jsonl").readlines()) == 1
    # --skip-guard: the study goes on (LAUNCH 'true' submits and forgets: nothing runs, every wait ends at --max-wait)
    monkeypatch.setenv("LAUNCH", "true")
    code, out, _ = run_cli(study, ["guard", "it", "--out-dir", str(tmp_path / "t"), "--skip-guard", "--max-wait", "0.0003",
                                   "--poll-seconds", "0.2"] + flags, capsys)
    assert code == 1 and "GUARD:" not in out and "== stage it ==" in out and "run  runs/it/tiny-mt5" in out


def test_every_wait_is_bounded(tmp_path, capsys, monkeypatch):
    """A run that never starts (its launcher drops it) is given up after --max-wait, and the stage
    says what it waited for, at most once per --status-seconds."""
    monkeypatch.setenv("LAUNCH", "true")  # 'submits' and forgets: nothing will ever run
    s = _study(tmp_path, max_wait=0.0006, status_seconds=1.0)  # 2.16 s
    started = time.time()
    s.execute(_runs(tmp_path)[:1])
    out = capsys.readouterr().out
    assert 2 <= time.time() - started < 10
    assert "waiting for 1 run(s): 0 running, 1 queued, 0 done, 0 failed" in out
    assert 2 <= out.count("waiting for") <= 4  # about once a second, not at every poll (0.2 s)
    assert f"FAILED: ok not finished within --max-wait 0.0006 h (queued) -- log: {tmp_path / 'ok' / 'run.log'}" in out


# ----------------------------------------------------------------------------- the report

@pytest.mark.slow
def test_report_marks_missing_cells_and_lists_failed_runs(tmp_path):
    """Two real tiny runs and one failed run: the failed cell is marked, every table and figure is
    still written, and the failure is listed with its log."""
    root = tmp_path / "study"
    runs = {}
    for lr in (1e-3, 3e-3):
        d = root / "runs" / "xquad" / "tiny-nllb" / f"full-lr{lr:g}-seed0"
        finetune.main(finetune.parse_args([
            "--model", "tiny-nllb", "--task", "xquad", "--lr", str(lr), "--data-dir", DATA_DIR, "--out-dir", str(d),
            "--max-steps", "4", "--eval-every", "2", "--warmup-steps", "1", "--max-train-examples", "50",
            "--max-eval-examples", "3", "--max-new-tokens", "4", "--val-langs", "th", "--test-langs", "zh,es"]))
        runs[lr] = str(d)
    failed = root / "runs" / "xquad" / "tiny-nllb" / "adapters-lr0.001-seed0"
    failed.mkdir(parents=True)
    (failed / "status.json").write_text(json.dumps({"returncode": 1, "done": False}))
    (failed / "run.log").write_text("Traceback ...")
    meta = {"task": "xquad", "model": "tiny-nllb", "it": False, "plr": 1e-3, "seed": 0}
    plan = {runs[1e-3]: dict(meta, stage="lr-search", method="full", lr=1e-3),
            runs[3e-3]: dict(meta, stage="lr-search", method="full", lr=3e-3),
            str(failed): dict(meta, stage="lr-search", method="adapters", lr=1e-3)}
    chosen = {"xquad/tiny-nllb/full": {"runs": [runs[1e-3]], "lr": 1e-3, "it": False, "plr": 1e-3, "val_metric": 0.0},
              "xquad/tiny-nllb/adapters": {"runs": [str(failed)], "lr": 1e-3, "it": False, "plr": 1e-3, "val_metric": None}}
    translated = root / "runs" / "xquad" / "tiny-nllb" / "full-lr0.001-train_es-seed0"  # translate-train, same LR
    plan[str(translated)] = dict(meta, stage="translate-search", method="full", lr=1e-3, train_lang="es")
    # the zero-shot settings keep their runs whatever else shares their LR (before: the LR was dropped)
    assert report.zero_shot_settings(plan, "xquad", "tiny-nllb", "full", False) == {
        (1e-3, False): [runs[1e-3]], (3e-3, False): [runs[3e-3]]}
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "chosen.json").write_text(json.dumps(chosen))
    report.main(report.parse_args(["--out-dir", str(root)]))
    out = root / "report"
    methods = (out / "fig2_methods_xquad.md").read_text()
    assert "| adapters | — |" in methods and "| full | 0.00 (" in methods
    rows = list(__import__("csv").reader(open(out / "fig2_methods_xquad.csv")))
    assert rows[0] == ["method", "tiny-nllb", "runs"] and "runs/xquad/tiny-nllb/full-lr0.001-seed0" in rows[1][2]
    for name in ("sanity_guard.md", "table1_it_gain.md", "table2_mt5_large.md", "table3_appendix_d.md", "table4_lrs.csv",
                 "fig7_per_language_xquad.csv", "fig4_examples.md", "fig1_lr_xquad.png", "fig2_methods_xquad.png",
                 "fig3_models_xquad.png", "fig7_per_language_xquad_tiny-nllb.png", "fig8_11_lr_xquad_tiny-nllb_full.png",
                 "curves_xquad_tiny-nllb.png", "report.md"):
        assert (out / name).exists(), name
    assert "| tiny-nllb | full |" in (out / "fig4_examples.md").read_text()  # the Spanish example, full's output
    text = (out / "report.md").read_text()
    assert f"`{failed}` failed (exit 1); log: `{failed / 'run.log'}`" in text


def test_the_report_of_a_summarisation_task_without_results_has_its_rouge_mode_tables(tmp_path):
    """Whether the report tabulates ROUGE modes (summarisation) or the filtered question set (QA) is
    the task's kind's, not read from a finished run: with XL-Sum's only run failed, its ROUGE-mode
    tables are written (cells marked missing) and no QA filtered-question table for it."""
    root = tmp_path / "study"
    failed = root / "runs" / "xlsum" / "tiny-mt5" / "full-lr0.001-seed0"
    failed.mkdir(parents=True)
    (failed / "status.json").write_text(json.dumps({"returncode": 1, "done": False}))
    (failed / "run.log").write_text("Traceback ...")
    meta = {"task": "xlsum", "model": "tiny-mt5", "it": False, "plr": 1e-3, "seed": 0, "method": "full", "lr": 1e-3}
    (root / "plan.json").write_text(json.dumps({str(failed): dict(meta, stage="lr-search")}))
    (root / "chosen.json").write_text(json.dumps({"xlsum/tiny-mt5/full": {"runs": [str(failed)], "lr": 1e-3, "it": False,
                                                                          "plr": 1e-3, "val_metric": None}}))
    report.main(report.parse_args(["--out-dir", str(root)]))
    out = root / "report"
    assert (out / "rouge_modes_xlsum.md").exists() and (out / "plr_modes_xlsum.md").exists()
    assert not (out / "filtered_xlsum.md").exists()
    assert "| tiny-mt5 | full |" in (out / "rouge_modes_xlsum.md").read_text()


def write_run(directory, seed, metric, lcr, val, lr=1e-3):
    """A finished run's results.json, written by hand: the numbers the study and the report read."""
    os.makedirs(directory, exist_ok=True)
    results = {"config": {"task": "xquad", "max_steps": 20}, "best_val_metric": val,
               "test": {"es": {"f1_filtered": metric, "lcr_filtered": lcr}},
               "test_average": {"f1_filtered": metric, "lcr_filtered": lcr}}
    open(os.path.join(directory, "results.json"), "w").write(json.dumps(results))
    return {"stage": "lr-search", "task": "xquad", "model": "m", "method": "full", "lr": lr, "it": False, "seed": seed}


def test_seeds_are_averaged_for_selection_and_in_the_report(tmp_path):
    """Hand-worked: seeds of 1e-3 validate at 10 and 30 (mean 20), of 1e-4 at 25 and 5 (mean 15): the
    mean picks 1e-3 although the best single run is 1e-4's 25. The report shows mean ± sd:
    test 10 and 20 -> 15.00 ± 7.07 (sd of two values = |a - b| / sqrt(2))."""
    s = _study(tmp_path, seeds="0,1")
    runs = {}
    for lr, vals in ((1e-3, (10.0, 30.0)), (1e-4, (25.0, 5.0))):
        for seed, val in enumerate(vals):
            d = str(tmp_path / f"full-lr{lr:g}-seed{seed}")
            s.plan.runs[d] = write_run(d, seed, metric=10.0 + 10 * seed, lcr=80.0 + 10 * seed, val=val, lr=lr)
            runs.setdefault(lr, []).append(d)
    assert s.seeds == [0, 1]
    assert s.mean_val(runs[1e-3]) == 20.0 and s.mean_val(runs[1e-4]) == 15.0
    scores = {lr: s.mean_val(dirs) for lr, dirs in s.plan.by_lr(stage="lr-search").items()}
    assert plan.best_lr(scores) == 1e-3
    assert report.setting_cell(runs[1e-3], s.plan.runs, "xquad") == "15.00 ± 7.07 (85 ± 7)"
    assert report.spread([3.0]) == "3.00" and report.spread([None, None]) == "—"


# ----------------------------------------------------------------------------- a search in which every run failed

def test_select_lr_gives_no_plr_when_every_run_failed():
    # before: the rule walked down to 1e-7 and reported it as the PLR
    assert plan.select_lr({1e-3: None, 1e-4: None, 1e-5: None}, "full") == ("failed", None)
    assert plan.select_lr({1e-3: None, 1e-4: None, 1e-5: None, 1e-6: None}, "adapters") == ("failed", None)
    # a partial failure keeps the rule: the failed LR never wins
    assert plan.select_lr({1e-3: None, 1e-4: 2.0, 1e-5: 1.0}, "adapters") == ("done", 1e-4)


@pytest.mark.slow
def test_an_all_failed_search_stops_names_its_logs_and_launches_nothing_that_depends_on_it(tmp_path, monkeypatch, capsys):
    from conftest import run_cli
    monkeypatch.setattr(data, "finetune_tasks", lambda: ["xquad"])
    monkeypatch.setattr(adapt, "searched_methods", lambda: ["full"])  # the other methods then also lack a PLR
    init = study.Study.__init__

    def one_model(self, args):  # one task and one model keep the test short; the rule is per combination
        init(self, args)
        self.models, self.method_models = {"tiny-mt5": "tiny-mt5"}, ["tiny-mt5"]
    monkeypatch.setattr(study.Study, "__init__", one_model)
    # the runs are to fail (no training data); the study's own up-front check of its data would stop it first
    monkeypatch.setattr(study, "missing_inputs", lambda study_, stages: [])
    empty = tmp_path / "no-data"  # only what the study reads itself (XQuAD en, SQuAD dev: the held-out slice)
    for rel in ("xquad/xquad.en.json", "squad/dev-v1.1.json.gz"):
        (empty / rel).parent.mkdir(parents=True, exist_ok=True)
        (empty / rel).symlink_to(os.path.join(DATA_DIR, rel))
    argv = ["--tiny", "--out-dir", str(tmp_path / "s"), "--data-dir", str(empty), "--max-retries", "0"]
    code, out, err = run_cli(study, ["lr-search"] + argv, capsys)
    assert code == 1
    runs = sorted(str(p.parent) for p in (tmp_path / "s" / "runs" / "xquad").glob("*/*/run.log"))
    assert len(runs) == 2  # the two LRs of the tiny grid, no more (before: walked down to smaller LRs)
    for run in runs:
        assert "train-v1.1.json: file not found" in open(os.path.join(run, "run.log")).read()
    logs = ", ".join(os.path.join(r, "run.log") for r in runs)
    assert f"NO PLR xquad tiny-mt5 full: every run of the search failed; logs: {logs}" in out
    assert "PLR xquad" not in out.replace("NO PLR xquad", "")
    code, out, err = run_cli(study, ["methods"] + argv, capsys)  # nothing to launch: every combination lacks its PLR
    assert code == 0 and not [line for line in out.splitlines() if line.startswith("run  ")]
    # every method of XQuAD is skipped (multisrc does not apply: English training data only), each naming its search
    # (--scope paper: the paper's methods, LoRA left out)
    assert out.count("skip xquad") == len(adapt.paper_methods("xquad")) == len(adapt.REGISTRY) - 2
    assert "no PLR (every run of the full search failed)" in out
    assert sorted(str(p.parent) for p in (tmp_path / "s" / "runs" / "xquad").glob("*/*/run.log")) == runs


# ----------------------------------------------------------------------------- real outputs

def test_real_outputs_section_matches_the_evaluate_command_line(tmp_path, capsys):
    from conftest import run_cli
    import csv
    import evaluate
    predictions = os.path.join(DATA_DIR, "xquad", "predictions")
    code, out, err = run_cli(report, ["--predictions", predictions, "--data-dir", DATA_DIR, "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err
    rows = {(r["system"], r["data"]): r for r in csv.DictReader(open(tmp_path / "real_outputs.csv"))}
    assert len(rows) == 6 and (tmp_path / "fig_real_outputs.png").stat().st_size > 10_000
    code, out, _ = run_cli(evaluate, ["--task", "xquad", "--lang", "en", "--references",
                                      os.path.join(DATA_DIR, "xquad", "xquad.en.json"), "--predictions",
                                      os.path.join(predictions, "CL-mt5base.en.json")], capsys)
    cli = json.loads(out)
    row = rows[("CL-mt5base", "XQuAD en")]
    assert (row["F1"], row["F1 (filtered)"], row["EM"]) == (f"{cli['f1']:.2f}", f"{cli['f1_filtered']:.2f}", f"{cli['em']:.2f}")
    assert (row["LCR (all)"], row["LCR (filtered)"]) == (f"{cli['lcr']:.1f}", f"{cli['lcr_filtered']:.1f}")
    # the all-answer LCR of English outputs is ~88% (language ID failing on short answers), the filtered one near 100
    assert 85 < cli["lcr"] < 91 and cli["lcr_filtered"] > 95
    for r in rows.values():
        assert float(r["LCR (filtered)"]) > float(r["LCR (all)"])


def test_lid_model_and_it_lr_reach_every_run(tmp_path, capsys):
    """--lid-model reaches every finetuning run; --it-lr the IT run of its model only; a model the
    study does not have is a one-line error. (In this process: the dry run as the command line runs it.)"""
    from conftest import run_cli
    lid = tmp_path / "lid.176.bin"
    code, out, _ = run_cli(study, ["all", "--dry-run", "--out-dir", str(tmp_path), "--lid-model", str(lid),
                                   "--it-lr", "mt5-base=3e-5,nllb-600m=1e-4", "--scope", "full"], capsys)
    assert code == 0
    commands = [line for line in out.splitlines() if line.startswith("RUN ")]
    finetunes = [c for c in commands if "finetune.py" in c]
    assert len(finetunes) > 700 and all(f"--lid-model {lid}" in c for c in finetunes)
    # the paper's ROUGE by default (--rouge); the learning guard keeps finetune.py's (it checks learning, in English)
    assert all("--rouge-mode gem" in c for c in finetunes if "/runs/guard/" not in c)
    it = {shlex.split(c)[shlex.split(c).index("--model") + 1]: c for c in commands if "pretrain_it.py" in c
          and "--objective zmbart" not in c}
    # (the dry run's jobs of a long run also carry --stop-after-steps, the launcher's chunk: after --lr)
    assert it["google/mt5-base"].split(" --stop-after-steps ")[0].endswith("--lr 3e-05")
    assert it["facebook/nllb-200-distilled-600M"].split(" --stop-after-steps ")[0].endswith("--lr 0.0001")
    assert "--lr" not in it["google/mt5-large"].split(" -- ", 1)[1]
    code, _, err = run_cli(study, ["it", "--dry-run", "--out-dir", str(tmp_path), "--it-lr", "mt5-small=1e-4"], capsys)
    assert code != 0 and err.strip().splitlines()[-1].startswith(
        "error: --it-lr: unknown model 'mt5-small'; the study's models are mt5-base")


@pytest.mark.slow
def test_appendix_d_translates_the_best_english_lrs_outputs_and_table3_compares(tmp_path, monkeypatch):
    """Hand-made search of full finetuning: LR 1e-3 validates at 20 (non-English) and 5 (English),
    1e-4 at 10 and 30. So best-for-English is 1e-4 and best-non-English 1e-3. The stage translates
    1e-4's last-step Spanish outputs (English answers) into Spanish with tiny-nllb -- a real
    translate_train.py --predictions run -- and Table 3 scores the translation against XQuAD es
    beside 1e-3's own last-step score (7.00, from its results)."""
    monkeypatch.setattr(data, "finetune_tasks", lambda: ["xquad"])
    s = _study(tmp_path, tiny=True)
    s.appendix_d_models = ["tiny-mt5"]
    questions = data.read_squad(data.xquad_path(DATA_DIR, "en"))[:6]  # XQuAD ids are the same in every language
    for lr, non_en, en, last in ((1e-3, 20.0, 5.0, 7.0), (1e-4, 10.0, 30.0, 3.0)):
        d = tmp_path / "runs" / f"full-lr{lr:g}-seed0"
        (d / "eval").mkdir(parents=True)
        (d / "predictions").mkdir()
        (d / "eval" / "step_20.json").write_text(json.dumps({"main_metric": "f1_filtered", "langs": {
            "th": {"f1_filtered": non_en}, "en": {"f1_filtered": en}}}))
        (d / "predictions" / "test_last.es.json").write_text(json.dumps({q["id"]: q["answers"][0] for q in questions}))
        (d / "results.json").write_text(json.dumps({
            "config": {"task": "xquad", "max_steps": 20, "data_dir": DATA_DIR, "xlsum_dir": None},
            "best_val_metric": non_en, "test_last_average": {"f1_filtered": last, "lcr_filtered": 50.0}}))
        s.plan.runs[str(d)] = {"stage": "lr-search", "task": "xquad", "model": "tiny-mt5", "method": "full", "lr": lr,
                          "it": False, "seed": 0}
    study.stage_appendix_d(s)
    assert s.launcher.failures == []
    [(run_dir, meta)] = [(d, m) for d, m in s.plan.runs.items() if m["stage"] == "appendix-d"]
    assert (meta["best_en_lr"], meta["best_non_en_lr"], meta["lang"]) == (1e-4, 1e-3, "es")
    assert meta["source_run"] == str(tmp_path / "runs" / "full-lr0.0001-seed0")
    translated = json.loads(open(meta["translated"]).read())
    assert sorted(translated) == sorted(q["id"] for q in questions)  # every output translated, by id
    assert "--model tiny-nllb --tgt-lang es" in open(os.path.join(run_dir, "run.log")).readline()
    table = report.table3_appendix_d(s.plan.runs)
    [row] = table.rows
    score = report.score_translated(meta)
    assert row[:3] == ["xquad", "tiny-mt5", "0.0001"] and row[4:] == ["0.001", "7.00"]
    assert score is not None and row[3] == report.fmt(score)


def test_translate_train_search_selects_on_the_mean_over_its_languages_and_seeds(tmp_path, monkeypatch):
    """The translate-train LR search with hand-made validation scores (each run validated in its own
    language). Per LR, the five languages' mean over two seeds: 1e-3: es 50 (seed 0) and 30 (seed 1),
    the others 10 -> (40 + 40) / 5 = 16; 1e-4: 20 everywhere -> 20; 1e-5: 5; then full finetuning's
    3 x 10^-k*: 3e-4: 15. So the chosen LR is 1e-4, although Spanish alone and the best single run
    prefer 1e-3; it inherits zero-shot full finetuning's IT choice."""
    monkeypatch.setattr(data, "finetune_tasks", lambda: ["xquad"])
    zero_shot = {"runs": [], "lr": 1e-3, "it": True, "plr": 1e-3, "val_metric": 1.0}
    (tmp_path / "chosen.json").write_text(json.dumps({"xquad/mt5-base/full": zero_shot}))  # the methods stage's
    s = _study(tmp_path, seeds="0,1", translate_shards=1)  # (one job per translation: no merge to fake)
    s.models = {"mt5-base": study.MODELS["mt5-base"]}
    scores = {1e-3: {"es": (50.0, 30.0)}, 1e-4: {}, 1e-5: {}, 3e-4: {}}
    default = {1e-3: 10.0, 1e-4: 20.0, 1e-5: 5.0, 3e-4: 15.0}
    launched = []

    def fake_execute(self, runs):  # what the runs would leave behind
        for run in runs:
            os.makedirs(run.dir, exist_ok=True)
            meta = self.plan.runs[run.dir]
            if meta["stage"] == "translate-data":
                os.makedirs(os.path.dirname(run.done_file), exist_ok=True)
                open(run.done_file, "w").write("{}")
                continue
            launched.append(run.argv)
            lang, lr, seed = meta["train_lang"], meta["lr"], meta["seed"]
            value = scores[lr].get(lang, (default[lr],) * 2)[seed]
            open(run.done_file, "w").write(json.dumps({"best_val_metric": value}))
    monkeypatch.setattr(study.Study, "execute", fake_execute)
    study.stage_translate(s)
    chosen = json.loads((tmp_path / "chosen.json").read_text())["xquad/mt5-base/translate"]
    assert chosen["lr"] == 1e-4 and chosen["it"] is True and chosen["val_metric"] == 20.0
    assert len(chosen["runs"]) == 5 * 2 and all("-it-train_" in d for d in chosen["runs"])
    lrs = sorted({float(a[a.index("--lr") + 1]) for a in launched})
    assert lrs == [1e-5, 1e-4, 3e-4, 1e-3] and len(launched) == 4 * 5 * 2
    for argv in launched:  # each run validates and tests in the language it was trained on
        lang = argv[argv.index("--train-lang") + 1]
        assert argv[argv.index("--val-langs") + 1] == argv[argv.index("--test-langs") + 1] == lang


# ----------------------------------------------------------------------------- behaviour kept through the refactor

def dry_run_commands(out, text):
    """(run directory, command) of every RUN line of a dry run's output `text`, with the paths that
    differ between machines named: PYTHON, REPO, OUT, DATA (../shared/data)."""
    found = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            words = shlex.split(line[4:])
            record = words[words.index("--run-dir") + 1] + "\t" + shlex.join(words[words.index("--") + 1:])
            for path, name in ((sys.executable, "PYTHON"), (str(out), "OUT"), (DATA_DIR, "DATA"), (REPO, "REPO")):
                record = record.replace(path, name)
            found.append(record)
    return found


@pytest.mark.parametrize("name,flags", [("full", []), ("tiny", ["--tiny", "--data-dir", DATA_DIR, "--xlsum-dir",
                                                                 os.path.join(REPO, "tests", "fixtures", "xlsum")])])
@pytest.mark.xdist_group("full-dry-run")
def test_dry_run_lists_the_commands_recorded_before_the_refactor(name, flags, tmp_path, full_dry_run, capsys):
    """tests/fixtures/dry_run/NAME.txt.gz is the dry run of commit c782168, before the method
    registry, the task table and launch.py (run directory and command of each RUN line). The same
    flags list the same commands in the same order, except: the runs of methods added since (found
    by the registry), and the guard's example files, which the dry run now names as the study writes
    them (OUT/guard/TASK.en.EXT; before, a placeholder without the extension); and what the launcher
    adds per job since: a long run's chunk (--stop-after-steps N) and a translation's shards
    (--shard I/N, in run directories NAME.shard-I-of-N), here folded back into the one command; and
    the ROUGE every finetuning run is now told (--rouge-mode gem: the study's --rouge), taken out."""
    import gzip
    with gzip.open(os.path.join(REPO, "tests", "fixtures", "dry_run", f"{name}.txt.gz"), "rt") as f:
        recorded = f.read().splitlines()
    recorded = [line.replace("OUT/guard/xquad.en ", "OUT/guard/xquad.en.json ").replace(
                "OUT/guard/xlsum.en ", "OUT/guard/xlsum.en.jsonl ") for line in recorded]
    old_methods = ("full", "freeze", "adapters", "prompt", "mix", "multisrc")
    out_dir, text = full_dry_run if name == "full" else (tmp_path, dry_run_here(tmp_path, capsys, *flags, "--scope", "full"))
    now = list(dict.fromkeys(re.sub(r" --(stop-after-steps \d+|shard \d+/\d+|rouge-mode gem)", "",
                                    re.sub(r"\.shard-\d+-of-\d+\t", "\t", line))
                             for line in dry_run_commands(out_dir, text)))
    new_methods = [m for m in adapt.REGISTRY if m not in old_methods]
    kept = [line for line in now if not any(f"--method {m} " in line for m in new_methods)]
    # and the runs of the stages added since (figures, appendix-b, appendix-c: Figure 3's extra seed,
    # the ZmBART-like IT and what starts from it, Appendix C's mixed-in tasks and probabilities)
    extra_seed = "-seed2\t" if name == "full" else "-seed1\t"
    kept = [line for line in kept if extra_seed not in line and "zmbart" not in line
            and not re.search(r"-(prefix_lm|span_corruption|mbart_denoising)-p[\d.]+-seed", line)]
    assert len(recorded) == (836 if name == "full" else 117)
    assert kept == recorded


def test_rouge_reaches_every_finetuning_run_and_its_packages_are_checked_first(tmp_path, monkeypatch, capsys):
    from conftest import run_cli
    code, out, _ = run_cli(study, ["lr-search", "--dry-run", "--out-dir", str(tmp_path), "--rouge", "xlsum"], capsys)
    finetunes = [line for line in out.splitlines() if line.startswith("RUN ") and "finetune.py" in line]
    assert code == 0 and len(finetunes) > 50 and all("--rouge-mode xlsum" in c for c in finetunes if "/runs/guard/" not in c)
    monkeypatch.setitem(sys.modules, "jieba", None)  # as if requirements-xlsum.txt were not installed
    code, _, err = run_cli(study, ["lr-search", "--out-dir", str(tmp_path / "s"), "--tiny", "--rouge", "xlsum"], capsys)
    assert code != 0 and err.strip().splitlines()[-1] == (
        "error: --rouge xlsum: Chinese needs the jieba package (pip install -r requirements-xlsum.txt)")
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- --scope paper

def expected_paper_stages():
    """The paper's runs, stage by stage (S = 2 seeds, L = 5 target languages, 2 tasks), written out
    from its text: the methods (Table 1, Figure 2, Table 4), IT and translate-train (Figure 2) for
    mT5-base and mBART pretrained (P = 2); full finetuning's LR search for all four models (M = 4:
    Figure 3, Table 4's "Ft w/o IT" rows); mT5-large at 1e-5 (Table 2); Appendices B, C and D.
      guard             ours: 1 per model and task                                       2 M = 8
      it                P, and mT5-large's (Table 2)                                     P + 1 = 3
      lr-search         full: {1e-3, 1e-4, 1e-5} + 3e-4 for M models; adapters and prompt tuning
                        ("we initially grid searched LR for full finetuning, adapters and prompt
                        tuning"): {1e-3, 1e-4, 1e-5} for P models; x 2 tasks x S  (4 M + 3 x 2 P) x 2 S = 112
      methods           {PLR, 10 PLR} x {no IT, IT}: full, adapters, prompt have their no-IT pair in the
                        search (2 new each); freeze, mix, and on XL-Sum >1 src lgs, 4 each;
                        XL-Sum 3 x 2 + 3 x 4, XQuAD 3 x 2 + 2 x 4; x P x S                (18 + 14) x P x S = 128
      figures           Figure 3's third run (3 runs) per task x model                   2 M = 8
      translate-data    the training data into L languages per task, XQuAD's validation slice too  3 L = 15
      translate-search  "grid search the LR": 4 LRs x L x S per task x P                 4 L S x 2 P = 160
      large             IT + ft, XL-Sum IT + >1 src lg, data translation in L, at 1e-5, x S   2 S + S + 2 L S = 26
      appendix-b        ZmBART-like IT per P model, then freeze at the PLR per task x S  P + 2 P S = 10
      appendix-c        XL-Sum, mT5 and mBART: {Prefix-LM, own pretraining task} x {0.01, 0.1, 0.5}, the
                        Prefix-LM 0.01 run being the methods stage's; x S               P x 5 x S = 20
      appendix-d        Table 3: 3 models (mT5, mBART, NLLB) x L per task                2 x 3 L = 30
    """
    S, L, M, P = 2, 5, 4, 2
    return {"guard": 2 * M, "it": P + 1, "lr-search": (4 * M + 3 * 2 * P) * 2 * S, "methods": (18 + 14) * P * S,
            "figures": 2 * M, "translate-data": 3 * L, "translate-search": 4 * L * S * 2 * P, "large": 2 * S + S + 2 * L * S,
            "appendix-b": P + 2 * P * S, "appendix-c": P * 5 * S, "appendix-d": 2 * 3 * L}


@pytest.mark.parametrize("rouge", ["gem", "multilingual", "xlsum"])
def test_paper_scope_lists_the_runs_the_paper_describes(rouge, tmp_path, capsys):
    out = dry_run_here(tmp_path, capsys, "--rouge", rouge)  # --scope paper is the default
    table = out[out.index("estimated GPU-hours"):].split("\n\n")[0].splitlines()[1:]
    counts = {line.split()[0]: int(line.split()[1]) for line in table if line.strip()}
    assert counts.pop("total") == sum(counts.values()) == 520
    assert counts == expected_paper_stages()
    commands = [shlex.split(line.split(" -- ", 1)[1]) for line in out.splitlines() if line.startswith("RUN ")]
    finetunes = [finetune.parse_args(argv[2:]) for argv in commands if argv[1].endswith("finetune.py")]
    assert not [a for a in finetunes if a.method == "lora"]  # not in the paper
    method_models = {"google/mt5-base", "facebook/mbart-large-50"}
    assert {a.model for a in finetunes if a.method != "full"} == method_models | {"google/mt5-large"}  # large: multisrc
    assert {a.model for a in finetunes if a.train_lang != "en"} == method_models | {"google/mt5-large"}
    assert {a.model for a in finetunes if a.init is not None} == method_models | {"google/mt5-large"}
    assert {a.model for a in finetunes if a.method == "full" and a.init is None} == set(study.MODELS.values())
    assert all(a.rouge_mode == rouge for a in finetunes if "/runs/guard/" not in a.out_dir)
    mixes = {(a.model, a.mix_objective, a.mix_prob) for a in finetunes if a.method == "mix" and a.task == "xlsum"
             and a.init is None and a.lr != 1e-3}
    assert mixes == {(model, objective, prob) for model, own in (("google/mt5-base", "span_corruption"),
                                                                ("facebook/mbart-large-50", "mbart_denoising"))
                     for objective in ("prefix_lm", own) for prob in (0.01, 0.1, 0.5)}
    its = [argv for argv in commands if argv[1].endswith("pretrain_it.py")]
    assert sorted(argv[argv.index("--objective") + 1] if "--objective" in argv else "prefix_lm" for argv in its) == \
        ["prefix_lm"] * 3 + ["zmbart"] * 2


@pytest.mark.slow
def test_report_renders_appendix_b_c_and_every_rouge_mode(tmp_path):
    """Two real tiny XL-Sum runs (full finetuning at 1e-3 and 3e-3, scored in the multilingual mode)
    stand behind the entries the study's stages record: lr-search, methods (freeze after Prefix-LM
    IT, mix at 0.01), appendix-b (freeze after ZmBART-like IT), appendix-c (span corruption at 0.5),
    each a copy of one of them. The report renders Figures 5 and 6 and the per-mode tables, each
    cell the numbers of the run behind it."""
    import shutil
    root = tmp_path / "study"
    made = {}
    for lr in (1e-3, 3e-3):
        d = root / "runs" / "xlsum" / "tiny-mt5" / f"full-lr{lr:g}-seed0"
        finetune.main(finetune.parse_args([
            "--model", "tiny-mt5", "--task", "xlsum", "--lr", str(lr), "--data-dir", DATA_DIR, "--xlsum-dir", FIXTURES,
            "--out-dir", str(d), "--max-steps", "4", "--eval-every", "2", "--warmup-steps", "1", "--max-train-examples",
            "50", "--max-eval-examples", "3", "--max-new-tokens", "6", "--val-langs", "fr", "--test-langs", "fr,zh"]))
        made[lr] = str(d)
    results = {lr: json.load(open(os.path.join(d, "results.json"))) for lr, d in made.items()}
    meta = {"task": "xlsum", "model": "tiny-mt5", "seed": 0}
    plan = {made[1e-3]: dict(meta, stage="lr-search", method="full", lr=1e-3, it=False, grid=[3], k_range=[3, 3]),
            made[3e-3]: dict(meta, stage="lr-search", method="full", lr=3e-3, it=False, grid=[3], k_range=[3, 3])}
    copies = {"freeze-lr0.001-it-seed0": (1e-3, dict(meta, stage="methods", method="freeze", lr=1e-3, it=True, plr=1e-3)),
              "freeze-lr0.001-it_zmbart-seed0": (1e-3, dict(meta, stage="appendix-b", method="freeze", lr=1e-3, it=True,
                                                                 plr=1e-3, it_objective="zmbart")),
              "mix-lr0.001-seed0": (1e-3, dict(meta, stage="methods", method="mix", lr=1e-3, it=False, plr=1e-3,
                                                mix_objective="prefix_lm", mix_prob=0.01)),
              "mix-lr0.001-span_corruption-p0.5-seed0": (3e-3, dict(meta, stage="appendix-c", method="mix", lr=1e-3,
                                                                    it=False, plr=1e-3, mix_objective="span_corruption",
                                                                    mix_prob=0.5))}
    for name, (source, entry) in copies.items():
        d = str(root / "runs" / "xlsum" / "tiny-mt5" / name)
        shutil.copytree(made[source], d)
        plan[d] = entry
    chosen = {"xlsum/tiny-mt5/full": {"runs": [made[1e-3]], "lr": 1e-3, "it": False, "plr": 1e-3, "val_metric": 0.0}}
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "chosen.json").write_text(json.dumps(chosen))
    report.write_report(str(root))
    out = root / "report"
    for name in ("fig5_it_objectives_xlsum.png", "fig6_mixing_xlsum.png", "rouge_modes_xlsum.md", "plr_modes_xlsum.md"):
        assert (out / name).stat().st_size > 0, name

    def rows(name):
        return list(csv.reader(open(out / f"{name}.csv")))

    def cell(r):  # "metric (LCR)" of one run, as the tables print a single seed
        return f"{r['test_average']['rouge2']:.2f} ({r['test_average']['lcr']:.0f})"
    a, b = results[1e-3], results[3e-3]
    # every ROUGE mode: the run's own in its column, the others from the scores stored beside it
    header, row = rows("rouge_modes_xlsum")[:2]
    expected = {mode: statistics.mean(a["test"][lang]["rouge2"] if mode == "multilingual" else a["test"][lang][mode]["rouge2"]
                                      for lang in ("fr", "zh")) for mode in ("multilingual", "gem", "xlsum")}
    assert row[:3] == ["tiny-mt5", "full", "multilingual"]
    assert {h.split()[-1]: float(v) for h, v in zip(header[3:6], row[3:6])} == pytest.approx(expected, abs=0.006)
    # the PLR in the run's own mode: the better best_val_metric (finetune.py's), ties to the smaller LR
    header, row = rows("plr_modes_xlsum")[:2]
    own = 1e-3 if a["best_val_metric"] >= b["best_val_metric"] else 3e-3
    assert row[header.index("PLR multilingual")] == f"{own:g}"
    assert report.val_mode_best(made[1e-3], "xlsum", "multilingual") == pytest.approx(a["best_val_metric"])
    # Figure 5: freeze after each IT objective; Figure 6: each mixed-in task and probability, with lengths
    assert rows("fig5_it_objectives_xlsum")[1][:4] == ["tiny-mt5", "0.001", cell(a), cell(a)]
    fig6 = {(r[1], r[2]): r[3:5] for r in rows("fig6_mixing_xlsum")[1:]}
    assert fig6 == {("none", "0"): [cell(a), f"{a['test_average']['avg_len']:.0f}"],
                    ("prefix_lm", "0.01"): [cell(a), f"{a['test_average']['avg_len']:.0f}"],
                    ("span_corruption", "0.5"): [cell(b), f"{b['test_average']['avg_len']:.0f}"]}
    text = (out / "report.md").read_text()
    assert "Figure 5 (xlsum)" in text and "Figure 6 (xlsum)" in text and "![fig6_mixing_xlsum.png]" in text


@pytest.mark.xdist_group("full-dry-run")
@pytest.mark.parametrize("rouge", ["multilingual", "xlsum"])
def test_full_scope_lists_the_same_runs_under_every_rouge_mode(rouge, full_dry_run, tmp_path, capsys):
    """--scope full under the other ROUGE modes: the runs of the gem dry run (run_all.sh's, checked
    against the protocol above), each finetuning run told the mode instead of gem. The other modes'
    dry runs are study.py's stage list `all`, in this process: so run_all.sh lists what `all` does."""
    out_dir, gem = full_dry_run
    other = dry_run_here(tmp_path, capsys, "--scope", "full", "--rouge", rouge)
    assert dry_run_commands(tmp_path, other) == [line.replace("--rouge-mode gem", f"--rouge-mode {rouge}")
                                                 for line in dry_run_commands(out_dir, gem)]
