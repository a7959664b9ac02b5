"""Cold resolve() over loopback HTTP: hubfast next to tensorflow_hub's hub.resolve, the shell
pipeline `curl | igzip -dc | tar -x`, the transfer floor `curl -o /dev/null`, and hubfast
extracting the same archive from a local file; then, with a per-connection bandwidth cap
(50 MB/s), hubfast on one connection against its default parallel ranged connections;
at 1 GiB and up also the multi-frame .tar.zst over HTTP against `zstd -dc`; and the peak RSS
of a process resolving a 2 GiB model.

    python bench/bench_fetch.py [--sizes 256,1024] [--runs 3] [--cap-size 256,1024] [--cap 50e6]
                                [--rss-size 2048] [--cap-only]
    python bench/bench_fetch.py --quick     (64 MiB, 1 run; the capped part on 128 MiB)

Every resolve runs in a fresh subprocess on a fresh TFHUB_CACHE_DIR, and is timed inside
the subprocess around the resolve call only (imports excluded: tensorflow_hub imports
TensorFlow). Shell pipelines are timed from outside (their start-up is a few ms).
The tools of a table run round robin (each round runs every tool once), so that a slow
phase of this shared machine falls on all rows alike; each run records the VM's stolen CPU
time meanwhile (`steal_seconds` in the JSON lines).
The server (hubfast.server, in this process) streams the archive from the page cache
with ETag, Accept-Ranges and x-goog-hash (crc32c, md5) like GCS.

Targets: the transfer adds <= 15% to local extraction; >= 2.3x faster than tensorflow_hub at
1 GiB .tar.gz; .tar.zst >= 6x tensorflow_hub's .tar.gz and faster than `zstd -dc`; under the
cap, >= 6x the single-connection rate; peak RSS at 2 GiB < 256 MiB above the baseline.
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
from typing import Callable, Dict, List, Optional, Tuple

import common

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")
HANDLE = "/bench/model/1"

HUBFAST_CHILD = r"""
import json, resource, sys, time
import hubfast
""" + common.CHILD_PREPARE_CODE + r"""
def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
# ru_maxrss is carried over from the spawning process (exec keeps the peak), so the peak is
# reset here and read from VmHWM: growth over the interpreter with hubfast imported.
base = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
r0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
hubfast.resolve(sys.argv[1])
dt = time.perf_counter() - t
r1 = resource.getrusage(resource.RUSAGE_SELF)
rss = (status_kib("VmHWM") - base) / 1024  # MiB
st = hubfast.last_stats()
assert not st.get("cached", True), st
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "rss_growth_mib": rss, "source": st.get("source", {}),
                  "bytes_out": st.get("bytes_out"), "minor_faults": r1.ru_minflt - r0.ru_minflt,
                  "involuntary_switches": r1.ru_nivcsw - r0.ru_nivcsw,
                  "sys_seconds": r1.ru_stime - r0.ru_stime, "voluntary_switches": r1.ru_nvcsw - r0.ru_nvcsw}))
"""

TFHUB_CHILD = r"""
import json, sys, time
import tensorflow_hub as hub
""" + common.CHILD_PREPARE_CODE + r"""
t = time.perf_counter()
hub.resolve(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def _summary(samples: List[float]) -> Dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "runs": samples}


def child(code: str, handle: str, env: Optional[Dict[str, str]] = None,
          stderr_to: Optional[Callable[[str], None]] = None) -> Callable[[], Dict]:
    """A run: a fresh process and cache resolving `handle`; returns the child's JSON line.
    `stderr_to` receives the child's stderr (a trace) when it succeeds."""

    def run() -> Dict:
        cache = common.run_dir("fetch-cache")
        e = {k: v for k, v in os.environ.items()
             if not k.startswith(("HUBFAST_", "TFHUB_")) and k.lower() not in
             ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        pp = PYTHON_DIR + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        e.update(PYTHONPATH=pp, TFHUB_CACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="3",
                 **common.warm_env(common.WARM_MIB[0]))
        e.update(env or {})
        try:
            p = subprocess.run([sys.executable, "-c", code, handle], env=e, capture_output=True,
                               text=True, timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"child failed ({p.returncode}): {p.stderr[-3000:]}")
            if stderr_to is not None:
                stderr_to(p.stderr)
            return json.loads(p.stdout.strip().splitlines()[-1])
        finally:
            common.release(cache)

    return run


def summarize(outs: List[Dict]) -> Dict:
    """Median, min and max of the runs' seconds, with what the runs report besides."""
    r = _summary([o["seconds"] for o in outs])
    if all("cpu_seconds" in o for o in outs):
        r["cpu_seconds"] = statistics.median(o["cpu_seconds"] for o in outs)
    if all("rss_growth_mib" in o for o in outs):
        r["rss_growth_mib"] = max(o["rss_growth_mib"] for o in outs)
    if all("steal_seconds" in o for o in outs):
        r["steal_seconds"] = [round(o["steal_seconds"], 2) for o in outs]
    src = outs[-1].get("source")
    if src:
        r["source"] = {k: src[k] for k in ("connections", "segments", "resumes", "retries",
                                           "http_requests", "goog_hash_crc32c") if k in src}
    return r


def timed(run: Callable[[], Dict]) -> Dict:
    """One run, with the VM's stolen CPU time meanwhile: this shared machine's slow phases
    (the same work costing ~1.5x the CPU) come with steal, so a row can be read against it."""
    s0 = common.steal_seconds()
    o = run()
    return dict(o, steal_seconds=common.steal_seconds() - s0)


def measure_child(run: Callable[[], Dict], runs: int) -> Dict:
    try:
        return summarize([timed(run) for _ in range(runs)])
    finally:
        common.free_pending()


def round_robin(tools: List[Tuple[str, Callable[[], Dict]]], runs: int,
                warm_mib: int = 0) -> Dict[str, Dict]:
    """Each round runs every tool once, so a slow phase of the machine falls on all of them
    alike and the ratios between rows hold (runs of one tool back to back did not). Every
    writing run starts right after the previous run's output is deleted and `warm_mib`
    MiB are written and deleted (common.COLD_PAGES)."""
    outs: Dict[str, List[Dict]] = {name: [] for name, _ in tools}
    common.WARM_MIB[0] = warm_mib
    try:
        for _ in range(runs):
            for name, run in tools:
                outs[name].append(timed(run))
    finally:
        common.free_pending()
    return {name: summarize(outs[name]) for name, _ in tools}


def shell_once(cmd: str, writes: bool = True) -> Callable[[], Dict]:
    """One run of a shell pipeline into an empty scratch directory, timed from outside. One
    that `writes` nothing leaves the released outputs to the next run that does."""
    pipe = common.WORK / "scratch" / "pipe"

    def run() -> Dict:
        shutil.rmtree(pipe, ignore_errors=True)
        pipe.mkdir(parents=True)
        try:
            if writes:
                common.warm(common.WARM_MIB[0])
            t = time.perf_counter()
            subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], check=True, stdout=subprocess.DEVNULL)
            return {"seconds": time.perf_counter() - t}
        finally:
            done = common.run_dir("pipe-done")  # the command's path is fixed: move its output aside
            done.rmdir()
            os.rename(pipe, done)
            common.release(done)

    return run


def show(size: int, name: str, r: Dict) -> None:
    extra = f"  cpu {r['cpu_seconds']:.2f} s" if "cpu_seconds" in r else ""
    extra += f"  {r['source']}" if r.get("source") else ""
    if any(x >= 0.05 for x in r.get("steal_seconds", [])):
        extra += f"  VM steal {r['steal_seconds']} s"
    print(f"{size:5d} MiB  {name:44s} {r['median']:7.2f} s  [{r['min']:.2f}-{r['max']:.2f}]{extra}",
          flush=True)


def by_tool(rows: List[Dict]) -> Dict[str, Dict]:
    return {r["tool"]: r for r in rows}


T_HUBFAST = "hubfast resolve (HTTP)"
T_LOCAL = "hubfast resolve (local .tar.gz file)"
T_TFHUB = "tensorflow_hub hub.resolve (HTTP)"
T_PIPE = "curl | igzip -dc | tar -x"
T_CURL = "curl -o /dev/null (transfer floor)"
T_ONE = "hubfast HUBFAST_CONNECTIONS=1"
T_PAR = "hubfast default connections (8)"
T_CURL_CAP = "curl -o /dev/null (one connection)"
T_CURL_PAR = "8 x curl -r (ranges) -o /dev/null"
T_LOCAL_CAP = "hubfast resolve (local file, no network)"
T_ZST = "hubfast resolve .tar.zst (HTTP)"
T_ZST_LOCAL = "hubfast resolve (local .tar.zst file)"
T_ZST_PIPE = "curl | zstd -dc | tar -x"
T_ZSTD_DC = "zstd -dc > /dev/null (local file)"
HANDLE_ZST = "/bench/zst/model.tar.zst"  # a direct archive URL, as a mirror would serve it
HANDLE_ZST32 = "/bench/zst32/model.tar.zst"
T_ZST32 = "hubfast resolve .tar.zst, 32 MiB frames (HTTP)"


def md_rows(rows: List[Dict]) -> List[Dict]:
    """Rows whose tool names are safe in a Markdown table cell."""
    return [dict(r, tool=r["tool"].replace("|", "\\|")) for r in rows]


def md(name: str) -> str:
    return name.replace("|", "\\|")


def uncapped(srv, gz: Path, size: int, runs: int, tfhub: bool, zst: Optional[Path] = None) -> List[Dict]:
    url = srv.url_for(HANDLE)
    archive_url = srv.url_for(HANDLE, "tf-hub-format=compressed")
    pipe_dir = common.WORK / "scratch" / "pipe"
    tools = [
        (T_HUBFAST, child(HUBFAST_CHILD, url)),
        (T_LOCAL, child(HUBFAST_CHILD, str(gz))),
        (T_PIPE, shell_once(f"curl -sf '{archive_url}' | igzip -dc | tar -x -C {pipe_dir}")),
        (T_CURL, shell_once(f"curl -sf -o /dev/null '{archive_url}'", writes=False)),
    ]
    if zst is not None:
        zst_url = srv.url_for(HANDLE_ZST)
        tools += [
            (T_ZST, child(HUBFAST_CHILD, zst_url)),
            (T_ZST_LOCAL, child(HUBFAST_CHILD, str(zst))),
            (T_ZST_PIPE, shell_once(f"curl -sf '{zst_url}' | zstd -qdc | tar -x -C {pipe_dir}")),
            (T_ZSTD_DC, shell_once(f"zstd -qdc {zst} > /dev/null", writes=False)),
        ]
    if tfhub:
        tools.append((T_TFHUB, child(TFHUB_CHILD, url)))
    rows = []
    for name, r in round_robin(tools, runs, warm_mib=size).items():
        r = dict(r, tool=name, size_mib=size, archive_bytes=gz.stat().st_size, cap=None)
        rows.append(r)
        show(size, name, r)
    return rows


def capped(srv, gz: Path, size: int, runs: int, cap: float) -> List[Dict]:
    url = srv.url_for(HANDLE)
    archive_url = srv.url_for(HANDLE, "tf-hub-format=compressed")
    n = gz.stat().st_size
    cuts = [n * i // 8 for i in range(9)]
    ranged = " ".join(f"curl -sf -r {a}-{b - 1} -o /dev/null '{archive_url}' &" for a, b in zip(cuts, cuts[1:]))
    tools = [
        (T_ONE, child(HUBFAST_CHILD, url, {"HUBFAST_CONNECTIONS": "1"})),
        (T_PAR, child(HUBFAST_CHILD, url)),
        (T_CURL_CAP, shell_once(f"curl -sf -o /dev/null '{archive_url}'", writes=False)),
        # What the server and loopback deliver on 8 connections, and what the machine decodes
        # and writes without a network: the two ceilings of the parallel download.
        (T_CURL_PAR, shell_once(ranged + " wait", writes=False)),
        (T_LOCAL_CAP, child(HUBFAST_CHILD, str(gz))),
    ]
    rows = []
    for name, r in round_robin(tools, runs, warm_mib=size).items():
        r = dict(r, tool=name, size_mib=size, archive_bytes=gz.stat().st_size, cap=cap)
        rows.append(r)
        show(size, name if name == T_LOCAL_CAP else name + f" @ {cap / 1e6:g} MB/s", r)
    return rows


def serve(gz: Path, bandwidth: Optional[float] = None, zst: Optional[Path] = None):
    from hubfast.server import TFHubServer

    srv = TFHubServer(bandwidth=bandwidth)
    srv.add_archive(HANDLE, str(gz), goog_hash="both")
    srv.precompute_digests(HANDLE)  # not in any timed section
    if zst is not None:
        srv.add_archive(HANDLE_ZST, str(zst), goog_hash="both")
        srv.precompute_digests(HANDLE_ZST)
    return srv.start()


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report_uncapped(rows: List[Dict], size: int, gz: Path, runs: int) -> str:
    t = by_tool(rows)
    lines = [f"### {size} MiB model, .tar.gz {gz.stat().st_size / 2**20:.0f} MiB, no cap\n",
             common.table(md_rows(rows), md(T_TFHUB if T_TFHUB in t else T_HUBFAST), md(T_CURL)), ""]
    h, loc = t[T_HUBFAST]["median"], t[T_LOCAL]["median"]
    mbps = gz.stat().st_size / h / 1e6
    lines.append(f"- hubfast over HTTP: {h:.2f} s ({mbps:.0f} MB/s of archive); "
                 f"from the local file: {loc:.2f} s; the transfer adds {100 * (h / loc - 1):+.0f}% "
                 f"(target <= +15%: {verdict(h / loc <= 1.15)})")
    if T_TFHUB in t:
        x = t[T_TFHUB]["median"] / h
        target = " (target >= 2.3x at 1 GiB: " + verdict(x >= 2.3) + ")" if size >= 1024 else ""
        lines.append(f"- hubfast vs tensorflow_hub: {x:.2f}x faster{target}")
    lines.append(f"- hubfast vs `curl | igzip -dc | tar -x`: {t[T_PIPE]['median'] / h:.2f}x; "
                 f"transfer floor (curl to /dev/null) {t[T_CURL]['median']:.2f} s")
    src = t[T_HUBFAST].get("source") or {}
    if src:
        lines.append(f"- hubfast's fetch: {int(src.get('connections', 0))} connection(s), "
                     f"{int(src.get('segments', 0))} segments, crc32c checked: "
                     f"{bool(src.get('goog_hash_crc32c'))}; peak RSS growth "
                     f"{t[T_HUBFAST].get('rss_growth_mib', 0):.0f} MiB")
    if T_ZST in t:
        z = t[T_ZST]["median"]
        line = f"- multi-frame .tar.zst over HTTP: {z:.2f} s"
        if T_TFHUB in t:
            x = t[T_TFHUB]["median"] / z
            line += f", {x:.2f}x faster than tensorflow_hub's .tar.gz"
            if size >= 1024:
                line += f" (target >= 6x: {verdict(x >= 6)})"
        fl = t[T_ZSTD_DC]["median"]
        line += (f"; `zstd -dc > /dev/null` of the same file {fl:.2f} s "
                 f"(target: faster than it: {verdict(z < fl)}); from the local file {t[T_ZST_LOCAL]['median']:.2f} s")
        lines.append(line)
    return "\n".join(lines) + "\n"


def rss_part(size: int, runs: int) -> Tuple[List[Dict], str]:
    """Peak RSS of a process resolving a large model over HTTP (target: < 256 MiB above its
    baseline, the interpreter with hubfast imported), .tar.gz and .tar.zst."""
    gz, zst, zst32 = common.archive(size, "gz"), common.archive(size, "zst"), common.archive(size, "zst32")
    srv = serve(gz, zst=zst)
    srv.add_archive(HANDLE_ZST32, str(zst32), goog_hash="both")
    srv.precompute_digests(HANDLE_ZST32)
    rows = []
    try:
        for name, url in ((T_HUBFAST, srv.url_for(HANDLE)), (T_ZST, srv.url_for(HANDLE_ZST)),
                          (T_ZST32, srv.url_for(HANDLE_ZST32))):
            r = dict(measure_child(child(HUBFAST_CHILD, url), runs), tool=name, size_mib=size,
                     part="rss")
            rows.append(r)
            show(size, name, r)
            print(f"      peak RSS growth {r['rss_growth_mib']:.0f} MiB", flush=True)
    finally:
        srv.close()
    worst = max(r["rss_growth_mib"] for r in rows[:2])
    text = (f"### Peak RSS resolving a {size} MiB model over HTTP ({runs} runs each)\n\n"
            + "\n".join(f"- {r['tool']}: {r['median']:.2f} s, peak RSS growth {r['rss_growth_mib']:.0f} MiB "
                         f"(largest of the runs)" for r in rows)
            + f"\n- target < 256 MiB above the baseline: {verdict(worst < 256)} (`hubfast pack`'s 8 MiB "
              f"frames; 32 MiB frames: {verdict(rows[-1]['rss_growth_mib'] < 256)})\n")
    return rows, text


def report_capped(rows: List[Dict], size: int, gz: Path, cap: float) -> str:
    t = by_tool(rows)
    nbytes = gz.stat().st_size
    lines = [f"### {size} MiB model, .tar.gz {nbytes / 2**20:.0f} MiB, {cap / 1e6:g} MB/s per connection\n",
             common.table(md_rows(rows), md(T_ONE), md(T_CURL_CAP)), ""]
    one, par = t[T_ONE]["median"], t[T_PAR]["median"]
    x = one / par
    src = t[T_PAR].get("source") or {}
    lines.append(f"- one connection: {nbytes / one / 1e6:.0f} MB/s; default: {nbytes / par / 1e6:.0f} MB/s "
                 f"with {int(src.get('connections', 0))} connections, {int(src.get('segments', 0))} segments: "
                 f"{x:.1f}x the single-connection rate (target >= 6x: {verdict(x >= 6)})")
    ceilings = []
    if T_CURL_PAR in t:
        ceilings.append(f"8 curl ranges to /dev/null {nbytes / t[T_CURL_PAR]['median'] / 1e6:.0f} MB/s "
                        f"({one / t[T_CURL_PAR]['median']:.1f}x)")
    if T_LOCAL_CAP in t:
        ceilings.append(f"hubfast from the local file {nbytes / t[T_LOCAL_CAP]['median'] / 1e6:.0f} MB/s "
                        f"({one / t[T_LOCAL_CAP]['median']:.1f}x)")
    if ceilings:
        lines.append("- ceilings on this machine (the parallel rate cannot beat the slower one): "
                     + "; ".join(ceilings))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cap-size", default="256", help="model sizes (MiB) for the capped part, e.g. 256,1024")
    ap.add_argument("--cap", type=float, default=50e6, help="bytes/s per connection")
    ap.add_argument("--no-tfhub", action="store_true", help="skip tensorflow_hub (slow)")
    ap.add_argument("--rss-size", type=int, default=2048, help="model size (MiB) for peak RSS (0: skip)")
    ap.add_argument("--cap-only", action="store_true", help="only the capped part")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 run (capped part: 128 MiB)")
    args = ap.parse_args()
    if args.quick:
        # 128 MiB for the capped part: 64 MiB of model makes a .tar.gz just below the 64 MiB
        # threshold of parallel ranged connections.
        sizes, runs, cap_sizes, rss_size = [64], 1, [128], 0
    else:
        sizes, runs = [int(s) for s in args.sizes.split(",")], args.runs
        cap_sizes = [int(s) for s in str(args.cap_size).split(",") if s.strip()]
        rss_size = args.rss_size
    if args.cap_only:
        sizes, rss_size = [], 0

    m0 = common.machine()
    report = []
    all_rows: List[Dict] = []
    for size in sizes:
        gz = common.archive(size, "gz")
        zst = common.archive(size, "zst") if size >= 1024 else None
        common.drop_page_cache_of(gz)
        srv = serve(gz, zst=zst)
        try:
            rows = uncapped(srv, gz, size, runs, tfhub=not args.no_tfhub, zst=zst)
        finally:
            srv.close()
        common.record("fetch", rows)
        all_rows += rows
        report.append(report_uncapped(rows, size, gz, runs))

    for csize in cap_sizes:
        gz = common.archive(csize, "gz")
        common.drop_page_cache_of(gz)
        srv = serve(gz, bandwidth=args.cap)
        try:
            rows = capped(srv, gz, csize, runs, args.cap)
        finally:
            srv.close()
        common.record("fetch", rows)
        report.append(report_capped(rows, csize, gz, args.cap))
    if rss_size:
        rows, text = rss_part(rss_size, runs)
        common.record("fetch", rows)
        report.append(text)

    m = common.machine()
    text = (f"## Cold resolve over loopback HTTP ({m['time']}, {m['cores']} cores, load "
            f"{' '.join(m0['loadavg'])} at start, {' '.join(m['loadavg'])} at end)\n\n"
            f"Median of {runs} run(s), min-max. Each run: a fresh process and an empty cache, timed "
            "around the resolve call only (imports excluded). 'vs' columns: speed-up over the "
            "baseline, and time relative to the transfer floor (lower is better).\n\n"
            + "\n".join(report))
    (common.OUT / "fetch.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
