"""A local archive typed as a relative path names the archive it points to: the
same text in two directories is two entries, and `hubfast rm ./x.tar` removes the
one in the current directory only (real archives, the real CLI in subprocesses)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import hubfast

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])


def _tar(path: Path, payload: bytes) -> None:
    """An uncompressed archive whose length and mtime don't depend on the payload's bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("saved_model.pb")
        info.size, info.mtime = len(payload), 1_600_000_000
        t.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))


def _hf(cwd: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, TFHUB_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "hubfast", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_relative_local_handles_do_not_collide(tmp_path):
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    a.mkdir()
    b.mkdir()
    # Same name, size and mtime; different bytes: only the directory tells them apart.
    _tar(a / "x.tar", b"A" * 1000)
    _tar(b / "x.tar", b"B" * 1000)
    assert (a / "x.tar").stat().st_size == (b / "x.tar").stat().st_size

    paths = {}
    for d in (a, b):
        p = _hf(d, cache, "fetch", "./x.tar")
        assert p.returncode == 0, p.stderr
        paths[d] = p.stdout.strip().splitlines()[-1]
    assert paths[a] != paths[b]
    assert (Path(paths[a]) / "saved_model.pb").read_bytes() == b"A" * 1000
    assert (Path(paths[b]) / "saved_model.pb").read_bytes() == b"B" * 1000

    p = _hf(a, cache, "ls", "--json")
    assert p.returncode == 0, p.stderr
    handles = sorted(e["handle"] for e in json.loads(p.stdout)["entries"])
    assert handles == sorted([str(a / "x.tar"), str(b / "x.tar")])

    p = _hf(a, cache, "rm", "./x.tar")
    assert p.returncode == 0, p.stderr
    assert not Path(paths[a]).exists()
    assert (Path(paths[b]) / "saved_model.pb").read_bytes() == b"B" * 1000
