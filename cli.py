"""
What every command line of the project shares: one-line errors with exit code 2, --help that shows every default,
checks on the paths a user names, the lock that makes a folder one live process's own, and writes that leave no
torn file, and progress reports that read well on a terminal and in a log file.

    parser = cli.Parser(description=__doc__)        # argparse, but a bad flag is one line and exit code 2
    with cli.usage_errors():                        # UsageError (or a ValueError/OSError naming a flag or file)
        ...                                         #   -> "error: <what and the fix>" on stderr, exit code 2
    lock = cli.own_folder("runs/x")                 # held until the process ends, however it ends
    cli.write_json("runs/x/config.json", obj)       # the whole file or none (also write_file, write_atomic)
    bar = cli.progress(total=300, desc="train", unit="step")  # a bar on a terminal, plain lines in a file

Imports nothing from the project: every other module may use it.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import sys
import time

USAGE = 2  # the exit code of every usage error (argparse's own)
LOCK_NAME = ".lock"


class UsageError(ValueError):
    """Bad flags, files or combinations: one line on stderr naming the flag and the fix, exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks and show every default, 0 included; leave out only the empty ones
    (None, False), whose help text says what happens then."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (plain argparse prints its whole usage block first), HelpFormatter by default."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        main = getattr(sys.modules["__main__"], "__spec__", None)
        if main is not None and "." in main.name:  # run as `python -m study.sweep`: say so in usage and errors
            kw.setdefault("prog", f"python -m {main.name}")
        super().__init__(*args, **kw)

    def error(self, message):
        self.exit(USAGE, f"error: {message} (see {self.prog} --help)\n")


def fail(message):
    """Stop with a usage error: one line on stderr, exit code 2."""
    print("error: " + " ".join(str(message).split("\n")), file=sys.stderr)
    sys.exit(USAGE)


@contextlib.contextmanager
def usage_errors(quiet=False):
    """Turn the errors a user's input causes into one line and exit code 2: UsageError and the project's other
    ValueErrors (DataError, CheckpointError, ...) name the flag or file and the fix; an OSError names the path.
    quiet: exit without printing (the processes of a multi-process run other than the first)."""
    try:
        yield
    except (ValueError, OSError) as e:
        if quiet:
            sys.exit(USAGE)
        fail(e if isinstance(e, ValueError) else f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))


# -----------------------------------------------------------------------------
# paths a user names: checked before anything is written

def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_file_path(path, flag):
    """A file we will create or append to: not a folder, and its folder exists or can be made, writable."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; it must name a file")
    base = _nearest_existing(path)
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path} is not writable; choose another file")
    elif not os.path.isdir(base):
        raise UsageError(f"{flag} {path}: {base} is a file, not a folder; choose another path")
    elif not os.access(base, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot create it under {base} (not writable); choose another path")


def check_folder_path(path, flag):
    """A folder we will create or write into: not a file, and it or its nearest existing parent is writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file; it must name a folder")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise UsageError(f"{flag} {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK):
        raise UsageError(f"{flag} {path}: {base} is not writable; choose another path")


def check_input_file(path, what):
    """A file we will read (`what`: the flag, or what a positional argument is)."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder; it must name a file")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist")


def check_input_folder(path, what, fix=""):
    """A folder we will read (`what`: the flag, or what a positional argument is; `fix`: what to pass instead)."""
    if not os.path.exists(path):
        raise UsageError(f"{what} {path} does not exist" + (f"; {fix}" if fix else ""))
    if not os.path.isdir(path):
        raise UsageError(f"{what} {path} is a file, not a folder" + (f"; {fix}" if fix else ""))


def read_json(path, what):
    """The JSON object in a file read back (`what` it should be, e.g. "a run's config.json"): a missing, empty,
    truncated or garbage file is a UsageError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        obj = json.loads(raw)
    except FileNotFoundError:
        raise UsageError(f"{path}: not {what} (no such file)") from None
    except ValueError as e:  # also a UnicodeDecodeError
        why = "an empty file" if not raw.strip() else f"not valid JSON: {e}; truncated or damaged?"
        raise UsageError(f"{path}: not {what} ({why})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not {what} (a JSON {type(obj).__name__}, not an object)")
    return obj


# -----------------------------------------------------------------------------
# one live process per folder

def own_folder(folder, flag="--out"):
    """Make `folder` (created if missing) this process's own until it ends: an exclusive flock on folder/.lock, which
    the kernel releases when the process dies, so a crashed run never leaves it stuck. Another live process holding
    it is a usage error. Returns the open lock file; keep a reference to it. The lock file itself stays in the
    folder: deleting it would let a third process lock a new file while the second still holds the old one."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, LOCK_NAME), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UsageError(f"{flag} {folder} is in use by another live process (pid {holder}); wait for it to end or "
                         f"choose another {flag}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def folder_entries(folder):
    """What a folder holds besides its lock file ([] when it does not exist)."""
    return sorted(e for e in os.listdir(folder) if e != LOCK_NAME) if os.path.isdir(folder) else []


# -----------------------------------------------------------------------------
# writes that leave the old file or the new one, never half of one

def write_atomic(path, write):
    """Write a file whole or not at all: write(tmp) writes it at a temporary path in the same folder, which is
    fsynced and renamed over `path`. On any failure (a full disk, a read-only folder, a signal) the temporary file
    is removed, the old file stays, and an OSError names `path` itself."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # a full disk may only say so here (delayed allocation, network filesystems)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"writing failed: {e.strerror or e}", path) from None
        raise


def strict_json(obj, where, **kw):
    """json.dumps, refusing a NaN or infinity (not JSON: strict readers reject the file) with a ValueError naming
    `where` and the key it sits under; an undefined value is None (null)."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        raise ValueError(f"{where}: refusing to write the non-finite number at {_nonfinite(obj)}; JSON has no NaN "
                         "or infinity (write None for an undefined value)") from None


def _nonfinite(obj, at="the top"):
    """Where the first non-finite float in a JSON-like object sits ("metrics.asr_net"), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return at
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        if found := _nonfinite(v, str(k) if at == "the top" else f"{at}.{k}"):
            return found
    return None


def write_file(path, data):
    """Write bytes or text to a file, atomically (write_atomic)."""
    def write(tmp):
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    write_atomic(path, write)


def write_json(path, obj):
    """Strict JSON (strict_json), atomically (write_atomic)."""
    write_file(path, strict_json(obj, path, indent=2))


# -----------------------------------------------------------------------------
# progress: a bar on a terminal, plain lines in a log

LOG_LINES = 20   # a log gets a line every round number of units giving 20 to 50 lines over the total ...
LOG_GAP_S = 10   # ... but not within 10 s of the last line (short passes write their last line only)
PROGRESS_HELP = (f"Progress (on stderr): on a terminal, a bar redrawn in place; in a file or a pipe (a sweep's log, "
                 f"torchrun under a scheduler), a plain line each time another 1, 2 or 5 x 10^k units are done, the "
                 f"largest such number giving at least {LOG_LINES} lines (e.g. every 100 of 2,500 steps), none within "
                 f"{LOG_GAP_S} s of the last, and one at the last unit.")


def progress(iterable=None, desc=None, total=None, unit="it", initial=0, leave=True, disable=False, file=None):
    """A progress report with tqdm's interface (iterate over it, or call update(n); set_postfix(dict) for what the
    loop has to add; write(text) for a message of its own, on stdout). On a terminal it is tqdm's bar, redrawn in
    place. Anywhere else (a file, a pipe: a sweep's run log, torchrun under a scheduler, CI) each redraw would be
    one more carriage return on a single endless line, so it writes plain lines instead (LogProgress)."""
    file = file or sys.stderr
    if not disable and getattr(file, "isatty", lambda: False)():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave, file=file,
                    dynamic_ncols=True)
    return LogProgress(iterable, desc, total, unit, initial, leave, disable, file)


class LogProgress:
    """Progress as plain lines: one each time the count passes a multiple of `every` (the largest 1, 2 or 5 x 10^k
    that is at most a LOG_LINES-th of the total: 20 to 50 lines) unless the last line is less than LOG_GAP_S old,
    and one at the last unit (for a pass that leaves no bar on a terminal, leave=False, only if it took LOG_GAP_S or
    more), with what a reader of a log needs:

        train: step 1000/2500 (40%), loss 0.4213, lr 3.00e-04, samples/s 92.1, elapsed 3:01, ETA 4:32

    Elapsed and ETA are this process's (a resumed run counts from where it resumed)."""

    def __init__(self, iterable=None, desc=None, total=None, unit="it", initial=0, leave=True, disable=False,
                 file=None, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.leave, self.disable = leave, disable
        self.file, self.clock = file or sys.stderr, clock
        self.n = self.initial = initial
        self.every = round_every(total / LOG_LINES) if total else None
        self.postfix = {}
        self.t0 = self.last = clock()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, values=None, refresh=True, **kw):  # tqdm's signature; the next line written shows them
        self.postfix = {**(values or {}), **kw}

    def update(self, n=1):
        before, self.n = self.n, self.n + n
        now = self.clock()
        last = self.total is not None and self.n >= self.total > before and (self.leave or now - self.t0 >= LOG_GAP_S)
        passed = self.every is not None and self.n // self.every > before // self.every
        if not self.disable and (last or (passed and now - self.last >= LOG_GAP_S)):
            self.last = now
            sys.stdout.flush()  # what the loop printed before comes before this line in a shared log
            print(self.line(now), file=self.file, flush=True)

    def line(self, now):
        elapsed = now - self.t0
        done = f"{self.n}/{self.total} ({100 * self.n // self.total}%)" if self.total else f"{self.n}"
        parts = [f"{self.unit} {done}"] + [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(f"elapsed {clock_time(elapsed)}")
        if self.total and self.initial < self.n < self.total:
            parts.append(f"ETA {clock_time((self.total - self.n) * elapsed / (self.n - self.initial))}")
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    @staticmethod
    def write(text):
        print(text, flush=True)

    def close(self):
        pass


def round_every(x):
    """The largest of 1, 2, 5, 10, 20, 50, ... that is at most x (1 for x < 1)."""
    if x < 1:
        return 1
    power = 10 ** math.floor(math.log10(x))
    return max(m * power for m in (1, 2, 5) if m * power <= x)


def clock_time(seconds):
    """4:31, or 1:48:20 past an hour."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
