"""steadyrabbit.testing.pytest_plugin, as a user runs it: the README's example test and the
fixtures, in a pytest of their own (pytester, in a subprocess) against a real private node."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"

FIXTURE_TESTS = """
from collections.abc import Callable

from steadyrabbit.testing import BrokerNode


def get_env(node: BrokerNode, key: str) -> str:
    return node.ctl("eval", f"application:get_env(rabbit, {key}).").strip()


def test_the_session_node_has_the_default_options(rabbitmq_node: BrokerNode) -> None:
    assert rabbitmq_node.is_running()
    assert get_env(rabbitmq_node, "channel_tick_interval") == "{ok,1000}"
    assert get_env(rabbitmq_node, "consumer_timeout") == "{ok,1800000}"  # RabbitMQ's own


def test_the_factory_starts_a_node_with_other_settings(
    rabbitmq_node_factory: Callable[..., BrokerNode], rabbitmq_node: BrokerNode
) -> None:
    node = rabbitmq_node_factory(consumer_timeout_ms=5000)
    assert node.port != rabbitmq_node.port
    assert get_env(node, "consumer_timeout") == "{ok,5000}"
    node.stop()  # sooner than at the end of the session
    assert not node.is_running()
"""


def readme_files() -> dict[str, str]:
    """The README's "Test your consumers" example: each Python block that starts with a
    ``# name.py`` comment, by that name."""
    section = README.read_text().split("## Test your consumers\n", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        name = re.match(r"# (\w+\.py)\n", block)
        if name:
            files[name.group(1)] = block
    return files


@pytest.mark.private_node
@pytest.mark.timeout(240)
@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
def test_the_readme_example_and_the_fixtures_pass(pytester: pytest.Pytester) -> None:
    files = readme_files()
    assert sorted(files) == ["conftest.py", "test_orders.py"]
    for name, text in files.items():
        pytester.path.joinpath(name).write_text(text)
    pytester.makepyfile(test_fixtures=FIXTURE_TESTS)
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers --strict-config -p no:cacheprovider\n"
        "filterwarnings = error\ntimeout = 120\n"
    )
    result = pytester.runpytest_subprocess("-v", timeout=220)
    result.assert_outcomes(passed=3)


def test_the_plugin_is_opt_in() -> None:
    # Not a pytest11 entry point: installing steadyrabbit must not add fixtures (and start
    # nodes) in every project's tests.
    plugins = [ep.value for ep in entry_points(group="pytest11")]
    assert not [plugin for plugin in plugins if plugin.startswith("steadyrabbit")]
