"""tools/get_mpnet.py on a fake release cut into parts (the real one is 405 MB): the folder appears whole, and a wrong,
missing or damaged part is one clear error that leaves nothing behind. Where the real parts are installed, they are
found through their packages."""
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from tools import get_mpnet as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def release(tmp_path):
    """(parts [(path, sha256)], model.safetensors' sha256): a zip of all-mpnet-base-v2/ cut into three parts."""
    weights = os.urandom(300_000)  # random, so the zip cannot compress it away and every part holds some of it
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{G.NAME}/", "")
        for name in G.NEEDED:
            zf.writestr(f"{G.NAME}/{name}", weights if name == "model.safetensors" else "{}")
        zf.writestr(f"{G.NAME}/1_Pooling/config.json", "{}")
    raw = archive.read_bytes()
    cut = [0, len(raw) // 3, 2 * len(raw) // 3, len(raw)]
    parts = []
    for i in range(3):
        path = tmp_path / f"{G.NAME}.zip.{i + 1:03d}"
        path.write_bytes(raw[cut[i]:cut[i + 1]])
        parts.append((str(path), hashlib.sha256(raw[cut[i]:cut[i + 1]]).hexdigest()))
    return parts, hashlib.sha256(weights).hexdigest()


def test_parts_become_the_folder(release, tmp_path):
    parts, sha = release
    parent = tmp_path / "models"
    folder = G.assemble(parts, str(parent), sha)
    assert folder == str(parent / G.NAME)
    assert sorted(os.listdir(folder)) == sorted([*G.NEEDED, "1_Pooling"])
    assert os.listdir(parent) == [G.NAME]  # no temporary folder left
    G.check_folder(folder, sha)


@pytest.mark.parametrize("fault, message", [
    ("order", "not a zip file|cannot be extracted|sha256"),
    ("missing", "a part is missing"),
    ("damaged", "part 2 is damaged"),
    ("release", "model.safetensors: sha256 .* expected"),
])
def test_a_wrong_part_is_one_error_and_leaves_nothing(release, tmp_path, fault, message):
    parts, sha = release
    if fault == "order":
        parts = [parts[1], parts[0], parts[2]]
    elif fault == "missing":
        parts = [parts[0], parts[2]]
    elif fault == "damaged":
        path = parts[1][0]
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"\0" * 16)
    elif fault == "release":
        sha = "0" * 64
    parent = tmp_path / "models"
    with pytest.raises(G.WeightsError, match=message):
        G.assemble(parts, str(parent), sha)
    assert os.listdir(parent) == []  # neither the folder nor a temporary one


def test_a_folder_in_the_way_is_refused_before_any_install(tmp_path):
    (tmp_path / G.NAME).mkdir()
    (tmp_path / G.NAME / "config.json").write_text("{}")
    res = subprocess.run([sys.executable, "-m", "tools.get_mpnet", "--to", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "is in the way: remove it, or choose another --to" in res.stderr


def test_the_installed_parts_are_found_in_order():
    try:
        parts = G.locate_parts()
    except G.WeightsError as e:
        pytest.skip(f"the parts are not installed ({e}); python -m tools.get_mpnet installs them")
    assert [os.path.basename(p) for p, _ in parts] == [f"{G.NAME}.zip.{i:03d}" for i in range(1, 6)]
    assert sum(os.path.getsize(p) for p, _ in parts) == 404_421_332
    assert all(len(sha) == 64 for _, sha in parts)
