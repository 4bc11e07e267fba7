"""Exit statuses of the ``steadyrabbit`` command, shared by :func:`main` and the commands."""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_SIGNALLED", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1  # a failure at run time: no broker, a refused login, a critical finding
EXIT_USAGE = 2  # a bad command line or configuration: every retry would fail the same way
# Exit status of a command stopped by a signal: the shell's 128 + the signal's number.
EXIT_SIGNALLED = 128
