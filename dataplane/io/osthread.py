"""The kernel's name of the calling thread, so that ``top -H``, ``ps -L`` and ``/proc/<pid>/task/*/comm`` tell a
process's threads apart (CPython names its threads for itself only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

PR_SET_NAME = 15
TASK_COMM_LEN = 16
"""The kernel keeps 15 bytes of a thread's name and a terminating NUL."""

_libc: ctypes.CDLL | None = None
_unavailable = False


def set_os_thread_name(name: str) -> bool:
    """Names the calling thread for the kernel (cut to 15 bytes); False where that is not possible. Never raises:
    a name is a convenience for operators, not something the data path depends on."""
    global _libc, _unavailable
    if _unavailable:
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _unavailable = True
            log.debug("no libc to name threads with")
            return False
    encoded = name.encode("ascii", "replace")[: TASK_COMM_LEN - 1]
    return bool(_libc.prctl(PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0) == 0)
