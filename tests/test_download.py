"""download.py against a loopback HTTP server: the official layout, atomic writes, clear errors."""

import functools
import http.server
import json
import os
import sys
import threading

import pytest

import data
import download
import finetune
import pretrain_it
from conftest import DATA_DIR, FIXTURES, error_lines, run_cli


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


# ----------------------------------------------------------------------------- CommonCrawl text (CC-100 layout)

class RangeHandler(QuietHandler):
    """Serves files with HTTP Range support, logs every GET as (path, first byte, bytes sent), and
    cuts the connection after `server.cut_after` bytes of the next response (a dropped download)."""

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size, start = os.path.getsize(path), 0
        requested = self.headers.get("Range")
        if requested:
            start = int(requested.split("=")[1].split("-")[0])
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read()
        self.send_response(206 if requested else 200)
        self.send_header("Content-Length", str(len(body)))
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if self.server.cut_after is not None:
            body, self.server.cut_after = body[:self.server.cut_after], None
        self.wfile.write(body)
        self.server.log.append((self.path, start, len(body)))


def cc100_like(lines, seed):
    """CC-100's layout from clean lines: documents separated by blank lines, and the noise the
    cleaning must remove: runs of spaces and tabs, and lines repeated later in the file."""
    rng = __import__("random").Random(seed)
    out = []
    for i, line in enumerate(lines):
        out.append(line.replace(" ", "  \t ") if i % 3 == 0 else line)
        if i % 5 == 4:
            out.append("")                                  # end of a document
        if i % 7 == 0 and i > 20:
            out.append(lines[rng.randrange(i)])             # a duplicate of an earlier line
    return ("\n".join(out) + "\n").encode("utf-8")


TEXT_LANGS = ["en", "zh", "fr"]


@pytest.fixture()
def cc100_mirror(tmp_path):
    """A mirror with text/<cc100 name>.txt.xz for en, zh, fr made from ../shared/data/text."""
    import lzma
    root = tmp_path / "mirror"
    (root / "text").mkdir(parents=True)
    for i, lang in enumerate(TEXT_LANGS):
        name = data.get_language(lang).cc100 or lang
        (root / "text" / f"{name}.txt.xz").write_bytes(lzma.compress(cc100_like(data.read_text(data.text_path(DATA_DIR, lang)), i)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    server.log, server.cut_after = [], None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server, root
    server.shutdown()


def leftovers(text_dir):
    return sorted(n for n in os.listdir(text_dir) if n.startswith("."))


def test_text_is_cleaned_and_capped(tmp_path, cc100_mirror, capsys):
    url, server, _ = cc100_mirror
    out = tmp_path / "data"
    code, stdout, err = run_cli(download, ["--data-dir", str(out), "--tasks", "text", "--langs", ",".join(TEXT_LANGS),
                                           "--mirror", url], capsys)
    assert code == 0, err
    for lang in TEXT_LANGS:  # the injected blank lines, whitespace runs and duplicates are gone: the original file
        assert data.read_text(str(out / "text" / f"{lang}.txt")) == data.read_text(data.text_path(DATA_DIR, lang))
    assert "duplicate lines dropped" in stdout and "the source ended before 256 MB" in stdout
    assert leftovers(out / "text") == []
    # a cap: the longest prefix of the cleaned lines that fits in --text-mb MB
    capped = tmp_path / "capped"
    code, _, err = run_cli(download, ["--data-dir", str(capped), "--tasks", "text", "--langs", "zh", "--mirror", url,
                                      "--text-mb", "0.2"], capsys)
    assert code == 0, err
    got = (capped / "text" / "zh.txt").read_bytes()
    original = data.read_text(data.text_path(DATA_DIR, "zh"))
    kept = got.decode("utf-8").splitlines()
    assert kept == original[:len(kept)] and len(got) <= 0.2 * 2 ** 20
    assert len(got) + len(original[len(kept)].encode("utf-8")) + 1 > 0.2 * 2 ** 20


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, cc100_mirror, capsys):
    url, server, root = cc100_mirror
    size = (root / "text" / "en.txt.xz").stat().st_size
    straight = tmp_path / "straight"
    assert run_cli(download, ["--data-dir", str(straight), "--tasks", "text", "--langs", "en", "--mirror", url], capsys)[0] == 0
    server.log.clear()
    server.cut_after = size * 2 // 5                          # the connection drops after 40% of the file
    out = tmp_path / "data"
    argv = ["--data-dir", str(out), "--tasks", "text", "--langs", "en", "--mirror", url]
    code, _, err = run_cli(download, argv, capsys)
    (error,) = error_lines(err)
    assert code == 1 and "interrupted" in error and "run the command again" in error
    assert not (out / "text" / "en.txt").exists() and leftovers(out / "text") == [".en.download"]
    code, _, err = run_cli(download, argv, capsys)           # the rerun asks only for the rest
    assert code == 0, err
    assert server.log == [("/text/en.txt.xz", 0, size * 2 // 5), ("/text/en.txt.xz", size * 2 // 5, size - size * 2 // 5)]
    assert (out / "text" / "en.txt").read_bytes() == (straight / "text" / "en.txt").read_bytes()
    assert leftovers(out / "text") == []


@pytest.mark.parametrize("damage,message", [("corrupt", "corrupt xz data"), ("truncate", "ends before its end marker")])
def test_a_corrupt_or_truncated_shard_is_one_line_and_leaves_nothing(damage, message, tmp_path, cc100_mirror, capsys):
    url, _, root = cc100_mirror
    shard = root / "text" / "fr.txt.xz"
    content = bytearray(shard.read_bytes())
    if damage == "corrupt":
        for i in range(len(content) // 2, len(content) // 2 + 64):
            content[i] ^= 0x5A
    else:
        content = content[: len(content) * 3 // 4]
    shard.write_bytes(bytes(content))
    out = tmp_path / "data"
    code, _, err = run_cli(download, ["--data-dir", str(out), "--tasks", "text", "--langs", "en,fr", "--mirror", url], capsys)
    (error,) = error_lines(err)
    assert code == 1 and error.startswith("error: download ") and message in error, err
    assert (out / "text" / "en.txt").exists()                 # the language done before is kept
    assert not (out / "text" / "fr.txt").exists() and leftovers(out / "text") == []  # nothing of fr, no state to replay


# ----------------------------------------------------------------------------- a user's machine, rehearsed

OPENED_IN_SHARED = []   # paths below ../shared/data opened while RECORDING is set
RECORDING = []


def _audit(event, args):
    if event == "open" and RECORDING and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(DATA_DIR + os.sep):
            OPENED_IN_SHARED.append(path)


sys.addaudithook(_audit)


def official_mirror(root):
    """What the official hosts serve, laid out as download.py's --mirror expects, made from
    ../shared/data and the XL-Sum-format fixtures (the mirror plays the internet)."""
    import gzip
    import lzma
    import tarfile
    (root / "xquad").mkdir(parents=True)
    for lang in data.XQUAD_LANGS:
        os.symlink(data.xquad_path(DATA_DIR, lang), root / "xquad" / f"xquad.{lang}.json")
    (root / "squad").mkdir()
    for split, name in (("train", "train-standin-v1.1.json.gz"), ("dev", "dev-v1.1.json.gz")):
        (root / "squad" / f"{split}-v1.1.json").write_bytes(gzip.decompress(open(os.path.join(DATA_DIR, "squad", name), "rb").read()))
    (root / "xlsum").mkdir()
    for lang in ("en", "fr", "es", "ru", "zh", "ko"):
        folder = data.get_language(lang).xlsum
        with tarfile.open(root / "xlsum" / f"{folder}_XLSum_v2.0.tar.bz2", "w:bz2") as tar:
            for split in ("train", "val", "test"):
                tar.add(os.path.join(FIXTURES, f"{folder}_{split}.jsonl"), arcname=f"{folder}_{split}.jsonl")
    (root / "text").mkdir()
    for i, lang in enumerate(("en", "fr", "zh")):
        name = data.get_language(lang).cc100 or lang
        (root / "text" / f"{name}.txt.xz").write_bytes(lzma.compress(cc100_like(data.read_text(data.text_path(DATA_DIR, lang)), i)))


@pytest.mark.slow
def test_rehearsal_a_data_directory_made_only_by_download(tmp_path, monkeypatch, capsys):
    official_mirror(tmp_path / "mirror")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path / "mirror")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("XLGEN_CACHE", str(tmp_path / "cache"))  # the tiny models too are built from the download
    D = str(tmp_path / "data")
    RECORDING.append(True)
    try:
        for argv in (["--tasks", "xquad,squad,xlsum", "--langs", "en,fr,es,ru,zh,ko"], ["--tasks", "text", "--langs", "en,fr,zh"]):
            code, _, err = run_cli(download, ["--data-dir", D, "--mirror", mirror] + argv, capsys)
            assert code == 0, err
        assert sorted(os.listdir(D)) == ["squad", "text", "xlsum", "xquad"]
        assert not [f for f in os.listdir(os.path.join(D, "xlsum")) if f.endswith(".tar.bz2")]  # archives unpacked, removed
        code, out, err = run_cli(pretrain_it, ["--model", "tiny-mt5", "--data-dir", D, "--langs", "en,fr,zh", "--max-steps", "4",
                                               "--eval-every", "2", "--warmup-steps", "1", "--max-tokens", "1000",
                                               "--num-samples", "1", "--max-new-tokens", "4", "--out-dir", str(tmp_path / "it")], capsys)
        assert code == 0, err
        code, out, err = run_cli(finetune, ["--model", "tiny-mt5", "--task", "xlsum", "--method", "mix", "--mix-langs", "fr,zh",
                                            "--init", str(tmp_path / "it"), "--data-dir", D, "--val-langs", "fr", "--test-langs", "zh",
                                            "--max-steps", "4", "--eval-every", "2", "--warmup-steps", "1", "--mix-prob", "0.5",
                                            "--max-tokens", "1500", "--max-new-tokens", "4", "--out-dir", str(tmp_path / "ft")], capsys)
        assert code == 0, err
    finally:
        RECORDING.clear()
        server.shutdown()
    assert OPENED_IN_SHARED == []
    assert f"from {D}/xlsum/english_train.jsonl" in out and "Prefix-LM batches of fr, zh" in out
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["data"]["prefix_lm/zh"]["file"] == os.path.join(D, "text", "zh.txt")
    assert os.path.isfile(tmp_path / "cache" / "tiny-v2" / "spm" / "unigram-t5.model")
