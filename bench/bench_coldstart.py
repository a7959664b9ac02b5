"""Cold start, process spawn to first prediction, cold cache: tensorflow_hub,
hubfast in the seed style (`import tensorflow` first) and hubfast with
`import hubfast; prefetch(url)` first, split into import, fetch, load and
first call; plus warm `load()` and warm `resolve()`.

    python bench/bench_coldstart.py [--sizes 256,1024] [--runs 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import common


def warm_resolve_ms(url: str, cache: str) -> list:
    """Warm resolve() in-process, after one cold resolve: the manifest check."""
    import hubfast

    os.environ["TFHUB_CACHE_DIR"] = cache
    hubfast.resolve(url)
    samples = []
    for _ in range(200):
        t = time.perf_counter()
        hubfast.resolve(url)
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    runs = 1 if args.quick else args.runs
    from hubfast.testing import coldstart
    from hubfast.server import TFHubServer

    rows, report = [], []
    for size in sizes:
        gz, zst = common.archive(size, "gz"), common.archive(size, "zst")
        with TFHubServer() as srv:
            # As GCS serves tfhub.dev's archives: x-goog-hash with crc32c and md5, computed
            # before any timed run (GCS stores them; computing them is the server's cost).
            srv.add_archive("/bench/gz/1", str(gz), goog_hash="both")
            srv.add_archive("/bench/zst/1.tar.zst", str(zst), goog_hash="both")
            srv.precompute_digests("/bench/gz/1")
            srv.precompute_digests("/bench/zst/1.tar.zst")
            cases = [
                ("tensorflow_hub .tar.gz", "tensorflow_hub", "/bench/gz/1"),
                ("hubfast seed style .tar.gz", "seed", "/bench/gz/1"),
                ("hubfast prefetch .tar.gz", "prefetch", "/bench/gz/1"),
                ("hubfast prefetch .tar.zst", "prefetch", "/bench/zst/1.tar.zst"),
            ]
            samples = {name: [] for name, _, _ in cases}
            for _ in range(runs):  # round robin: drifting load hits every loader alike
                for name, style, path in cases:
                    cache = str(common.fresh_dir("cold"))  # the last run's tree goes
                    os.sync()  # and no writeback of it is left to compete with this run
                    samples[name].append(coldstart.run(style, srv.url + path, cache))
            for name, _, _ in cases:
                row = {"tool": name, "size_mib": size, "runs": samples[name],
                       "load_avg": os.getloadavg()[0]}
                for k in ("spawn_to_usable", "import", "load", "first_call", "fetch"):
                    vals = [s[k] for s in samples[name] if s.get(k) is not None]
                    row[k] = statistics.median(vals) if vals else None
                row["min"] = min(s["spawn_to_usable"] for s in samples[name])
                row["max"] = max(s["spawn_to_usable"] for s in samples[name])
                rows.append(row)
                print(f"{size:5d} MiB {name:30s} {row['spawn_to_usable']:6.2f} s", flush=True)
            # Warm: the cache holds the entry.
            cache = str(common.fresh_dir("warm"))
            coldstart.run("seed", srv.url + "/bench/gz/1", cache)
            warm = [coldstart.run("seed", srv.url + "/bench/gz/1", cache) for _ in range(runs)]
            rows.append({"tool": "hubfast warm load()", "size_mib": size,
                         "load": statistics.median(w["load"] for w in warm),
                         "min": min(w["load"] for w in warm), "max": max(w["load"] for w in warm)})
            ms = warm_resolve_ms(srv.url + "/bench/gz/1", str(common.fresh_dir("warmres")))
            rows.append({"tool": "hubfast warm resolve() ms", "size_mib": size,
                         "median_ms": statistics.median(ms), "p99_ms": sorted(ms)[int(len(ms) * 0.99)]})
        tf = next(r for r in rows if r["size_mib"] == size and r["tool"] == "tensorflow_hub .tar.gz")
        lines = [f"### {size} MiB model\n",
                 "| loader | spawn->usable s (median [min-max]) | vs tensorflow_hub | import | load (incl. fetch) | first call | fetch |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["size_mib"] != size or "spawn_to_usable" not in r:
                continue
            fetch = f"{r['fetch']:.2f}" if r.get("fetch") else "-"
            lines.append(f"| {r['tool']} | {r['spawn_to_usable']:.2f} [{r['min']:.2f}-{r['max']:.2f}] | "
                         f"{r['spawn_to_usable'] / tf['spawn_to_usable']:.2f}x | {r['import']:.2f} | "
                         f"{r['load']:.2f} | {r['first_call']:.2f} | {fetch} |")
        wl = next(r for r in rows if r["size_mib"] == size and r["tool"] == "hubfast warm load()")
        wr = next(r for r in rows if r["size_mib"] == size and r["tool"] == "hubfast warm resolve() ms")
        lines.append(f"\nWarm `load()` {wl['load']:.2f} s [{wl['min']:.2f}-{wl['max']:.2f}]; warm `resolve()` "
                     f"{wr['median_ms']:.3f} ms median, {wr['p99_ms']:.3f} ms p99 (manifest check included).\n")
        report.append("\n".join(lines))
    common.record("coldstart", rows)
    m = common.machine()
    text = (f"## Cold start, spawn to first prediction ({m['time']}, load {' '.join(m['loadavg'])}, "
            f"{runs} runs)\n\n" + "\n".join(report))
    (common.OUT / "coldstart.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
