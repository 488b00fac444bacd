"""Child processes that end with the process that started them, whatever ends it.

The parent starts a child with `env()` and the child calls `die_with_parent()` first: Linux
then sends it a signal when the parent's thread that started it ends (PR_SET_PDEATHSIG), also
when the parent was killed with SIGKILL and could clean nothing up.  A parent starts children
from a thread that lives as long as it does (its main thread, its event loop's thread).  The
child checks the parent pid in $MYCO_PARENT_PID once the signal is set, so a parent that died
in between is noticed too.  Elsewhere than on Linux nothing happens.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT = "MYCO_PARENT_PID"


def env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours, `extra`, and our pid for `die_with_parent`."""
    return {**os.environ, **extra, PARENT: str(os.getpid())}


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Receive `sig` when the parent dies (SIGTERM: to stop cleanly); exit if it already has."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1: PR_SET_PDEATHSIG
    if (parent := os.environ.get(PARENT)) and os.getppid() != int(parent):
        sys.exit("the process that started this one is gone")
