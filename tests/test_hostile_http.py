"""Hostile HTTP beyond the fault matrix of test_fetch.py: oversized and
innumerable headers, a redirect chain that never ends, a server that answers
something else than an archive. Each: a typed error in bounded time, nothing
cached."""
from __future__ import annotations

import os
import tarfile
import time

import pytest

import hubfast
from hubfast.server import TFHubServer
from hubfast.testing.faults import Fault


@pytest.fixture
def archive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "saved_model.pb").write_bytes(os.urandom(5000))
    out = tmp_path / "m.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=".")
    return out


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HUBFAST_MAX_RETRIES", "1")
    monkeypatch.setenv("HUBFAST_STALL_TIMEOUT", "2")
    return tmp_path / "cache"


def _clean(cache) -> bool:
    return not cache.exists() or all(p.name.endswith(".hubfast.lock") for p in cache.iterdir())


@pytest.mark.parametrize("headers", [
    {"X-Huge": "a" * 300_000},                              # one header over libcurl's limit
    {f"X-Many-{i}": "b" * 40 for i in range(20_000)},        # 1 MB of small headers
], ids=["oversized-header", "innumerable-headers"])
def test_header_bombs_fail_typed_and_fast(archive, env, headers):
    with TFHubServer() as srv:
        srv.add_archive("/m/1", str(archive))
        srv.inject("/m/1", Fault.status(200, body=b"not an archive", headers=headers), times=10)
        t = time.time()
        with pytest.raises(hubfast.HubfastError) as e:
            hubfast.resolve(srv.url + "/m/1")
        assert time.time() - t < 20
        assert isinstance(e.value, (hubfast.NetworkError, hubfast.IntegrityError)), e.value
    assert _clean(env)


def test_endless_redirect_chain(archive, env):
    with TFHubServer() as srv:
        for i in range(40):
            srv.add_redirect(f"/r/{i}", srv.url + f"/r/{i + 1}")
        t = time.time()
        with pytest.raises(hubfast.NetworkError) as e:
            hubfast.resolve(srv.url + "/r/0")
        assert "redirect" in str(e.value).lower()
        assert time.time() - t < 10
        # It gave up at the limit, not after following all 40 hops.
        assert srv.stats.requests["GET"] <= 12
    assert _clean(env)


def test_html_instead_of_an_archive(env):
    with TFHubServer() as srv:
        srv.add_archive("/m/1", b"<html><body>model page</body></html>" * 100)
        with pytest.raises(hubfast.IntegrityError):
            hubfast.resolve(srv.url + "/m/1")
    assert _clean(env)
