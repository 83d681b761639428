"""Ports and start-up waits for the processes the project starts (localdev.process): no real servers."""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys

import pytest

from localdev import process
from localdev.process import free_port, free_port_block, wait_until


def test_ports_handed_out_never_repeat_or_fall_inside_a_block():
    # CI stop 24: a SeaweedFS block overlapped the Kafka port picked just before it, and Tansu died
    # with "address in use". Every port and block this process hands out must be distinct.
    ports = [free_port() for _ in range(50)]
    blocks = [free_port_block(11) for _ in range(20)]
    taken = ports + [port for base in blocks for port in range(base, base + 11)]
    assert len(taken) == len(set(taken))


def test_ports_are_picked_outside_the_kernels_ephemeral_range():
    eph_low, eph_high = process._ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert not eph_low <= port <= eph_high or (eph_low <= 1024 and eph_high >= 64000)


def test_a_port_someone_listens_on_is_never_handed_out(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        picks = itertools.chain([busy, busy], itertools.count(busy + 1))  # the busy port comes up first
        monkeypatch.setattr(process, "_pick_range", lambda: (busy, busy + 200))

        class Picks:
            def randrange(self, low, high):
                return next(picks)

        monkeypatch.setattr(process.random, "SystemRandom", Picks)
        port = free_port()
    assert port > busy


def test_a_child_that_dies_on_a_taken_port_says_so(tmp_path):
    log = tmp_path / "child.log"
    log.write_text('listening\nERROR err=Os { code: 98, kind: AddrInUse, message: "Address in use" }\n')
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(RuntimeError, match="a port it listens on is taken by another process"):
        wait_until(lambda: False, 5, "the child", proc=proc, log=log)
