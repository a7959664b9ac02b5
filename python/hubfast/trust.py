"""Whom a cache directory is trusted from.

A cache root often sits in a world-writable /tmp, where another local user can create it
first or plant entries in it. As OpenSSH's StrictModes does, hubfast uses a root, an
entry or a manifest only when it is owned by this user or by root and no one else may
write to it:

* group write is fine when the group is the owner's private group (Debian's and Ubuntu's
  umask 002 makes tensorflow_hub's entries 0775);
* anything on a read-only mount is trusted whoever owns it (NFS root_squash makes the
  owner ``nobody``; nobody can change it anyway);
* a team cache opts in with ``HUBFAST_TRUSTED_GROUP``: a group (name or gid) whose members
  may own and write it, or ``any`` to trust every owner.

Anything else raises ``UnsafeCacheError``, naming the path, its owner and mode and the fix.
"""
from __future__ import annotations

import functools
import grp
import os
import pwd
import stat
from typing import Optional, Tuple

from . import config, errors

ANY = "any"


@functools.lru_cache(maxsize=64)
def _user(uid: int) -> Tuple[str, Optional[int]]:
    """(name, primary gid) of a uid; the number itself when it has no name."""
    try:
        pw = pwd.getpwuid(uid)
        return pw.pw_name, pw.pw_gid
    except KeyError:
        return str(uid), None


@functools.lru_cache(maxsize=64)
def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@functools.lru_cache(maxsize=16)
def _trusted_group(spec: str) -> Tuple[Optional[int], frozenset]:
    """(gid, member names) of HUBFAST_TRUSTED_GROUP's group."""
    try:
        g = grp.getgrgid(int(spec)) if spec.isdigit() else grp.getgrnam(spec)
    except (KeyError, ValueError):
        raise ValueError(f"{config.TRUSTED_GROUP_ENV}={spec!r}: no such group "
                         f"(a group name, a gid, or {ANY!r})") from None
    return g.gr_gid, frozenset(g.gr_mem)


def _owner_trusted(uid: int, group: Optional[Tuple[Optional[int], frozenset]]) -> bool:
    if uid in (0, os.geteuid()):
        return True
    if group is None:
        return False
    name, primary = _user(uid)
    return name in group[1] or (primary is not None and primary == group[0])


def _private_group(uid: int, gid: int) -> bool:
    """Whether `gid` is `uid`'s user private group (same name, its primary group)."""
    name, primary = _user(uid)
    return primary == gid and _group_name(gid) == name


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _describe(st: os.stat_result) -> str:
    return (f"owned by {_user(st.st_uid)[0]} (uid {st.st_uid}), group "
            f"{_group_name(st.st_gid)}, mode {stat.filemode(st.st_mode)} "
            f"({oct(stat.S_IMODE(st.st_mode))})")


def _problem(st: os.stat_result, group) -> str:
    """What makes `st` untrusted, or ""."""
    if not _owner_trusted(st.st_uid, group):
        return "is owned by another user"
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH and not stat.S_ISLNK(st.st_mode):
        return "is writable by every user"
    if mode & stat.S_IWGRP and not stat.S_ISLNK(st.st_mode) \
            and not _private_group(st.st_uid, st.st_gid) \
            and not (group is not None and st.st_gid == group[0]):
        return "is writable by its group"
    return ""


def check(path: str, what: str, settings: Optional[config.Settings] = None) -> None:
    """Raises UnsafeCacheError unless `path` (a cache root, entry or manifest) is trusted.

    A missing path passes (nothing to trust yet). A link is judged by its own owner and
    then by what it points to."""
    s = settings or config.settings()
    spec = s.trusted_group
    if spec == ANY:
        return
    group = _trusted_group(spec) if spec else None
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return
    sts = [lst]
    if stat.S_ISLNK(lst.st_mode):
        try:
            sts.append(os.stat(path))
        except FileNotFoundError:
            return
    for st in sts:
        problem = _problem(st, group)
        if not problem or _read_only(path):
            continue
        link = " (a link)" if stat.S_ISLNK(st.st_mode) else ""
        raise errors.UnsafeCacheError(
            f"{what} {path}{link} {problem}: {_describe(st)}; another user could have planted "
            f"it or can change it, so hubfast will not use it. Use a cache of your own: set "
            f"{config.CACHE_DIR_ENV} (or --cache-dir) to a directory only you can write; for a "
            f"cache shared by a team, set {config.TRUSTED_GROUP_ENV} to its group (or 'any')")


def check_entry(root: str, name: str, settings: Optional[config.Settings] = None) -> None:
    """The entry directory and its manifest."""
    check(os.path.join(root, name), "cache entry", settings)
    check(os.path.join(root, name + ".hubfast"), "cache manifest", settings)


def prepare_root(root: str, settings: Optional[config.Settings] = None) -> None:
    """Creates the writable cache root when missing, then checks it. The default root
    (in a shared /tmp) is created 0700; a root the user named, 0755, so that a layer
    filled by root can be read by everyone."""
    s = settings or config.settings()
    if not os.path.lexists(root):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
            os.mkdir(root, 0o700 if s.cache_dir_is_default else 0o755)
        except FileExistsError:
            pass  # created meanwhile: judged below like any other
        except OSError:
            return  # not creatable here: the fetch reports it with its advice
    check(root, "cache directory", s)
