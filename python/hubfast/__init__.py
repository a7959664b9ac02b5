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
                     UnsafeArchiveError, UnsafeCacheError)
from .loading import load, resolve
from .prefetch import Prefetch, prefetch
from .tfhub_compat import install
from .resolvers import Resolver, register_resolver, unregister_resolver

__version__ = "0.1.0"

__all__ = [
    "load", "resolve", "prefetch", "Prefetch", "install", "KerasLayer", "Module", "ModuleSpec",
    "create_module_spec", "add_signature", "attach_message", "load_module_spec", "eval_function_for_module",
    "LatestModuleExporter", "register_module_for_export", "create_module_spec_from_saved_model",
    "text_embedding_column", "text_embedding_column_v2", "sparse_text_embedding_column",
    "image_embedding_column", "get_expected_image_size", "get_num_image_channels",
    "attach_image_module_info", "ImageModuleInfo", "register_resolver", "unregister_resolver", "Resolver", "last_stats", "errors",
    "HubfastError", "NotFoundError", "NetworkError", "HTTPStatusError", "IntegrityError",
    "UnsafeArchiveError", "ArchiveLimitError", "DiskFullError", "AccessDeniedError",
    "DownloadTimeoutError", "LockTimeoutError", "OfflineError", "NotAModelError",
    "UnsafeCacheError", "__version__",
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
    "register_module_for_export": (".module_v1", "register_module_for_export"),
    "create_module_spec_from_saved_model": (".module_v1", "create_module_spec_from_saved_model"),
    # Feature columns and image-module helpers of tensorflow_hub 0.15.
    "text_embedding_column": (".feature_column", "text_embedding_column"),
    "text_embedding_column_v2": (".feature_column", "text_embedding_column_v2"),
    "sparse_text_embedding_column": (".feature_column", "sparse_text_embedding_column"),
    "image_embedding_column": (".feature_column", "image_embedding_column"),
    "get_expected_image_size": (".image_util", "get_expected_image_size"),
    "get_num_image_channels": (".image_util", "get_num_image_channels"),
    "attach_image_module_info": (".image_util", "attach_image_module_info"),
    "ImageModuleInfo": (".image_util", "ImageModuleInfo"),
}

# Submodules that import TensorFlow, reachable as attributes (hub.feature_column) like
# tensorflow_hub's; one per Keras flavour (hub.keras.KerasLayer, hub.tf_keras.KerasLayer).
_LAZY_SUBMODULES = ("feature_column", "image_util", "module_v1", "module_spec", "keras_layer",
                    "keras", "tf_keras")


def __getattr__(name: str) -> Any:
    # TensorFlow-dependent names import TensorFlow only when first used.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod, __name__), attr)
        globals()[name] = value
        return value
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'hubfast' has no attribute {name!r}")
