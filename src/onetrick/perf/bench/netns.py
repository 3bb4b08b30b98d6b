"""Separate "hosts" on one machine, joined by a bandwidth-limited network.

:class:`ShapedNetwork` creates, with iproute2 (needs root):

* one network namespace per host, ``onetrick-<pid>-<id>-h<i>``, holding ``eth0`` with
  the private address ``10.213.0.<i+1>/24``;
* one namespace ``onetrick-<pid>-<id>-sw`` holding a bridge ``br0`` (the "switch");
* per host a veth pair ``eth0`` (host side) <-> ``p<i>`` (switch side, enslaved to br0);
* with ``mbps``, a token-bucket qdisc ``tc qdisc add dev ... root tbf rate <mbps>mbit``
  on *both* ends of every veth pair, so each host has a full-duplex link of that rate
  in each direction, like a NIC on a switch.

Nothing is created in, or routed to, the machine's own namespace, and only addresses in
10.213.0.0/24 are used, inside namespaces created here. :meth:`ShapedNetwork.destroy`
(also on error: use it as a context manager) deletes every namespace it created, which
removes the veth pairs and the bridge with them. Namespaces left by a process that died
without cleaning up are removed by the next :class:`ShapedNetwork` (their pid is gone).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence

__all__ = ["PREFIX", "SUBNET", "NetnsError", "ShapedNetwork", "netns_available"]

PREFIX = "onetrick-"
SUBNET = "10.213.0"
IFNAME = "eth0"


class NetnsError(RuntimeError):
    """The shaped network cannot be made here (no root, no iproute2, ...): one line."""


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)


def netns_available() -> str | None:
    """None if namespaces can be made here, else the reason (one line)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the shaped link needs iproute2 (ip and tc not found)"
    if os.geteuid() != 0:
        return "the shaped link needs root (to create network namespaces with ip netns add)"
    return None


def _tbf_args(mbps: float) -> list[str]:
    """tbf parameters: the bucket holds ~1 ms of traffic (at least 64 kB, so one TSO
    segment passes), the queue up to 50 ms of it."""
    rate_bytes = mbps * 1e6 / 8
    burst = max(64 * 1024, int(rate_bytes * 1e-3))
    return ["rate", f"{mbps:g}mbit", "burst", str(burst), "latency", "50ms"]


def cleanup_stale() -> None:
    """Delete namespaces named by this module whose creating process is gone."""
    res = _run("ip", "netns", "list")
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"{re.escape(PREFIX)}(\d+)-", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _run("ip", "netns", "del", name)


class ShapedNetwork:
    """``hosts`` namespaces on a bridge; links shaped to ``mbps`` (None: unshaped veth)."""

    def __init__(self, hosts: int, mbps: float | None = None) -> None:
        if hosts < 1 or hosts > 250:
            raise ValueError(f"hosts must be in 1..250 (got {hosts})")
        self.hosts, self.mbps = hosts, mbps
        tag = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.switch = f"{tag}-sw"
        self.names = [f"{tag}-h{i}" for i in range(hosts)]
        self.created: list[str] = []

    # -- addresses ----------------------------------------------------------------
    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    @property
    def ifname(self) -> str:
        return IFNAME

    # -- lifecycle ----------------------------------------------------------------
    def __enter__(self) -> ShapedNetwork:  # noqa: PYI034
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def _sh(self, *argv: str) -> None:
        res = _run(*argv)
        if res.returncode != 0:
            raise NetnsError(f"{' '.join(argv)} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:] or res.returncode}")

    def _add_ns(self, name: str) -> None:
        res = _run("ip", "netns", "add", name)
        if res.returncode != 0:
            reason = (res.stderr or "").strip().splitlines()
            raise NetnsError("the shaped link needs root and iproute2: `ip netns add` failed"
                             + (f" ({reason[-1]})" if reason else ""))
        self.created.append(name)

    def create(self) -> None:
        why = netns_available()
        if why:
            raise NetnsError(why)
        cleanup_stale()
        try:
            self._add_ns(self.switch)
            self._sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names):
                self._add_ns(ns)
                peer = f"p{i}"
                self._sh("ip", "-n", ns, "link", "add", IFNAME, "type", "veth", "peer", "name", peer, "netns", self.switch)
                self._sh("ip", "-n", self.switch, "link", "set", peer, "master", "br0")
                self._sh("ip", "-n", self.switch, "link", "set", peer, "up")
                self._sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME)
                self._sh("ip", "-n", ns, "link", "set", IFNAME, "up")
                self._sh("ip", "-n", ns, "link", "set", "lo", "up")
                if self.mbps:
                    self._sh("tc", "-n", ns, "qdisc", "add", "dev", IFNAME, "root", "tbf", *_tbf_args(self.mbps))
                    self._sh("tc", "-n", self.switch, "qdisc", "add", "dev", peer, "root", "tbf", *_tbf_args(self.mbps))
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        for name in reversed(self.created):
            _run("ip", "netns", "del", name)
        self.created.clear()

    # -- running things inside -------------------------------------------------------
    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *argv]

    def popen(self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **kw) -> subprocess.Popen:
        """Start ``argv`` on host ``i`` (``GLOO_SOCKET_IFNAME`` set to its interface)."""
        full = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": IFNAME}
        return subprocess.Popen(self.argv(i, argv), env=full, **kw)

    def qdisc(self, i: int) -> str:
        """``tc qdisc show`` of host i's interface (for the record)."""
        return _run("tc", "-n", self.names[i], "qdisc", "show", "dev", IFNAME).stdout.strip()
