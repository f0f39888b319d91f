"""lab/netns.py: deleting a namespace also removes the TUN lock files that a killed process left for it."""

from __future__ import annotations

import fcntl
import os

import pytest

from dataplane.io.tun import LOCK_DIR
from lab.netns import Topology, remove_stale_tun_locks

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
]


def _lock_file(namespace: str, ifname: str) -> str:
    os.makedirs(LOCK_DIR, exist_ok=True)
    path = os.path.join(LOCK_DIR, f"tun-{os.stat(f'/run/netns/{namespace}').st_ino}-{ifname}.lock")
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    return path


def test_closing_a_topology_removes_its_unheld_tun_locks() -> None:
    with Topology("lk") as topo:
        ns = topo.add_ns("a")
        stale = _lock_file(ns.name, "tun-stale")
    assert not os.path.exists(stale)


def test_a_lock_still_held_is_left_alone() -> None:
    with Topology("lk") as topo:
        ns = topo.add_ns("a")
        held = _lock_file(ns.name, "tun-held")
        stale = _lock_file(ns.name, "tun-gone")
        fd = os.open(held, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            remove_stale_tun_locks(ns.name)
            assert os.path.exists(held)
            assert not os.path.exists(stale)
        finally:
            os.close(fd)
            os.unlink(held)
