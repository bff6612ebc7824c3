"""The namespace topology itself: home routers hide their rigs, miniupnpd opens a port."""

from __future__ import annotations

import subprocess

import pytest
from netlab import NetLab, missing_requirements

pytestmark = pytest.mark.slow


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(missing_requirements(upnp=True) is not None,
                    reason=missing_requirements(upnp=True) or "")
def test_home_routers_hide_rigs_and_upnp_opens_a_port() -> None:
    before = _namespaces()
    with NetLab() as lab:
        t = lab.home_topology({"a": 2, "b": 1}, upnp=["a"])
        a1, a2, b1, pub = t.rig("a1"), t.rig("a2"), t.rig("b1"), t.public
        router_a = t.routers["a"].machine
        listeners = [lab.listen(m.ns, 9000) for m in (a1, a2, b1, pub)]
        assert lab.can_connect(a1.ns, pub.ip, 9000)       # out through the NAT
        assert lab.can_connect(b1.ns, pub.ip, 9000)
        assert lab.can_connect(a1.ns, a2.ip, 9000)        # same LAN
        assert not lab.can_connect(pub.ns, a1.ip, 9000)   # private address: no route
        assert not lab.can_connect(b1.ns, a1.ip, 9000)
        assert not lab.can_connect(pub.ns, router_a.ip, 9000)  # nothing forwarded yet

        def map_port() -> str:
            import miniupnpc

            upnp = miniupnpc.UPnP()
            upnp.discoverdelay = 1000
            assert upnp.discover() >= 1
            upnp.selectigd()
            upnp.addportmapping(9100, "TCP", upnp.lanaddr, 9000, "netlab", "", 120)
            return str(upnp.externalipaddress())

        assert lab.inside(a1.ns, map_port) == router_a.ip
        assert lab.can_connect(b1.ns, router_a.ip, 9100)  # through the mapping
        assert not lab.can_connect(b1.ns, t.routers["b"].machine.ip, 9100)
        for sock in listeners:
            sock.close()
        made = _namespaces() - before
        assert len(made) == 7
    assert not (_namespaces() & made), "namespaces left behind"


@pytest.mark.skipif(missing_requirements() is not None, reason=missing_requirements() or "")
def test_cleanup_after_a_failure() -> None:
    before = _namespaces()
    with pytest.raises(RuntimeError), NetLab() as lab:
        lab.add_ns("x")
        sleeper = lab.spawn(lab.namespaces[0], ["sleep", "60"])
        lab.sh(lab.namespaces[0], "exit 3")
    assert _namespaces() == before
    assert sleeper.poll() is not None
