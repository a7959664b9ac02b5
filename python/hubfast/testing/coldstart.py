"""Cold start from process spawn to the first prediction, split into import,
fetch, load and first call; the demo and the benchmarks both use it.

Styles: ``tensorflow_hub`` (``import tensorflow, tensorflow_hub``), ``seed``
(hubfast as the seed pages write it: ``import tensorflow`` first) and
``prefetch`` (``import hubfast; hubfast.prefetch(url)`` before TensorFlow).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import IO, Dict, List, Optional

# TensorFlow's native log lines ("I0000 00:00:... cpu_feature_guard.cc] ...", absl's notice
# before its logging starts, and the continuation of the CPU-feature message). Some are
# printed before TF_CPP_MIN_LOG_LEVEL is read, and they would land inside the progress bar.
_TF_LOG = re.compile(rb"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl|"
                     rb"To enable the following instructions|oneDNN custom operations)")

_SCRIPT = r"""
import json, os, resource, sys, time
t0 = time.time()
style, url = sys.argv[1], sys.argv[2]
pre = None
if style == "prefetch":
    import hubfast as hub
    pre = hub.prefetch(url)
    import tensorflow as tf
elif style == "seed":
    import tensorflow as tf
    import hubfast as hub
else:
    import tensorflow as tf
    import tensorflow_hub as hub
t_import = time.time()
m = hub.load(url)
t_load = time.time()
y = m(tf.ones([1, 16]))
float(tf.reduce_sum(y))
t_call = time.time()
out = {"import": t_import - t0, "load": t_load - t_import, "first_call": t_call - t_load,
       "total": t_call - t0, "t_usable": t_call, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if style != "tensorflow_hub":
    s = pre.stats if pre is not None else hub.last_stats()
    out["fetch"] = s.get("seconds")
    out["cached"] = s.get("cached")
print(json.dumps(out))
"""


def run(style: str, url: str, cache_dir: str, progress: bool = False,
        env: Optional[Dict[str, str]] = None, timeout: float = 600) -> Dict:
    """Runs one cold (or warm, if the cache holds it) start in a fresh process."""
    e = dict(os.environ, TFHUB_CACHE_DIR=cache_dir, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    if progress:
        e["TFHUB_DOWNLOAD_PROGRESS"] = "1"
    start = time.time()
    p = subprocess.Popen([sys.executable, "-c", _SCRIPT, style, url], env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kept: List[bytes] = []
    relay = threading.Thread(target=_relay, args=(p.stderr, kept, progress), daemon=True)
    relay.start()
    try:
        stdout = p.stdout.read() if p.stdout else b""
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    relay.join(5)
    if progress:
        sys.stderr.write("\n")
    if p.returncode != 0:
        err = b"".join(kept).decode(errors="replace")
        raise RuntimeError(f"{style} cold start failed (exit {p.returncode}): {err[-2000:]}")
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    # Spawn to the first prediction, read from the child's clock: the process's exit
    # (TensorFlow's teardown, often a second or more) comes after and is not part of it.
    out["spawn_to_usable"] = out.pop("t_usable") - start
    out["spawn_to_exit"] = time.time() - start
    return out


def _relay(stream: Optional[IO[bytes]], kept: List[bytes], show: bool) -> None:
    """Keeps the child's stderr for an error message and, when `show`, draws it on ours as it
    comes (the progress bar redraws itself after each \\r) without TensorFlow's log lines."""
    if stream is None:
        return
    fd = stream.fileno()
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        kept.append(chunk)
        pending += chunk
        pieces = re.split(rb"(?<=[\r\n])", pending)
        pending = pieces.pop()  # not yet ended by \r or \n
        if show:
            sys.stderr.buffer.write(b"".join(x for x in pieces if not _TF_LOG.match(x.lstrip(b"\r"))))
            sys.stderr.flush()
    if show and pending and not _TF_LOG.match(pending):
        sys.stderr.buffer.write(pending)
        sys.stderr.flush()
