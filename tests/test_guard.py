"""The learning guard: every tiny family learns a few English examples through the real pipeline
(finetune.py: training, generation with the family's decoder start and forced language code, the
clean-up of rudiments, the official scoring), to F1 >= 90 (XQuAD-format) and ROUGE-2 >= 80
(XL-Sum-format). Any break in that path fails here instead of printing another zero."""

import pytest

import data
import finetune
import study
from conftest import DATA_DIR, FAMILIES, FIXTURES


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_learns_its_guard_examples_through_the_real_pipeline(name, tmp_path):
    for task in ("xquad", "xlsum"):
        path = study.guard_examples(task, DATA_DIR, FIXTURES, str(tmp_path / f"{task}.en.guard"))
        argv = study.guard_argv("python", name, task, path, DATA_DIR, FIXTURES, str(tmp_path / task), tiny=True)
        results = finetune.main(finetune.parse_args(argv[2:]))
        metric, threshold, num = data.get_task(task).guard
        value = results["test"]["en"][metric]
        print(f"{name} {task}: {metric} {value:.1f} (threshold {threshold:g}, {num} examples)")
        assert results["test"]["en"]["num_references"] == num
        assert value >= threshold, (name, task, results["test"]["en"])
