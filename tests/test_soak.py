"""The fault soak's short variant (``scripts/soak`` runs the long one): two minutes of random
faults, and not one message lost."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from soak.run import soak

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(600)]


async def test_two_minutes_of_faults_lose_no_message(tmp_path: Path) -> None:
    report = await soak(2.0, 1500, seed=20261201, workdir=tmp_path, log=print)
    print(report.table())
    print(json.dumps(asdict(report)))
    assert report.lost == 0, report.lost_ids
    assert report.published == report.completed + report.dead_lettered + report.still_queued
    # Every kind of fault came at least once in two minutes with this seed.
    assert len(report.faults) >= 5, report.faults
    # Poison messages end in the dead-letter queue with their reason, and nothing is left.
    assert report.dead_lettered > 0
    assert set(report.dead_letter_reasons) == {"gave up after 3 attempts"}
