"""Shared fixtures: the real data in ../shared/data and the tiny models, built once per test session.

The tiny models are built into a fresh temporary cache (not ~/.cache/xlgen), so every test run
exercises the build from scratch, exactly as a user's first `--model tiny-mt5` would (under xdist,
their SentencePiece models are trained once, by the controller, and copied into each worker's). The hub is
offline (HF_HUB_OFFLINE=1): tests never reach the network. cost.py prices with the fixed rates of
tests/fixtures/rates (XLGEN_RATES).
"""

import os
import re
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["HF_HUB_OFFLINE"] = "1"
# cost.py's rates: the H200 figures of 2026-11-26, fixed, so the dry run's estimates (and the shards
# they size) do not move when bench/gpu.sh rewrites bench/rates.json
RATES_2026_11_26 = os.path.join(REPO, "tests", "fixtures", "rates", "h200-2026-11-26.json")
os.environ["XLGEN_RATES"] = RATES_2026_11_26
# The test command runs the suite in pytest-xdist workers, one per core (-n 2 on CI's 2 cores):
# each worker's torch, and the commands it starts, use one thread. (2 workers of 2 threads on 2
# cores spin and took 18 min; 1 thread each, 8.5 min. The tiny models gain 1.2x from a second thread.)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
DATA_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "xlsum")
TEXT_LANGS = ["en", "fr", "es", "ru", "zh", "ko", "ja", "ar", "de", "th", "ro", "vi"]
FAMILIES = {"tiny-mt5": "mt5", "tiny-mbart": "mbart", "tiny-nllb": "nllb"}
SHARED_SPM = "XLGEN_TEST_SPM"   # the xdist controller's SentencePiece models, for the workers


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of several seconds (deselect with -m 'not slow')")
    if WORKERS > 1:
        import torch
        torch.set_num_threads(1)
    _train_sentencepiece_once(config)


def _train_sentencepiece_once(config):
    """Under pytest-xdist, the controller trains the tiny tokenizers' SentencePiece models once, on
    both cores before the workers start (models.build_sentencepiece: 26 s on one thread), and each
    worker copies them into its fresh cache (tiny_cache), where it still builds the tiny models
    themselves from scratch. Before, each worker trained them itself, ~43 s each with both at once."""
    text = os.path.join(DATA_DIR, "text")
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None) or \
            not os.path.isdir(text):
        return
    import tempfile
    import models
    spm = os.path.join(tempfile.mkdtemp(prefix="xlgen-test-spm-"), "spm")
    os.mkdir(spm)
    models.build_sentencepiece(text, spm)
    os.environ[SHARED_SPM] = spm


def pytest_unconfigure(config):
    spm = os.environ.pop(SHARED_SPM, None)
    if spm and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.path.dirname(spm), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("xlgen-cache"))
    if os.environ.get(SHARED_SPM):  # trained once by the xdist controller (_train_sentencepiece_once)
        import models
        shutil.copytree(os.environ[SHARED_SPM], os.path.join(cache, f"tiny-v{models.TINY_VERSION}", "spm"))
    old = os.environ.get("XLGEN_CACHE")
    os.environ["XLGEN_CACHE"] = cache
    yield cache
    if old is None:
        os.environ.pop("XLGEN_CACHE", None)
    else:
        os.environ["XLGEN_CACHE"] = old


@pytest.fixture(scope="session")
def tokenizers(tiny_cache):
    import models
    return {name: models.load_tokenizer(name, DATA_DIR) for name in FAMILIES}


@pytest.fixture(scope="session")
def squad_train():
    import data
    return data.read_squad(data.squad_path(DATA_DIR, "train"))


def run_cli(module, argv, capsys):
    """Run `module.main(module.parse_args(argv))` as the command line would, in this process.
    Returns (exit status, stdout, stderr). Any exception other than SystemExit propagates (it would
    be a traceback for the user), so a test that expects an error also checks there is none."""
    capsys.readouterr()
    try:
        module.main(module.parse_args(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):  # sys.exit("error: ...") prints its message to stderr, status 1
        err, code = err + code + "\n", 1
    return code or 0, out, err


def error_lines(err):
    """The `error:` lines of a command's stderr (progress bars share it, separated by carriage returns)."""
    return [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]


def sharpened(model, factor=4.0):
    """The model with its matrices (not its embeddings) scaled by `factor`, in place. At tiny width a
    random model's next-token distribution is nearly flat and it repeats a token whatever came
    before, so a beam search that kept each beam's cache rows in place instead of following its
    parent would decode the same; sharpened, the next token depends on the history (checked: with
    decode._reorder_self_cache skipped, none of the 12 predictions of each family is HF's)."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "shared" not in name and "embed" not in name:
                p.mul_(factor)
    return model
