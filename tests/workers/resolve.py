"""A worker process for the cache tests: resolves (or loads) one handle and
prints one JSON line with what happened and when."""
import json
import os
import sys
import time

import hubfast


def main() -> None:
    handle = sys.argv[1]
    start = time.time()
    if os.environ.get("WORKER_READY_FILE"):
        open(os.environ["WORKER_READY_FILE"] + f".{os.getpid()}", "w").close()
    try:
        path = hubfast.resolve(handle)
        stats = hubfast.last_stats()
        out = {"ok": True, "path": path, "downloaded": not stats.get("cached", True),
               "repaired": stats.get("repaired", False), "lock_wait": stats.get("lock_wait", 0.0),
               "start": start, "end": time.time(), "pid": os.getpid()}
        hold = float(os.environ.get("WORKER_HOLD_SECONDS", "0"))
        if hold:
            # Act as a reader: hold the entry's use-lock like load() does.
            entry = hubfast.resolvers.resolve_entry(handle)
            with entry.in_use():
                print(json.dumps(dict(out, holding=True)), flush=True)
                time.sleep(hold)
            return
    except Exception as e:  # reported, not raised: the test inspects it
        out = {"ok": False, "error": type(e).__name__, "message": str(e), "pid": os.getpid(),
               "start": start, "end": time.time()}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
