"""One gzip stream decoded on several cores: hubfast's parallel gzip decoder
against single-stream ISA-L (igzip -dc and hubfast's sequential decoder),
gzip -dc and, when installed, rapidgzip and pigz.

The input is the issue's: a 1 GiB tar of float32 Gaussian weights
(np.random.default_rng(0).standard_normal), one `gzip -6` member, built once
under /tmp/pgzip-bench/. Every tool decodes it to /dev/null; tools are
interleaved round by round so that a burst of load from other processes hits
them alike; the 1-minute load average is recorded before every run.

    python bench/bench_pgzip.py [--runs 3] [--size-mib 1024] [--chunk-mib 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("PGZIP_BENCH_DIR", "/tmp/pgzip-bench"))
OUT = Path(__file__).parent / "out"
BENCH_BIN = ROOT / "build" / "pgzip" / "pgzip_bench"


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def make_input(size_mib: int) -> Path:
    gz = WORK / (f"model.tar.gz" if size_mib == 1024 else f"model-{size_mib}m.tar.gz")
    if gz.exists():
        return gz
    import numpy as np

    WORK.mkdir(parents=True, exist_ok=True)
    src = WORK / "model-src"
    shutil.rmtree(src, ignore_errors=True)
    (src / "variables").mkdir(parents=True)
    rng = np.random.default_rng(0)
    total = size_mib << 20
    with open(src / "variables" / "variables.data-00000-of-00001", "wb") as f:
        done = 0
        while done < total:
            n = min(1 << 24, (total - done) // 4)
            f.write(rng.standard_normal(n, dtype=np.float32).tobytes())
            done += 4 * n
    tar = gz.with_suffix("")
    subprocess.run(["tar", "-cf", str(tar), "-C", str(src), "."], check=True)
    shutil.rmtree(src)
    subprocess.run(["gzip", "-6", "-f", str(tar)], check=True)
    return gz


def build_bench() -> None:
    subprocess.run([str(ROOT / "bench" / "pgzip" / "build.sh")], check=True, stdout=subprocess.DEVNULL)


def run_once(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    stats = {}
    for line in p.stderr.splitlines():
        if line.startswith("{"):
            stats = json.loads(line)
    return dt, stats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-mib", type=float, default=4)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/out/pgzip.*")
    args = ap.parse_args()

    gz = make_input(args.size_mib)
    build_bench()
    tools: list[tuple[str, list[str]]] = [
        ("igzip -dc (ISA-L, one stream)", ["igzip", "-dc", str(gz)]),
        ("hubfast sequential decoder (ISA-L, one stream)", [str(BENCH_BIN), "seq", str(gz)]),
    ]
    for t in args.threads.split(","):
        tools.append((f"hubfast parallel, {t} thread{'s' if t != '1' else ''}",
                      [str(BENCH_BIN), "par", t, str(gz), str(args.chunk_mib)]))
    tools.append(("gzip -dc", ["gzip", "-dc", str(gz)]))
    if shutil.which("pigz"):
        tools.append(("pigz -dc", ["pigz", "-dc", str(gz)]))
    if shutil.which("rapidgzip"):
        tools.append(("rapidgzip -P 2 -d -c", ["rapidgzip", "-P", "2", "-d", "-c", str(gz)]))

    with open(gz, "rb") as f:  # warm page cache for every tool
        while f.read(8 << 20):
            pass
    times: dict[str, list[float]] = {name: [] for name, _ in tools}
    loads: dict[str, list[float]] = {name: [] for name, _ in tools}
    stats: dict[str, dict] = {}
    for r in range(args.runs):
        for name, cmd in tools:
            loads[name].append(loadavg())
            dt, st = run_once(cmd)
            times[name].append(dt)
            if st:
                stats[name] = st
            print(f"round {r + 1}: {name}: {dt:.2f} s (load {loads[name][-1]:.2f})", file=sys.stderr)

    base = statistics.median(times[tools[1][0]])
    igz = statistics.median(times[tools[0][0]])
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        f"## One gzip stream on several cores ({stamp}, {os.cpu_count()} cores)",
        "",
        f"{gz.name}: {gz.stat().st_size / 2**20:.0f} MiB gzip -6 of a {args.size_mib} MiB tar of float32 "
        f"Gaussian weights, decoded to /dev/null; median of {args.runs}, min-max; chunk {args.chunk_mib:g} MiB.",
        "",
        "| decoder | median s | min-max s | speed vs sequential ISA-L | vs igzip -dc | load avg (1 min) at start |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, _ in tools:
        t = times[name]
        med = statistics.median(t)
        lines.append(f"| {name} | {med:.2f} | {min(t):.2f}-{max(t):.2f} | {base / med:.2f}x | {igz / med:.2f}x | "
                     f"{' '.join(f'{x:.2f}' for x in loads[name])} |")
    for name, st in stats.items():
        if st.get("parallel"):
            lines.append("")
            lines.append(f"{name}: {st['chunks']} chunks, {st['chunks_used']} speculative chunks used, "
                         f"{st['false_starts']} false block starts, {st['marker_symbols'] / 2**20:.1f} MiB decoded "
                         f"with markers, {st['isal_bytes'] / 2**20:.0f} MiB by ISA-L")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        OUT.mkdir(exist_ok=True)
        (OUT / "pgzip.md").write_text(report)
        with open(OUT / "pgzip.jsonl", "a") as f:
            f.write(json.dumps({"time": stamp, "input": str(gz), "chunk_mib": args.chunk_mib,
                                "times": times, "loadavg": loads, "stats": stats}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
