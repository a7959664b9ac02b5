"""Test helpers: a loopback server speaking the TF Hub hosting protocol, with fault injection.

Names are re-exported lazily (PEP 562), so that ``python -m hubfast.testing.server`` does not
import the module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SERVER_NAMES = (
    "ARCHIVE_SUFFIXES",
    "Digests",
    "Fault",
    "PathStats",
    "RequestRecord",
    "ServerStats",
    "TFHubServer",
    "compute_digests",
    "crc32c",
    "crc32c_backend",
    "goog_hash_header",
    "make_self_signed_cert",
    "serve_forever",
)

__all__ = list(_SERVER_NAMES)

if TYPE_CHECKING:
    from .server import (
        ARCHIVE_SUFFIXES,
        Digests,
        Fault,
        PathStats,
        RequestRecord,
        ServerStats,
        TFHubServer,
        compute_digests,
        crc32c,
        crc32c_backend,
        goog_hash_header,
        make_self_signed_cert,
        serve_forever,
    )


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        return getattr(importlib.import_module(".server", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
