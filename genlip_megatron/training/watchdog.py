"""Hang watchdog: a rank without step progress dumps its stacks and exits with a known status.

A rank stuck in a collective (a peer died or sleeps), in a read from a hung network file
system or behind a stopped loader worker otherwise waits for the process-group timeout
(30 min) or forever, and says nothing about where it is. With ``training.hang_timeout_mins``
each rank runs a thread that, when :meth:`HangWatchdog.beat` has not been called for that long,

- logs one line naming the rank, the last step and what it was doing (``beat(what=...)``),
- dumps the Python stack of every thread to stderr (``faulthandler``, as nvidia-resiliency-ext's
  heartbeat timeouts and torch's NCCL watchdog dump do),
- records and exits with ``EXIT_HUNG`` (76), so the scheduler can tell a hang from a crash and
  requeue it (examples/slurm/*.sbatch, a bounded number of times; docs/faults.md).

Every rank times out on its own (a rank waiting for a stuck peer makes no progress either), so
every rank's stacks reach the log. The thread needs the GIL; a C call that holds it forever is
covered by ``faulthandler.dump_traceback_later`` (C-level, armed ``BACKSTOP_S`` later), which
dumps the stacks and exits with status 1.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Optional

from genlip_megatron.training.logging_setup import dump_stacks, write_line
from genlip_megatron.training.preemption import record_exit_status

logger = logging.getLogger(__name__)

EXIT_HUNG = 76
"""Exit status of a rank that made no step progress for ``training.hang_timeout_mins``."""

BACKSTOP_S = 60.0
"""The C-level faulthandler timer fires this long after the Python watchdog should have."""

FIRST_STEP_FACTOR = 5.0
"""Until the first step finished (loader workers starting, kernels compiling, the first
collectives connecting), the allowance is this many timeouts (as nvidia-resiliency-ext's
separate initial heartbeat timeout)."""


class HangWatchdog:
    """Per-rank progress timer; ``beat()`` at every step boundary and around long phases."""

    def __init__(self, timeout_mins: Optional[float], rank: int, poll_s: float = 1.0):
        self.timeout_s = None if timeout_mins is None else 60.0 * timeout_mins
        self.rank = rank
        self.poll_s = poll_s
        self.step = 0
        self.what = "starting"
        self._first_step: Optional[int] = None   # the step of the first beat
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.timeout_s is not None:
            self._arm_backstop()
            self._thread = threading.Thread(target=self._watch, name="genlip-hang-watchdog",
                                            daemon=True)
            self._thread.start()

    def beat(self, step: int, what: str) -> None:
        """Progress: ``step`` reached, now doing ``what`` (named in the timeout message)."""
        if self._first_step is None:
            self._first_step = step
        self.step, self.what, self._last = step, what, time.monotonic()
        if self.timeout_s is not None:
            self._arm_backstop()

    def _allowance(self) -> float:
        warm = self._first_step is not None and self.step > self._first_step
        return self.timeout_s * (1.0 if warm else FIRST_STEP_FACTOR)

    def _arm_backstop(self) -> None:
        faulthandler.dump_traceback_later(self._allowance() + BACKSTOP_S, exit=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle >= self._allowance():
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        """Stacks to stderr, status recorded, process ended (no clean-up: it is stuck)."""
        message = (f"hang watchdog: rank {self.rank} made no progress for {idle:.0f} s "
                   f"(training.hang_timeout_mins = {self.timeout_s / 60:g}) after step "
                   f"{self.step} while {self.what}; Python stacks of every thread follow; "
                   f"exiting with status {EXIT_HUNG}")
        write_line(f"error: {message}", sys.stderr)   # not via logging: it may lock
        dump_stacks(sys.stderr)
        sys.stderr.flush()
        record_exit_status(EXIT_HUNG)
        logging.shutdown()
        os._exit(EXIT_HUNG)

    def close(self) -> None:
        """Stop watching (the run is over or hands over to evaluation)."""
        self._stop.set()
        if self.timeout_s is not None:
            faulthandler.cancel_dump_traceback_later()
