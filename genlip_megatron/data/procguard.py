"""Loader helper processes die with the trainer (no orphaned workers or forkserver).

A trainer killed with SIGKILL runs no clean-up, and its loader workers (≈ 0.5 GB each), the
multiprocessing forkserver and, through the workers' inherited pipe, the resource tracker used
to stay alive and pile up over restarts. Two guards, both Linux-only and harmless elsewhere:

- ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the process when its parent exits
  (a worker's parent is the forkserver; the forkserver's is the trainer);
- a watchdog thread that polls the trainer's pid every second (covers the window before the
  prctl call, and a parent that is not the trainer).

Importing this module in the forkserver (it is in the forkserver's preload list) arms the prctl
guard of the forkserver itself.

Stop signals are the trainer's business (training/preemption.py): a scheduler or launcher may
send them to the whole process group or cgroup (Slurm's srun forwarding, ``scancel``), and
USR1's default action would kill every worker and the forkserver mid-step, after which the
loader restarts them with their in-flight samples under suspicion. So workers and the
forkserver ignore USR1/USR2/INT/HUP (:func:`ignore_stop_signals`), and a worker forked from
the trainer does not keep the trainer's SIGTERM handler: SIGTERM ends it at once (the trainer
stops its workers with SIGTERM; the inherited handler only recorded it, so each stop waited
for the kill timeout).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


IGNORED_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)


def ignore_stop_signals() -> None:
    """Ignore the trainer's stop signals; SIGTERM back to its default (end the process).

    Call from the main thread of a loader helper process (worker or forkserver).
    """
    for sig in IGNORED_STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with(trainer_pid: int, poll_s: float = 1.0) -> None:
    """Make this process exit when ``trainer_pid`` is gone (prctl + watchdog thread)."""
    set_parent_death_signal()
    parent = os.getppid()  # not "== 1": the trainer may itself be pid 1 in a container

    def watch() -> None:
        while True:
            if not _alive(trainer_pid) or os.getppid() != parent:
                os._exit(0)
            time.sleep(poll_s)

    if not _alive(trainer_pid):
        os._exit(0)
    threading.Thread(target=watch, name="genlip-parent-watchdog", daemon=True).start()


def _in_forkserver() -> bool:
    """True while the multiprocessing forkserver imports its preload modules."""
    frame = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "main" and code.co_filename.endswith(
                os.path.join("multiprocessing", "forkserver.py")):
            return True
        frame = frame.f_back
    return False


if _in_forkserver():
    set_parent_death_signal()
    ignore_stop_signals()   # inherited by every worker the forkserver forks
