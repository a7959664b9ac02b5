"""Shared benchmark machinery: test models (float32 Gaussian weights, which
compress like real ones), archives, repeated timing with median/min/max, and
results as JSON lines plus a Markdown table."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

WORK = Path(os.environ.get("HUBFAST_BENCH_DIR", "/tmp/hubfast-bench"))
OUT = Path(__file__).parent / "out"


def model_dir(size_mib: int) -> Path:
    """A SavedModel with ~size_mib MiB of Gaussian float32 weights (built once)."""
    d = WORK / f"model-{size_mib}m"
    if not (d / "saved_model.pb").exists():
        shutil.rmtree(d, ignore_errors=True)
        code = ("import sys; from hubfast.testing import models; "
                "models.write_gaussian_model(sys.argv[1], int(sys.argv[2]) << 20)")
        subprocess.run([sys.executable, "-c", code, str(d), str(size_mib)], check=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return d


def archive(size_mib: int, kind: str) -> Path:
    """kind: 'gz' (single-member gzip -6, like tfhub.dev), 'zst' (multi-frame, `hubfast pack`'s
    default 8 MiB frames) or 'zst32' (32 MiB frames: the decoder's memory with large frames)."""
    from hubfast.testing import models

    name = f"model-{size_mib}m.tar.zst" if kind == "zst32" else (
        f"model-{size_mib}m.p8.tar.zst" if kind == "zst" else f"model-{size_mib}m.tar.{kind}")
    out = WORK / name
    if not out.exists():
        src = model_dir(size_mib)
        if kind == "zst32":
            models.pack_tar(str(src), str(out), "zst", zstd_frame_size=32 << 20)
        elif kind == "zst":
            # What `hubfast pack` makes: 8 MiB frames and a seek table (pack_tar's own
            # default is one frame, which decodes on one core).
            from hubfast import pack
            pack.pack(str(src), str(out), compression="zst")
        else:
            models.pack_tar(str(src), str(out), kind)
    return out


def fresh_dir(name: str) -> Path:
    d = WORK / "scratch" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def drop_page_cache_of(path: Path) -> None:
    """Keeps runs comparable: the archive stays in the page cache (warm disk) for every tool."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def measure(fn: Callable[[], None], runs: int = 3) -> Dict:
    samples: List[float] = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "runs": samples}


def sh(cmd: str) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(["bash", "-c", cmd], check=True, stdout=subprocess.DEVNULL)
    return run


def steal_seconds() -> float:
    """CPU time this VM has had stolen by its host so far, all CPUs ("steal" in /proc/stat)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


def machine() -> Dict:
    load = open("/proc/loadavg").read().split()[:3]
    return {"host": platform.node(), "cores": os.cpu_count(), "loadavg": load,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def record(bench: str, rows: Sequence[Dict]) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{bench}.jsonl"
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(dict(r, bench=bench, machine=machine())) + "\n")
    return path


def table(rows: Sequence[Dict], baseline: str, floor: Optional[str] = None) -> str:
    """Markdown: one row per tool, median [min-max], ratio vs the baseline (and floor)."""
    by = {r["tool"]: r for r in rows}
    head = "| tool | median s | min-max s | vs " + baseline + " |" + (f" vs {floor} |" if floor else "")
    lines = [head, "|---|---:|---:|---:|" + ("---:|" if floor else "")]
    for r in rows:
        base = by.get(baseline)
        ratio = f"{base['median'] / r['median']:.2f}x" if base else "-"
        line = f"| {r['tool']} | {r['median']:.2f} | {r['min']:.2f}-{r['max']:.2f} | {ratio} |"
        if floor:
            fl = by.get(floor)
            line += f" {r['median'] / fl['median']:.2f} |" if fl else " - |"
        lines.append(line)
    return "\n".join(lines)
