"""UAPI text from a local client (``wg set``/``wg show``) into a UapiSession over a real in-memory Device.

The input is the byte stream; it is fed whole and, in a second session, cut at the position the first byte names, so
line reassembly across reads is exercised too. Invariants: ``receive_data`` never raises; every reply ends in a blank
line; after any input a ``get`` still answers ``errno=0``.
"""

from __future__ import annotations

from dataplane.io.rng import SeededRng
from dataplane.wireguard.device import Device
from dataplane.wireguard.uapi import Uapi
from fuzz.harness import fuzz_main

KEY_A = bytes(range(32)).hex()
KEY_B = bytes(range(32, 64)).hex()
PSK = bytes([7] * 32).hex()


def new_uapi() -> Uapi:
    return Uapi(Device(rng=SeededRng(1), wall_clock=lambda: 1_700_000_000.0))


def seeds() -> list[bytes]:
    set_request = "\n".join(
        [
            "set=1",
            f"private_key={KEY_A}",
            "listen_port=51820",
            "fwmark=0",
            "replace_peers=true",
            f"public_key={KEY_B}",
            f"preshared_key={PSK}",
            "endpoint=[2001:db8::1]:51820",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            "allowed_ip=10.0.0.0/8",
            "allowed_ip=fd00::/64",
            "allowed_ip=-10.0.0.0/8",
            "protocol_version=1",
            f"public_key={KEY_A}",
            "remove=true",
            "",
            "",
        ]
    )
    update_only = f"set=1\npublic_key={KEY_B}\nupdate_only=true\nendpoint=192.0.2.1:1\n\n"
    return [b"get=1\n\n", set_request.encode(), (set_request + "get=1\n\n").encode(), update_only.encode()]


def _run(uapi: Uapi, chunks: list[bytes]) -> None:
    session = uapi.open_session()
    for chunk in chunks:
        session.receive_data(chunk, 0.0)
    session.receive_eof(0.0)
    output = session.data_to_send()
    if output and not output.endswith(b"\n\n"):
        raise AssertionError(f"reply does not end in a blank line: {output[-64:]!r}")


def TestOneInput(data: bytes) -> None:
    uapi = new_uapi()
    _run(uapi, [data])
    cut = data[0] if data else 0
    _run(uapi, [data[:cut], data[cut:]])
    reply = uapi.request("get=1\n\n", 1.0)
    if not reply.endswith("errno=0\n\n"):
        raise AssertionError(f"get failed after fuzzed input: {reply[-64:]!r}")


if __name__ == "__main__":
    fuzz_main("fuzz_uapi")
