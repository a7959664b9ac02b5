"""A real tensorflow_hub 0.16.1 process and a hubfast process race on one
entry, both orders: one download, both succeed, no live temp dir deleted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import hubfast
from hubfast.server import TFHubServer

pytest.importorskip("tensorflow_hub", reason="the parity baseline")  # noqa: spec check only
pytestmark = pytest.mark.tf

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])
TFHUB = r"""
import json, sys, time
import tensorflow_hub as hub
print(json.dumps({"path": hub.resolve(sys.argv[1]), "end": time.time()}))
"""
HUBFAST = r"""
import json, sys, time
import hubfast
p = hubfast.resolve(sys.argv[1])
print(json.dumps({"path": p, "end": time.time(), "downloaded": not hubfast.last_stats()["cached"]}))
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("race")
    src = d / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 1000)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(12 << 20))
    out = d / "m.tar.gz"
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(src, arcname=".")
    return out


def _start(code: str, url: str, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, TFHUB_CACHE_DIR=str(cache), PYTHONPATH=PYTHONPATH, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _done(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("first", ["tensorflow_hub", "hubfast"])
def test_race_on_one_entry(tmp_path, archive, first):
    cache = tmp_path / "cache"
    # ~3 s of transfer: the second process arrives while the first downloads.
    with TFHubServer(bandwidth=4e6) as srv:
        srv.add_archive("/race/m/1", str(archive))
        url = srv.url + "/race/m/1"
        codes = {"tensorflow_hub": TFHUB, "hubfast": HUBFAST}
        second = "hubfast" if first == "tensorflow_hub" else "tensorflow_hub"
        a = _start(codes[first], url, cache)
        deadline = time.time() + 60
        while srv.stats.path("/race/m/1").body_bytes == 0:  # the first is downloading
            assert time.time() < deadline and a.poll() is None, "the first process never started"
            time.sleep(0.02)
        live_tmp = [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]
        b = _start(codes[second], url, cache)
        ra, rb = _done(a), _done(b)
        assert ra["path"] == rb["path"]
        assert srv.stats.path("/race/m/1").archive_gets == 1, "downloaded twice"
        assert live_tmp, "the first process had a temp dir while downloading"
    files = sorted(p.name for p in Path(ra["path"]).rglob("*") if p.is_file())
    assert files == ["saved_model.pb", "variables.data-00000-of-00001"]
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
