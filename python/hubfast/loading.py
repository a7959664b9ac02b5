"""resolve() and load(): tensorflow_hub's semantics, including TF1 Hub format
modules in TF2 (a ``tfhub_module.pb`` means the empty tag set by default)."""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import sys

from . import prefetch as _prefetch
from . import resolvers

TF1_MODULE_PROTO = "tfhub_module.pb"


def resolve(handle: resolvers.Handle) -> str:
    """Returns the local directory of the model behind `handle`, fetching it if needed.

    The directory stays valid while the cache is not pruned; ``load()`` and
    ``KerasLayer`` additionally hold the entry's use-lock while TensorFlow reads it,
    a bare ``resolve()`` path does not.
    """
    return _resolve_entry(handle).path


def _resolve_entry(handle: resolvers.Handle):
    """Waits for a prefetch of the same handle if one is running."""
    running = _prefetch.pending(os.fspath(handle)) if isinstance(handle, (str, os.PathLike)) else None
    if running is not None:
        return running.entry()
    return resolvers.resolve_entry(handle)


def load(handle: resolvers.Handle, tags: Optional[Iterable[str]] = None,
         options: Any = None) -> Any:
    """Resolves `handle` and loads it with ``tf.saved_model.load``.

    Args:
      handle: a URL, a ``gs://`` path, a local directory or archive.
      tags: MetaGraph tags; TF1 Hub format modules default to the empty set.
      options: an optional ``tf.saved_model.LoadOptions``.
    """
    if isinstance(handle, os.PathLike):
        handle = os.fspath(handle)
    if not isinstance(handle, str):
        raise ValueError(f"Expected a string, got {handle!r}")
    if "tensorflow" not in sys.modules:
        # Cold process: fetch in the background while TensorFlow imports.
        running = _prefetch.prefetch(handle)
        import tensorflow as tf  # only now: `import hubfast` stays TensorFlow-free

        entry = running.entry()
    else:
        import tensorflow as tf

        entry = _resolve_entry(handle)

    with entry.in_use() as path:
        is_hub_module_v1 = os.path.exists(os.path.join(path, TF1_MODULE_PROTO))
        if tags is None and is_hub_module_v1:
            tags = []
        if options is not None:
            obj = tf.compat.v1.saved_model.load_v2(path, tags=tags, options=options)
        else:
            obj = tf.compat.v1.saved_model.load_v2(path, tags=tags)
    obj._is_hub_module_v1 = is_hub_module_v1  # pylint: disable=protected-access
    return obj
