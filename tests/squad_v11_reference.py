"""An independent, literal port of the official SQuAD v1.1 evaluation (evaluate-v1.1.py), used only
as the reference that evaluate.py must equal.

It works on the raw nested SQuAD JSON (data -> paragraphs -> qas), not on data.py's flat reader,
and follows the official algorithm step by step: normalise (lower-case; drop ASCII punctuation;
drop the articles a/an/the; collapse whitespace), token-level F1 and exact match, max over the gold
answers, unanswered questions count 0, totals scaled to 100.
"""

import collections
import re
import string


def _normalize(s):
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction, truth):
    p, t = _normalize(prediction).split(), _normalize(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0
    precision, recall = 1.0 * same / len(p), 1.0 * same / len(t)
    return (2 * precision * recall) / (precision + recall)


def _em(prediction, truth):
    return _normalize(prediction) == _normalize(truth)


def official_evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                truths = [a["text"] for a in qa["answers"]]
                exact_match += max(_em(predictions[qa["id"]], t) for t in truths)
                f1 += max(_f1(predictions[qa["id"]], t) for t in truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}
