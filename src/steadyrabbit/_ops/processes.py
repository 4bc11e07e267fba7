"""Several worker processes under one parent (``steadyrabbit run/relay --processes N``).

The parent process, a :class:`WorkerPool`, starts N copies of a command, each a complete worker
with its own connection, and keeps them running. Users know it as the supervisor (logs, help,
README say so); the code calls it the pool, to leave that word to the connection supervisor.

* a worker that dies (a crash, a signal, any exit the supervisor did not ask for) is started
  again after an exponential backoff with jitter, reset once a worker has stayed up for a while,
  so a worker that dies at once cannot turn into a hot restart loop;
* a worker that fails the way every worker would (exit status 2, a configuration error; or
  status 1 within ``startup_window`` of the first start of its slot: bad credentials, no
  broker) stops them all, and the supervisor exits with that status. The worker printed its
  one-line error to the stderr it shares with the supervisor, which adds one log record;
* the first SIGINT/SIGTERM is passed on to every worker as SIGTERM (a graceful stop: running
  handlers finish within the grace period) and nothing is restarted any more; the second one is
  passed on as a second SIGTERM (stop at once), a third as SIGKILL. Workers still running
  ``grace_period`` + :data:`STOP_MARGIN` seconds after the first are stopped at once, and
  killed :data:`KILL_AFTER` seconds after that (both adjustable).

Workers run in their own process group, so a Ctrl-C in a terminal reaches the supervisor only
(a worker that got SIGINT from the terminal and then SIGTERM from the supervisor would take it
as a second signal). For the same reason a service manager should signal the supervisor alone
(systemd: ``KillMode=mixed``). Workers never outlive the supervisor: on Linux the kernel sends
them SIGTERM when it dies (``PR_SET_PDEATHSIG``); elsewhere each worker watches a pipe whose
write end only the supervisor holds (:func:`watch_pool`) and stops itself when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from .._backoff import backoff_delay
from .._errors import ConfigurationError

log = logging.getLogger("steadyrabbit.processes")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: After the first signal, workers get their grace period plus this long (closing connections,
#: shutdown hooks) before they are told to stop at once.
STOP_MARGIN = 10.0
#: ... and this long after that before they are killed.
KILL_AFTER = 5.0

#: Set in a worker's environment, in ``"pipe"`` mode only: the descriptor to watch.
SUPERVISOR_FD_ENV = "STEADYRABBIT_SUPERVISOR_FD"

ParentDeath = Literal["auto", "signal", "pipe"]

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2


def without_option(args: Sequence[str], option: str) -> list[str]:
    """``args`` without ``option VALUE`` and ``option=VALUE`` (arguments after ``--`` are kept).

    A value of another option that happens to be spelled like ``option`` would be taken for it:
    the caller checks the result (see ``steadyrabbit._cli.run``).
    """
    kept: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            kept.extend(args[index:])
            break
        if arg == option:
            index += 2
            continue
        if not arg.startswith(f"{option}="):
            kept.append(arg)
        index += 1
    return kept


def describe_exit(returncode: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``, for a Popen returncode."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def run_worker_pool(
    command: Sequence[str],
    processes: int,
    *,
    grace_period: float,
    startup_window: float = 5.0,
    restart_delay: float = 1.0,
    restart_delay_max: float = 30.0,
    stable_after: float = 30.0,
    stop_margin: float = STOP_MARGIN,
    kill_after: float = KILL_AFTER,
    env: Mapping[str, str] | None = None,
    parent_death: ParentDeath = "auto",
    slot_args: Callable[[int], Sequence[str]] | None = None,
) -> int:
    """Run ``processes`` copies of ``command`` until SIGINT or SIGTERM; return the exit status.

    0 when every worker stopped cleanly after the first signal; 1 after a forced stop (second
    signal, or workers that overran ``grace_period``) or when a worker had died and was waiting
    to be restarted; the worker's status when one failed the way every worker would.
    ``command`` is the whole command line of a worker (``[sys.executable, "-m", ...]``), run
    with ``env`` (default: this process's environment), plus ``slot_args(i)`` for the worker in
    slot ``i`` (0 to processes - 1), e.g. its own metrics port. Call it from the main thread: it
    handles the signals, and on Linux the workers' parent-death signal is bound to the thread
    that started them. See :class:`WorkerPool` for the other arguments.
    """
    pool = WorkerPool(
        command,
        processes,
        grace_period=grace_period,
        startup_window=startup_window,
        restart_delay=restart_delay,
        restart_delay_max=restart_delay_max,
        stable_after=stable_after,
        stop_margin=stop_margin,
        kill_after=kill_after,
        env=env,
        parent_death=parent_death,
        slot_args=slot_args,
    )
    return asyncio.run(pool.run())


class WorkerPool:
    """Keeps ``processes`` copies of ``command`` running; use :func:`run_worker_pool`, or from a
    loop::

        pool = WorkerPool(command, 4, grace_period=30)
        task = asyncio.create_task(pool.run(handle_signals=False))
        ...
        pool.stop()                  # graceful; again to stop at once, a third time to kill
        status = await task

    ``startup_window``: a worker that exits with status 1 this soon after the first start of
    its slot never got up (the CLI uses the connect timeout plus a margin). Restarts wait
    ``backoff_delay(n, base=restart_delay, cap=restart_delay_max)`` where ``n`` counts the
    restarts since the slot's worker last stayed up ``stable_after`` seconds. ``parent_death``
    chooses how workers notice that the supervisor died: ``"signal"`` (Linux' prctl),
    ``"pipe"`` (a worker running :func:`watch_pool`), ``"auto"``: the first available.
    Workers still running ``grace_period + stop_margin`` seconds after the first stop are
    stopped at once, and killed ``kill_after`` seconds after that. Run it in the main thread:
    the parent-death signal is sent when the thread that started a worker ends.
    """

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        grace_period: float,
        startup_window: float = 5.0,
        restart_delay: float = 1.0,
        restart_delay_max: float = 30.0,
        stable_after: float = 30.0,
        stop_margin: float = STOP_MARGIN,
        kill_after: float = KILL_AFTER,
        env: Mapping[str, str] | None = None,
        parent_death: ParentDeath = "auto",
        slot_args: Callable[[int], Sequence[str]] | None = None,
    ) -> None:
        if os.name != "posix":
            raise ConfigurationError("several worker processes need a POSIX system")
        if isinstance(processes, bool) or processes < 1:
            raise ConfigurationError(f"the number of processes must be >= 1, not {processes!r}")
        if not command:
            raise ConfigurationError("no worker command given")
        if min(grace_period, startup_window, stable_after, stop_margin, kill_after) < 0:
            raise ConfigurationError("durations must be >= 0 seconds")
        if not 0 < restart_delay <= restart_delay_max:
            raise ConfigurationError("need 0 < restart_delay <= restart_delay_max")
        self._command = list(command)
        self._slot_args = slot_args
        self._processes = processes
        self._grace_period = grace_period
        self._startup_window = startup_window
        self._restart_delay = restart_delay
        self._restart_delay_max = restart_delay_max
        self._stable_after = stable_after
        self._stop_margin = stop_margin
        self._kill_after = kill_after
        self._env = dict(os.environ if env is None else env)
        self._preexec: Callable[[], None] | None = None
        if parent_death in ("auto", "signal"):
            self._preexec = _parent_death_signal()
            if self._preexec is None and parent_death == "signal":
                raise ConfigurationError("prctl(PR_SET_PDEATHSIG) is not available here")
        elif parent_death != "pipe":
            raise ConfigurationError(f"unknown parent_death mode {parent_death!r}")
        self._use_pipe = self._preexec is None
        self._pipe: tuple[int, int] | None = None
        self._running: dict[int, asyncio.subprocess.Process] = {}
        # slot -> its last worker stopped cleanly when asked to (True before it ever started)
        self._clean = dict.fromkeys(range(1, processes + 1), True)
        self._level = 0  # 0 running, 1 stopping gracefully, 2 stopping at once, 3 killing
        self._stopping = asyncio.Event()
        self._escalation: asyncio.TimerHandle | None = None
        self._fatal: int | None = None

    @property
    def pids(self) -> dict[int, int]:
        """Slot number (from 1) -> pid of the worker running in it now."""
        return {slot: proc.pid for slot, proc in self._running.items()}

    async def run(self, *, handle_signals: bool = True) -> int:
        """Start the workers, keep them running until stopped; return the exit status."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for signum in signals:
            loop.add_signal_handler(signum, self._on_signal, signum)
        if self._use_pipe:
            self._pipe = os.pipe()
        slots = [
            asyncio.create_task(self._slot(slot), name=f"worker slot {slot}")
            for slot in range(1, self._processes + 1)
        ]
        try:
            await asyncio.gather(*slots)
        except BaseException:
            log.exception("the supervisor failed; killing the workers")
            await self._kill_everything(slots)
            raise
        finally:
            if self._escalation is not None:
                self._escalation.cancel()
            for signum in signals:
                loop.remove_signal_handler(signum)
            if self._pipe is not None:
                for fd in self._pipe:
                    os.close(fd)
                self._pipe = None
        if self._fatal is not None:
            return self._fatal
        if self._level >= 2:
            return EXIT_FAILURE
        return EXIT_OK if all(self._clean.values()) else EXIT_FAILURE

    def stop(self) -> None:
        """One step further: stop gracefully, then at once (SIGTERM again), then SIGKILL.

        Call it from the event loop that runs :meth:`run`.
        """
        self._level = min(self._level + 1, 3)
        self._stopping.set()
        if self._escalation is not None:
            self._escalation.cancel()
            self._escalation = None
        signum = signal.SIGKILL if self._level >= 3 else signal.SIGTERM
        for proc in self._running.values():
            _send(proc, signum)
        if self._level < 3:
            delay = self._grace_period + self._stop_margin if self._level == 1 else self._kill_after
            self._escalation = asyncio.get_running_loop().call_later(delay, self._overran, delay)

    def _overran(self, delay: float) -> None:
        self._escalation = None
        if not self._running:
            return
        what = "stopping them at once" if self._level == 1 else "killing them"
        log.warning(
            "%d worker(s) still running %g s after they were asked to stop: %s",
            len(self._running),
            delay,
            what,
        )
        self.stop()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._level == 0:
            log.info(
                "%s: stopping the workers gracefully (send it again to stop them at once)", name
            )
        elif self._level == 1:
            log.warning("%s again: stopping the workers at once", name)
        else:
            log.warning("%s again: killing the workers", name)
        self.stop()

    async def _slot(self, slot: int) -> None:
        """Keep one worker running in ``slot`` until stopping; never raises for a worker."""
        loop = asyncio.get_running_loop()
        restarts = 0
        first = True
        while not self._stopping.is_set():
            started = loop.time()
            try:
                proc = await self._spawn(slot)
            except (OSError, subprocess.SubprocessError) as exc:
                if first:
                    self._fail(f"cannot start worker {slot}: {exc}", EXIT_FAILURE)
                    return
                self._clean[slot] = False
                what, lived = f"could not be started ({exc})", 0.0
            else:
                self._running[slot] = proc
                self._clean[slot] = False
                if self._level:  # asked to stop while it was being started
                    _send(proc, signal.SIGKILL if self._level >= 3 else signal.SIGTERM)
                log.info("worker %d of %d started (pid %d)", slot, self._processes, proc.pid)
                returncode = await proc.wait()
                del self._running[slot]
                lived = loop.time() - started
                what = f"(pid {proc.pid}) {describe_exit(returncode)}"
                if self._stopping.is_set():
                    self._clean[slot] = returncode in (EXIT_OK, -signal.SIGTERM)
                    log.info("worker %d %s", slot, what)
                    return
                if returncode == EXIT_USAGE:
                    self._fail(
                        f"worker {slot} {what} (a configuration error): every worker would fail "
                        "the same way; stopping them all",
                        returncode,
                    )
                    return
                if first and returncode == EXIT_FAILURE and lived < self._startup_window:
                    self._fail(
                        f"worker {slot} {what} {lived:.1f} s after it started, before it could "
                        "be up: every worker would fail the same way; stopping them all",
                        returncode,
                    )
                    return
            first = False
            if lived >= self._stable_after:
                restarts = 0
            delay = backoff_delay(
                restarts,
                base=self._restart_delay,
                cap=self._restart_delay_max,
                random=random.random,
            )
            restarts += 1
            log.warning(
                "worker %d %s after %.1f s; starting it again in %.1f s", slot, what, lived, delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _fail(self, message: str, status: int) -> None:
        log.error("%s", message)
        self._fatal = status
        if self._level == 0:
            self.stop()

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        options: dict[str, Any] = {"stdin": subprocess.DEVNULL, "process_group": 0}
        env = self._env
        if self._preexec is not None:
            options["preexec_fn"] = self._preexec
        if self._pipe is not None:
            watched = self._pipe[0]
            options["pass_fds"] = (watched,)
            env = {**env, SUPERVISOR_FD_ENV: str(watched)}
        command = self._command
        if self._slot_args is not None:
            command = [*command, *self._slot_args(slot - 1)]  # slots are counted from 1
        return await asyncio.create_subprocess_exec(*command, env=env, **options)

    async def _kill_everything(self, slots: list[asyncio.Task[None]]) -> None:
        """Something went wrong in the supervisor itself: leave no worker behind."""
        procs = list(self._running.values())
        for proc in procs:
            _send(proc, signal.SIGKILL)
        for task in slots:
            task.cancel()
        waits = [asyncio.ensure_future(proc.wait()) for proc in procs]
        await asyncio.wait([*slots, *waits], timeout=self._kill_after)


def _send(proc: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies.

    Linux only (None elsewhere, or where prctl cannot be called). Strictly, the signal comes
    when the *thread* that started the child ends: start workers from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    current = ctypes.c_int(0)
    if prctl(_PR_GET_PDEATHSIG, ctypes.addressof(current), 0, 0, 0) != 0:
        return None
    parent = os.getpid()
    term = int(signal.SIGTERM)

    def set_parent_death_signal() -> None:
        # In the child between fork and exec: system calls only.
        if prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the supervisor died before the call above
            os._exit(EXIT_FAILURE)

    return set_parent_death_signal


def watch_pool() -> None:
    """In a worker started in ``"pipe"`` mode: SIGTERM this process once the supervisor is gone.

    Does nothing in any other process. Removes :data:`SUPERVISOR_FD_ENV` from the environment,
    so that processes the worker starts do not take it for theirs.
    """
    value = os.environ.pop(SUPERVISOR_FD_ENV, None)
    if value is None:
        return
    try:
        fd = int(value)
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        log.warning("ignoring %s=%r: not an open descriptor", SUPERVISOR_FD_ENV, value)
        return
    threading.Thread(
        target=_stop_when_closed, args=(fd,), name="supervisor-watch", daemon=True
    ).start()


def _stop_when_closed(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 1):  # the supervisor never writes: this returns at EOF
            pass
    log.warning("the supervisor is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)
