"""Pack a model directory into a tfhub.dev-like archive (``hubfast pack``).

Members look like tfhub.dev's: ``./``, ``./saved_model.pb``, ``./variables/``,
``./variables/variables.data-00000-of-00001``, ... depth first in sorted order,
owners 0/0 without names (GNU tar format). The tar is streamed into the
compressor: memory stays bounded whatever the model's size.

Formats, chosen from the output's suffix (or ``compression=``):

* ``.tar.zst`` / ``.tzst``: MULTI-FRAME zstd. Every ``frame_size`` bytes of the
  tar (default 8 MiB) become one independent frame carrying its content size
  and checksum, so hubfast decodes the frames in parallel; frames are
  compressed on ``threads`` threads. A seek table in the zstd seekable format
  follows the last frame (a skippable frame, magic ``0x184D2A5E``: one entry
  per frame of compressed size, decompressed size and the low 32 bits of the
  XXH64 of its content, then a footer of frame count, descriptor byte
  ``0x80`` (checksums present) and ``0x8F92EAB1``). Any zstd decoder reads the
  file (skippable frames decode to nothing); seekable-format readers can seek
  in it. Needs the ``zstandard`` package (``pip install "hubfast[pack]"``).
  Memory: about ``(2 * threads + 2) * frame_size`` (measured: 62 MiB with 2
  threads and 8 MiB frames).
* ``.tar.gz`` / ``.tgz``: ONE gzip member, ``gzip -6``-equivalent. With
  ``gzip_tool="auto"`` (the default) through ``pigz -6 -n`` when it is on
  ``PATH`` (the same format, compressed on all cores), else Python's zlib at
  level 6 (single-threaded). ``"gzip"``, ``"pigz"``, ``"igzip"`` (ISA-L:
  fastest, levels 0-3 only, so larger output) or ``"python"`` force one.
* ``.tar.bz2``, ``.tar.xz``, ``.tar``: Python's bz2/lzma, or no compression.

The archive is written to ``<out>.<random>.partial`` (created exclusively, never
through a link: the output may sit in a shared /tmp) and renamed into place at the
end, so a failed or interrupted pack never leaves a truncated archive behind.

This module imports only the standard library (``zstandard`` when packing
zstd), so ``hubfast.testing.models`` can use it without the native module.
"""
from __future__ import annotations

import bz2
import concurrent.futures
import gzip
import io
import lzma
import os
import secrets
import shutil
import stat
import struct
import subprocess
import tarfile
import threading
from collections import deque
from typing import IO, Any, Deque, Dict, Iterator, List, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["pack", "compression_for", "DEFAULT_FRAME_SIZE", "SEEKABLE_MAGIC",
           "SEEK_TABLE_MAGIC", "read_seek_table", "PackError"]

DEFAULT_FRAME_SIZE = 8 << 20
MAX_FRAME_SIZE = 1 << 30  # the seekable format's limit for one frame's content
SEEK_TABLE_MAGIC = 0x184D2A5E  # the skippable-frame magic the seekable format uses
SEEKABLE_MAGIC = 0x8F92EAB1
DEFAULT_LEVELS = {"gz": 6, "zst": 3, "bz2": 9, "xz": 6, "none": 0}
_SUFFIXES = ((".tar.zst", "zst"), (".tzst", "zst"), (".tar.gz", "gz"), (".tgz", "gz"),
             (".tar.bz2", "bz2"), (".tbz2", "bz2"), (".tar.xz", "xz"), (".txz", "xz"),
             (".tar", "none"))
GZIP_TOOLS = ("auto", "python", "gzip", "pigz", "igzip")


class PackError(ValueError):
    """The directory cannot be packed as asked (a link, a bad option, a tool failed)."""


def compression_for(path: PathLike) -> str:
    """``"zst"``, ``"gz"``, ``"bz2"``, ``"xz"`` or ``"none"`` from an archive name."""
    name = os.fspath(path).lower()
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            return kind
    raise PackError(f"{os.fspath(path)}: cannot tell the format from the name; use one of "
                    + ", ".join(s for s, _ in _SUFFIXES))


# --------------------------------------------------------------------------- sinks


class _CompressorWriter(io.RawIOBase):
    """A write-only file object: ``compressor.compress`` into ``out``."""

    def __init__(self, out: IO[bytes], compressor: Any) -> None:
        super().__init__()
        self._out = out
        self._c = compressor

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        data = self._c.compress(bytes(b))
        if data:
            self._out.write(data)
        return len(b)

    def close(self) -> None:
        if not self.closed:
            self._out.write(self._c.flush())
        super().close()


class _ZstdFrames(io.RawIOBase):
    """Cuts what is written into ``frame_size`` pieces, compresses each into an
    independent frame (content size + checksum) on a thread pool, writes the
    frames in order and, on close, the seek table."""

    def __init__(self, out: IO[bytes], level: int, frame_size: int, threads: int,
                 seek_table: bool) -> None:
        super().__init__()
        import zstandard  # noqa: PLC0415  (optional dependency: hubfast[pack])

        self._zstd = zstandard
        self._out = out
        self._level = level
        self._size = frame_size
        self._seek_table = seek_table
        self._threads = max(1, threads)
        self._local = threading.local()
        self._pool = (concurrent.futures.ThreadPoolExecutor(self._threads, "hubfast-pack")
                      if self._threads > 1 else None)
        self._pending: Deque[Tuple[int, Any]] = deque()
        self._buf = bytearray()
        self.entries: List[Tuple[int, int, bytes]] = []  # compressed, decompressed, checksum
        self.bytes_out = 0

    def writable(self) -> bool:
        return True

    def _compress(self, data: bytes) -> bytes:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = self._zstd.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=True)
        return cctx.compress(data)

    def _submit(self, data: bytes) -> None:
        if self._pool is None:
            self._emit(len(data), self._compress(data))
            return
        self._pending.append((len(data), self._pool.submit(self._compress, data)))
        while len(self._pending) > self._threads:  # bounded memory, every thread busy
            self._drain_one()

    def _drain_one(self) -> None:
        n, fut = self._pending.popleft()
        self._emit(n, fut.result())

    def _emit(self, n: int, frame: bytes) -> None:
        self._out.write(frame)
        self.bytes_out += len(frame)
        # The frame's content checksum (its last 4 bytes) is the low 32 bits of
        # the XXH64 of its content: exactly what a seek table entry records.
        self.entries.append((len(frame), n, frame[-4:]))

    def write(self, b: Any) -> int:  # type: ignore[override]
        self._buf += b
        if len(self._buf) >= self._size:
            n = (len(self._buf) // self._size) * self._size
            with memoryview(self._buf) as mv:
                chunks = [bytes(mv[off:off + self._size]) for off in range(0, n, self._size)]
            del self._buf[:n]
            for chunk in chunks:
                self._submit(chunk)
        return len(b)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._buf or not self.entries and not self._pending:
                self._submit(bytes(self._buf))
                self._buf = bytearray()
            while self._pending:
                self._drain_one()
            if self._seek_table:
                table = _seek_table(self.entries)
                self._out.write(table)
                self.bytes_out += len(table)
        finally:
            if self._pool is not None:
                for _, fut in self._pending:
                    fut.cancel()
                self._pool.shutdown(wait=True)
            super().close()


def _seek_table(entries: List[Tuple[int, int, bytes]]) -> bytes:
    """The zstd seekable format's seek table (a skippable frame), with checksums."""
    body = bytearray()
    for csize, dsize, checksum in entries:
        if csize > 0xFFFFFFFF or dsize > 0xFFFFFFFF:
            raise PackError("a zstd frame is too large for the seek table")
        body += struct.pack("<II", csize, dsize) + checksum
    body += struct.pack("<IBI", len(entries), 0x80, SEEKABLE_MAGIC)
    return struct.pack("<II", SEEK_TABLE_MAGIC, len(body)) + bytes(body)


def read_seek_table(path: PathLike) -> Optional[List[Tuple[int, int, Optional[int]]]]:
    """The seek table at the end of a zstd file: ``[(compressed, decompressed,
    checksum or None), ...]``, or None when the file has none."""
    with open(os.fspath(path), "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 17:
            return None
        f.seek(size - 9)
        frames, desc, magic = struct.unpack("<IBI", f.read(9))
        if magic != SEEKABLE_MAGIC or desc & 0x7C:
            return None
        width = 12 if desc & 0x80 else 8
        table_size = 8 + frames * width + 9
        if table_size > size:
            return None
        f.seek(size - table_size)
        head = f.read(8)
        skip_magic, frame_size = struct.unpack("<II", head)
        if skip_magic != SEEK_TABLE_MAGIC or frame_size != table_size - 8:
            return None
        raw = f.read(frames * width)
    out = []
    for i in range(frames):
        c, d = struct.unpack_from("<II", raw, i * width)
        chk = struct.unpack_from("<I", raw, i * width + 8)[0] if width == 12 else None
        out.append((c, d, chk))
    return out


# --------------------------------------------------------------------------- tar


def _iter_tree(src: str) -> Iterator[Tuple[str, str]]:
    """Yields ``(abspath, relpath)`` depth first in sorted order, dirs before contents.

    Iterative, and no deeper than hubfast extracts (a deeper tree is a PackError)."""
    from . import _core  # noqa: PLC0415

    stack = [(src, "", iter(sorted(os.listdir(src))))]
    while stack:
        parent, prefix, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        full, rel = os.path.join(parent, name), prefix + name
        if len(stack) > _core.MAX_TREE_DEPTH:
            raise PackError(f"{full}: more than {_core.MAX_TREE_DEPTH} directories deep, which "
                            "hubfast refuses to extract")
        yield full, rel
        if os.path.isdir(full) and not os.path.islink(full):
            stack.append((full, rel + "/", iter(sorted(os.listdir(full)))))


def _check_member(full: str, rel: str) -> None:
    mode = os.lstat(full).st_mode
    if stat.S_ISLNK(mode):
        raise PackError(f"{full}: a symbolic link; hubfast (like tfhub.dev) refuses links in "
                        "archives: replace it by the file it points to")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise PackError(f"{full}: not a regular file or directory; remove it before packing")


class _Counter(io.RawIOBase):
    """Counts the bytes of the tar on their way to the compressor."""

    def __init__(self, sink: IO[bytes]) -> None:
        super().__init__()
        self._sink = sink
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        self._sink.write(b)
        self.n += len(b)
        return len(b)


def _write_tar(fileobj: IO[bytes], src_dir: str, member_prefix: str, tar_format: int,
               mtime: Optional[int], allow_links: bool) -> int:
    def norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = int(ti.mtime) if mtime is None else int(mtime)
        return ti

    members = 0
    # Large blocks: tarfile copies file data in copybufsize pieces (16 KiB by default).
    with tarfile.open(fileobj=fileobj, mode="w|", format=tar_format, bufsize=1 << 20,
                      copybufsize=1 << 20) as tar:
        root_name = member_prefix.rstrip("/")
        if root_name:
            tar.addfile(norm(tar.gettarinfo(src_dir, arcname=root_name)))
            members += 1
        for full, rel in _iter_tree(src_dir):
            if not allow_links:
                _check_member(full, rel)
            ti = norm(tar.gettarinfo(full, arcname=member_prefix + rel))
            if ti.isreg():
                with open(full, "rb") as f:
                    tar.addfile(ti, f)
            else:
                tar.addfile(ti)
            members += 1
    return members


def _gzip_command(tool: str, level: int, threads: int) -> List[str]:
    if tool == "igzip":
        cmd = ["igzip", f"-{min(level, 3)}", "-n", "-c"]
        return cmd + (["-T", str(threads)] if threads > 1 else [])
    if tool == "pigz":
        return ["pigz", f"-{level}", "-n", "-c"] + (["-p", str(threads)] if threads > 0 else [])
    return [tool, f"-{level}", "-n", "-c"]


def pack(src_dir: PathLike, out_path: PathLike, *, compression: Optional[str] = None,
         level: Optional[int] = None, frame_size: Optional[int] = DEFAULT_FRAME_SIZE,
         seek_table: bool = True, threads: int = 0, gzip_tool: Optional[str] = "auto",
         member_prefix: str = "./", tar_format: int = tarfile.GNU_FORMAT,
         mtime: Optional[int] = None, allow_links: bool = False) -> Dict[str, Any]:
    """Packs ``src_dir`` into ``out_path``; see the module docstring.

    ``compression``: ``zst``, ``gz``, ``bz2``, ``xz`` or ``none`` (default: from the
    suffix). ``frame_size``: uncompressed bytes per zstd frame (None or 0: one
    frame, streamed, without a seek table). ``threads``: zstd/pigz/igzip threads
    (0: all cores). ``gzip_tool``: ``auto``, ``python`` (or None), ``gzip``,
    ``pigz``, ``igzip``. ``mtime`` (an int) replaces every member's modification
    time: the archive is then reproducible. ``allow_links``: keep symbolic links as
    link members (hubfast refuses to extract them; only for tests).

    Returns ``{"path", "compression", "tool", "level", "members", "tar_bytes",
    "bytes", "frames", "frame_size", "seek_table"}`` (``frames``: zstd frames,
    the seek table not counted; 1 for the other formats).
    """
    src = os.fspath(src_dir)
    out = os.fspath(out_path)
    if not os.path.isdir(src):
        raise NotADirectoryError(f"{src}: not a directory (pack a model directory)")
    if member_prefix and not member_prefix.endswith("/"):
        raise PackError("member_prefix must be empty or end with '/'")
    kind = compression or compression_for(out)
    if kind not in DEFAULT_LEVELS:
        raise PackError(f"unknown compression {kind!r}")
    lvl = DEFAULT_LEVELS[kind] if level is None else int(level)
    nthreads = threads if threads > 0 else (os.cpu_count() or 1)
    if kind == "zst" and frame_size:
        if not 0 < int(frame_size) <= MAX_FRAME_SIZE:
            raise PackError(f"frame size must be between 1 byte and {MAX_FRAME_SIZE} bytes")
    tool_name = gzip_tool or "python"
    if tool_name not in GZIP_TOOLS:
        raise PackError(f"gzip tool must be one of {', '.join(GZIP_TOOLS)}")
    if kind == "gz" and tool_name == "auto":
        tool_name = "pigz" if shutil.which("pigz") else "python"
    if kind == "gz" and tool_name != "python" and not shutil.which(tool_name):
        raise PackError(f"{tool_name} is not installed (apt-get install {tool_name}); "
                        "or use --gzip-tool python")

    result: Dict[str, Any] = {"path": out, "compression": kind, "level": lvl, "frames": 1,
                              "frame_size": None, "seek_table": False,
                              "tool": tool_name if kind == "gz" else
                              ("zstandard" if kind == "zst" else "python")}
    tmp = f"{out}.{secrets.token_hex(8)}.partial"

    def tar_into(fileobj: IO[bytes]) -> None:
        counter = _Counter(fileobj)
        result["members"] = _write_tar(counter, src, member_prefix, tar_format, mtime,  # type: ignore[arg-type]
                                       allow_links)
        result["tar_bytes"] = counter.n

    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with open(fd, "wb") as raw:
            if kind == "none":
                tar_into(raw)
            elif kind == "gz":
                if tool_name == "python":
                    with gzip.GzipFile(filename="", mode="wb", compresslevel=lvl, fileobj=raw,
                                       mtime=0) as gz:
                        tar_into(gz)  # type: ignore[arg-type]
                else:
                    cmd = _gzip_command(tool_name, lvl, threads)
                    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=raw)
                    assert proc.stdin is not None
                    try:
                        tar_into(proc.stdin)  # type: ignore[arg-type]
                    finally:
                        try:
                            proc.stdin.close()
                        except BrokenPipeError:
                            pass
                        rc = proc.wait()
                    if rc != 0:
                        raise PackError(f"{' '.join(cmd)} exited with status {rc}")
            elif kind == "zst":
                if frame_size:
                    with _ZstdFrames(raw, lvl, int(frame_size), nthreads, seek_table) as w:
                        tar_into(w)  # type: ignore[arg-type]
                    result.update(frames=len(w.entries), frame_size=int(frame_size),
                                  seek_table=bool(seek_table))
                else:
                    import zstandard  # noqa: PLC0415

                    cctx = zstandard.ZstdCompressor(level=lvl, write_checksum=True,
                                                    write_content_size=True)
                    with cctx.stream_writer(raw, closefd=False) as w:
                        tar_into(w)  # type: ignore[arg-type]
            elif kind == "bz2":
                with _CompressorWriter(raw, bz2.BZ2Compressor(lvl)) as w:
                    tar_into(w)  # type: ignore[arg-type]
            else:  # xz
                with _CompressorWriter(raw, lzma.LZMACompressor(preset=lvl)) as w:
                    tar_into(w)  # type: ignore[arg-type]
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    result["bytes"] = os.path.getsize(out)
    return result
