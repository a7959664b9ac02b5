"""Cache maintenance: list, verify, remove and prune entries (``hubfast ls/verify/rm/prune``).

The cache's files, manifest, locks, temp names and repair are described once, in
docs/cache-protocol.md; this module reads them as the native core writes them.

States (``EntryInfo.state``):

* ``complete``: the directory matches hubfast's manifest (sizes; ``verify --deep``
  also checks every file's CRC32);
* ``foreign``: written by tensorflow_hub (no manifest): used as it would use it;
* ``broken``: files missing or changed size; the next resolve repairs it;
* ``in_progress``: no entry yet, a live writer is extracting it (a hubfast temp
  directory whose writer's lock is held, a fresh heartbeat, or a live
  tensorflow_hub lock);
* ``abandoned``: leftovers of a dead writer (temp directories, a descriptor or
  manifest without a directory); ``rm``/``prune`` remove them.

Removal (``remove_entry``) never pulls files from under a user: it skips an entry
being written or read (docs/cache-protocol.md, "Removing").
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from typing import Dict, Iterable, List, Optional, Tuple

from . import _core, errors

__all__ = ["EntryInfo", "RemoveResult", "scan", "entry_info", "find_entries", "verify_entry",
           "remove_entry", "prune", "parse_duration", "parse_size", "format_size",
           "format_age", "read_descriptor"]

NAME_RE = re.compile(r"^[0-9a-f]{40}$")
_PREFIX_RE = re.compile(r"^([0-9a-f]{40})(?:\.(.*))?$")
DEFAULT_LOCK_WAIT = 2.0  # seconds rm/prune wait for an entry's writer lock
# Cache-protocol constants, from the native core (docs/cache-protocol.md).
TFHUB_LOCK_STALE = _core.TFHUB_LOCK_STALE  # s: tensorflow_hub's own rule for a remote lock
HEARTBEAT_STALE = _core.HEARTBEAT_STALE  # s: a heartbeat lock not refreshed this long is dead


@dataclasses.dataclass
class EntryInfo:
    name: str
    root: str
    path: str
    handle: Optional[str]  # from the descriptor, None when there is none
    state: str  # complete | foreign | broken | in_progress | abandoned
    reason: str  # why broken / abandoned, or what the writer is
    bytes: int  # regular files of the entry's directory (of its temp dirs while in progress)
    last_used: float  # newest mtime of the descriptor, the directory and the use-lock file
    writer: Optional[str]  # "hubfast" or "tensorflow_hub" while one is writing, else None
    download_time: Optional[str]  # the descriptor's "Download Time"
    leftovers: List[str]  # temp dirs, replaced trees, files without a directory
    read_only: bool = False

    def to_json(self, now: Optional[float] = None) -> Dict[str, object]:
        now = time.time() if now is None else now
        return {"name": self.name, "root": self.root, "path": self.path, "handle": self.handle,
                "state": self.state, "reason": self.reason, "bytes": self.bytes,
                "last_used": self.last_used, "age_seconds": max(0.0, now - self.last_used),
                "writer": self.writer, "download_time": self.download_time,
                "leftovers": list(self.leftovers), "read_only": self.read_only}


@dataclasses.dataclass
class RemoveResult:
    name: str
    handle: Optional[str]
    status: str  # removed | skipped | missing | failed
    reason: str = ""
    bytes: int = 0

    def to_json(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- parsing

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*$", re.I)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgtp]?)(i?b?)\s*$", re.I)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_duration(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` or plain seconds -> seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 7d, 12h, 30m, 90s)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_size(text: str) -> int:
    """``"10G"``, ``"500M"``, ``"1.5GiB"``, ``"2T"`` or plain bytes -> bytes (K, M, G, T
    are powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise ValueError(f"{text!r} is not a size (e.g. 10G, 500M, 1.5GiB, 1000000)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_age(seconds: float) -> str:
    """``"42s"``, ``"5m"``, ``"3h"``, ``"12d"``."""
    return _age(seconds)


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


# --------------------------------------------------------------------------- helpers


def read_descriptor(root: str, name: str) -> Tuple[Optional[str], Optional[str]]:
    """(handle, download time) from ``<name>.descriptor.txt``, Nones when absent."""
    text = _read_small(os.path.join(root, name + ".descriptor.txt"))
    if text is None:
        return None, None
    handle = when = None
    for line in text.splitlines():
        if line.startswith("Module: ") and handle is None:
            handle = line[len("Module: "):]
        elif line.startswith("Download Time: ") and when is None:
            when = line[len("Download Time: "):]
    return handle, when


def _read_small(path: str, limit: int = 1 << 16) -> Optional[str]:
    """A small regular file's text, None for anything else: a link or FIFO planted in a
    shared root must neither redirect the read nor hang it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode("utf8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _is_real_dir(path: str) -> bool:
    """A directory, not a link to one (a link in a shared root may be planted)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def tree_bytes(path: str) -> int:
    """Total size of the regular files under `path` (not following links). A tree deeper
    than the extractor's depth limit raises ArchiveLimitError."""
    return _core.tree_size(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here (a zombie counts as dead)."""
    if pid <= 0:
        return True  # unknown: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            line = f.read()
        return line[line.rfind(")") + 2:line.rfind(")") + 3] != "Z"
    except OSError:
        return True


def tfhub_lock_writer(root: str, name: str, stale: float = TFHUB_LOCK_STALE) -> Optional[str]:
    """Who holds a live tensorflow_hub lock ``<name>.lock`` ("hubfast" when its task id
    is one of hubfast's, else "tensorflow_hub"), or None when there is none or its
    holder is dead (same host: the pid; other host: unchanged for `stale` s)."""
    path = os.path.join(root, name + ".lock")
    content = _read_small(path, 4096)
    if content is None:
        return None
    content = content.strip()
    mtime = _mtime(path)
    host, pid, uid = "", -1, ""
    parts = content.rsplit(".", 2)
    if len(parts) == 3:
        host, uid = parts[0], parts[2]
        try:
            pid = int(parts[1])
        except ValueError:
            pid = -1
    who = "hubfast" if uid.startswith("hf") else "tensorflow_hub"
    if host and host == socket.gethostname():
        return who if pid_alive(pid) else None
    newest = mtime
    if uid:
        newest = max(newest, _mtime(os.path.join(root, f"{name}.{uid}.tmp")))
    return who if time.time() - newest < stale else None


def _writer_lock_held(root: str, name: str) -> bool:
    """Whether a hubfast writer holds the entry's lock (flock or a fresh heartbeat)."""
    hb = os.path.join(root, name + ".hubfast.hb")
    try:
        if time.time() - os.stat(hb).st_mtime < HEARTBEAT_STALE:
            return True
    except OSError:
        pass
    lock_file = _core.lock_path(root, name)
    if not os.path.exists(lock_file):
        return False
    try:
        lock = _core.FileLock.try_acquire(lock_file, exclusive=True)
    except (errors.HubfastError, OSError):
        return False  # cannot tell (read-only): nobody writes a read-only cache through us
    if lock.held:
        lock.release()
        return False
    return True


def _group(root: str) -> Dict[str, List[str]]:
    """Entry name -> the names in `root` that belong to it."""
    groups: Dict[str, List[str]] = {}
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return groups
    for n in names:
        m = _PREFIX_RE.match(n)
        if m:
            groups.setdefault(m.group(1), []).append(n)
    return groups


_LOCK_SUFFIXES = (".hubfast.lock", ".hubfast.use", ".hubfast.hb")


def entry_info(root: str, name: str, members: Optional[Iterable[str]] = None,
               read_only: bool = False) -> Optional[EntryInfo]:
    """What the cache holds for `name` in `root`, or None when nothing but lock files."""
    if members is None:
        members = _group(root).get(name, [])
    members = list(members)
    path = os.path.join(root, name)
    temps = sorted(n for n in members if n.endswith(".tmp") and n != name
                   and _is_real_dir(os.path.join(root, n)))
    olds = sorted(n for n in members if n.endswith(".old") and _is_real_dir(os.path.join(root, n)))
    has_dir = name in members
    has_descriptor = name + ".descriptor.txt" in members
    has_manifest = name + ".hubfast" in members
    has_tfhub_lock = name + ".lock" in members
    if not (has_dir or has_descriptor or has_manifest or temps or olds or has_tfhub_lock):
        return None
    handle, when = read_descriptor(root, name)
    state, _, reason = _core.lookup_entry(root, name) if has_dir else ("missing", path, "")
    writer = None
    if any(t.startswith(name + ".hf") for t in temps) or name + ".hubfast.hb" in members:
        if _writer_lock_held(root, name):
            writer = "hubfast"
    if writer is None and has_tfhub_lock:
        writer = tfhub_lock_writer(root, name)
    last_used = max(_mtime(os.path.join(root, name + ".descriptor.txt")), _mtime(path),
                    _mtime(_core.use_lock_path(root, name)))
    leftovers: List[str] = []
    if state in ("complete", "foreign", "broken"):
        try:
            size = tree_bytes(path)
        except errors.ArchiveLimitError as e:  # reported; the entry stays as it is
            size, state, reason = 0, "broken", str(e)
        if state == "broken" and writer:
            reason = f"{reason}; being repaired by {writer}"
        if writer is None:
            leftovers = temps + olds
    else:
        try:
            size = sum(tree_bytes(os.path.join(root, t)) for t in temps)
        except errors.ArchiveLimitError:
            size = 0
        if writer is not None:
            state, reason = "in_progress", f"being written by {writer}"
        else:
            state = "abandoned"
            leftovers = temps + olds + [n for n in (name + ".descriptor.txt", name + ".hubfast")
                                        if n in members]
            if has_dir:
                leftovers.insert(0, name)  # an empty directory
            reason = "left by a writer that died: " + ", ".join(leftovers) if leftovers else \
                "a stale tensorflow_hub lock"
    if not last_used:
        last_used = max([_mtime(os.path.join(root, t)) for t in temps] + [0.0])
    return EntryInfo(name=name, root=root, path=path, handle=handle, state=state, reason=reason,
                     bytes=size, last_used=last_used, writer=writer, download_time=when,
                     leftovers=leftovers, read_only=read_only)


def scan(root: str, read_only: bool = False) -> List[EntryInfo]:
    """Every entry in `root`, oldest use first."""
    out = []
    for name, members in _group(root).items():
        if all(m.endswith(_LOCK_SUFFIXES) for m in members):
            continue  # lock files only: they are never deleted, by design
        info = entry_info(root, name, members, read_only)
        if info is not None:
            out.append(info)
    out.sort(key=lambda e: (e.last_used, e.name))
    return out


def find_entries(root: str, query: str) -> List[str]:
    """Entry names in `root` for `query`: an entry name, an entry path, a handle (as
    given: sha1 of it, or the handle its descriptor records, or where the resolver
    would cache it, e.g. a local archive)."""
    groups = _group(root)
    found: List[str] = []

    def add(name: Optional[str]) -> None:
        if name and name in groups and name not in found:
            if not all(m.endswith(_LOCK_SUFFIXES) for m in groups[name]):
                found.append(name)

    base = os.path.basename(query.rstrip("/"))
    if NAME_RE.match(query):
        add(query)
    elif NAME_RE.match(base) and os.path.isabs(query) and \
            os.path.realpath(os.path.dirname(query.rstrip("/"))) == os.path.realpath(root):
        add(base)
    add(hashlib.sha1(query.encode("utf8")).hexdigest())
    from . import resolvers  # noqa: PLC0415

    try:
        add(resolvers.describe(query).get("entry_name"))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - e.g. a local archive that no longer exists
        pass
    # A local archive is recorded under its real path, so `./m.tar.zst` means the one here.
    handles = {query}
    if isinstance(resolvers.resolver_for(query), resolvers.LocalArchiveResolver):
        handles = {resolvers.local_archive_handle(query)}
        if os.path.isabs(query):
            handles.add(query)  # entries recorded before handles were made real paths
    for name in groups:
        if name not in found and read_descriptor(root, name)[0] in handles:
            add(name)
    return found


# --------------------------------------------------------------------------- verify


def verify_entry(root: str, name: str, deep: bool = False) -> Tuple[str, List[str]]:
    """(state, problems) of an entry; a foreign entry has no manifest to check against."""
    state, _, reason = _core.lookup_entry(root, name)
    if state == "foreign":
        return state, []
    problems = list(_core.verify_entry(root, name, deep))
    if state == "broken" and not problems:
        problems = [reason]
    return state, problems


# --------------------------------------------------------------------------- remove


def _trash_name(name: str) -> str:
    return f"{name}.hf{secrets.token_hex(15)}.old"


def _rmtree(path: str) -> None:
    """Removes a tree of any depth, following no link and changing no mode (native: an
    iterative walk holding a bounded number of descriptors)."""
    _core.remove_tree(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_entry(root: str, name: str, *, lock_wait: float = DEFAULT_LOCK_WAIT,
                 handle: Optional[str] = None) -> RemoveResult:
    """Removes one entry (and its leftovers) unless it is being written or used."""
    if handle is None:
        handle = read_descriptor(root, name)[0]
    result = RemoveResult(name=name, handle=handle, status="removed")
    try:
        writer_lock = _core.FileLock.acquire(_core.lock_path(root, name), exclusive=True,
                                             timeout=lock_wait)
    except errors.LockTimeoutError:
        result.status, result.reason = "skipped", "being written by another hubfast process"
        return result
    except (errors.HubfastError, OSError) as e:
        result.status, result.reason = "failed", f"cannot take its writer lock: {e}"
        return result
    try:
        hb = os.path.join(root, name + ".hubfast.hb")
        if os.path.exists(hb) and time.time() - _mtime(hb) < HEARTBEAT_STALE:
            result.status, result.reason = "skipped", "being written by another hubfast process"
            return result
        tfhub = tfhub_lock_writer(root, name)
        if tfhub == "tensorflow_hub":
            result.status, result.reason = "skipped", "being written by tensorflow_hub"
            return result
        try:
            use = _core.FileLock.try_acquire(_core.use_lock_path(root, name), exclusive=True)
        except (errors.HubfastError, OSError) as e:
            result.status, result.reason = "failed", f"cannot take its use-lock: {e}"
            return result
        if not use.held:
            result.status = "skipped"
            result.reason = "in use (a process holds its use-lock: load(), KerasLayer or a reader)"
            return result
        try:
            _remove_locked(root, name, result)
        finally:
            use.release()
    finally:
        writer_lock.release()
    return result


def _remove_locked(root: str, name: str, result: RemoveResult) -> None:
    """Both locks held: no hubfast writer, no reader. The directory goes first, in
    one rename, then its tree, then the manifest and the descriptor."""
    path = os.path.join(root, name)
    members = _group(root).get(name, [])
    found = False
    try:
        if os.path.lexists(path):
            found = True
            if os.path.isdir(path) and not os.path.islink(path):
                size = tree_bytes(path)  # a tree too deep to walk stays as it is
                trash = os.path.join(root, _trash_name(name))
                os.rename(path, trash)
                result.bytes += size
                _rmtree(trash)
            else:
                result.bytes += os.lstat(path).st_size
                os.unlink(path)
        # Leftovers: hubfast's temp dirs (their writers are gone: we hold the lock),
        # replaced trees (nobody reads them: we hold the use-lock) and the temp dir of a
        # dead tensorflow_hub writer.
        tfhub_live = tfhub_lock_writer(root, name) is not None
        for n in members:
            full = os.path.join(root, n)
            if n == name or not _is_real_dir(full):
                continue
            if n.endswith(".old") or (n.endswith(".tmp") and (n.startswith(name + ".hf")
                                                               or not tfhub_live)):
                found = True
                result.bytes += tree_bytes(full)
                _rmtree(full)
        for suffix in (".hubfast", ".descriptor.txt"):
            if name + suffix in members or os.path.exists(path + suffix):
                found = True
                _unlink(path + suffix)
        if not tfhub_live and name + ".lock" in members:
            found = True
            _unlink(path + ".lock")  # tensorflow_hub's own, left by a dead process
    except errors.ArchiveLimitError as e:
        result.status, result.reason = "failed", str(e)
        return
    except OSError as e:
        result.status = "failed"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            result.reason = f"permission denied: {e}"
        else:
            result.reason = str(e)
        return
    if not found:
        result.status, result.reason = "missing", "not in the cache"


# --------------------------------------------------------------------------- prune


@dataclasses.dataclass
class PruneResult:
    removed: List[RemoveResult]
    skipped: List[RemoveResult]
    failed: List[RemoveResult]
    bytes_before: int
    bytes_after: int
    dry_run: bool

    def to_json(self) -> Dict[str, object]:
        return {"removed": [r.to_json() for r in self.removed],
                "skipped": [r.to_json() for r in self.skipped],
                "failed": [r.to_json() for r in self.failed],
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "freed_bytes": sum(r.bytes for r in self.removed), "dry_run": self.dry_run}


def prune(root: str, *, older_than: Optional[float] = None, max_size: Optional[int] = None,
          dry_run: bool = False, lock_wait: float = DEFAULT_LOCK_WAIT,
          now: Optional[float] = None) -> PruneResult:
    """Removes entries last used more than `older_than` seconds ago, then least recently
    used ones until the entries total at most `max_size` bytes; leftovers of dead
    writers ("abandoned") always. Entries in use or being written are skipped."""
    now = time.time() if now is None else now
    entries = scan(root)
    stored = [e for e in entries if e.state in ("complete", "foreign", "broken")]
    total = sum(e.bytes for e in stored)
    res = PruneResult([], [], [], total, total, dry_run)

    def attempt(e: EntryInfo, why: str) -> bool:
        if dry_run:
            r = RemoveResult(e.name, e.handle, "removed", why + " (dry run)", e.bytes)
        else:
            r = remove_entry(root, e.name, lock_wait=lock_wait, handle=e.handle)
            if r.status == "removed":
                r.reason = why
        if r.status in ("removed", "missing"):
            if r.status == "removed":
                res.removed.append(r)
            return True
        (res.skipped if r.status == "skipped" else res.failed).append(r)
        return False

    gone = set()
    for e in entries:
        if e.state == "abandoned" and attempt(e, "leftovers of a dead writer"):
            gone.add(e.name)
    if older_than is not None:
        for e in stored:
            if now - e.last_used > older_than and attempt(
                    e, f"last used {format_age(now - e.last_used)} ago"):
                gone.add(e.name)
                total -= e.bytes
    if max_size is not None:
        for e in stored:  # least recently used first
            if total <= max_size:
                break
            if e.name in gone or any(r.name == e.name for r in res.skipped + res.failed):
                continue
            if attempt(e, f"the cache exceeded {format_size(max_size)}"):
                gone.add(e.name)
                total -= e.bytes
    res.bytes_after = total
    return res
