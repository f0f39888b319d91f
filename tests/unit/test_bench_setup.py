"""lab.bench_setup in miniature: the in-process setup benchmark keeps working, with and without its CPU queue."""

from __future__ import annotations

import pytest

from lab.bench_setup import run_one


@pytest.mark.parametrize("cpu_queue", [True, False])
def test_a_few_clients_all_get_their_echo_reply(cpu_queue: bool) -> None:
    figures = run_one(5, "cone", cpu_queue=cpu_queue)
    assert figures["clients"] == 5
    assert 0 < figures["sim_setup_p50_s"] <= figures["sim_setup_p99_s"] < 5.0  # no 5 s cookie retry for five
    assert figures["cookie_replies"] == 0
    assert figures["gateway_us_per_client"] > 0
    assert figures["calls"]["portal create_authorization"] == 5
    # Only the CPU queue makes datagrams wait for the gateway.
    assert (figures["longest_queue"] >= 1) is cpu_queue
