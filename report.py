"""The report stage: the study's results as the paper's tables and figures.

    python report.py --out-dir study          # reads study/plan.json, chosen.json, runs/*/results.json

Writes into OUT_DIR/report/ (Markdown and CSV tables, PNG figures, and report.md linking them all):
  table1_it_gain      gain from intermediate tuning, per task x model x method (paper Table 1)
  table2_methods      methods x models, test metric and LCR averaged over languages (Table 2 / Figure 2)
  table4_lrs          preliminary and chosen LR, with or without IT (Table 4)
  per_language_TASK   every chosen run, per test language
  fig_lr_TASK_MODEL_METHOD.png   task metric and LCR against LR per language (Figure 1, Figures 8-11)
  fig_methods_TASK.png           methods side by side per model (Figure 2)
Every table says which run directories its cells come from; a run that failed or is missing leaves
its cell as "—" and is listed, with its log, at the end of report.md.
"""

import argparse
import csv
import json
import os
import sys

MISSING = "—"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="study", help="the study directory (run_all.sh --out-dir)")
    # run_all.sh passes its flags to every stage; these do not change the report
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="say what would be written")
    p.add_argument("--poll-seconds", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Reading results

def load_results(run_dir):
    path = os.path.join(run_dir, "results.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def test_average(results):
    """(main metric, LCR) averaged over the non-English test languages, or (None, None)."""
    if results is None:
        return None, None
    average = results["test_average"]
    return average[results["main_metric"]], average["lcr"]


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
        with open(os.path.join(report_dir, f"{self.name}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.header + ["runs"])
            for row, runs in zip(self.rows, self.sources):
                writer.writerow(row + [";".join(os.path.relpath(r, root) for r in runs)])
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += ["", self.note + f" Runs behind each row: `{self.name}.csv`, column `runs`.", ""]
        text = "\n".join(lines)
        with open(os.path.join(report_dir, f"{self.name}.md"), "w") as f:
            f.write(text)
        return text


# -----------------------------------------------------------------------------
# Tables

def table_methods(plan, chosen, task):
    models = sorted({m["model"] for m in plan.values() if m.get("task") == task and "method" in m})
    methods = [m for m in ("full", "freeze", "adapters", "prompt", "mix", "multisrc")
               if any(k.startswith(f"{task}/") and k.endswith(f"/{m}") for k in chosen)]
    table = Table(f"table2_methods_{task}", f"Table 2 ({task}): methods x models, test {main_name(task)} (LCR %), "
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


def main_name(task):
    return "ROUGE-2" if task == "xlsum" else "F1 (filtered)"


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
            run, res = max(candidates, key=lambda x: x[1]["best_val_metric"] if x[1]["best_val_metric"] is not None else -1e9)
            values.append(test_average(res)[0])
            runs.append(run)
        gain = values[1] - values[0] if None not in values else None
        table.add([task, model, method, fmt(values[0]), fmt(values[1]), fmt(gain)], runs)
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
    table = Table(f"per_language_{task}", f"Per language ({task}): test {main_name(task)} (LCR %)",
                  ["model", "method"] + langs, "Chosen setting of each model and method.")
    for key, entry, res in rows:
        _, model, method = key.split("/")
        cells = []
        for lang in langs:
            m = res["test"].get(lang) if res else None
            cells.append(MISSING if m is None else f"{m[res['main_metric']]:.2f} ({m['lcr']:.0f})")
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
        main = points[0][1]["main_metric"]
        ax_metric.plot(xs, [res["test"][lang][main] for _, res in points if lang in res["test"]], marker="o", label=lang)
        ax_lcr.plot(xs, [res["test"][lang]["lcr"] for _, res in points if lang in res["test"]], marker="o", label=lang)
    for ax, label in ((ax_metric, main_name(task)), (ax_lcr, "language correct rate (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_lcr.legend(fontsize=8)
    fig.suptitle(f"{task} / {model} / {method}: test metric and LCR against LR")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
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
    methods = [m for m in ("full", "freeze", "adapters", "prompt", "mix", "multisrc") if any(k.endswith("/" + m) for k in keys)]
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
    for ax, label in ((ax_metric, main_name(task)), (ax_lcr, "language correct rate (%)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    ax_metric.legend(fontsize=8)
    fig.suptitle(f"{task}: adaptation methods, averaged over test languages")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------

def failed_runs(plan):
    rows = []
    for run, meta in sorted(plan.items()):
        status_path = os.path.join(run, "status.json")
        status = json.load(open(status_path)) if os.path.isfile(status_path) else None
        if status is not None and not status.get("done"):
            rows.append(f"- `{run}` failed (exit {status['returncode']}); log: `{os.path.join(run, 'run.log')}`")
        elif status is None and meta.get("stage") != "translate-data" and load_results(run) is None:
            rows.append(f"- `{run}` has no results (not run yet)")
    return rows


def main(args):
    root = os.path.abspath(args.out_dir)
    plan_path = os.path.join(root, "plan.json")
    if args.dry_run:
        print(f"report: would write tables and figures into {os.path.join(root, 'report')}")
        return
    if not os.path.isfile(plan_path):
        sys.exit(f"error: {plan_path}: not found; run the study stages first")
    plan = json.load(open(plan_path))
    chosen_path = os.path.join(root, "chosen.json")
    chosen = json.load(open(chosen_path)) if os.path.isfile(chosen_path) else {}
    report_dir = os.path.join(root, "report")
    os.makedirs(report_dir, exist_ok=True)

    tasks = sorted({m["task"] for m in plan.values() if "task" in m and "method" in m})
    tables = [table_it_gain(plan), table_lrs(chosen)]
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

    failed = failed_runs(plan)
    lines = [f"# Report of {root}", "", "Generated by report.py from plan.json, chosen.json and each run's results.json.",
             "Cells marked — come from runs that failed or have not run.", ""] + sections
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    lines += ["## Failed or missing runs", ""] + (failed or ["none"]) + [""]
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"report: {len(tables)} tables, {len(figures)} figures, {len(failed)} failed/missing runs "
          f"-> {os.path.join(report_dir, 'report.md')}")


if __name__ == "__main__":
    main(parse_args())
