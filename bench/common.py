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


# This VM's balloon (virtio free page reporting) hands memory that has been free for ~2 s back
# to its host, and touching such memory again costs ~11 us per 4 KiB page in the guest: writing
# 1 GiB into the page cache took 0.2-0.3 s right after deleting a file of that size and 2.8-3.8 s
# 6 s after (dd). A run that writes a model would pay 0-2.8 s per GiB depending on
# what ran before it and when (round robin: the row after a tool that writes nothing paid it
# every time; pages freed a few seconds after they were written were often cold too). So before
# each writing run's timed section (in a resolving child: after its imports) the previous runs'
# outputs are deleted and the model's size is written and deleted at once: every tool starts on
# memory the guest has just touched, as on a machine without a balloon. A tool that writes for
# longer than ~2 s (tensorflow_hub at 1 GiB) still pays for its later pages.
# HUBFAST_BENCH_COLD_PAGES=1 deletes outputs at once and writes nothing, for the raw behaviour.
COLD_PAGES = os.environ.get("HUBFAST_BENCH_COLD_PAGES") == "1"
WARM_MIB = [0]  # the size of the warm write before each writing run: the model's (set by the bench)
_PENDING: List[Path] = []
_SEQ = [0]

# A resolving child runs this just before its timer starts: prepare_child(), from this file.
CHILD_PREPARE_CODE = (f"import sys as _sys; _sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                      "import common as _common; _common.prepare_child()\n")


def warm_env(size_mib: int) -> Dict[str, str]:
    """For a child that runs CHILD_PREPARE_CODE: what it deletes and the warm write it makes."""
    env = {"BENCH_FREE": take_pending()}
    if not COLD_PAGES and size_mib:
        (WORK / "scratch").mkdir(parents=True, exist_ok=True)
        env.update(BENCH_WARM_MIB=str(size_mib), BENCH_WARM_DIR=str(WORK / "scratch"))
    return env


def warm(size_mib: int, where: Optional[Path] = None) -> None:
    """Right before a timed section in this process: the released outputs are deleted, and
    `size_mib` MiB written and deleted at once, so that the section starts on memory the
    guest has just touched (pages freed a few seconds earlier were found cold too)."""
    free_pending()
    if COLD_PAGES or not size_mib:
        return
    f = (where or WORK / "scratch") / f"warm-{os.getpid()}"
    f.parent.mkdir(parents=True, exist_ok=True)
    block = b"\1" * (1 << 20)
    with open(f, "wb") as w:
        for _ in range(size_mib):
            w.write(block)
    f.unlink()


def prepare_child() -> None:
    """In a resolving child (CHILD_PREPARE_CODE): what warm_env() asked for."""
    _PENDING.extend(Path(p) for p in os.environ.get("BENCH_FREE", "").split(os.pathsep) if p)
    where = os.environ.get("BENCH_WARM_DIR")
    warm(int(os.environ.get("BENCH_WARM_MIB") or 0), Path(where) if where else None)


def run_dir(name: str) -> Path:
    """A new empty directory for one run's output, to go through release() when it is done."""
    _SEQ[0] += 1
    return fresh_dir(f"{name}-{_SEQ[0]}")


def release(path: Path) -> None:
    """A finished run's output: deleted before the next timed section (see COLD_PAGES)."""
    if COLD_PAGES:
        shutil.rmtree(path, ignore_errors=True)
    else:
        _PENDING.append(Path(path))


def take_pending() -> str:
    """The outputs to delete, for a child's BENCH_FREE: the child deletes them."""
    s = os.pathsep.join(str(p) for p in _PENDING)
    _PENDING.clear()
    return s


def free_pending() -> None:
    """Deletes the released outputs now: right before a timed section in this process."""
    for p in _PENDING:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    _PENDING.clear()


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
