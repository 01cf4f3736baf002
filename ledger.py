"""
The results ledger: JSON Lines files that gain one line per finished run (train.py's results, study/spectrum.py's
spectra) and are read by study/sweep.py, study/report.py and study/spectrum.py. One reader and one writer, used
everywhere.

    ledger.append(path, {"config": ..., "metrics": ...})
    ledger.runs(path)       # one record per run (the same run_key twice: its last line counts), in file order
    ledger.read(path)       # every record, in order
    python ledger.py strict results/conv/results.jsonl   # rewrite NaN as null in lines older code wrote

A writer killed mid-line leaves a torn last line (no newline, not JSON): read() skips it with a warning on stderr
instead of refusing the file, and the next append() drops it, with a warning, so its own line starts on a fresh line.
A line that is not a JSON object anywhere else is an error naming the file and line: that is damage, not a crash.
An append that fails (a full disk) cuts the file back to where it was.

The files are strict JSON: an undefined value (a net ASR with no negatives to count on) is null, and append()
refuses a NaN or infinity. Lines written before 2026-12-01 may hold NaN: read() reads it as null (None), and
strict() rewrites such lines once.
"""
import errno
import fcntl
import json
import os
import sys

import cli
import runspec


def read(path, require=()):
    """The records (dicts) of a JSONL file, in order; blank lines are ignored. require: keys every record must have."""
    cli.check_input_file(path, "results file")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        record = _parse(raw)
        if record is None and n == len(lines):  # the last line, without its newline: a killed writer's
            print(f"warning: {path}:{n}: skipped a torn last line (a writer was stopped mid-line): "
                  f"{raw[:60].decode('utf-8', 'replace')!r}...", file=sys.stderr)
            continue
        if record is None:
            raise cli.UsageError(f"{path}:{n}: not a JSON object; repair or delete that line")
        missing = [k for k in require if not isinstance(record.get(k), dict)]
        if missing:
            raise cli.UsageError(f"{path}:{n}: not a run's line (no {', '.join(missing)}); is this a results file?")
        records.append(record)
    return records


def runs(path):
    """The runs of a results file, one per run_key (a run recorded twice, e.g. by a resumed finish, counts once:
    its last line, at the place of its first), each config completed with the flags it predates (runspec.complete)."""
    by_key = {}
    for r in read(path, require=("config", "metrics")):
        r["config"] = runspec.complete(r["config"])
        by_key[runspec.run_key(r["config"])] = r
    return list(by_key.values())


def append(path, record):
    """Append one record as one line, under an exclusive lock, so concurrent writers' lines never interleave. The
    line is one os.write; if that or the fsync fails (a full disk), the file is cut back to where it was."""
    line = cli.strict_json(record, path).encode() + b"\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _open_locked(path) as f:
        _end_last_line(f, path)
        f.flush()
        size = f.seek(0, os.SEEK_END)
        try:
            if os.write(f.fileno(), line) != len(line):
                raise OSError(errno.ENOSPC, "short write (is the disk full?)", path)
            os.fsync(f.fileno())
        except BaseException as e:
            f.truncate(size)
            if isinstance(e, OSError):
                raise OSError(e.errno, f"appending failed: {e.strerror or e}", path) from None
            raise


def _open_locked(path):
    """`path` opened for appending under an exclusive lock (released when the file closes). strict() replaces the
    file, so a writer that waited on the lock checks it still holds the file the path names, or opens it again."""
    while True:
        f = open(path, "a+b")
        fcntl.flock(f, fcntl.LOCK_EX)
        if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            return f
        f.close()


def strict(path):
    """Rewrite a results file's lines that hold a NaN or infinity (written before append() refused them) with null
    in their place; every other line stays byte for byte. Atomic, under append()'s lock, so a sweep may be appending
    meanwhile. Returns how many lines it rewrote."""
    cli.check_input_file(path, "results file")
    with _open_locked(path) as f:
        f.seek(0)
        lines = f.read().split(b"\n")
        fixed = 0
        for n, raw in enumerate(lines):
            constants = []
            record = _parse(raw, constants.append)
            if record is not None and constants:
                lines[n] = json.dumps(record).encode()
                fixed += 1
        if fixed:
            cli.write_file(path, b"\n".join(lines))
    return fixed


def _parse(raw, constant=None):
    """The JSON object on a line, or None; NaN and infinities (old lines) read as None, each also passed to constant."""
    def undefined(name):
        if constant:
            constant(name)
        return None
    try:
        record = json.loads(raw, parse_constant=undefined)
    except ValueError:  # also UnicodeDecodeError: a line torn inside a character
        return None
    return record if isinstance(record, dict) else None


def _end_last_line(f, path):
    """Make the file end with a newline: a whole last line without one gets it; a torn one is dropped."""
    size = f.seek(0, os.SEEK_END)
    start = size
    while start > 0:  # find where the last line starts
        step = min(start, 1 << 16)
        f.seek(start - step)
        chunk = f.read(step)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            start = start - step + cut + 1
            break
        start -= step
    if start == size:
        return
    f.seek(start)
    tail = f.read()
    if _parse(tail) is not None:
        f.write(b"\n")
        return
    print(f"warning: {path}: dropped a torn last line (a writer was stopped mid-line): "
          f"{tail[:60].decode('utf-8', 'replace')!r}...", file=sys.stderr)
    f.truncate(start)


def main(argv=None):
    p = cli.Parser(description="Rewrite results files once as strict JSON: NaN (written before 2026-12-01) -> null.")
    p.add_argument("command", choices=["strict"])
    p.add_argument("files", nargs="+", help="results JSONL files")
    args = p.parse_args(argv)
    with cli.usage_errors():
        for path in args.files:
            print(f"{path}: {strict(path)} lines rewritten (NaN -> null)")


if __name__ == "__main__":
    main()
