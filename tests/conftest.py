"""Shared fixtures: every test runs with a unique tag in its environment, and fails if any
process carrying that tag (an agent, a worker, a worker's child) is still alive 5 s after it."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

TAG_VAR = "TORCHRUNX_TEST_TAG"  # matches the default env_vars pattern TORCH*, so agents and workers inherit it


def processes_with_tag(tag: str) -> list[int]:
    """Live (non-zombie) processes, other than this one, whose environment holds `tag`."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def wait_until_gone(tag: str, seconds: float = 5.0) -> list[int]:
    """Poll until no tagged process is left; return those still alive after `seconds`."""
    end = time.monotonic() + seconds
    while (left := processes_with_tag(tag)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def tag(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A unique tag for this test's processes; asserts none of them outlives the test by 5 s."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG_VAR, value)
    yield value
    left = wait_until_gone(value)
    assert not left, f"processes of this test still alive 5 s after it: {left}"


@pytest.fixture
def local(tmp_path: Path) -> dict[str, object]:
    """Launcher fields for a run on this machine with gloo, logging into the test's folder."""
    return {"hostnames": ["localhost"], "backend": "gloo", "logs": tmp_path / "logs"}


heavy = pytest.mark.skipif(
    os.environ.get("TORCHRUNX_HEAVY_TESTS") != "1",
    reason="a minute or more: runs in its own CI step, ./dev hatch run integrations:test",
)
"""Marks a test too long for the main suite (which must stay under 15 minutes)."""


# --- multi-host test bed (network namespaces with sshd; see tests/multihost.py) ---------------
def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


T = TypeVar("T")


@contextlib.contextmanager
def _test_bed(context: contextlib.AbstractContextManager[T], unavailable: type[Exception], what: str) -> Iterator[T]:
    """Enter a test bed; skip when the machine cannot host it, except in CI (CI=true), where a
    missing prerequisite is a failure."""
    try:
        bed = context.__enter__()
    except unavailable as e:
        if _in_ci():
            pytest.fail(f"{what}: prerequisites are missing in CI: {e}")
        pytest.skip(f"{what} unavailable: {e}")
    try:
        yield bed
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def multihost_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Two hosts (network namespaces, each with sshd and its own hostname) for the whole session.

    Skipped when the machine cannot host them (not root, no sshd...), except in CI (CI=true),
    where a missing prerequisite is a failure.
    """
    from multihost import Unavailable, testbed

    with _test_bed(testbed(tmp_path_factory.mktemp("multihost"), n=2), Unavailable, "multi-host test bed") as bed:
        yield bed


@pytest.fixture(scope="session")
def slurm_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A two-node SLURM cluster (tests/slurmbed.py: slurmctld, a slurmd on each of two hosts of
    their own, munge) for the whole session.

    Skipped when the machine cannot host it (not root, SLURM or sshd not installed...), except
    in CI (CI=true), where a missing prerequisite is a failure.
    """
    from slurmbed import Unavailable, slurm_cluster

    with _test_bed(slurm_cluster(tmp_path_factory.mktemp("slurm"), n=2), Unavailable, "SLURM test bed") as cluster:
        yield cluster
