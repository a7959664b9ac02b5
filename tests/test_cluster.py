"""Many hosts, one model: simulated hosts (network namespaces, tc-capped links) resolving
one handle at once, straight from the origin and through the README's nginx proxy.

The rows are those of ``bench/bench_cluster.py`` (4 hosts and 32 MiB here). Skipped when the
machine cannot make namespaces (not root, no iproute2) or lacks nginx, unless ``CI`` is set:
then it fails, so CI cannot pass without running it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubfast.testing import netsim
from hubfast.testing.cluster import Cluster
from hubfast.testing.nginx import nginx_binary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

HOSTS = 4
SIZE = 32 << 20
RATE = 20e6  # bytes/s per link and direction: one host alone needs ~1.7 s


def _require(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI requires the cluster test to run")
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = netsim.missing_tools() or (None if nginx_binary() else "nginx is not installed")
    if why:
        _require(why)
    from bench_cluster import random_model  # the benchmark's own model

    from hubfast.pack import pack

    tmp = tmp_path_factory.mktemp("cluster")
    src = random_model(tmp, SIZE)
    archive = tmp / "model.tar.gz"
    pack(src, archive, gzip_tool="auto", level=1)
    c = Cluster(HOSTS, archive, src, RATE, tmp / "work")
    try:
        yield c
    finally:
        prefix = c.net.prefix
        c.close()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}"


def test_direct_and_proxy_rows(cluster):
    size = cluster.archive.stat().st_size
    direct = cluster.direct_row()
    assert direct["identical"], direct
    # Every host pulled the whole archive from the origin (over parallel ranges or not).
    assert 0.99 * HOSTS * size <= direct["origin_bytes"] <= 1.1 * HOSTS * size, direct
    # The origin's link is shared by all: the last host is well behind one host alone.
    assert direct["last_ready_s"] > 1.5 * direct["single_host_s"], direct

    proxy = cluster.proxy_row()
    assert proxy["identical"], proxy
    assert size <= proxy["origin_bytes"] <= 1.1 * size, proxy  # the proxy fetched it once
    assert proxy["hosts"] == HOSTS and proxy["archive_bytes"] == size


def test_links_are_capped_and_private(cluster):
    """A host has no default route: nothing it sends can leave the switch."""
    h = cluster.clients[0]
    routes = h.run(["ip", "route", "show", "default"], capture_output=True, text=True).stdout
    assert routes.strip() == ""
    p = h.run(["ip", "route", "get", "1.1.1.1"], capture_output=True, text=True)
    assert p.returncode != 0  # unreachable: no route leaves the namespace


def _require_swarm() -> None:
    import shutil

    from hubfast import _core

    if not _core.have_swarm():
        _require("this build has no swarm support (libtorrent-rasterbar-dev)")
    if shutil.which("opentracker") is None:
        _require("opentracker is not installed (apt-get install opentracker)")


def test_swarm_row(cluster):
    """Swarm mode: every host gets the published torrent, pieces come from the other hosts
    as well as from the origin (which sends less than a copy per host), and every tree is
    byte-identical."""
    _require_swarm()
    size = cluster.archive.stat().st_size
    before = cluster.origin_stats()["torrent_gets"]
    swarm = cluster.swarm_row()  # the origin seeds too (hubfast serve --seed)
    assert swarm["identical"], swarm
    after = cluster.origin_stats()
    assert after["torrent_gets"] - before == HOSTS + 1  # each host asked
    assert after["seeded_bytes"] > 0  # the origin's seeder took part
    assert size <= swarm["origin_bytes"] <= 0.9 * HOSTS * size, swarm


def test_swarm_tracker_down_falls_back_to_web_seed(cluster):
    """No tracker answers: each host downloads the torrent's pieces from the web seed (the
    origin's archive URL), verified as in a swarm, and ends up with the same tree."""
    _require_swarm()
    size = cluster.archive.stat().st_size
    hosts = cluster.clients[:2]
    sent0 = cluster.origin_stats()
    env = {"HUBFAST_SWARM": f"http://{cluster.origin.ip}:9/announce"}  # nothing listens
    results = cluster.resolve_all(hosts, lambda h: dict(env, HUBFAST_SWARM_INTERFACE=h.ip))
    sent1 = cluster.origin_stats()
    assert all(r["fingerprint"] == cluster.want for r in results)
    assert sent1["torrent_gets"] - sent0["torrent_gets"] == len(hosts)
    assert sent1["body_bytes"] - sent0["body_bytes"] >= len(hosts) * size


def test_swarm_host_killed_mid_download_and_a_late_joiner(cluster, tmp_path):
    """One host gets SIGKILL mid-swarm: the others finish, and its next run (same cache)
    recovers, leaving no temp or swarm directory behind. A host that joins after all have
    finished gets the archive from the origin's seeder."""
    _require_swarm()
    cluster.seed_at_origin()
    caches = [tmp_path / f"h{i}" for i in range(HOSTS)]
    results = cluster.resolve_all(cluster.clients, cluster.swarm_env, caches=caches,
                                  kill={0: 1.0})
    assert results[0] == {"killed": True}
    assert all(r["fingerprint"] == cluster.want for r in results[1:])
    (again,) = cluster.resolve_all(cluster.clients[:1], cluster.swarm_env, caches=caches[:1])
    assert again["fingerprint"] == cluster.want
    leftovers = [n for n in os.listdir(caches[0]) if ".swarm-" in n or n.endswith(".tmp")]
    assert leftovers == [], leftovers

    (late,) = cluster.resolve_all(cluster.clients[1:2], cluster.swarm_env)  # fresh cache
    assert late["fingerprint"] == cluster.want


def test_swarm_bans_a_peer_that_sends_corrupt_pieces(cluster, tmp_path):
    """A peer claims every piece and answers each request with random bytes: the hosts'
    hash checks reject its pieces and ban it, and every tree is still right."""
    _require_swarm()
    import json

    from hubfast import _core
    from hubfast.testing.cluster import _read_json

    cluster.seed_at_origin()
    announce = cluster.start_tracker()
    torrent = tmp_path / "m.torrent"  # the same info-hash as the origin's: same file
    torrent.write_bytes(_core.make_torrent(str(cluster.archive))["data"])
    bad = cluster.proxy.popen(
        [sys.executable, "-m", "hubfast.testing.bad_peer", str(torrent), announce,
         cluster.proxy.ip, "6881", str(cluster.archive.stat().st_size)],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _read_json(bad, 30) == {"listening": True}
        results = cluster.resolve_all(cluster.clients[:2], cluster.swarm_env)
    finally:
        bad.kill()
        out, _ = bad.communicate()
    assert all(r["fingerprint"] == cluster.want for r in results)
    sent = sum(json.loads(line)["blocks_sent"] for line in out.splitlines() if line)
    failures = sum(r["swarm"].get("swarm_hash_failures", 0) for r in results)
    banned = sum(r["swarm"].get("swarm_banned_peers", 0) for r in results)
    assert sent > 0 and failures >= 1 and banned >= 1, (sent, results)
