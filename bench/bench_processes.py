"""Many processes, one cache: N = 2, 4, 8 workers resolving one handle on an
empty cache (time until the last is usable, archive bytes served, how long
after the publish each waiter woke), kill -9 of the downloader half way (time
until another process is usable, bytes served), and the peak RSS growth of a
resolving process. tensorflow_hub is measured alongside where it finishes in
reasonable time.

    python bench/bench_processes.py [--size 1024] [--runs 3] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import common

TFHUB_WORKER = r"""
import json, sys, time
t = time.time()
import tensorflow_hub as hub
hub.resolve(sys.argv[1])
print(json.dumps({"start": t, "end": time.time()}))
"""


def spawn(url: str, cache: str, tfhub: bool = False) -> subprocess.Popen:
    env = dict(os.environ, TFHUB_CACHE_DIR=cache, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = ([sys.executable, "-c", TFHUB_WORKER, url] if tfhub
           else [sys.executable, "-m", "hubfast.testing.worker", url])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=1800)
    return json.loads(out.strip().splitlines()[-1])


def n_processes(srv, path: str, n: int, tfhub: bool = False) -> dict:
    cache = str(common.fresh_dir(f"n{n}"))
    before = srv.stats.path(path).body_bytes
    t0 = time.time()
    procs = [spawn(srv.url + path, cache, tfhub) for _ in range(n)]
    rs = [result(p) for p in procs]
    last = max(r["end"] for r in rs) - t0
    served = srv.stats.path(path).body_bytes - before
    wakes = []
    if not tfhub:
        writer = [r for r in rs if r.get("downloaded")]
        if writer:
            pub = writer[0]["end"]
            wakes = [r["end"] - pub for r in rs if not r.get("downloaded")]
    return {"last_usable": last, "served": served, "wake_max": max(wakes) if wakes else None,
            "wake_median": statistics.median(wakes) if wakes else None,
            "downloads": sum(1 for r in rs if r.get("downloaded"))}


def kill9(srv, path: str, size: int) -> dict:
    cache = str(common.fresh_dir("kill9"))
    before = srv.stats.path(path).body_bytes
    a = spawn(srv.url + path, cache)
    b = spawn(srv.url + path, cache)
    while srv.stats.path(path).body_bytes - before < size // 2:
        if a.poll() is not None:
            break
        time.sleep(0.002)
    # Kill whichever is downloading: the one whose temp dir exists (both may
    # have started; only the lock holder writes).
    victim = a
    killed = time.time()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    r = result(b)
    return {"usable_after_kill": r["end"] - killed,
            "served_ratio": (srv.stats.path(path).body_bytes - before) / size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tfhub-n", default="4", help="N values also run with tensorflow_hub")
    args = ap.parse_args()
    size_mib = 64 if args.quick else args.size
    runs = 1 if args.quick else args.runs
    gz = common.archive(size_mib, "gz")
    size = gz.stat().st_size
    from hubfast.server import TFHubServer

    rows, lines = [], []
    with TFHubServer() as srv:
        path = "/bench/model/1"
        srv.add_archive(path, str(gz), goog_hash="md5")
        for n in (2, 4, 8):
            rs = [n_processes(srv, path, n) for _ in range(runs)]
            row = {"tool": f"hubfast N={n}", "n": n, "size_mib": size_mib,
                   "last_usable": [r["last_usable"] for r in rs],
                   "served_x": [r["served"] / size for r in rs],
                   "wake_max_ms": [1000 * r["wake_max"] for r in rs if r["wake_max"] is not None],
                   "downloads": [r["downloads"] for r in rs]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for n in [int(x) for x in args.tfhub_n.split(",") if x]:
            rs = [n_processes(srv, path, n, tfhub=True) for _ in range(runs)]
            row = {"tool": f"tensorflow_hub N={n}", "n": n, "size_mib": size_mib,
                   "last_usable": [r["last_usable"] for r in rs],
                   "served_x": [r["served"] / size for r in rs]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        ks = [kill9(srv, path, size) for _ in range(runs)]
        row = {"tool": "hubfast kill -9 half way", "size_mib": size_mib,
               "usable_after_kill": [k["usable_after_kill"] for k in ks],
               "served_x": [k["served_ratio"] for k in ks]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        cache = str(common.fresh_dir("rss"))
        r = result(spawn(srv.url + path, cache))
        rows.append({"tool": "hubfast peak RSS growth while resolving", "size_mib": size_mib,
                     "peak_rss_growth_mib": r["peak_rss_growth_mib"]})
        shutil.rmtree(cache, ignore_errors=True)
    common.record("processes", rows)

    def mmm(xs):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "-"
        return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"

    lines.append(f"## Many processes, one cache ({size_mib} MiB model, .tar.gz {size / 2**20:.0f} MiB, "
                 f"{runs} runs; {common.machine()['time']}, load {' '.join(common.machine()['loadavg'])})\n")
    lines.append("| case | last usable s | archive bytes served (x size) | waiter woke after publish, max ms |"
                 " downloads |")
    lines.append("|---|---:|---:|---:|---:|")
    for r in rows:
        if "last_usable" in r:
            lines.append(f"| {r['tool']} | {mmm(r['last_usable'])} | {mmm(r['served_x'])} | "
                         f"{mmm(r.get('wake_max_ms', []))} | {r.get('downloads', '-')} |")
    k = next(r for r in rows if r["tool"].startswith("hubfast kill"))
    lines.append(f"\nkill -9 of the downloader half way: another process usable after "
                 f"{mmm(k['usable_after_kill'])} s; archive bytes served {mmm(k['served_x'])} x size.")
    rss = rows[-1]["peak_rss_growth_mib"]
    lines.append(f"\nPeak RSS growth of a resolving process: {rss:.0f} MiB.\n")
    text = "\n".join(lines)
    (common.OUT / "processes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
