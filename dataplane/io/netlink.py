"""Small link helpers for the I/O drivers, tests and the benchmark.

:func:`run_in_netns` runs a function on a short-lived thread that has entered a named network namespace. Whatever the
function creates there (TUN devices, sockets) stays bound to that namespace and can be used from any thread afterwards,
so a test process can own devices in several namespaces at once without ``ip netns exec``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Calls ``fn`` on a new thread inside network namespace ``netns`` (a name under /run/netns) and returns its
    result (or raises its exception). The thread ends afterwards, so no thread of the caller changes namespace."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
