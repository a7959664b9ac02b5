"""One gzip stream decoded on every core, end to end: a model-sized single-member
`gzip -6` archive extracted through the parallel decoder (chosen automatically on a
machine with more than one core) gives the same tree as tarfile, through the file
source and over HTTP; a damaged stream is an integrity error and leaves nothing."""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

import hubfast
from hubfast import _core
from hubfast.testing.models import tree_digest
from hubfast.server import TFHubServer

MiB = 1 << 20
pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not _core.have_isal(),
                                reason="one core or no ISA-L: gzip is decoded in one stream")

# Weight-like bytes: 6 bits of entropy per byte, so deflate writes dynamic Huffman blocks
# (random bytes would become stored blocks) and back-references stay rare.
_SKEW = bytes((i * 7) % 64 for i in range(256))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("pgz")
    src = d / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"\x08\x01" + b"graph" * 5000)
    (src / "variables" / "variables.index").write_bytes(b"index" * 100)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(
        os.urandom(40 * MiB).translate(_SKEW))
    (src / "assets").mkdir()
    (src / "assets" / "vocab.txt").write_text("\n".join(f"word{i}" for i in range(20000)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.add(src, arcname=".")
    gz = d / "model.tar.gz"
    gz.write_bytes(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))  # one member
    return src, gz, tree_digest(src)


def test_local_archive_is_decoded_in_parallel(model, tmp_path, monkeypatch):
    src, gz, digest = model
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HUBFAST_DECODE_THREADS", raising=False)
    path = hubfast.resolve(str(gz))
    st = hubfast.last_stats()
    assert st["compression"] == "gzip" and st["units"] == 1
    assert st["decode_threads"] >= 2, st
    assert tree_digest(path) == digest


def test_one_thread_when_asked(model, tmp_path, monkeypatch):
    src, gz, digest = model
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HUBFAST_DECODE_THREADS", "1")
    path = hubfast.resolve(str(gz))
    assert hubfast.last_stats()["decode_threads"] == 1
    assert tree_digest(path) == digest


def test_over_http_in_parallel(model, tmp_path, monkeypatch):
    src, gz, digest = model
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HUBFAST_DECODE_THREADS", raising=False)
    with TFHubServer() as srv:
        srv.add_archive("/m/1", str(gz))
        path = hubfast.resolve(srv.url_for("/m/1"))
    assert hubfast.last_stats()["decode_threads"] >= 2
    assert tree_digest(path) == digest


@pytest.mark.parametrize("where", [0.3, 0.7, "crc", "truncated"])
def test_damage_is_an_integrity_error_and_leaves_nothing(model, tmp_path, monkeypatch, where):
    src, gz, digest = model
    data = bytearray(gz.read_bytes())
    if where == "crc":
        data[-8] ^= 0xFF  # the trailer's CRC32
    elif where == "truncated":
        del data[len(data) * 2 // 3:]
    else:
        data[int(len(data) * where)] ^= 0x10  # inside a chunk a worker decodes
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    with pytest.raises((hubfast.errors.IntegrityError, hubfast.errors.UnsafeArchiveError)):
        hubfast.resolve(str(bad))
    left = [p.name for p in cache.iterdir()] if cache.exists() else []
    assert not [n for n in left if not n.endswith((".lock", ".use"))], left


_TOOLS = {
    "gzip -1": ["gzip", "-1", "-c"], "gzip -6": ["gzip", "-6", "-c"], "gzip -9": ["gzip", "-9", "-c"],
    "pigz": ["pigz", "-6", "-c"], "pigz -i": ["pigz", "-6", "-i", "-c"],  # -i: independent blocks
    "igzip": ["igzip", "-3", "-c"],
}


@pytest.mark.parametrize("tool", list(_TOOLS))
def test_archives_from_every_common_compressor(model, tmp_path, monkeypatch, tool):
    """Byte-identical trees from the real tools' streams, each decoded by two threads."""
    import shutil
    import subprocess

    cmd = _TOOLS[tool]
    if shutil.which(cmd[0]) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{cmd[0]} is missing (dev/setup installs it)")
        pytest.skip(f"{cmd[0]} is not installed")
    src, gz, digest = model
    with gzip.open(gz) as f:
        tar = f.read()
    out = tmp_path / "m.tar.gz"
    with open(out, "wb") as f:
        subprocess.run(cmd, input=tar, stdout=f, check=True, timeout=300)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HUBFAST_DECODE_THREADS", "2")
    path = hubfast.resolve(str(out))
    assert hubfast.last_stats()["decode_threads"] == 2
    assert tree_digest(path) == digest
