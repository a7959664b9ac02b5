"""Interleaved A/B of one change: cold resolve() of one archive under two variants, run in
alternating order (ABBA...) so that this machine's drifting speed falls on both alike.
A variant is a list of environment assignments for the resolving process, e.g.
`HUBFAST_CONNECTIONS=2`, or `PYTHONPATH=/tmp/old` for another build of hubfast.

    python bench/bench_ab.py --size 1024 --kind zst --runs 6 --a HUBFAST_CONNECTIONS=2 --b ""
    python bench/bench_ab.py --size 1024 --kind zst --local --a PYTHONPATH=/tmp/old --b ""
    python bench/bench_ab.py --size 256 --kind gz --cap 50e6 --a PYTHONPATH=/tmp/old --b ""
    python bench/bench_ab.py --size 1024 --kind zst --a "" --b "" --trace /tmp/traces

Over HTTP the archive is served on loopback (hubfast.testing.TFHubServer, in this process,
digests computed before any timed run); with --local the file itself is resolved. Prints
median and min-max of the wall time, the median CPU of the resolving process and the
connections of each run, and appends JSON lines to bench/out/ab.jsonl.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Dict, List

import bench_fetch
import common


def parse_env(spec: str) -> Dict[str, str]:
    env = {}
    for item in spec.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant items are NAME=VALUE, got {item!r}")
        env[key] = value
    return env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="model size, MiB")
    ap.add_argument("--kind", default="zst", choices=["gz", "zst", "zst32"])
    ap.add_argument("--runs", type=int, default=6, help="runs of each variant")
    ap.add_argument("--a", default="", help="variant A: NAME=VALUE ...")
    ap.add_argument("--b", default="", help="variant B: NAME=VALUE ...")
    ap.add_argument("--local", action="store_true", help="resolve the local file, no HTTP")
    ap.add_argument("--cap", type=float, default=0, help="bytes/s per connection (0: none)")
    ap.add_argument("--trace", metavar="DIR",
                    help="HUBFAST_GROWTH_TRACE=1 in every run; each run's trace goes to DIR/<A|B>-<n>.err "
                         "(one line per 20 ms growth window: its readings and the connections added)")
    ap.add_argument("--verbose", action="store_true",
                    help="each run: wall, CPU, peak RSS growth, minor faults, involuntary switches, VM steal")
    args = ap.parse_args()

    arch = common.archive(args.size, args.kind)
    variants = {"A": parse_env(args.a), "B": parse_env(args.b)}
    outs: Dict[str, List[Dict]] = {"A": [], "B": []}
    srv = None
    if args.local:
        handle = str(arch)
    else:
        from hubfast.server import TFHubServer

        srv = TFHubServer(bandwidth=args.cap or None)
        path = "/bench/ab/" + arch.name
        srv.add_archive(path, str(arch), goog_hash="both")
        srv.precompute_digests(path)
        srv.start()
        handle = srv.url + path
    common.WARM_MIB[0] = args.size  # see common.COLD_PAGES
    trace_dir = Path(args.trace) if args.trace else None
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        for v in variants.values():
            v["HUBFAST_GROWTH_TRACE"] = "1"
    try:
        for i in range(args.runs):
            for v in ("AB" if i % 2 == 0 else "BA"):
                keep = (lambda err, f=trace_dir / f"{v}-{i}.err": f.write_text(err)) if trace_dir else None
                outs[v].append(bench_fetch.timed(bench_fetch.child(bench_fetch.HUBFAST_CHILD, handle, variants[v],
                                                                   stderr_to=keep)))
    finally:
        common.free_pending()
        if srv is not None:
            srv.close()

    m = common.machine()
    where = "local file" if args.local else "HTTP, loopback" + (f", {args.cap / 1e6:g} MB/s per connection" if args.cap else "")
    print(f"{args.size} MiB .{args.kind}, {where}, {args.runs} interleaved runs each "
          f"({m['time']}, load {' '.join(m['loadavg'])})")
    rows = []
    for v in "AB":
        r = bench_fetch._summary([o["seconds"] for o in outs[v]])
        r.update(tool=f"{v}: {args.a if v == 'A' else args.b or '(default)'}", size_mib=args.size,
                 kind=args.kind, local=args.local, cap=args.cap or None,
                 cpu_seconds=statistics.median(o["cpu_seconds"] for o in outs[v]),
                 connections=[o.get("source", {}).get("connections") for o in outs[v]],
                 runs_detail=[{k: o.get(k) for k in ("seconds", "cpu_seconds", "rss_growth_mib", "minor_faults",
                                                     "involuntary_switches", "steal_seconds")}
                              for o in outs[v]])
        rows.append(r)
        print(f"  {r['tool']:40s} {r['median']:.3f} s [{r['min']:.3f}-{r['max']:.3f}]  "
              f"cpu {r['cpu_seconds']:.2f} s  connections {r['connections']}")
        if args.verbose:
            for o in r["runs_detail"]:
                print(f"      {o['seconds']:.3f} s  cpu {o['cpu_seconds']:.2f} s  "
                      f"peak RSS +{o['rss_growth_mib']:.0f} MiB  minor faults "
                      f"{o['minor_faults']}  involuntary switches {o['involuntary_switches']}  "
                      f"steal {o['steal_seconds']:.2f} s")
    common.record("ab", rows)


if __name__ == "__main__":
    main()
