"""Many hosts loading one model at once, on simulated hosts with capped links: every host
straight from the origin (`direct`), through the README's nginx caching proxy (`proxy`).

    sudo python bench/bench_cluster.py --hosts 8 --json
    sudo python bench/bench_cluster.py --hosts 4 --size 32 --rate 20e6

Each host is a network namespace joined to a bridge (no default route: nothing leaves the
machine), every link capped with tc in both directions (hubfast.testing.netsim). The
archive holds random bytes (gzip stores them: the links are measured, not the decoder), sized
so the two cores stay under half busy. Prints one JSON document with --json:

    {"rows": [{"mode": "direct|proxy", "hosts": N, "archive_bytes": ..., "origin_bytes": ...,
               "single_host_s": ..., "first_ready_s": ..., "last_ready_s": ..., "identical": true}]}

origin_bytes: body bytes the origin's server sent for the all-hosts round; single_host_s: one
host alone, cold, in that mode; *_ready_s: from the common start to each host's resolve().
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from hubfast.pack import pack  # noqa: E402
from hubfast.testing.cluster import Cluster  # noqa: E402


def random_model(where: Path, size: int) -> Path:
    """A model directory of ``size`` random bytes (incompressible) plus a small graph."""
    d = where / "model"
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"graph" * 2000)
    (d / "variables" / "variables.index").write_bytes(b"index" * 100)
    with open(d / "variables" / "variables.data-00000-of-00001", "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    return d


def run(hosts: int, size: int, rate: float, modes: List[str]) -> List[Dict]:
    with tempfile.TemporaryDirectory(prefix="hubfast-bench-cluster-") as tmp:
        src = random_model(Path(tmp), size)
        archive = Path(tmp) / "model.tar.gz"
        pack(src, archive, gzip_tool="auto", level=1)
        rows = []
        with Cluster(hosts, archive, src, rate, Path(tmp) / "work") as c:
            for mode in modes:
                rows.append(getattr(c, f"{mode}_row")())
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="MiB of model (default 128)")
    p.add_argument("--rate", type=float, default=20e6,
                   help="each link's cap in bytes/s, both directions (default 20e6)")
    p.add_argument("--modes", default="direct,proxy,swarm")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON document")
    args = p.parse_args()
    rows = run(args.hosts, args.size << 20, args.rate, args.modes.split(","))
    if args.json:
        print(json.dumps({"rows": rows}, indent=1))
    else:
        cols = list(rows[0])
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r[k]) for k in cols))


if __name__ == "__main__":
    main()
