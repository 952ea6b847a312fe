"""A task is one entry of data.TASKS: a third task, defined only here, runs through finetune.py and
the study's dry run without a line of the project changed. It is SQuAD-format QA in a file layout
of its own (DIR/SPLIT/LANG.json), made from real XQuAD questions."""

import json
import os

import pytest

import common
import cost
import data
import finetune
import study
from conftest import DATA_DIR, run_cli

LAYOUT = {("train", "en"): "en", ("val", "en"): "en", ("val", "th"): "th", ("test", "es"): "es", ("test", "de"): "de"}


@pytest.fixture
def third_task(tmp_path, monkeypatch):
    """'qa3': trained on English, validated on Thai, tested on Spanish and German; every file a
    slice of XQuAD in SQuAD format under tmp/qa3/SPLIT/LANG.json."""
    root = tmp_path / "qa3"
    for (split, lang), source in LAYOUT.items():
        raw = json.load(open(data.xquad_path(DATA_DIR, source), encoding="utf-8"))
        articles = raw["data"][:2] if split == "train" else raw["data"][2:3]
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / f"{lang}.json").write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    task = data.Task("qa3", "qa", "f1_filtered", "F1 (filtered)", "lcr_filtered", val_langs=("th",),
                     test_langs=("es", "de"), max_new_tokens=16,
                     files=lambda split, lang, data_dir, task_dir: str(root / split / f"{lang}.json"),
                     sizes={"train": {"en": 1000}, "val": {"en": 100, "th": 100}, "test": {"es": 100, "de": 100}},
                     lengths={"source": 200, "target": 6, "generated": 8}, guard=("f1", 90.0, 2))
    monkeypatch.setitem(data.TASKS, "qa3", task)
    return root


def test_finetune_trains_validates_and_tests_the_third_task(third_task, tmp_path):
    out = tmp_path / "run"
    results = finetune.main(finetune.parse_args([
        "--model", "tiny-mt5", "--task", "qa3", "--method", "full", "--lr", "1e-3", "--data-dir", DATA_DIR,
        "--max-steps", "4", "--eval-every", "2", "--warmup-steps", "1", "--max-tokens", "1500",
        "--max-eval-examples", "3", "--log-every", "2", "--out-dir", str(out)]))
    assert results["main_metric"] == "f1_filtered" and sorted(results["test"]) == ["de", "es"]
    assert sorted(results["data"]) == ["task/en"] and results["data"]["task/en"]["file"] == str(third_task / "train" / "en.json")
    step = json.loads((out / "eval" / "step_4.json").read_text())
    assert list(step["langs"]) == ["th"] and "f1_filtered" in step["langs"]["th"]
    # the test predictions are XQuAD ids of the Spanish file, scored by the QA metric (EM, F1, filtered set)
    predictions = json.loads((out / "predictions" / "test.es.json").read_text())
    ids = [q["id"] for q in data.read_squad(str(third_task / "test" / "es.json"))[:3]]
    assert sorted(predictions) == sorted(ids)
    assert {"em", "f1", "num_filtered"} <= set(results["test"]["es"])
    # and the cost model prices it from its sizes: 10 validations of 100 Thai questions + 200 test questions
    assert cost.validation_examples("qa3", ["th"]) == 100 and cost.test_examples("qa3", ["es", "de"]) == 200
    # a language the table gives no size for is one line naming the entry to complete
    with pytest.raises(common.UsageError, match=r"data.TASKS\['qa3'\].sizes\['test'\] has no size for 'ru'"):
        cost.test_examples("qa3", ["ru"])


def test_the_dry_run_plans_every_stage_for_the_third_task(third_task, tmp_path, capsys):
    code, out, err = run_cli(study, ["all", "--dry-run", "--tiny", "--data-dir", DATA_DIR, "--out-dir",
                                     str(tmp_path / "s")], capsys)
    assert code == 0, err
    runs = [line for line in out.splitlines() if line.startswith("RUN ") and "qa3" in line]
    by_kind = {kind: [r for r in runs if marker in r] for kind, marker in (
        ("guard", "/runs/guard/"), ("search", "/runs/qa3/"), ("translate", "translate_train.py --model tiny-nllb"),
        ("large", "--model tiny-mt5-large"))}
    assert all(by_kind.values()), {k: len(v) for k, v in by_kind.items()}
    # English validation of full finetuning's search: the task's own English validation file
    assert any("--val-langs th,en" in r and "--test-last" in r for r in by_kind["search"])
    # translate-train translates its English training file, validates in the target language's own split
    assert any(f"--train-file {third_task}/train/en.json" in r for r in by_kind["translate"])
    assert not os.path.exists(tmp_path / "s")  # a dry run writes nothing
