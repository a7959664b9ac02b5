"""The `hubfast` command end to end: real caches, a real loopback server, the command run
as a subprocess (`python -m hubfast`), its output, exit codes and --json documents;
rm/prune racing fetches and readers; `pack` read back by zstd/tar and hubfast; the
progress bar on a pseudo-terminal."""
from __future__ import annotations

import fcntl
import gzip
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import hubfast
from hubfast import _core
from hubfast.cache import entry_name
from hubfast.pack import SEEK_TABLE_MAGIC, SEEKABLE_MAGIC, read_seek_table
from hubfast.testing.models import tree_digest
from hubfast.server import TFHubServer
from hubfast.testing.faults import Fault

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])
MODEL = "/test/model/1"
ZMODEL = "/test/zmodel/1"
MISSING = "/test/missing/1"


# --------------------------------------------------------------------------- helpers


def _env(cache: Optional[Path] = None, **extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHONPATH + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("TFHUB_DOWNLOAD_PROGRESS", "HUBFAST_CACHE_LAYERS", "HUBFAST_OFFLINE",
              "HUBFAST_MIRRORS"):
        env.pop(k, None)
    if cache is not None:
        env["TFHUB_CACHE_DIR"] = str(cache)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def hf(*args: str, cache: Optional[Path] = None, timeout: float = 60,
       **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubfast", *args], env=_env(cache, **env),
                          capture_output=True, text=True, timeout=timeout)


def hf_json(*args: str, cache: Optional[Path] = None, expect: int = 0, **env: str) -> dict:
    p = hf(*args, "--json", cache=cache, **env)
    assert p.returncode == expect, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stdout  # one JSON document
    doc = json.loads(lines[0])
    assert doc["exit_code"] == expect
    return doc


def _write_model(d: Path, data_bytes: int = 3 << 20, seed: bytes = b"") -> Path:
    (d / "variables").mkdir(parents=True)
    (d / "assets").mkdir()
    (d / "saved_model.pb").write_bytes(b"saved model proto " * 300 + seed)
    (d / "variables" / "variables.index").write_bytes(b"index" * 50 + seed)
    half = data_bytes // 2
    (d / "variables" / "variables.data-00000-of-00001").write_bytes(
        os.urandom(half) + bytes(data_bytes - half))
    (d / "assets" / "vocab.txt").write_text("the\nquick\nfox\n")
    return d


def _tree(path: Path) -> dict:
    return tree_digest(path)


def _files(cache: Path) -> List[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _leftovers(cache: Path) -> List[str]:
    return [n for n in _files(cache) if n.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _write_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def archives(model_dir, tmp_path_factory) -> Dict[str, Path]:
    from hubfast.pack import pack

    d = tmp_path_factory.mktemp("archives")
    gz = d / "m.tar.gz"
    pack(model_dir, gz, gzip_tool="python")
    zst = d / "m.tar.zst"
    pack(model_dir, zst, frame_size=1 << 20)
    return {"gz": gz, "zst": zst}


@pytest.fixture(scope="module")
def server(archives):
    with TFHubServer() as s:
        s.add_archive(MODEL, str(archives["gz"]))
        s.add_archive(ZMODEL, str(archives["zst"]))
        yield s


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def _gets(server: TFHubServer, path: str) -> int:
    return server.stats.path(path).archive_gets


# --------------------------------------------------------------------------- usage


def test_help_on_every_verb_and_usage_errors(tmp_path):
    p = hf("--help")
    assert p.returncode == 0 and "fetch" in p.stdout and "prune" in p.stdout
    assert "Exit codes" in p.stdout
    for verb in ("fetch", "ls", "verify", "rm", "prune", "pack", "serve", "torrent"):
        p = hf(verb, "--help")
        assert p.returncode == 0, (verb, p.stderr)
        assert f"usage: hubfast {verb}" in p.stdout
        if verb not in ("pack", "serve", "torrent"):
            assert "--cache-dir" in p.stdout and "--json" in p.stdout
    assert hf().returncode == 2  # no verb
    assert hf("frobnicate").returncode == 2
    assert hf("fetch").returncode == 2  # no handle
    p = hf("prune", "--cache-dir", str(tmp_path))
    assert p.returncode == 2 and "--older-than" in p.stderr
    p = hf("prune", "--older-than", "soon", "--cache-dir", str(tmp_path))
    assert p.returncode == 2 and "duration" in p.stderr
    p = hf("prune", "--max-size", "lots", "--cache-dir", str(tmp_path))
    assert p.returncode == 2 and "size" in p.stderr
    p = hf("pack", str(tmp_path), "-o", str(tmp_path / "x.zip"))
    assert p.returncode == 2 and "format" in p.stderr
    p = hf("--version")
    assert p.returncode == 0 and hubfast.__version__ in p.stdout


# --------------------------------------------------------------------------- fetch


def test_fetch_prints_paths_and_reports_stats(server, cache, model_dir):
    url, zurl = server.url_for(MODEL), server.url_for(ZMODEL)
    p = hf("fetch", url, zurl, cache=cache)
    assert p.returncode == 0, p.stderr
    paths = p.stdout.splitlines()
    assert paths == [str(cache / entry_name(url)), str(cache / entry_name(zurl))]
    for path in paths:
        assert _tree(Path(path)) == _tree(model_dir)
    assert p.stderr == ""  # no terminal, no TFHUB_DOWNLOAD_PROGRESS: silent

    # --json with --cache-dir (overrides TFHUB_CACHE_DIR): where the time went.
    other = cache.parent / "other"
    doc = hf_json("fetch", zurl, "--cache-dir", str(other), cache=cache)
    assert doc["command"] == "fetch" and doc["cache_dir"] == str(other)
    (res,) = doc["results"]
    assert res["ok"] and res["handle"] == zurl and res["entry"] == entry_name(zurl)
    assert res["path"] == str(other / entry_name(zurl)) and res["cached"] is False
    st = res["stats"]
    for key in ("lock_wait", "publish_seconds", "repaired", "compression", "bytes_in",
                "bytes_out", "files", "units", "seconds", "read_busy", "decode_busy",
                "write_busy", "source"):
        assert key in st, key
    assert st["compression"] == "zstd" and st["units"] > 1  # frames decoded in parallel
    assert st["files"] == 4 and st["bytes_out"] > 3 << 20
    assert st["bytes_in"] == server.digests(ZMODEL).size
    assert isinstance(st["source"], dict)
    # Warm: cached, no new request.
    before = _gets(server, ZMODEL)
    doc = hf_json("fetch", zurl, "--cache-dir", str(other))
    assert doc["results"][0]["cached"] is True and _gets(server, ZMODEL) == before


def test_fetch_exit_codes_and_errors(server, cache, tmp_path):
    missing = server.url_for(MISSING)
    p = hf("fetch", missing, cache=cache)
    assert p.returncode == 3, p.stderr
    assert missing in p.stderr and "NotFound" in p.stderr and p.stdout == ""
    # One good, one missing: the good one is fetched and printed, the exit code says 3.
    p = hf("fetch", server.url_for(MODEL), missing, cache=cache)
    assert p.returncode == 3 and p.stdout.strip() == str(cache / entry_name(server.url_for(MODEL)))
    doc = hf_json("fetch", missing, server.url_for(MODEL), cache=cache, expect=3)
    bad, good = doc["results"]
    assert bad == {"handle": missing, "ok": False, "error": bad["error"],
                   "message": bad["message"], "exit_code": 3}
    assert "NotFound" in bad["error"] and good["ok"] and good["cached"]
    # A network failure: exit 1, the message names the handle and what to do.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/org/model/1"
    p = hf("fetch", dead, cache=cache, HUBFAST_MAX_RETRIES="0")
    assert p.returncode == 1 and dead in p.stderr and "retry" in p.stderr
    # Offline and not cached: not found (3); a missing local archive: 3.
    p = hf("fetch", server.url_for(ZMODEL), cache=tmp_path / "empty", HUBFAST_OFFLINE="1")
    assert p.returncode == 3 and "HUBFAST_OFFLINE" in p.stderr
    p = hf("fetch", str(tmp_path / "nope.tar.gz"), cache=cache)
    assert p.returncode == 3 and "nope.tar.gz" in p.stderr


# --------------------------------------------------------------------------- ls


def _foreign_entry(cache: Path, handle: str) -> str:
    """An entry as tensorflow_hub writes it: directory + descriptor, no manifest."""
    name = entry_name(handle)
    (cache / name / "variables").mkdir(parents=True)
    (cache / name / "saved_model.pb").write_bytes(b"x" * 1234)
    (cache / f"{name}.descriptor.txt").write_text(
        f"Module: {handle}\nDownload Time: 2024-01-01 00:00:00\n"
        f"Downloader Hostname: elsewhere (PID:1)\n")
    return name


def test_ls_shows_every_state(server, cache, tmp_path):
    url = server.url_for(MODEL)
    hf("fetch", url, server.url_for(ZMODEL), cache=cache).check_returncode()
    broken = entry_name(server.url_for(ZMODEL))
    (cache / broken / "assets" / "vocab.txt").unlink()
    foreign = _foreign_entry(cache, "https://tfhub.dev/google/foreign/1")
    # In progress, hubfast: a temp dir whose writer holds the entry's lock.
    busy = entry_name("https://example.com/busy/1")
    (cache / f"{busy}.hfabc123.tmp" / "variables").mkdir(parents=True)
    (cache / f"{busy}.hfabc123.tmp" / "saved_model.pb").write_bytes(b"y" * 100)
    writer = _core.FileLock.acquire(_core.lock_path(str(cache), busy), True, 5.0)
    # In progress, tensorflow_hub: a live lock (this process) in its format.
    tf_busy = entry_name("https://example.com/tfhub-busy/1")
    (cache / f"{tf_busy}.lock").write_text(f"{socket.gethostname()}.{os.getpid()}.abcdef0123")
    (cache / f"{tf_busy}.abcdef0123.tmp").mkdir()
    # Abandoned: a dead hubfast writer's temp dir (nobody holds the lock) and a dead
    # tensorflow_hub lock (a pid that does not exist).
    dead = entry_name("https://example.com/dead/1")
    (cache / f"{dead}.hfdead00.tmp").mkdir()
    (cache / f"{dead}.hfdead00.tmp" / "partial").write_bytes(b"z" * 10)
    tf_dead = entry_name("https://example.com/tfhub-dead/1")
    (cache / f"{tf_dead}.lock").write_text(f"{socket.gethostname()}.{2**22 + 12345}.abc")
    # Lock files alone are no entry.
    (cache / f"{'0' * 40}.hubfast.lock").touch()
    try:
        doc = hf_json("ls", cache=cache)
    finally:
        writer.release()
    by_name = {e["name"]: e for e in doc["entries"]}
    assert set(by_name) == {entry_name(url), broken, foreign, busy, tf_busy, dead, tf_dead}
    assert doc["cache_dir"] == str(cache) and doc["roots"] == [str(cache)]
    good = by_name[entry_name(url)]
    assert good["state"] == "complete" and good["handle"] == url and good["writer"] is None
    assert good["bytes"] == sum(s for s, _ in _tree(cache / entry_name(url)).values())
    assert 0 <= good["age_seconds"] < 120 and good["download_time"]
    assert by_name[broken]["state"] == "broken" and "vocab.txt" in by_name[broken]["reason"]
    assert by_name[foreign]["state"] == "foreign"
    assert by_name[foreign]["handle"] == "https://tfhub.dev/google/foreign/1"
    assert by_name[busy]["state"] == "in_progress" and by_name[busy]["writer"] == "hubfast"
    assert by_name[busy]["bytes"] == 100
    assert by_name[tf_busy]["state"] == "in_progress"
    assert by_name[tf_busy]["writer"] == "tensorflow_hub"
    assert by_name[dead]["state"] == "abandoned" and by_name[dead]["leftovers"]
    assert by_name[tf_dead]["state"] == "abandoned"
    assert doc["total_bytes"] == sum(e["bytes"] for e in doc["entries"])
    for e in doc["entries"]:
        assert set(e) >= {"name", "root", "path", "handle", "state", "reason", "bytes",
                          "last_used", "age_seconds", "writer", "download_time", "read_only"}

    # The text table: one line per entry plus header and total.
    p = hf("ls", cache=cache)
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["STATE", "SIZE", "AGE", "ENTRY", "HANDLE"]
    assert len(lines) == 1 + 7 + 1 and "7 entries" in lines[-1]
    assert any(ln.startswith("complete") and url in ln for ln in lines)
    assert any(ln.startswith("abandoned") for ln in lines)
    # The writer's lock is free now: the busy entry became abandoned.
    assert {e["name"]: e["state"] for e in hf_json("ls", cache=cache)["entries"]}[busy] \
        == "abandoned"
    # Read-only layers only with --layers.
    layer = tmp_path / "layer"
    hf("fetch", url, cache=layer).check_returncode()
    doc = hf_json("ls", "--layers", cache=cache, HUBFAST_CACHE_LAYERS=str(layer))
    ro = [e for e in doc["entries"] if e["read_only"]]
    assert [e["root"] for e in ro] == [str(layer)] and doc["roots"][0] == str(layer)
    assert hf("ls", cache=tmp_path / "nothing").returncode == 0


# --------------------------------------------------------------------------- verify


def _flip_byte(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_verify_sizes_deep_and_repair(server, cache, model_dir, archives):
    url, zurl = server.url_for(MODEL), server.url_for(ZMODEL)
    hf("fetch", url, zurl, cache=cache).check_returncode()
    foreign = _foreign_entry(cache, "https://tfhub.dev/google/foreign/1")
    doc = hf_json("verify", "--deep", cache=cache)
    status = {e["name"]: e["status"] for e in doc["entries"]}
    assert status == {entry_name(url): "ok", entry_name(zurl): "ok", foreign: "unverifiable"}
    assert doc["deep"] is True and doc["repair"] is False

    # Content changed, size kept: only --deep sees it.
    data = cache / entry_name(zurl) / "variables" / "variables.data-00000-of-00001"
    _flip_byte(data)
    assert hf("verify", cache=cache).returncode == 0
    p = hf("verify", "--deep", zurl, cache=cache)
    assert p.returncode == 1 and zurl in p.stderr and "CRC32" in p.stderr
    assert "--repair" in p.stderr  # says what to do
    doc = hf_json("verify", "--deep", cache=cache, expect=1)
    (bad,) = [e for e in doc["entries"] if e["status"] == "problems"]
    assert bad["handle"] == zurl and "CRC32" in bad["problems"][0]
    gets = _gets(server, ZMODEL)
    doc = hf_json("verify", "--deep", "--repair", zurl, cache=cache)
    (rep,) = doc["entries"]
    assert rep["status"] == "repaired" and rep["repair"]["problems_after"] == []
    assert _gets(server, ZMODEL) == gets + 1
    assert _tree(cache / entry_name(zurl)) == _tree(model_dir)

    # A file went missing: the entry is broken; repair swaps a fresh tree in.
    (cache / entry_name(url) / "variables" / "variables.index").unlink()
    p = hf("verify", cache=cache)
    assert p.returncode == 1 and "variables.index" in p.stderr and url in p.stderr
    gets = _gets(server, MODEL)
    p = hf("verify", "--repair", cache=cache)
    assert p.returncode == 0, p.stderr
    assert "repaired" in p.stdout and _gets(server, MODEL) == gets + 1
    assert _tree(cache / entry_name(url)) == _tree(model_dir)
    assert hf("verify", "--deep", cache=cache).returncode == 0
    assert _leftovers(cache) == []

    # Unknown handle: 3. A repair that cannot fetch fails; the entry stays (broken, not gone).
    assert hf("verify", server.url_for(MISSING), cache=cache).returncode == 3
    server.remove(MODEL)
    try:
        (cache / entry_name(url) / "saved_model.pb").unlink()
        p = hf("verify", "--repair", url, cache=cache, HUBFAST_MAX_RETRIES="0")
        assert p.returncode == 3 and "repair failed" in p.stderr  # the handle is gone: 404
        assert _core.lookup_entry(str(cache), entry_name(url))[0] == "broken"
    finally:
        server.add_archive(MODEL, str(archives["gz"]))


def test_verify_repair_skips_entry_in_use(server, cache):
    zurl = server.url_for(ZMODEL)
    hf("fetch", zurl, cache=cache).check_returncode()
    _flip_byte(cache / entry_name(zurl) / "saved_model.pb", 10)
    holder = _hold(zurl, cache, seconds=30)
    try:
        p = hf("verify", "--deep", "--repair", zurl, cache=cache)
        assert p.returncode == 4, p.stderr
        assert "in use" in p.stderr and zurl in p.stderr
        assert _core.lookup_entry(str(cache), entry_name(zurl))[0] == "complete"
    finally:
        _release(holder)
    assert hf("verify", "--deep", "--repair", zurl, cache=cache).returncode == 0
    assert hf("verify", "--deep", zurl, cache=cache).returncode == 0


# --------------------------------------------------------------------------- rm


HOLD_SCRIPT = r"""
import json, os, signal, sys, time
import hubfast
from hubfast import resolvers
entry = resolvers.resolve_entry(sys.argv[1])
with entry.in_use() as path:
    print(json.dumps({"path": path}), flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def _hold(handle: str, cache: Path, seconds: float = 30) -> subprocess.Popen:
    """A process that resolves `handle` and holds its use-lock (as load() does) until
    its stdin is closed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, handle], env=_env(cache),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([p.stdout], [], [], seconds)
    assert ready, "the holder did not start"
    line = p.stdout.readline()
    assert json.loads(line)["path"]
    return p


def _release(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(timeout=30)


def test_rm_by_handle_entry_name_and_path(server, cache, model_dir, tmp_path, archives):
    url, zurl = server.url_for(MODEL), server.url_for(ZMODEL)
    local = tmp_path / "local.tar.zst"
    shutil.copy(archives["zst"], local)
    hf("fetch", url, zurl, str(local), cache=cache).check_returncode()
    names = {e["handle"]: e["name"] for e in hf_json("ls", cache=cache)["entries"]}
    assert len(names) == 3

    p = hf("rm", url, cache=cache)
    assert p.returncode == 0, p.stderr
    assert "removed" in p.stdout and url in p.stdout
    name = entry_name(url)
    files = _files(cache)
    assert name not in files and f"{name}.hubfast" not in files
    assert f"{name}.descriptor.txt" not in files
    assert f"{name}.hubfast.lock" in files  # lock files are never deleted
    assert _leftovers(cache) == []
    # By entry name (JSON), and a local archive by its handle (its entry name covers the
    # archive's size and mtime, so the handle is looked up in descriptors/resolvers).
    doc = hf_json("rm", names[zurl], cache=cache)
    assert [r["name"] for r in doc["removed"]] == [names[zurl]]
    assert doc["removed"][0]["bytes"] > 3 << 20 and doc["removed"][0]["handle"] == zurl
    assert doc["skipped"] == [] and doc["failed"] == [] and doc["not_found"] == []
    doc = hf_json("rm", str(cache / names[str(local)]), cache=cache)
    assert [r["handle"] for r in doc["removed"]] == [str(local)]
    assert [e for e in hf_json("ls", cache=cache)["entries"]] == []
    # Not found: 3, named on stderr; a removed entry is simply fetched again.
    p = hf("rm", url, cache=cache)
    assert p.returncode == 3 and url in p.stderr
    doc = hf_json("rm", "nothing-like-this", cache=cache, expect=3)
    assert doc["not_found"] == ["nothing-like-this"]
    assert hf("fetch", url, cache=cache).returncode == 0
    assert _tree(cache / name) == _tree(model_dir)


def test_rm_and_prune_skip_an_entry_in_use(server, cache, model_dir):
    url = server.url_for(MODEL)
    hf("fetch", url, cache=cache).check_returncode()
    holder = _hold(url, cache)
    try:
        p = hf("rm", url, cache=cache)
        assert p.returncode == 4, p.stderr
        assert url in p.stderr and "in use" in p.stderr and "later" in p.stderr
        doc = hf_json("rm", url, cache=cache, expect=4)
        assert [r["name"] for r in doc["skipped"]] == [entry_name(url)]
        assert "in use" in doc["skipped"][0]["reason"]
        doc = hf_json("prune", "--max-size", "0", cache=cache, expect=4)
        assert [r["name"] for r in doc["skipped"]] == [entry_name(url)] and not doc["removed"]
        assert _tree(cache / entry_name(url)) == _tree(model_dir)
        assert _core.lookup_entry(str(cache), entry_name(url))[0] == "complete"
    finally:
        _release(holder)
    doc = hf_json("rm", url, cache=cache)
    assert [r["name"] for r in doc["removed"]] == [entry_name(url)]


def test_rm_skips_an_entry_being_written(server, model_dir, tmp_path):
    cache = tmp_path / "cache"
    # The server holds the body mid-transfer until the checks below are done: the entry is
    # being written for as long as they take, however busy the machine.
    release, reached = threading.Event(), threading.Event()
    server.inject(MODEL, Fault.hold(64 << 10, release, reached))
    url = server.url_for(MODEL)
    fetch = subprocess.Popen([sys.executable, "-m", "hubfast", "fetch", url],
                             env=_env(cache, HUBFAST_CONNECTIONS="1", HUBFAST_STALL_TIMEOUT="600"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (reached.is_set() and [n for n in _files(cache) if n.endswith(".tmp")]):
            assert time.time() < deadline and fetch.poll() is None, "no download started"
            time.sleep(0.02)
        doc = hf_json("ls", cache=cache)
        assert [e["state"] for e in doc["entries"]] == ["in_progress"]
        assert doc["entries"][0]["writer"] == "hubfast"
        doc = hf_json("prune", "--max-size", "0", cache=cache)
        assert doc["removed"] == []  # an entry in progress is left alone
        p = hf("rm", url, "--lock-wait", "0.2", cache=cache)
        assert p.returncode == 4, p.stderr  # being written: skipped
        assert "being written" in p.stderr and url in p.stderr
        assert fetch.poll() is None, "the download ended while held"
    finally:
        release.set()
        server.clear_faults(MODEL)
    out, err = fetch.communicate(timeout=120)
    assert fetch.returncode == 0, err
    assert out.strip() == str(cache / entry_name(url))
    assert _tree(cache / entry_name(url)) == _tree(model_dir)
    assert _leftovers(cache) == []


# --------------------------------------------------------------------------- prune


def _age(cache: Path, name: str, seconds: float) -> None:
    t = time.time() - seconds
    for p in (cache / name, cache / f"{name}.descriptor.txt", cache / f"{name}.hubfast.use"):
        if os.path.lexists(p):
            os.utime(p, (t, t), follow_symlinks=False)


def test_prune_older_than_and_max_size(server, cache, tmp_path):
    handles = []
    for i in range(4):
        arch = tmp_path / f"m{i}.tar.gz"
        d = _write_model(tmp_path / f"src{i}", data_bytes=(i + 1) << 20, seed=bytes([i]))
        from hubfast.pack import pack

        pack(d, arch, gzip_tool="python")
        handles.append(str(arch))
    hf("fetch", *handles, cache=cache).check_returncode()
    names = {e["handle"]: e["name"] for e in hf_json("ls", cache=cache)["entries"]}
    days = {handles[0]: 30, handles[1]: 10, handles[2]: 3, handles[3]: 0}
    for h, d in days.items():
        _age(cache, names[h], d * 86400 + 60)
    dead = "f" * 40
    (cache / f"{dead}.hfdead.tmp").mkdir()  # a dead writer's leftover

    # Dry run: reports, removes nothing.
    doc = hf_json("prune", "--older-than", "7d", "--dry-run", cache=cache)
    assert doc["dry_run"] and {r["handle"] for r in doc["removed"]} >= {handles[0], handles[1]}
    assert len(hf_json("ls", cache=cache)["entries"]) == 5

    doc = hf_json("prune", "--older-than", "7d", cache=cache)
    assert doc["older_than_seconds"] == 7 * 86400
    removed = {r["handle"] for r in doc["removed"]}
    assert removed == {handles[0], handles[1], None}  # None: the leftover (no descriptor)
    assert doc["freed_bytes"] == sum(r["bytes"] for r in doc["removed"])
    left = {e["handle"] for e in hf_json("ls", cache=cache)["entries"]}
    assert left == {handles[2], handles[3]}

    # --max-size: least recently used first, until the entries fit.
    sizes = {e["handle"]: e["bytes"] for e in hf_json("ls", cache=cache)["entries"]}
    limit = sizes[handles[3]] + 1000
    p = hf("prune", "--max-size", str(limit), cache=cache)
    assert p.returncode == 0 and handles[2] in p.stdout and "freed" in p.stdout
    assert {e["handle"] for e in hf_json("ls", cache=cache)["entries"]} == {handles[3]}
    doc = hf_json("prune", "--max-size", "1G", cache=cache)
    assert doc["removed"] == [] and doc["max_size_bytes"] == 1 << 30
    assert _leftovers(cache) == []


# --------------------------------------------------------------------------- races


CLIENT_SCRIPT = r"""
import json, os, random, sys, time
import hubfast
from hubfast import _core, resolvers
from hubfast.testing.models import tree_digest
handle, expected, progress, stop = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
out = {"loads": 0, "raced": 0, "downloads": 0, "bad": []}
while not os.path.exists(stop):  # the test stops us once it saw enough, however slow the machine
    with open(progress + ".new", "w") as f:
        json.dump(out, f)
    os.replace(progress + ".new", progress)
    time.sleep(random.uniform(0.05, 0.3))  # not holding it: maintenance may remove it now
    entry = resolvers.resolve_entry(handle)
    out["downloads"] += not hubfast.last_stats().get("cached", True)
    with entry.in_use() as path:
        # The use-lock is held: maintenance cannot remove the entry now. (It may have
        # been removed between resolve and the lock: then resolve again.)
        if _core.lookup_entry(entry.root, entry.name)[0] != "complete":
            out["raced"] += 1
            continue
        got = {k: list(v) for k, v in tree_digest(path).items()}
        time.sleep(0.05)  # TensorFlow reading
        again = {k: list(v) for k, v in tree_digest(path).items()}
        if got != expected or again != expected:
            out["bad"].append(path)
        out["loads"] += 1
print(json.dumps(out), flush=True)
"""


def test_rm_and_prune_racing_fetch_and_load_never_break_an_entry(server, tmp_path, model_dir):
    cache = tmp_path / "cache"
    url = server.url_for(MODEL)
    name = entry_name(url)
    expected = json.dumps({k: list(v) for k, v in tree_digest(model_dir).items()})
    stop_file = tmp_path / "stop"
    progress = [tmp_path / f"progress{i}.json" for i in range(3)]
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, url, expected, str(progress[i]),
                                 str(stop_file)],
                                env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for i in range(3)]

    def client_totals() -> Dict[str, int]:
        docs = [json.loads(p.read_text()) for p in progress if p.exists()]
        return {k: sum(d[k] for d in docs) for k in ("loads", "downloads")}
    bad_states: List[str] = []
    stop = threading.Event()

    lookup_races: List[str] = []

    def ino(path: Path) -> int:
        try:
            return os.stat(path).st_ino
        except FileNotFoundError:
            return -1

    def watch() -> None:  # the entry is complete or absent at every instant
        while not stop.is_set():
            before = ino(cache / name)
            state, _, reason = _core.lookup_entry(str(cache), name)
            after = ino(cache / name)
            if state not in ("complete", "missing"):
                # lookup_entry stats the path, then opens it again: a removal renaming
                # the tree away in between makes it report "broken" for a tree that is
                # no longer the entry. Only a tree that stayed at the entry's path counts.
                if before == after != -1:
                    bad_states.append(f"{state}: {reason}")
                else:
                    lookup_races.append(f"{state}: {reason}")
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    codes: Dict[int, int] = {}
    # Race for at least 6 s, and on until the interleavings checked below have all happened
    # (a busy machine runs fewer rounds in 6 s); a generous bound ends a run where they never do.
    start = time.time()
    try:
        while time.time() < start + 180:
            for args in (("rm", url, "--lock-wait", "0.5"), ("prune", "--max-size", "0")):
                p = hf(*args, cache=cache)
                codes[p.returncode] = codes.get(p.returncode, 0) + 1
                assert p.returncode in (0, 3, 4), (args, p.stdout, p.stderr)
            seen = client_totals()
            if (time.time() >= start + 6 and codes.get(0, 0) > 0 and codes.get(4, 0) > 0
                    and seen["loads"] > 10 and seen["downloads"] >= 2):
                break
    finally:
        stop_file.touch()
        results = []
        for c in clients:
            out, err = c.communicate(timeout=60)
            assert c.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        stop.set()
        watcher.join()
    assert bad_states == []
    assert all(r["bad"] == [] for r in results), results
    assert sum(r["loads"] for r in results) > 10, results  # the readers kept working
    assert sum(r["downloads"] for r in results) >= 2, results  # fetched again after removals
    assert codes.get(0, 0) > 0, codes  # removals happened...
    assert codes.get(4, 0) > 0, codes  # ...and some were skipped because of a reader
    # Afterwards: nothing half-done left behind; the cache works.
    hf("prune", "--max-size", "0", cache=cache).check_returncode()
    assert _leftovers(cache) == []
    assert hf("fetch", url, cache=cache).returncode == 0
    assert _tree(cache / name) == _tree(model_dir)


# --------------------------------------------------------------------------- pack


def _xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 (reference algorithm), for checking the seek table's checksums."""
    p1, p2, p3, p4, p5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                          0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
    m = (1 << 64) - 1

    def rotl(x, r):
        return ((x << r) | (x >> (64 - r))) & m

    def rnd(acc, lane):
        return (rotl((acc + lane * p2) & m, 31) * p1) & m

    def merge(acc, val):
        return ((acc ^ rnd(0, val)) * p1 + p4) & m

    n, i = len(data), 0
    if n >= 32:
        v = [(seed + p1 + p2) & m, (seed + p2) & m, seed, (seed - p1) & m]
        lanes = struct.unpack_from(f"<{(n // 32) * 4}Q", data)
        for j in range(0, len(lanes), 4):
            v = [rnd(v[k], lanes[j + k]) for k in range(4)]
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & m
        for x in v:
            h = merge(h, x)
        i = (n // 32) * 32
    else:
        h = (seed + p5) & m
    h = (h + n) & m
    while i + 8 <= n:
        h = (rotl(h ^ rnd(0, struct.unpack_from("<Q", data, i)[0]), 27) * p1 + p4) & m
        i += 8
    if i + 4 <= n:
        h = (rotl(h ^ (struct.unpack_from("<I", data, i)[0] * p1 & m), 23) * p2 + p3) & m
        i += 4
    while i < n:
        h = (rotl(h ^ (data[i] * p5 & m), 11) * p1) & m
        i += 1
    h ^= h >> 33
    h = h * p2 & m
    h ^= h >> 29
    h = h * p3 & m
    return h ^ (h >> 32)


def test_xxh64_reference_values():
    assert _xxh64(b"") == 0xEF46DB3751D8E999
    assert _xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert _xxh64(b"abc") == 0x44BC2CF5AD770999


def test_pack_zstd_is_multi_frame_with_a_seek_table(model_dir, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    out = tmp_path / "m.tar.zst"
    doc = hf_json("pack", str(model_dir), "-o", str(out), "--frame-size", "256K")
    assert doc["command"] == "pack" and doc["path"] == str(out) and doc["compression"] == "zst"
    assert doc["seek_table"] is True and doc["frame_size"] == 256 << 10
    assert doc["frames"] == -(-doc["tar_bytes"] // (256 << 10)) > 1
    assert doc["bytes"] == out.stat().st_size and doc["members"] == 7
    # The seek table: one entry per frame; compressed sizes + the table = the file.
    table = read_seek_table(out)
    assert table is not None and len(table) == doc["frames"]
    assert sum(d for _, d, _ in table) == doc["tar_bytes"]
    assert all(d == 256 << 10 for _, d, _ in table[:-1])
    raw = out.read_bytes()
    table_len = 8 + 12 * len(table) + 9
    assert sum(c for c, _, _ in table) + table_len == len(raw)
    magic, size = struct.unpack_from("<II", raw, len(raw) - table_len)
    assert magic == SEEK_TABLE_MAGIC and size == table_len - 8
    frames_, desc, smagic = struct.unpack_from("<IBI", raw, len(raw) - 9)
    assert (frames_, desc, smagic) == (len(table), 0x80, SEEKABLE_MAGIC)
    # Every frame: independent, content size and checksum; the table's checksum is the
    # low 32 bits of the XXH64 of the frame's content.
    off, dctx = 0, zstandard.ZstdDecompressor()
    tar_bytes = b""
    for i, (c, d, chk) in enumerate(table):
        frame = raw[off:off + c]
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == d and params.has_checksum
        content = dctx.decompress(frame)
        assert len(content) == d
        if i < 2 or i == len(table) - 1:
            assert chk == _xxh64(content) & 0xFFFFFFFF
        tar_bytes += content
        off += c
    # Any zstd tool reads it (the seek table is a skippable frame), and so does tar.
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-tq", str(out)], check=True)
        dec = subprocess.run(["zstd", "-dc", str(out)], capture_output=True, check=True).stdout
        assert dec == tar_bytes
        dest = tmp_path / "by-tar"
        dest.mkdir()
        subprocess.run(f"zstd -dc {out} | tar -xf - -C {dest}", shell=True, check=True)
        assert _tree(dest) == _tree(model_dir)
    # Members like tfhub.dev's: ./, sorted, owner 0/0.
    import io

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        members = t.getmembers()
    names = [m.name for m in members]
    assert names[0] == "." and names[1:] == sorted(names[1:])
    assert "./saved_model.pb" in names and "./variables/variables.index" in names
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    # hubfast decodes the frames in parallel: units = frames decoded.
    doc = hf_json("fetch", str(out), cache=tmp_path / "cache")
    st = doc["results"][0]["stats"]
    assert st["compression"] == "zstd" and st["units"] == len(table) > 1
    assert _tree(Path(doc["results"][0]["path"])) == _tree(model_dir)
    # --frame-size 0: one frame, no seek table.
    one = tmp_path / "one.tar.zst"
    doc = hf_json("pack", str(model_dir), "-o", str(one), "--frame-size", "0")
    assert doc["frames"] == 1 and doc["seek_table"] is False and read_seek_table(one) is None


@pytest.mark.parametrize("tool", ["python", "pigz", "gzip", "igzip"])
def test_pack_gzip_is_one_member(model_dir, tmp_path, tool):
    if tool != "python" and not shutil.which(tool):
        pytest.skip(f"{tool} is not installed")
    out = tmp_path / "m.tgz"
    doc = hf_json("pack", str(model_dir), "-o", str(out), "--gzip-tool", tool)
    assert doc["compression"] == "gz" and doc["tool"] == tool
    raw = out.read_bytes()
    d = zlib.decompressobj(31)
    tar_bytes = d.decompress(raw)
    assert d.eof and d.unused_data == b""  # one gzip member: its end is the file's end
    assert len(tar_bytes) == doc["tar_bytes"]
    assert gzip.decompress(raw) == tar_bytes
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "-tzf", str(out)], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert listing[0] == "./" and "./variables/variables.data-00000-of-00001" in listing
    doc = hf_json("fetch", str(out), cache=tmp_path / "cache")
    assert doc["results"][0]["stats"]["compression"] == "gzip"
    assert _tree(Path(doc["results"][0]["path"])) == _tree(model_dir)


def test_pack_auto_gzip_and_errors(model_dir, tmp_path):
    doc = hf_json("pack", str(model_dir), "-o", str(tmp_path / "a.tar.gz"))
    assert doc["tool"] == ("pigz" if shutil.which("pigz") else "python")
    p = hf("pack", str(model_dir), "-o", str(tmp_path / "a.tar.zst"))
    assert p.returncode == 0 and p.stdout.strip() == str(tmp_path / "a.tar.zst")
    assert "frames" in p.stderr
    # A symbolic link: hubfast would refuse to extract it, so pack refuses to write it.
    linked = tmp_path / "linked"
    shutil.copytree(model_dir, linked)
    (linked / "assets" / "link.txt").symlink_to("vocab.txt")
    p = hf("pack", str(linked), "-o", str(tmp_path / "l.tar.gz"))
    assert p.returncode == 1 and "link.txt" in p.stderr and "link" in p.stderr
    assert not (tmp_path / "l.tar.gz").exists() and not list(tmp_path.glob("l.tar.gz*.partial"))
    p = hf("pack", str(tmp_path / "absent"), "-o", str(tmp_path / "x.tar.gz"))
    assert p.returncode == 3 and "absent" in p.stderr


# --------------------------------------------------------------------------- serve


def _serve(*args: str, cwd: Optional[Path] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hubfast", "serve", *args, "--json"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)


def _served(p: subprocess.Popen) -> dict:
    ready, _, _ = select.select([p.stdout], [], [], 30)
    assert ready, "hubfast serve printed nothing"
    doc = json.loads(p.stdout.readline())
    assert doc["command"] == "serve" and doc["exit_code"] == 0
    return doc


def _stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert p.returncode == 0, p.stderr.read()


def test_serve_computes_digests_before_the_first_request(tmp_path):
    # md5 and crc32c of a 384 MiB archive take about a second here: computed on the first
    # request, they held its headers back that long.
    big = tmp_path / "big.tar.gz"
    block = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(384):
            f.write(block)
    srv = _serve(str(big))
    try:
        doc = _served(srv)
        time.sleep(5)  # the digests are computed meanwhile, not on the request
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", doc["port"]), 30) as s:
            s.sendall(f"HEAD {doc['handles'][0]['path']}?tf-hub-format=compressed HTTP/1.1\r\n"
                      "Host: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                part = s.recv(65536)
                assert part, head
                head += part
        took = time.perf_counter() - t
        head = head.decode("latin-1")
        assert head.startswith("HTTP/1.1 200") and "x-goog-hash: crc32c=" in head.lower(), head
        assert took < 0.25, f"headers after {took:.3f} s"
    finally:
        _stop(srv)


def test_serve_publishes_a_torrent_and_torrent_writes_the_same(archives, tmp_path):
    if not _core.have_swarm():
        pytest.skip("this build has no swarm support")
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(Path(archives["gz"]).read_bytes())
    srv = _serve(str(archive), "--path", "/org/m/1", "--tracker", "http://tracker.test/announce")
    try:
        doc = _served(srv)
        url = doc["handles"][0]["url"].replace("/org/m/1", "/org/m/1.torrent")
        deadline = time.time() + 30
        while True:  # computed in the background: 404 until then
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    served = r.read()
                break
            except urllib.error.HTTPError as e:
                assert e.code == 404 and time.time() < deadline
                time.sleep(0.1)
    finally:
        _stop(srv)
    t = _core.parse_torrent(served)
    web_seed = doc["handles"][0]["url"] + "?tf-hub-format=compressed"
    assert web_seed.encode() in served and b"http://tracker.test/announce" in served
    # The same archive, the same info-hashes (the web seed is outside the info dict).
    p = hf("torrent", str(archive), "--web-seed", "http://elsewhere/m.tar.gz", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["path"] == str(archive) + ".torrent"
    assert (out["info_hash_v1"], out["info_hash_v2"]) == (t["info_hash_v1"], t["info_hash_v2"])
    assert len(out["info_hash_v2"]) == 64  # hybrid: SHA-256 merkle trees
    assert _core.parse_torrent((tmp_path / "m.tar.gz.torrent").read_bytes())["info_hash_v1"] \
        == t["info_hash_v1"]
    p = hf("torrent", str(tmp_path / "missing.tar.gz"), "--web-seed", "http://x/")
    assert p.returncode == 3 and "missing.tar.gz" in p.stderr
    p = hf("serve", str(archive), "--seed")  # a seeder needs a tracker to announce to
    assert p.returncode == 2 and "--tracker" in p.stderr


def test_serve_an_archive_a_model_dir_and_a_mirror_dir(archives, model_dir, tmp_path):
    # One archive, at --path.
    srv = _serve(str(archives["zst"]), "--path", "/org/model/3")
    try:
        doc = _served(srv)
        (h,) = doc["handles"]
        assert h["url"] == f"http://127.0.0.1:{doc['port']}/org/model/3" == doc["url"]
        p = hf("fetch", h["url"], cache=tmp_path / "c1")
        assert p.returncode == 0, p.stderr
        assert _tree(Path(p.stdout.strip())) == _tree(model_dir)
    finally:
        _stop(srv)
    # A model directory: packed, served at /<dir name>.
    srv = _serve(str(model_dir))
    try:
        doc = _served(srv)
        assert doc["handles"][0]["path"] == "/m"
        p = hf("fetch", doc["url"], cache=tmp_path / "c2")
        assert p.returncode == 0 and _tree(Path(p.stdout.strip())) == _tree(model_dir)
    finally:
        _stop(srv)
    # A mirror: a directory of archives, each served as a handle (tfhub.dev layout)
    # and as a plain file.
    mirror = tmp_path / "mirror"
    (mirror / "google" / "m").mkdir(parents=True)
    shutil.copy(archives["gz"], mirror / "google" / "m" / "1.tar.gz")
    shutil.copy(archives["zst"], mirror / "google" / "m" / "2.tar.zst")
    (mirror / "README").write_text("not an archive")
    srv = _serve(str(mirror), "--port", "0")
    try:
        doc = _served(srv)
        paths = sorted(h["path"] for h in doc["handles"])
        assert paths == ["/google/m/1", "/google/m/2"]
        base = f"http://127.0.0.1:{doc['port']}"
        p = hf("fetch", f"{base}/google/m/1", f"{base}/google/m/2",
               f"{base}/google/m/1.tar.gz", cache=tmp_path / "c3")
        assert p.returncode == 0, p.stderr
        for line in p.stdout.splitlines():
            assert _tree(Path(line)) == _tree(model_dir)
        # Behind HUBFAST_MIRRORS, a tfhub.dev handle is fetched from the mirror.
        handle = "https://tfhub.dev/google/m/2"
        p = hf("fetch", handle, cache=tmp_path / "c4",
               HUBFAST_MIRRORS=f"https://tfhub.dev/={base}/")
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == str(tmp_path / "c4" / entry_name(handle))
    finally:
        _stop(srv)
    p = subprocess.run([sys.executable, "-m", "hubfast", "serve", str(tmp_path / "nope")],
                       env=_env(), capture_output=True, text=True, timeout=30)
    assert p.returncode == 3 and "nope" in p.stderr


# --------------------------------------------------------------------------- progress


PROGRESS_CODE = "import hubfast, sys; print(hubfast.resolve(sys.argv[1]))"


def _run_on_pty(cmd: List[str], env: Dict[str, str], timeout: float = 60,
                columns: int = 120) -> (int, str, str):
    """Runs `cmd` with stderr on a pseudo-terminal; returns (code, stdout, terminal text)."""
    master, slave = pty.openpty()
    # A fresh pty is 0x0 (as some consoles report): columns=0 keeps it so.
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=slave,
                         stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal closed
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    out = p.stdout.read().decode()
    p.wait(timeout=timeout)
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("how,columns", [("cli", 120), ("api", 120), ("cli", 0)])
def test_progress_bar_on_a_terminal_only(archives, tmp_path, how, columns):
    pytest.importorskip("tqdm")
    with TFHubServer(bandwidth=3 << 20) as slow:  # ~1.3 s: the bar refreshes
        slow.add_archive(MODEL, str(archives["gz"]))
        url = slow.url_for(MODEL)
        cmd = ([sys.executable, "-m", "hubfast", "fetch", url] if how == "cli"
               else [sys.executable, "-c", PROGRESS_CODE, url])
        env = _env(tmp_path / "tty", HUBFAST_CONNECTIONS="1")
        code, out, term = _run_on_pty(cmd, env, columns=columns)
        assert code == 0, term
        assert out.strip() == str(tmp_path / "tty" / entry_name(url))
        assert "%|" in term and "B/s" in term, term  # tqdm: percentage, bar, rate
        if not columns:
            return
        # Not a terminal: silent.
        p = subprocess.run(cmd, env=_env(tmp_path / "pipe", HUBFAST_CONNECTIONS="1"),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stderr == "", p.stderr
        # ...unless TFHUB_DOWNLOAD_PROGRESS asks for it.
        p = subprocess.run(cmd, env=_env(tmp_path / "forced", HUBFAST_CONNECTIONS="1",
                                         TFHUB_DOWNLOAD_PROGRESS="1"),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "B/s" in p.stderr, p.stderr
