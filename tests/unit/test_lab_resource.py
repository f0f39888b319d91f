"""The lab's resource host helpers and the lab world's configuration (no namespaces needed)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import struct
import threading

import pytest

from lab.relay import coturn_password
from lab.resource import BLOB_PATH, _handler, _icmp_about, blob, blob_sha256, fetch
from lab.world import LAB_RESOURCES, RELAY_SECRET, LabWorld, nat_ruleset


def test_the_blob_is_deterministic_and_its_digest_is_known() -> None:
    assert blob(1000) == blob(1000) and len(blob(1000)) == 1000
    assert blob(1000) != blob(1000, seed=b"other")
    assert blob_sha256(4096) == hashlib.sha256(blob(4096)).hexdigest()


def test_fetch_downloads_the_blob_and_its_digest_matches() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(blob(70_000)))
    thread = threading.Thread(target=server.serve_forever, name="blob-server")
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, result = fetch(f"{url}{BLOB_PATH}", timeout=5)
        assert code == 0 and result["bytes"] == 70_000 and result["sha256"] == blob_sha256(70_000)
        code, missing = fetch(f"{url}/nothing", timeout=5)
        assert code == 1 and "error" in missing
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _icmp_unreachable(code: int, quoted_dst: str, quoted_port: int) -> bytes:
    quoted_ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton("10.2.0.2"),
                            socket.inet_aton(quoted_dst))  # fmt: skip
    quoted = quoted_ip + struct.pack("!HH", 40000, quoted_port) + bytes(4)
    icmp = struct.pack("!BBHI", 3, code, 0, 0) + quoted
    outer = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, socket.inet_aton("172.20.0.10"),
                        socket.inet_aton("10.2.0.2"))  # fmt: skip
    return outer + icmp


def test_icmp_errors_are_matched_to_the_probed_connection() -> None:
    assert _icmp_about(_icmp_unreachable(13, "172.20.0.10", 22), "172.20.0.10", 22) == (3, 13)
    assert _icmp_about(_icmp_unreachable(13, "172.20.0.10", 80), "172.20.0.10", 22) is None
    assert _icmp_about(_icmp_unreachable(13, "172.20.0.11", 22), "172.20.0.10", 22) is None
    assert _icmp_about(b"\x45" + bytes(10), "172.20.0.10", 22) is None
    echo_reply = bytearray(_icmp_unreachable(0, "172.20.0.10", 22))
    echo_reply[20] = 0
    assert _icmp_about(bytes(echo_reply), "172.20.0.10", 22) is None


def test_the_portal_config_of_a_world_mints_relay_passwords_coturn_accepts() -> None:
    world = LabWorld(relays=2, clients=2, resources=("lan-web",))
    config = world.config
    assert [c.token for c in config.clients] == ["lab-client-token-1", "lab-client-token-2"]
    assert [r.id for r in config.resources] == [LAB_RESOURCES["lan-web"].id]
    entries = config.relay_entries("B" * 43 + "=")
    assert [e["addr"] for e in entries] == ["172.31.0.11:3478", "172.31.0.12:3478"]
    for entry in entries:
        assert entry["password"] == coturn_password(RELAY_SECRET, entry["username"])


@pytest.mark.parametrize(
    "options",
    [{"relays": 3}, {"relays": 0}, {"clients": 3}, {"resources": ("nope",)}, {"gateway_nat": "full cone"}],
)
def test_a_world_refuses_options_it_cannot_build(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LabWorld(**options)  # type: ignore[arg-type]


def test_only_random_masquerade_randomizes_ports() -> None:
    assert "masquerade random" in nat_ruleset("veth0", "masquerade random")
    plain = nat_ruleset("veth0", "masquerade")
    assert "masquerade\n" in plain and "random" not in plain
