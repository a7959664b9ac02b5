"""Handle -> local model directory. Resolvers are tried newest-registered
first; the first whose ``is_supported(handle)`` is true wins (tensorflow_hub's
registry semantics), and users add their own with ``register_resolver``."""
from __future__ import annotations

import hashlib
import os
import threading
import urllib.parse
import urllib.request
from typing import List, Union

from . import cache, errors

Handle = Union[str, "os.PathLike[str]"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.bz2", ".tbz2",
                    ".tar.xz", ".txz")


class Resolver:
    """Base class: subclasses implement ``is_supported`` and ``resolve_entry``.

    ``__call__`` returns the local directory, like tensorflow_hub's resolvers.
    """

    def is_supported(self, handle: str) -> bool:
        raise NotImplementedError

    def resolve_entry(self, handle: str) -> cache.Entry:
        raise NotImplementedError

    def __call__(self, handle: str) -> str:
        return self.resolve_entry(handle).path


class _CallableResolver(Resolver):
    """Wraps a user's plain resolver object (``is_supported`` + ``__call__``)."""

    def __init__(self, impl) -> None:
        self._impl = impl

    def is_supported(self, handle: str) -> bool:
        return bool(self._impl.is_supported(handle))

    def resolve_entry(self, handle: str) -> cache.Entry:
        return cache.Entry(os.fspath(self._impl(handle)), None, None)


def _local_path(handle: str) -> str:
    if handle.startswith("file://"):
        return urllib.request.url2pathname(urllib.parse.urlparse(handle).path)
    return handle


def is_archive_name(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


class LocalArchiveResolver(Resolver):
    """A local archive (``/m.tar.gz``, ``file:///m.tar.zst``): extracted once into the cache.

    The entry name covers the archive's size and mtime, so a re-exported archive
    at the same path is picked up.
    """

    def is_supported(self, handle: str) -> bool:
        path = _local_path(handle)
        if handle.startswith("file://"):
            return not os.path.isdir(path)
        return is_archive_name(path) and not os.path.isdir(path)

    def resolve_entry(self, handle: str) -> cache.Entry:
        path = os.path.abspath(_local_path(handle))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise errors.NotFoundError(f"{handle}: archive {path} does not exist") from None
        key = f"{handle}\0{st.st_size}\0{st.st_mtime_ns}"
        name = hashlib.sha1(key.encode("utf8")).hexdigest()
        return cache.fetch_entry(handle, path=path, name=name)


def with_query(url: str, key: str, value: str) -> str:
    """Appends key=value to the URL's query, keeping what is there (tensorflow_hub's way)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k != key] + [(key, value)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class HttpCompressedResolver(Resolver):
    """``http(s)://`` handles, fetched as a compressed tarball.

    tensorflow_hub appends ``tf-hub-format=compressed``; a URL that already
    names an archive (``.tar.gz``, ``.tar.zst``...) is fetched as it is, so
    presigned URLs keep their signature.
    """

    def is_supported(self, handle: str) -> bool:
        from . import config

        if not handle.lower().startswith(("http://", "https://")):
            return False
        return config.settings().load_format != "UNCOMPRESSED"

    def archive_url(self, handle: str) -> str:
        if is_archive_name(urllib.parse.urlsplit(handle).path):
            return handle
        return with_query(handle, "tf-hub-format", "compressed")

    def resolve_entry(self, handle: str) -> cache.Entry:
        from . import http

        url = self.archive_url(handle)
        return cache.fetch_entry(handle, url=url, fetch=http.fetch_options(url))


class PathResolver(Resolver):
    """Anything else is a local directory, used in place (tensorflow_hub's last resort)."""

    def is_supported(self, handle: str) -> bool:
        return True

    def resolve_entry(self, handle: str) -> cache.Entry:
        path = _local_path(handle)
        if not os.path.exists(path):
            raise errors.NotFoundError(
                f"{handle} does not exist: not a local directory, and no resolver "
                "(http(s)://, gs://, file://, a .tar.* archive) claims it")
        return cache.Entry(path, None, None)


_lock = threading.Lock()
_resolvers: List[Resolver] = [HttpCompressedResolver(), LocalArchiveResolver(), PathResolver()]


def register_resolver(resolver) -> None:
    """Adds a resolver tried before all others (like tensorflow_hub's add_implementation)."""
    if not isinstance(resolver, Resolver):
        resolver = _CallableResolver(resolver)
    with _lock:
        _resolvers.insert(0, resolver)


def _add_builtin(resolver: Resolver, before: type) -> None:
    """Inserts a built-in resolver ahead of the first one of type `before`."""
    with _lock:
        idx = next(i for i, r in enumerate(_resolvers) if isinstance(r, before))
        _resolvers.insert(idx, resolver)


def chain() -> List[Resolver]:
    """The resolvers in the order they are tried."""
    with _lock:
        return list(_resolvers)


def resolve_entry(handle: Handle) -> cache.Entry:
    if isinstance(handle, os.PathLike):
        handle = os.fspath(handle)
    if not isinstance(handle, str):
        raise ValueError(f"Expected a string or os.PathLike handle, got {handle!r}")
    with _lock:
        chain = list(_resolvers)
    for r in chain:
        if r.is_supported(handle):
            return r.resolve_entry(handle)
    raise errors.NotFoundError(f"{handle}: no resolver supports this handle")
