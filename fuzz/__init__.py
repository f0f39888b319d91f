"""Coverage-guided fuzz targets (atheris) for every parser that reads network or portal input.

Each ``fuzz_<name>.py`` module has a ``TestOneInput(data: bytes) -> None`` that raises only when the parser under test
misbehaves (an exception other than its documented parse error, or a broken invariant), and a ``seeds()`` function
returning the starting corpus. Run one with ``python -m fuzz.fuzz_<name> [libFuzzer flags] [corpus dir]``;
``make fuzz`` runs them all for a fixed time, and tests/property/test_fuzz_targets.py runs a short, counted pass of each.
"""

from __future__ import annotations

TARGETS = (
    "fuzz_stun",
    "fuzz_channel_data",
    "fuzz_wireguard_message",
    "fuzz_ip_packet",
    "fuzz_p2p_control",
    "fuzz_portal_message",
    "fuzz_uapi",
    "fuzz_native",
)
