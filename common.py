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
import functools
import json
import math
import os
import shutil
import sys
import tempfile


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


def exits_on_error(main):
    """Decorator for a stage's `main(args)`. UsageError, DataError and TrainingError end the
    program with `error: <message>` and exit status 1, with no traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UsageError, DataError, TrainingError) as e:
            sys.exit(f"error: {e}")
    return wrapper


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
    """parser.parse_args, with the settings of --config FILE as defaults. Each saved value goes
    through its flag's type again, so a hand-edited args.json is checked like the command line."""
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
    for name, value in settings.items():
        action = actions[name]
        if action.choices is not None and value not in action.choices:
            parser.error(f"argument --config: {args.config}: {name}: invalid choice {value!r}")
        if action.type is not None and value is not None and not isinstance(value, (list, bool)):
            try:
                action.type(str(value))
            except argparse.ArgumentTypeError as e:
                parser.error(f"argument --config: {args.config}: {name}: {e}")
    settings.pop("config", None)
    parser.set_defaults(**settings)
    return parser.parse_args(argv)


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
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise DataError(f"{path}: cannot write ({e.strerror or e})") from None


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
