"""A small "internet" with home routers, built from network namespaces (root only).

    internet (namespace holding bridge br0, 198.18.0.0/15, RFC 2544 test addresses)
      +-- public   198.18.0.10            a node with a public address
      +-- router a 198.18.1.1  (wan)      nftables masquerade; LAN 192.168.1.0/24 on bridge lan
      |     +-- a1 192.168.1.10, a2 192.168.1.11 ...   default route via 192.168.1.1
      +-- router b 198.18.2.1  (wan)      LAN 192.168.2.0/24
            +-- b1 192.168.2.10 ...

A router that runs miniupnpd has WAN address 11.18.0.<n> instead (see IGD_NET); every machine
on the internet has an on-link route to the other range, so it is the same flat internet.

Every veth is created with both ends inside namespaces of ours, and no namespace has a link to
the host's own: nothing can be routed to the real network. A router forwards LAN -> WAN and
answers of those connections only (like a home router); one named in ``upnp`` also runs
miniupnpd (UPnP IGD and NAT-PMP), one named in ``natpmp`` runs it with UPnP IGD off; their
mappings open a port from the WAN.

``NetLab`` is a context manager: on exit (also after a failure) it ends every process it
started, by process group, and deletes its namespaces, which takes their links along.
Reaching into a namespace from the test process (an HTTP GET to a daemon's local API, a TCP
probe) runs in a short-lived thread that ``setns``-es itself into it.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
INTERNET = "198.18.0.0/15"
# miniupnpd 2.3.1 maps no port while its external address is in a reserved or private range
# (198.18.0.0/15 and 240.0.0.0/4 included: "Port forwarding is impossible"), so a router that
# runs it takes its WAN address here instead. It never leaves our namespaces: none of them has
# a link to the host's network.
IGD_NET = "11.18.0.0/24"
T = TypeVar("T")


def missing_requirements(*, upnp: bool = False) -> str | None:
    """Why a namespace test cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, nftables)"
    for tool in ("ip", "nft") + (("miniupnpd",) if upnp else ()):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (.ci/run installs it from Debian packages)"
    return None


@dataclass(frozen=True)
class Machine:
    name: str
    ns: str      # namespace name
    ip: str      # its address (LAN address for a rig, WAN address for a router)


@dataclass
class Router:
    machine: Machine
    lan_ip: str
    lan_prefix: str  # e.g. "192.168.1"
    upnp: bool = False
    rigs: list[Machine] = field(default_factory=list)


@dataclass
class HomeTopology:
    internet: str          # namespace with the bridge
    public: Machine
    routers: dict[str, Router]

    def rig(self, name: str) -> Machine:
        for router in self.routers.values():
            for rig in router.rigs:
                if rig.name == name:
                    return rig
        raise KeyError(name)


class NetLab:
    def __init__(self, tag: str | None = None) -> None:
        # Short: namespace names show in `ip netns`; unique: parallel runs do not collide.
        self.tag = tag or "pf" + secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NetLab:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building -------------------------------------------------------------------------

    def add_ns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self.sh(ns, "ip link set lo up")
        return ns

    def sh(self, ns: str, command: str, *, check: bool = True, input: str | None = None) -> str:
        """Run a shell command inside ``ns``; its stdout."""
        done = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", command], check=False,
                              capture_output=True, text=True, input=input, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"in {ns}: {command!r} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        _run(["ip", "link", "add", "name", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
              "netns", ns_b])
        self.sh(ns_a, f"ip link set {if_a} up")
        self.sh(ns_b, f"ip link set {if_b} up")

    def home_topology(self, rigs: dict[str, int] | None = None, *, upnp: Sequence[str] = (),
                      natpmp: Sequence[str] = (), symmetric: Sequence[str] = ()) -> HomeTopology:
        """The picture in the module docstring: ``rigs`` maps router name -> number of rigs
        behind it (default a: 1, b: 1); routers named in ``upnp`` run miniupnpd, those in
        ``natpmp`` run it with UPnP IGD off (NAT-PMP/PCP only); those in ``symmetric`` pick a
        random outside port per connection (no hole punching through them)."""
        rigs = {"a": 1, "b": 1} if rigs is None else rigs
        inet = self.add_ns("inet")
        self.sh(inet, "ip link add br0 type bridge && ip link set br0 up")
        public = self._on_internet(inet, "public", "198.18.0.10")
        routers: dict[str, Router] = {}
        for n, (name, count) in enumerate(rigs.items(), start=1):
            routers[name] = self._router(inet, name, n, count, upnp=name in upnp or name in natpmp,
                                         igd=name not in natpmp, symmetric=name in symmetric)
        return HomeTopology(internet=inet, public=public, routers=routers)

    def on_internet(self, topology: HomeTopology, name: str, ip: str) -> Machine:
        """One more machine with a public address (198.18.0.0/15) on the topology's internet."""
        return self._on_internet(topology.internet, name, ip)

    def _on_internet(self, inet: str, name: str, ip: str, *, ifname: str = "eth0") -> Machine:
        ns = self.add_ns(name)
        port = f"i-{name}"[:15]
        self.veth(ns, ifname, inet, port)
        self.sh(inet, f"ip link set {port} master br0")
        prefix = 24 if ip.startswith("11.18.") else 15
        self.sh(ns, f"ip addr add {ip}/{prefix} dev {ifname}")
        # Both halves of the internet are on the one bridge: on-link routes, no gateway.
        other = "198.18.0.0/15" if prefix == 24 else IGD_NET
        self.sh(ns, f"ip route add {other} dev {ifname}")
        return Machine(name, ns, ip)

    def _router(self, inet: str, name: str, n: int, count: int, *, upnp: bool, igd: bool = True,
                symmetric: bool = False) -> Router:
        wan_ip = f"11.18.0.{n}" if upnp else f"198.18.{n}.1"
        machine = self._on_internet(inet, f"r{name}", wan_ip, ifname="wan")
        ns, prefix = machine.ns, f"192.168.{n}"
        self.sh(ns, f"ip link add lan type bridge && ip addr add {prefix}.1/24 dev lan && ip link set lan up"
                    " && sysctl -qw net.ipv4.ip_forward=1")
        self.sh(ns, "nft -f -", input=_router_rules(upnp, symmetric))
        router = Router(machine, f"{prefix}.1", prefix, upnp)
        for i in range(count):
            rig_ns = self.add_ns(f"{name}{i + 1}")
            self.veth(rig_ns, "eth0", ns, f"l{i}")
            self.sh(ns, f"ip link set l{i} master lan")
            ip = f"{prefix}.{10 + i}"
            self.sh(rig_ns, f"ip addr add {ip}/24 dev eth0 && ip route add default via {prefix}.1")
            router.rigs.append(Machine(f"{name}{i + 1}", rig_ns, ip))
        if upnp:
            self._start_miniupnpd(router, igd)
        return router

    def _start_miniupnpd(self, router: Router, igd: bool) -> None:
        ns = router.machine.ns
        conf = Path(f"/tmp/{ns}-miniupnpd.conf")
        conf.write_text(_miniupnpd_conf(router.lan_prefix, igd))
        with open(f"/tmp/{ns}-miniupnpd.log", "wb") as log:
            self.spawn(ns, ["miniupnpd", "-d", "-f", str(conf), "-P", f"/tmp/{ns}-miniupnpd.pid"], stdout=log)
        deadline = time.monotonic() + 10
        # Up once it listens: on its HTTP port (UPnP IGD), else on NAT-PMP's UDP port.
        while not (self.can_connect(ns, router.lan_ip, 5000, timeout=0.5) if igd
                   else "5351" in self.sh(ns, "ss -Hlun")):
            if time.monotonic() > deadline:
                raise RuntimeError("miniupnpd did not start:\n" + Path(log.name).read_text()[-2000:])
            time.sleep(0.2)

    # -- running things inside -------------------------------------------------------------

    def spawn(self, ns: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """A process inside ``ns`` in its own process group; ended by close()."""
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], start_new_session=True, **popen)
        self.processes.append(proc)
        return proc

    def inside(self, ns: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` in a thread that has joined ``ns`` (setns is per thread)."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
                try:
                    if _libc().setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def get_json(self, ns: str, url: str, timeout: float = 5.0) -> Any:
        import json

        def fetch() -> Any:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return json.loads(response.read())

        return self.inside(ns, fetch)

    def can_connect(self, ns: str, ip: str, port: int, timeout: float = 1.0) -> bool:
        def probe() -> bool:
            try:
                socket.create_connection((ip, port), timeout=timeout).close()
                return True
            except OSError:
                return False

        return self.inside(ns, probe)

    def listen(self, ns: str, port: int) -> socket.socket:
        """A listening TCP socket on every address of ``ns`` (the caller closes it)."""
        def bind() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(8)
            return sock

        return self.inside(ns, bind)

    # -- cleaning up ----------------------------------------------------------------------

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
            for leftover in Path("/tmp").glob(f"{ns}-miniupnpd.*"):
                leftover.unlink(missing_ok=True)
        self.namespaces.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _router_rules(upnp: bool, symmetric: bool = False) -> str:
    """A home router: masquerade LAN -> WAN, forward only LAN-initiated connections (and, with
    miniupnpd, what its chains let in), drop (not refuse) what comes from the internet
    unasked: a refused SYN would end TCP hole punching. One inet table, which miniupnpd is
    told to use."""
    jump_forward = "jump miniupnpd" if upnp else ""
    jump_pre = "jump prerouting_miniupnpd" if upnp else ""
    jump_post = "jump postrouting_miniupnpd" if upnp else ""
    return f"""
table inet home {{
    chain miniupnpd {{ }}
    chain prerouting_miniupnpd {{ }}
    chain postrouting_miniupnpd {{ }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
        iifname "lan" oifname "lan" accept
        {jump_forward}
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop comment "like a home router: nothing answers from the internet side"
    }}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        {jump_pre}
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        {jump_post}
        oifname "wan" masquerade{" random" if symmetric else ""}
    }}
}}
"""


def _miniupnpd_conf(lan_prefix: str, igd: bool = True) -> str:
    return f"""
ext_ifname=wan
listening_ip=lan
port=5000
enable_natpmp=yes
enable_upnp={"yes" if igd else "no"}
secure_mode=yes
system_uptime=no
upnp_table_name=home
upnp_nat_table_name=home
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
uuid=2869a3b7-933f-47ef-a9dc-{secrets.token_hex(6)}
allow 1024-65535 {lan_prefix}.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""
