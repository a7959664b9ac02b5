"""Whole-object digests (size, md5, CRC32C) as GCS advertises them in ``x-goog-hash``,
computed once per content and cached. Standard library only.
"""
from __future__ import annotations

import base64
import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

from . import crc32c as _crc32c

__all__ = ["Digests", "Source", "compute_digests", "file_key", "goog_hash_header"]

Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]

_READ_CHUNK = 4 << 20  # reads (a multiple of the CRC block size)

@dataclass(frozen=True)
class Digests:
    """Digests of a whole object, as GCS advertises them in ``x-goog-hash``."""

    size: Optional[int] = None
    md5: Optional[bytes] = None  # the 16-byte digest
    crc32c: Optional[int] = None  # the CRC as an unsigned 32-bit integer

    @classmethod
    def coerce(cls, value: Union["Digests", Mapping[str, object], None]) -> Optional["Digests"]:
        """Accept a Digests or a mapping ``{"md5": bytes|hex str, "crc32c": int, "size": int}``."""
        if value is None or isinstance(value, Digests):
            return value
        md5 = value.get("md5")
        if isinstance(md5, str):
            md5 = bytes.fromhex(md5)
        crc = value.get("crc32c")
        size = value.get("size")
        return cls(
            size=int(size) if size is not None else None,  # type: ignore[arg-type]
            md5=bytes(md5) if md5 is not None else None,  # type: ignore[arg-type]
            crc32c=int(crc) if crc is not None else None,  # type: ignore[arg-type]
        )

    def merged(self, other: Optional["Digests"]) -> "Digests":
        """Fields of ``self`` win; missing ones are taken from ``other``."""
        if other is None:
            return self
        return Digests(
            size=self.size if self.size is not None else other.size,
            md5=self.md5 if self.md5 is not None else other.md5,
            crc32c=self.crc32c if self.crc32c is not None else other.crc32c,
        )


def goog_hash_header(digests: Digests, which: str = "both") -> List[str]:
    """The ``x-goog-hash`` values (``crc32c=<b64 big-endian>``, ``md5=<b64>``) for ``which``."""
    parts = []
    if which in ("both", "crc32c") and digests.crc32c is not None:
        parts.append("crc32c=" + base64.b64encode(struct.pack(">I", digests.crc32c)).decode())
    if which in ("both", "md5") and digests.md5 is not None:
        parts.append("md5=" + base64.b64encode(digests.md5).decode())
    return parts


_digest_cache_lock = threading.Lock()
_digest_cache: Dict[Tuple[object, ...], Digests] = {}


def file_key(path: str) -> Tuple[object, ...]:
    st = os.stat(path)
    return ("file", os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def compute_digests(source: Source, *, md5: bool = True, crc32c: bool = True) -> Digests:
    """md5 and/or CRC32C of bytes or of a file (read in chunks), cached by content.

    In-memory data is keyed by its md5 (cheap), files by their identity and mtime, so
    registering the same benchmark file twice computes its CRC once per process.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = source if isinstance(source, bytes) else bytes(source)
        md5_digest = hashlib.md5(data).digest()
        key: Tuple[object, ...] = ("bytes", len(data), md5_digest)
        with _digest_cache_lock:
            cached = _digest_cache.get(key)
        crc = cached.crc32c if cached is not None else None
        if crc32c and crc is None:
            crc = _crc32c.crc32c(data)
        result = Digests(len(data), md5_digest, crc)
    else:
        path = os.fspath(source)
        key = file_key(path)
        with _digest_cache_lock:
            cached = _digest_cache.get(key)
        need_md5 = md5 and (cached is None or cached.md5 is None)
        need_crc = crc32c and (cached is None or cached.crc32c is None)
        computed = Digests(size=os.stat(path).st_size)
        if need_md5 or need_crc:
            hasher = hashlib.md5() if need_md5 else None
            crc = 0
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(_READ_CHUNK)
                    if not chunk:
                        break
                    if hasher is not None:
                        hasher.update(chunk)
                    if need_crc:
                        crc = _crc32c.crc32c(chunk, crc)
            computed = Digests(
                size=computed.size,
                md5=hasher.digest() if hasher is not None else None,
                crc32c=crc if need_crc else None,
            )
        result = computed.merged(cached)
    with _digest_cache_lock:
        _digest_cache[key] = result.merged(_digest_cache.get(key))
    return result
