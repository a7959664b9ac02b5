"""Simulated hosts on one machine: network namespaces joined by capped links.

Each host is a network namespace with its own address, joined by a veth pair to a bridge
that lives in a switch namespace of its own. No namespace has a default route and the
switch has no address, so no packet can leave the machine or reach the caller's network.
``tc`` (a token bucket) caps every host link in both directions: on the host's end for
what it sends, on the switch's end for what it receives.

Every name starts with a per-run prefix (``hf`` + 5 hex digits), so concurrent runs never
collide; ``close()`` kills the processes it started and deletes the namespaces (with them
the veth pairs and the bridge). Needs CAP_NET_ADMIN (root) and iproute2's ``ip`` and ``tc``.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence

SUBNET = "10.201.0"  # /24 inside the switch namespace only; never routed anywhere


def missing_tools() -> Optional[str]:
    """Why simulated hosts cannot run here, or None when they can."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    probe = "hf" + secrets.token_hex(3) + "-probe"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot create a network namespace: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: Optional[str] = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")


class Host:
    """One simulated host: a namespace, an address and the processes started in it."""

    def __init__(self, net: "Net", name: str, index: int) -> None:
        self.net = net
        self.name = name
        self.ns = f"{net.prefix}-{name}"
        self.ip = f"{SUBNET}.{index + 1}"
        self.procs: List[subprocess.Popen] = []

    def argv(self, argv: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", self.ns] + list(argv)

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(argv), **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def run(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), **kw)  # type: ignore[call-overload]

    def tx_bytes(self) -> int:
        """Bytes this host's interface has sent (what tc let through)."""
        out = self.run(["cat", "/proc/net/dev"], capture_output=True, text=True,
                       check=True).stdout
        for line in out.splitlines():
            if line.strip().startswith("eth0:"):
                return int(line.split(":", 1)[1].split()[8])
        return 0


class Net:
    """A switch and its hosts. ``rate``: each link's cap in bytes/s, both directions."""

    def __init__(self, rate: float, latency_ms: float = 0.5) -> None:
        self.rate = float(rate)
        self.latency_ms = latency_ms
        self.prefix = "hf" + secrets.token_hex(3)[:5]
        self.switch = f"{self.prefix}-sw"
        self.hosts: Dict[str, Host] = {}
        self._namespaces: List[str] = []
        try:
            self._add_ns(self.switch)
            _ip("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
            _ip("ip", "link", "set", "br0", "up", ns=self.switch)
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        _ip("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        _ip("ip", "link", "set", "lo", "up", ns=ns)

    def _cap(self, ns: str, dev: str) -> None:
        # A token bucket: rate in bits/s, a burst of a few MTU-sized GSO segments, and a
        # queue of 50 ms so TCP sees a real bottleneck rather than drops.
        rate_bit = int(self.rate * 8)
        burst = max(64 << 10, int(self.rate / 250))
        _ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bit}bit",
            "burst", str(burst), "latency", "50ms", ns=ns)

    def add_host(self, name: str) -> Host:
        host = Host(self, name, len(self.hosts))
        self._add_ns(host.ns)
        a, b = f"{self.prefix}a{len(self.hosts)}", f"{self.prefix}b{len(self.hosts)}"
        _ip("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        try:
            _ip("ip", "link", "set", a, "netns", host.ns)
            _ip("ip", "link", "set", b, "netns", self.switch)
        except BaseException:
            subprocess.run(["ip", "link", "del", a], capture_output=True)
            raise
        _ip("ip", "link", "set", a, "name", "eth0", ns=host.ns)
        _ip("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0", ns=host.ns)
        _ip("ip", "link", "set", "eth0", "up", ns=host.ns)
        _ip("ip", "link", "set", b, "master", "br0", ns=self.switch)
        _ip("ip", "link", "set", b, "up", ns=self.switch)
        self._cap(host.ns, "eth0")  # what the host sends
        self._cap(self.switch, b)  # what the host receives
        self.hosts[name] = host
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            for p in host.procs:
                if p.poll() is None:
                    p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()

    def __enter__(self) -> "Net":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
