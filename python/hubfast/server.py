"""The HTTP(S) server of `hubfast serve`, speaking the TF Hub hosting protocol.

Serves archives and directories for local development and air-gapped mirrors, and is the
real server hubfast's tests, demo and benchmarks run against (they inject faults with
``hubfast.testing.faults``). Standard library only: importing it never imports hubfast's
native module or TensorFlow.

Protocol (as tfhub.dev and GCS behave)::

    GET /google/model/1?tf-hub-format=compressed  -> 200, the archive
    GET /google/model/1?tf-hub-format=uncompressed -> 303, body "gs://bucket/path" (no Location)
    GET /google/model/1                            -> 200, a small HTML model page
    GET /bucket/model.tar.gz                       -> 200, the archive (direct archive URL)

Archive responses carry ``Content-Length``, a quoted ``ETag``, ``Last-Modified``,
``Accept-Ranges: bytes`` and ``x-goog-hash: crc32c=<b64>,md5=<b64>`` describing the whole object
(also on 206). ``HEAD``, single ``Range`` (``a-b``, ``a-``, ``-n``; 416 when unsatisfiable) and
``If-Range`` are honoured; several ranges in one request get the whole object (200).

Example::

    with TFHubServer() as server:
        server.add_archive("/google/model/1", tar_gz_bytes)
        server.inject("/google/model/1", Fault.status(503, retry_after=1))
        url = server.url_for("/google/model/1")   # a handle
        ...
        assert server.stats.path("/google/model/1").archive_gets == 1

Faults (``hubfast.testing.faults.Fault``) are queued per URL path with
:meth:`TFHubServer.inject` and apply to the next GET requests of that path, first in first out.

Digests (``hubfast.digests``) are computed lazily, once per object, and cached by content.
For large benchmark files without an accelerated CRC32C backend (``hubfast.crc32c``) pass
``goog_hash="md5"`` or ``"none"``, or precomputed ``digests=``.
"""

from __future__ import annotations

import collections
import copy
import email.utils
import hashlib
import html
import http.server
import logging
import os
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

from .digests import Digests, Source, compute_digests, file_key, goog_hash_header

if TYPE_CHECKING:
    from .testing.faults import Fault

__all__ = ["TFHubServer", "PathStats", "RequestRecord", "ServerStats", "serve_forever", "ARCHIVE_SUFFIXES"]

_log = logging.getLogger("hubfast.server")

#: Paths ending in one of these are served without the ``tf-hub-format`` query.
ARCHIVE_SUFFIXES: Tuple[str, ...] = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")

_CHUNK = 1 << 20  # body slice when nothing slows the response down
_THROTTLED_SLICE = 64 << 10  # body slice under a bandwidth cap
_SENDFILE_PIECE = 8 << 20  # one sendfile() call; the stop flag is checked between pieces


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass
class PathStats:
    """Counters for one URL path (or for all of them)."""

    requests: Dict[str, int] = field(default_factory=dict)  # by method
    statuses: Dict[int, int] = field(default_factory=dict)  # by status code sent
    body_bytes: int = 0  # object body bytes written to sockets (archives and directory files)
    archive_gets: int = 0  # GETs answered with an object body (200 or 206)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def gets(self) -> int:
        return self.requests.get("GET", 0)

    @property
    def heads(self) -> int:
        return self.requests.get("HEAD", 0)


@dataclass
class RequestRecord:
    """One request as the server saw it."""

    method: str
    path: str  # decoded URL path, without the query
    query: str  # raw query string
    headers: Dict[str, str]  # every request header, names lower-cased
    client: Tuple[str, int]
    connection: int  # serial number of the TCP connection (same value: keep-alive reuse)
    time: float
    status: Optional[int] = None
    fault: Optional[str] = None

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())

    @property
    def range(self) -> Optional[str]:
        return self.headers.get("range")

    @property
    def if_range(self) -> Optional[str]:
        return self.headers.get("if-range")

    @property
    def authorization(self) -> Optional[str]:
        return self.headers.get("authorization")

    @property
    def user_agent(self) -> Optional[str]:
        return self.headers.get("user-agent")


@dataclass
class ServerStats:
    """A consistent snapshot of the server's counters (``TFHubServer.stats``)."""

    total: PathStats = field(default_factory=PathStats)
    paths: Dict[str, PathStats] = field(default_factory=dict)
    log: List[RequestRecord] = field(default_factory=list)
    connections: int = 0  # TCP connections accepted

    def path(self, path: str) -> PathStats:
        """Counters of one path (all zero if it was never requested)."""
        return self.paths.get(_norm_path(path), PathStats())

    def requests_for(self, path: str) -> List[RequestRecord]:
        p = _norm_path(path)
        return [r for r in self.log if r.path == p]

    @property
    def requests(self) -> Dict[str, int]:
        return self.total.requests

    @property
    def body_bytes(self) -> int:
        return self.total.body_bytes

    @property
    def archive_gets(self) -> int:
        return self.total.archive_gets


# --------------------------------------------------------------------------------------------
# Served content
# --------------------------------------------------------------------------------------------


def _norm_path(path: str) -> str:
    return path if path.startswith("/") else "/" + path


def _is_archive_path(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def _guess_content_type(path: str, head: bytes) -> str:
    lower = path.lower()
    if lower.endswith((".gz", ".tgz")) or head[:2] == b"\x1f\x8b":
        return "application/gzip"
    if lower.endswith(".zst") or head[:4] == b"\x28\xb5\x2f\xfd":
        return "application/zstd"
    if lower.endswith(".bz2") or head[:3] == b"BZh":
        return "application/x-bzip2"
    if lower.endswith(".xz") or head[:6] == b"\xfd7zXZ\x00":
        return "application/x-xz"
    if lower.endswith(".tar") or head[257:262] == b"ustar":
        return "application/x-tar"
    return "application/octet-stream"


_GOOG_HASH_MODES = ("both", "crc32c", "md5", "none")


class _Object:
    """Bytes in memory or a file on disk, with lazily computed digests."""

    def __init__(
        self,
        path: str,
        data: Source,
        *,
        direct: bool,
        uncompressed_location: Optional[str] = None,
        goog_hash: str = "both",
        digests: Union[Digests, Mapping[str, object], None] = None,
        content_type: Optional[str] = None,
        last_modified: Optional[float] = None,
        split_goog_hash: bool = False,
    ) -> None:
        if goog_hash not in _GOOG_HASH_MODES:
            raise ValueError(f"goog_hash must be one of {_GOOG_HASH_MODES}")
        self.path = path
        self.direct = direct
        self.goog_hash = goog_hash
        self.split_goog_hash = split_goog_hash
        self.uncompressed_location = uncompressed_location or (
            "gs://tfhub-modules/" + path.lstrip("/") + "/uncompressed"
        )
        self.data: Optional[bytes] = None
        self.file: Optional[str] = None
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.data = bytes(data)
            self.size = len(self.data)
            head = self.data[:512]
            self.mtime = float(int(last_modified if last_modified is not None else time.time()))
            self._stat_key: Optional[Tuple[object, ...]] = None
        else:
            self.file = os.fspath(data)
            st = os.stat(self.file)
            self.size = st.st_size
            with open(self.file, "rb") as f:
                head = f.read(512)
            self.mtime = float(int(last_modified if last_modified is not None else st.st_mtime))
            self._stat_key = file_key(self.file)
        self.content_type = content_type or _guess_content_type(path, head)
        given = Digests.coerce(digests)
        self._digests = Digests(size=self.size).merged(given)
        self._lock = threading.Lock()

    def _etag_from_md5(self) -> bool:
        return self.data is not None or self._digests.md5 is not None or self.goog_hash in ("both", "md5")

    def digests(self) -> Digests:
        """Digests needed for the headers, computed once (outside the server lock)."""
        with self._lock:
            want_md5 = self._etag_from_md5()
            want_crc = self.goog_hash in ("both", "crc32c")
            need_md5 = want_md5 and self._digests.md5 is None
            need_crc = want_crc and self._digests.crc32c is None
            if need_md5 or need_crc:
                source: Source = self.data if self.data is not None else self.file  # type: ignore[assignment]
                computed = compute_digests(source, md5=need_md5, crc32c=need_crc)
                self._digests = self._digests.merged(computed)
            return self._digests

    def etag(self) -> str:
        d = self.digests()
        if d.md5 is not None and self._etag_from_md5():
            return '"' + d.md5.hex() + '"'
        # A file served without md5: derive the tag from its identity, not its bytes.
        return '"' + hashlib.sha1(repr(self._stat_key).encode()).hexdigest()[:32] + '"'

    def goog_hash_values(self) -> List[str]:
        return goog_hash_header(self.digests(), self.goog_hash)

    def pieces(self, start: int, length: int, piece: int) -> Iterator[Union[bytes, memoryview]]:
        """The bytes [start, start+length) in slices of at most ``piece`` bytes."""
        if self.data is not None:
            mv = memoryview(self.data)
            end = start + length
            for off in range(start, end, piece):
                yield mv[off : min(off + piece, end)]
            return
        assert self.file is not None
        with open(self.file, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(piece, remaining))
                if not chunk:
                    raise _Abort()  # the file shrank under us: cut the response
                remaining -= len(chunk)
                yield chunk


@dataclass
class _Redirect:
    target: str
    status: int
    keep_query: bool


@dataclass
class _Directory:
    prefix: str
    root: str
    options: Dict[str, object]


class _Abort(Exception):
    """Close the connection now, without sending anything more."""

    def __init__(self, reset: bool = False) -> None:
        super().__init__("abort")
        self.reset = reset


class _Throttle:
    """Token bucket: ``rate`` bytes/s with a burst of ``burst`` bytes."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    @staticmethod
    def slice_for(rate: float) -> int:
        # Small enough that a slow rate still sends every ~50 ms.
        return int(max(1, min(_THROTTLED_SLICE, rate / 20)))

    def consume(self, n: int, stop: threading.Event) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0 and stop.wait(-self.tokens / self.rate):
            raise _Abort()


class _SharedThrottle(_Throttle):
    """One token bucket for every connection: a link of ``rate`` bytes/s in all (each
    connection pays for its bytes in turn and waits for its own debt)."""

    def __init__(self, rate: float, burst: int) -> None:
        super().__init__(rate, burst)
        self._lock = threading.Lock()

    def consume(self, n: int, stop: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            debt = -self.tokens
        if debt > 0 and stop.wait(debt / self.rate):
            raise _Abort()


_MODEL_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1>
<p>This is a model page, not a model. To download the model, request
<code>{path}?tf-hub-format=compressed</code>.</p>
</body></html>
"""


# --------------------------------------------------------------------------------------------
# HTTP machinery
# --------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubfast-testing/1.0"
    server: "_HTTPServer"

    def __init__(
        self,
        request: socket.socket,
        client_address: Tuple[str, int],
        server: "_HTTPServer",
        conn_id: int = 0,
    ) -> None:
        self._conn_id = conn_id
        self._reset = False  # close with RST instead of FIN
        self._record: Optional[RequestRecord] = None
        super().__init__(request, client_address, server)  # handles the whole connection

    def setup(self) -> None:
        hub = self.server.hub
        self.timeout = hub.timeout  # StreamRequestHandler applies it to the socket
        super().setup()
        self._throttle: Optional[_Throttle] = None
        if hub.bandwidth:
            self._throttle = _Throttle(hub.bandwidth, _Throttle.slice_for(hub.bandwidth))
        elif hub._link is not None:
            self._throttle = hub._link

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        _log.debug("%s %s", self.address_string(), format % args)

    def handle(self) -> None:
        hub = self.server.hub
        try:
            while True:
                self._record = None  # a malformed request must not update the previous record
                self.close_connection = True
                self.handle_one_request()
                if self.close_connection or hub._stop_event.is_set():
                    break
        except _Abort as abort:
            self.close_connection = True
            self._reset = abort.reset
        except (OSError, ssl.SSLError) as exc:  # client went away, timeouts, TLS errors
            self.close_connection = True
            _log.debug("connection %s: %r", self.client_address, exc)

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        if self._record is not None:
            self.server.hub._note_status(self._record, code)
        super().send_response(code, message)

    # Methods ---------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def _not_allowed(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        self._record = self.server.hub._begin_request(
            self.command,
            urllib.parse.unquote(split.path or "/"),
            split.query,
            self.headers,
            self.client_address,
            self._conn_id,
        )
        self.close_connection = True  # we do not read request bodies
        extra = [("Allow", "GET, HEAD"), ("Connection", "close")]
        self._send_simple(self.command, 405, b"method not allowed\n", extra=extra)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    # Routing ---------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path or "/")
        query = split.query
        self._record = hub._begin_request(
            method, path, query, self.headers, self.client_address, self._conn_id
        )
        fault = hub._take_fault(path) if method == "GET" else None
        if fault is not None:
            self._record.fault = fault.describe()
            if fault.delay_s > 0 and hub._stop_event.wait(fault.delay_s):
                raise _Abort()
            if fault.code is not None:
                extra = list(fault.extra_headers)
                if fault.retry_after is not None:
                    extra.append(("Retry-After", fault.retry_after))
                body = fault.body
                if body is None:
                    body = f"{fault.code} {self.responses.get(fault.code, ('Error',))[0]}\n".encode()
                self._send_simple(method, fault.code, body, extra=extra)
                return

        route = hub._route(path)
        if route is None:
            self._send_simple(method, 404, b"not found\n")
        elif isinstance(route, _Redirect):
            target = route.target
            if route.keep_query and query:
                target += ("&" if "?" in target else "?") + query
            self._send_simple(method, route.status, b"", extra=[("Location", target)])
        elif route.direct:
            self._serve_object(method, path, route, fault)
        else:
            formats = set()
            for value in urllib.parse.parse_qs(query, keep_blank_values=True).get("tf-hub-format", []):
                formats.update(v.strip() for v in value.split(","))
            if "compressed" in formats:
                self._serve_object(method, path, route, fault)
            elif "uncompressed" in formats:
                # tensorflow_hub reads the gs:// location from the body of the 303; no Location.
                location = route.uncompressed_location.encode()
                self._send_simple(method, 303, location, content_type="text/plain")
            elif formats:
                self._send_simple(method, 400, b"unsupported tf-hub-format\n")
            elif _is_archive_path(path):
                self._serve_object(method, path, route, fault)
            else:
                title = html.escape(path)
                page = _MODEL_PAGE.format(title=title, path=title).encode()
                self._send_simple(method, 200, page, content_type="text/html; charset=utf-8")

    def _send_simple(
        self,
        method: str,
        code: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        extra: Optional[List[Tuple[str, str]]] = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra or []:
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    # Objects ---------------------------------------------------------------------------------

    def _if_range_matches(self, if_range: str, etag: str, mtime: float) -> bool:
        value = if_range.strip()
        if value.startswith(('"', "W/")):
            return value == etag  # strong comparison: a weak tag never matches
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return False
        return when is not None and int(when.timestamp()) == int(mtime)

    def _serve_object(self, method: str, path: str, obj: _Object, fault: Optional[Fault]) -> None:
        hub = self.server.hub
        etag = obj.etag()
        goog = obj.goog_hash_values()
        last_modified = email.utils.formatdate(obj.mtime, usegmt=True)
        if fault is not None and fault.other_data is not None:
            # Another version under the same validators (its own digests would differ).
            obj = _Object(path, fault.other_data, direct=False, goog_hash="none", last_modified=obj.mtime,
                          content_type=obj.content_type)
            goog = []
        size = obj.size
        omit = set(fault.omit_headers) if fault is not None else set()

        rng: Optional[Tuple[int, int]] = None
        range_header = self.headers.get("Range")
        if range_header is not None and not (fault is not None and fault.no_range):
            if_range = self.headers.get("If-Range")
            if if_range is None or self._if_range_matches(if_range, etag, obj.mtime):
                parsed = _parse_range(range_header, size)
                if parsed == "unsatisfiable":
                    self._send_simple(
                        method, 416, b"", extra=[("Content-Range", f"bytes */{size}"), ("ETag", etag)]
                    )
                    return
                rng = parsed if isinstance(parsed, tuple) else None

        start, end = rng if rng is not None else (0, size - 1)
        status = 206 if rng is not None else 200
        body_len = end - start + 1 if size else 0
        content_length = body_len
        close_after = False
        garbage = b""
        if fault is not None:
            if fault.truncate_to is not None and fault.truncate_to < body_len:
                body_len = max(0, fault.truncate_to)
                content_length = body_len
                end = start + body_len - 1
            if fault.length_delta:
                content_length = max(0, body_len + fault.length_delta)
                body_len = min(body_len, content_length)
                close_after = True
            garbage = fault.garbage_bytes
            content_length += len(garbage)

        self.send_response(status)
        self.send_header("Content-Type", obj.content_type)
        endless = fault is not None and fault.endless_upto > 0
        if not endless:  # endless: the body ends when the connection does
            self.send_header("Content-Length", str(content_length))
        if "etag" not in omit:
            self.send_header("ETag", "W/" + etag if fault is not None and fault.weak else etag)
        if "last-modified" not in omit:
            self.send_header("Last-Modified", last_modified)
        self.send_header("Accept-Ranges", "bytes")
        if goog:
            if obj.split_goog_hash:
                for value in goog:
                    self.send_header("x-goog-hash", value)
            else:
                self.send_header("x-goog-hash", ",".join(goog))
        self.send_header("x-goog-stored-content-length", str(size))
        if status == 206:
            content_range = f"bytes {start}-{end}/{size}"
            if fault is not None and fault.content_range_value is not None:
                content_range = fault.content_range_value
            elif fault is not None and fault.content_range_shift:
                s = fault.content_range_shift
                content_range = f"bytes {start + s}-{end + s}/{size}"
            self.send_header("Content-Range", content_range)
        self.end_headers()
        if method == "HEAD":
            return

        hub._count_archive_get(path)
        if fault is not None and fault.close_headers:
            raise _Abort()
        self._send_body(path, obj, start, body_len, fault)
        if garbage:
            self._write(path, garbage)
        if endless:
            assert fault is not None
            fill = fault.endless_fill * max(1, _CHUNK // len(fault.endless_fill))
            left = fault.endless_upto
            while left > 0 and not self.server.hub._stop_event.is_set():
                self._write(path, fill[:left])
                left -= min(left, len(fill))
        if close_after or endless:
            raise _Abort()

    def _send_body(self, path: str, obj: _Object, start: int, length: int, fault: Optional[Fault]) -> None:
        hub = self.server.hub
        stop = hub._stop_event
        throttle = self._throttle
        if fault is not None and fault.drip_rate is not None:
            throttle = _Throttle(fault.drip_rate, _Throttle.slice_for(fault.drip_rate))
        drop_at = fault.drop_at if fault is not None else None
        stall_at = fault.stall_at if fault is not None else None
        hold_at = None
        if fault is not None and fault.hold_at is not None:
            hold_at = max(0, min(fault.hold_at, length - 1))  # some body is left to send
        flip_at = None
        if fault is not None and fault.flip_at is not None and start <= fault.flip_at < start + length:
            flip_at = fault.flip_at - start  # body coordinates

        if (
            drop_at is None
            and stall_at is None
            and hold_at is None
            and flip_at is None
            and obj.file is not None
            and not isinstance(self.connection, ssl.SSLSocket)
        ):
            # A capped connection too: sendfile() per slice costs the server a fraction of
            # reading and sending each slice from Python, CPU that the client under test
            # shares on this machine (a real server's is elsewhere).
            self._sendfile(path, obj.file, start, length, throttle)
            return

        piece = _Throttle.slice_for(throttle.rate) if throttle is not None else _CHUNK
        sent = 0
        for chunk in obj.pieces(start, length, piece):
            pos = 0
            while pos < len(chunk):
                if stall_at is not None and sent >= stall_at:
                    stall_at = None
                    if stop.wait(fault.stall_s if fault else 0) or (fault is not None and fault.stall_close):
                        raise _Abort()
                if drop_at is not None and sent >= drop_at:
                    raise _Abort(reset=fault.drop_reset if fault else False)
                if hold_at is not None and sent >= hold_at:
                    hold_at = None
                    assert fault is not None and fault.hold_release is not None
                    if fault.hold_reached is not None:
                        fault.hold_reached.set()
                    while not fault.hold_release.wait(0.05):
                        if stop.is_set():
                            raise _Abort()
                take = len(chunk) - pos
                for event in (stall_at, drop_at, hold_at):
                    if event is not None and event > sent:
                        take = min(take, event - sent)
                out: Union[bytes, memoryview, bytearray] = chunk[pos : pos + take]
                if flip_at is not None and sent <= flip_at < sent + take:
                    out = bytearray(out)
                    out[flip_at - sent] ^= 0xFF
                if throttle is not None:
                    throttle.consume(len(out), stop)
                self._write(path, out)
                sent += take
                pos += take
                if stop.is_set():
                    raise _Abort()
        # Events placed exactly at the end of the body.
        if stall_at is not None and sent >= stall_at:
            if stop.wait(fault.stall_s if fault else 0) or (fault is not None and fault.stall_close):
                raise _Abort()
        if drop_at is not None and sent >= drop_at:
            raise _Abort(reset=fault.drop_reset if fault else False)

    def _write(self, path: str, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send body bytes, counting exactly what the socket accepted.

        The count is raised before sending and lowered by what could not be sent, so that a
        client that has read the whole body always sees it in the stats.
        """
        mv = memoryview(data).cast("B")
        hub = self.server.hub
        hub._count_body(path, len(mv))
        sent = 0
        try:
            while sent < len(mv):
                sent += self.connection.send(mv[sent:])
        except BaseException:
            hub._count_body(path, sent - len(mv))
            raise

    def _sendfile(self, path: str, filename: str, start: int, length: int,
                  throttle: Optional[_Throttle] = None) -> None:
        hub = self.server.hub
        # Under a cap: 5 ms of the rate per call (a smooth link, as a client sees a real
        # one: bursts of 20 ms quantised its view), at least the slice of the read path.
        piece = (max(_Throttle.slice_for(throttle.rate), int(min(throttle.rate / 200, 1 << 20)))
                 if throttle is not None else _SENDFILE_PIECE)
        with open(filename, "rb") as f:
            offset = start
            remaining = length
            # The first piece is what the bucket holds: a capped link's first bytes come at
            # once, not after a 1 MB piece's worth of waiting (20 ms at 50 MB/s, which every
            # ranged request paid on top of its transfer).
            first = throttle is not None
            while remaining > 0:
                if hub._stop_event.is_set():
                    raise _Abort()
                count = min(int(throttle.burst) if first and throttle is not None else piece, remaining)
                first = False
                if throttle is not None:
                    throttle.consume(count, hub._stop_event)
                hub._count_body(path, count)  # counted ahead, corrected below (see _write)
                try:
                    done = self.connection.sendfile(f, offset, count)
                except OSError:
                    # socket.sendfile leaves the file position after the bytes it sent.
                    hub._count_body(path, -(count - max(0, f.tell() - offset)))
                    raise
                hub._count_body(path, done - count)
                if done <= 0:
                    raise _Abort()  # the file shrank under us
                offset += done
                remaining -= done


def _parse_range(header: str, size: int) -> Union[Tuple[int, int], str, None]:
    """One ``bytes=`` range -> (start, end) inclusive; "unsatisfiable"; or None to ignore it."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec or "," in spec:
        return None  # other units, syntax errors and multiple ranges: the whole object
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    try:
        if first == "":
            if not last.isdigit():
                return None
            n = int(last)
            if n == 0 or size == 0:
                return "unsatisfiable"
            return (max(0, size - n), size - 1)
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        a = int(first)
        b = int(last) if last else size - 1
    except ValueError:
        return None
    if last and b < a:
        return None
    if a >= size:
        return "unsatisfiable"
    return (a, min(b, size - 1))


class _HTTPServer(socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, hub: "TFHubServer", address: Tuple[str, int], ssl_context: Optional[ssl.SSLContext]
    ) -> None:
        self.hub = hub
        self.ssl_context = ssl_context
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # http.server.HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup; skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]
        _log.debug("error serving %s: %r", client_address, exc)

    def process_request(  # type: ignore[override]
        self, request: socket.socket, client_address: Tuple[str, int]
    ) -> None:
        conn_id = self.hub._new_connection(request)
        thread = threading.Thread(
            target=self._connection_main,
            args=(request, client_address, conn_id),
            name=f"hubfast-testing-conn-{conn_id}",
            daemon=True,
        )
        self.hub._threads_add(thread)
        thread.start()

    def _connection_main(self, request: socket.socket, client_address: Tuple[str, int], conn_id: int) -> None:
        conn: socket.socket = request
        reset = False
        try:
            request.settimeout(self.hub.timeout)
            if self.ssl_context is not None:
                # The handshake runs here, in the connection's thread, under the timeout.
                conn = self.ssl_context.wrap_socket(request, server_side=True)
                self.hub._swap_connection(conn_id, conn)
            handler = _Handler(conn, client_address, self, conn_id)
            reset = handler._reset
        except (OSError, ssl.SSLError) as exc:
            _log.debug("connection %d: %r", conn_id, exc)
        except Exception as exc:  # noqa: BLE001 - a server bug; keep it for the tests to see
            _log.debug("connection %d failed", conn_id, exc_info=True)
            self.hub._errors_add(exc)
        finally:
            self.hub._forget_connection(conn_id)
            try:
                if reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    socket.socket.shutdown(conn, socket.SHUT_WR)
            except OSError:
                pass
            conn.close()
            if conn is not request:
                request.close()
            self.hub._threads_discard(threading.current_thread())


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


TLSArg = Union[Tuple[str, str], ssl.SSLContext, None]


class TFHubServer:
    """HTTP/1.1 server on loopback speaking the TF Hub protocol; see the module docstring.

    ``tls``: ``(certfile, keyfile)``, an ``ssl.SSLContext`` or ``None`` for plain HTTP (tests
    make a throwaway CA with ``hubfast.testing.certs``).
    ``bandwidth``: per-connection cap in bytes/s (token bucket, 64 KiB slices).
    ``total_bandwidth``: a cap in bytes/s on all connections together (a slow link, where
    more connections bring no more bytes); not with ``bandwidth``.
    ``timeout``: every socket read and write gives up after this many seconds.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSArg = None,
        bandwidth: Optional[float] = None,
        *,
        timeout: float = 30.0,
        total_bandwidth: Optional[float] = None,
    ) -> None:
        if bandwidth and total_bandwidth:
            raise ValueError("bandwidth (per connection) and total_bandwidth are exclusive")
        self.host = host
        self.port = port
        self.bandwidth = float(bandwidth) if bandwidth else None
        self._link = (_SharedThrottle(total_bandwidth, _Throttle.slice_for(total_bandwidth))
                      if total_bandwidth else None)
        self.timeout = float(timeout)
        self._ssl_context = self._make_ssl_context(tls)

        self._lock = threading.RLock()
        self._objects: Dict[str, _Object] = {}
        self._redirects: Dict[str, _Redirect] = {}
        self._directories: List[_Directory] = []
        self._faults: Dict[str, Deque[Fault]] = {}
        self._stats = ServerStats()
        self._errors: List[BaseException] = []
        self._conns: Dict[int, socket.socket] = {}
        self._conn_serial = 0
        self._threads: Set[threading.Thread] = set()

        self._stop_event = threading.Event()
        self._httpd: Optional[_HTTPServer] = None
        self._serve_thread: Optional[threading.Thread] = None

    def _make_ssl_context(self, tls: TLSArg) -> Optional[ssl.SSLContext]:
        if tls is None:
            return None
        if isinstance(tls, ssl.SSLContext):
            return tls
        cert, key = tls  # type: ignore[misc]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    # Lifecycle -------------------------------------------------------------------------------

    def start(self) -> "TFHubServer":
        """Bind and serve in a background thread. After ``stop()`` it may start again (same port)."""
        if self._httpd is not None:
            return self
        self._stop_event.clear()
        httpd = _HTTPServer(self, (self.host, self.port), self._ssl_context)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._serve_thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="hubfast-testing-server",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def stop(self, timeout: float = 1.5) -> None:
        """Stop at once: stalls and delays are cut short, open connections are shut down."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stop_event.set()
        httpd.shutdown()
        if self._serve_thread is not None:
            self._serve_thread.join()
        with self._lock:
            conns = list(self._conns.values())
            threads = list(self._threads)
        for conn in conns:
            try:
                # The plain-socket call, also for TLS sockets: it wakes a blocked reader or writer.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._httpd = None
        self._serve_thread = None

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "TFHubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:PORT`` (valid once started, or when a port was given)."""
        scheme = "https" if self._ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def url_for(self, path: str, query: Optional[str] = None) -> str:
        """The full URL of ``path`` (e.g. a handle), with an optional raw query string."""
        url = self.url + urllib.parse.quote(_norm_path(path))
        return url + ("?" + query if query else "")

    # Content ---------------------------------------------------------------------------------

    def add_archive(
        self,
        path: str,
        data: Source,
        *,
        uncompressed_location: Optional[str] = None,
        goog_hash: str = "both",
        digests: Union[Digests, Mapping[str, object], None] = None,
        content_type: Optional[str] = None,
        last_modified: Optional[float] = None,
        split_goog_hash: bool = False,
    ) -> None:
        """Serve ``data`` (bytes, or a file path streamed from disk) at URL path ``path``.

        ``?tf-hub-format=compressed`` returns it; so does a plain GET when ``path`` ends in an
        archive suffix. ``?tf-hub-format=uncompressed`` answers 303 with ``uncompressed_location``
        (default ``gs://tfhub-modules/<path>/uncompressed``) in the body.
        ``goog_hash``: which digests ``x-goog-hash`` advertises (both, crc32c, md5, none).
        ``digests``: precomputed ``{"md5": bytes, "crc32c": int}`` trusted as-is (so a wrong
        value simulates a server advertising a bad hash). ``split_goog_hash``: one
        ``x-goog-hash`` header per digest instead of one comma-joined header.
        """
        p = _norm_path(path)
        obj = _Object(
            p,
            data,
            direct=False,
            uncompressed_location=uncompressed_location,
            goog_hash=goog_hash,
            digests=digests,
            content_type=content_type,
            last_modified=last_modified,
            split_goog_hash=split_goog_hash,
        )
        with self._lock:
            self._redirects.pop(p, None)
            self._objects[p] = obj

    def set_object(self, path: str, data: Source, **options: object) -> None:
        """Replace the content of ``path`` (new ETag, Last-Modified moves forward at least 1 s).

        Options not given are kept from the previous registration (see :meth:`add_archive`).
        """
        p = _norm_path(path)
        with self._lock:
            old = self._objects.get(p)
        if old is not None:
            options.setdefault("uncompressed_location", old.uncompressed_location)
            options.setdefault("goog_hash", old.goog_hash)
            options.setdefault("split_goog_hash", old.split_goog_hash)
            options.setdefault("last_modified", max(time.time(), old.mtime + 1))
        self.add_archive(p, data, **options)  # type: ignore[arg-type]

    def add_file(self, path: str, data: Source, content_type: Optional[str] = None) -> None:
        """Serve ``data`` as is at ``path`` (any query), e.g. a published ``.torrent``."""
        p = _norm_path(path)
        obj = _Object(p, data, direct=True, goog_hash="none", content_type=content_type)
        with self._lock:
            self._redirects.pop(p, None)
            self._objects[p] = obj

    def add_redirect(
        self, path: str, target_url: str, status: int = 302, *, keep_query: bool = False
    ) -> None:
        """Answer requests for ``path`` with ``status`` and ``Location: target_url``.

        With ``keep_query`` the request's query string is appended to the target.
        """
        p = _norm_path(path)
        with self._lock:
            self._objects.pop(p, None)
            self._redirects[p] = _Redirect(target_url, status, keep_query)

    def add_directory(self, prefix: str, dirpath: Union[str, "os.PathLike[str]"], **options: object) -> None:
        """Serve every regular file under ``dirpath`` at ``prefix/<relative path>``.

        Files are served directly (no query needed); ``options`` as for :meth:`add_archive`
        (``goog_hash``, ``split_goog_hash``, ``content_type``). Paths leaving ``dirpath`` are 404.
        """
        p = _norm_path(prefix).rstrip("/")
        root = os.path.realpath(os.fspath(dirpath))
        if not os.path.isdir(root):
            raise NotADirectoryError(root)
        with self._lock:
            self._directories = [d for d in self._directories if d.prefix != p]
            self._directories.append(_Directory(p, root, dict(options)))
            self._directories.sort(key=lambda d: len(d.prefix), reverse=True)

    def remove(self, path: str) -> None:
        """Forget an archive or redirect at ``path`` (later requests get 404)."""
        p = _norm_path(path)
        with self._lock:
            self._objects.pop(p, None)
            self._redirects.pop(p, None)

    def precompute_digests(self, path: Optional[str] = None) -> None:
        """Compute the digests of one archive (or all) now rather than on the first request."""
        with self._lock:
            objs = [self._objects[_norm_path(path)]] if path is not None else list(self._objects.values())
        for obj in objs:
            obj.digests()

    def digests(self, path: str) -> Digests:
        """The digests the server advertises for the archive at ``path``."""
        with self._lock:
            obj = self._objects[_norm_path(path)]
        return obj.digests()

    def _route(self, path: str) -> Union[_Object, _Redirect, None]:
        with self._lock:
            if path in self._redirects:
                return self._redirects[path]
            if path in self._objects:
                return self._objects[path]
            directories = list(self._directories)
        for d in directories:
            if d.prefix and not (path == d.prefix or path.startswith(d.prefix + "/")):
                continue
            rel = path[len(d.prefix) :].lstrip("/")
            parts = rel.split("/")
            if not rel or any(part in ("", ".", "..") for part in parts) or "\x00" in rel:
                return None
            full = os.path.realpath(os.path.join(d.root, *parts))
            if not full.startswith(d.root + os.sep) or not os.path.isfile(full):
                return None
            return _Object(path, full, direct=True, **d.options)  # type: ignore[arg-type]
        return None

    # Faults ----------------------------------------------------------------------------------

    def inject(self, path: str, fault: Fault, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` GET requests of ``path`` (after faults queued
        before it); then the path is served normally again."""
        if times < 1:
            return
        with self._lock:
            queue = self._faults.setdefault(_norm_path(path), collections.deque())
            queue.extend([fault] * times)

    def clear_faults(self, path: Optional[str] = None) -> None:
        with self._lock:
            if path is None:
                self._faults.clear()
            else:
                self._faults.pop(_norm_path(path), None)

    def pending_faults(self, path: str) -> int:
        """How many queued faults ``path`` has left."""
        with self._lock:
            return len(self._faults.get(_norm_path(path), ()))

    def _take_fault(self, path: str) -> Optional[Fault]:
        with self._lock:
            queue = self._faults.get(path)
            if not queue:
                return None
            return queue.popleft()

    # Statistics ------------------------------------------------------------------------------

    @property
    def stats(self) -> ServerStats:
        """A snapshot of the counters and of the request log."""
        with self._lock:
            return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = ServerStats()

    @property
    def errors(self) -> List[BaseException]:
        """Unexpected exceptions raised while serving (server bugs, not client disconnects)."""
        with self._lock:
            return list(self._errors)

    def _path_stats(self, path: str) -> PathStats:
        ps = self._stats.paths.get(path)
        if ps is None:
            ps = self._stats.paths[path] = PathStats()
        return ps

    def _begin_request(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        client: Tuple[str, int],
        conn_id: int,
    ) -> RequestRecord:
        hdrs: Dict[str, str] = {}
        for name, value in headers.items():
            key = name.lower()
            hdrs[key] = hdrs[key] + ", " + value if key in hdrs else value
        record = RequestRecord(method, path, query, hdrs, (client[0], client[1]), conn_id, time.time())
        with self._lock:
            for ps in (self._stats.total, self._path_stats(path)):
                ps.requests[method] = ps.requests.get(method, 0) + 1
            self._stats.log.append(record)
        return record

    def _note_status(self, record: RequestRecord, code: int) -> None:
        with self._lock:
            record.status = code
            for ps in (self._stats.total, self._path_stats(record.path)):
                ps.statuses[code] = ps.statuses.get(code, 0) + 1

    def _count_body(self, path: str, n: int) -> None:
        with self._lock:
            self._stats.total.body_bytes += n
            self._path_stats(path).body_bytes += n

    def _count_archive_get(self, path: str) -> None:
        with self._lock:
            self._stats.total.archive_gets += 1
            self._path_stats(path).archive_gets += 1

    def _errors_add(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    # Connections -----------------------------------------------------------------------------

    def _new_connection(self, sock: socket.socket) -> int:
        with self._lock:
            self._conn_serial += 1
            self._stats.connections += 1
            self._conns[self._conn_serial] = sock
            return self._conn_serial

    def _swap_connection(self, conn_id: int, sock: socket.socket) -> None:
        with self._lock:
            if conn_id in self._conns:
                self._conns[conn_id] = sock
        if self._stop_event.is_set():  # stop() may have missed the new socket
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def _forget_connection(self, conn_id: int) -> None:
        with self._lock:
            self._conns.pop(conn_id, None)

    def _threads_add(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.add(thread)

    def _threads_discard(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.discard(thread)



# --------------------------------------------------------------------------------------------
# Serving until stopped
# --------------------------------------------------------------------------------------------


def serve_forever(
    source: Union[str, "os.PathLike[str]"],
    *,
    path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TLSArg = None,
    bandwidth: Optional[float] = None,
    goog_hash: str = "both",
    ready: Optional[Callable[[TFHubServer], None]] = None,
    stop_event: Optional[threading.Event] = None,
) -> None:
    """Serve a directory or one archive until ``stop_event`` is set (or KeyboardInterrupt).

    A directory is served under ``path`` (default ``/``); a file at ``path`` (default
    ``/<file name>``). ``ready(server)`` is called once the server listens.
    """
    src = os.fspath(source)
    server = TFHubServer(host, port, tls=tls, bandwidth=bandwidth)
    if os.path.isdir(src):
        server.add_directory(path or "/", src, goog_hash=goog_hash)
    else:
        server.add_archive(path or "/" + os.path.basename(src), src, goog_hash=goog_hash)
    stop = stop_event or threading.Event()
    server.start()
    try:
        if ready is not None:
            ready(server)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
