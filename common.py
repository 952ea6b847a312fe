"""Helpers every stage shares: error types, flag checking, run settings and safe file writes.

    python -c "import common; print(common.positive_int('3'), common.probability('0.01'))"

There is one home here for each of these:
  Errors      UsageError (a bad flag) and DataError (a bad file, record or checkpoint). Both carry a
              one-line message. `exits_on_error` turns either one into `error: <message>` and an
              exit, so no stage needs its own try/except.
  Flags       ArgumentParser prints argparse's errors as one `error:` line. The flag types
              (positive_int, finite_float, ...) state their valid range and check it before
              anything heavy runs.
  Settings    print_settings shows the resolved configuration at the start of a stage, in the
              style of nanoGPT. `--config RUN/args.json` feeds a run's saved settings back to the
              command line.
  Files       write_text / write_json / write_jsonl write through a temporary file and a rename,
              so a reader never sees half a file. New files get the mode that the user's umask
              gives, not mkstemp's 0600, so on a shared cluster a team can read each other's
              results. read_json names the file, and the line, when it cannot parse it.
"""

import argparse
import fcntl
import functools
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time


# -----------------------------------------------------------------------------
# Errors

class UsageError(ValueError):
    """A bad flag or combination of flags. The message is one line that names the flag."""


class DataError(ValueError):
    """Bad input: a data file, a record, a run directory or a checkpoint. The message is one line
    that names the file, and the line or record where there is one."""


class TrainingError(ValueError):
    """Training cannot go on (a non-finite loss): the message says at which step and which
    checkpoint is the last good one."""


RESUME_HINT = "resume with --resume"
RERUN_HINT = "run the same command again to continue"


def exits_on_error(main=None, *, interrupted=None):
    """Decorator for a stage's `main(args)`. UsageError, DataError and TrainingError end the
    program with `error: <message>` and exit status 1, with no traceback. Ctrl-C ends it with one
    line, `interrupted; <how to continue>` (RESUME_HINT, RERUN_HINT, or nothing), and the shell's
    status for SIGINT, 130. Use as @exits_on_error or @exits_on_error(interrupted=RESUME_HINT)."""
    if main is None:
        return functools.partial(exits_on_error, interrupted=interrupted)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UsageError, DataError, TrainingError) as e:
            sys.exit(f"error: {e}")
        except KeyboardInterrupt:
            _close_progress_bars()  # (else tqdm redraws them at exit, after the message)
            sys.stdout.flush()
            print("\ninterrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr, flush=True)
            sys.exit(130)
    return wrapper


def _close_progress_bars():
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# -----------------------------------------------------------------------------
# Flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that reports a bad flag as one line, `error: argument --lr: ...`,
    with exit status 2 (argparse's own status). The usage block is left out."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(text, kind, valid, expected):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
    return value


def positive_int(text):
    """An integer >= 1 (counts, steps, token budgets)."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text):
    """An integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    """A finite number > 0 (learning rates, ratios). inf and nan are refused."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text):
    """A finite number >= 0 (weight decay, clipping where 0 means off)."""
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def seed(text):
    """A random seed: an integer in [0, 2**32 - 1] (what numpy accepts)."""
    return _number(text, int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 4294967295]")


def probability(text):
    """A number strictly between 0 and 1."""
    return _number(text, float, lambda v: 0 < v < 1, "a number in (0, 1)")


def open_unit_float(text):
    """A number in [0, 1) (Adam betas)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


# -----------------------------------------------------------------------------
# Settings: printed at the start, saved in args.json, fed back with --config

def add_config_flag(parser):
    parser.add_argument("--config", default=None,
                        help="a run's args.json: its settings become the defaults, and flags given here override them")


def parse_with_config(parser, argv=None):
    """parser.parse_args, with the settings of --config FILE as defaults. Each saved value is
    checked as its flag checks the command line (config_value), so a hand-edited args.json fails
    here, in one line, before a run directory is touched."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    try:
        settings = read_json(args.config)
    except DataError as e:
        parser.error(f"argument --config: {e}")
    if not isinstance(settings, dict):
        parser.error(f"argument --config: {args.config}: expected a JSON object of settings")
    actions = {a.dest: a for a in parser._actions}  # every flag the parser knows, by attribute name
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        parser.error(f"argument --config: {args.config}: unknown setting(s) {', '.join(unknown)}")
    settings.pop("config", None)
    for name, value in settings.items():
        try:
            settings[name] = config_value(actions[name], value)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --config: {args.config}: {name}: {e}")
    parser.set_defaults(**settings)
    return parser.parse_args(argv)


def config_value(action, value):
    """A value of args.json for `action`, checked as the command line checks it; returns it
    converted. JSON has types the command line has not, so: a switch (store_true) takes true or
    false only; null only where the flag's default is null (it is optional); a boolean is never a
    number; a number goes through the flag's type as its text would (10.0 is not an integer); a
    repeatable flag takes a list of strings, and so does a comma-separated one (args.json records
    the parsed list, e.g. val_langs)."""
    shown = json.dumps(value, ensure_ascii=False)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, got {shown}")
        return value
    if value is None:
        if action.default is not None:
            raise argparse.ArgumentTypeError(f"expected a value (default {action.default!r}), got null")
        return None
    if isinstance(action, argparse._AppendAction) and not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a list of strings, got {shown}")
    if isinstance(value, list) and (isinstance(action, argparse._AppendAction) or action.type is None):
        if not all(isinstance(item, str) for item in value):
            raise argparse.ArgumentTypeError(f"expected a list of strings, got {shown}")
        if action.choices is not None and not all(item in action.choices for item in value):
            raise argparse.ArgumentTypeError(f"invalid choice in {shown}")
        return value
    if action.type is None and not isinstance(value, str):
        raise argparse.ArgumentTypeError(f"expected a string, got {shown}")
    if isinstance(value, (bool, list, dict)):  # the flag's type says what it expects ("an integer >= 1, got 'true'")
        _convert(action, shown)
        raise argparse.ArgumentTypeError(f"expected a number, got {shown}")
    if action.type is not None:
        value = _convert(action, value if isinstance(value, str) else shown)
    if action.choices is not None and value not in action.choices:
        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


def _convert(action, text):
    try:
        return action.type(text)
    except (TypeError, ValueError):  # a plain int/float type (ours raise ArgumentTypeError)
        raise argparse.ArgumentTypeError(f"invalid {getattr(action.type, '__name__', 'value')} value: {text}") from None


def print_settings(settings, title="settings"):
    """The resolved configuration of a stage, one aligned `name  value` line each (nanoGPT style)."""
    width = max(map(len, settings), default=0)
    print(f"{title}:")
    for name, value in settings.items():
        print(f"  {name:<{width}}  {value if not isinstance(value, list) else ','.join(map(str, value))}")
    sys.stdout.flush()


# -----------------------------------------------------------------------------
# Files

def _current_umask():
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it back at once
    os.umask(mask)
    return mask


def file_mode():
    """The mode open() would give a new file under the current umask (e.g. 0644 for umask 022)."""
    return 0o666 & ~_current_umask()


def dir_mode():
    return 0o777 & ~_current_umask()


def follow_umask(directory):
    """Give every file in `directory` the umask's mode: safetensors writes its files 0600 whatever
    the umask, which a lab's group could not read (README: files follow the umask)."""
    mode = file_mode()
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, mode)


def write_bytes(path, content):
    """Write `content` to `path` through a temporary file beside it and a rename. A reader never
    sees half a file, and an interrupted write leaves the previous file in place."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:  # (also Ctrl-C, or a SIGTERM that stops an evaluation: loop.Terminated)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise DataError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def write_jsonl(path, rows):
    """One JSON object per line."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def make_temp_dir(parent, prefix):
    """A temporary directory under `parent`, with the mode the umask gives (mkdtemp's is 0700).
    It is renamed into place when it is complete."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(dir=parent, prefix=prefix)
    os.chmod(path, dir_mode())
    return path


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


def read_json(path, what="JSON"):
    """Parse a JSON file. A missing, undecodable or truncated file is a DataError that names it
    (and the line, for a parse error)."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a {what} file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid {what} ({e.msg}); the file is truncated or corrupt") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def check_output_file(path, flag):
    """Before any work: `path` can be created or replaced as a file."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag, describe=f"{flag} {path}: directory")


def check_output_dir(path, flag, describe=None):
    """Before any work: `path` is, or can be made, a writable directory."""
    describe = describe or f"{flag} {path}"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest ancestor that exists decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{describe}: {existing} is a file, not a directory")
    try:  # try it rather than ask os.access, which says yes to root even on a read-only mount
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".part-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{describe}: {existing} is not writable ({e.strerror})") from None


# -----------------------------------------------------------------------------
# Locks: one process at a time writes a run directory or a study directory

LOCK_NAME = ".lock"


class DirectoryLock:
    """An exclusive OS lock (flock) on DIR/.lock, held while a process writes DIR:

        with common.DirectoryLock(run_dir, "--out-dir"):
            ...  # train, write checkpoints

    A second process gets a UsageError naming the holder's pid and host (written into the file).
    The kernel releases the lock when the holder dies, SIGKILL included, so a crashed run never
    leaves a stale lock: the file may stay, but it no longer blocks. On a clean exit the file is
    removed (and DIR too, if this lock created it and nothing else was written there). Works on
    NFS (flock is a POSIX lock there) and Lustre mounted with -o flock.

    Removing a lock file races with a process that opened it just before: after taking the lock,
    the holder checks that the file it locked is still the one at the path, and tries again if not.
    """

    def __init__(self, directory, flag, what="it"):
        self.directory, self.flag, self.what = os.path.abspath(directory), flag, what
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.fd, self.created = None, None

    def __enter__(self):
        created = self.directory
        while os.path.dirname(created) != created and not os.path.exists(os.path.dirname(created)):
            created = os.path.dirname(created)  # the topmost directory that makedirs will create
        self.created = None if os.path.exists(self.directory) else created
        try:
            os.makedirs(self.directory, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    self._remove_created()
                    raise UsageError(f"{self.flag} {self.directory}: in use by another process ({holder or 'unknown pid'}); "
                                     f"wait for it to end, or use another {self.flag}") from None
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # its holder removed the file as we opened it: lock the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError as e:
            raise UsageError(f"{self.flag} {self.directory}: cannot lock it ({e.strerror or e})") from None
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)  # while still holding it: a newcomer creates a fresh file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_created()
        return False

    def _remove_created(self):
        """Remove the directories this lock made, if nothing else was written into them."""
        if self.created is None:
            return
        path = self.directory
        while True:
            try:
                os.rmdir(path)
            except OSError:
                return
            if path == self.created:
                return
            path = os.path.dirname(path)


def lock_holder(directory):
    """Who holds DIR's DirectoryLock ("pid N on host H, since ..."), or None if nobody does."""
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown pid"
    finally:
        os.close(fd)  # (closing releases a shared lock taken just now)


# -----------------------------------------------------------------------------
# Outputs are never inputs

def refuse_overwriting_inputs(outputs, inputs):
    """Before anything is read or written: no output path (and no file derived from one) is one of
    the command's inputs, compared by resolved path (symbolic links, `..`, hard links). outputs
    and inputs: {description, e.g. "--out m.json": path}; None paths are skipped."""
    def identity(path):
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
            return real, (st.st_dev, st.st_ino)
        except OSError:
            return real, None
    seen = {}
    for name, path in inputs.items():
        if path is not None:
            real, inode = identity(path)
            seen[real] = name
            if inode is not None:
                seen[inode] = name
    for name, path in outputs.items():
        if path is None:
            continue
        real, inode = identity(path)
        given = seen.get(real) or (seen.get(inode) if inode is not None else None)
        if given:
            raise UsageError(f"{name}: is also {given}; writing it would destroy that input: give another output path")


def refuse_inputs_inside(directory, flag, inputs):
    """Before anything is written: no input file or checkpoint lies inside the output directory a
    command writes (e.g. `finetune.py --init RUN --out-dir RUN` would replace the checkpoint it
    starts from). inputs: [(flag, path)]; None paths are skipped."""
    root = os.path.realpath(directory)
    for name, path in inputs:
        if path is None:
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) == root:
            raise UsageError(f"{name} {path}: is inside {flag} {directory}, which this command writes; "
                             f"copy it elsewhere or use another {flag}")
