"""What the transfer costs when it has a core of its own: cold resolve() of one .tar.gz over
loopback HTTP and from the local file, with the parallel gzip decoder on both cores
(`HUBFAST_DECODE_THREADS=2`) and on one (the other left to the kernel's TCP and the test
server), all four in round robin. On a 2-core machine the "transfer adds" ratio of
bench_fetch.py is this machine's cores being shared, not hubfast's HTTP path, when the
second pair is level.

    python bench/bench_cores.py --size 256 --runs 5

Prints median and min-max per row and the ratio per thread count; appends JSON lines to
bench/out/cores.jsonl.
"""
from __future__ import annotations

import argparse

import bench_fetch
import common


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256, help="model size, MiB")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from hubfast.server import TFHubServer

    arch = common.archive(args.size, "gz")
    srv = TFHubServer()
    path = "/bench/cores/" + arch.name
    srv.add_archive(path, str(arch), goog_hash="both")
    srv.precompute_digests(path)
    srv.start()
    tools = []
    for threads in ("2", "1"):
        env = {"HUBFAST_DECODE_THREADS": threads}
        tools += [(f"HTTP, {threads} decoding thread(s)", bench_fetch.child(bench_fetch.HUBFAST_CHILD, srv.url + path, env)),
                  (f"local file, {threads} decoding thread(s)", bench_fetch.child(bench_fetch.HUBFAST_CHILD, str(arch), env))]
    try:
        res = bench_fetch.round_robin(tools, args.runs, warm_mib=args.size)
    finally:
        srv.close()

    m = common.machine()
    print(f"{args.size} MiB .tar.gz, {args.runs} rounds ({m['time']}, load {' '.join(m['loadavg'])})")
    rows = []
    for name, r in res.items():
        rows.append(dict(r, tool=name, size_mib=args.size))
        print(f"  {name:36s} {r['median']:.3f} s [{r['min']:.3f}-{r['max']:.3f}]  cpu {r.get('cpu_seconds', 0):.2f} s")
    for threads in ("2", "1"):
        http = res[f"HTTP, {threads} decoding thread(s)"]["median"]
        local = res[f"local file, {threads} decoding thread(s)"]["median"]
        print(f"  {threads} decoding thread(s): the transfer adds {100 * (http / local - 1):+.0f}%")
    common.record("cores", rows)


if __name__ == "__main__":
    main()
