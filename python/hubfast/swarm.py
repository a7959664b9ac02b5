"""Swarm mode: many hosts download one archive from each other over BitTorrent.

Off unless ``HUBFAST_SWARM`` names a tracker's announce URL. Then, before an archive is
fetched over HTTP from URL ``U``, the client asks for its torrent at ``torrent_url(U)``: the
URL's path with ``.torrent`` appended and its query dropped (``http://m/google/x/1`` ->
``http://m/google/x/1.torrent``; ``http://m/x.tar.gz`` -> ``http://m/x.tar.gz.torrent``).
``hubfast serve`` publishes them; ``hubfast torrent`` writes one beside an archive for a
static server. No torrent there (any answer but a valid one, e.g. tfhub.dev's 404): the
archive comes over HTTP as without swarm mode.

A torrent is hybrid (v1 + v2: every piece checked against SHA-256 merkle trees) and names
the archive's URL as its web seed (BEP 19), so a swarm needs no seeder to start; the client
adds ``U`` as a web seed too. Verified pieces go, in order, straight into the native decoder;
the archive's own checks (length, digests, pins) follow as for HTTP. DHT, local service
discovery, UPnP and NAT-PMP stay off unless ``HUBFAST_SWARM_DISCOVERY`` lists them.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Optional

from . import _core, config

logger = logging.getLogger("hubfast")

TORRENT_SUFFIX = ".torrent"
_MAX_TORRENT = 16 << 20  # bytes: a 4096-piece hybrid torrent is ~0.2 MiB
_LOOKUP_TIMEOUT = 10.0  # seconds for the torrent's GET: it must not delay a plain fetch long


def torrent_url(archive_url: str) -> str:
    """Where the torrent of the archive at ``archive_url`` is published."""
    parts = urllib.parse.urlsplit(archive_url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc,
                                    parts.path.rstrip("/") + TORRENT_SUFFIX, "", ""))


def find_torrent(archive_url: str, s: config.Settings) -> Optional[bytes]:
    """The torrent published for ``archive_url``, or None (not there, or not a torrent)."""
    from .http import _opener  # noqa: PLC0415

    url = torrent_url(archive_url)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return None
    req = urllib.request.Request(url, headers={"User-Agent": "hubfast"})
    try:
        with _opener(url, s).open(req, timeout=min(_LOOKUP_TIMEOUT, s.connect_timeout)) as r:
            data = r.read(_MAX_TORRENT + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        logger.debug("hubfast: no torrent at %s (%s): fetching over HTTP", url, e)
        return None
    if len(data) > _MAX_TORRENT or not data.startswith(b"d"):
        logger.debug("hubfast: %s is not a torrent: fetching over HTTP", url)
        return None
    return data


def swarm_options(archive_url: str,
                  s: Optional[config.Settings] = None) -> Optional[Dict[str, object]]:
    """The native swarm source's options for ``archive_url`` (``save_dir`` still to be set),
    or None for plain HTTP."""
    s = s or config.settings()
    if not s.swarm or not _core.have_swarm():
        return None
    data = find_torrent(archive_url, s)
    if data is None:
        return None
    return {"torrent": data, "trackers": [s.swarm], "web_seeds": [archive_url],
            "save_dir": "", "interface": s.swarm_interface,
            "dht": "dht" in s.swarm_discovery, "lsd": "lsd" in s.swarm_discovery,
            "upnp": "upnp" in s.swarm_discovery, "natpmp": "natpmp" in s.swarm_discovery,
            "require_encryption": s.swarm_encryption, "stall_timeout": s.stall_timeout * 2}


def seeder(interface: str = "", trackers: Optional[List[str]] = None,
           s: Optional[config.Settings] = None) -> "_core.Seeder":
    """A seeder on ``interface`` ("" or 0.0.0.0: any), announcing to ``trackers``."""
    s = s or config.settings()
    return _core.Seeder({"interface": "" if interface in ("", "0.0.0.0") else interface,
                         "trackers": list(trackers or []) or ([s.swarm] if s.swarm else []),
                         "dht": "dht" in s.swarm_discovery, "lsd": "lsd" in s.swarm_discovery,
                         "upnp": "upnp" in s.swarm_discovery,
                         "natpmp": "natpmp" in s.swarm_discovery,
                         "require_encryption": s.swarm_encryption})


def work_dir(cache_root: str, name: str) -> str:
    """A private directory beside the entry for the archive while it downloads, named
    ``.<entry>.swarm-<pid>-<random>``; those of processes that died (kill -9) go first."""
    os.makedirs(cache_root, exist_ok=True)
    prefix = f".{name}.swarm-"
    for n in os.listdir(cache_root):
        if not n.startswith(prefix):
            continue
        pid = n[len(prefix):].split("-", 1)[0]
        full = os.path.join(cache_root, n)
        try:
            st = os.lstat(full)
            if not pid.isdigit() or st.st_uid != os.geteuid() or not os.path.isdir(full) \
                    or os.path.islink(full):
                continue
            os.kill(int(pid), 0)  # alive: its directory stays
        except ProcessLookupError:
            shutil.rmtree(full, ignore_errors=True)
        except OSError:
            continue
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=cache_root)


def remove_work_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def make_torrent(archive: str, web_seeds: List[str], trackers: Optional[List[str]] = None,
                 piece_bytes: int = 0) -> Dict[str, object]:
    """A hybrid torrent of ``archive``: ``{data, info_hash_v1, info_hash_v2, piece_bytes}``."""
    return _core.make_torrent(archive, web_seeds=web_seeds, trackers=trackers or [],
                              piece_bytes=piece_bytes)


def publish_torrent(server: object, path: str, archive: str,
                    trackers: Optional[List[str]] = None) -> Dict[str, object]:
    """Computes the torrent of the archive a TFHubServer serves at ``path`` and serves it at
    ``path + ".torrent"``, naming the server's archive URL as the web seed."""
    web_seed = server.url_for(path, "tf-hub-format=compressed")  # type: ignore[attr-defined]
    t = make_torrent(archive, [web_seed], trackers)
    server.add_file(path.rstrip("/") + TORRENT_SUFFIX, t["data"],  # type: ignore[attr-defined]
                    content_type="application/x-bittorrent")
    return t
