"""Private RabbitMQ nodes for tests.

:func:`start_node` boots a throw-away RabbitMQ node from the machine's RabbitMQ installation
(found in ``/usr/lib/rabbitmq/bin``, Debian's layout, or through ``rabbitmq-server`` on
``PATH``; or given as ``rabbitmq_bin``) with its own name, ports, data directory, Erlang cookie
and configuration, next to whatever broker already runs there, which it never stops or
reconfigures. It needs no root. Written and tested against RabbitMQ 3.10 (Debian package).

Isolation notes:

* Debian's ``/etc/rabbitmq/rabbitmq-env.conf`` is sourced by every script in
  ``/usr/lib/rabbitmq/bin`` and by the Erlang side (``rabbit_env``) and sets
  ``NODENAME=rabbit@localhost``. A ``RABBITMQ_NODENAME`` in the environment wins over it, but a
  ``rabbitmqctl`` without ``-n`` would target the main broker, and anything added to that file
  later would leak into our nodes: ``RABBITMQ_CONF_ENV_FILE`` points at an (empty) env file of
  the node's own, and ``ERL_EPMD_ADDRESS`` / ``ERL_FLAGS`` are set here, with Debian's values.
* Each node gets its own ``HOME`` (= its directory) holding its own ``.erlang.cookie``;
  :meth:`BrokerNode.ctl` runs ``rabbitmqctl -n NODENAME`` with the same environment.
* The node registers with the machine's epmd (127.0.0.1:4369, started by the first Erlang node).
  Node names hold the process id and a random part, so a node left over by a killed test run
  never clashes with a new one.
* The node's distribution port is chosen explicitly (``RABBITMQ_DIST_PORT``): the default
  (AMQP port + 20000) could be taken, e.g. 25672 belongs to a main broker on 5672. A port
  taken between the choice and the node's bind makes :func:`start_node` try again with others.
* ``rabbitmq-server`` runs in the foreground in its own session / process group with
  ``PR_SET_PDEATHSIG=SIGTERM`` (when started from the main thread): if the test process dies,
  even by SIGKILL, the wrapper shell gets SIGTERM and stops the Erlang VM. A node that is
  neither stopped nor referenced any more is stopped when it is garbage-collected, and at the
  latest at interpreter exit (:class:`weakref.finalize`, no registry of our own).
* 3.10 reads every RabbitMQ app of the plugins directory at boot, enabled or not; each node
  gets a RABBITMQ_HOME look-alike (``RABBITMQ_SCRIPTS_DIR``) whose plugins directory only links
  the apps it needs, which saves 1.5-4 s per start.
* On 3.10 ``consumer_timeout`` is evaluated on the channel tick only (60 s by default);
  ``channel_tick_interval_ms=1000`` writes ``[{rabbit, [{channel_tick_interval, 1000}]}].``
  into ``advanced.config`` so that a 5 s timeout fires after ~5-6 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from .._amqp import blocking_probe

__all__ = ["BrokerNode", "Cluster", "find_rabbitmq_bin", "start_cluster", "start_node"]

_T = TypeVar("_T")
_R = TypeVar("_R")

#: Where Debian's and Ubuntu's ``rabbitmq-server`` package installs the scripts.
DEBIAN_RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")

# Debian's values from /etc/rabbitmq/rabbitmq-env.conf, which the nodes do not source.
_ERL_EPMD_ADDRESS = "127.0.0.1"
_ERL_FLAGS = "-kernel inet_dist_use_interface {127,0,0,1}"

_PR_SET_PDEATHSIG = 1
_PLUGIN_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def find_rabbitmq_bin() -> Path:
    """The directory holding ``rabbitmq-server`` and ``rabbitmqctl`` of this machine's RabbitMQ.

    Debian's ``/usr/lib/rabbitmq/bin`` first (``/usr/sbin/rabbitmq-server`` there is a wrapper
    that wants root), else the real directory of the ``rabbitmq-server`` found on ``PATH``.
    """
    candidates = [DEBIAN_RABBITMQ_BIN]
    on_path = shutil.which("rabbitmq-server")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if (directory / "rabbitmq-server").is_file() and (directory / "rabbitmqctl").is_file():
            return directory
    raise FileNotFoundError(
        "no RabbitMQ installation found (looked for rabbitmq-server and rabbitmqctl in "
        f"{DEBIAN_RABBITMQ_BIN} and on PATH): install RabbitMQ (Debian: apt-get install "
        "rabbitmq-server) or pass rabbitmq_bin"
    )


def clean_environ() -> dict[str, str]:
    """The current environment minus anything that could steer a RabbitMQ script or erl."""
    prefixes = ("RABBITMQ_", "ERL_")
    # Unprefixed names that rabbitmq-env / rabbitmq-defaults also honour.
    names = {
        "NODENAME", "NODE_IP_ADDRESS", "NODE_PORT", "DIST_PORT", "CONFIG_FILE",
        "ADVANCED_CONFIG_FILE", "MNESIA_BASE", "MNESIA_DIR", "LOG_BASE", "ENABLED_PLUGINS_FILE",
        "PLUGINS_DIR", "CONF_ENV_FILE", "PID_FILE", "SERVER_ERL_ARGS", "CTL_ERL_ARGS",
        "SERVER_ADDITIONAL_ERL_ARGS", "SERVER_START_ARGS", "USE_LONGNAME", "HOME",
    }  # fmt: skip
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}


def run_ctl(cmd: list[str], env: dict[str, str] | None, timeout: float) -> str:
    """Run a ``rabbitmqctl`` command line; its stdout, or RuntimeError with what it said."""
    try:
        res = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout}s") from exc
    if res.returncode != 0:
        detail = (res.stderr.strip() + "\n" + res.stdout.strip()).strip()
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {res.returncode}: {detail}")
    return res.stdout


def _app_deps(app_file: Path) -> set[str]:
    text = app_file.read_text(errors="replace")
    deps: set[str] = set()
    for key in ("applications", "included_applications"):
        m = re.search(r"\{\s*" + key + r"\s*,\s*\[([^\]]*)\]", text)
        if m:
            deps.update(x.strip() for x in m.group(1).split(",") if x.strip())
    return deps


def _make_rabbitmq_home(dest: Path, server: Path, plugins: list[str]) -> Path | None:
    """A RABBITMQ_HOME look-alike whose plugins dir only links the apps the node needs.

    3.10 scans every RabbitMQ app found in the plugins directory at boot (feature flags and
    boot-step attributes), enabled or not: with the 70 apps of the package that costs 2-4 s.
    Returns the sbin directory to use as RABBITMQ_SCRIPTS_DIR, or None if the installation
    does not look as expected (then the full plugins dir is used).
    """
    real_home = server.resolve().parent.parent
    real_plugins = real_home / "plugins"
    try:
        apps: dict[str, tuple[Path, set[str]]] = {}
        for d in real_plugins.iterdir():
            name = d.name.rsplit("-", 1)[0]
            app_file = d / "ebin" / f"{name}.app"
            if d.is_dir() and app_file.is_file():
                apps[name] = (d, _app_deps(app_file))
        if "rabbit" not in apps or any(p not in apps for p in plugins):
            return None
        wanted: set[str] = set()
        todo = ["rabbit", "rabbitmq_prelaunch", *plugins]
        while todo:
            app = todo.pop()
            if app in apps and app not in wanted:
                wanted.add(app)
                todo.extend(apps[app][1])
        (dest / "sbin").mkdir(parents=True)
        (dest / "plugins").mkdir()
        for script in (real_home / "sbin").iterdir():
            (dest / "sbin" / script.name).symlink_to(script)
        (dest / "escript").symlink_to(real_home / "escript")
        for app in sorted(wanted):
            src = apps[app][0]
            (dest / "plugins" / src.name).symlink_to(src)
    except OSError:
        return None
    return dest / "sbin"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free on 127.0.0.1 right now.

    Another process may take one before the node binds it: start_node then tries again.
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            # Every socket stays bound until all are chosen, so the ports differ.
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _tail(path: Path, lines: int) -> str:
    """The first error lines (usually the cause) and the last ``lines`` lines of a log."""
    try:
        all_lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    tail = all_lines[-lines:]
    head = [ln for ln in all_lines[: len(all_lines) - len(tail)] if "[error]" in ln][:15]
    return "\n".join([*head, "[...]", *tail] if head else tail)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _amqp_ok(port: int, timeout: float = 5.0) -> bool:
    """True when a real AMQP connection (open + channel + close) succeeds."""
    return _port_open(port) and blocking_probe("127.0.0.1", port, timeout)


def _kill_orphaned_vm(home: Path) -> None:
    """If the wrapper shell died but its Erlang VM did not, kill the VM (by its pid file).

    Only a process whose command line names this node's home directory is touched.
    """
    try:
        pid = int((home / "rabbitmq.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError):
        return
    if b"beam" in cmdline and str(home).encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kill_node(proc: subprocess.Popen[bytes], home: Path) -> None:
    """Stop a node's process group without ``rabbitmqctl``: SIGTERM (RabbitMQ shuts down
    cleanly on it, ~1.1 s), then SIGKILL after 15 s; then any orphaned Erlang VM."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        # proc is not reaped yet, so its pid (== pgid) cannot have been reused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    if proc.poll() is not None:
        _kill_orphaned_vm(home)


@dataclass
class BrokerNode:
    """A private RabbitMQ node started by :func:`start_node`; ``home`` holds everything.

    Log in as guest/guest on 127.0.0.1 (:attr:`url`). Use it as a context manager, or call
    :meth:`stop`, to stop it.
    """

    nodename: str
    port: int
    home: Path
    rabbitmq_bin: Path
    dist_port: int = 0
    mgmt_port: int | None = None
    startup_seconds: float = 0.0
    env: dict[str, str] = field(default_factory=dict, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # Stops the node if it is garbage-collected or left running at interpreter exit.
    _finalizer: weakref.finalize[[subprocess.Popen[bytes], Path], BrokerNode] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT/%2F``: the node's default virtual host."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def mgmt_url(self) -> str:
        """The management HTTP API's base URL (with ``plugins=["rabbitmq_management"]``)."""
        if self.mgmt_port is None:
            raise RuntimeError(f"{self.nodename} was started without rabbitmq_management")
        return f"http://127.0.0.1:{self.mgmt_port}"

    @property
    def pid(self) -> int | None:
        """PID of the rabbitmq-server wrapper (also the process group id), if running."""
        return None if self._proc is None else self._proc.pid

    @property
    def server_log(self) -> Path:
        return self.home / "log" / f"{self.nodename}.log"

    @property
    def stdout_log(self) -> Path:
        return self.home / "server.out"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return (
            f"--- {self.stdout_log} ---\n{_tail(self.stdout_log, lines)}\n"
            f"--- {self.server_log} ---\n{_tail(self.server_log, lines)}"
        )

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n NODENAME ARGS`` with this node's HOME/cookie; returns stdout."""
        ctl = self.rabbitmq_bin / "rabbitmqctl"
        return run_ctl([str(ctl), "-n", self.nodename, *args], self.env, timeout)

    def stop_app(self) -> None:
        """``rabbitmqctl stop_app``: the broker stops (connections drop, the port closes) but
        the Erlang VM stays up, so :meth:`start_app` brings it back quickly."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """``rabbitmqctl start_app``; returns once a real AMQP connection succeeds."""
        self.ctl("start_app")
        self.wait_ready()

    def close_all_connections(self, reason: str = "test") -> None:
        """Close every client connection broker side (``CONNECTION_FORCED``, 320, ``reason``)."""
        self.ctl("close_all_connections", reason)

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the AMQP port takes a real AMQP connection; raise if the node died."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None:
                raise RuntimeError(f"node {self.nodename} is not running (stopped)")
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"RabbitMQ node {self.nodename} exited with code {rc}\n{self.log_tail()}"
                )
            if _amqp_ok(self.port) and (self.mgmt_port is None or _port_open(self.mgmt_port)):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"RabbitMQ node {self.nodename} not ready on port {self.port} "
                    f"after {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, *, graceful: bool = True) -> None:
        """Stop the node and reap it. Idempotent.

        ``graceful``: ``rabbitmqctl stop`` first (~1.7 s). Either way, if the node is still
        alive, SIGTERM goes to the process group we started, then SIGKILL after 15 s.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            if graceful and proc.poll() is None:
                with contextlib.suppress(RuntimeError):
                    self.ctl("stop", timeout=20)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
            _kill_node(proc, self.home)
        finally:
            if proc.poll() is not None:
                self._proc = None
                if self._finalizer is not None:
                    self._finalizer.detach()

    def kill(self) -> None:
        """SIGKILL the node's processes (a crash: nothing is flushed, no goodbye to peers)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def restart(self, timeout: float = 90) -> None:
        """Start the node again, on its ports and data, after :meth:`stop` or :meth:`kill`;
        returns once it takes AMQP connections."""
        if self.is_running():
            raise RuntimeError(f"node {self.nodename} is running")
        self._launch()
        self.wait_ready(timeout=timeout)

    def _launch(self) -> None:
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits: only use it from the
        # main thread (a node started from another thread relies on the finalizer).
        preexec: Callable[[], None] | None = None
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(OSError):
                preexec = _die_with_parent(ctypes.CDLL(None, use_errno=True))
        with (self.home / "server.out").open("ab") as out:
            self._proc = subprocess.Popen(
                [str(self.rabbitmq_bin / "rabbitmq-server")],
                cwd=self.home,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill_node, self._proc, self.home)

    def __enter__(self) -> BrokerNode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_node(
    base_dir: Path | str,
    *,
    consumer_timeout_ms: int | None = None,
    channel_tick_interval_ms: int | None = None,
    extra_conf: str = "",
    plugins: Iterable[str] = (),
    start_timeout: float = 90,
    trim_plugins_dir: bool = True,
    rabbitmq_bin: Path | str | None = None,
    cookie: str | None = None,
) -> BrokerNode:
    """Start a private RabbitMQ node in a fresh directory under ``base_dir``.

    Returns once the node accepts real AMQP connections as guest/guest on 127.0.0.1 (a few
    seconds). ``consumer_timeout_ms`` sets the broker's ``consumer_timeout``; on 3.10 it is
    checked on the channel tick only, so give ``channel_tick_interval_ms=1000`` with a short
    timeout. ``extra_conf`` is appended to ``rabbitmq.conf`` (new-style sysctl format).
    ``plugins`` is the enabled-plugins list (empty by default, which keeps startup fast); with
    ``rabbitmq_management`` the HTTP API listens on a free port (:attr:`BrokerNode.mgmt_url`).
    Other plugins with listeners of their own (mqtt, stomp, prometheus...) need ports in
    ``extra_conf`` so that they do not collide with services already on this machine.
    ``trim_plugins_dir`` (default) gives the node a plugins directory holding only the apps it
    needs (symlinks), which roughly halves the boot time of 3.10. ``rabbitmq_bin`` is the
    directory of ``rabbitmq-server`` and ``rabbitmqctl`` (default: :func:`find_rabbitmq_bin`).
    ``cookie``: the Erlang cookie (default: a random one); nodes that are to form a cluster
    share one (see :func:`start_cluster`).
    """
    plugin_list = list(plugins)
    for p in plugin_list:
        if not _PLUGIN_RE.match(p):
            raise ValueError(f"bad plugin name {p!r}")
    bin_dir = find_rabbitmq_bin() if rabbitmq_bin is None else Path(rabbitmq_bin)
    for script in ("rabbitmq-server", "rabbitmqctl"):
        if not (bin_dir / script).is_file():
            raise FileNotFoundError(
                f"no {script} in {bin_dir}: rabbitmq_bin is the directory of RabbitMQ's scripts "
                f"(Debian: {DEBIAN_RABBITMQ_BIN})"
            )
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            return _start_once(
                base_dir,
                bin_dir,
                consumer_timeout_ms=consumer_timeout_ms,
                channel_tick_interval_ms=channel_tick_interval_ms,
                extra_conf=extra_conf,
                plugins=plugin_list,
                start_timeout=start_timeout,
                trim_plugins_dir=trim_plugins_dir,
                cookie=cookie,
            )
        except RuntimeError as exc:
            # A port we picked was taken between the check and the node's bind: try again
            # with new ports (and a new name and directory).
            if attempt == attempts or "eaddrinuse" not in str(exc):
                raise
    raise AssertionError("unreachable")


def _die_with_parent(libc: ctypes.CDLL) -> Callable[[], None]:
    def in_child() -> None:  # runs in the child between fork and exec
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return in_child


def _start_once(
    base_dir: Path,
    bin_dir: Path,
    *,
    consumer_timeout_ms: int | None,
    channel_tick_interval_ms: int | None,
    extra_conf: str,
    plugins: list[str],
    start_timeout: float,
    trim_plugins_dir: bool,
    cookie: str | None,
) -> BrokerNode:
    server = bin_dir / "rabbitmq-server"
    nodename = f"srtest{os.getpid()}r{secrets.token_hex(4)}@localhost"
    short = nodename.split("@", 1)[0]
    home = Path(tempfile.mkdtemp(prefix=f"{short}-", dir=base_dir)).resolve()
    (home / "mnesia").mkdir()
    (home / "log").mkdir()

    want_mgmt = "rabbitmq_management" in plugins
    ports = _free_ports(3 if want_mgmt else 2)
    port, dist_port = ports[0], ports[1]
    mgmt_port = ports[2] if want_mgmt else None

    conf = [
        f"listeners.tcp.default = 127.0.0.1:{port}",
        "log.console = false",
        "log.file.level = info",
    ]
    if consumer_timeout_ms is not None:
        conf.append(f"consumer_timeout = {int(consumer_timeout_ms)}")
    if mgmt_port is not None:
        conf += ["management.tcp.ip = 127.0.0.1", f"management.tcp.port = {mgmt_port}"]
    if extra_conf:
        conf.append(extra_conf)
    (home / "rabbitmq.conf").write_text("\n".join(conf) + "\n")

    # channel_tick_interval has no rabbitmq.conf key on 3.10: advanced.config only.
    rabbit_env: list[str] = []
    if channel_tick_interval_ms is not None:
        rabbit_env.append(f"{{channel_tick_interval, {int(channel_tick_interval_ms)}}}")
    (home / "advanced.config").write_text(f"[{{rabbit, [{', '.join(rabbit_env)}]}}].\n")
    (home / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
    (home / "rabbitmq-env.conf").write_text(
        "# Private test node: used instead of /etc/rabbitmq/rabbitmq-env.conf\n"
    )
    cookie_file = home / ".erlang.cookie"
    cookie_file.write_text(cookie or secrets.token_hex(16).upper())
    cookie_file.chmod(0o400)

    env = clean_environ()
    env.update(
        HOME=str(home),
        ERL_EPMD_ADDRESS=_ERL_EPMD_ADDRESS,
        ERL_FLAGS=_ERL_FLAGS,
        RABBITMQ_CONF_ENV_FILE=str(home / "rabbitmq-env.conf"),
        RABBITMQ_NODENAME=nodename,
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_MNESIA_BASE=str(home / "mnesia"),
        RABBITMQ_LOG_BASE=str(home / "log"),
        RABBITMQ_CONFIG_FILE=str(home / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(home / "advanced.config"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(home / "enabled_plugins"),
        RABBITMQ_PID_FILE=str(home / "rabbitmq.pid"),
    )
    scripts_dir = (
        _make_rabbitmq_home(home / "rmqhome", server, plugins) if trim_plugins_dir else None
    )
    if scripts_dir is not None:
        env["RABBITMQ_SCRIPTS_DIR"] = str(scripts_dir)
        env["RABBITMQ_PLUGINS_DIR"] = str(scripts_dir.parent / "plugins")
    node = BrokerNode(
        nodename=nodename,
        port=port,
        home=home,
        rabbitmq_bin=bin_dir,
        dist_port=dist_port,
        mgmt_port=mgmt_port,
        env=env,
    )

    t0 = time.monotonic()
    node._launch()
    try:
        node.wait_ready(timeout=start_timeout)
    except BaseException:
        node.stop(graceful=False)
        raise
    node.startup_seconds = time.monotonic() - t0
    return node


@dataclass
class Cluster:
    """Private nodes joined into one RabbitMQ cluster (see :func:`start_cluster`)."""

    nodes: list[BrokerNode]

    @property
    def urls(self) -> list[str]:
        """Every node's ``amqp://guest:guest@127.0.0.1:PORT/%2F``, in order."""
        return [node.url for node in self.nodes]

    def node_on_port(self, port: int) -> BrokerNode:
        (node,) = [n for n in self.nodes if n.port == port]
        return node

    def running(self) -> list[BrokerNode]:
        return [n for n in self.nodes if n.is_running()]

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl`` against the first running node."""
        return self.running()[0].ctl(*args, timeout=timeout)

    def queue_leader(self, queue: str) -> BrokerNode:
        """The node that leads quorum queue ``queue`` now."""
        listing = self.ctl("list_queues", "name", "leader", "--no-table-headers", "--quiet")
        for line in listing.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                (node,) = [n for n in self.nodes if n.nodename == leader.strip()]
                return node
        raise LookupError(f"no queue {queue!r} in the cluster")

    def stop(self) -> None:
        """Stop every node, all at once: one after the other, each stop waits out the
        others' goodbyes (about 8 s a node on a three-node cluster)."""
        errors = [
            outcome
            for outcome in _all_at_once(lambda node: node.stop(), self.nodes)
            if isinstance(outcome, BaseException)
        ]
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _all_at_once(call: Callable[[_T], _R], items: Iterable[_T]) -> list[_R | BaseException]:
    """``call(item)`` for every item, each in a thread of its own, all at once; what each
    returned or raised, in order (nothing is raised here: the caller sees every outcome)."""
    items = list(items)
    outcomes: list[_R | BaseException] = [RuntimeError("not run")] * len(items)

    def run(index: int) -> None:
        try:
            outcomes[index] = call(items[index])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller with the others
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def start_cluster(base_dir: Path | str, size: int = 3, **node_options: object) -> Cluster:
    """Start ``size`` private nodes (in parallel, with one cookie) and join them into one
    cluster; ``node_options`` are :func:`start_node`'s. Returns once every node takes AMQP
    connections as a member. Stop it with :meth:`Cluster.stop` (or a ``with`` block)."""
    if size < 1:
        raise ValueError("a cluster has at least one node")
    cookie = secrets.token_hex(16).upper()
    started = _all_at_once(
        lambda _index: start_node(base_dir, cookie=cookie, **node_options),  # type: ignore[arg-type]
        range(size),
    )
    nodes = [n for n in started if isinstance(n, BrokerNode)]
    errors = [e for e in started if not isinstance(e, BrokerNode)]
    if errors:
        for node in nodes:
            node.stop(graceful=False)
        raise errors[0]
    cluster = Cluster(nodes)
    try:
        first = nodes[0]
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("reset")
            node.ctl("join_cluster", first.nodename)
            node.start_app()
    except BaseException:
        cluster.stop()
        raise
    return cluster
