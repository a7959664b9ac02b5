"""hubfast: fast, verified, crash-safe loading of TensorFlow Hub models.

A drop-in for tensorflow_hub: ``import hubfast as hub``. Importing hubfast
does not import TensorFlow; ``load`` and ``KerasLayer`` do, when called.
"""
from __future__ import annotations

from typing import Any

from . import errors
from .cache import last_stats
from .errors import (AccessDeniedError, ArchiveLimitError, DiskFullError, DownloadTimeoutError,
                     HTTPStatusError, HubfastError, IntegrityError, LockTimeoutError,
                     NetworkError, NotAModelError, NotFoundError, OfflineError,
                     UnsafeArchiveError)
from .loading import load, resolve
from .prefetch import Prefetch, prefetch
from .tfhub_compat import install
from .resolvers import Resolver, register_resolver, unregister_resolver

__version__ = "0.1.0"

__all__ = [
    "load", "resolve", "prefetch", "Prefetch", "install", "KerasLayer", "Module", "ModuleSpec",
    "create_module_spec", "add_signature", "attach_message", "load_module_spec", "eval_function_for_module",
    "LatestModuleExporter", "register_resolver", "unregister_resolver", "Resolver", "last_stats", "errors",
    "HubfastError", "NotFoundError", "NetworkError", "HTTPStatusError", "IntegrityError",
    "UnsafeArchiveError", "ArchiveLimitError", "DiskFullError", "AccessDeniedError",
    "DownloadTimeoutError", "LockTimeoutError", "OfflineError", "NotAModelError", "__version__",
]

_LAZY = {
    "KerasLayer": (".keras_layer", "KerasLayer"),
    # The TF1 Hub format API (tf.compat.v1 graph mode), removed from tensorflow_hub in 0.16.
    "Module": (".module_v1", "Module"),
    "ModuleSpec": (".module_v1", "ModuleSpec"),
    "create_module_spec": (".module_v1", "create_module_spec"),
    "add_signature": (".module_v1", "add_signature"),
    "attach_message": (".module_v1", "attach_message"),
    "load_module_spec": (".module_v1", "load_module_spec"),
    "eval_function_for_module": (".module_v1", "eval_function_for_module"),
    "LatestModuleExporter": (".module_v1", "LatestModuleExporter"),
}


def __getattr__(name: str) -> Any:
    # TensorFlow-dependent names import TensorFlow only when first used.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hubfast' has no attribute {name!r}")
