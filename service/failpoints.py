"""Named crash points, used by the fault tests to kill a process at an exact moment."""

from __future__ import annotations

import os
import signal

from service.logs import get_logger

log = get_logger(__name__)


def crash_if(configured: str | None, name: str) -> None:
    """SIGKILL this process when `name` is the configured failpoint (nothing otherwise)."""
    if configured is not None and configured == name:
        log.warning("failpoint_crash", failpoint=name)
        os.kill(os.getpid(), signal.SIGKILL)
