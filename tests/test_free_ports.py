"""free_port's range: ORFEAS_FREE_PORTS when set (the suite's workers each get a slice of their own), a
clear error when it is malformed."""
from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from services.stack import FREE_PORT_LOW, FREE_PORTS_VARIABLE, free_port, free_port_range
from tests.conftest import worker_ports


def test_ports_come_from_the_range_the_variable_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FREE_PORTS_VARIABLE, "31000-31050")
    assert free_port_range() == (31000, 31050)
    ports = [free_port() for _ in range(20)]
    assert all(31000 <= port < 31050 for port in ports), ports
    assert len(set(ports)) == len(ports)  # never handed out twice


def test_without_the_variable_the_range_ends_below_the_ephemeral_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FREE_PORTS_VARIABLE, raising=False)
    low, high = free_port_range()
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low == FREE_PORT_LOW and high <= ephemeral_low


@pytest.mark.parametrize("given", ["31000", "31000-", "high-low", "31050-31000", "80-1000", "1-2-3", "60000-70000"])
def test_a_malformed_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    monkeypatch.setenv(FREE_PORTS_VARIABLE, given)
    with pytest.raises(ValueError, match=f"{FREE_PORTS_VARIABLE}='{given}': expected 'low-high'"):
        free_port()


def test_each_worker_gets_its_own_slice_and_together_they_stay_in_range() -> None:
    slices = [worker_ports((20000, 32768), worker, 3) for worker in range(3)]
    assert slices[0][0] == 20000 and slices[-1][1] <= 32768
    for (_, high), (low, _) in pairwise(slices):
        assert high <= low  # disjoint, in order
    assert all(high - low == (32768 - 20000) // 3 for low, high in slices)
