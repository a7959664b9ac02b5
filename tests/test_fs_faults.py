"""File-system faults: a cache that fills up mid-extraction, a read-only
cache, a cache the user may not write, files deleted from a published entry.
Each ends in a typed error that says what to do, or in a correct recovery;
never in a broken entry or a leftover temp directory."""
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


def _archive(tmp_path: Path, mib: int) -> Path:
    src = tmp_path / f"src{mib}"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 1000)
    (src / "variables" / "variables.index").write_bytes(b"i" * 100)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(mib << 20))
    out = tmp_path / f"m{mib}.tar.gz"
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(src, arcname=".")
    return out


def _mount_tmpfs(where: Path, size: str, ro: bool = False) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def _only_locks_and_nothing_else(cache: Path) -> list:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith((".hubfast.lock",)))


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    _mount_tmpfs(mnt, "24m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_cache_fills_up_mid_extraction(tmp_path, tmpfs, monkeypatch):
    archive = _archive(tmp_path, 40)  # 40 MiB into a 24 MiB file system
    cache = tmpfs / "cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    with pytest.raises(hubfast.DiskFullError) as e:
        hubfast.resolve(str(archive))
    assert isinstance(e.value, OSError) and e.value.errno == 28
    assert "TFHUB_CACHE_DIR" in str(e.value) and str(archive) in str(e.value)
    assert _only_locks_and_nothing_else(cache) == []  # no entry, no temp dir, no lock left
    # Space freed (a smaller model): the same cache works.
    small = _archive(tmp_path, 4)
    assert os.path.isdir(hubfast.resolve(str(small)))


def test_read_only_cache_directory(tmp_path, monkeypatch):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "8m")
    try:
        (mnt / "cache").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        monkeypatch.setenv("TFHUB_CACHE_DIR", str(mnt / "cache"))
        with pytest.raises(hubfast.AccessDeniedError) as e:
            hubfast.resolve(str(_archive(tmp_path, 1)))
        assert isinstance(e.value, PermissionError)
        assert "HUBFAST_CACHE_LAYERS" in str(e.value)
        assert list((mnt / "cache").iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.fixture
def public_dir():
    """A directory an unprivileged uid can traverse (pytest's tmp dirs are 0700)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="hubfast-perm-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_cache_the_user_may_not_write(public_dir):
    """Root ignores permission bits: the case runs as an unprivileged uid. The
    interpreter lives under /root, so the child imports hubfast first and then
    drops its privileges."""
    archive = _archive(public_dir, 1)
    os.chmod(archive, 0o644)
    cache = public_dir / "rootcache"
    cache.mkdir(mode=0o755)
    code = f"""
import json, os
import hubfast, hubfast.http, hubfast.progress
os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    hubfast.resolve({str(archive)!r})
    print(json.dumps({{"ok": True}}))
except Exception as e:
    print(json.dumps({{"ok": False, "type": type(e).__name__, "msg": str(e),
                      "perm": isinstance(e, PermissionError)}}))
"""
    env = dict(os.environ, TFHUB_CACHE_DIR=str(cache), PYTHONPATH=PYTHONPATH)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ok"] is False and out["type"] == "AccessDeniedError" and out["perm"], out
    assert "not writable by this user" in out["msg"]
    assert list(cache.iterdir()) == []


def test_unreadable_archive_is_a_typed_error(public_dir, tmp_path):
    archive = _archive(public_dir, 1)
    os.chmod(archive, 0o600)  # root's: unreadable for the unprivileged child
    code = f"""
import json, os
import hubfast, hubfast.http, hubfast.progress
os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    hubfast.resolve({str(archive)!r})
except Exception as e:
    print(json.dumps({{"type": type(e).__name__, "msg": str(e)}}))
"""
    env = dict(os.environ, TFHUB_CACHE_DIR=str(public_dir / "c"), PYTHONPATH=PYTHONPATH)
    os.chmod(public_dir, 0o777)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["type"] == "AccessDeniedError" and str(archive) in out["msg"], out
    assert "TFHUB_CACHE_DIR" not in out["msg"]  # the archive failed, not the cache


def test_deleted_files_are_refetched_and_swapped_in(tmp_path, monkeypatch):
    archive = _archive(tmp_path, 2)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "c"))
    path = Path(hubfast.resolve(str(archive)))
    inode = path.stat().st_ino
    (path / "variables" / "variables.data-00000-of-00001").unlink()
    assert hubfast.resolve(str(archive)) == str(path)
    assert hubfast.last_stats()["repaired"] is True
    assert (path / "variables" / "variables.data-00000-of-00001").stat().st_size == 2 << 20
    assert path.stat().st_ino != inode  # a new tree was swapped in, not patched in place
    assert _core.lookup_entry(str(path.parent), path.name)[0] == "complete"
