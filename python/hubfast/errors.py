"""hubfast's exceptions: one class per cause.

Each class also derives from what tensorflow_hub raised in the same situation
(``OSError``, ``ValueError``, ``urllib.error.URLError``/``HTTPError``), so
existing ``except`` clauses keep working. No name shadows a builtin.
"""
from __future__ import annotations

import email.message
import errno as _errno
import http.client
import io
import urllib.error
from typing import Optional

__all__ = [
    "HubfastError",
    "NotFoundError",
    "NetworkError",
    "HTTPStatusError",
    "HTTPNotFoundError",
    "HTTPAccessDeniedError",
    "IntegrityError",
    "UnsafeArchiveError",
    "ArchiveLimitError",
    "DiskFullError",
    "AccessDeniedError",
    "UnsafeCacheError",
    "DownloadTimeoutError",
    "LockTimeoutError",
    "OfflineError",
    "NotAModelError",
]


class HubfastError(Exception):
    """Base class of every error hubfast raises."""


class NotFoundError(HubfastError, FileNotFoundError):
    """The handle, file or URL does not exist (local path, HTTP 404/410)."""

    def __init__(self, message: str, code: int = _errno.ENOENT) -> None:
        FileNotFoundError.__init__(self, code, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


class NetworkError(HubfastError, urllib.error.URLError):
    """The download failed: connection refused or reset, retries exhausted."""

    def __init__(self, message: str, code: int = 0) -> None:
        urllib.error.URLError.__init__(self, message)
        self.args = (message,)
        self.code = code

    def __str__(self) -> str:
        return self.args[0]


class HTTPStatusError(NetworkError, urllib.error.HTTPError):
    """The server answered with an error status (``code``) that retrying won't fix.

    Behaves as urllib's ``HTTPError``: ``code``, ``reason``, ``headers``, ``url``,
    ``getcode()``, and an empty body from ``read()``."""

    def __init__(self, message: str, code: int = 0, url: str = "",
                 headers: Optional[email.message.Message] = None) -> None:
        # HTTPError's constructor sets up the response object its attribute lookups
        # and its printing rely on; skipping it made an uncaught error unprintable.
        urllib.error.HTTPError.__init__(self, url, code, message,
                                        headers if headers is not None else http.client.HTTPMessage(),
                                        io.BytesIO())
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args[0]!r}, code={self.code})"

    def __reduce__(self):  # pickles (multiprocessing) as its own class, message intact
        return (_rebuild, (type(self), self.args[0], self.code, self.url))


def _rebuild(cls: type, message: str, code: int, url: str) -> "HTTPStatusError":
    try:
        e = cls(message, code, url)
    except TypeError:  # subclasses that take (message, code)
        e = cls(message, code)
        e.filename = url
    return e


class IntegrityError(HubfastError, OSError):
    """The archive is corrupt or truncated, or a digest/length does not match.

    Nothing was cached; fetching again usually helps when the cause was the
    network. Persistent failures mean the published archive itself is bad.
    """

    def __init__(self, message: str, code: int = _errno.EIO) -> None:
        OSError.__init__(self, code, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


class UnsafeArchiveError(HubfastError, ValueError):
    """The archive holds a member that could escape the target, or a link, device or FIFO."""


class ArchiveLimitError(UnsafeArchiveError):
    """The archive exceeds a configured limit (size, members, path or header length)."""


class DiskFullError(HubfastError, OSError):
    """No space left where the cache lives. Free space or set TFHUB_CACHE_DIR elsewhere."""

    def __init__(self, message: str, code: int = _errno.ENOSPC) -> None:
        OSError.__init__(self, code, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


class AccessDeniedError(HubfastError, PermissionError):
    """Permission denied: on the cache directory, or by the server (HTTP 401/403)."""

    def __init__(self, message: str, code: int = _errno.EACCES) -> None:
        PermissionError.__init__(self, code, message)
        self.args = (message,)
        self.http_status = code if code >= 100 else None

    def __str__(self) -> str:
        return self.args[0]


class UnsafeCacheError(HubfastError, PermissionError):
    """A cache root, entry or file that another user could have planted or can change.

    hubfast trusts a cache directory only when it is owned by this user or root and
    no one else may write to it (see docs/reliability.md); the message names the
    path, its owner and mode, and the fix: a private TFHUB_CACHE_DIR, or
    HUBFAST_TRUSTED_GROUP for a team cache. Not an AccessDeniedError, so code that
    tolerates a read-only cache does not tolerate this."""

    def __init__(self, message: str, code: int = _errno.EPERM) -> None:
        PermissionError.__init__(self, code, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


class DownloadTimeoutError(NetworkError, TimeoutError):
    """The server stalled or could not be reached within the configured timeouts."""


class LockTimeoutError(HubfastError, TimeoutError):
    """Waiting for another process that downloads the same entry took too long."""

    def __init__(self, message: str, code: int = 0) -> None:
        TimeoutError.__init__(self, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


class HTTPNotFoundError(NotFoundError, HTTPStatusError):
    """HTTP 404/410: the handle or version does not exist on the server."""

    def __init__(self, message: str, code: int = 404) -> None:
        HTTPStatusError.__init__(self, message, code)
        self.errno = _errno.ENOENT
        self.strerror = message


class HTTPAccessDeniedError(AccessDeniedError, HTTPStatusError):
    """HTTP 401/403: credentials missing or not accepted."""

    def __init__(self, message: str, code: int = 403) -> None:
        HTTPStatusError.__init__(self, message, code)
        self.errno = _errno.EACCES
        self.strerror = message
        self.http_status = code


class OfflineError(NotFoundError):
    """HUBFAST_OFFLINE is set and no cache layer holds the handle."""


class NotAModelError(HubfastError, ValueError):
    """The handle's directory holds no SavedModel (neither saved_model.pb nor .pbtxt)."""


def _from_native(kind: str, message: str, code: int) -> BaseException:
    """Builds the exception for an error of the native core (called by _core)."""
    if kind == "cancelled":
        return KeyboardInterrupt(message)
    if kind == "not_found":
        return HTTPNotFoundError(message, code) if code >= 100 else NotFoundError(
            message, code or _errno.ENOENT)
    if kind == "network":
        return NetworkError(message, code)
    if kind == "http":
        return HTTPStatusError(message, code)
    if kind == "integrity":
        return IntegrityError(message)
    if kind == "unsafe_archive":
        return UnsafeArchiveError(message)
    if kind == "limit":
        return ArchiveLimitError(message)
    if kind == "disk_full":
        return DiskFullError(message, code or _errno.ENOSPC)
    if kind == "access_denied":
        return HTTPAccessDeniedError(message, code) if code >= 100 else AccessDeniedError(
            message, code or _errno.EACCES)
    if kind == "unsafe_cache":
        return UnsafeCacheError(message, code or _errno.ELOOP)
    if kind == "timeout":
        return DownloadTimeoutError(message, code)
    if kind == "lock":
        return LockTimeoutError(message)
    if kind == "invalid":
        return ValueError(message)
    return OSError(code or _errno.EIO, message)


def with_context(exc: BaseException, context: str, advice: str = "") -> BaseException:
    """Returns ``exc`` with ``context`` (the handle) before its message and ``advice`` after."""
    if isinstance(exc, HubfastError) and exc.args:
        msg = str(exc.args[0])
        if context not in msg:
            msg = f"{context}: {msg}"
        if advice and advice not in msg:
            msg = f"{msg}; {advice}"
        exc.args = (msg,) + tuple(exc.args[1:])
        if isinstance(exc, OSError):
            exc.strerror = msg
    return exc
