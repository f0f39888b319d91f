"""The hot-path functions the data plane calls: ``dataplane._native`` (C, GIL released per batch) when it is built
and not disabled with ``FIREZONE_NATIVE=0``, else the pure-Python twin ``dataplane.native_fallback``.

Both have the same API and give byte-identical results; the choice is made once, at import, and logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Protocol

from . import native_fallback

Buffer = native_fallback.Buffer

_log = logging.getLogger(__name__)


class OnesComplementSum(Protocol):
    def __call__(self, data: Buffer, initial: int = 0, /) -> int: ...


def _select() -> tuple[ModuleType, str]:
    try:
        from . import _native
    except ImportError as error:
        return native_fallback, f"the C extension dataplane._native is not built ({error}): pure-Python hot path"
    if _native.disabled_by_environment:
        return native_fallback, "FIREZONE_NATIVE=0: pure-Python hot path"
    return _native, f"C hot path (dataplane._native, {_native.openssl_version})"


implementation, description = _select()
#: True when the C extension is in use.
NATIVE = implementation is not native_fallback
if NATIVE:
    _log.debug("data plane: %s", description)
else:
    _log.info("data plane: %s", description)

seal_batch: Callable[[Buffer, int, int, Sequence[Buffer], int | None], list[bytes]] = implementation.seal_batch
open_batch: Callable[[Buffer, Sequence[Buffer]], list[bytes | None]] = implementation.open_batch
ones_complement_sum: OnesComplementSum = implementation.ones_complement_sum
