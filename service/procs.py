"""Helpers for the local processes the project starts itself (Kafka, PostgreSQL, the bench).

Kept in one place so that every child process dies with its parent the same way, and every
`python -m` runner answers SIGTERM/SIGINT the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import structlog

_PR_SET_PDEATHSIG = 1
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent_hook() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when its parent dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process:
    a child started from a short-lived worker thread would be killed as soon as that thread
    ends. Start children from a long-lived thread (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return lambda: None
    # Resolved before fork: the child should not have to load libraries between fork and exec.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()

    def hook() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of a tool's output, without terminal colour codes."""
    return "\n".join(_ANSI_ESCAPE.sub("", text).splitlines()[-lines:])


def read_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, or "(no output)" when it cannot be read."""
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return "(no output)"


class _StopRequested(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _StopRequested(signal.Signals(signum).name)


def run_until_signalled(
    start: Callable[[], str],
    stop: Callable[[], None],
    failures: tuple[type[Exception], ...],
) -> int:
    """Start a process, print `READY <what start returned>`, run until SIGTERM/SIGINT, stop it.

    Returns 0, or 1 when `start` fails with one of `failures`.
    """
    log = structlog.get_logger(__name__)
    # Installed before start() so that a signal during start-up also stops the child.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        ready = start()
        sys.stdout.write(f"READY {ready}\n")
        sys.stdout.flush()
        while True:
            signal.pause()
    except _StopRequested as requested:
        log.info("stop_requested", signal=str(requested))
    except failures as exc:
        log.error("start_failed", error=str(exc))
        return 1
    finally:
        # A second signal must not interrupt the orderly stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop()
    return 0
