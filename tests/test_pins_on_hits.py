"""A pin (sha256= or HUBFAST_PINS) is checked on a cache hit too: an entry satisfies it
only when its manifest records that archive digest, which hubfast writes whenever a pin
made it hash the archive. Real archives, the loopback server, a real read-only mount."""
from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

import hubfast
from hubfast import errors
from hubfast.cache import entry_name
from hubfast.server import TFHubServer

PATH = "/org/model/1"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pins")
    (d / "src").mkdir()
    (d / "src" / "saved_model.pb").write_bytes(b"real" * 100)
    out = d / "m.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(d / "src", arcname=".")
    return out


@pytest.fixture
def server(archive):
    with TFHubServer() as s:
        s.add_archive(PATH, str(archive))
        yield s


def _gets(server) -> int:
    return sum(1 for r in server.stats.requests_for(PATH) if r.method == "GET")


def _pb(path: str) -> bytes:
    return (Path(path) / "saved_model.pb").read_bytes()


def test_an_unpinned_entry_is_fetched_again_for_a_pin(server, archive, cache_dir):
    url = server.url_for(PATH)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    hubfast.resolve(url)  # unpinned: no digest recorded
    assert _gets(server) == 1
    path = hubfast.resolve(url, sha256=sha)
    assert _gets(server) == 2 and _pb(path) == b"real" * 100
    assert f"s {sha}" in (cache_dir / (entry_name(url) + ".hubfast")).read_text()
    hubfast.resolve(url, sha256=sha)  # recorded now: a hit
    assert _gets(server) == 2
    with pytest.raises(errors.IntegrityError):
        hubfast.resolve(url, sha256="0" * 64)  # fetched again, and the archive isn't that
    assert _pb(hubfast.resolve(url, sha256=sha)) == b"real" * 100


def test_a_planted_entry_satisfies_no_pin(server, archive, cache_dir, monkeypatch, tmp_path):
    url = server.url_for(PATH)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    planted = cache_dir / entry_name(url)
    planted.mkdir()
    (planted / "saved_model.pb").write_bytes(b"evil")  # as tensorflow_hub would leave one
    pins = tmp_path / "pins"
    pins.write_text(f"{url} {sha}\n")
    monkeypatch.setenv("HUBFAST_PINS", str(pins))
    monkeypatch.setenv("HUBFAST_OFFLINE", "1")
    with pytest.raises(errors.IntegrityError) as e:
        hubfast.resolve(url)
    assert sha in str(e.value) and "HUBFAST_OFFLINE" in str(e.value)
    monkeypatch.delenv("HUBFAST_OFFLINE")
    assert _pb(hubfast.resolve(url)) == b"real" * 100
    assert _gets(server) == 1


def test_a_read_only_layer_filled_without_pins_satisfies_none(server, archive, tmp_path,
                                                             monkeypatch):
    url = server.url_for(PATH)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    mnt = tmp_path / "layer"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        unpinned, pinned = mnt / "unpinned", mnt / "pinned"
        monkeypatch.setenv("TFHUB_CACHE_DIR", str(unpinned))
        hubfast.resolve(url)
        monkeypatch.setenv("TFHUB_CACHE_DIR", str(pinned))
        hubfast.resolve(url, sha256=sha)  # layers are filled under the same pins
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "mine"))
        monkeypatch.setenv("HUBFAST_OFFLINE", "1")
        monkeypatch.setenv("HUBFAST_CACHE_LAYERS", str(unpinned))
        with pytest.raises(errors.IntegrityError) as e:
            hubfast.resolve(url, sha256=sha)
        assert str(unpinned) in str(e.value)
        assert _pb(hubfast.resolve(url)).startswith(b"real")  # unpinned: used as it is
        monkeypatch.setenv("HUBFAST_CACHE_LAYERS", str(pinned))
        assert hubfast.resolve(url, sha256=sha).startswith(str(pinned))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
