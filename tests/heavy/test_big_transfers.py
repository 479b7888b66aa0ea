"""A 200 MB argument and a 200 MB result over a 20 Mbit/s link (80 s each way), with the default
heartbeat_timeout (15 s): the launcher and the agent stay in touch while either is busy with a
big frame (heartbeats from a thread of each, silence judged only with nothing left unread).

Minutes long (`heavy`): run in its own CI step (``./dev hatch run integrations:test``, which
sets TORCHRUNX_HEAVY_TESTS=1); the main suite skips it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import torchrunx as trx
from conftest import heavy
from multihost import Host, TestBed

pytestmark = heavy

RATE = "20mbit"
SIZE = 200 * 2**20


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _host_side_link(host: Host) -> str:
    """The root namespace's end of `host`'s veth: the link whose index the host's eth0 names as its peer."""
    inner = subprocess.run(["ip", "-n", host.netns, "-o", "link", "show", "eth0"], check=True, capture_output=True)
    peer = inner.stdout.decode().split(":")[1].strip().split("@if")[1]  # "eth0@if12" -> "12"
    outer = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True).stdout.decode()
    (name,) = [line.split(":")[1].strip().split("@")[0] for line in outer.splitlines() if line.split(":")[0] == peer]
    return name


@pytest.fixture
def slow_link(multihost_bed: TestBed) -> Iterator[Host]:
    """Host 0, reached over a 20 Mbit/s link both ways (token bucket filters at both ends)."""
    host = multihost_bed.hosts[0]
    outer = _host_side_link(host)
    shape = ("root", "tbf", "rate", RATE, "burst", "32kbit", "latency", "400ms")
    _run("tc", "qdisc", "add", "dev", outer, *shape)  # towards the host: the argument
    try:
        _run("ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", "eth0", *shape)  # back: the result
        try:
            yield host
        finally:
            _run("ip", "netns", "exec", host.netns, "tc", "qdisc", "del", "dev", "eth0", "root")
    finally:
        _run("tc", "qdisc", "del", "dev", outer, "root")


def digest_and_echo(blob: bytes) -> tuple[str, bytes]:
    return hashlib.sha256(blob).hexdigest(), blob


@pytest.mark.timeout(900)
def test_a_200_mb_argument_and_a_200_mb_result_cross_a_20_mbit_link(
    slow_link: Host, multihost_bed: TestBed, tmp_path: Path
) -> None:
    blob = os.urandom(SIZE)
    started = time.monotonic()
    results = trx.launch(
        digest_and_echo,
        func_args=(blob,),
        hostnames=[slow_link.alias],
        workers_per_host=1,
        ssh_config_file=multihost_bed.ssh_config,
        backend="gloo",
        logs=tmp_path / "logs",
    )
    took = time.monotonic() - started
    digest, echoed = results[0]
    assert digest == hashlib.sha256(blob).hexdigest()
    assert echoed == blob
    # The link did limit the transfer (so the heartbeats were really put to the test): 2 x 200 MB
    # at 20 Mbit/s is 168 s; well over the 15 s heartbeat timeout either way.
    assert took > 2 * SIZE * 8 / 20e6 * 0.8, took
    left = multihost_bed.wait_no_leftovers()
    assert not left, left
