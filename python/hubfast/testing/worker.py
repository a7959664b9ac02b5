"""A worker process for tests and benchmarks: resolves one handle and prints
one JSON line with what happened and when.

    python -m hubfast.testing.worker HANDLE

Environment: WORKER_HOLD_SECONDS (then hold the entry's use-lock that long,
as load() does), WORKER_READY_FILE (touch <file>.<pid> when started).
"""
import json
import os
import resource
import sys
import time


def main() -> None:
    handle = sys.argv[1]
    start = time.time()
    import hubfast  # after `start`: the import is part of a worker's cold start

    if os.environ.get("WORKER_READY_FILE"):
        open(os.environ["WORKER_READY_FILE"] + f".{os.getpid()}", "w").close()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        path = hubfast.resolve(handle)
        stats = hubfast.last_stats()
        out = {"ok": True, "path": path, "downloaded": not stats.get("cached", True),
               "repaired": stats.get("repaired", False), "lock_wait": stats.get("lock_wait", 0.0),
               "start": start, "end": time.time(), "pid": os.getpid(),
               "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                       - rss_before) / 1024,
               "stats": {k: v for k, v in stats.items() if k != "source"}}
        hold = float(os.environ.get("WORKER_HOLD_SECONDS", "0"))
        if hold:
            entry = hubfast.resolvers.resolve_entry(handle)
            with entry.in_use():
                print(json.dumps(dict(out, holding=True)), flush=True)
                time.sleep(hold)
            return
    except Exception as e:  # reported, not raised: the caller inspects it
        out = {"ok": False, "error": type(e).__name__, "message": str(e), "pid": os.getpid(),
               "start": start, "end": time.time()}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
