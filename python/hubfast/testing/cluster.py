"""Many hosts resolving one handle at once, on simulated hosts (``netsim``).

The origin is the TF Hub server ``hubfast serve`` runs, in a host of its own; the proxy
(the README's nginx recipe) in another; each client host has its own cache. Every link is
capped alike. A round starts one agent process per client host, waits until each has
imported hubfast, then releases them together: ``*_ready_s`` run from that common start to
each host's ``resolve()`` returning. ``origin_bytes`` is what the origin's server wrote as
bodies. ``bench/bench_cluster.py`` prints the rows; ``tests/test_cluster.py`` checks them.

The agents are this module's ``main()``: ``python -m hubfast.testing.cluster origin|client``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import netsim
from .nginx import nginx_binary, write_conf

HANDLE_PATH = "/cluster/model/1"
ORIGIN_PORT = 8000
PROXY_PORT = 8080
CLIENT_ENV_DROP = ("HUBFAST_CACHE_LAYERS", "HUBFAST_OFFLINE", "HUBFAST_MIRRORS",
                   "TFHUB_DOWNLOAD_PROGRESS", "http_proxy", "HTTP_PROXY", "https_proxy",
                   "HTTPS_PROXY", "no_proxy", "NO_PROXY", "HUBFAST_SWARM")


def tree_fingerprint(path: str) -> str:
    """One hex digest of a whole tree (names, sizes, contents)."""
    from .models import tree_digest  # noqa: PLC0415

    return hashlib.sha256(json.dumps(sorted(tree_digest(path).items())).encode()).hexdigest()


def _python_env() -> Dict[str, str]:
    import hubfast  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV_DROP}
    top = str(Path(hubfast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = top + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _read_json(proc: subprocess.Popen, timeout: float) -> Dict[str, Any]:
    import select  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"agent {proc.args[-3:]} said nothing for {timeout:.0f} s")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if ready:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                err = proc.stderr.read() if proc.stderr else ""  # type: ignore[union-attr]
                raise RuntimeError(f"agent exited ({proc.wait()}): {err[-2000:]}")
            return json.loads(line)


class Cluster:
    """An origin, a proxy host and ``hosts`` client hosts on one switch.

    ``archive``: the file served at ``HANDLE_PATH``; ``source``: the model directory it was
    packed from (for ``identical``); ``rate``: every link's cap in bytes/s."""

    def __init__(self, hosts: int, archive: Path, source: Path, rate: float,
                 workdir: Optional[Path] = None) -> None:
        self.archive = Path(archive)
        self.want = tree_fingerprint(str(source))
        self.work = Path(workdir or tempfile.mkdtemp(prefix="hubfast-cluster-"))
        self.env = _python_env()
        self.net = netsim.Net(rate)
        try:
            self.origin = self.net.add_host("origin")
            self.proxy = self.net.add_host("proxy")
            self.clients = [self.net.add_host(f"h{i}") for i in range(hosts)]
            self._origin_agent = self.origin.popen(
                [sys.executable, "-m", "hubfast.testing.cluster", "origin", self.origin.ip,
                 str(ORIGIN_PORT), str(self.archive)],
                env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            self.handle = _read_json(self._origin_agent, 60)["url"]
        except BaseException:
            self.net.close()
            raise
        self._round = 0

    def origin_bytes(self) -> int:
        self._origin_agent.stdin.write("stats\n")  # type: ignore[union-attr]
        self._origin_agent.stdin.flush()  # type: ignore[union-attr]
        return int(_read_json(self._origin_agent, 30)["body_bytes"])

    def resolve_all(self, hosts: List[netsim.Host], env: Optional[Dict[str, str]] = None,
                    timeout: float = 600) -> List[Dict[str, Any]]:
        """Cold resolves on ``hosts`` (fresh caches), released together. Each result:
        ``ready_s``, ``path``, ``fingerprint``."""
        self._round += 1
        agents = []
        try:
            for h in hosts:
                cache = self.work / f"round{self._round}" / h.name
                cache.mkdir(parents=True)
                e = dict(self.env, TFHUB_CACHE_DIR=str(cache), **(env or {}))
                agents.append(h.popen([sys.executable, "-m", "hubfast.testing.cluster",
                                       "client", self.handle], env=e, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
            for a in agents:
                _read_json(a, 120)  # {"ready": true}: imported, waiting
            t0 = time.time()
            for a in agents:
                a.stdin.write("go\n")  # type: ignore[union-attr]
                a.stdin.flush()  # type: ignore[union-attr]
            out = []
            for a in agents:
                doc = _read_json(a, timeout)
                doc["ready_s"] = doc.pop("end") - t0
                out.append(doc)
                a.stdin.close()  # type: ignore[union-attr]
                a.wait(timeout=30)
            return out
        finally:
            for a in agents:
                if a.poll() is None:
                    a.kill()
                    a.wait()

    def row(self, mode: str, env: Optional[Dict[str, str]] = None,
            before_round: Optional[Any] = None) -> Dict[str, Any]:
        """One row: one host alone (single_host_s), then every host at once."""
        if before_round:
            before_round()
        (alone,) = self.resolve_all(self.clients[:1], env)
        if before_round:
            before_round()
        sent0 = self.origin_bytes()
        results = self.resolve_all(self.clients, env)
        ready = sorted(r["ready_s"] for r in results)
        return {"mode": mode, "hosts": len(self.clients),
                "archive_bytes": self.archive.stat().st_size,
                "origin_bytes": self.origin_bytes() - sent0,
                "single_host_s": round(alone["ready_s"], 3),
                "first_ready_s": round(ready[0], 3), "last_ready_s": round(ready[-1], 3),
                "identical": all(r["fingerprint"] == self.want for r in results + [alone])}

    def direct_row(self) -> Dict[str, Any]:
        return self.row("direct")

    def proxy_row(self) -> Dict[str, Any]:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
        state: Dict[str, subprocess.Popen] = {}

        def fresh_proxy() -> None:  # an empty proxy cache for each round
            old = state.pop("nginx", None)
            if old is not None:
                old.terminate()
                old.wait(timeout=15)
            prefix = self.work / f"nginx{self._round}"
            origin = self.handle.split(HANDLE_PATH)[0]
            conf = write_conf(prefix, f"{self.proxy.ip}:{PROXY_PORT}", origin)
            state["nginx"] = self.proxy.popen([binary, "-c", str(conf), "-p", str(prefix)],
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
            _wait_listening(self.proxy, self.proxy.ip, PROXY_PORT)

        origin = self.handle.split(HANDLE_PATH)[0]
        mirrors = f"{origin}=http://{self.proxy.ip}:{PROXY_PORT}"
        try:
            return self.row("proxy", {"HUBFAST_MIRRORS": mirrors}, before_round=fresh_proxy)
        finally:
            p = state.get("nginx")
            if p is not None:
                p.terminate()
                p.wait(timeout=15)

    def close(self) -> None:
        self.net.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_listening(host: netsim.Host, ip: str, port: int, timeout: float = 15) -> None:
    code = ("import socket,sys,time\n"
            "d=time.time()+float(sys.argv[3])\n"
            "while True:\n"
            "    try: socket.create_connection((sys.argv[1],int(sys.argv[2])),1).close(); break\n"
            "    except OSError:\n"
            "        if time.time()>d: sys.exit('not listening')\n"
            "        time.sleep(0.05)\n")
    host.run([sys.executable, "-c", code, ip, str(port), str(timeout)], check=True)


# ----------------------------------------------------------------------------- agents


def _origin(ip: str, port: int, archive: str) -> None:
    from .server import TFHubServer  # noqa: PLC0415

    server = TFHubServer(ip, port, timeout=300)
    server.add_archive(HANDLE_PATH, archive)
    server.precompute_digests()
    server.start()
    try:
        print(json.dumps({"url": server.url_for(HANDLE_PATH)}), flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps({"body_bytes": server.stats.body_bytes}), flush=True)
    finally:
        server.close()


def _client(handle: str) -> None:
    import hubfast  # noqa: PLC0415

    print(json.dumps({"ready": True}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    path = hubfast.resolve(handle)
    end = time.time()
    print(json.dumps({"end": end, "path": path, "fingerprint": tree_fingerprint(path)}),
          flush=True)
    sys.stdin.read()  # stay until released (a seeding host keeps serving)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hubfast.testing.cluster")
    sub = p.add_subparsers(dest="role", required=True)
    o = sub.add_parser("origin")
    o.add_argument("ip")
    o.add_argument("port", type=int)
    o.add_argument("archive")
    c = sub.add_parser("client")
    c.add_argument("handle")
    args = p.parse_args(argv)
    if args.role == "origin":
        _origin(args.ip, args.port, args.archive)
    else:
        _client(args.handle)


if __name__ == "__main__":
    main()
