"""download.py against a loopback HTTP server: the official layout, atomic writes, clear errors."""

import functools
import http.server
import os
import threading

import pytest

import data
import download
from conftest import DATA_DIR, run_cli


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def mirror_of_shared_data():
    """../shared/data served over HTTP on 127.0.0.1: its xquad/ folder has the official file names."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=DATA_DIR))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_xquad_from_a_local_mirror_and_a_404(tmp_path, mirror_of_shared_data, capsys):
    out = tmp_path / "dl"
    code, _, err = run_cli(download, ["--data-dir", str(out), "--tasks", "xquad", "--mirror", mirror_of_shared_data], capsys)
    assert code == 0, err
    for lang in data.XQUAD_LANGS:
        with open(data.xquad_path(str(out), lang), "rb") as got, open(data.xquad_path(DATA_DIR, lang), "rb") as ref:
            assert got.read() == ref.read()
    # the mirror has no plain train-v1.1.json: a clear error, and nothing half-written is left
    code, _, err = run_cli(download, ["--data-dir", str(out), "--tasks", "squad", "--mirror", mirror_of_shared_data], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "download http://127.0.0.1:" in err and "/squad/train-v1.1.json: HTTP 404" in err
    assert os.listdir(out / "squad") == []


def test_official_urls_and_bad_flags(capsys):
    plan = download.plan(["xlsum", "text"], ["fr", "zh"])
    assert [(download.url_of(task, remote), dest) for task, remote, dest, _ in plan] == [
        ("https://huggingface.co/datasets/csebuetnlp/xlsum/resolve/main/data/french_XLSum_v2.0.tar.bz2",
         "xlsum/french_train.jsonl"),
        ("https://huggingface.co/datasets/csebuetnlp/xlsum/resolve/main/data/chinese_simplified_XLSum_v2.0.tar.bz2",
         "xlsum/chinese_simplified_train.jsonl"),
        ("https://data.statmt.org/cc-100/fr.txt.xz", "text/fr.txt"),
        ("https://data.statmt.org/cc-100/zh-Hans.txt.xz", "text/zh.txt")]
    with pytest.raises(data.UsageError, match="XL-Sum has no data for 'de'"):
        download.plan(["xlsum"], ["de"])
    for argv, message in ((["--mirror", "notaurl"], "--mirror: expected an http://"),
                          (["--tasks", "glue"], "--tasks: unknown task 'glue'"),
                          (["--text-mb", "0"], "argument --text-mb: must be a finite number > 0")):
        code, _, err = run_cli(download, argv, capsys)
        assert code != 0 and message in err and err.count("\n") == 1, err
