"""Errors the operator sees, and the process exit codes they map to (shared by CLI and daemon).

Exit codes are part of the interface (scripts and systemd units check them), so never renumber.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: unexpected exception
    USAGE = 2  # bad command line (argparse uses 2 too)
    CONFIG = 3  # config file missing or invalid
    IDENTITY = 4  # identity key missing, unreadable, corrupt or too open
    ADDRESS_IN_USE = 5  # a listen port is taken
    NOT_RUNNING = 6  # no daemon answers on the local API
    EXISTS = 7  # refusing to overwrite an existing file (init)


class PeerfedError(Exception):
    """An expected failure: its message is shown to the user as is, without a traceback."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(PeerfedError):
    """The config is missing or invalid; `problems` holds one line per problem found."""

    exit_code = ExitCode.CONFIG

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems: list[str] = list(problems) if problems else [message]
        self.summary = message
        super().__init__(message)

    def __str__(self) -> str:
        # First line the summary, then one line per problem (skipped if it only repeats it).
        if self.problems == [self.summary]:
            return self.summary
        return "\n".join([self.summary, *("  " + p for p in self.problems)])


class IdentityError(PeerfedError):
    exit_code = ExitCode.IDENTITY


class AddressInUseError(PeerfedError):
    exit_code = ExitCode.ADDRESS_IN_USE


class AlreadyExistsError(PeerfedError):
    exit_code = ExitCode.EXISTS


class NotRunningError(PeerfedError):
    exit_code = ExitCode.NOT_RUNNING


class TrainerUnavailable(RuntimeError):
    """The trainer is not running or not ready right now (e.g. restarting); try later.

    Not a PeerfedError: callers (the exchange, state sync) catch it and try again later."""
