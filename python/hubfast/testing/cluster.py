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
            hello = _read_json(self._origin_agent, 300)
            self.handle = hello["url"]
            self.info_hashes = hello.get("info_hashes", [])
        except BaseException:
            self.net.close()
            raise
        self._round = 0
        self.super_seeding = os.environ.get("HUBFAST_BENCH_SUPER_SEED") == "1"

    def origin_stats(self) -> Dict[str, int]:
        """What the origin served so far: ``body_bytes`` of the archive, ``torrent_gets``."""
        self._origin_agent.stdin.write("stats\n")  # type: ignore[union-attr]
        self._origin_agent.stdin.flush()  # type: ignore[union-attr]
        return _read_json(self._origin_agent, 30)

    def origin_bytes(self) -> int:
        """What the origin sent: archive bytes over HTTP and, once it seeds, to peers."""
        st = self.origin_stats()
        return int(st["body_bytes"]) + int(st["seeded_bytes"])

    def resolve_all(self, hosts: List[netsim.Host], env: Optional[Any] = None,
                    timeout: float = 600, caches: Optional[List[Path]] = None,
                    kill: Optional[Dict[int, float]] = None) -> List[Dict[str, Any]]:
        """Cold resolves on ``hosts`` (fresh caches unless ``caches``), released together.
        Each result: ``ready_s``, ``path``, ``fingerprint``, ``cache``. ``kill``: {index:
        seconds}: that host's process gets SIGKILL so long after the start (its result:
        ``{"killed": True}``)."""
        self._round += 1
        agents = []
        try:
            for i, h in enumerate(hosts):
                cache = caches[i] if caches else self.work / f"round{self._round}" / h.name
                cache.mkdir(parents=True, exist_ok=True)
                extra = env(h) if callable(env) else (env or {})
                e = dict(self.env, TFHUB_CACHE_DIR=str(cache), **extra)
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
            for i, after in sorted((kill or {}).items(), key=lambda kv: kv[1]):
                time.sleep(max(0.0, t0 + after - time.time()))
                agents[i].kill()
                agents[i].wait()
            out = []
            for i, a in enumerate(agents):
                if kill and i in kill:
                    out.append({"killed": True})
                    continue
                doc = _read_json(a, timeout)
                doc["ready_s"] = doc.pop("end") - t0
                doc["cache"] = str(caches[i] if caches else
                                   self.work / f"round{self._round}" / hosts[i].name)
                out.append(doc)
                a.stdin.close()  # type: ignore[union-attr]
                a.wait(timeout=30)
            return out
        finally:
            for a in agents:
                if a.poll() is None:
                    a.kill()
                    a.wait()

    def row(self, mode: str, env: Optional[Any] = None,
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

    def start_tracker(self) -> str:
        """opentracker on a host of its own; returns its announce URL. Debian's build admits
        only listed torrents (the v1 info-hash, and the v2 one cut to 20 bytes), and reads
        the list after chrooting to -d (and it refuses to keep root): the list lives in
        that directory, readable by nobody."""
        if getattr(self, "tracker", None) is None:
            binary = shutil.which("opentracker")
            if binary is None:
                raise RuntimeError("opentracker is not installed (apt-get install opentracker)")
            self.tracker = self.net.add_host("tracker")
            root = self.work / "tracker"
            root.mkdir(parents=True)
            (root / "whitelist").write_text("".join(h[:40] + "\n" for h in self.info_hashes))
            os.chmod(root / "whitelist", 0o644)  # read after dropping to nobody
            os.chmod(root, 0o755)
            self.tracker.popen([binary, "-i", self.tracker.ip, "-p", "6969", "-P", "6969",
                                "-d", str(root), "-w", "whitelist", "-u", "nobody"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_listening(self.tracker, self.tracker.ip, 6969)
        return f"http://{self.tracker.ip}:6969/announce"

    def swarm_env(self, host: netsim.Host) -> Dict[str, str]:
        return {"HUBFAST_SWARM": self.start_tracker(), "HUBFAST_SWARM_INTERFACE": host.ip}

    def seed_at_origin(self) -> None:
        """The origin also seeds, as a super-seeding peer (``hubfast serve --seed``)."""
        if not getattr(self, "_origin_seeds", False):
            how = "super" if self.super_seeding else "plain"
            self._origin_agent.stdin.write(f"seed {how} {self.start_tracker()}\n")  # type: ignore
            self._origin_agent.stdin.flush()  # type: ignore[union-attr]
            _read_json(self._origin_agent, 30)
            self._origin_seeds = True

    def swarm_row(self) -> Dict[str, Any]:
        self.seed_at_origin()
        return self.row("swarm", self.swarm_env)

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
    from ..server import TFHubServer  # noqa: PLC0415

    server = TFHubServer(ip, port, timeout=300)
    server.add_archive(HANDLE_PATH, archive)
    server.precompute_digests()
    server.start()
    try:
        hashes, t, seeder = [], None, None
        from .. import _core, swarm  # noqa: PLC0415

        if _core.have_swarm():  # as `hubfast serve` does, but before the first client
            t = swarm.publish_torrent(server, HANDLE_PATH, archive)
            hashes = [t["info_hash_v1"], t["info_hash_v2"]]
        print(json.dumps({"url": server.url_for(HANDLE_PATH), "info_hashes": hashes}),
              flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if cmd == ["stats"]:  # the archive's bytes only (not the torrent's)
                st = server.stats
                print(json.dumps({"body_bytes": st.path(HANDLE_PATH).body_bytes,
                                  "seeded_bytes": seeder.uploaded() if seeder else 0,
                                  "torrent_gets": st.path(HANDLE_PATH + ".torrent").gets}),
                      flush=True)
            elif cmd[:1] == ["seed"] and t is not None and seeder is None:
                # As `hubfast serve --seed`: a super-seeding peer on the origin's address.
                seeder = swarm.seeder(ip, cmd[2:])
                seeder.add(t["data"], archive, super_seeding=cmd[1] == "super")
                print(json.dumps({"seeding": True}), flush=True)
    finally:
        server.close()


def _client(handle: str) -> None:
    import hubfast  # noqa: PLC0415

    print(json.dumps({"ready": True}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    path = hubfast.resolve(handle)
    end = time.time()
    source = hubfast.last_stats().get("source", {})
    print(json.dumps({"end": end, "path": path, "fingerprint": tree_fingerprint(path),
                      "swarm": {k: v for k, v in source.items() if k.startswith("swarm_")}}),
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
