"""Handle -> local model directory. Resolvers are tried newest-registered
first; the first whose ``is_supported(handle)`` is true wins (tensorflow_hub's
registry semantics), and users add their own with ``register_resolver``.

The built-in chain, in the order it is tried (tensorflow_hub 0.16.1's order,
with hubfast's additions marked +):

1. ``HttpCompressedResolver``: ``http(s)://`` handles unless
   ``TFHUB_MODEL_LOAD_FORMAT=UNCOMPRESSED`` (AUTO means COMPRESSED, as in
   tensorflow_hub). Requests the handle with ``tf-hub-format=compressed``
   appended to its query; ``https://hub.tensorflow.google.cn/<path>`` becomes
   ``https://gcs.tensorflow.google.cn/tfhub-modules/<path>.tar.gz``. (+) A URL
   whose path names an archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.zst``...)
   is fetched exactly as given, in any load format, so presigned URLs keep
   their own query. (+) Kaggle credentials for Kaggle handles.
2. ``GcsCompressedResolver``: ``gs://.../*.tar``, ``.tar.gz``, ``.tgz`` (+ the
   other archive suffixes), fetched over HTTPS from the GCS endpoint, with a
   google-auth bearer token when available.
3. ``HttpUncompressedResolver``: ``http(s)://`` handles when the load format is
   UNCOMPRESSED: asks for ``tf-hub-format=uncompressed`` and returns the
   ``gs://`` location from the body of the 303, without caching.
4. (+) ``LocalArchiveResolver``: a local ``.tar.*`` archive or ``file://`` archive,
   extracted once into the cache.
5. ``PathResolver``: anything else is a path used in place (``file://`` URLs
   become local paths; ``gs://`` and other remote file-system paths are
   returned unchanged for TensorFlow to read).

Every cache entry is named ``sha1(handle)`` of the handle as given, like
tensorflow_hub's, whatever URL it is finally fetched from (mirrors and
endpoint overrides, see ``mirrors``), so both libraries share one cache.
Pins (``HUBFAST_PINS``: lines ``<handle> <sha256>``) make the native core check
the archive's SHA-256 before anything is published.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
import urllib.parse
from typing import Dict, List, Optional, Tuple, Union

from . import cache, config, errors, mirrors, paths

Handle = Union[str, "os.PathLike[str]"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.bz2", ".tbz2",
                    ".tar.xz", ".txz")
TFHUB_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # tensorflow_hub's _is_tarfile

# tensorflow_hub's China mirror rule (compressed_module_resolver).
CN_HANDLE_PREFIX = "https://hub.tensorflow.google.cn/"
CN_ARCHIVE_TEMPLATE = "https://gcs.tensorflow.google.cn/tfhub-modules/%s.tar.gz"

LOAD_FORMATS = ("COMPRESSED", "UNCOMPRESSED", "AUTO")


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

    def __repr__(self) -> str:
        return f"_CallableResolver({self._impl!r})"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a built-in resolver will do with a handle (no network, no cache access)."""

    resolver: str
    handle: str
    entry_name: Optional[str]  # cache entry (None: not cached)
    url: str  # what is fetched: a URL after mirrors and overrides, or a local archive path
    sha256: str  # pinned archive digest, "" when not pinned
    headers: Tuple[str, ...] = dataclasses.field(default=(), repr=False)  # credentials

    def public(self) -> Dict[str, object]:
        """The plan without secrets (header values)."""
        d = dataclasses.asdict(self)
        d["headers"] = [h.split(":", 1)[0] for h in self.headers]
        return d


# Pins --------------------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_pins_lock = threading.Lock()
_pins_cache: Optional[Tuple[Tuple[str, int, int], Dict[str, str]]] = None


def _read_pins(path: str) -> Dict[str, str]:
    pins: Dict[str, str] = {}
    with open(path, encoding="utf8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not _SHA256.match(parts[1]):
                raise ValueError(f"{config.PINS_ENV}: {path}:{lineno}: expected "
                                 f"'<handle> <sha256 hex>', got {line!r}")
            pins[parts[0]] = parts[1].lower()
    return pins


def pins(s: Optional[config.Settings] = None) -> Dict[str, str]:
    """The pins file's handle -> sha256 map (re-read when the file changes)."""
    global _pins_cache
    s = s or config.settings()
    if not s.pins_file:
        return {}
    try:
        st = os.stat(s.pins_file)
    except FileNotFoundError:
        raise errors.NotFoundError(f"{config.PINS_ENV}={s.pins_file}: no such file") from None
    key = (s.pins_file, st.st_mtime_ns, st.st_size)
    with _pins_lock:
        if _pins_cache is None or _pins_cache[0] != key:
            _pins_cache = (key, _read_pins(s.pins_file))
        return _pins_cache[1]


def pinned_sha256(handle: str, s: Optional[config.Settings] = None) -> str:
    """The archive SHA-256 the pins file requires for `handle`, or ""."""
    return pins(s).get(handle, "")


def _check_sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"sha256 must be 64 hex digits, not {value!r}")
    return value.lower()


# Helpers -----------------------------------------------------------------------------------


def is_archive_name(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def is_http(handle: str) -> bool:
    return handle.lower().startswith(("http://", "https://"))


def append_format_query(handle: str, value: str) -> str:
    """tensorflow_hub's ``_append_format_query``, exactly: the query is re-encoded and
    ``tf-hub-format=<value>`` appended (blank values are dropped, as there)."""
    parsed = list(urllib.parse.urlparse(handle))
    qsl = urllib.parse.parse_qsl(parsed[4])
    qsl.append(("tf-hub-format", value))
    parsed[4] = urllib.parse.urlencode(qsl)
    return urllib.parse.urlunparse(parsed)


def with_query(url: str, key: str, value: str) -> str:
    """Sets key=value in the URL's query, keeping the rest (blank values included)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k != key] + [(key, value)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def load_format(s: Optional[config.Settings] = None) -> str:
    """TFHUB_MODEL_LOAD_FORMAT, validated; AUTO means COMPRESSED, as in tensorflow_hub."""
    s = s or config.settings()
    if s.load_format not in LOAD_FORMATS:
        raise ValueError(f"{config.LOAD_FORMAT_ENV}={s.load_format!r}: expected one of "
                         f"{', '.join(LOAD_FORMATS)}")
    return s.load_format


def _in_cache(name: Optional[str], s: config.Settings) -> bool:
    """Whether a layer or the cache holds a usable entry `name` (a quiet look)."""
    from . import _core

    if name is None:
        return False
    for root in s.cache_layers + (s.cache_dir,):
        try:
            if _core.lookup_entry(root, name)[0] in ("complete", "foreign"):
                return True
        except OSError:
            continue
    return False


def _with_hint(e: BaseException, hint: str) -> BaseException:
    if e.args and isinstance(e.args[0], str) and hint not in e.args[0]:
        e.args = (f"{e.args[0]}. {hint}",) + tuple(e.args[1:])
    return e


def _fetch(plan: Plan, hint: str = "", s: Optional[config.Settings] = None) -> cache.Entry:
    from . import http

    fetch = http.fetch_options(plan.url, headers=list(plan.headers), settings=s)
    try:
        return cache.fetch_entry(plan.handle, url=plan.url, fetch=fetch,
                                 name=plan.entry_name, sha256=plan.sha256)
    except errors.AccessDeniedError as e:
        if hint:
            raise _with_hint(e, hint)
        raise


# Built-in resolvers ------------------------------------------------------------------------


class _PlannedResolver(Resolver):
    """A built-in resolver: ``plan(handle)`` says what it will fetch; pins apply."""

    supports_pins = True

    def plan(self, handle: str, sha256: Optional[str] = None, *,
             settings: Optional[config.Settings] = None, credentials: bool = True) -> Plan:
        """What resolving `handle` fetches; `credentials=False` leaves the headers out."""
        raise NotImplementedError

    def _pin(self, handle: str, sha256: Optional[str], s: Optional[config.Settings] = None) -> str:
        return _check_sha256(sha256) if sha256 else pinned_sha256(handle, s)


class HttpCompressedResolver(_PlannedResolver):
    """``http(s)://`` handles, fetched as a compressed tarball (tensorflow_hub's
    HttpCompressedFileResolver, and direct archive URLs as they are)."""

    def is_supported(self, handle: str) -> bool:
        if not is_http(handle):
            return False
        if is_archive_name(urllib.parse.urlsplit(handle).path):
            return True
        return config.load_format() != "UNCOMPRESSED"

    def archive_url(self, handle: str) -> str:
        """The URL tensorflow_hub would request, except for direct archive URLs."""
        if handle.startswith(CN_HANDLE_PREFIX):
            return CN_ARCHIVE_TEMPLATE % handle[len(CN_HANDLE_PREFIX):]
        if is_archive_name(urllib.parse.urlsplit(handle).path):
            return handle
        return append_format_query(handle, "compressed")

    def plan(self, handle: str, sha256: Optional[str] = None, *,
             settings: Optional[config.Settings] = None, credentials: bool = True) -> Plan:
        from . import http

        s = settings or config.settings()
        load_format(s)
        url = mirrors.rewrite(self.archive_url(handle), s)
        headers = http.credential_headers(handle, url, s) if credentials else []
        return Plan(type(self).__name__, handle, cache.entry_name(handle), url,
                    self._pin(handle, sha256, s), tuple(headers))

    def resolve_entry(self, handle: str, sha256: Optional[str] = None) -> cache.Entry:
        from . import kaggle

        s = config.settings()
        plan = self.plan(handle, sha256, settings=s)
        return _fetch(plan, kaggle.HINT if kaggle.is_kaggle_handle(handle) else "", s)


class GcsCompressedResolver(_PlannedResolver):
    """``gs://bucket/path/model.tar.gz`` (tensorflow_hub's GcsCompressedFileResolver),
    fetched over HTTPS from ``storage.googleapis.com`` or ``HUBFAST_ENDPOINT_GCS``."""

    def is_supported(self, handle: str) -> bool:
        return handle.startswith("gs://") and is_archive_name(handle)

    def plan(self, handle: str, sha256: Optional[str] = None, *,
             settings: Optional[config.Settings] = None, credentials: bool = True) -> Plan:
        from . import http

        s = settings or config.settings()
        url = mirrors.rewrite(handle, s)
        headers = http.credential_headers(handle, url, s) if credentials else []
        return Plan(type(self).__name__, handle, cache.entry_name(handle), url,
                    self._pin(handle, sha256, s), tuple(headers))

    def resolve_entry(self, handle: str, sha256: Optional[str] = None) -> cache.Entry:
        from . import gcs, http

        s = config.settings()
        plan = self.plan(handle, sha256, settings=s, credentials=False)
        # A token may need a refresh (a network call): only when a download is due.
        if gcs.may_authenticate(handle, plan.url, s) and not _in_cache(plan.entry_name, s):
            plan = dataclasses.replace(
                plan, headers=tuple(http.credential_headers(handle, plan.url, s)))
        return _fetch(plan, gcs.HINT, s)


class UnexpectedResponseError(errors.HTTPStatusError, ValueError):
    """The UNCOMPRESSED lookup did not get a 303 with a ``gs://`` location
    (tensorflow_hub raises ValueError there)."""


class UncompressedNotFoundError(errors.HTTPNotFoundError, ValueError):
    """The UNCOMPRESSED lookup got 404/410."""


class UncompressedAccessDeniedError(errors.HTTPAccessDeniedError, ValueError):
    """The UNCOMPRESSED lookup got 401/403."""


class HttpUncompressedResolver(_PlannedResolver):
    """``TFHUB_MODEL_LOAD_FORMAT=UNCOMPRESSED``: the model is read in place from GCS.

    Requests ``tf-hub-format=uncompressed``; the server answers ``303 See Other``
    with a ``gs://`` location in the body, which is returned without caching.
    """

    supports_pins = False

    def is_supported(self, handle: str) -> bool:
        return is_http(handle) and config.load_format() == "UNCOMPRESSED"

    def plan(self, handle: str, sha256: Optional[str] = None, *,
             settings: Optional[config.Settings] = None, credentials: bool = True) -> Plan:
        from . import http

        s = settings or config.settings()
        url = mirrors.rewrite(append_format_query(handle, "uncompressed"), s)
        headers = http.credential_headers(handle, url, s) if credentials else []
        return Plan(type(self).__name__, handle, None, url, "", tuple(headers))

    def location(self, handle: str) -> str:
        """The ``gs://`` location the server names for `handle`."""
        from . import http, kaggle

        s = config.settings()
        if s.offline:
            raise errors.OfflineError(
                f"{handle}: {config.LOAD_FORMAT_ENV}=UNCOMPRESSED reads the model from GCS, "
                f"which needs the network, and {config.OFFLINE_ENV} is set")
        plan = self.plan(handle, settings=s)
        status, body, where = http.get_without_following(plan.url, list(plan.headers),
                                                         stop_at=(303,), settings=s)
        text = body.decode("utf8", "replace").strip()
        if status == 303 and text.startswith("gs://"):
            return text
        via = plan.url if where == plan.url else f"{plan.url} (redirected to {where})"
        if status == 303:
            raise UnexpectedResponseError(
                f"{handle}: expected a gs:// location in the body of the 303 from {via}, "
                f"got {text[:200]!r}", 303, plan.url)
        msg = (f"{handle}: expected 303 See Other with a gs:// location from {via}, "
               f"got HTTP {status}; unset {config.LOAD_FORMAT_ENV} to download the "
               "compressed model instead")
        if status in (404, 410):
            raise UncompressedNotFoundError(msg, status)
        if status in (401, 403):
            hint = kaggle.HINT if kaggle.is_kaggle_handle(handle) else ""
            raise _with_hint(UncompressedAccessDeniedError(msg, status), hint)
        raise UnexpectedResponseError(msg, status, plan.url)

    def resolve_entry(self, handle: str, sha256: Optional[str] = None) -> cache.Entry:
        return cache.Entry(self.location(handle), None, None)


class LocalArchiveResolver(_PlannedResolver):
    """A local archive (``/m.tar.gz``, ``file:///m.tar.zst``): extracted once into the cache.

    The entry name covers the archive's size and mtime, so a re-exported archive
    at the same path is picked up.
    """

    def is_supported(self, handle: str) -> bool:
        path = paths.local_path(handle)
        if paths.is_file_url(handle):
            return not os.path.isdir(path)
        return is_archive_name(path) and not os.path.isdir(path)

    def plan(self, handle: str, sha256: Optional[str] = None, *,
             settings: Optional[config.Settings] = None, credentials: bool = True) -> Plan:
        # The archive's real path names the entry and its descriptor: `./m.tar.zst` typed in
        # two directories is two archives, and a link to an archive is that archive.
        path = local_archive_handle(handle)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise errors.NotFoundError(f"{handle}: archive {path} does not exist") from None
        except PermissionError:
            raise errors.AccessDeniedError(f"{handle}: archive {path} is not readable by this user") from None
        key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
        name = hashlib.sha1(key.encode("utf8")).hexdigest()
        pin = self._pin(handle, sha256, settings) or (self._pin(path, None, settings) if not sha256 else "")
        return Plan(type(self).__name__, path, name, path, pin)

    def resolve_entry(self, handle: str, sha256: Optional[str] = None) -> cache.Entry:
        plan = self.plan(handle, sha256)
        return cache.fetch_entry(plan.handle, path=plan.url, name=plan.entry_name, sha256=plan.sha256)


def local_archive_handle(handle: str) -> str:
    """A local archive's handle as hubfast records it: its absolute real path."""
    return os.path.realpath(paths.local_path(handle))


# File systems TensorFlow (or tensorflow-io) reads: such paths are used in place.
REMOTE_FS_SCHEMES = ("gs", "s3", "hdfs", "viewfs", "ram", "az", "abfs", "abfss", "oss")


def _is_remote_path(handle: str) -> bool:
    scheme, sep, _ = handle.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_FS_SCHEMES


class PathResolver(_PlannedResolver):
    """Anything else is a directory used in place (tensorflow_hub's last resort).

    ``gs://`` and other remote file-system paths (``s3://``, ``hdfs://``... see
    REMOTE_FS_SCHEMES) are returned unchanged for TensorFlow's file systems to read
    (tensorflow_hub checks them with ``tf.io.gfile.exists`` first; hubfast leaves
    that to the load). Any other handle must exist locally.
    """

    supports_pins = False

    def is_supported(self, handle: str) -> bool:
        return True

    def plan(self, handle: str, sha256: Optional[str] = None, *,
             settings: Optional[config.Settings] = None, credentials: bool = True) -> Plan:
        return Plan(type(self).__name__, handle, None, paths.local_path(handle), "")

    def resolve_entry(self, handle: str, sha256: Optional[str] = None) -> cache.Entry:
        if _is_remote_path(handle):
            return cache.Entry(handle, None, None)
        path = paths.local_path(handle)
        if not os.path.exists(path):
            raise errors.NotFoundError(
                f"{handle} does not exist: not a local directory, and no resolver "
                "(http(s)://, gs://, file://, a .tar.* archive) claims it")
        return cache.Entry(path, None, None)


# The registry ------------------------------------------------------------------------------

_lock = threading.Lock()
_resolvers: List[Resolver] = [HttpCompressedResolver(), GcsCompressedResolver(),
                              HttpUncompressedResolver(), LocalArchiveResolver(), PathResolver()]


def register_resolver(resolver) -> None:
    """Adds a resolver tried before all others (like tensorflow_hub's add_implementation).

    `resolver` is a ``Resolver`` or any object with ``is_supported(handle)`` and
    ``__call__(handle) -> path`` (tensorflow_hub's resolver interface).
    """
    if not isinstance(resolver, Resolver):
        if not (callable(getattr(resolver, "is_supported", None)) and callable(resolver)):
            raise TypeError(f"{resolver!r} needs is_supported(handle) and __call__(handle)")
        resolver = _CallableResolver(resolver)
    with _lock:
        _resolvers.insert(0, resolver)


def unregister_resolver(resolver) -> bool:
    """Removes a resolver added with ``register_resolver`` (the object given there)."""
    with _lock:
        for i, r in enumerate(_resolvers):
            if r is resolver or (isinstance(r, _CallableResolver) and r._impl is resolver):
                del _resolvers[i]
                return True
    return False


def _add_builtin(resolver: Resolver, before: type) -> None:
    """Inserts a built-in resolver ahead of the first one of type `before`."""
    with _lock:
        idx = next(i for i, r in enumerate(_resolvers) if isinstance(r, before))
        _resolvers.insert(idx, resolver)


def chain() -> List[Resolver]:
    """The resolvers in the order they are tried."""
    with _lock:
        return list(_resolvers)


def _normalize(handle: Handle) -> str:
    if isinstance(handle, os.PathLike):
        handle = os.fspath(handle)
    if not isinstance(handle, str):
        raise ValueError(f"Expected a string or os.PathLike handle, got {handle!r}")
    return handle


def resolver_for(handle: Handle) -> Resolver:
    """The resolver that claims `handle`."""
    handle = _normalize(handle)
    for r in chain():
        if r.is_supported(handle):
            return r
    raise errors.NotFoundError(f"{handle}: no resolver supports this handle")


def describe(handle: Handle) -> Dict[str, object]:
    """What resolving `handle` would do, without doing it: resolver, cache entry name,
    the URL fetched (after mirrors and overrides), the pin, credential header names."""
    handle = _normalize(handle)
    r = resolver_for(handle)
    if isinstance(r, _PlannedResolver):
        return r.plan(handle).public()
    return {"resolver": repr(r), "handle": handle, "entry_name": None, "url": None,
            "sha256": "", "headers": []}


def resolve_entry(handle: Handle, *, sha256: Optional[str] = None) -> cache.Entry:
    """Resolves `handle` through the chain. `sha256` pins the archive (overriding the
    pins file); it is an error for handles that are not fetched as archives."""
    handle = _normalize(handle)
    r = resolver_for(handle)
    if sha256 is None:
        return r.resolve_entry(handle)
    if not getattr(r, "supports_pins", False):
        raise ValueError(f"{handle}: sha256= pins an archive, but {type(r).__name__} "
                         "does not fetch one")
    return r.resolve_entry(handle, sha256=sha256)  # type: ignore[call-arg]
