"""The public face: what ``steadyrabbit`` and ``steadyrabbit.testing`` export, and only that."""

from __future__ import annotations

import subprocess
import sys

import steadyrabbit
import steadyrabbit.testing


def test_every_exported_name_exists_and_nothing_private_is_exported() -> None:
    for module in (steadyrabbit, steadyrabbit.testing):
        assert module.__all__ == sorted(module.__all__)
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
            assert not name.startswith("_")


def test_public_classes_and_functions_say_they_are_steadyrabbits() -> None:
    """Tracebacks and documentation show ``steadyrabbit.Worker``, not ``steadyrabbit._worker``."""
    for name in steadyrabbit.__all__:
        value = getattr(steadyrabbit, name)
        if isinstance(value, type) or callable(value):
            assert value.__module__ == "steadyrabbit", name


def test_importing_steadyrabbit_loads_no_smtp_http_server_prometheus_or_cli_code() -> None:
    probe = (
        "import sys, steadyrabbit\n"
        "heavy = ('smtplib', 'prometheus_client', 'click', 'steadyrabbit._alerts',\n"
        "         'steadyrabbit._metrics', 'steadyrabbit.testing', 'http.server')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
