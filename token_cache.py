"""The token cache: each input file tokenized once per tokenizer and encoding, kept on disk, read as batches need it.

    python token_cache.py --model tiny-mt5 --data-dir ../shared/data --task xquad --text-langs en,fr
    python token_cache.py --model google/mt5-base --task xlsum --text-langs zh,fr,ko,ru,es   # before a study

Without it every run read its whole corpus into Python lists and tokenized it at each start: ~100 GB
of RAM and hours for the paper's intermediate-tuning corpus (11 x 256 MB), ~20 minutes for each of the
study's XL-Sum runs while the GPU waited. With it a file is tokenized once, by the first run that needs
it (in batches with the fast tokenizer, a progress bar showing tokens/s), and every later run -- other
methods, LRs, seeds, --resume of a chunked job -- opens it in a second; a run holds per example only
its offset and lengths (data.EncodedExamples), and the ids of a batch are read when it is built.

One entry per (file content, tokenizer, encoding settings), in CACHE/<file>.<what>.<key>/:

    tokens.bin   int32 token ids, example after example, source then target   (fairseq's .bin, nanoGPT's train.bin)
    index.npy    int32 (examples, 3): source length, target length, cut flags (bit 0 source, bit 1 target)
    meta.json    what the entry holds (the key's parts in clear), sizes and CRC-32s of the two files above

What an entry holds:
    task   a task file encoded for one family, language and pair of maximum lengths, exactly as
           Seq2SeqEncoder.encode does it (the batches are bit for bit those of encoding in memory)
    text   raw paragraphs, tokenized without special tokens: Prefix-LM examples are cut from them
           in token space when a stream is made (data.PrefixLMExamples), for any family and length
    zmbart ZmBART-like examples of a text file (paper Appendix B) for one seed, encoded as a task file

Safety: an entry is built in CACHE/<name>.tmp-<pid>/ and renamed into place when complete, under an
exclusive lock file CACHE/<name>.lock (fcntl), so two jobs that need the same entry at once build it
once (the second waits, then reads it); a job killed mid-build leaves only a temporary directory,
removed by the next build. Every open checks the sizes and CRC-32s in meta.json (about 1 s per GB):
an entry cut short or corrupt is rebuilt, never read.

Where: --token-cache DIR, or $XLGEN_TOKEN_CACHE; by default DATA_DIR/token-cache beside the data, or
~/.cache/xlgen/tokens when the data directory is read-only (as ../shared/data is). Size: 4 bytes per
token plus 12 per example: 1.2-1.5 GB per GB of text with the tiny 16k-piece tokenizers (measured,
README.md "The token cache"); the real 250k-piece vocabularies cut text into fewer tokens, so less.
"""

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import time
import zlib

import numpy as np
from tqdm import tqdm

import common
import data
from common import DataError, UsageError

VERSION = 1            # bump when what an entry holds changes: older entries are then not reused
CHUNK_EXAMPLES = 1000    # examples tokenized per call of the fast tokenizer, at most,
CHUNK_CHARS = 1 << 20    # and about this many characters of text (what a build holds at once)
READ_BLOCK = 1 << 20     # bytes read at a time to hash or check a file


# -----------------------------------------------------------------------------
# Where the cache lives, and what an entry is keyed by

def cache_root(token_cache=None, data_dir=None):
    """--token-cache, else $XLGEN_TOKEN_CACHE, else DATA_DIR/token-cache if DATA_DIR is writable,
    else XLGEN_CACHE/tokens (~/.cache/xlgen/tokens)."""
    root = token_cache or os.environ.get("XLGEN_TOKEN_CACHE")
    if root is None and data_dir and _writable(data_dir):
        root = os.path.join(data_dir, "token-cache")
    if root is None:
        xlgen_cache = os.environ.get("XLGEN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "xlgen"))
        root = os.path.join(xlgen_cache, "tokens")
    root = os.path.abspath(root)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--token-cache {root}: cannot create the token cache ({e.strerror})") from None
    if not os.access(root, os.W_OK):
        raise UsageError(f"--token-cache {root}: not writable; pass another --token-cache")
    return root


def _writable(directory):
    """Writable, and not marked read-only by its mode bits (root may write anywhere, but a directory
    without a write bit, as ../shared/data, is data to be left as it is)."""
    try:
        return bool(os.stat(directory).st_mode & 0o222) and os.access(directory, os.W_OK)
    except OSError:
        return False


def file_digest(path, root):
    """SHA-256 of a file's bytes, remembered in ROOT/digests/ against its size, mtime and inode, so an
    unchanged file is hashed once (like git's index), a changed or replaced one again."""
    st = os.stat(path)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo = os.path.join(root, "digests", hashlib.sha1(os.path.realpath(path).encode()).hexdigest() + ".json")
    try:
        with open(memo, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("stamp") == stamp and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            digest.update(block)
    common.write_json(memo, {"path": os.path.realpath(path), "stamp": stamp, "sha256": digest.hexdigest()})
    return digest.hexdigest()


_TOKENIZER_DIGESTS = {}


def tokenizer_digest(tokenizer):
    """SHA-256 of the fast tokenizer's full definition (vocabulary, normalizer, added tokens), without
    its truncation and padding: HF leaves those set on the backend by the last call that asked for
    them (truncation=True, padding=True), so they say what came before, not what the tokenizer is."""
    if id(tokenizer) not in _TOKENIZER_DIGESTS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise UsageError(f"--model: the token cache needs a fast tokenizer; {type(tokenizer).__name__} is not one")
        definition = json.loads(backend.to_str())
        definition["truncation"] = definition["padding"] = None
        digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
        _TOKENIZER_DIGESTS[id(tokenizer)] = (tokenizer, digest)
    return _TOKENIZER_DIGESTS[id(tokenizer)][1]


def entry_name(path, what, key):
    """Readable and unique: the file's name, what the entry holds, the hash of everything it depends on."""
    digest = hashlib.sha256(json.dumps({"version": VERSION, **key}, sort_keys=True).encode()).hexdigest()
    return f"{os.path.basename(path)}.{what}.{digest[:20]}"


# -----------------------------------------------------------------------------
# An entry on disk: written by EntryWriter, checked and opened by open_entry

class TokenFile:
    """The int32 ids of an entry's tokens.bin, read with pread when a batch is built. (Not a memory
    map: the same page cache serves both, but the pages a map touches count as the process's resident
    memory, so a long run would seem to grow by its corpus.)"""

    def __init__(self, path):
        self.path, self._fd, self._pid = path, None, None

    def read(self, start, count):
        if self._pid != os.getpid():  # a file descriptor per process (forked workers)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        raw = os.pread(self._fd, 4 * count, 4 * start)
        if len(raw) != 4 * count:
            raise DataError(f"{self.path}: token cache entry cut short while in use; rerun to rebuild it")
        return np.frombuffer(raw, dtype=np.int32)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            crc = zlib.crc32(block, crc)
    return crc


class EntryWriter:
    """Appends encoded examples to a temporary entry directory; finish() writes index and meta."""

    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory)
        self._tokens = open(os.path.join(directory, "tokens.bin"), "wb")
        self._rows, self.num_tokens = [], 0

    def add(self, sources, targets, flags):
        lengths = [(len(s), len(t), f) for s, t, f in zip(sources, targets, flags)]
        num = sum(s + t for s, t, _ in lengths)
        ids = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(zip(sources, targets))),
                          dtype=np.int32, count=num)
        self._tokens.write(ids.tobytes())
        self._rows.append(np.array(lengths, dtype=np.int32).reshape(-1, 3))
        self.num_tokens += len(ids)

    def finish(self, meta):
        self._tokens.close()
        index = np.concatenate(self._rows) if self._rows else np.zeros((0, 3), np.int32)
        np.save(os.path.join(self.directory, "index.npy"), index)
        files = {name: {"bytes": os.path.getsize(os.path.join(self.directory, name)),
                        "crc32": _crc32(os.path.join(self.directory, name))} for name in ("tokens.bin", "index.npy")}
        meta = {**meta, "version": VERSION, "num_examples": len(index), "num_tokens": self.num_tokens, "files": files}
        common.write_json(os.path.join(self.directory, "meta.json"), meta)
        return meta


def check_entry(directory):
    """None if the entry is complete and intact, else why not (missing, cut short, corrupt, older version)."""
    try:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "no meta.json"
    except (OSError, ValueError) as e:
        return f"unreadable meta.json ({e})"
    if not isinstance(meta, dict) or meta.get("version") != VERSION or not isinstance(meta.get("files"), dict):
        return "another version"
    for name in ("tokens.bin", "index.npy"):
        path, expected = os.path.join(directory, name), meta["files"].get(name) or {}
        if not os.path.isfile(path):
            return f"{name} missing"
        if os.path.getsize(path) != expected.get("bytes"):
            return f"{name} is {os.path.getsize(path):,} bytes, expected {expected.get('bytes'):,}"
        if _crc32(path) != expected.get("crc32"):
            return f"{name} is corrupt (CRC-32 mismatch)"
    if meta["files"]["tokens.bin"]["bytes"] != 4 * meta.get("num_tokens", -1):
        return "tokens.bin does not match meta.json"
    return None


def open_entry(directory):
    """EncodedExamples over a checked entry (only its index is read into RAM)."""
    index = np.load(os.path.join(directory, "index.npy"))
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    examples = data.EncodedExamples(TokenFile(os.path.join(directory, "tokens.bin")), index[:, 0], index[:, 1],
                                    index[:, 2].astype(np.uint8))
    examples.meta, examples.directory = meta, directory
    return examples


@contextlib.contextmanager
def _locked(path):
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def get_or_build(root, name, build):
    """The entry ROOT/name, built by build(writer) -> meta first if it is missing or damaged."""
    directory = os.path.join(root, name)
    if os.path.isdir(directory) and check_entry(directory) is None:
        return open_entry(directory)
    with _locked(directory + ".lock"):
        problem = check_entry(directory) if os.path.isdir(directory) else None
        if os.path.isdir(directory) and problem is None:  # another job built it while we waited
            return open_entry(directory)
        if problem is not None:
            print(f"token cache {directory}: {problem}; rebuilding it")
            shutil.rmtree(directory)
        for stale in os.listdir(root):  # left by a job killed mid-build (we hold the lock: nobody builds it now)
            if stale.startswith(name + ".tmp-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        temporary = f"{directory}.tmp-{os.getpid()}"
        try:
            writer = EntryWriter(temporary)
            build(writer)
            os.rename(temporary, directory)
        except OSError as e:  # e.g. a full disk: nothing half-written is left, and the message says where
            shutil.rmtree(temporary, ignore_errors=True)
            raise DataError(f"{temporary}: cannot write the token cache ({e.strerror or e}); free space there "
                            f"or pass another --token-cache") from None
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return open_entry(directory)


def _num_chars(item):
    """Characters of text in a paragraph, a reference (dict) or an Example: what sizes a chunk."""
    if isinstance(item, str):
        return len(item)
    fields = item.values() if isinstance(item, dict) else vars(item).values()
    return sum(len(v) for v in fields if isinstance(v, str))


def _build_loop(writer, path, items, encode_chunk, what, meta):
    """Encode `items` (an iterator) in chunks of CHUNK_EXAMPLES items or CHUNK_CHARS characters with
    encode_chunk(chunk) -> (sources, targets, flags), showing examples and tokens/s."""
    start, chunk, chars = time.perf_counter(), [], 0
    bar = tqdm(desc=f"tokenizing {os.path.basename(path)} ({what})", unit=" examples", mininterval=2, leave=False)
    with bar:
        def flush():
            writer.add(*encode_chunk(chunk))
            bar.update(len(chunk))
            bar.set_postfix(tokens_per_s=f"{writer.num_tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
            chunk.clear()
        for item in items:
            chunk.append(item)
            chars += _num_chars(item)
            if len(chunk) == CHUNK_EXAMPLES or chars >= CHUNK_CHARS:
                flush()
                chars = 0
        if chunk:
            flush()
    seconds = time.perf_counter() - start
    meta = writer.finish({**meta, "file": os.path.realpath(path), "seconds": round(seconds, 3),
                          "tokens_per_s": round(writer.num_tokens / max(seconds, 1e-9))})
    print(f"token cache: {os.path.basename(writer.directory).rpartition('.tmp-')[0]}: {meta['num_examples']:,} examples, "
          f"{meta['num_tokens']:,} tokens in {seconds:.1f} s ({meta['tokens_per_s']:,} tokens/s)")


# -----------------------------------------------------------------------------
# The three kinds of entry

def _encoding_key(encoder):
    return {"tokenizer": tokenizer_digest(encoder.tokenizer), "family": encoder.family,
            "max_source_length": encoder.max_source_length, "max_target_length": encoder.max_target_length}


def _encode(encoder, examples):
    """(sources, targets, cut flags) of data.Examples, encoded as Seq2SeqEncoder.encode does it."""
    flags = []
    encoded = encoder.encode(examples, flags=flags)
    return [e["input_ids"] for e in encoded], [e["labels"] for e in encoded], flags


def task_examples(task, path, lang, encoder, root, limit=None):
    """EncodedExamples of a task file in `lang`, as encoder.encode(data.task_examples(...)) gives them.
    With `limit` (--max-train-examples, --max-eval-examples, XL-Sum's first 2k test examples): the
    first `limit`, from the whole file's entry if there is one, else from an entry of those only (a
    quick run does not tokenize a whole training set to use 400 examples of it)."""
    key = {"what": "task", "file": file_digest(path, root), "format": data.get_task(task).kind, "lang": lang,
           **_encoding_key(encoder)}
    whole = entry_name(path, f"{task}-{lang}", key)
    if limit is not None:
        if os.path.isdir(os.path.join(root, whole)) and check_entry(os.path.join(root, whole)) is None:
            return open_entry(os.path.join(root, whole)).subset(0, limit)
        key = {**key, "limit": limit}

    def build(writer):
        references = itertools.islice(data.get_task(task).format.iterate(path), limit)
        _build_loop(writer, path, references, lambda chunk: _encode(encoder, data.task_examples(task, chunk, lang)),
                    f"{task} {lang}", key)
    name = whole if limit is None else entry_name(path, f"{task}-{lang}-first{limit}", key)
    return get_or_build(root, name, build)


def text_paragraphs(path, tokenizer, root):
    """EncodedExamples of a raw text file's paragraphs (src_lengths = paragraph lengths, no targets),
    tokenized without special tokens: what PrefixLMExamples cuts, for every family and length."""
    key = {"what": "text", "file": file_digest(path, root), "tokenizer": tokenizer_digest(tokenizer)}

    def encode_chunk(paragraphs):
        ids = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
        return ids, [[] for _ in ids], [0] * len(ids)

    return get_or_build(root, entry_name(path, "text", key),
                        lambda writer: _build_loop(writer, path, data.iter_text(path), encode_chunk, "text", key))


def self_supervised(path, lang, objective, encoder, root, seed=0):
    """Self-supervised examples of a text file: Prefix-LM cut in token space from the cached paragraphs
    (any seed, no new entry); ZmBART-like examples (sentence selection, Appendix B) made as
    data.zmbart_example makes them and cached encoded, per seed."""
    if objective == "prefix_lm":
        return data.PrefixLMExamples(text_paragraphs(path, encoder.tokenizer, root), lang, encoder, seed=seed)
    key = {"what": objective, "file": file_digest(path, root), "lang": lang, "seed": seed, **_encoding_key(encoder)}

    def build(writer):
        items = data.iter_self_supervised(data.iter_text(path), lang, objective, seed)
        _build_loop(writer, path, items, lambda chunk: _encode(encoder, chunk), f"{objective} {lang}", key)
    return get_or_build(root, entry_name(path, f"{objective}-{lang}-seed{seed}", key), build)


def add_cache_arg(parser):
    parser.add_argument("--token-cache", default=None,
                        help="token cache directory (default: $XLGEN_TOKEN_CACHE, else DATA_DIR/token-cache, else "
                             "~/.cache/xlgen/tokens when the data directory is read-only)")


# -----------------------------------------------------------------------------
# Command line: build (or check) the entries a run will use, e.g. once before a study

def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny-mt5", help="tiny-mt5, tiny-mbart, tiny-nllb, a checkpoint or a hub name")
    p.add_argument("--task", default=None, choices=data.finetune_tasks(), help="encode this task's training file")
    p.add_argument("--text-langs", default=None, help="comma-separated languages whose DATA/text/<lang>.txt to tokenize")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="data directory, as download.py lays it out")
    p.add_argument("--xlsum-dir", default=None, help="XL-Sum jsonl files (default: DATA_DIR/xlsum)")
    add_cache_arg(p)
    return p.parse_args(argv)


@common.exits_on_error(interrupted=common.RERUN_HINT)
def main(args):
    import models
    root = cache_root(args.token_cache, args.data_dir)
    tokenizer = models.load_tokenizer(args.model, args.data_dir)
    config = models.load_config(args.model, args.data_dir)
    length = models.max_length(config)
    encoder = models.Seq2SeqEncoder(tokenizer, models.family_of(config), length, length)
    if args.task:
        path = data.task_file(args.task, "train", "en", args.data_dir, args.xlsum_dir)
        examples = task_examples(args.task, path, "en", encoder, root)
        print(f"{path}: {len(examples):,} examples in {examples.directory}")
    for lang in data.parse_langs(args.text_langs, "--text-langs") if args.text_langs else []:
        paragraphs = text_paragraphs(data.text_path(args.data_dir, lang), tokenizer, root)
        print(f"{lang}: {len(paragraphs):,} paragraphs, {paragraphs.meta['num_tokens']:,} tokens in {paragraphs.directory}")


if __name__ == "__main__":
    main(parse_args())
