"""scripts/cluster: start a local three-node cluster in the background, show it, stop it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]


def cluster(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "cluster"), *args],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def test_start_status_and_stop(tmp_path: Path) -> None:
    directory = str(tmp_path / "cluster")
    try:
        started = cluster("start", directory)
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.count("amqp://guest:guest@127.0.0.1:") == 3
        members = [line for line in started.stdout.splitlines() if "running members" in line]
        assert len(members) == 1
        assert members[0].count("@localhost") == 3
    finally:
        stopped = cluster("stop", directory)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    after = cluster("status", directory)
    assert after.returncode == 1
    assert "no cluster runs" in after.stdout
