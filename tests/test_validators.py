"""Resume and parallel ranges only against a strong validator, checked on every part.

An uncompressed .tar has no checksum of its own, so bytes of two versions spliced into one
file would go unnoticed: a 200 to a Range request (even under the same ETag) restarts the
download from byte 0, a part without the validator does too, and a server with no validator
(no strong ETag, no Last-Modified with Content-Length) gets one connection and no resume.
The loopback server's faults play the misbehaving server; x-goog-hash is off (as on most
servers that are not GCS), so nothing else would catch a splice."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Dict, Iterator

import pytest

import hubfast
from hubfast.testing.models import tree_digest
from hubfast.server import TFHubServer
from hubfast.testing.faults import Fault

MiB = 1 << 20
PATH = "/org/model/1.tar"
ODD = 1_000_003  # inside variables.data


def _version(tmp: Path, seed: int, mib: int) -> Dict[str, object]:
    """An uncompressed .tar; every version of one size has the same length."""
    rnd = hashlib.shake_256(bytes([seed])).digest(mib * MiB)
    src = tmp / f"v{seed}-{mib}"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 100)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(rnd)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in [src, *sorted(src.rglob("*"))]:
            tar.add(p, arcname="." if p == src else "./" + str(p.relative_to(src)), recursive=False)
    return {"tar": buf.getvalue(), "digest": tree_digest(src)}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versions")
    a, b = _version(tmp, 1, 3), _version(tmp, 2, 3)
    assert len(a["tar"]) == len(b["tar"]) and a["tar"] != b["tar"]
    return a, b


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path) -> None:
    for name in ("HUBFAST_OFFLINE", "HUBFAST_CACHE_LAYERS", "HUBFAST_PINS", "HUBFAST_MIRRORS",
                 "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HUBFAST_STALL_TIMEOUT", "5")
    monkeypatch.setenv("HUBFAST_MAX_RETRIES", "3")


def _gets(server: TFHubServer):
    return [r for r in server.stats.requests_for(PATH) if r.method == "GET"]


NO_ETAG = ("ETag",)
NO_VALIDATOR = ("ETag", "Last-Modified")


@pytest.mark.parametrize("validator", ["same ETag", "Last-Modified only"])
def test_a_200_to_a_resume_restarts_from_byte_zero(server, versions, validator):
    """The first response drops; the resume is answered 200 with another version (under the
    same ETag, or the same Last-Modified without ETag): the entry is that version, whole."""
    a, b = versions
    omit = () if validator == "same ETag" else NO_ETAG
    server.add_archive(PATH, a["tar"], goog_hash="none")
    server.inject(PATH, Fault.drop(ODD) | Fault.without_headers(*omit))
    server.inject(PATH, Fault.ignore_range() | Fault.other_version(b["tar"]) | Fault.without_headers(*omit))
    server.inject(PATH, Fault.other_version(b["tar"]) | Fault.without_headers(*omit))  # the restart
    path = hubfast.resolve(server.url_for(PATH))
    assert tree_digest(path) == b["digest"]  # not a splice of a and b
    assert hubfast.last_stats()["restarts"] == 1
    log = _gets(server)
    assert [(r.status, bool(r.range)) for r in log] == [(200, False), (200, True), (200, False)]
    assert log[1].if_range and (log[1].if_range.startswith('"') == (validator == "same ETag"))


@pytest.mark.parametrize("weak", [False, True])
def test_without_a_validator_a_drop_restarts_and_nothing_is_ranged(server, versions, weak):
    a, _ = versions
    server.add_archive(PATH, a["tar"], goog_hash="none")
    hide = Fault.without_headers(*NO_VALIDATOR)
    if weak:  # a weak ETag validates nothing byte-wise
        hide = Fault.without_headers("Last-Modified") | Fault.weak_etag()
    server.inject(PATH, Fault.drop(ODD) | hide)
    server.inject(PATH, hide, times=10)
    path = hubfast.resolve(server.url_for(PATH))
    assert tree_digest(path) == a["digest"]
    assert hubfast.last_stats()["restarts"] == 1
    assert [bool(r.range) for r in _gets(server)] == [False, False]


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return _version(tmp_path_factory.mktemp("large"), 3, 12)


@pytest.fixture
def parallel(monkeypatch) -> None:
    monkeypatch.setenv("HUBFAST_MIN_PARALLEL_BYTES", str(4 * MiB))
    monkeypatch.setenv("HUBFAST_CONNECTIONS", "4")
    monkeypatch.setenv("HUBFAST_ADAPTIVE_CONNECTIONS", "0")


def test_a_part_without_the_validator_restarts(server, large, parallel):
    server.add_archive(PATH, large["tar"], goog_hash="none")
    server.inject(PATH, Fault.delay(0))  # the first response goes through
    server.inject(PATH, Fault.without_headers(*NO_ETAG))  # a part lost its ETag
    path = hubfast.resolve(server.url_for(PATH))
    assert tree_digest(path) == large["digest"]
    assert hubfast.last_stats()["restarts"] == 1


def test_without_a_validator_one_connection(server, large, parallel):
    server.add_archive(PATH, large["tar"], goog_hash="none")
    server.inject(PATH, Fault.without_headers(*NO_VALIDATOR), times=10)
    path = hubfast.resolve(server.url_for(PATH))
    assert tree_digest(path) == large["digest"]
    log = _gets(server)
    assert len(log) == 1 and not log[0].range
    assert hubfast.last_stats()["source"]["segments"] == 0


def test_a_server_that_ignores_range_gets_one_connection_after_a_restart(server, large, parallel):
    server.add_archive(PATH, large["tar"], goog_hash="none")
    server.inject(PATH, Fault.ignore_range(), times=100)
    path = hubfast.resolve(server.url_for(PATH))
    assert tree_digest(path) == large["digest"]
    assert hubfast.last_stats()["restarts"] == 1
    assert hubfast.last_stats()["source"]["segments"] == 0
