"""The ``hubfast`` command (also ``python -m hubfast``): fill, inspect and clean caches,
pack and serve models.

Verbs (``hubfast VERB --help`` for each)::

    hubfast fetch HANDLE...            download into the cache; prints one path per line
    hubfast ls [--layers]              entries: state, size, age, handle
    hubfast verify [HANDLE...] [--deep] [--repair]
    hubfast rm HANDLE_OR_ENTRY...      remove entries not in use
    hubfast prune [--older-than 7d] [--max-size 10G] [--dry-run]
    hubfast pack DIR -o model.tar.zst  a tfhub.dev-like archive (multi-frame zstd, or gzip)
    hubfast serve DIR_OR_ARCHIVE --port 8000 [--path /org/model/1] [--host 127.0.0.1]
    hubfast torrent ARCHIVE --web-seed URL [--tracker URL]   ARCHIVE.torrent (swarm mode)

Common options: ``--cache-dir DIR`` (default ``TFHUB_CACHE_DIR``, else
``$TMPDIR/tfhub_modules``; the read-only layers of ``HUBFAST_CACHE_LAYERS`` are
searched by ``fetch`` and listed by ``ls --layers``), ``--json``: one JSON
document on stdout instead of the text output (errors still go to stderr).

Exit codes::

    0  done
    1  an operation failed (a fetch error, verify found problems it did not repair,
       a removal failed)
    2  usage error (bad option or argument)
    3  a handle or entry was not found (HTTP 404, a missing local archive, not in the
       cache, or offline and not cached)
    4  something was skipped because it was in use or being written (rm, prune,
       verify --repair); run again later
When several apply, the first of 1, 4, 3 wins.

JSON documents (every one has ``"command"`` and ``"exit_code"``; sizes in bytes,
times in seconds since the epoch or seconds)::

    fetch:  {"command": "fetch", "exit_code", "cache_dir",
             "results": [{"handle", "ok": true, "path", "entry" (name or null),
                          "cached" (bool: it was already there),
                          "stats" (hubfast.last_stats(): "lock_wait", "publish_seconds",
                                   "repaired", and when it was fetched "compression",
                                   "bytes_in", "bytes_out", "files", "dirs", "units"
                                   (gzip members / zstd frames decoded), "seconds",
                                   "read_busy", "decode_busy", "write_busy", "sha256",
                                   "source": {"connections", "retries", ...})}
                         | {"handle", "ok": false, "error" (exception class),
                            "message", "exit_code"}]}
    ls:     {"command": "ls", "exit_code", "cache_dir", "roots": [...], "total_bytes",
             "entries": [{"name", "root", "path", "handle" (null without descriptor),
                          "state" (complete|foreign|broken|in_progress|abandoned),
                          "reason", "bytes", "last_used", "age_seconds",
                          "writer" (null|"hubfast"|"tensorflow_hub"), "download_time",
                          "leftovers": [...], "read_only"}]}
    verify: {"command": "verify", "exit_code", "cache_dir", "deep", "repair",
             "not_found": [query...],
             "entries": [{"name", "handle", "path", "state",
                          "status" (ok|problems|repaired|unverifiable|skipped|failed),
                          "problems": [str...], "repair": null | {"status", "message",
                          "path", "problems_after": [...]}}]}
    rm:     {"command": "rm", "exit_code", "cache_dir", "not_found": [query...],
             "removed"|"skipped"|"failed": [{"name", "handle", "status", "reason", "bytes"}]}
    prune:  {"command": "prune", "exit_code", "cache_dir", "older_than_seconds",
             "max_size_bytes", "dry_run", "bytes_before", "bytes_after", "freed_bytes",
             "removed"|"skipped"|"failed": [as for rm]}
    pack:   {"command": "pack", "exit_code", "path", "compression", "tool", "level",
             "members", "tar_bytes", "bytes", "frames", "frame_size", "seek_table", "seconds"}
    serve:  {"command": "serve", "exit_code", "url" (the first handle), "host", "port",
             "handles": [{"url", "path", "source"}]}   (printed once the server listens)
    torrent: {"command": "torrent", "exit_code", "path", "info_hash_v1", "info_hash_v2",
             "piece_bytes", "web_seeds", "trackers"}
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence

if TYPE_CHECKING:
    from .server import TFHubServer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_IN_USE = 4

PROG = "hubfast"


class _Done(Exception):
    """Stops a verb with an exit code (after its message was written)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def combine(codes: Iterable[int]) -> int:
    """The exit code of several outcomes: the first of 1, 4, 3 present, else 0."""
    codes = set(codes)
    for c in (EXIT_FAILED, EXIT_IN_USE, EXIT_NOT_FOUND):
        if c in codes:
            return c
    return EXIT_OK


def _err(verb: str, message: str) -> None:
    sys.stderr.write(f"{PROG} {verb}: {message}\n")
    sys.stderr.flush()


def _emit_json(doc: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, default=str) + "\n")
    sys.stdout.flush()


def _cache_dir(args: argparse.Namespace) -> str:
    from . import config, paths  # noqa: PLC0415

    if args.cache_dir:
        path = os.path.abspath(os.path.expanduser(paths.local_path(args.cache_dir)))
        os.environ[config.CACHE_DIR_ENV] = path  # what resolve() and settings() read
        return path
    return os.path.abspath(config.settings().cache_dir)


def _exit_code_for(exc: BaseException) -> int:
    from . import errors  # noqa: PLC0415

    if isinstance(exc, (errors.NotFoundError, FileNotFoundError)):
        return EXIT_NOT_FOUND
    return EXIT_FAILED


def _hint(exc: BaseException) -> str:
    from . import config, errors  # noqa: PLC0415

    if isinstance(exc, errors.OfflineError):
        return ""  # its message says what to do
    if isinstance(exc, errors.NotFoundError):
        return "check the handle (for a URL, that it opens in a browser)"
    if isinstance(exc, errors.AccessDeniedError):
        return "check credentials and that the cache directory is writable"
    if isinstance(exc, errors.DownloadTimeoutError):
        return f"retry; raise {config.STALL_TIMEOUT_ENV} on slow links"
    if isinstance(exc, errors.NetworkError):
        return "check the network, proxies and HUBFAST_MIRRORS, then retry"
    if isinstance(exc, errors.IntegrityError):
        return "retry; if it persists the published archive (or its pin) is wrong"
    if isinstance(exc, errors.DiskFullError):
        return "free space: `hubfast prune --max-size SIZE`"
    if isinstance(exc, errors.LockTimeoutError):
        return f"another process is writing it; retry or raise {config.LOCK_TIMEOUT_ENV}"
    return ""


def _describe_error(handle: str, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if handle not in text:
        text = f"{handle}: {text}"
    hint = _hint(exc)
    return f"{text} [{type(exc).__name__}]" + (f" ({hint})" if hint else "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- fetch


def cmd_fetch(args: argparse.Namespace) -> int:
    from . import errors, resolvers  # noqa: PLC0415
    from .cache import last_stats  # noqa: PLC0415

    cache_dir = _cache_dir(args)
    results: List[Dict[str, Any]] = []
    codes: List[int] = []
    for handle in args.handles:
        try:
            entry = resolvers.resolve_entry(handle, sha256=args.sha256)
        except KeyboardInterrupt:
            raise
        except (errors.HubfastError, OSError, ValueError) as e:
            code = _exit_code_for(e)
            codes.append(code)
            _err("fetch", _describe_error(handle, e))
            results.append({"handle": handle, "ok": False, "error": type(e).__name__,
                            "message": str(e), "exit_code": code})
            continue
        stats = last_stats() if last_stats().get("handle") == handle else {}
        stats = {k: v for k, v in stats.items() if k not in ("handle", "path")}
        results.append({"handle": handle, "ok": True, "path": entry.path, "entry": entry.name,
                        "cached": bool(stats.get("cached", True)), "stats": _jsonable(stats)})
        if not args.json:
            sys.stdout.write(entry.path + "\n")
            sys.stdout.flush()
    code = combine(codes)
    if args.json:
        _emit_json({"command": "fetch", "exit_code": code, "cache_dir": cache_dir,
                    "results": results})
    return code


# --------------------------------------------------------------------------- ls


def cmd_ls(args: argparse.Namespace) -> int:
    from . import config, maintenance  # noqa: PLC0415

    cache_dir = _cache_dir(args)
    roots = [(cache_dir, False)]
    if args.layers:
        roots = [(os.path.abspath(p), True) for p in config.settings().cache_layers] + roots
    now = time.time()
    entries = []
    for root, ro in roots:
        entries.extend(maintenance.scan(root, read_only=ro))
    if args.sort == "size":
        entries.sort(key=lambda e: -e.bytes)
    elif args.sort == "name":
        entries.sort(key=lambda e: (e.handle or "", e.name))
    else:
        entries.sort(key=lambda e: -e.last_used)
    total = sum(e.bytes for e in entries)
    if args.json:
        _emit_json({"command": "ls", "exit_code": 0, "cache_dir": cache_dir,
                    "roots": [r for r, _ in roots], "total_bytes": total,
                    "entries": [e.to_json(now) for e in entries]})
        return EXIT_OK
    if not entries:
        sys.stderr.write(f"{PROG} ls: no entries in {', '.join(r for r, _ in roots)}\n")
        return EXIT_OK
    fmt = "{:<11} {:>10} {:>5}  {:<40}  {}\n"
    out = [fmt.format("STATE", "SIZE", "AGE", "ENTRY", "HANDLE")]
    for e in entries:
        handle = e.handle or "-"
        if e.read_only:
            handle += f"  [read-only layer {e.root}]"
        if e.state in ("broken", "abandoned", "in_progress") and e.reason:
            handle += f"  ({e.reason})"
        out.append(fmt.format(e.state, maintenance.format_size(e.bytes),
                              maintenance.format_age(now - e.last_used), e.name, handle))
    out.append(f"{len(entries)} entries, {maintenance.format_size(total)} in "
               f"{', '.join(r for r, _ in roots)}\n")
    sys.stdout.write("".join(out))
    return EXIT_OK


# --------------------------------------------------------------------------- verify


def _refetch(handle: str, name: str, deep: bool, root: str) -> Dict[str, Any]:
    """Resolves `handle` into the writable root (a broken entry is swapped for a good one
    atomically by the core); reports what became of entry `name`."""
    from . import config, maintenance, resolvers  # noqa: PLC0415

    saved = os.environ.pop(config.CACHE_LAYERS_ENV, None)  # repair the writable root
    try:
        entry = resolvers.resolve_entry(handle)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - reported per entry
        return {"status": "failed", "message": _describe_error(handle, e),
                "exit_code": _exit_code_for(e), "path": None, "problems_after": []}
    finally:
        if saved is not None:
            os.environ[config.CACHE_LAYERS_ENV] = saved
    if entry.name != name:
        return {"status": "failed", "path": entry.path, "problems_after": [],
                "exit_code": EXIT_FAILED,
                "message": f"{handle} now resolves to entry {entry.name} (the source "
                           f"changed); remove the damaged one: {PROG} rm {name}"}
    _, after = maintenance.verify_entry(root, name, deep)
    return {"status": "repaired" if not after else "failed", "path": entry.path,
            "problems_after": after, "exit_code": EXIT_OK if not after else EXIT_FAILED,
            "message": "" if not after else "still damaged after the refetch: "
                                               + "; ".join(after)}


def cmd_verify(args: argparse.Namespace) -> int:
    from . import maintenance  # noqa: PLC0415

    root = _cache_dir(args)
    names: List[str] = []
    not_found: List[str] = []
    codes: List[int] = []
    if args.handles:
        for q in args.handles:
            found = [n for n in maintenance.find_entries(root, q)
                     if os.path.isdir(os.path.join(root, n))]
            if not found:
                not_found.append(q)
                codes.append(EXIT_NOT_FOUND)
                _err("verify", f"{q}: not in the cache {root} (fetch it: {PROG} fetch {q})")
            names.extend(n for n in found if n not in names)
    else:
        names = [e.name for e in maintenance.scan(root)
                 if e.state in ("complete", "foreign", "broken")]
    reports = []
    for name in names:
        handle = maintenance.read_descriptor(root, name)[0]
        state, problems = maintenance.verify_entry(root, name, args.deep)
        rep: Dict[str, Any] = {"name": name, "handle": handle, "path": os.path.join(root, name),
                               "state": state, "problems": problems, "repair": None}
        if state == "missing":
            rep["status"] = "skipped"
            rep["problems"] = ["removed meanwhile"]
        elif state == "foreign":
            rep["status"] = "unverifiable"  # tensorflow_hub's: no manifest
        elif not problems:
            rep["status"] = "ok"
        else:
            rep["status"] = "problems"
            label = handle or name
            if not args.repair:
                codes.append(EXIT_FAILED)
                _err("verify", f"{label}: {'; '.join(problems)} (entry {name}; repair it: "
                               f"{PROG} verify --repair {'--deep ' if args.deep else ''}{name})")
            elif handle is None:
                codes.append(EXIT_FAILED)
                rep["repair"] = {"status": "failed", "path": None, "problems_after": problems,
                                 "message": "no descriptor names its handle"}
                _err("verify", f"entry {name}: {'; '.join(problems)}; no descriptor names its "
                               f"handle, so it cannot be refetched: {PROG} rm {name}")
            else:
                if state == "complete":
                    # Sizes are right, content is not (--deep): the core sees nothing to
                    # repair, so the entry is removed first (unless in use) and refetched.
                    removed = maintenance.remove_entry(root, name, handle=handle)
                    if removed.status == "skipped":
                        codes.append(EXIT_IN_USE)
                        rep["status"] = "skipped"
                        rep["repair"] = {"status": "skipped", "path": None,
                                         "problems_after": problems,
                                         "message": removed.reason}
                        _err("verify", f"{handle}: {'; '.join(problems)}; not repaired: "
                                       f"{removed.reason} (retry later)")
                        reports.append(rep)
                        continue
                repair = _refetch(handle, name, args.deep, root)
                codes.append(repair.pop("exit_code"))
                rep["repair"] = repair
                rep["status"] = "repaired" if repair["status"] == "repaired" else "failed"
                if repair["status"] != "repaired":
                    _err("verify", f"{handle}: repair failed: {repair['message']}")
        reports.append(rep)
    code = combine(codes)
    if args.json:
        _emit_json({"command": "verify", "exit_code": code, "cache_dir": root,
                    "deep": bool(args.deep), "repair": bool(args.repair),
                    "not_found": not_found, "entries": reports})
    else:
        for rep in reports:
            detail = "; ".join(rep["problems"]) if rep["status"] != "ok" else ""
            if rep["status"] == "unverifiable":
                detail = "written by tensorflow_hub: no manifest to check against"
            elif rep["status"] == "repaired":
                detail = "was: " + detail
            line = f"{rep['status']:<12} {rep['name']}  {rep['handle'] or '-'}"
            sys.stdout.write(line + (f"  ({detail})" if detail else "") + "\n")
    return code


# --------------------------------------------------------------------------- rm / prune


def _report_removals(verb: str, results: Sequence[Any]) -> None:
    from . import maintenance  # noqa: PLC0415

    for r in results:
        label = r.handle or r.name
        if r.status == "removed":
            sys.stdout.write(f"removed {r.name}  {label}  "
                             f"({maintenance.format_size(r.bytes)})\n")
        elif r.status == "skipped":
            _err(verb, f"{label}: skipped: {r.reason} (entry {r.name}; run again later)")
        elif r.status == "failed":
            _err(verb, f"{label}: not removed: {r.reason} (entry {r.name})")


def cmd_rm(args: argparse.Namespace) -> int:
    from . import maintenance  # noqa: PLC0415

    root = _cache_dir(args)
    not_found: List[str] = []
    results = []
    done = set()
    for q in args.entries:
        names = maintenance.find_entries(root, q)
        if not names:
            not_found.append(q)
            _err("rm", f"{q}: not in the cache {root} ({PROG} ls lists what is there)")
            continue
        for name in names:
            if name in done:
                continue
            done.add(name)
            r = maintenance.remove_entry(root, name, lock_wait=args.lock_wait)
            if r.handle is None and q != name and not q.endswith(name):
                r.handle = q  # no descriptor (yet): name it as the user did
            if r.status == "missing":
                not_found.append(q)
                _err("rm", f"{q}: not in the cache {root}")
                continue
            results.append(r)
    codes = [EXIT_NOT_FOUND] * len(not_found)
    codes += [EXIT_IN_USE for r in results if r.status == "skipped"]
    codes += [EXIT_FAILED for r in results if r.status == "failed"]
    code = combine(codes)
    if args.json:
        _emit_json({"command": "rm", "exit_code": code, "cache_dir": root,
                    "not_found": not_found,
                    "removed": [r.to_json() for r in results if r.status == "removed"],
                    "skipped": [r.to_json() for r in results if r.status == "skipped"],
                    "failed": [r.to_json() for r in results if r.status == "failed"]})
    else:
        _report_removals("rm", results)
    return code


def cmd_prune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import maintenance  # noqa: PLC0415

    older = size = None
    try:
        if args.older_than is not None:
            older = maintenance.parse_duration(args.older_than)
        if args.max_size is not None:
            size = maintenance.parse_size(args.max_size)
    except ValueError as e:
        parser.error(str(e))
    if older is None and size is None:
        parser.error("give --older-than DURATION and/or --max-size SIZE")
    root = _cache_dir(args)
    res = maintenance.prune(root, older_than=older, max_size=size, dry_run=args.dry_run,
                            lock_wait=args.lock_wait)
    code = combine([EXIT_IN_USE] * len(res.skipped) + [EXIT_FAILED] * len(res.failed))
    if args.json:
        doc: Dict[str, Any] = {"command": "prune", "exit_code": code, "cache_dir": root,
                               "older_than_seconds": older, "max_size_bytes": size}
        doc.update(res.to_json())
        _emit_json(doc)
    else:
        _report_removals("prune", res.removed + res.skipped + res.failed)
        freed = sum(r.bytes for r in res.removed)
        sys.stdout.write(f"{'would free' if args.dry_run else 'freed'} "
                         f"{maintenance.format_size(freed)}; the cache holds "
                         f"{maintenance.format_size(res.bytes_after)}\n")
    return code


# --------------------------------------------------------------------------- pack


def cmd_pack(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import maintenance, pack  # noqa: PLC0415

    out = args.output
    try:
        frame = maintenance.parse_size(args.frame_size) if args.frame_size else 0
    except ValueError as e:
        parser.error(str(e))
    try:
        compression = pack.compression_for(out)
    except pack.PackError as e:
        parser.error(str(e))
    if compression == "zst":
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("zstandard") is None:
            _err("pack", "writing .tar.zst needs the zstandard package: "
                         "pip install 'hubfast[pack]' (or zstandard); or write .tar.gz")
            return EXIT_FAILED
    if not os.path.isdir(args.dir):
        _err("pack", f"{args.dir}: no such directory (give the model's directory, the one "
                     "holding saved_model.pb)")
        return EXIT_NOT_FOUND
    start = time.monotonic()
    try:
        res = pack.pack(args.dir, out, level=args.level, frame_size=frame or None,
                        seek_table=not args.no_seek_table, threads=args.threads,
                        gzip_tool=args.gzip_tool)
    except (pack.PackError, OSError) as e:
        _err("pack", f"{args.dir}: {e}")
        return EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_FAILED
    res["seconds"] = round(time.monotonic() - start, 3)
    if args.json:
        _emit_json(dict({"command": "pack", "exit_code": 0}, **res))
    else:
        sys.stdout.write(res["path"] + "\n")
        detail = (f"{res['frames']} zstd frames" + (" + seek table" if res["seek_table"] else "")
                  if res["compression"] == "zst" else res["tool"])
        sys.stderr.write(f"{PROG} pack: {res['members']} members, "
                         f"{maintenance.format_size(res['tar_bytes'])} -> "
                         f"{maintenance.format_size(res['bytes'])} ({detail}) in "
                         f"{res['seconds']:.1f} s\n")
    return EXIT_OK


# --------------------------------------------------------------------------- torrent


def cmd_torrent(args: argparse.Namespace) -> int:
    from . import _core, errors, swarm  # noqa: PLC0415

    if not _core.have_swarm():
        _err("torrent", "this build of hubfast has no swarm support (libtorrent)")
        return EXIT_FAILED
    out = args.output or args.archive + swarm.TORRENT_SUFFIX
    try:
        t = swarm.make_torrent(args.archive, args.web_seed, args.tracker or [])
        # A fresh name, then rename: a reader never sees half a torrent.
        tmp = f"{out}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(t["data"])
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except (errors.HubfastError, OSError) as e:
        _err("torrent", f"{args.archive}: {e}")
        return EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_FAILED
    res = {"path": out, "info_hash_v1": t["info_hash_v1"], "info_hash_v2": t["info_hash_v2"],
           "piece_bytes": t["piece_bytes"], "web_seeds": args.web_seed,
           "trackers": args.tracker or []}
    if args.json:
        _emit_json(dict({"command": "torrent", "exit_code": 0}, **res))
    else:
        sys.stdout.write(out + "\n")
    return EXIT_OK


# --------------------------------------------------------------------------- serve

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.bz2", ".tbz2", ".tar.xz",
                     ".txz", ".tar")
_MODEL_MARKERS = ("saved_model.pb", "saved_model.pbtxt", "tfhub_module.pb")


def _strip_suffix(name: str) -> str:
    for s in _ARCHIVE_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _norm_url_path(p: str) -> str:
    p = "/" + p.strip().lstrip("/")
    return p.rstrip("/") or "/"


def serve_routes(source: str, path: Optional[str], workdir: str) -> List[Dict[str, str]]:
    """What ``hubfast serve`` registers: [{"path", "source", "kind"}] where kind is
    "archive" (served at path with ``?tf-hub-format=compressed`` and as is at path +
    its suffix) or "directory" (every file under it served as is)."""
    src = os.path.abspath(source)
    routes: List[Dict[str, str]] = []
    if os.path.isfile(src):
        url_path = _norm_url_path(path) if path else "/" + _strip_suffix(os.path.basename(src))
        routes.append({"path": url_path, "source": src, "kind": "archive"})
    elif os.path.isdir(src) and any(os.path.exists(os.path.join(src, m)) for m in _MODEL_MARKERS):
        from . import pack  # noqa: PLC0415

        archive = os.path.join(workdir, os.path.basename(src.rstrip("/")) + ".tar.gz")
        pack.pack(src, archive, gzip_tool="auto")
        url_path = _norm_url_path(path) if path else "/" + os.path.basename(src.rstrip("/"))
        routes.append({"path": url_path, "source": archive, "kind": "archive"})
    elif os.path.isdir(src):
        prefix = _norm_url_path(path) if path else "/"
        base = "" if prefix == "/" else prefix
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for n in sorted(filenames):
                if not n.endswith(_ARCHIVE_SUFFIXES):
                    continue
                full = os.path.join(dirpath, n)
                rel = os.path.relpath(full, src).replace(os.sep, "/")
                routes.append({"path": f"{base}/{_strip_suffix(rel)}", "source": full,
                               "kind": "archive"})
        routes.append({"path": prefix, "source": src, "kind": "directory"})
    else:
        raise FileNotFoundError(f"{source}: no such file or directory")
    return routes


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import TFHubServer  # noqa: PLC0415

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="hubfast-serve-") as work:
        try:
            routes = serve_routes(args.source, args.path, work)
        except FileNotFoundError as e:
            _err("serve", f"{e} (give a model directory, an archive or a directory of archives)")
            return EXIT_NOT_FOUND
        except (OSError, ValueError) as e:
            _err("serve", f"{args.source}: {e}")
            return EXIT_FAILED
        server = TFHubServer(args.host, args.port, bandwidth=args.bandwidth)
        for r in routes:
            if r["kind"] == "archive":
                server.add_archive(r["path"], r["source"], goog_hash=args.goog_hash)
            else:
                server.add_directory(r["path"], r["source"], goog_hash=args.goog_hash)
        try:
            server.start()
        except OSError as e:
            _err("serve", f"cannot listen on {args.host}:{args.port}: {e}")
            return EXIT_FAILED
        # x-goog-hash and ETag need each archive's md5 and crc32c: computed now, in the
        # background, rather than on its first request (1.6 s per GiB before the headers).
        # So is each archive's torrent (<path>.torrent): until it exists, clients in swarm
        # mode fetch over plain HTTP.
        seeding: Dict[str, Any] = {}
        if args.seed and not args.tracker:
            _err("serve", "--seed needs --tracker (the swarm's announce URL)")
            server.close()
            return EXIT_USAGE
        if args.seed:
            from . import swarm  # noqa: PLC0415

            seeding["seeder"] = swarm.seeder(args.host, args.tracker)
        threading.Thread(target=_precompute_digests,
                         args=(server, routes, args.tracker or [], seeding.get("seeder")),
                         name="hubfast-serve-digests", daemon=True).start()
        try:
            handles = [{"url": server.url_for(r["path"]), "path": r["path"],
                        "source": r["source"]} for r in routes if r["kind"] == "archive"]
            if args.json:
                _emit_json({"command": "serve", "exit_code": 0,
                            "url": handles[0]["url"] if handles else server.url_for("/"),
                            "host": args.host, "port": server.port, "handles": handles})
            else:
                for h in handles:
                    sys.stdout.write(h["url"] + "\n")
                sys.stdout.flush()
                sys.stderr.write(f"{PROG} serve: {len(handles)} model(s) on "
                                 f"{server.url_for('/')} (Ctrl-C stops)\n")
            if not handles:
                _err("serve", f"{args.source}: no archives found (*.tar.gz, *.tar.zst, ...)")
            while not stop.wait(0.5):
                pass
        finally:
            server.close()
    return EXIT_OK


def _precompute_digests(server: TFHubServer, routes: List[Dict[str, str]],
                        trackers: List[str], seeder: Any = None) -> None:
    try:
        server.precompute_digests()
    except OSError:
        pass  # an archive gone or unreadable: its requests report it
    from . import _core, errors, swarm  # noqa: PLC0415

    if not _core.have_swarm():
        return
    for r in routes:
        if r["kind"] == "archive":
            try:
                t = swarm.publish_torrent(server, r["path"], r["source"], trackers)
                if seeder is not None:
                    # Not super-seeding: libtorrent 2.0.8 sends nothing in that mode for
                    # hybrid torrents (measured with bench_cluster).
                    seeder.add(t["data"], r["source"], super_seeding=False)
            except (errors.HubfastError, OSError):
                pass  # no torrent: clients fetch this archive over HTTP


# --------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser, cache: bool = True) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout (schema: `pydoc hubfast.cli`)")
    if cache:
        p.add_argument("--cache-dir", metavar="DIR",
                       help="the cache root (default: TFHUB_CACHE_DIR, else "
                            "$TMPDIR/tfhub_modules)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="hubfast: fetch TensorFlow Hub models into the cache, inspect, verify "
                    "and clean the cache, pack and serve models.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 skipped (in use). "
               "`hubfast VERB --help` describes each verb.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("fetch", help="download handles into the cache; print their paths",
                       description="Download, verify and extract each HANDLE into the cache "
                                   "(e.g. at image build time) and print its path, one per "
                                   "line. A progress bar goes to stderr when it is a terminal "
                                   "or TFHUB_DOWNLOAD_PROGRESS is set.")
    p.add_argument("handles", nargs="+", metavar="HANDLE",
                   help="a tfhub.dev/Kaggle URL, an archive URL, gs://..., a local archive")
    p.add_argument("--sha256", help="pin: the archive must have this SHA-256 (one handle)")
    _common(p)

    p = sub.add_parser("ls", help="list cache entries",
                       description="List the entries of the cache: state (complete, foreign = "
                                   "written by tensorflow_hub, broken, in_progress, abandoned), "
                                   "size, time since last use, entry name and handle.")
    p.add_argument("--layers", action="store_true",
                   help="also list the read-only roots of HUBFAST_CACHE_LAYERS")
    p.add_argument("--sort", choices=("age", "size", "name"), default="age",
                   help="most recently used first (age, default), largest first, or by handle")
    _common(p)

    p = sub.add_parser("verify", help="check entries against their manifests",
                       description="Check entries (all by default) against hubfast's "
                                   "manifest: every file present with its size; with --deep "
                                   "also its CRC32. Entries written by tensorflow_hub have no "
                                   "manifest and are reported unverifiable.")
    p.add_argument("handles", nargs="*", metavar="HANDLE",
                   help="handles or entry names (default: every entry)")
    p.add_argument("--deep", action="store_true", help="also check each file's CRC32")
    p.add_argument("--repair", action="store_true",
                   help="refetch damaged entries from the handle in their descriptor (swapped "
                        "in atomically; an entry whose content alone changed is removed first "
                        "unless in use)")
    _common(p)

    for verb, text in (("rm", "remove entries"), ("prune", "remove old or excess entries")):
        if verb == "rm":
            p = sub.add_parser("rm", help=text,
                               description="Remove entries, given by handle, entry name or "
                                           "path. An entry being written or in use (load(), "
                                           "KerasLayer) is skipped (exit code 4).")
            p.add_argument("entries", nargs="+", metavar="HANDLE_OR_ENTRY")
        else:
            p = sub.add_parser("prune", help=text,
                               description="Remove entries last used longer ago than "
                                           "--older-than, then least recently used ones until "
                                           "the cache fits --max-size; also leftovers of dead "
                                           "writers. Entries in use are skipped (exit code 4).")
            p.add_argument("--older-than", metavar="DURATION",
                           help="e.g. 7d, 12h, 30m, 90s, 2w")
            p.add_argument("--max-size", metavar="SIZE",
                           help="e.g. 10G, 500M (powers of 1024)")
            p.add_argument("--dry-run", action="store_true", help="only report")
        p.add_argument("--lock-wait", type=float, default=2.0, metavar="SECONDS",
                       help="how long to wait for an entry's writer lock (default 2)")
        _common(p)

    p = sub.add_parser("pack", help="pack a model directory into a tfhub.dev-like archive",
                       description="Pack DIR into a tfhub.dev-like archive (members ./..., "
                                   "sorted, owner 0/0). .tar.zst: multi-frame zstd with a seek "
                                   "table (needs zstandard), decoded in parallel by hubfast and "
                                   "read by any zstd tool. .tar.gz: one gzip member (pigz when "
                                   "installed, else Python's zlib).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-o", "--output", required=True, metavar="ARCHIVE",
                   help="model.tar.zst, model.tar.gz (also .tar.bz2, .tar.xz, .tar)")
    p.add_argument("--level", type=int, help="compression level (zstd 3, gzip 6 by default)")
    p.add_argument("--frame-size", default="8M", metavar="SIZE",
                   help="uncompressed bytes per zstd frame (default 8M; 0: one frame)")
    p.add_argument("--no-seek-table", action="store_true", help="zstd: omit the seek table")
    p.add_argument("--threads", type=int, default=0, help="compression threads (0: all cores)")
    p.add_argument("--gzip-tool", default="auto", choices=("auto", "python", "pigz", "gzip",
                                                           "igzip"),
                   help="gzip compressor (auto: pigz if installed, else python)")
    _common(p, cache=False)

    p = sub.add_parser("serve", help="serve models over the TF Hub protocol",
                       description="Serve for local development or an air-gapped mirror. "
                                   "An archive is served at --path (default /<name without "
                                   "suffix>); a model directory is packed (.tar.gz) and served "
                                   "at --path (default /<dir name>); a directory of archives "
                                   "serves each <rel>.tar.gz at <prefix>/<rel> as a handle "
                                   "(?tf-hub-format=compressed) and every file as is at "
                                   "<prefix>/<rel path> (--path sets the prefix, default /).")
    p.add_argument("source", metavar="DIR_OR_ARCHIVE")
    p.add_argument("--port", type=int, default=0, help="default: any free port (printed)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0: all)")
    p.add_argument("--path", help="URL path of the model, or prefix for a directory")
    p.add_argument("--bandwidth", type=float, help="per-connection cap in bytes/s")
    p.add_argument("--goog-hash", default="both", choices=("both", "crc32c", "md5", "none"),
                   help="digests advertised in x-goog-hash (default both)")
    p.add_argument("--tracker", action="append", metavar="URL",
                   help="announce URL written into each published torrent (repeatable)")
    p.add_argument("--seed", action="store_true",
                   help="also seed every archive to its swarm as a peer (clients then "
                        "take the web seed only when no peer gives them a piece)")
    _common(p, cache=False)

    p = sub.add_parser("torrent", help="write a BitTorrent file for an archive (swarm mode)",
                       description="Write ARCHIVE.torrent: a hybrid (v1+v2) torrent whose web "
                                   "seed is the archive's URL, for a static server or nginx "
                                   "to publish beside the archive (clients in swarm mode look "
                                   "for <archive URL path>.torrent).")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("--web-seed", action="append", required=True, metavar="URL",
                   help="the archive's HTTP URL, as clients fetch it (repeatable)")
    p.add_argument("--tracker", action="append", metavar="URL", help="announce URL (repeatable)")
    p.add_argument("-o", "--output", metavar="FILE", help="default: ARCHIVE.torrent")
    _common(p, cache=False)
    return parser


def _version() -> str:
    try:
        from . import __version__  # noqa: PLC0415

        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verb = args.verb
    try:
        if verb == "fetch":
            if args.sha256 and len(args.handles) > 1:
                parser.error("--sha256 pins one handle; give one HANDLE")
            return cmd_fetch(args)
        if verb == "ls":
            return cmd_ls(args)
        if verb == "verify":
            return cmd_verify(args)
        if verb == "rm":
            return cmd_rm(args)
        if verb == "prune":
            return cmd_prune(args, _subparser(parser, "prune"))
        if verb == "pack":
            return cmd_pack(args, _subparser(parser, "pack"))
        if verb == "serve":
            return cmd_serve(args)
        if verb == "torrent":
            return cmd_torrent(args)
    except KeyboardInterrupt:
        _err(verb, "interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_FAILED
    except _Done as d:
        return d.code
    parser.error(f"unknown verb {verb}")
    return EXIT_USAGE  # pragma: no cover


def _subparser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices[verb]
    return parser  # pragma: no cover


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
