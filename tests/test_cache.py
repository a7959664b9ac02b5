"""The cache protocol across real processes: one extraction per entry, waiters
that wake at once, kill -9 recovery, repair under a reader, tensorflow_hub's
lock format, offline mode and read-only layers."""
from __future__ import annotations

import bz2
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import hubfast
from hubfast import _core

WORKER_CMD = ["-m", "hubfast.testing.worker"]
LOCK_MODES = ["flock", "heartbeat"]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def slow_archive(tmp_path_factory) -> Path:
    """A .tar.bz2 of ~24 MiB of incompressible data: bzip2 decodes it slowly
    (~1-2 s), long enough for processes to overlap and to be killed mid-way."""
    d = tmp_path_factory.mktemp("slow")
    src = d / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 100)
    (src / "variables" / "variables.index").write_bytes(b"index" * 10)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(24 << 20))
    out = d / "slow.tar.bz2"
    with bz2.open(out, "wb", compresslevel=1) as f:
        with tarfile.open(fileobj=f, mode="w|") as tar:
            tar.add(src, arcname=".")
    return out


@pytest.fixture
def small_archive(tmp_path) -> Path:
    src = tmp_path / "small_src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"x" * 1000)
    (src / "variables" / "variables.index").write_bytes(b"i" * 100)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(100_000))
    out = tmp_path / "small.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=".")
    return out


def _spawn(handle: str, cache: Path, lock_mode: str = "flock", **env) -> subprocess.Popen:
    e = dict(os.environ, TFHUB_CACHE_DIR=str(cache), HUBFAST_LOCK_MODE=lock_mode,
             HUBFAST_LOCK_TIMEOUT="60")
    e.update({k: str(v) for k, v in env.items()})
    return subprocess.Popen([sys.executable, *WORKER_CMD, handle], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen, timeout: float = 90) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _leftovers(cache: Path) -> list:
    return sorted(p.name for p in cache.iterdir() if p.name.endswith((".tmp", ".old")))


@pytest.mark.parametrize("lock_mode", LOCK_MODES)
def test_eight_processes_extract_once(tmp_path, slow_archive, lock_mode):
    cache = tmp_path / "cache"
    procs = [_spawn(str(slow_archive), cache, lock_mode) for _ in range(8)]
    results = [_result(p) for p in procs]
    assert all(r["ok"] for r in results), results
    assert sum(r["downloaded"] for r in results) == 1, results
    paths = {r["path"] for r in results}
    assert len(paths) == 1
    tree = _tree(Path(paths.pop()))
    assert len(tree["variables/variables.data-00000-of-00001"]) == 24 << 20
    # Waiters woke soon after the publish: all finished within 1 s of the writer.
    writer_end = next(r["end"] for r in results if r["downloaded"])
    assert max(r["end"] for r in results) - writer_end < 1.0
    assert _leftovers(cache) == []


@pytest.mark.parametrize("lock_mode", LOCK_MODES)
def test_kill_9_of_the_extractor_lets_a_waiter_take_over(tmp_path, slow_archive, lock_mode):
    cache = tmp_path / "cache"
    first = _spawn(str(slow_archive), cache, lock_mode)
    name = None
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until it is extracting (a temp dir exists)
        if cache.exists() and [p for p in cache.iterdir() if p.name.endswith(".tmp")]:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the first process never started extracting")
    second = _spawn(str(slow_archive), cache, lock_mode)
    time.sleep(0.3)  # let the second one reach the lock wait
    killed_at = time.time()
    first.send_signal(signal.SIGKILL)
    first.wait()
    r = _result(second)
    assert r["ok"] and r["downloaded"], r
    # It took over within 2 s of the kill, then ran its own extraction.
    assert r["lock_wait"] < (killed_at - r["start"]) + 2.0
    assert _leftovers(cache) == [], "the dead process's temp dir must be gone"
    tree = _tree(Path(r["path"]))
    assert len(tree["variables/variables.data-00000-of-00001"]) == 24 << 20


def test_repair_of_a_damaged_entry_while_a_reader_holds_it(tmp_path, small_archive):
    cache = tmp_path / "cache"
    r = _result(_spawn(str(small_archive), cache))
    entry = Path(r["path"])
    good = _tree(entry)
    (entry / "variables" / "variables.index").unlink()  # a /tmp cleaner at work
    state, _, reason = _core.lookup_entry(str(cache), entry.name)
    assert state == "broken" and "variables.index" in reason

    reader = _spawn(str(small_archive), cache, WORKER_HOLD_SECONDS=3)
    # The reader itself repairs on resolve (it found the entry broken) and then
    # holds it; damage it again so that a second process repairs under it.
    line = json.loads(reader.stdout.readline())
    assert line["repaired"] and line["holding"]
    (entry / "variables" / "variables.index").unlink()
    fixer = _result(_spawn(str(small_archive), cache))
    assert fixer["repaired"], fixer
    assert _tree(entry) == good
    # The replaced tree waits for the reader rather than vanishing under it.
    assert any(n.endswith(".old") for n in _leftovers(cache))
    reader.communicate(timeout=30)
    # The next writer of the entry clears it once nobody reads.
    (entry / "saved_model.pb").write_bytes(b"truncated")
    _result(_spawn(str(small_archive), cache))
    assert _leftovers(cache) == []
    assert _tree(entry) == good


def _tfhub_lock(cache: Path, name: str, pid: int, uid: str, host: str | None = None) -> Path:
    import socket

    lock = cache / f"{name}.lock"
    lock.write_text(f"{host or socket.gethostname()}.{pid}.{uid}")
    return lock


def _tfhub_locks(cache: Path) -> list:
    return [p for p in cache.glob("*.lock") if not p.name.endswith(".hubfast.lock")]


def _entry_name(handle: str) -> str:
    return hubfast.cache.entry_name(handle)


def test_waits_for_a_live_tensorflow_hub_lock_and_takes_over_when_it_dies(tmp_path, small_archive):
    cache = tmp_path / "cache"
    cache.mkdir()
    handle = f"file://{small_archive}"
    from hubfast.resolvers import LocalArchiveResolver

    from hubfast.resolvers import describe

    name = describe(handle)["entry_name"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (cache / f"{name}.abc123.tmp").mkdir()
    lock = _tfhub_lock(cache, name, holder.pid, "abc123")
    waiter = _spawn(handle, cache)
    time.sleep(1.5)
    assert waiter.poll() is None, "must wait while tensorflow_hub's holder lives"
    assert (cache / f"{name}.abc123.tmp").exists(), "a live tensorflow_hub temp dir is never touched"
    t = time.time()
    holder.kill()
    holder.wait()
    r = _result(waiter)
    assert r["ok"] and r["downloaded"]
    assert r["end"] - t < 2.0
    assert not lock.exists()
    assert not (cache / f"{name}.abc123.tmp").exists(), "the dead owner's temp dir is removed"
    assert LocalArchiveResolver().is_supported(handle)


def test_holds_a_tensorflow_hub_lock_while_writing(tmp_path, slow_archive):
    import socket

    cache = tmp_path / "cache"
    p = _spawn(str(slow_archive), cache)
    seen = None
    deadline = time.time() + 30
    while time.time() < deadline and p.poll() is None:
        locks = _tfhub_locks(cache) if cache.exists() else []
        if locks:
            seen = locks[0].read_text()
            break
        time.sleep(0.005)
    r = _result(p)
    assert seen is not None, "no tensorflow_hub lock was seen while extracting"
    host, pid, uid = seen.rsplit(".", 2)
    assert host == socket.gethostname() and int(pid) == r["pid"]
    # tensorflow_hub measures progress in <name>.<uid>.tmp: our temp dir's name.
    assert uid.startswith("hf")
    assert not _tfhub_locks(cache), "released after publishing"
    descriptor = (Path(r["path"]).parent / (Path(r["path"]).name + ".descriptor.txt")).read_text()
    assert descriptor.startswith(f"Module: {slow_archive}\nDownload Time: ")


def test_offline_mode_uses_caches_only(tmp_path, small_archive, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    monkeypatch.setenv("HUBFAST_OFFLINE", "1")
    with pytest.raises(hubfast.OfflineError) as e:
        hubfast.resolve(str(small_archive))
    assert str(cache) in str(e.value)
    assert isinstance(e.value, OSError)
    monkeypatch.delenv("HUBFAST_OFFLINE")
    path = hubfast.resolve(str(small_archive))
    monkeypatch.setenv("HUBFAST_OFFLINE", "1")
    assert hubfast.resolve(str(small_archive)) == path


def test_read_only_layer_is_searched_first(tmp_path, small_archive, monkeypatch):
    layer = tmp_path / "baked"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(layer))
    baked = hubfast.resolve(str(small_archive))
    os.chmod(layer, 0o555)
    try:
        monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "writable"))
        monkeypatch.setenv("HUBFAST_CACHE_LAYERS", str(layer))
        monkeypatch.setenv("HUBFAST_OFFLINE", "1")
        assert hubfast.resolve(str(small_archive)) == baked
        assert not (tmp_path / "writable").exists()
    finally:
        os.chmod(layer, 0o755)


def test_cache_dir_that_is_a_symlink(tmp_path, small_archive, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(link))
    path = hubfast.resolve(str(small_archive))
    assert Path(path).parent == link
    assert any(p.is_dir() for p in real.iterdir())
    assert hubfast.resolve(str(small_archive)) == path


def test_entry_written_by_tensorflow_hub_is_used_as_is(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    handle = "https://tfhub.example/some/model/1"
    entry = cache / _entry_name(handle)
    entry.mkdir(parents=True)
    (entry / "saved_model.pb").write_bytes(b"written by tensorflow_hub")
    assert _core.lookup_entry(str(cache), entry.name)[0] == "foreign"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    monkeypatch.setenv("HUBFAST_OFFLINE", "1")
    got = hubfast.cache.fetch_entry(handle, url="http://127.0.0.1:9/never-fetched")
    assert got.path == str(entry)


def test_warm_lookup_is_fast(tmp_path, small_archive, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "c"))
    hubfast.resolve(str(small_archive))
    samples = []
    for _ in range(50):
        t = time.perf_counter()
        hubfast.resolve(str(small_archive))
        samples.append(time.perf_counter() - t)
    samples.sort()
    assert samples[len(samples) // 2] < 0.005  # generous: typically ~0.1 ms


def test_lock_timeout_is_typed(tmp_path, small_archive, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    st = small_archive.stat()
    import hashlib

    name = hashlib.sha1(f"{small_archive}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    held = _core.FileLock.acquire(_core.lock_path(str(cache), name), True, 1.0)
    assert held.held
    # flock locks belong to the open file: another process must wait.
    r = _result(_spawn(str(small_archive), cache, HUBFAST_LOCK_TIMEOUT=0.5))
    assert not r["ok"] and r["error"] == "LockTimeoutError"
    assert r["end"] - r["start"] < 10
    held.release()
    assert _result(_spawn(str(small_archive), cache))["ok"]


def test_two_roots_on_different_file_systems(tmp_path, small_archive, monkeypatch):
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tmpfs)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmpfs / "cache"))
        a = hubfast.resolve(str(small_archive))
        monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "disk"))
        b = hubfast.resolve(str(small_archive))
        assert _tree(Path(a)) == _tree(Path(b))
        assert os.stat(a).st_dev != os.stat(b).st_dev
    finally:
        subprocess.run(["umount", str(tmpfs)])


def test_lock_of_a_killed_but_unreaped_process_is_stale_at_once(tmp_path, small_archive):
    """A SIGKILLed holder that its parent has not reaped is a zombie: kill(pid, 0)
    still succeeds, but the lock it left must not be waited on (found by the chaos soak)."""
    import hashlib

    cache = tmp_path / "cache"
    cache.mkdir()
    st = small_archive.stat()
    name = hashlib.sha1(f"{small_archive}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _tfhub_lock(cache, name, holder.pid, "hfdead")
    holder.send_signal(signal.SIGKILL)
    time.sleep(0.3)  # dead, not reaped: a zombie
    try:
        r = _result(_spawn(str(small_archive), cache), timeout=30)
        assert r["ok"] and r["end"] - r["start"] < 5.0, r
    finally:
        holder.wait()


def test_entry_removed_between_resolve_and_use_is_resolved_again(tmp_path, small_archive,
                                                                  monkeypatch):
    """`hubfast rm` between resolve() and the use-lock (what load() does) must not hand
    TensorFlow a vanished directory: in_use() looks again under the lock and refetches."""
    from hubfast import maintenance, resolvers

    cache = tmp_path / "cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    entry = resolvers.resolve_entry(str(small_archive))
    want = _tree(Path(entry.path))
    assert maintenance.remove_entry(str(cache), entry.name).status == "removed"
    assert not os.path.exists(entry.path)
    with entry.in_use() as path:
        assert _tree(Path(path)) == want
        # Held: a concurrent rm skips it.
        assert maintenance.remove_entry(str(cache), entry.name).status == "skipped"
    assert _core.lookup_entry(str(cache), entry.name)[0] == "complete"


def test_lookup_racing_renames_never_reports_broken(tmp_path, small_archive):
    """The native lookup looks through one directory handle: a tree renamed away and back
    (as rm, prune and repair do) while it looks reads as missing or complete, never as a
    broken entry (which would make resolve() refetch a good entry)."""
    cache = tmp_path / "cache"
    path = _core.ensure_entry(str(cache), "e", str(small_archive), path=str(small_archive),
                              lock_timeout=-1.0, fsync=False, lock_mode="auto")["path"]
    away = str(cache / "e.hfaway.old")
    flipper = subprocess.Popen([sys.executable, "-c", f"""
import os, time
end = time.monotonic() + 2.0
while time.monotonic() < end:
    os.rename({path!r}, {away!r}); os.rename({away!r}, {path!r})
"""])
    seen = {}
    try:
        end = time.monotonic() + 2.5
        while time.monotonic() < end and flipper.poll() is None:
            state = _core.lookup_entry(str(cache), "e")[0]
            seen[state] = seen.get(state, 0) + 1
    finally:
        flipper.wait(timeout=30)
    assert flipper.returncode == 0
    assert "broken" not in seen, seen
    assert seen.get("complete", 0) > 0, seen
    assert _core.lookup_entry(str(cache), "e")[0] == "complete"
