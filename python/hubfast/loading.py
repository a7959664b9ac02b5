"""resolve() and load(): tensorflow_hub's semantics, including TF1 Hub format
modules in TF2 (a ``tfhub_module.pb`` means the empty tag set by default)."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Any, Iterable, Iterator, Optional

from . import errors
from . import prefetch as _prefetch
from . import resolvers

TF1_MODULE_PROTO = "tfhub_module.pb"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")  # a SavedModel has one of them


def resolve(handle: resolvers.Handle, *, sha256: Optional[str] = None) -> str:
    """Returns the local directory of the model behind `handle`, fetching it if needed.

    The directory stays valid while the cache is not pruned; ``load()`` and
    ``KerasLayer`` additionally hold the entry's use-lock while TensorFlow reads it,
    a bare ``resolve()`` path does not. ``sha256`` pins the archive's digest
    (also settable per handle in the file named by HUBFAST_PINS).
    """
    return _resolve_entry(handle, sha256).path


def _resolve_entry(handle: resolvers.Handle, sha256: Optional[str] = None):
    """Waits for a prefetch of the same handle if one is running."""
    running = _prefetch.pending(os.fspath(handle)) if isinstance(handle, (str, os.PathLike)) else None
    if running is not None and sha256 is None:
        return running.entry()
    return resolvers.resolve_entry(handle, sha256=sha256)


def load(handle: resolvers.Handle, tags: Optional[Iterable[str]] = None,
         options: Any = None, *, sha256: Optional[str] = None) -> Any:
    """Resolves `handle` and loads it with ``tf.saved_model.load``.

    Args:
      handle: a URL, a ``gs://`` path, a local directory or archive.
      tags: MetaGraph tags; TF1 Hub format modules default to the empty set.
      options: an optional ``tf.saved_model.LoadOptions``.
      sha256: optional pinned digest of the archive (hubfast's addition).
    """
    if isinstance(handle, os.PathLike):
        handle = os.fspath(handle)
    if not isinstance(handle, str):
        raise ValueError(f"Expected a string, got {handle!r}")
    if "tensorflow" not in sys.modules:
        # Cold process: fetch in the background while TensorFlow imports.
        running = _prefetch.prefetch(handle, sha256=sha256)
        import tensorflow as tf  # only now: `import hubfast` stays TensorFlow-free

        entry = running.entry()
    else:
        import tensorflow as tf

        entry = _resolve_entry(handle, sha256)

    with entry.in_use() as path:
        # gs:// and other remote paths (UNCOMPRESSED format) need TensorFlow's file system.
        exists = tf.io.gfile.exists if "://" in path else os.path.exists
        if not any(exists(os.path.join(path, name)) for name in SAVED_MODEL_FILES):
            raise errors.NotAModelError(
                f"{handle}: {path} contains neither {SAVED_MODEL_FILES[0]} nor "
                f"{SAVED_MODEL_FILES[1]}: not a SavedModel (an incomplete copy, or the "
                "wrong directory)")
        is_hub_module_v1 = exists(os.path.join(path, TF1_MODULE_PROTO))
        if tags is None and is_hub_module_v1:
            tags = []
        with _gc_paused():
            if options is not None:
                obj = tf.compat.v1.saved_model.load_v2(path, tags=tags, options=options)
            else:
                obj = tf.compat.v1.saved_model.load_v2(path, tags=tags)
    obj._is_hub_module_v1 = is_hub_module_v1  # pylint: disable=protected-access
    return obj


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cycle collector off while TensorFlow loads a SavedModel.

    The load allocates many Python objects, which triggers full collections that walk
    every object TensorFlow's import created: 10-20% of a 1 GiB load in profiles here.
    Objects made meanwhile are collected after, as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
