"""The full benchmark suite in one run, then bench/RESULTS.md and a chart.

    python bench/run_all.py            # 256 MiB, 1 GiB (and 2 GiB for extraction), 3 runs each
    python bench/run_all.py --quick    # 64 MiB, 1 run: a couple of minutes, while working

Each part writes bench/out/<part>.md and appends JSON lines to
bench/out/<part>.jsonl; this script stitches the Markdown into
bench/RESULTS.md and draws bench/coldstart.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common

HERE = Path(__file__).parent


def part(script: str, *args: str) -> None:
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def chart() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no chart; pip install 'hubfast[bench]')")
        return
    rows = [json.loads(line) for line in (common.OUT / "coldstart.jsonl").read_text().splitlines()]
    latest = {}
    for r in rows:  # the newest measurement of each (tool, size)
        if "spawn_to_usable" in r:
            latest[(r["tool"], r["size_mib"])] = r
    tools = sorted({t for t, _ in latest})
    fig, ax = plt.subplots(figsize=(7, 4))
    for tool in tools:
        pts = sorted((s, r["spawn_to_usable"]) for (t, s), r in latest.items() if t == tool)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=tool)
    ax.set_xlabel("model size (MiB)")
    ax.set_ylabel("spawn to first prediction, cold cache (s)")
    ax.set_title("Cold start: hubfast vs tensorflow_hub")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "coldstart.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", default="3")
    ap.add_argument("--assemble-only", action="store_true",
                    help="only rebuild RESULTS.md and the chart from bench/out")
    args = ap.parse_args()
    if args.assemble_only:
        return assemble()
    q = ["--quick"] if args.quick else ["--runs", args.runs]
    part("bench_extract.py", *(q if args.quick else q + ["--sizes", "1024,2048"]))
    if (HERE / "bench_fetch.py").exists():
        part("bench_fetch.py", *(q if args.quick else q + ["--sizes", "256,1024", "--cap-size", "256,1024"]))
    part("bench_coldstart.py", *(q if args.quick else q + ["--sizes", "256,1024"]))
    part("bench_processes.py", *(q if args.quick else q + ["--size", "1024"]))
    if not args.quick:  # 1 GiB only: the gate is defined on it (about 2 minutes)
        part("bench_pgzip.py", "--runs", args.runs)
    assemble()


def assemble() -> None:
    chart()
    head = (HERE / "RESULTS.head.md").read_text() if (HERE / "RESULTS.head.md").exists() else ""
    parts = [head] + [(common.OUT / f"{p}.md").read_text()
                      for p in ("extract", "fetch", "coldstart", "processes", "pgzip")
                      if (common.OUT / f"{p}.md").exists()]
    if (HERE / "coldstart.png").exists():
        parts.append("![cold start by model size](coldstart.png)\n")
    (HERE / "RESULTS.md").write_text("\n\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
