"""Cache roots and layers, entry names, and the one call that turns a source
into a complete cache entry through the native core."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from typing import Any, Callable, Dict, Iterator, Optional

from . import config, errors, progress, trust
from . import _core

logger = logging.getLogger("hubfast")

_stats_lock = threading.Lock()
_thread = threading.local()  # per-thread cancel event (set by prefetch threads)


# What to do, by cause, appended to errors about the cache directory itself.
_ADVICE = {
    errors.DiskFullError: "free space under {root}, or set TFHUB_CACHE_DIR to a larger disk",
    errors.AccessDeniedError: "{root} is not writable by this user: set TFHUB_CACHE_DIR to a directory "
                              "you can write, or use HUBFAST_CACHE_LAYERS for a read-only cache",
}


def set_cancel_event(event: Optional[threading.Event]) -> None:
    """Makes fetches on this thread stop when `event` is set (signals reach only
    the main thread, so background fetches are cancelled this way)."""
    _thread.cancel = event


def _with_cancel(bar):
    event = getattr(_thread, "cancel", None)
    if event is None:
        return bar

    def poll(bytes_in: int, total_in: int, bytes_out: int) -> None:
        if event.is_set():
            raise KeyboardInterrupt("prefetch cancelled")
        if bar is not None:
            bar(bytes_in, total_in, bytes_out)

    return poll
_last_stats: Dict[str, Any] = {}


def entry_name(handle: str) -> str:
    """tensorflow_hub's entry name: sha1 of the handle exactly as given."""
    return hashlib.sha1(handle.encode("utf8")).hexdigest()


def last_stats() -> Dict[str, Any]:
    """Where the time went in this process's most recent resolve."""
    with _stats_lock:
        return dict(_last_stats)


def _record(stats: Dict[str, Any]) -> None:
    with _stats_lock:
        _last_stats.clear()
        _last_stats.update(stats)


class Entry:
    """A resolved cache entry: its directory, the root and name it lives under, and how to
    resolve it again should it vanish before its use-lock is taken."""

    __slots__ = ("path", "root", "name", "_refresh")

    def __init__(self, path: str, root: Optional[str], name: Optional[str],
                 refresh: Optional[Callable[[], "Entry"]] = None) -> None:
        self.path, self.root, self.name, self._refresh = path, root, name, refresh

    @contextlib.contextmanager
    def in_use(self) -> Iterator[str]:
        """Holds the entry's shared use-lock, so maintenance leaves it alone meanwhile.

        `hubfast rm`/`prune` may remove the entry between resolve() and this lock: then
        it is resolved again (fetched if need be), at most a few times."""
        entry = self
        for _ in range(3):
            if entry.root is None or entry.name is None:
                yield entry.path
                return
            try:
                lock = _core.FileLock.acquire(_core.use_lock_path(entry.root, entry.name),
                                              exclusive=False, timeout=60.0)
            except errors.AccessDeniedError:
                # No use-lock file, and none can be made: a read-only mount, or a layer
                # another user filled (`hubfast fetch` makes one; tensorflow_hub does not).
                # Nobody can modify a read-only layer through hubfast anyway.
                yield entry.path
                return
            try:
                state, path, _ = _core.lookup_entry(entry.root, entry.name)
                if state in ("complete", "foreign"):
                    yield path
                    return
            finally:
                lock.release()
            if entry._refresh is None:
                break
            entry = entry._refresh()
        raise errors.NotFoundError(
            f"{self.path}: the cache entry was removed while it was being opened "
            "(by `hubfast rm`/`prune` or another cleaner); try again")


def _lookup(handle: str, name: str, s: config.Settings, refresh: Callable[[], Entry],
            sha256: str = "") -> Optional[Entry]:
    """The usable entry in a layer or the cache, else None. With a pin, an entry satisfies
    it only when its manifest records that archive digest; offline, one that doesn't is an
    IntegrityError (it cannot be fetched again to check it)."""
    unpinned = []
    for root, what in [(layer, "cache layer") for layer in s.cache_layers] + [
            (s.cache_dir, "cache directory")]:
        trust.check(root, what, s)
        state, path, reason = _core.lookup_entry(root, name, sha256)
        if state in ("complete", "foreign"):
            trust.check_entry(root, name, s)
            return Entry(path, root, name, refresh)
        if state == "unpinned":
            unpinned.append(f"{path}: {reason}")
        elif state == "broken" and root == s.cache_dir:
            logger.warning("hubfast: cache entry %s for %s is broken (%s); fetching it again",
                           path, handle, reason)
    if unpinned and s.offline:
        raise errors.IntegrityError(
            f"{handle}: pinned to archive sha256 {sha256}, but the cached "
            f"{'entries do' if len(unpinned) > 1 else 'entry does'} not record it ("
            + "; ".join(unpinned) + f") and {config.OFFLINE_ENV} is set; fill the cache with "
            "`hubfast fetch` under the same pins")
    return None


def fetch_entry(handle: str, *, path: str = "", url: str = "", fetch: Optional[dict] = None,
                sha256: str = "", name: Optional[str] = None) -> Entry:
    """Returns the complete cache entry for `handle`, extracting `path` or `url` when needed."""
    s = config.settings()
    name = name or entry_name(handle)

    def refresh() -> Entry:
        return fetch_entry(handle, path=path, url=url, fetch=fetch, sha256=sha256, name=name)

    found = _lookup(handle, name, s, refresh, sha256)
    if found is not None:
        _record({"handle": handle, "path": found.path, "cached": True})
        return found
    if s.offline:
        searched = ", ".join(s.cache_layers + (s.cache_dir,))
        raise errors.OfflineError(
            f"{handle}: not in any cache and {config.OFFLINE_ENV} is set "
            f"(searched: {searched}); unset it or fill a cache with `hubfast fetch`")
    limits = {"max_total_bytes": s.max_extract_bytes, "max_members": s.max_members,
              "decode_threads": s.decode_threads}
    trust.prepare_root(s.cache_dir, s)
    bar = progress.make_progress(progress.label(handle), s.show_progress)
    swarm_opts, swarm_dir = None, None
    if url and s.swarm:
        from . import swarm  # noqa: PLC0415

        swarm_opts = swarm.swarm_options(url, s)
        if swarm_opts is not None:  # a torrent is published: a directory for its file
            swarm_dir = swarm_opts["save_dir"] = swarm.work_dir(s.cache_dir, name)
    try:
        try:
            result = _core.ensure_entry(s.cache_dir, name, handle, path=path, url=url,
                                        fetch=fetch or {}, sha256=sha256, limits=limits,
                                        lock_timeout=s.lock_timeout, fsync=s.fsync,
                                        lock_mode=s.lock_mode,
                                        progress=_with_cancel(bar), swarm=swarm_opts or {})
        except (errors.DownloadTimeoutError, errors.NetworkError) as e:
            if not swarm_opts:
                raise
            # The swarm (web seed included) gave nothing for too long: plain HTTP.
            logger.warning("hubfast: %s: swarm download failed (%s); fetching over HTTP",
                           handle, e)
            result = _core.ensure_entry(s.cache_dir, name, handle, path=path, url=url,
                                        fetch=fetch or {}, sha256=sha256, limits=limits,
                                        lock_timeout=s.lock_timeout, fsync=s.fsync,
                                        lock_mode=s.lock_mode,
                                        progress=_with_cancel(bar))
    except errors.HubfastError as e:
        # Advice about the cache only when the cache is what failed (not, e.g., the archive).
        about_cache = isinstance(e, errors.DiskFullError) or s.cache_dir in str(e)
        advice = _ADVICE.get(type(e), "").format(root=s.cache_dir) if about_cache else ""
        raise errors.with_context(e, handle, advice)
    finally:
        if bar is not None:
            bar.close()
        if swarm_dir is not None:
            from . import swarm  # noqa: PLC0415

            swarm.remove_work_dir(swarm_dir)
    stats = {"handle": handle, "path": result["path"], "cached": not result["downloaded"],
             "lock_wait": result["lock_wait"], "publish_seconds": result["publish_seconds"],
             "repaired": result["repaired"], "restarts": result["restarts"]}
    if result["stats"]:
        stats.update(result["stats"])
        st = result["stats"]
        logger.info("hubfast: %s: %.1f MiB %s -> %d files, %.1f MiB in %.2f s (lock wait %.2f s)",
                    handle, st["bytes_in"] / 2**20, st["compression"], st["files"],
                    st["bytes_out"] / 2**20, st["seconds"], result["lock_wait"])
    _record(stats)
    return Entry(result["path"], s.cache_dir, name, refresh)
