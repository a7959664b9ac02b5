"""Tests of hubfast.server (with hubfast.crc32c and hubfast.digests): a real server on
127.0.0.1, real clients, no mocks."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from hubfast import crc32c as crc
from hubfast import digests
from hubfast.server import TFHubServer, serve_forever
from hubfast.testing.certs import make_self_signed_cert
from hubfast.testing.faults import Fault

DATA = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(100_000))
MODEL = "/google/model/1"
COMPRESSED = "tf-hub-format=compressed"


@pytest.fixture
def server() -> Iterator[TFHubServer]:
    s = TFHubServer()
    s.start()
    s.add_archive(MODEL, DATA)
    try:
        yield s
    finally:
        s.stop()
    assert not s.errors, s.errors


def request(
    server: TFHubServer,
    path: str,
    query: Optional[str] = COMPRESSED,
    *,
    method: str = "GET",
    headers: Optional[Dict[str, str]] = None,
    timeout: float = 10,
) -> Tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path + ("?" + query if query else ""), headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp, body
    finally:
        conn.close()


def goog_hash(resp: http.client.HTTPResponse) -> Dict[str, str]:
    values = ",".join(resp.headers.get_all("x-goog-hash") or [])
    return dict(part.strip().split("=", 1) for part in values.split(",") if part)


def b64_crc(value: int) -> str:
    return base64.b64encode(struct.pack(">I", value)).decode()


def b64_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# --- CRC32C ---------------------------------------------------------------------------------


def test_crc32c_known_vector_and_chaining() -> None:
    assert crc.crc32c(b"123456789") == 0xE3069283
    assert crc.crc32c(b"") == 0
    assert crc.crc32c(b"6789", crc.crc32c(b"12345")) == 0xE3069283
    assert crc.crc32c_backend() in ("google_crc32c", "crc32c", "isal", "python")


def test_pure_python_crc32c_matches_bytewise_reference() -> None:
    engine = crc._BlockCrc()
    rnd = os.urandom(70_000)
    for n in (0, 1, 9, 1023, 1024, 1025, 4096 + 17, 70_000):
        ref = crc._crc_update_bytewise(0xFFFFFFFF, rnd[:n]) ^ 0xFFFFFFFF
        assert engine.update(0xFFFFFFFF, rnd[:n]) ^ 0xFFFFFFFF == ref, n
    assert engine.update(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    # Several pieces (more than BLOCKS_PER_PIECE blocks) against the selected backend.
    big = os.urandom(engine.N * engine.BLOCKS_PER_PIECE + 3 * engine.N + 5)
    assert engine.update(0xFFFFFFFF, big) ^ 0xFFFFFFFF == crc.crc32c(big)


def test_compute_digests_bytes_and_file(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(DATA)
    for source in (DATA, str(f)):
        d = digests.compute_digests(source)
        assert d.size == len(DATA)
        assert d.md5 == hashlib.md5(DATA).digest()
        assert d.crc32c == crc.crc32c(DATA)


# --- protocol -------------------------------------------------------------------------------


def test_compressed_get_returns_archive_with_gcs_headers(server: TFHubServer) -> None:
    with urllib.request.urlopen(server.url_for(MODEL, COMPRESSED), timeout=10) as resp:
        body = resp.read()
        headers = resp.headers
    assert body == DATA
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["ETag"] == '"' + hashlib.md5(DATA).hexdigest() + '"'
    assert headers["Accept-Ranges"] == "bytes"
    assert email.utils.parsedate_to_datetime(headers["Last-Modified"]) is not None
    assert headers["x-goog-hash"] == f"crc32c={b64_crc(crc.crc32c(DATA))},md5={b64_md5(DATA)}"
    # The known vector through the header path too.
    server.add_archive("/vector/1", b"123456789")
    resp, body = request(server, "/vector/1")
    assert body == b"123456789"
    assert goog_hash(resp)["crc32c"] == b64_crc(0xE3069283)
    assert goog_hash(resp)["md5"] == b64_md5(b"123456789")


def test_head_has_headers_and_no_body(server: TFHubServer) -> None:
    resp, body = request(server, MODEL, method="HEAD")
    assert resp.status == 200 and body == b""
    assert resp.headers["Content-Length"] == str(len(DATA))
    assert goog_hash(resp)["md5"] == b64_md5(DATA)
    st = server.stats.path(MODEL)
    assert st.heads == 1 and st.archive_gets == 0 and st.body_bytes == 0


def test_model_page_direct_archive_and_queries(server: TFHubServer) -> None:
    resp, body = request(server, MODEL, query=None)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
    assert b"tf-hub-format=compressed" in body and body != DATA

    resp, body = request(server, MODEL, query="foo=bar&tf-hub-format=compressed&x=1")
    assert resp.status == 200 and body == DATA

    resp, body = request(server, MODEL, query="tf-hub-format=bogus")
    assert resp.status == 400

    server.add_archive("/bucket/model.tar.gz", b"\x1f\x8b" + DATA)
    resp, body = request(server, "/bucket/model.tar.gz", query=None)
    assert resp.status == 200 and body == b"\x1f\x8b" + DATA
    assert resp.headers["Content-Type"] == "application/gzip"

    resp, _ = request(server, "/no/such/model")
    assert resp.status == 404


def test_uncompressed_answers_303_with_gs_location(server: TFHubServer) -> None:
    resp, body = request(server, MODEL, query="tf-hub-format=uncompressed")
    assert resp.status == 303
    assert body == b"gs://tfhub-modules/google/model/1/uncompressed"
    assert resp.headers.get("Location") is None
    # What tensorflow_hub does: urllib raises HTTPError(303), the body is the location.
    server.add_archive("/other/2", DATA, uncompressed_location="gs://my-bucket/other/2")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url_for("/other/2", "tf-hub-format=uncompressed"), timeout=10)
    assert info.value.code == 303
    assert info.value.read().decode() == "gs://my-bucket/other/2"


# --- ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header,start,end",
    [
        ("bytes=0-9", 0, 9),
        ("bytes=10-", 10, len(DATA) - 1),
        ("bytes=-5", len(DATA) - 5, len(DATA) - 1),
        ("bytes=99990-200000", 99990, len(DATA) - 1),
        ("bytes=-200000", 0, len(DATA) - 1),
    ],
)
def test_single_ranges(server: TFHubServer, header: str, start: int, end: int) -> None:
    resp, body = request(server, MODEL, headers={"Range": header})
    assert resp.status == 206
    assert body == DATA[start : end + 1]
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert resp.headers["Content-Length"] == str(end - start + 1)
    assert goog_hash(resp)["md5"] == b64_md5(DATA)  # the whole object, also on 206
    assert server.stats.path(MODEL).body_bytes == end - start + 1


@pytest.mark.parametrize("header", [f"bytes={len(DATA)}-", "bytes=-0", f"bytes={len(DATA) + 5}-{len(DATA) + 9}"])
def test_unsatisfiable_range_is_416(server: TFHubServer, header: str) -> None:
    resp, body = request(server, MODEL, headers={"Range": header})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert body == b""


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=abc", "bytes=9-3", "items=0-1"])
def test_multiple_or_invalid_ranges_get_whole_object(server: TFHubServer, header: str) -> None:
    resp, body = request(server, MODEL, headers={"Range": header})
    assert resp.status == 200 and body == DATA
    assert resp.headers.get("Content-Range") is None


def test_if_range(server: TFHubServer) -> None:
    head, _ = request(server, MODEL, method="HEAD")
    etag, lm = head.headers["ETag"], head.headers["Last-Modified"]
    for validator, expected in [
        (etag, 206),
        ('"0123"', 200),
        ("W/" + etag, 200),
        (lm, 206),
        ("Mon, 01 Jan 2001 00:00:00 GMT", 200),
    ]:
        resp, body = request(server, MODEL, headers={"Range": "bytes=5-9", "If-Range": validator})
        assert resp.status == expected, validator
        assert body == (DATA[5:10] if expected == 206 else DATA)


def test_set_object_changes_etag_and_content(server: TFHubServer) -> None:
    first, _ = request(server, MODEL, method="HEAD")
    new = DATA[::-1]
    server.set_object(MODEL, new)
    resp, body = request(server, MODEL, headers={"Range": "bytes=0-9", "If-Range": first.headers["ETag"]})
    assert resp.status == 200 and body == new  # the object changed: the whole new object
    assert resp.headers["ETag"] != first.headers["ETag"]
    assert email.utils.parsedate_to_datetime(resp.headers["Last-Modified"]) > email.utils.parsedate_to_datetime(
        first.headers["Last-Modified"]
    )
    assert goog_hash(resp)["md5"] == b64_md5(new)


def test_parallel_ranged_requests_reassemble(server: TFHubServer) -> None:
    parts: Dict[int, bytes] = {}
    bounds = [(i * 25_000, i * 25_000 + 24_999) for i in range(4)]

    def fetch(a: int, b: int) -> None:
        parts[a] = request(server, MODEL, headers={"Range": f"bytes={a}-{b}"})[1]

    threads = [threading.Thread(target=fetch, args=ab) for ab in bounds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert b"".join(parts[a] for a, _ in bounds) == DATA
    assert server.stats.connections == 4


# --- goog-hash options, files, directories --------------------------------------------------


def test_goog_hash_modes_and_precomputed_digests(server: TFHubServer) -> None:
    server.add_archive("/md5/1", DATA, goog_hash="md5")
    server.add_archive("/crc/1", DATA, goog_hash="crc32c")
    server.add_archive("/none/1", DATA, goog_hash="none")
    server.add_archive("/split/1", DATA, split_goog_hash=True)
    server.add_archive("/given/1", DATA, digests={"md5": b"\x01" * 16, "crc32c": 0xDEADBEEF})
    assert set(goog_hash(request(server, "/md5/1", method="HEAD")[0])) == {"md5"}
    assert set(goog_hash(request(server, "/crc/1", method="HEAD")[0])) == {"crc32c"}
    assert request(server, "/none/1", method="HEAD")[0].headers.get("x-goog-hash") is None
    split = request(server, "/split/1", method="HEAD")[0]
    assert len(split.headers.get_all("x-goog-hash")) == 2
    assert goog_hash(split)["crc32c"] == b64_crc(crc.crc32c(DATA))
    given = request(server, "/given/1", method="HEAD")[0]
    assert goog_hash(given) == {"md5": b64_md5_raw(b"\x01" * 16), "crc32c": b64_crc(0xDEADBEEF)}
    assert given.headers["ETag"] == '"' + "01" * 16 + '"'


def b64_md5_raw(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def test_file_backed_archive_streams_from_disk(server: TFHubServer, tmp_path: Path) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 123)
    f = tmp_path / "model.tar.gz"
    f.write_bytes(blob)
    server.add_archive("/file/1", str(f))
    resp, body = request(server, "/file/1")
    assert body == blob
    assert goog_hash(resp) == {"crc32c": b64_crc(crc.crc32c(blob)), "md5": b64_md5(blob)}
    resp, body = request(server, "/file/1", headers={"Range": "bytes=1000000-1999999"})
    assert resp.status == 206 and body == blob[1_000_000:2_000_000]
    server.inject("/file/1", Fault.flip(1_500_000))
    _, body = request(server, "/file/1", headers={"Range": "bytes=1000000-1999999"})
    assert body[500_000] == blob[1_500_000] ^ 0xFF and body[:500_000] == blob[1_000_000:1_500_000]
    assert server.stats.path("/file/1").body_bytes == len(blob) + 2_000_000


def test_directory_serving(server: TFHubServer, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "variables").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"pb")
    (root / "variables" / "variables.index").write_bytes(b"index")
    (tmp_path / "secret").write_bytes(b"secret")
    server.add_directory("/static", root)
    assert request(server, "/static/saved_model.pb", query=None)[1] == b"pb"
    resp, body = request(server, "/static/variables/variables.index", query="anything=1")
    assert resp.status == 200 and body == b"index"
    for bad in ("/static/missing", "/static/../secret", "/static/%2e%2e/secret", "/static/variables", "/static"):
        assert request(server, bad, query=None)[0].status == 404, bad


# --- redirects and request records ----------------------------------------------------------


def test_redirects_loop_and_cross_host(server: TFHubServer) -> None:
    server.add_redirect("/old/1", server.url_for(MODEL), status=301, keep_query=True)
    with urllib.request.urlopen(server.url_for("/old/1", COMPRESSED), timeout=10) as resp:
        assert resp.read() == DATA
    log = server.stats.log
    assert [(r.path, r.status) for r in log] == [("/old/1", 301), (MODEL, 200)]
    assert log[1].query == COMPRESSED

    server.add_redirect("/a", server.url_for("/b"))
    server.add_redirect("/b", server.url_for("/a"))
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url_for("/a"), timeout=10)
    assert info.value.code == 302

    with TFHubServer() as other:
        other.add_archive("/elsewhere/1", b"moved")
        server.add_redirect("/cross", other.url_for("/elsewhere/1"), status=307, keep_query=True)
        resp, _ = request(server, "/cross", headers={"Authorization": "Bearer secret"})
        assert resp.status == 307 and resp.headers["Location"] == other.url_for("/elsewhere/1") + "?" + COMPRESSED
        # A client following the redirect without the credentials; the server records what it got.
        conn = http.client.HTTPConnection("127.0.0.1", other.port, timeout=10)
        conn.request("GET", "/elsewhere/1?" + COMPRESSED, headers={"User-Agent": "hubfast-test"})
        assert conn.getresponse().read() == b"moved"
        conn.close()
        rec = other.stats.log[0]
        assert rec.authorization is None and rec.user_agent == "hubfast-test"
    assert server.stats.requests_for("/cross")[0].authorization == "Bearer secret"


def test_counters_log_and_reset(server: TFHubServer) -> None:
    request(server, MODEL)
    request(server, MODEL, headers={"Range": "bytes=0-99", "If-Range": '"x"', "Authorization": "Basic abc"})
    request(server, MODEL, method="HEAD")
    request(server, MODEL, query=None)
    st = server.stats
    p = st.path(MODEL)
    assert p.requests == {"GET": 3, "HEAD": 1} and p.total_requests == 4
    assert p.archive_gets == 2
    assert p.body_bytes == 2 * len(DATA)  # If-Range mismatch: the whole object twice
    assert p.statuses == {200: 4}
    assert st.total.body_bytes == p.body_bytes and st.archive_gets == 2
    rec = st.log[1]
    assert (rec.range, rec.if_range, rec.authorization) == ("bytes=0-99", '"x"', "Basic abc")
    assert rec.user_agent is None and rec.header("host") == f"127.0.0.1:{server.port}"
    server.reset_stats()
    assert server.stats.log == [] and server.stats.path(MODEL).total_requests == 0


def test_keep_alive_reuses_one_connection(server: TFHubServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for _ in range(3):
        conn.request("GET", MODEL + "?" + COMPRESSED)
        assert conn.getresponse().read() == DATA
    conn.close()
    st = server.stats
    assert st.connections == 1 and len({r.connection for r in st.log}) == 1


def test_method_not_allowed(server: TFHubServer) -> None:
    resp, _ = request(server, MODEL, method="POST")
    assert resp.status == 405


# --- faults ---------------------------------------------------------------------------------


def test_fault_status_with_retry_after_then_normal(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.status(503, retry_after=1), times=2)
    assert server.pending_faults(MODEL) == 2
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.url_for(MODEL, COMPRESSED), timeout=10)
        assert info.value.code == 503 and info.value.headers["Retry-After"] == "1"
    assert request(server, MODEL)[1] == DATA
    assert server.stats.path(MODEL).statuses == {503: 2, 200: 1}


def test_faults_are_fifo_and_skip_head(server: TFHubServer) -> None:
    for code in (500, 429, 404, 403, 408):
        server.inject(MODEL, Fault.status(code))
    assert request(server, MODEL, method="HEAD")[0].status == 200  # HEAD takes no fault
    assert [request(server, MODEL)[0].status for _ in range(6)] == [500, 429, 404, 403, 408, 200]
    assert server.stats.log[1].fault == "code=500"


def test_fault_delay_and_combination(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.delay(0.3))
    t0 = time.monotonic()
    assert request(server, MODEL)[1] == DATA
    assert time.monotonic() - t0 >= 0.3
    server.inject(MODEL, Fault.delay(0.2) | Fault.status(500))
    t0 = time.monotonic()
    assert request(server, MODEL)[0].status == 500
    assert time.monotonic() - t0 >= 0.2


def test_fault_status_on_redirect_path(server: TFHubServer) -> None:
    server.add_redirect("/r", server.url_for(MODEL))
    server.inject("/r", Fault.status(502))
    assert request(server, "/r")[0].status == 502
    assert request(server, "/r")[0].status == 302


def test_fault_drop(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.drop(1000))
    with pytest.raises(http.client.IncompleteRead) as info:
        request(server, MODEL)
    assert len(info.value.partial) == 1000
    assert server.stats.path(MODEL).body_bytes == 1000
    server.inject(MODEL, Fault.drop(1000, reset=True))
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        request(server, MODEL)
    assert request(server, MODEL)[1] == DATA


def test_fault_stall_times_out_client_and_can_continue(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.stall(100, 5))
    t0 = time.monotonic()
    with pytest.raises((socket.timeout, TimeoutError)):
        request(server, MODEL, timeout=0.5)
    assert time.monotonic() - t0 < 3
    server.inject(MODEL, Fault.stall(100, 0.3))
    t0 = time.monotonic()
    assert request(server, MODEL)[1] == DATA
    assert time.monotonic() - t0 >= 0.3
    server.inject(MODEL, Fault.stall(100, 0.1, then="close"))
    with pytest.raises(http.client.IncompleteRead) as info:
        request(server, MODEL)
    assert len(info.value.partial) == 100


def test_fault_hold_until_released(server: TFHubServer) -> None:
    release, reached = threading.Event(), threading.Event()
    server.inject(MODEL, Fault.hold(1000, release, reached))
    before = server.stats.path(MODEL).body_bytes
    got: List[bytes] = []
    client = threading.Thread(target=lambda: got.append(request(server, MODEL, timeout=60)[1]))
    client.start()
    assert reached.wait(30)
    time.sleep(0.2)  # held: nothing more is sent, the response is not complete
    assert server.stats.path(MODEL).body_bytes - before == 1000 and got == [] and client.is_alive()
    release.set()
    client.join(30)
    assert got == [DATA]
    # Past the end of the body: held before its last byte.
    release, reached = threading.Event(), threading.Event()
    server.inject(MODEL, Fault.hold(10 * len(DATA), release, reached))
    before = server.stats.path(MODEL).body_bytes
    client = threading.Thread(target=lambda: got.append(request(server, MODEL, timeout=60)[1]))
    client.start()
    assert reached.wait(30)
    assert server.stats.path(MODEL).body_bytes - before == len(DATA) - 1
    release.set()
    client.join(30)
    assert got == [DATA, DATA]


def test_fault_flip(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.flip(12345))
    resp, body = request(server, MODEL)
    assert len(body) == len(DATA) and b64_md5(body) != goog_hash(resp)["md5"]
    assert [i for i in range(len(DATA)) if body[i] != DATA[i]] == [12345]
    assert body[12345] == DATA[12345] ^ 0xFF


def test_fault_truncate_keeps_connection(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.truncate(512))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", MODEL + "?" + COMPRESSED)
    resp = conn.getresponse()
    assert resp.headers["Content-Length"] == "512" and resp.read() == DATA[:512]
    conn.request("GET", MODEL + "?" + COMPRESSED)
    assert conn.getresponse().read() == DATA
    conn.close()
    assert server.stats.connections == 1


def test_fault_lying_length(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.lying_length(+10))
    with pytest.raises(http.client.IncompleteRead) as info:
        request(server, MODEL)
    assert info.value.partial == DATA and info.value.expected == 10

    server.inject(MODEL, Fault.lying_length(-10))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", MODEL + "?" + COMPRESSED)
    resp = conn.getresponse()
    assert resp.headers["Content-Length"] == str(len(DATA) - 10)
    assert resp.read() == DATA[:-10]
    with pytest.raises((http.client.HTTPException, ConnectionError)):  # the server closed it
        conn.request("GET", MODEL + "?" + COMPRESSED)
        conn.getresponse().read()
    conn.close()


def test_fault_close_after_headers(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.close_after_headers())
    with pytest.raises(http.client.IncompleteRead) as info:
        request(server, MODEL)
    assert info.value.partial == b""


def test_fault_slow_drip(server: TFHubServer) -> None:
    server.add_archive("/small/1", b"0123456789" * 2)
    server.inject("/small/1", Fault.slow(40))
    t0 = time.monotonic()
    assert request(server, "/small/1")[1] == b"0123456789" * 2
    assert time.monotonic() - t0 >= 0.35


def test_fault_wrong_content_range(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.wrong_content_range(shift=1))
    resp, body = request(server, MODEL, headers={"Range": "bytes=10-19"})
    assert resp.status == 206 and body == DATA[10:20]
    assert resp.headers["Content-Range"] == f"bytes 11-20/{len(DATA)}"
    server.inject(MODEL, Fault.wrong_content_range(value="bytes 0-9/5"))
    assert request(server, MODEL, headers={"Range": "bytes=10-19"})[0].headers["Content-Range"] == "bytes 0-9/5"


def test_fault_garbage_after_end(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.garbage(7))
    resp, body = request(server, MODEL)
    assert resp.headers["Content-Length"] == str(len(DATA) + 7)
    assert body[: len(DATA)] == DATA and body[len(DATA) :] == b"GARBAGE"


def test_fault_ignore_range(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.ignore_range())
    resp, body = request(server, MODEL, headers={"Range": "bytes=10-19"})
    assert resp.status == 200 and body == DATA


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Tuple[str, str, str]:
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


def test_tls_trusted_and_untrusted(certs: Tuple[str, str, str]) -> None:
    ca, cert, key = certs
    with TFHubServer(tls=(cert, key)) as server:
        server.add_archive(MODEL, DATA)
        assert server.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=ca)
        if hasattr(ssl, "VERIFY_X509_STRICT"):
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        with urllib.request.urlopen(server.url_for(MODEL, COMPRESSED), context=ctx, timeout=10) as resp:
            assert resp.read() == DATA
        url = f"https://localhost:{server.port}{MODEL}?{COMPRESSED}"  # DNS SAN
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            assert resp.read() == DATA
        with pytest.raises(urllib.error.URLError) as info:
            urllib.request.urlopen(server.url_for(MODEL, COMPRESSED), context=ssl.create_default_context(), timeout=10)
        assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
        # Faults work over TLS too (no sendfile there).
        server.inject(MODEL, Fault.drop(5000))
        with pytest.raises(http.client.IncompleteRead):
            urllib.request.urlopen(server.url_for(MODEL, COMPRESSED), context=ctx, timeout=10).read()
        assert server.stats.archive_gets == 3
        assert not server.errors


# --- lifecycle, timeouts, bandwidth ---------------------------------------------------------


def test_stop_is_prompt_during_stall(server: TFHubServer) -> None:
    server.inject(MODEL, Fault.stall(100, 60))
    outcome: Dict[str, object] = {}

    def client() -> None:
        try:
            outcome["body"] = request(server, MODEL, timeout=30)[1]
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 5
    while server.stats.path(MODEL).body_bytes < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats.path(MODEL).body_bytes == 100
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 2
    t.join(5)
    assert not t.is_alive() and "error" in outcome
    # The handler thread itself was woken, not just its client disconnected.
    assert not [th for th in threading.enumerate() if th.name.startswith("hubfast-testing-conn")]


def test_restart_on_same_port(server: TFHubServer) -> None:
    port = server.port
    server.stop()
    with pytest.raises(OSError):
        request(server, MODEL)
    server.start()
    assert server.port == port and request(server, MODEL)[1] == DATA


def test_idle_connection_times_out() -> None:
    with TFHubServer(timeout=0.5) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # the server gave up on the silent client and closed
        assert time.monotonic() - t0 < 3
        sock.close()


def test_bandwidth_cap() -> None:
    blob = os.urandom(1 << 20)
    with TFHubServer(bandwidth=4 << 20) as server:
        server.add_archive(MODEL, blob)
        t0 = time.monotonic()
        assert request(server, MODEL)[1] == blob
        elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 3


@pytest.mark.parametrize("shared", [False, True])
def test_total_bandwidth_is_shared_by_all_connections(tmp_path, shared: bool) -> None:
    """Four concurrent downloads of 2 MiB from a file (the sendfile path): a 4 MiB/s cap per
    connection lets all finish in ~0.5 s; 4 MiB/s for the whole link takes ~2 s. The bounds
    leave a busy machine a second either way."""
    blob = os.urandom(2 << 20)
    f = tmp_path / "m.tar.gz"
    f.write_bytes(blob)
    caps = {"total_bandwidth": 4 << 20} if shared else {"bandwidth": 4 << 20}
    with TFHubServer(**caps) as server:
        server.add_archive(MODEL, str(f))
        bodies: List[bytes] = []
        t0 = time.monotonic()
        threads = [threading.Thread(target=lambda: bodies.append(request(server, MODEL)[1])) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        elapsed = time.monotonic() - t0
    assert bodies == [blob] * 4
    if shared:
        assert 1.8 <= elapsed < 10, elapsed
    else:
        assert 0.4 <= elapsed < 1.5, elapsed


def test_bandwidth_and_total_bandwidth_are_exclusive() -> None:
    with pytest.raises(ValueError):
        TFHubServer(bandwidth=1e6, total_bandwidth=1e6)


# --- packaging and CLI ----------------------------------------------------------------------


@pytest.mark.skipif(sys.version_info < (3, 10), reason="needs sys.stdlib_module_names")
def test_server_imports_only_the_standard_library() -> None:
    """hubfast.server, hubfast.digests and hubfast.crc32c need nothing but the standard
    library (and hubfast's own package), so `hubfast serve` runs on a bare mirror host."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"  # site hooks (.pth files) may import third-party modules
        "import hubfast.server, hubfast.crc32c\n"
        "hubfast.crc32c.crc32c(b'x')\n"
        "new = set(sys.modules) - before\n"
        "bad = sorted(n for n in new if n.split('.')[0] not in sys.stdlib_module_names"
        " and n.split('.')[0] not in ('hubfast', '__main__'))\n"
        "print(bad + sorted(n for n in new if n.startswith(('hubfast.testing', 'tensorflow'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_serve_forever(tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(DATA)
    stop = threading.Event()
    ready: Dict[str, TFHubServer] = {}
    started = threading.Event()

    def on_ready(s: TFHubServer) -> None:
        ready["server"] = s
        started.set()

    t = threading.Thread(target=serve_forever, args=(archive,), kwargs={"path": MODEL, "ready": on_ready, "stop_event": stop})
    t.start()
    try:
        assert started.wait(10)
        with urllib.request.urlopen(ready["server"].url_for(MODEL, COMPRESSED), timeout=10) as resp:
            assert resp.read() == DATA
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()  # (`hubfast serve`, the one command line: test_cli.py)
