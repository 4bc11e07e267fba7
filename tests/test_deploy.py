"""The deployment files users copy (deploy/): valid, and in step with what the worker serves and
how it stops."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from steadyrabbit import App, Message, Worker
from tests.conftest import MakeSettings
from tests.test_metrics import get

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def kubernetes(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if doc]


def flag(args: list[str], name: str) -> str:
    (value,) = [a.partition("=")[2] for a in args if a.startswith(f"--{name}=")]
    return value


def deployment() -> dict[str, Any]:
    (found,) = [d for d in kubernetes("deployment.yaml") if d["kind"] == "Deployment"]
    return found


def test_the_kubernetes_deployment_probes_the_port_the_worker_serves() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    port = int(flag(args, "metrics-port"))
    assert flag(args, "metrics-host") == "0.0.0.0"  # reachable by the kubelet
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert ports["metrics"] == port
    # The pod outlives the worker's own grace period.
    assert spec["terminationGracePeriodSeconds"] > float(flag(args, "grace-period"))
    # Every flag is one `steadyrabbit run` takes.
    help_text = subprocess.run(
        [sys.executable, "-m", "steadyrabbit", "run", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for arg in args[3:]:
        assert arg.partition("=")[0] in help_text, arg


def test_the_keda_scaler_targets_the_deployment() -> None:
    scaled, auth = kubernetes("keda-scaledobject.yaml")
    assert scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_the_systemd_unit_stops_gracefully() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    unit.read(DEPLOY / "systemd" / "steadyrabbit-contracts.service")
    service = unit["Service"]
    command = service["ExecStart"].replace("\\\n", " ").split()
    grace = float(command[command.index("--grace-period") + 1])
    assert service["KillMode"] == "mixed"  # SIGTERM to the supervisor, which forwards it
    assert float(service["TimeoutStopSec"]) > grace
    assert service["RestartPreventExitStatus"] == "2"  # bad configuration: no restart loop


@pytest.mark.anyio
async def test_the_probe_paths_answer_on_a_running_worker(
    queue_name: str, make_settings: MakeSettings
) -> None:
    container = deployment()["spec"]["template"]["spec"]["containers"][0]
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        pass

    async with Worker(app, make_settings(metrics_port=0)) as worker:
        for probe in ("livenessProbe", "readinessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert (await get(worker, path)).status == 200, path
