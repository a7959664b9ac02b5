"""A manifest that was cut short or garbled marks its entry broken: resolve() repairs the
entry (refetch, atomic swap), and `hubfast ls`, `verify`, `verify --repair` and `prune`
report it and carry on with the other entries. Never an untyped ValueError."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import hubfast
from hubfast import _core

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])


def _archive(tmp_path: Path, tag: str) -> str:
    src = tmp_path / f"src-{tag}"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(tag.encode() * 100)
    (src / "variables" / "variables.index").write_bytes(b"i" * 10)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(50_000))
    out = tmp_path / f"{tag}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=".")
    return str(out)


def _hf(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, TFHUB_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "hubfast", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def _cut(text: bytes) -> bytes:
    return text[: len(text) // 2]


def _cut_at_line(text: bytes) -> bytes:
    return b"".join(text.splitlines(keepends=True)[:-1])


def _garble_size(text: bytes) -> bytes:  # std::stoul's ValueError before
    return text.replace(b"\nf ", b"\nf zz ", 1)


def _garble_crc(text: bytes) -> bytes:
    lines = text.splitlines(keepends=True)
    i = next(k for k, line in enumerate(lines) if line.startswith(b"f "))
    parts = lines[i].split(b" ", 3)
    lines[i] = b" ".join([parts[0], parts[1], b"nothex!!", parts[3]])
    return b"".join(lines)


def _bad_escape(text: bytes) -> bytes:
    return text.replace(b"saved_model.pb", b"saved_model%zz.pb", 1)


DAMAGE = {"empty": lambda t: b"", "cut": _cut, "cut_at_line": _cut_at_line,
          "garbled_size": _garble_size, "garbled_crc": _garble_crc, "bad_escape": _bad_escape,
          "binary": lambda t: os.urandom(300)}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_manifest_is_repaired_by_resolve(tmp_path, monkeypatch, damage):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    archive = _archive(tmp_path, "a")
    path = Path(hubfast.resolve(archive))
    manifest = Path(_core.manifest_path(str(cache), path.name))
    good = manifest.read_bytes()
    manifest.write_bytes(DAMAGE[damage](good))
    state, _, reason = _core.lookup_entry(str(cache), path.name)
    assert state == "broken" and "manifest" in reason
    inode = path.stat().st_ino
    assert hubfast.resolve(archive) == str(path)
    assert hubfast.last_stats()["repaired"] is True
    assert path.stat().st_ino != inode  # swapped in, not patched
    assert _core.lookup_entry(str(cache), path.name)[0] == "complete"
    assert not [p for p in cache.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_cli_reports_a_damaged_manifest_and_carries_on(tmp_path):
    cache = tmp_path / "cache"
    good, bad = _archive(tmp_path, "good"), _archive(tmp_path, "bad")
    names = []
    for a in (good, bad):
        p = _hf(cache, "fetch", a)
        assert p.returncode == 0, p.stderr
        names.append(Path(p.stdout.strip()).name)
    good_name, bad_name = names
    manifest = Path(_core.manifest_path(str(cache), bad_name))
    manifest.write_bytes(_garble_size(manifest.read_bytes()))

    p = _hf(cache, "ls", "--json")
    assert "Traceback" not in p.stderr, p.stderr
    doc = json.loads(p.stdout)
    states = {e["name"]: e["state"] for e in doc["entries"]}
    assert states == {bad_name: "broken", good_name: "complete"}

    p = _hf(cache, "verify", "--json")
    assert "Traceback" not in p.stderr and p.returncode != 0, p.stderr
    status = {e["name"]: e["status"] for e in json.loads(p.stdout)["entries"]}
    assert status == {bad_name: "problems", good_name: "ok"}

    p = _hf(cache, "verify", "--repair", "--json")
    assert p.returncode == 0, p.stderr
    status = {e["name"]: e["status"] for e in json.loads(p.stdout)["entries"]}
    assert status == {bad_name: "repaired", good_name: "ok"}
    assert _core.lookup_entry(str(cache), bad_name)[0] == "complete"

    manifest.write_bytes(b"hubfast-manifest 2\ni 1")  # cut mid-line
    p = _hf(cache, "prune", "--max-size", "0", "--json")
    assert "Traceback" not in p.stderr, p.stderr
    assert not (cache / bad_name).exists() and not (cache / good_name).exists()
