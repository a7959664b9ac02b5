"""Many processes, one URL: the archive crosses the network once; when the downloader is
killed mid-transfer a waiter takes over at once and the server sends the archive about once
more. Real processes (hubfast.testing.worker), a real loopback server with a bandwidth cap.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

import hubfast
from hubfast.testing.models import tree_digest
from hubfast.server import TFHubServer
from hubfast.testing.faults import Fault

MiB = 1 << 20
WORKER_CMD = ["-m", "hubfast.testing.worker"]
PYTHON_DIR = str(Path(hubfast.__file__).resolve().parent.parent)
HANDLE_PATH = "/org/model/1"
ARCHIVE_MIB = 6
BANDWIDTH = 3e6  # bytes/s: the cold download takes about 2 s
COLD_SECONDS = ARCHIVE_MIB * MiB / BANDWIDTH


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc_archive")
    src = root / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 500)
    (src / "variables" / "variables.index").write_bytes(b"index" * 100)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(ARCHIVE_MIB * MiB - 8192))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname=".")
    data = gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)
    return data, tree_digest(src)


@pytest.fixture
def slow_server(archive) -> Iterator[TFHubServer]:
    s = TFHubServer(bandwidth=BANDWIDTH)
    s.add_archive(HANDLE_PATH, archive[0])
    s.start()
    try:
        yield s
    finally:
        s.close()
        assert not s.errors, s.errors


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not k.startswith(("HUBFAST_", "TFHUB_"))}
    env.update(PYTHONPATH=PYTHON_DIR, TFHUB_CACHE_DIR=str(cache), HUBFAST_LOCK_TIMEOUT="60",
               HUBFAST_STALL_TIMEOUT="10", HUBFAST_CONNECT_TIMEOUT="5")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _spawn(handle: str, cache: Path, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *WORKER_CMD, handle], env=_env(cache, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen, timeout: float = 60) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"worker {p.pid} still running after {timeout} s: {err[-2000:]}")
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _kill_all(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_eight_cold_processes_download_once(slow_server, archive, tmp_path):
    data, digest = archive
    cache = tmp_path / "cache"
    handle = slow_server.url_for(HANDLE_PATH)
    procs = [_spawn(handle, cache) for _ in range(8)]
    try:
        results = [_result(p) for p in procs]
    finally:
        _kill_all(procs)
    assert all(r["ok"] for r in results), results
    assert len({r["path"] for r in results}) == 1
    assert sum(r["downloaded"] for r in results) == 1
    st = slow_server.stats.path(HANDLE_PATH)
    assert st.archive_gets == 1, [(r.range, r.status) for r in slow_server.stats.log]
    assert len(data) <= st.body_bytes <= len(data) * 1.01
    path = results[0]["path"]
    assert Path(path).name == hashlib.sha1(handle.encode()).hexdigest()
    assert tree_digest(path) == digest
    # The waiters were released as soon as the entry appeared, not after some poll interval.
    end_of_download = max(r["end"] for r in results if r["downloaded"])
    assert max(r["end"] for r in results) - end_of_download < 2.0
    assert not [p.name for p in cache.iterdir() if p.name.endswith((".tmp", ".lock")) and
                not p.name.endswith(".hubfast.lock")]


def test_killed_downloader_is_taken_over(slow_server, archive, tmp_path):
    data, digest = archive
    cache = tmp_path / "cache"
    handle = slow_server.url_for(HANDLE_PATH)
    name = hashlib.sha1(handle.encode()).hexdigest()
    ready = tmp_path / "ready"
    # The server holds the first download a quarter in until it is killed: however busy the
    # machine, it is still in flight when the second process arrives and when the kill lands.
    release, reached = threading.Event(), threading.Event()
    slow_server.inject(HANDLE_PATH, Fault.hold(len(data) // 4, release, reached))
    first = _spawn(handle, cache, HUBFAST_STALL_TIMEOUT="600")
    procs = [first]
    try:
        # The first process is the downloader: wait until it is well into the transfer.
        _wait_for(reached.is_set, 120, "the first download to start")
        temps = [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1, temps
        second = _spawn(handle, cache, WORKER_READY_FILE=str(ready))
        procs.append(second)
        _wait_for(lambda: any(p.name.startswith("ready.") for p in tmp_path.iterdir()), 120,
                  "the second process to start")
        time.sleep(0.5)  # let it reach the lock and wait there
        sent_before_kill = slow_server.stats.path(HANDLE_PATH).body_bytes
        assert sent_before_kill < len(data), "the first download finished before the kill"
        assert slow_server.stats.path(HANDLE_PATH).archive_gets == 1, "the second did not wait"
        t_kill = time.time()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        release.set()
        r = _result(second)
    finally:
        release.set()
        _kill_all(procs)
    assert r["ok"] and r["downloaded"], r
    # It took over at once: one cold download (plus some slack), not a lock timeout.
    assert r["end"] - t_kill < COLD_SECONDS + 2.0, r["end"] - t_kill
    assert tree_digest(r["path"]) == digest
    st = slow_server.stats.path(HANDLE_PATH)
    assert st.archive_gets == 2
    assert st.body_bytes <= sent_before_kill + len(data) * 1.05 <= 2.05 * len(data)
    # The dead process's temp dir and its tensorflow_hub lock are gone.
    left = sorted(p.name for p in cache.iterdir())
    assert temps[0] not in left
    assert not [n for n in left if n.endswith(".tmp")], left
    assert name + ".lock" not in left, left
