"""Chaos soak: processes resolving (and loading) the same handles while a
driver kills them at random moments and the server injects random faults.
Afterwards every published entry must be byte-identical to its source, no
lock held, no temp dir of a dead process left after the next successful
resolve, and every process must have ended within its timeout.

    python -m hubfast.testing.chaos --iterations 200 [--workers 3] [--load]

Prints the counts (iterations, kills, kills mid-transfer, faults, entries
checked, defects) and exits 1 on any defect.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

_WORKER = r"""
import json, os, sys, time
import hubfast
handle = sys.argv[1]
try:
    path = hubfast.resolve(handle)
    if os.environ.get("CHAOS_LOAD") == "1":
        hubfast.load(handle)
    print(json.dumps({"ok": True, "path": path}))
except Exception as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)[:300]}))
"""

# Faults the server may inject on a GET (None: a clean request).
_FAULTS = ["drop", "stall", "503", "flip", "truncate", "close", None, None]


@dataclass
class Counts:
    iterations: int = 0
    kills: int = 0
    sigterms: int = 0
    kills_mid_transfer: int = 0
    faults: int = 0
    typed_errors: int = 0
    entries_checked: int = 0
    defects: List[str] = field(default_factory=list)

    def summary(self) -> Dict:
        return {"iterations": self.iterations, "kills": self.kills, "sigterms": self.sigterms,
                "kills_mid_transfer": self.kills_mid_transfer, "faults": self.faults,
                "typed_errors": self.typed_errors, "entries_checked": self.entries_checked,
                "defects": len(self.defects)}


def _make_sources(work: Path, with_models: bool) -> Dict[str, Path]:
    """Three archives: SavedModels when loading is exercised, else random trees."""
    from . import models

    out = {}
    for i, kind in enumerate(["gz", "zst", "gz"]):
        src = work / f"src{i}"
        if with_models:
            models.write_gaussian_model(str(src), (6 + 4 * i) << 20, seed=i)
        else:
            (src / "variables").mkdir(parents=True)
            (src / "saved_model.pb").write_bytes(os.urandom(2000))
            (src / "variables" / "variables.index").write_bytes(os.urandom(300))
            (src / "variables" / "variables.data-00000-of-00001").write_bytes(
                os.urandom((6 + 4 * i) << 20))
        frames = {"zstd_frame_size": 2 << 20} if kind == "zst" else {}
        out[f"/chaos/model{i}/1"] = Path(models.pack_tar(str(src), str(work / f"m{i}.tar.{kind}"),
                                                         kind, **frames))
        out[f"/chaos/model{i}/1"].with_suffix(".src").write_text(str(src))
    return out


def _fault(server, path: str, size: int, rng: random.Random):
    from .faults import Fault

    name = rng.choice(_FAULTS)
    at = rng.randrange(1, size)
    if name == "drop":
        return name, Fault.drop(at)
    if name == "stall":
        return name, Fault.stall(at, rng.uniform(0.5, 2.5))
    if name == "503":
        return name, Fault.status(503, retry_after=0)
    if name == "flip":
        return name, Fault.flip(at)
    if name == "truncate":
        return name, Fault.truncate(at)
    if name == "close":
        return name, Fault.close_after_headers()
    return None, None


def _leftovers(cache: Path) -> List[str]:
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir()
                  if p.name.endswith((".tmp", ".old")) or (p.name.endswith(".lock")
                                                          and not p.name.endswith(".hubfast.lock")))


def run(iterations: int, workers: int = 3, load: bool = False, seed: int = 0,
        work: Path = None, timeout: float = 60.0, log=print, keep_failed: bool = False) -> Counts:
    from .. import _core
    from . import models
    from ..server import TFHubServer
    from .faults import Fault

    rng = random.Random(seed)
    own_work = work is None
    work = Path(work or tempfile.mkdtemp(prefix="hubfast-chaos-"))
    counts = Counts()
    try:
        sources = _make_sources(work, load)
        digests = {p: models.tree_digest(Path(a).with_suffix(".src").read_text())
                   for p, a in sources.items()}
        # A per-connection cap keeps transfers long enough for kills to land in them.
        with TFHubServer(bandwidth=20e6) as srv:
            for p, a in sources.items():
                srv.add_archive(p, str(a))
            env_base = dict(os.environ, HUBFAST_STALL_TIMEOUT="1", HUBFAST_MAX_RETRIES="3",
                            HUBFAST_LOCK_TIMEOUT=str(timeout), HUBFAST_CONNECTIONS="2",
                            TF_CPP_MIN_LOG_LEVEL="3")
            env_base.pop("HUBFAST_OFFLINE", None)
            reported = 0
            for it in range(iterations):
                path = rng.choice(sorted(sources))
                size = sources[path].stat().st_size
                url = srv.url + path
                cache = work / "cache" / f"it{it}"
                env = dict(env_base, TFHUB_CACHE_DIR=str(cache),
                           HUBFAST_LOCK_MODE=rng.choice(["flock", "heartbeat"]))
                # Every other iteration the server holds the first GET's body mid-transfer
                # until the kills are sent: kills land in a transfer however busy the machine
                # (the others kill at random moments, whatever the transfer's state).
                hold = None
                if it % 2 == 0:
                    hold = (threading.Event(), threading.Event())
                    srv.inject(path, Fault.hold(rng.randrange(1, size // 4), *hold))
                name, fault = _fault(srv, path, size, rng)
                if fault is not None:
                    srv.inject(path, fault)
                    counts.faults += 1
                before = srv.stats.path(path).body_bytes
                procs = []
                for w in range(workers):
                    e = dict(env, CHAOS_LOAD="1" if load and w == 0 else "0")
                    procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, url], env=e,
                                                  stdout=subprocess.PIPE,
                                                  stderr=subprocess.DEVNULL, text=True))
                    time.sleep(rng.uniform(0, 0.1))
                if hold is None:
                    time.sleep(rng.uniform(0.2, 1.2))
                elif not hold[1].wait(timeout):
                    counts.defects.append(f"it{it}: no transfer began within {timeout} s")
                sent = srv.stats.path(path).body_bytes - before
                victims = rng.sample(procs, rng.randint(1, max(1, workers - 1)))
                for v in victims:
                    if v.poll() is None:
                        sig = signal.SIGKILL if rng.random() < 0.7 else signal.SIGTERM
                        v.send_signal(sig)
                        counts.kills += sig == signal.SIGKILL
                        counts.sigterms += sig == signal.SIGTERM
                        if 0 < sent < size:
                            counts.kills_mid_transfer += 1
                if hold is not None:
                    hold[0].set()
                start = time.time()
                for p in procs:
                    try:
                        out, _ = p.communicate(timeout=max(1.0, timeout - (time.time() - start)))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        counts.defects.append(f"it{it}: a worker did not end within {timeout} s")
                        continue
                    if p.returncode == 0 and out.strip():
                        r = json.loads(out.strip().splitlines()[-1])
                        if not r["ok"]:
                            counts.typed_errors += 1
                            if r["error"] not in ("IntegrityError", "NetworkError",
                                                  "DownloadTimeoutError", "HTTPStatusError"):
                                counts.defects.append(f"it{it}: unexpected {r['error']}: {r['message']}")
                # The next successful resolve, on a healthy server.
                srv.clear_faults(path)
                check = subprocess.run([sys.executable, "-c", _WORKER, url], env=dict(env, CHAOS_LOAD="0"),
                                       capture_output=True, text=True, timeout=timeout)
                r = json.loads(check.stdout.strip().splitlines()[-1]) if check.stdout.strip() else {}
                if not r.get("ok"):
                    counts.defects.append(f"it{it}: resolve after the chaos failed: {r or check.stderr[-300:]}")
                else:
                    counts.entries_checked += 1
                    if models.tree_digest(r["path"]) != digests[path]:
                        counts.defects.append(f"it{it}: entry differs from its source")
                left = _leftovers(cache)
                if left:
                    counts.defects.append(f"it{it}: left behind {left}")
                name_ = Path(r.get("path", "x")).name
                for lock in (_core.lock_path(str(cache), name_), _core.use_lock_path(str(cache), name_)):
                    if os.path.exists(lock) and not _core.FileLock.try_acquire(lock, True).held:
                        counts.defects.append(f"it{it}: {lock} still held")
                counts.iterations += 1
                for d in counts.defects[reported:]:
                    log(f"chaos: DEFECT {d}")
                reported = len(counts.defects)
                if not counts.defects or not keep_failed:
                    shutil.rmtree(cache, ignore_errors=True)
                if (it + 1) % 10 == 0:
                    log(f"chaos: {it + 1}/{iterations} {json.dumps(counts.summary())}")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="hubfast chaos soak")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--load", action="store_true", help="one worker also runs hubfast.load (TensorFlow)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args(argv)
    counts = run(args.iterations, args.workers, args.load, args.seed)
    print(json.dumps(dict(counts.summary(), seed=args.seed)))
    for d in counts.defects:
        print("DEFECT:", d)
    return 1 if counts.defects else 0


if __name__ == "__main__":
    sys.exit(main())
