"""Swarm mode on loopback (no namespaces needed): what happens without a published torrent,
and a download from the web seed alone when no tracker answers. The many-host cases are in
test_cluster.py."""
from __future__ import annotations

import os

import pytest

import hubfast
from hubfast import _core, swarm
from hubfast.pack import pack
from hubfast.testing.models import tree_digest
from hubfast.server import TFHubServer

pytestmark = pytest.mark.skipif(not _core.have_swarm(), reason="built without libtorrent")
DEAD_TRACKER = "http://127.0.0.1:9/announce"  # nothing listens on the discard port


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("swarm-model")
    src = d / "m"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"graph" * 1000)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(3 << 20))
    pack(src, d / "m.tar.gz", gzip_tool="python", level=1)
    return src, d / "m.tar.gz"


def test_torrent_url_rule():
    assert swarm.torrent_url("http://m:8/google/x/1?tf-hub-format=compressed") == \
        "http://m:8/google/x/1.torrent"
    assert swarm.torrent_url("https://s/a/m.tar.gz") == "https://s/a/m.tar.gz.torrent"


def test_set_but_no_torrent_is_plain_http(model, tmp_path, monkeypatch):
    src, archive = model
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HUBFAST_SWARM", DEAD_TRACKER)
    with TFHubServer() as s:
        s.add_archive("/m/1", str(archive))
        path = hubfast.resolve(s.url_for("/m/1"))
        st = s.stats
    assert tree_digest(path) == tree_digest(src)
    assert st.path("/m/1.torrent").gets == 1  # asked once, got 404
    assert st.path("/m/1").body_bytes == archive.stat().st_size
    assert not any(".swarm-" in n for n in os.listdir(tmp_path / "cache"))
    assert "swarm_pieces" not in hubfast.last_stats().get("source", {})


def test_tracker_down_web_seed_alone(model, tmp_path, monkeypatch):
    src, archive = model
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HUBFAST_SWARM", DEAD_TRACKER)
    with TFHubServer() as s:
        s.add_archive("/m/1", str(archive))
        t = swarm.publish_torrent(s, "/m/1", str(archive))
        path = hubfast.resolve(s.url_for("/m/1"))
        st = s.stats
    assert tree_digest(path) == tree_digest(src)
    source = hubfast.last_stats()["source"]
    pieces = -(-archive.stat().st_size // t["piece_bytes"])
    assert source["swarm_pieces"] == pieces  # every piece verified and emitted
    assert st.path("/m/1").body_bytes >= archive.stat().st_size  # from the web seed
    assert not any(".swarm-" in n for n in os.listdir(tmp_path / "cache"))


def test_unknown_swarm_option_is_rejected(model, tmp_path):
    _, archive = model
    t = swarm.make_torrent(str(archive), [])
    with pytest.raises(ValueError, match="unknown swarm option 'tracker'"):  # a typo
        _core.ensure_entry(str(tmp_path), "e", "h", url="http://127.0.0.1:9/x",
                           lock_timeout=5.0, fsync=False, lock_mode="auto",
                           swarm={"torrent": t["data"], "tracker": ["x"]})
    with pytest.raises(hubfast.errors.IntegrityError):
        _core.parse_torrent(b"d4:spam")
