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
its cell as "—" and is listed, with its log, at the end of report.md. The LCR of QA tables is the
one on the paper's filtered question set (`lcr_filtered`, see evaluate.py); of XL-Sum, on all outputs.
"""

import csv
import io
import os

import adapt
import common
import data
from study import load_results, rank

MISSING = "—"


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--out-dir", default="study", help="the study directory (run_all.sh --out-dir)")
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
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(self.header + ["runs"])
        for row, runs in zip(self.rows, self.sources):
            writer.writerow(row + [";".join(os.path.relpath(r, root) for r in runs)])
        common.write_text(os.path.join(report_dir, f"{self.name}.csv"), buffer.getvalue())
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += ["", self.note + f" Runs behind each row: `{self.name}.csv`, column `runs`.", ""]
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


def write_report(root):
    """Every table and figure of the study in `root` into root/report/."""
    root = os.path.abspath(root)
    plan_path = os.path.join(root, "plan.json")
    if not os.path.isfile(plan_path):
        raise common.UsageError(f"--out-dir: {plan_path} not found; run the study stages first")
    plan = common.read_json(plan_path, "plan.json")
    chosen_path = os.path.join(root, "chosen.json")
    chosen = common.read_json(chosen_path, "chosen.json") if os.path.isfile(chosen_path) else {}
    report_dir = os.path.join(root, "report")

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
    common.write_text(os.path.join(report_dir, "report.md"), "\n".join(lines))
    print(f"report: {len(tables)} tables, {len(figures)} figures, {len(failed)} failed/missing runs "
          f"-> {os.path.join(report_dir, 'report.md')}")


@common.exits_on_error
def main(args):
    write_report(args.out_dir)


if __name__ == "__main__":
    main(parse_args())
