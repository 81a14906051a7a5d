"""Peers on real interfaces: one Linux network namespace per peer, joined by a bridge.

    root ns:  tgbr-XXXX (10.231.X.1/24) ── tgvXXXX-i ══ veth ══ eth0 (10.231.X.(10+i)) in tg-XXXX-i

Each peer gets its own address, mDNS multicast crosses the bridge, and `cut(i)` takes a peer's
link down (its process keeps running: a network partition, not a crash). Needs root and iproute2;
`NetnsMesh.check()` raises `NetnsUnavailable` with the reason otherwise. Only the private
10.231.X.0/24 addresses made here are used; nothing leaves the bridge (no route, no NAT).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from mesh.local import PeerGroup, PeerProc

GRPC_PORT = 7420  # every peer has its own address, so fixed ports do not clash
API_PORT = 8420


class NetnsUnavailable(RuntimeError):
    """Namespaces or the bridge cannot be made here (not root, no iproute2, no permission)."""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


class NsPeer(PeerProc):
    """One `together join` process inside a namespace (`ip netns exec` execs it, so the child pid
    is the peer itself), logging to a file; SIGINT stops it."""

    def __init__(self, name: str, ns: str, host: str, args: list[str], log_dir: Path, api: bool,
                 threads: int = 1):
        a = list(args)  # no --host: a peer listens and advertises on its namespace's LAN address by itself
        if api:
            a += ["--api-host", host, "--api-port", str(API_PORT)]
        super().__init__(name, a, log_dir, threads=threads, host=host, port=GRPC_PORT,
                         prefix=("ip", "netns", "exec", ns))


class NetnsMesh(PeerGroup):
    """A bridge plus `n` namespaces with a veth each; start peers in them with `add(i, ...)`.

    Use as a context manager: everything (processes, namespaces, veths, bridge) is removed on
    exit, also when setup or the test fails.
    """

    ready_timeout = 120.0

    def __init__(self, n: int, model: str, mesh: str | None = None):
        super().__init__()
        self.n, self.model = n, model
        self.mesh = mesh or f"netns-{uuid.uuid4().hex[:8]}"
        tag = secrets.token_hex(2)
        self.bridge = f"tgbr-{tag}"
        self.ns = [f"tg-{tag}-{i}" for i in range(n)]
        self.veth = [f"tgv{tag}-{i}" for i in range(n)]  # bridge side, in the root namespace
        self.subnet = self._pick_subnet()
        self.gateway = f"10.231.{self.subnet}.1"
        self.dir = Path(tempfile.mkdtemp(prefix="together-netns-"))
        self._made_bridge = False
        self._made_ns: list[str] = []

    @staticmethod
    def check() -> None:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2's `ip` is not installed")
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")

    @staticmethod
    def _pick_subnet() -> int:
        used = set(int(m) for m in re.findall(r"inet 10\.231\.(\d+)\.", _ip("-4", "addr", check=False).stdout))
        free = [x for x in range(50, 251) if x not in used]
        if not free:
            raise NetnsUnavailable("no free 10.231.X.0/24 subnet")
        return random.choice(free)

    def host(self, i: int) -> str:
        return f"10.231.{self.subnet}.{10 + i}"

    # ------------------------------------------------------------------ setup / teardown

    def __enter__(self) -> "NetnsMesh":
        try:
            self.check()
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        br = self.bridge
        _ip("link", "add", "name", br, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self._made_bridge = True
        snoop = Path(f"/sys/class/net/{br}/bridge/multicast_snooping")
        if snoop.exists():  # with snooping on and no querier, the bridge may drop mDNS
            snoop.write_text("0")
        _ip("addr", "add", f"{self.gateway}/24", "dev", br)
        _ip("link", "set", "dev", br, "up")
        for i, (ns, veth) in enumerate(zip(self.ns, self.veth)):
            _ip("netns", "add", ns)
            self._made_ns.append(ns)
            inner = f"tgp{veth[3:]}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", inner)
            _ip("link", "set", "dev", inner, "netns", ns)
            _ip("link", "set", "dev", veth, "master", br)
            _ip("link", "set", "dev", veth, "up")
            _ip("link", "set", "dev", "lo", "up", ns=ns)
            _ip("link", "set", "dev", inner, "name", "eth0", ns=ns)
            _ip("addr", "add", f"{self.host(i)}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "dev", "eth0", "multicast", "on", "up", ns=ns)
        self._wait_links()

    def _wait_links(self, timeout: float = 10) -> None:
        """Until both ends of every veth are up (the bridge forwards at once: no STP delay)."""
        deadline = time.time() + timeout
        down = list(range(self.n))
        while down and time.time() < deadline:
            down = [i for i in down if "LOWER_UP" not in _ip("link", "show", "dev", self.veth[i]).stdout
                    or "LOWER_UP" not in _ip("link", "show", "dev", "eth0", ns=self.ns[i]).stdout]
            if down:
                time.sleep(0.1)
        if down:
            raise NetnsUnavailable(f"the links of namespaces {down} did not come up on {self.bridge}")

    def close(self) -> None:
        self.stop()
        for ns in self._made_ns:
            # anything still running in it was started here: end it before the namespace goes
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)  # takes its veth pair with it
        self._made_ns = []
        for veth in self.veth:
            if Path(f"/sys/class/net/{veth}").exists():
                _ip("link", "del", veth, check=False)
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
            self._made_bridge = False

    # ------------------------------------------------------------------ peers and links

    def add(self, i: int, name: str, *args: str, api: bool = False, threads: int = 1) -> NsPeer:
        """Start `together join` in namespace `i` as the README tells users to (it finds its address)."""
        a = ["--model", self.model, "--mesh", self.mesh, *args]
        p = NsPeer(name, self.ns[i], self.host(i), a, self.dir, api, threads)
        self.peers[name] = p
        return p

    def cut(self, i: int) -> None:
        """Take peer i's link down on the bridge side: the peer stays up but nothing reaches it.
        (Its own eth0 only loses carrier, so it can still talk to itself.)"""
        _ip("link", "set", "dev", self.veth[i], "down")

    def restore(self, i: int) -> None:
        _ip("link", "set", "dev", self.veth[i], "up")
