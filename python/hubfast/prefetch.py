"""Fetching in the background: ``prefetch(handle)`` starts the native fetch at
once and returns a future-like handle; ``load()`` of the same handle waits for
it. Started before ``import tensorflow``, the download overlaps the import."""
from __future__ import annotations

import os
import threading
from typing import Dict, Optional

from . import cache, config, resolvers

_lock = threading.Lock()
_inflight: Dict[str, "Prefetch"] = {}


class Prefetch:
    """A background resolve of one handle (``done()``, ``result()``, ``cancel()``)."""

    def __init__(self, handle: str, sha256: Optional[str] = None) -> None:
        self.handle = handle
        self._sha256 = sha256
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._entry: Optional[cache.Entry] = None
        self._error: Optional[BaseException] = None
        self.stats: Dict = {}  # hubfast.last_stats() of this fetch, once done
        self._thread = threading.Thread(target=self._run, name="hubfast-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _lower_priority(config.settings().prefetch_nice)
        cache.set_cancel_event(self._cancel)
        try:
            self._entry = resolvers.resolve_entry(self.handle, sha256=self._sha256)
            self.stats = cache.last_stats()
        except BaseException as e:  # handed to whoever waits
            self._error = e
        finally:
            cache.set_cancel_event(None)
            self._done.set()
            with _lock:
                if _inflight.get(self.handle) is self:
                    del _inflight[self.handle]

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stops the fetch; the cache is left as it was."""
        self._cancel.set()

    def entry(self, timeout: Optional[float] = None) -> cache.Entry:
        try:
            while not self._done.wait(0.1 if timeout is None else timeout):
                if timeout is not None:
                    raise TimeoutError(f"prefetch of {self.handle} still running")
        except KeyboardInterrupt:
            self.cancel()  # Ctrl-C while waiting stops the background fetch too
            raise
        if self._error is not None:
            raise self._error
        assert self._entry is not None
        return self._entry

    def result(self, timeout: Optional[float] = None) -> str:
        """The local directory, once fetched (raises what the fetch raised)."""
        return self.entry(timeout).path


def _lower_priority(increment: int) -> None:
    """Raises this thread's nice value; the native threads the fetch starts inherit it.

    A prefetch overlaps `import tensorflow`, which is one busy thread: on a host with few
    cores an equal share for the fetch's decoder, writer and connections slows the import
    it was meant to hide (3.1 -> 5.9 s here). Lower priority yields the import its core
    and costs nothing once the caller waits and nothing else runs."""
    if increment <= 0:
        return
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + increment))
    except (OSError, AttributeError):  # not Linux-like: run at normal priority
        pass


def prefetch(handle: resolvers.Handle, sha256: Optional[str] = None) -> Prefetch:
    """Starts fetching `handle` into the cache in the background and returns at once."""
    import os

    handle = os.fspath(handle)
    with _lock:
        running = _inflight.get(handle)
        if running is None:
            running = _inflight[handle] = Prefetch(handle, sha256)
        return running


def pending(handle: str) -> Optional[Prefetch]:
    with _lock:
        return _inflight.get(handle)
