"""Deep directory trees: the extractor refuses members deeper than its documented limit
(ArchiveLimitError), and the cache's walks (ls, verify, rm, prune, cleanup of a failed
extraction) are iterative and hold a bounded number of file descriptors, so any tree within
the limit works under a small `ulimit -n`, and a deeper tree found in a cache is a typed
error that leaves the entry as it was."""
from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import hubfast
from hubfast import _core

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])
LIMIT = 128  # the documented limit (docs/reliability.md; kMaxTreeDepth in cpp/include/hubfast/tree.h)


def _chain_archive(out: Path, depth: int) -> str:
    """A tar of a `depth`-deep directory chain d/d/.../d with a small file at the bottom
    ("d/" * (depth - 1) + "f": the file is component number `depth`)."""
    with tarfile.open(out, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for k in range(1, depth):
            info = tarfile.TarInfo("d/" * (k - 1) + "d")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        data = b"bottom\n"
        info = tarfile.TarInfo("d/" * (depth - 1) + "f")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return str(out)


def _low_nofile(n: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return set_limit


def _hf(cache: Path, *args: str, nofile: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, TFHUB_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "hubfast", *args], env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=_low_nofile(nofile) if nofile else None)


def _leftovers(cache: Path) -> list:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith((".lock", ".use")))


def test_a_2000_deep_archive_is_refused_and_leaves_nothing(tmp_path):
    archive = _chain_archive(tmp_path / "deep.tar.gz", 2000)
    assert os.path.getsize(archive) < 200_000
    cache = tmp_path / "cache"
    for _ in range(2):  # the second fetch is not hurt by the first (EMFILE, a left temp tree)
        p = _hf(cache, "fetch", archive, "--json", nofile=1024)
        assert p.returncode != 0
        assert "ArchiveLimitError" in p.stdout + p.stderr or "directories deep" in p.stderr, p.stderr
        assert "EMFILE" not in p.stderr and "Too many open files" not in p.stderr
        assert _leftovers(cache) == []
    with pytest.raises(hubfast.ArchiveLimitError, match="directories deep"):
        os.environ["TFHUB_CACHE_DIR"] = str(cache)
        try:
            hubfast.resolve(archive)
        finally:
            del os.environ["TFHUB_CACHE_DIR"]
    assert _leftovers(cache) == []


def test_a_tree_at_the_limit_is_listed_verified_and_removed_with_few_descriptors(tmp_path):
    archive = _chain_archive(tmp_path / "limit.tar.gz", LIMIT)
    cache = tmp_path / "cache"
    p = _hf(cache, "fetch", archive)
    assert p.returncode == 0, p.stderr
    name = Path(p.stdout.strip()).name
    # Fewer descriptors than the tree is deep: every walk must hold a bounded number.
    p = _hf(cache, "ls", "--json", nofile=64)
    assert p.returncode == 0, p.stderr
    (e,) = json.loads(p.stdout)["entries"]
    assert e["name"] == name and e["state"] == "complete" and e["bytes"] == len(b"bottom\n")
    p = _hf(cache, "verify", "--deep", "--json", nofile=64)
    assert p.returncode == 0, p.stderr
    assert [x["status"] for x in json.loads(p.stdout)["entries"]] == ["ok"]
    p = _hf(cache, "rm", name, nofile=64)
    assert p.returncode == 0, p.stderr
    assert _leftovers(cache) == []


def _plant_chain(parent: Path, name: str, depth: int) -> None:
    """A `depth`-deep chain made through directory fds (its full path is over PATH_MAX)."""
    os.mkdir(parent / name)
    fd = os.open(parent / name, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth - 1):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"planted\n")
    finally:
        os.close(fd)


def _chain_depth(top: Path) -> int:
    fd, depth = os.open(top, os.O_RDONLY | os.O_DIRECTORY), 1
    try:
        while "d" in os.listdir(fd):
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, depth = nxt, depth + 1
    finally:
        os.close(fd)
    return depth


def test_a_deeper_tree_found_in_a_cache_is_a_typed_error_and_stays(tmp_path):
    cache = tmp_path / "cache"
    p = _hf(cache, "fetch", _chain_archive(tmp_path / "small.tar.gz", 3))
    assert p.returncode == 0, p.stderr
    good = Path(p.stdout.strip()).name
    deep = "f" * 40  # an entry written by something else (no manifest: tensorflow_hub's rule)
    _plant_chain(cache, deep, 2000)
    try:
        _deeper_tree_stays(cache, good, deep)
    finally:  # pytest's own cleanup (shutil.rmtree) recurses: remove it here
        _core.remove_tree(str(cache / deep))


def _deeper_tree_stays(cache: Path, good: str, deep: str) -> None:
    inode = (cache / deep).stat().st_ino

    p = _hf(cache, "ls", "--json", nofile=256)
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    states = {e["name"]: (e["state"], e["reason"]) for e in json.loads(p.stdout)["entries"]}
    assert states[good][0] == "complete"
    assert states[deep][0] == "broken" and "directories deep" in states[deep][1]

    for args in (("rm", deep), ("prune", "--older-than", "0s")):
        p = _hf(cache, *args, nofile=256)
        assert "Traceback" not in p.stderr, p.stderr[-2000:]
        assert "directories deep" in p.stderr
        assert (cache / deep).stat().st_ino == inode and _chain_depth(cache / deep) == 2000
    assert not (cache / good).exists()  # prune carried on with the other entry
    assert not [n for n in os.listdir(cache) if n.endswith((".old", ".tmp"))]


def test_pack_refuses_a_tree_hubfast_would_not_extract(tmp_path):
    from hubfast.pack import PackError, pack

    src = tmp_path / "model"
    (src / ("d/" * (LIMIT - 1))).mkdir(parents=True)
    (src / ("d/" * (LIMIT - 1)) / "f").write_bytes(b"x")  # component number LIMIT: fine
    pack(str(src), str(tmp_path / "ok.tar.gz"))
    (src / ("d/" * LIMIT)).mkdir()  # a directory at depth LIMIT: still fine
    pack(str(src), str(tmp_path / "ok2.tar.gz"))
    (src / ("d/" * LIMIT) / "g").write_bytes(b"x")  # depth LIMIT + 1
    with pytest.raises(PackError, match="directories deep"):
        pack(str(src), str(tmp_path / "deep.tar.gz"))
