"""Fault injection for hubfast's server: each Fault describes one misbehaviour of one GET
request; queue them with ``TFHubServer.inject(path, fault)``."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

__all__ = ["Fault"]

@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour, applied to one GET request. Build it with the class methods;
    combine several with ``|`` (e.g. ``Fault.delay(1) | Fault.drop(100)``).

    Offsets for ``drop``, ``stall`` and ``truncate`` count body bytes of that response; the
    ``flip`` offset is a position in the object, so the same object byte is corrupted whatever
    range the client asks for (no effect when it lies outside the range served).

    - ``Fault.status(code, retry_after=None, body=None, headers=None)``: answer with that status
      (e.g. 500, 503, 429, 404, 403, 408), optionally with ``Retry-After``, instead of the content.
    - ``Fault.delay(seconds)``: wait before sending the headers, then serve normally.
    - ``Fault.drop(after, reset=False)``: close the connection after ``after`` body bytes (RST
      instead of FIN with ``reset=True``); ``Content-Length`` announces the full body.
    - ``Fault.stall(after, seconds, then="continue"|"close")``: stop sending after ``after``
      body bytes for ``seconds``, then continue or close.
    - ``Fault.hold(after, release, reached=None)``: stop sending after ``after`` body bytes
      (at most all but the last byte of the body) until the ``threading.Event`` ``release`` is
      set (or the server stops), then continue; ``reached`` is set when the hold begins. A
      transfer that is in flight for as long as a test needs, however busy the machine.
    - ``Fault.flip(offset)``: XOR 0xFF into the object byte at ``offset``.
    - ``Fault.truncate(n)``: a short object: only the first ``n`` body bytes, with an honest
      ``Content-Length: n`` (and a matching ``Content-Range`` on 206); the connection stays open.
    - ``Fault.lying_length(delta)``: ``Content-Length`` = true length + ``delta``; positive: send
      the true body then close; negative: send only ``Content-Length`` bytes then close.
    - ``Fault.close_after_headers()``: send the headers, then close.
    - ``Fault.slow(rate)``: send the body at ``rate`` bytes/s (overrides the server's cap).
    - ``Fault.wrong_content_range(shift=1, value=None)``: on a 206, announce a ``Content-Range``
      shifted by ``shift`` bytes (or the literal ``value``); the body is the requested range.
    - ``Fault.garbage(n, data=None)``: append ``n`` extra bytes after the body, with
      ``Content-Length`` covering them.
    - ``Fault.ignore_range()``: ignore ``Range`` and answer 200 with the whole object.
    - ``Fault.endless(upto, fill=b"\\0")``: no ``Content-Length``; after the body, ``fill`` over and
      over until ``upto`` bytes more were sent or the client closes (a server that never stops).
    - ``Fault.other_version(data)``: serve ``data`` instead of the object's bytes, under the
      object's own ``ETag`` and ``Last-Modified`` (a server that changed the object without
      changing its validator); combine with ``ignore_range()`` for a 200 to a resume.
    - ``Fault.without_headers(*names)``: leave out these response headers (e.g. ``"ETag"``,
      ``"Last-Modified"``: a server without validators, or a part that lost its validator).
    - ``Fault.weak_etag()``: send the ETag as a weak one (``W/"..."``).

    ``status`` and ``delay`` apply to any path (redirects and 404s included); body faults apply to
    objects. A fault is consumed by the GET that takes it, whether or not it had an effect.
    """

    code: Optional[int] = None
    retry_after: Optional[str] = None
    extra_headers: Tuple[Tuple[str, str], ...] = ()
    body: Optional[bytes] = None
    delay_s: float = 0.0
    drop_at: Optional[int] = None
    drop_reset: bool = False
    stall_at: Optional[int] = None
    stall_s: float = 0.0
    stall_close: bool = False
    flip_at: Optional[int] = None
    truncate_to: Optional[int] = None
    length_delta: int = 0
    close_headers: bool = False
    drip_rate: Optional[float] = None
    content_range_shift: int = 0
    content_range_value: Optional[str] = None
    garbage_bytes: bytes = b""
    no_range: bool = False
    endless_upto: int = 0
    endless_fill: bytes = b"\0"
    other_data: Optional[bytes] = None
    omit_headers: Tuple[str, ...] = ()
    weak: bool = False
    hold_at: Optional[int] = None
    hold_release: Optional[threading.Event] = None
    hold_reached: Optional[threading.Event] = None

    @classmethod
    def status(
        cls,
        code: int,
        retry_after: Union[int, float, str, None] = None,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> "Fault":
        ra = None
        if retry_after is not None:
            ra = retry_after if isinstance(retry_after, str) else str(int(retry_after))
        return cls(code=code, retry_after=ra, body=body, extra_headers=tuple((headers or {}).items()))

    @classmethod
    def delay(cls, seconds: float) -> "Fault":
        return cls(delay_s=float(seconds))

    @classmethod
    def drop(cls, after: int, reset: bool = False) -> "Fault":
        return cls(drop_at=int(after), drop_reset=reset)

    @classmethod
    def stall(cls, after: int, seconds: float, then: str = "continue") -> "Fault":
        if then not in ("continue", "close"):
            raise ValueError("then must be 'continue' or 'close'")
        return cls(stall_at=int(after), stall_s=float(seconds), stall_close=(then == "close"))

    @classmethod
    def hold(cls, after: int, release: threading.Event,
             reached: Optional[threading.Event] = None) -> "Fault":
        return cls(hold_at=int(after), hold_release=release, hold_reached=reached)

    @classmethod
    def flip(cls, offset: int) -> "Fault":
        return cls(flip_at=int(offset))

    @classmethod
    def truncate(cls, n: int) -> "Fault":
        return cls(truncate_to=int(n))

    @classmethod
    def lying_length(cls, delta: int) -> "Fault":
        return cls(length_delta=int(delta))

    @classmethod
    def close_after_headers(cls) -> "Fault":
        return cls(close_headers=True)

    @classmethod
    def slow(cls, rate: float) -> "Fault":
        if rate <= 0:
            raise ValueError("rate must be positive")
        return cls(drip_rate=float(rate))

    @classmethod
    def wrong_content_range(cls, shift: int = 1, value: Optional[str] = None) -> "Fault":
        return cls(content_range_shift=int(shift), content_range_value=value)

    @classmethod
    def garbage(cls, n: int, data: Optional[bytes] = None) -> "Fault":
        if data is None:
            data = (b"GARBAGE!" * (n // 8 + 1))[:n]
        return cls(garbage_bytes=bytes(data[:n]))

    @classmethod
    def ignore_range(cls) -> "Fault":
        return cls(no_range=True)

    @classmethod
    def endless(cls, upto: int, fill: bytes = b"\0") -> "Fault":
        if upto <= 0 or not fill:
            raise ValueError("endless needs upto > 0 and a non-empty fill")
        return cls(endless_upto=int(upto), endless_fill=bytes(fill))

    @classmethod
    def other_version(cls, data: bytes) -> "Fault":
        return cls(other_data=bytes(data))

    @classmethod
    def weak_etag(cls) -> "Fault":
        return cls(weak=True)

    @classmethod
    def without_headers(cls, *names: str) -> "Fault":
        return cls(omit_headers=tuple(n.lower() for n in names))

    def __or__(self, other: "Fault") -> "Fault":
        if not isinstance(other, Fault):
            return NotImplemented
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(other, f.name)
            if value != f.default:
                changes[f.name] = value
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short text such as ``"status=503,retry_after=1"`` for logs and request records."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                if isinstance(value, bytes):
                    parts.append(f"{f.name}={value!r}" if len(value) <= 32 else f"{f.name}=<{len(value)} bytes>")
                else:
                    parts.append(f"{f.name}={value}")
        return ",".join(parts) or "none"
