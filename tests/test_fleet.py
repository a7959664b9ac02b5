"""A fleet pulling through one caching reverse proxy, and a shared read-only cache layer.

The recipe the README documents ("Fleet behind a caching proxy"): Debian's nginx as a
caching reverse proxy in front of the model origin (``proxy_cache``, ``proxy_cache_lock``,
a cache key that includes the query string ``tf-hub-format=compressed``), and every host
pointing ``HUBFAST_MIRRORS`` at it. Here: a real nginx on loopback (its own config and
prefix in tmp_path), the loopback TF Hub server as the origin, and six client processes
with separate caches. The origin must send the archive once; every client must end up
with the same bytes.

When nginx is not installed the test is skipped, unless ``CI`` is set: then it fails, so
a CI run cannot pass without exercising the recipe.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

import hubfast
from hubfast.cache import entry_name
from hubfast.pack import pack
from hubfast.testing.models import tree_digest
from hubfast.testing.nginx import nginx_binary, write_conf
from hubfast.server import TFHubServer

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])
NGINX = nginx_binary()
MODEL = "/fleet/model/1"
BIG = "/fleet/big/1"
CLIENTS = 6


def _env(cache: Path, **extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHONPATH + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("HUBFAST_CACHE_LAYERS", "HUBFAST_OFFLINE", "HUBFAST_MIRRORS",
              "TFHUB_DOWNLOAD_PROGRESS", "http_proxy", "HTTP_PROXY"):
        env.pop(k, None)
    env["TFHUB_CACHE_DIR"] = str(cache)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_nginx() -> str:
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (apt-get install nginx-light); CI requires "
                        "the fleet test to run")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return NGINX


class Nginx:
    """nginx in the foreground with its own config and prefix; stopped at teardown."""

    def __init__(self, binary: str, prefix: Path, origin: str) -> None:
        self.prefix = prefix
        self.port = _free_port()
        conf = write_conf(prefix, f"127.0.0.1:{self.port}", origin)
        test = subprocess.run([binary, "-t", "-c", str(conf), "-p", str(prefix)],
                              capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 15
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert time.time() < deadline, "nginx did not start listening"
                time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown of master and workers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        p = self.prefix / "access.log"
        return p.read_text() if p.exists() else ""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("fleet-models")
    small = d / "small"
    (small / "variables").mkdir(parents=True)
    (small / "saved_model.pb").write_bytes(b"graph" * 2000)
    (small / "variables" / "variables.index").write_bytes(b"index" * 100)
    (small / "variables" / "variables.data-00000-of-00001").write_bytes(
        os.urandom(6 << 20) + bytes(2 << 20))
    big = d / "big"
    (big / "variables").mkdir(parents=True)
    (big / "saved_model.pb").write_bytes(b"graph" * 2000)
    # Above the client's 64 MiB threshold: fetched over parallel ranged connections.
    (big / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(72 << 20))
    out = {"small": small, "big": big}
    pack(small, d / "small.tar.gz", gzip_tool="auto")
    pack(big, d / "big.tar.zst", level=1)
    out["small_archive"] = d / "small.tar.gz"
    out["big_archive"] = d / "big.tar.zst"
    return out


@pytest.fixture
def origin(models):
    # One capped connection: the origin needs a second or two, so the clients overlap.
    with TFHubServer(bandwidth=48 << 20) as s:
        s.add_archive(MODEL, str(models["small_archive"]))
        s.add_archive(BIG, str(models["big_archive"]))
        yield s


@pytest.fixture
def nginx(tmp_path, origin):
    proxy = Nginx(_require_nginx(), tmp_path / "nginx", origin.url_for("/").rstrip("/"))
    try:
        yield proxy
    finally:
        proxy.stop()


def _fetch_all(handle: str, caches: List[Path], **env: str) -> List[dict]:
    procs = [subprocess.Popen([sys.executable, "-m", "hubfast", "fetch", "--json", handle],
                              env=_env(c, **env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in caches]
    docs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        docs.append(json.loads(out))
    return docs


@pytest.mark.parametrize("which", ["small", "big"])
def test_fleet_pulls_through_nginx_once(origin, nginx, models, tmp_path, which):
    path = MODEL if which == "small" else BIG
    handle = origin.url_for(path)  # what the fleet's code says: the origin's handle
    origin_prefix = origin.url_for("/").rstrip("/")
    mirrors = f"{origin_prefix}={nginx.url}"
    caches = [tmp_path / f"host{i}" for i in range(CLIENTS)]
    # Every connection from the start (the adaptive count may keep one on loopback).
    docs = _fetch_all(handle, caches, HUBFAST_MIRRORS=mirrors, HUBFAST_CONNECTIONS="4",
                      HUBFAST_ADAPTIVE_CONNECTIONS="0")

    # The origin sent the archive once, with the query string tensorflow_hub's protocol
    # needs (nginx kept it and made it part of the cache key).
    st = origin.stats.path(path)
    assert st.archive_gets == 1, (st, nginx.log())
    gets = [r for r in origin.stats.requests_for(path) if r.method == "GET"]
    assert [r.query for r in gets] == ["tf-hub-format=compressed"]
    # Every host: the entry named after the ORIGINAL handle, the same bytes as the model.
    want = tree_digest(models[which])
    for cache, doc in zip(caches, docs):
        (res,) = doc["results"]
        assert res["ok"] and res["entry"] == entry_name(handle)
        assert res["path"] == str(cache / entry_name(handle))
        assert res["cached"] is False  # each host downloaded (from nginx)
        assert tree_digest(res["path"]) == want
    log = nginx.log()
    assert log.count("tf-hub-format=compressed") >= CLIENTS, log
    if which == "big":
        assert '" 206 ' in log, log  # parallel ranged connections, served by nginx

    # The cache key includes the query: the bare URL is another object (an HTML page),
    # and asking for the archive again is a cache HIT that the origin never sees.
    with urllib.request.urlopen(nginx.url + path, timeout=30) as r:
        assert r.headers.get_content_type() == "text/html"
    with urllib.request.urlopen(nginx.url + path + "?tf-hub-format=compressed",
                                timeout=30) as r:
        assert r.headers["X-Cache-Status"] == "HIT"
        assert len(r.read()) == os.path.getsize(models[f"{which}_archive"])
    assert origin.stats.path(path).archive_gets == 1


def test_shared_read_only_layer_serves_many_clients_offline(origin, models, tmp_path):
    handle = origin.url_for(MODEL)
    layer = tmp_path / "layer"
    # Filled once (e.g. at image build time)...
    p = subprocess.run([sys.executable, "-m", "hubfast", "fetch", handle, "--cache-dir",
                        str(layer)], env=_env(tmp_path / "unused"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    entry = Path(p.stdout.strip())
    assert entry == layer / entry_name(handle)
    for dirpath, dirnames, filenames in os.walk(layer):  # ...then made read-only
        for n in dirnames + filenames:
            os.chmod(os.path.join(dirpath, n), 0o555 if n in dirnames else 0o444)
    os.chmod(layer, 0o555)

    def snapshot() -> Dict[str, tuple]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(layer):
            for n in dirnames + filenames:
                full = os.path.join(dirpath, n)
                st = os.lstat(full)
                out[os.path.relpath(full, layer)] = (st.st_size, st.st_mtime_ns, st.st_mode)
        return out

    before = snapshot()
    requests_before = origin.stats.total.total_requests
    caches = [tmp_path / f"host{i}" for i in range(CLIENTS)]
    try:
        docs = _fetch_all(handle, caches, HUBFAST_CACHE_LAYERS=str(layer), HUBFAST_OFFLINE="1")
    finally:
        os.chmod(layer, 0o755)
    want = tree_digest(models["small"])
    for cache, doc in zip(caches, docs):
        (res,) = doc["results"]
        assert res["ok"] and res["cached"] is True
        assert res["path"] == str(entry)  # straight from the layer
        assert tree_digest(res["path"]) == want
        assert not cache.exists() or not any(cache.iterdir())  # nothing written locally
    assert origin.stats.total.total_requests == requests_before  # zero server requests
    assert snapshot() == before  # the layer was not modified
    # Offline and not in any layer: exit 3, and the message says where it looked.
    p = subprocess.run([sys.executable, "-m", "hubfast", "fetch", origin.url_for(BIG)],
                       env=_env(tmp_path / "host0", HUBFAST_CACHE_LAYERS=str(layer),
                                HUBFAST_OFFLINE="1"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and str(layer) in p.stderr
