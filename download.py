"""Download the data of the study into a data directory (needs internet, or a mirror).

    python download.py --data-dir data                                   # XQuAD, SQuAD, XL-Sum, IT text
    python download.py --data-dir data --tasks text --langs en,zh,fr --text-mb 256
    python download.py --data-dir data --mirror http://host:8000/xlgen   # the same layout, elsewhere

What goes where (every stage reads these paths; `--data-dir` defaults to data/ or $XLGEN_DATA_DIR):

  task    source                                                  written as
  xquad   github.com/google-deepmind/xquad                        xquad/xquad.<lang>.json (12 languages)
  squad   rajpurkar.github.io/SQuAD-explorer                      squad/{train,dev}-v1.1.json
  xlsum   huggingface.co/datasets/csebuetnlp/xlsum (v2.0)         xlsum/<folder>_{train,val,test}.jsonl
  text    data.statmt.org/cc-100 (CommonCrawl, CC-100)            text/<lang>.txt, the first --text-mb MB

The intermediate-tuning text (paper Section 3: "CommonCrawl data uniformly sampled across all
target languages and English") comes from CC-100 (Conneau et al. 2020), the CommonCrawl corpus
that XLM-R and mBART were pretrained on: one file per language, documents of one paragraph per
line. It is streamed and decompressed on the fly, cleaned (whitespace collapsed, empty and
duplicate lines dropped), and cut at --text-mb MB of text per language:

    GET <lang>.txt.xz ──> keep the compressed bytes in text/.<lang>.download/source.txt.xz.part
          │                (HTTP Range continues it after an interruption)
          └─> xz decompression ─> clean lines ─> text/.<lang>.txt.part ── at --text-mb ──> text/<lang>.txt

A rerun after an interruption decompresses the compressed prefix it already has (fast, local) and
fetches only the rest. A corrupt or truncated stream is a one-line error; nothing is left half
written (the final text/<lang>.txt appears only by a rename when complete).

For clusters whose compute nodes have no internet, the models and the paper's language-ID model,
ahead of time, on a machine that has it (not part of the default --tasks):

    python download.py --data-dir data --tasks models,lid          # every model of the study, lid.176.bin
    python download.py --tasks models --models google/mt5-base     # some of them
    HF_HUB_OFFLINE=1 bash run_all.sh ...                           # then every stage runs offline

  models  huggingface.co (the Hugging Face cache a run reads:       $HF_HOME/hub/models--ORG--NAME/...;
          HF_HOME, --hub-endpoint for a hub mirror)                 DATA/models.json: each model's commit
  lid     dl.fbaipublicfiles.com/fasttext (lid.176.bin, 126 MB)     lid/lid.176.bin (the study uses it)
"""

import codecs
import hashlib
import http.client
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request

from tqdm import tqdm

import common
import data
from common import DataError, UsageError

OFFICIAL_BASE = {
    "xquad": "https://raw.githubusercontent.com/google-deepmind/xquad/master",
    "squad": "https://rajpurkar.github.io/SQuAD-explorer/dataset",
    "xlsum": "https://huggingface.co/datasets/csebuetnlp/xlsum/resolve/main/data",
    "text": "https://data.statmt.org/cc-100",
}
TASKS = tuple(OFFICIAL_BASE)  # the default --tasks; also: models, lid (EXTRA_TASKS)
LID_URL = "https://dl.fbaipublicfiles.com/fasttext/supervised-models"
LID_FILE = os.path.join("lid", "lid.176.bin")
# What a run reads of a model repository (weights, configs, tokenizers); not the other formats
MODEL_FILES = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.model", "*.txt"]
_XLSUM = data.TASKS["xlsum"]
XLSUM_LANGS = ["en"] + [lang for lang in dict.fromkeys(_XLSUM.val_langs + _XLSUM.test_langs + _XLSUM.source_langs)
                        if lang != "en"]
TEXT_MB = 256  # per language; see the README ("Intermediate-tuning text") for what it serves


# -----------------------------------------------------------------------------
# The plan: what to fetch from where, and where it goes

def plan(tasks, langs=None):
    """[(task, remote name, destination relative to --data-dir, language)]. The remote name is the
    path below the task's base URL (or below a mirror, which repeats the official layout as
    mirror/<task>/<remote name>)."""
    items = []
    for task in tasks:
        if task not in FILES:
            raise UsageError(f"--tasks: unknown task '{task}'; choose from {', '.join(TASKS)}")
        items += [(task, remote, rel, lang) for remote, rel, lang in FILES[task](langs)]
    return items


def xquad_files(langs):
    return [(f"xquad.{lang}.json", f"xquad/xquad.{lang}.json", lang) for lang in data.XQUAD_LANGS]


def squad_files(langs):
    return [(f"{split}-v1.1.json", f"squad/{split}-v1.1.json", None) for split in ("train", "dev")]


def xlsum_files(langs):
    items = []
    for lang in langs or XLSUM_LANGS:
        folder = data.get_language(lang, "--langs").xlsum
        if folder is None:
            raise UsageError(f"--langs: XL-Sum has no data for '{lang}'")
        items.append((f"{folder}_XLSum_v2.0.tar.bz2", f"xlsum/{folder}_train.jsonl", lang))
    return items


def text_files(langs):
    items = []
    for lang in langs or data.target_langs():
        language = data.get_language(lang, "--langs")
        items.append((f"{language.cc100 or language.code}.txt.xz", data.text_path("", lang).lstrip(os.sep), lang))
    return items


# What each source holds: (remote name, destination, language) of every file
FILES = {"xquad": xquad_files, "squad": squad_files, "xlsum": xlsum_files, "text": text_files}


def url_of(task, remote, mirror=None):
    return f"{mirror.rstrip('/')}/{task}/{remote}" if mirror else f"{OFFICIAL_BASE[task]}/{remote}"


def _reason(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} ({error.reason})"
    return getattr(error, "reason", None) or error


def _open_url(url, start=0, timeout=60):
    """A response for `url` from byte `start` on (HTTP Range), and how many leading bytes of its
    body to skip (a server that ignores Range sends the whole file with status 200)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"download {url}: {_reason(e)}") from None
    return response, (start if start and response.status != 206 else 0)


# -----------------------------------------------------------------------------
# Whole files (XQuAD, SQuAD, XL-Sum): into a temporary file, checked, renamed

def fetch(url, dest, check=None):
    """Download `url` to `dest` atomically: a temporary file beside it, checked, then renamed."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".part-")
    try:
        response, _ = _open_url(url)
        with os.fdopen(fd, "wb") as out, response:
            shutil.copyfileobj(response, out)
            if getattr(response, "length", None):  # http.client returns end-of-file, not an error, when the connection drops
                raise DataError(f"download {url}: interrupted ({response.length:,} bytes missing)")
        if check is not None:
            check(tmp)
        os.chmod(tmp, common.file_mode())
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, http.client.HTTPException, DataError) as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, DataError) and str(e).startswith("download "):
            raise
        raise DataError(f"download {url}: {_reason(e)}") from None


def unpack_xlsum(archive, out_dir):
    """Extract the {folder}_{train,val,test}.jsonl files of an XL-Sum archive into out_dir."""
    try:
        with tarfile.open(archive, "r:bz2") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jsonl")]
            if not members:
                raise DataError(f"{archive}: no .jsonl files in the archive")
            for member in members:
                fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".part-")
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(member), out)
                os.chmod(tmp, common.file_mode())
                os.replace(tmp, os.path.join(out_dir, os.path.basename(member.name)))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive}: not a readable XL-Sum archive ({e})") from None


def fetch_xlsum(url, dest_train):
    """The archive into a temporary file, its jsonl files next to dest_train, the archive removed."""
    out_dir = os.path.dirname(dest_train)
    os.makedirs(out_dir, exist_ok=True)
    fd, archive = tempfile.mkstemp(dir=out_dir, prefix=".part-", suffix=".tar.bz2")
    os.close(fd)
    try:
        fetch(url, archive)
        unpack_xlsum(archive, out_dir)
    except DataError as e:
        raise DataError(f"download {url}: {e}" if not str(e).startswith("download ") else str(e)) from None
    finally:
        if os.path.exists(archive):
            os.unlink(archive)


# -----------------------------------------------------------------------------
# Intermediate-tuning text: streamed, cleaned, capped, resumable

class LineCleaner:
    """One paragraph per line: whitespace collapsed; empty lines and lines seen before dropped.
    Lines are remembered by an 8-byte hash (about 60 MB of memory per million lines)."""

    def __init__(self):
        self.seen = set()
        self.num_lines = self.num_dropped = 0

    def clean(self, line):
        text = " ".join(line.split())
        if not text:
            return None
        key = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
        if key in self.seen:
            self.num_dropped += 1
            return None
        self.seen.add(key)
        self.num_lines += 1
        return text


def fetch_text(url, dest, text_mb, chunk_size=1 << 16, bar=None):
    """Stream CC-100 text from `url` (xz) into `dest`, cleaned, stopping at `text_mb` MB.

    Resumable: the compressed bytes received so far are kept in DEST_DIR/.<lang>.download/; a rerun
    decompresses them again (local) and asks the server only for the rest (HTTP Range). Returns
    (MB written, lines written, duplicate lines dropped, whether the source ended first).
    """
    directory, name = os.path.split(dest)
    lang = name.rsplit(".", 1)[0]
    state_dir = os.path.join(directory, f".{lang}.download")
    raw_path, state_path = os.path.join(state_dir, "source.txt.xz.part"), os.path.join(state_dir, "state.json")
    part = os.path.join(directory, f".{lang}.txt.part")
    limit = int(text_mb * 2 ** 20)
    os.makedirs(state_dir, exist_ok=True)
    state = {"url": url, "text_mb": text_mb}
    if not os.path.isfile(state_path) or common.read_json(state_path) != state:  # a new download
        open(raw_path, "wb").close()
        common.write_json(state_path, state)

    decompressor, decoder, cleaner = lzma.LZMADecompressor(), codecs.getincrementaldecoder("utf-8")(), LineCleaner()
    written, pending, offset = 0, "", 0
    ended = False

    def feed(chunk):
        """Decompress, decode and clean `chunk`; append to the output; True once the cap is reached."""
        nonlocal written, pending, offset
        try:
            text = decoder.decode(decompressor.decompress(chunk))
        except lzma.LZMAError as e:
            raise DataError(f"download {url}: corrupt xz data near compressed byte {offset:,} ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"download {url}: not UTF-8 text after decompression ({e.reason})") from None
        offset += len(chunk)
        lines = (pending + text).split("\n")
        pending = lines.pop()
        for line in lines:
            clean = cleaner.clean(line)
            if clean is None:
                continue
            encoded = (clean + "\n").encode("utf-8")
            if written + len(encoded) > limit:
                return True
            out.write(encoded)
            written += len(encoded)
            if bar is not None:
                bar.update(len(encoded))
        return False

    try:
        with open(part, "wb") as out:
            done = False
            with open(raw_path, "rb") as raw:   # 1. what an earlier attempt already received
                for chunk in iter(lambda: raw.read(chunk_size), b""):
                    if feed(chunk):
                        done = True
                        break
            if not done and not decompressor.eof:  # 2. the rest, from the server
                response, skip = _open_url(url, start=os.path.getsize(raw_path))
                with response, open(raw_path, "ab") as raw:
                    while True:
                        try:
                            chunk = response.read(chunk_size)
                        except (OSError, http.client.HTTPException) as e:  # e.g. the connection was cut
                            raise DataError(f"download {url}: interrupted ({type(e).__name__}); "
                                            f"run the command again to continue") from None
                        if not chunk:
                            if getattr(response, "length", None):  # fewer bytes than the server announced: the connection dropped
                                raise DataError(f"download {url}: interrupted ({response.length:,} bytes missing); "
                                                f"run the command again to continue")
                            break
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                            if not chunk:
                                continue
                        raw.write(chunk)
                        raw.flush()
                        if feed(chunk):
                            done = True
                            break
                        if decompressor.eof:
                            break
            if not done:
                if not decompressor.eof:
                    raise DataError(f"download {url}: the xz stream ends before its end marker "
                                    f"(truncated at compressed byte {offset:,})")
                ended = True
                if pending.strip():  # the source's last line, without a newline
                    clean = cleaner.clean(pending)
                    encoded = (clean + "\n").encode("utf-8") if clean else b""
                    if encoded and written + len(encoded) <= limit:
                        out.write(encoded)
                        written += len(encoded)
        os.chmod(part, common.file_mode())
        os.replace(part, dest)
    except DataError as e:
        if "corrupt" in str(e) or "ends before" in str(e) or "UTF-8" in str(e):
            common.remove_tree(state_dir)  # bad bytes would be replayed on every rerun: start over next time
        raise
    finally:
        if os.path.exists(part):
            os.unlink(part)
    common.remove_tree(state_dir)
    return written / 2 ** 20, cleaner.num_lines, cleaner.num_dropped, ended


# -----------------------------------------------------------------------------

def study_models():
    """Every model the study uses (study.py's models, mT5-large, the translator)."""
    import study
    return list(study.MODELS.values()) + list(study.LARGE_MODELS.values()) + [study.TRANSLATOR]


def download_models(data_dir, names, endpoint=None, revision="main"):
    """Each model's repository files (MODEL_FILES) into the Hugging Face cache that from_pretrained
    reads (HF_HOME), at `revision`; the commit it resolved to is recorded in DATA/models.json.
    Already cached files are not fetched again."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    record_path = os.path.join(data_dir, "models.json")
    record = common.read_json(record_path, "models.json") if os.path.isfile(record_path) else {}
    for name in names:
        print(f"get  {endpoint or 'huggingface.co'}/{name} ({revision}) -> the Hugging Face cache", flush=True)
        try:
            path = snapshot_download(name, revision=revision, allow_patterns=MODEL_FILES, endpoint=endpoint)
        except RepositoryNotFoundError:
            raise DataError(f"download model {name}: no such repository on {endpoint or 'huggingface.co'}") from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            raise DataError(f"download model {name}: {' '.join(str(e).split())[:300]}") from None
        record[name] = {"revision": os.path.basename(path), "requested": revision, "path": path}
        print(f"     {path}")
        common.write_json(record_path, record)  # after each model: an interrupted run keeps what it recorded


def fetch_lid(data_dir, mirror=None, force=False):
    """The paper's fastText language-ID model, lid.176.bin, into DATA/lid/, checked by loading it."""
    dest = os.path.join(data_dir, LID_FILE)
    if os.path.exists(dest) and not force:
        print(f"have {dest}")
        return
    url = f"{mirror.rstrip('/')}/lid/lid.176.bin" if mirror else f"{LID_URL}/lid.176.bin"
    print(f"get  {url} -> {dest}", flush=True)

    def check(path):
        import fasttext
        try:
            fasttext.load_model(path)
        except ValueError as e:
            raise DataError(f"download {url}: not a fastText model ({e})") from None
    fetch(url, dest, check=check)


def download(data_dir, tasks, langs=None, mirror=None, force=False, text_mb=TEXT_MB, models=None, hub_endpoint=None):
    """Fetch every file of `tasks` into data_dir; files already there are kept unless `force`."""
    extra = [t for t in tasks if t in EXTRA_TASKS]
    items = plan([t for t in tasks if t not in EXTRA_TASKS], langs)
    common.check_output_dir(data_dir, "--data-dir")
    os.makedirs(data_dir, exist_ok=True)
    if "lid" in extra:
        fetch_lid(data_dir, mirror, force)
    if "models" in extra:
        download_models(data_dir, models or study_models(), hub_endpoint)
    for task, remote, rel, lang in items:
        dest, url = os.path.join(data_dir, rel), url_of(task, remote, mirror)
        if os.path.exists(dest) and not force:
            print(f"have {dest}")
            continue
        print(f"get  {url} -> {dest}", flush=True)
        FETCH[task](url, dest, lang, text_mb)


def fetch_squad_format(url, dest, lang, text_mb):
    fetch(url, dest, check=data.read_squad)


def fetch_xlsum_language(url, dest, lang, text_mb):
    fetch_xlsum(url, dest)


def fetch_text_language(url, dest, lang, text_mb):
    with tqdm(total=int(text_mb * 2 ** 20), unit="B", unit_scale=True, desc=f"text {lang}",
              dynamic_ncols=True, leave=False) as bar:
        mb, lines, dropped, ended = fetch_text(url, dest, text_mb, bar=bar)
    print(f"     {mb:,.1f} MB, {lines:,} lines ({dropped:,} duplicate lines dropped)"
          + (f"; the source ended before {text_mb} MB" if ended else ""))


EXTRA_TASKS = ("models", "lid")  # fetched only when asked for (--tasks models,lid)

# How each source's files are fetched and checked
FETCH = {"xquad": fetch_squad_format, "squad": fetch_squad_format, "xlsum": fetch_xlsum_language,
         "text": fetch_text_language}


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="where to write the files (default data/ or $XLGEN_DATA_DIR)")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated: {', '.join(TASKS)} (the default), and models (every model of the study, "
                        f"into the Hugging Face cache), lid (fastText lid.176.bin)")
    p.add_argument("--models", default=None, metavar="NAME,...",
                   help="with --tasks models: these hub models instead of the study's (implies --tasks models "
                        "when --tasks is not given)")
    p.add_argument("--hub-endpoint", default=None,
                   help="a Hugging Face hub mirror for --tasks models (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--langs", default=None,
                   help=f"languages of xlsum and text (default: xlsum {','.join(XLSUM_LANGS)}; "
                        f"text {','.join(data.target_langs())})")
    p.add_argument("--text-mb", type=common.positive_float, default=TEXT_MB, help="MB of cleaned text per language")
    p.add_argument("--mirror", default=None,
                   help="fetch MIRROR/<task>/<file> instead of the official hosts (a copy of the official layout)")
    p.add_argument("--force", action="store_true", help="download again files that already exist")
    return p.parse_args(argv)


@common.exits_on_error(interrupted=common.RERUN_HINT)
def main(args):
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models is not None else None
    if models is not None and not models:
        raise UsageError("--models: expected NAME,... (hub model names)")
    if models and args.tasks == ",".join(TASKS):  # --models alone: those models, nothing else
        tasks = ["models"]
    if models and "models" not in tasks:
        raise UsageError(f"--models: only with --tasks models (got --tasks {args.tasks})")
    if args.mirror is not None and not args.mirror.startswith(("http://", "https://", "file://")):
        raise UsageError(f"--mirror: expected an http://, https:// or file:// URL, got '{args.mirror}'")
    langs = data.parse_langs(args.langs, "--langs") if args.langs else None
    download(args.data_dir, tasks, langs, args.mirror, args.force, args.text_mb, models, args.hub_endpoint)


if __name__ == "__main__":
    main(parse_args())
