"""The study's record of what it ran and chose: plan.json and chosen.json, written by study.py and
read by report.py, through this module only.

    python -c "import plan; p = plan.Plan.load('study'); print(len(p.runs), sorted(p.chosen)[:3])"

plan.json   {run directory: entry}, one entry per run of the study; every entry has "stage", and
            per stage:
              guard            task, model
              it               model, objective (prefix_lm; appendix-b's: zmbart)
              lr-search, methods, figures, translate-search, large, appendix-b, appendix-c
                               task, model, method, lr, it, seed (+ train_lang for translated data;
                               lr-search: grid, k_range; methods, appendix-b/c: plr; large: row, the
                               Table 2 row it fills; figures: figure1_lr or figure3; appendix-b:
                               it_objective; appendix-c: mix_objective, mix_prob)
              translate-data   task, lang, translator
              appendix-d       task, model, lang, best_en_lr, best_non_en_lr, source_run,
                               non_en_runs, translated
chosen.json {"task/model/method": {"runs", "lr", "it", "plr", "val_metric"}}: the setting the
            methods stage (and translate-train's search, method "translate") chose per task x model
            x method: the runs of its seeds, its LR, whether it starts from IT, the PLR it came from,
            and the mean over seeds of the validation metric it was chosen on.
"""

import math
import os

import common

PLAN_FILE, CHOSEN_FILE = "plan.json", "chosen.json"
STAGES = ("guard", "it", "lr-search", "methods", "figures", "translate-data", "translate-search", "large",
          "appendix-b", "appendix-c", "appendix-d")
FINETUNE_KEYS = ("task", "model", "method", "lr", "it", "seed")  # every entry of a finetuning stage has them
REQUIRED = {"guard": ("task", "model"), "it": ("model",), "translate-data": ("task", "lang"),
            "appendix-d": ("task", "model", "lang", "source_run", "non_en_runs", "translated")}


def chosen_key(task, model, method):
    return f"{task}/{model}/{method}"


def split_key(key):
    """"task/model/method" -> (task, model, method)."""
    task, model, method = key.split("/")
    return task, model, method


def load_results(run_dir):
    """A run's results.json, or None if it has none (not run, failed, or still running)."""
    path = os.path.join(run_dir, "results.json")
    return common.read_json(path, "results.json") if os.path.isfile(path) else None


def rank(score):
    """Sort key of a validation score: a missing score (failed or unfinished run) never wins."""
    return -math.inf if score is None else score


def mean(values):
    """The mean of the values that are not None (failed seeds are left out); None if none is left."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def is_zero_shot(entry):
    """A run trained on the English task data (not translated data, not the guard or IT)."""
    return entry.get("stage") in ("lr-search", "methods") and "train_lang" not in entry


def guard_value(results, metric):
    """What the guard reached: its metric on the English examples it was trained on."""
    return results["test"]["en"][metric]


def settings(runs, keep=None, **match):
    """{(lr, it): [run dirs of its seeds]} of the plan's runs (plan.json's dict) whose entry has the
    given values (and, if given, for which keep(entry) is true): the settings of a search or a method."""
    found = {}
    for run_dir, entry in runs.items():
        if all(entry.get(key) == value for key, value in match.items()) and (keep is None or keep(entry)):
            found.setdefault((entry["lr"], entry.get("it", False)), []).append(run_dir)
    return found


class Plan:
    """plan.json and chosen.json of one study directory. `write=False` (the dry run) keeps them in
    memory only."""

    def __init__(self, root, runs=None, chosen=None, write=True):
        self.root, self.write = root, write
        self.runs = runs if runs is not None else {}
        self.chosen = chosen if chosen is not None else {}

    @classmethod
    def load(cls, root, write=True, need_plan=False):
        """The plan and choices in `root` (empty where a file does not exist yet), each entry checked."""
        paths = {name: os.path.join(root, name) for name in (PLAN_FILE, CHOSEN_FILE)}
        if need_plan and not os.path.isfile(paths[PLAN_FILE]):
            raise common.UsageError(f"{paths[PLAN_FILE]}: file not found (is {root} a study directory?)")
        data = {name: common.read_json(path, name) if os.path.isfile(path) else {} for name, path in paths.items()}
        for name, content in data.items():
            if not isinstance(content, dict):
                raise common.DataError(f"{paths[name]}: expected a JSON object, got {type(content).__name__}")
        for run_dir, entry in data[PLAN_FILE].items():
            check_entry(paths[PLAN_FILE], run_dir, entry)
        for key, entry in data[CHOSEN_FILE].items():
            if not isinstance(entry, dict) or not {"runs", "lr", "it", "plr", "val_metric"} <= set(entry) \
                    or key.count("/") != 2:
                raise common.DataError(f"{paths[CHOSEN_FILE]}: entry '{key}' is not a task/model/method setting "
                                       f"with runs, lr, it, plr and val_metric")
        return cls(root, data[PLAN_FILE], data[CHOSEN_FILE], write)

    # ---- plan.json ----
    def record(self, run_dir, **entry):
        """Record (or update) a run's entry: a later stage that needs the same run adds its fields (e.g.
        figure1_lr) to it; a run keeps the stage that first recorded it."""
        old = self.runs.get(run_dir, {})
        self.runs[run_dir] = {**old, **entry, "stage": old.get("stage", entry["stage"])}
        self.save()
        return self.runs[run_dir]

    def settings(self, keep=None, **match):
        return settings(self.runs, keep, **match)

    def by_lr(self, keep=None, **match):
        """{lr: [run dirs of its seeds]}: settings() of runs that all share one value of `it` (a search)."""
        found = self.settings(keep, **match)
        if len({it for _, it in found}) > 1:
            raise ValueError(f"by_lr: the runs matching {match} differ in it; match it too")
        return {lr: dirs for (lr, _), dirs in found.items()}

    def save(self):
        if self.write:
            common.write_json(os.path.join(self.root, PLAN_FILE), self.runs)

    # ---- chosen.json ----
    def choose(self, task, model, method, runs, lr, it, plr, val_metric):
        self.chosen[chosen_key(task, model, method)] = {"runs": runs, "lr": lr, "it": it, "plr": plr,
                                                        "val_metric": val_metric}

    def save_chosen(self):
        if self.write:
            common.write_json(os.path.join(self.root, CHOSEN_FILE), self.chosen)


def check_entry(path, run_dir, entry):
    """One `error:` line naming the file and the entry for a hand-edited plan.json that lost its shape."""
    if not isinstance(entry, dict) or entry.get("stage") not in STAGES:
        raise common.DataError(f"{path}: entry '{run_dir}' is not an object with a known stage "
                               f"({', '.join(STAGES)})")
    required = REQUIRED.get(entry["stage"], FINETUNE_KEYS)
    missing = [key for key in required if key not in entry]
    if missing:
        raise common.DataError(f"{path}: entry '{run_dir}' (stage {entry['stage']}) lacks {', '.join(missing)}")
    if "lr" in entry and (isinstance(entry["lr"], bool) or not isinstance(entry["lr"], (int, float))):
        raise common.DataError(f"{path}: entry '{run_dir}': lr {entry['lr']!r} is not a number")


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
    pending = [lr_value(1, k) for k in grid if not _tried(scores, lr_value(1, k))]
    if pending:
        return "run", pending
    if all(score is None for score in scores.values()):
        return "failed", None
    powers = {lr: s for lr, s in scores.items() if _is_power_of_ten(lr)}
    best = best_lr(powers)
    k_best = round(-math.log10(best))
    tried_k = sorted(round(-math.log10(lr)) for lr in powers)
    if k_best == tried_k[0] and k_best > k_range[0]:
        return "run", [lr_value(1, k_best - 1)]
    if k_best == tried_k[-1] and k_best < k_range[1]:
        return "run", [lr_value(1, k_best + 1)]
    if method != "full":
        return "done", best
    three = lr_value(3, k_best)
    if not _tried(scores, three):
        return "run", [three]
    return "done", best_lr({best: scores[best], three: scores[_key(scores, three)]})


def lr_value(mantissa, k):
    """mantissa * 10^-k as the float its decimal spelling gives (3e-4, not 3.0000000000000003e-4)."""
    return float(f"{mantissa}e-{k}")


def _key(scores, lr):
    return next(x for x in scores if math.isclose(x, lr, rel_tol=1e-9))


def _tried(scores, lr):
    return any(math.isclose(x, lr, rel_tol=1e-9) for x in scores)


def _is_power_of_ten(lr):
    return math.isclose(10.0 ** round(math.log10(lr)), lr, rel_tol=1e-9)


def best_lr(scores):
    """The LR with the highest score; a missing score never wins; ties go to the smaller LR."""
    return max(sorted(scores), key=lambda lr: rank(scores[lr]))
