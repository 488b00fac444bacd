"""Several hosts on one machine: network namespaces on a bridge, made and removed by the suite.

`Lan()` creates a switch namespace with a bridge, plus a veth from this (root) namespace so the
test process can reach every host.  `lan.host(name)` adds a namespace with one interface on
the bridge; `lan.run(host, args)` starts a process inside it.  Everything is removed on exit,
also when a test fails.  Needs root and iproute2; `available()` says why not when it cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from types import TracebackType


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"myco-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def _alive(pid: str) -> bool:
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


def _remove_stale() -> None:
    """Namespaces and links left by a run that was killed before it could clean up: they
    would route our subnet through a dead switch."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in (line.split()[0] for line in listed.splitlines() if line.startswith("myco-")):
        if not _alive(ns.rsplit("-", 1)[-1]):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("mycor") and not _alive(name.removeprefix("mycor")):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


class Lan:
    def __init__(self) -> None:
        self.tag = str(os.getpid())
        # A /24 of its own per test process: two runs at once must not share a route.
        self.subnet = f"10.{os.getpid() // 250 % 250}.{os.getpid() % 250}"
        self.switch = f"myco-sw-{self.tag}"
        self.hosts: dict[str, tuple[str, str]] = {}  # name -> (namespace, address)
        self._root_veth = f"mycor{self.tag}"
        self.address = f"{self.subnet}.1"  # the root namespace's address on the LAN

    def __enter__(self) -> Lan:
        _remove_stale()
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        _ip("link", "add", self._root_veth, "type", "veth", "peer", "name", "root",
            "netns", self.switch)
        _ip("link", "set", "root", "master", "br0", "up", ns=self.switch)
        _ip("addr", "add", f"{self.address}/24", "dev", self._root_veth)
        _ip("link", "set", self._root_veth, "up")
        return self

    def host(self, name: str) -> str:
        """Add a host; returns its address."""
        ns, number = f"myco-{name}-{self.tag}", len(self.hosts) + 10
        address = f"{self.subnet}.{number}"
        _ip("netns", "add", ns)
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{number}",
            "netns", self.switch)
        _ip("link", "set", f"p{number}", "master", "br0", "up", ns=self.switch)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
        for link in ("eth0", "lo"):
            _ip("link", "set", link, "up", ns=ns)
        self.hosts[name] = (ns, address)
        self.restore_route(name)
        return address

    def restore_route(self, name: str) -> None:
        """The multicast route for mDNS (a link going down removes it)."""
        _ip("route", "replace", "224.0.0.0/4", "dev", "eth0", ns=self.hosts[name][0])

    def link(self, name: str, up: bool) -> None:
        """Take a host's cable out (or put it back)."""
        _ip("link", "set", "eth0", "up" if up else "down", ns=self.hosts[name][0])

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name][0]]

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for ns, _ in self.hosts.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self._root_veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
