"""CRC32C (Castagnoli), the checksum GCS advertises in ``x-goog-hash``.

The fastest available backend is used: the ``google-crc32c`` or ``crc32c`` PyPI packages,
else ISA-L's ``crc32_iscsi`` through ``ctypes`` when ``libisal`` is installed, else a
pure-Python implementation (about 90 MB/s). Standard library only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from array import array
from typing import Callable, List, Optional, Union

__all__ = ["crc32c", "crc32c_backend"]

_MASK32 = 0xFFFFFFFF

# All backends work on the CRC "register": it starts at 0xFFFFFFFF and the final CRC is the
# register XOR 0xFFFFFFFF. update(register, data) -> register.

_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _make_crc_table() -> List[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (_CRC32C_POLY if c & 1 else 0)
        table.append(c)
    return table


_CRC_TABLE = _make_crc_table()


def _crc_update_bytewise(reg: int, data: Union[bytes, memoryview]) -> int:
    table = _CRC_TABLE
    for b in data:
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


class _BlockCrc:
    """Pure-Python CRC32C, about 10x a byte loop, by doing the per-byte work in C-level calls.

    The register update is linear over GF(2), so the CRC of a block of N bytes (from a zero
    register) is the XOR over positions i of ``T_d[b_i]``, where ``T_d[b]`` is the register after
    feeding byte b then d zero bytes (d = N-1-i). For a chunk of K blocks, column i (every N-th
    byte, one ``bytes`` slice) is mapped through ``T_d`` one output byte at a time with
    ``bytes.translate``; the columns are XORed together as big integers. That yields each
    block's contribution c_k; a short Python loop then chains the blocks:
    ``reg = advance_N(reg) ^ c_k``, where ``advance_N`` (N zero bytes) is four table lookups.
    """

    N = 1024
    BLOCKS_PER_PIECE = 4096

    def __init__(self) -> None:
        n = self.N
        base = [bytes((_CRC_TABLE[b] >> (8 * m)) & 0xFF for b in range(256)) for m in range(4)]
        tables: List[List[bytes]] = [base]
        cur = base
        fb = int.from_bytes
        for _ in range(1, n):
            # One more zero byte: reg' = T[reg & 0xFF] ^ (reg >> 8), for all 256 entries at once.
            low = [cur[0].translate(base[m]) for m in range(4)]
            cur = [
                (fb(cur[1], "little") ^ fb(low[0], "little")).to_bytes(256, "little"),
                (fb(cur[2], "little") ^ fb(low[1], "little")).to_bytes(256, "little"),
                (fb(cur[3], "little") ^ fb(low[2], "little")).to_bytes(256, "little"),
                low[3],
            ]
            tables.append(cur)
        self._tables = tables

        def as_ints(d: int) -> List[int]:
            t = tables[d]
            return [t[0][b] | (t[1][b] << 8) | (t[2][b] << 16) | (t[3][b] << 24) for b in range(256)]

        # advance_N(reg) = XOR_m T_{N-1-m}[byte m of reg]
        self._advance = [as_ints(n - 1 - m) for m in range(4)]

    def _blocks(self, reg: int, piece: bytes) -> int:
        n = self.N
        k = len(piece) // n
        fb = int.from_bytes
        a0 = a1 = a2 = a3 = 0
        tables = self._tables
        for i in range(n):
            col = piece[i::n]
            t = tables[n - 1 - i]
            a0 ^= fb(col.translate(t[0]), "little")
            a1 ^= fb(col.translate(t[1]), "little")
            a2 ^= fb(col.translate(t[2]), "little")
            a3 ^= fb(col.translate(t[3]), "little")
        inter = bytearray(4 * k)
        inter[0::4] = a0.to_bytes(k, "little")
        inter[1::4] = a1.to_bytes(k, "little")
        inter[2::4] = a2.to_bytes(k, "little")
        inter[3::4] = a3.to_bytes(k, "little")
        words = array("I")
        if words.itemsize != 4:  # pragma: no cover - exotic platforms
            words = array("L")
        words.frombytes(bytes(inter))
        if sys.byteorder == "big":  # pragma: no cover
            words.byteswap()
        z0, z1, z2, z3 = self._advance
        for c in words:
            reg = z0[reg & 0xFF] ^ z1[(reg >> 8) & 0xFF] ^ z2[(reg >> 16) & 0xFF] ^ z3[reg >> 24] ^ c
        return reg

    def update(self, reg: int, data: Union[bytes, bytearray, memoryview]) -> int:
        mv = memoryview(data).cast("B")
        total = len(mv)
        n = self.N
        piece_max = n * self.BLOCKS_PER_PIECE
        off = 0
        while total - off >= n:
            take = min(piece_max, (total - off) // n * n)
            piece = bytes(mv[off : off + take])
            reg = self._blocks(reg, piece)
            off += take
        return _crc_update_bytewise(reg, mv[off:])


class _CrcBackend:
    def __init__(self, name: str, update: Callable[[int, bytes], int]) -> None:
        self.name = name
        self.update = update


def _validate_backend(backend: _CrcBackend) -> bool:
    try:
        whole = backend.update(_MASK32, b"123456789") ^ _MASK32
        split = backend.update(backend.update(_MASK32, b"12345"), b"6789") ^ _MASK32
        return whole == split == 0xE3069283
    except Exception:  # noqa: BLE001 - any failure means "do not use this backend"
        return False


def _google_crc32c_backend() -> Optional[_CrcBackend]:
    try:
        import google_crc32c  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return None
    if getattr(google_crc32c, "implementation", "c") != "c":
        return None  # its pure-Python fallback is slower than ours
    return _CrcBackend(
        "google_crc32c", lambda reg, data: google_crc32c.extend(reg ^ _MASK32, bytes(data)) ^ _MASK32
    )


def _crc32c_pkg_backend() -> Optional[_CrcBackend]:
    try:
        import crc32c as crc32c_pkg  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return None
    return _CrcBackend(
        "crc32c", lambda reg, data: crc32c_pkg.crc32c(bytes(data), reg ^ _MASK32) ^ _MASK32
    )


def _isal_backend() -> Optional[_CrcBackend]:
    names = ["libisal.so.2", "libisal.so", ctypes.util.find_library("isal")]
    lib = None
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None or not hasattr(lib, "crc32_iscsi"):
        return None
    fn = lib.crc32_iscsi
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    step = 1 << 30  # the length is a C int

    def update(reg: int, data: Union[bytes, bytearray, memoryview]) -> int:
        # Register in, register out (crc32_iscsi does no final inversion).
        if not isinstance(data, bytes):
            data = bytes(data)
        base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        for off in range(0, len(data), step):
            reg = fn(base + off, min(step, len(data) - off), reg)
        return reg

    return _CrcBackend("isal", update)


_backend_lock = threading.Lock()
_backend: Optional[_CrcBackend] = None


def _crc_backend() -> _CrcBackend:
    global _backend
    with _backend_lock:
        if _backend is None:
            for make in (_google_crc32c_backend, _crc32c_pkg_backend, _isal_backend):
                candidate = make()
                if candidate is not None and _validate_backend(candidate):
                    _backend = candidate
                    break
            else:
                engine = _BlockCrc()
                _backend = _CrcBackend("python", engine.update)
        return _backend


def crc32c(data: Union[bytes, bytearray, memoryview], value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``; pass a previous result as ``value`` to continue it.

    ``crc32c(b"123456789") == 0xE3069283``; ``crc32c(b, crc32c(a)) == crc32c(a + b)``.
    """
    return _crc_backend().update(value ^ _MASK32, data) ^ _MASK32


def crc32c_backend() -> str:
    """Which CRC32C implementation is in use: google_crc32c, crc32c, isal or python."""
    return _crc_backend().name
