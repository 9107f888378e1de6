"""Stop cleanly before the scheduler kills the job: exit signals and a wall-clock budget.

Megatron-LM's ``--exit-signal-handler`` / ``--exit-duration-in-mins``, for this trainer:

- every rank installs handlers for ``training.exit_signals`` (default SIGTERM and SIGUSR1, what
  Slurm sends at preemption, ``scancel`` and ``--signal=...@T``); a handler only records the
  signal, because a checkpoint cannot be written from inside a signal handler;
- at each step boundary the ranks agree with one MAX all-reduce of (signal seen, budget
  exceeded), because a signal can reach some ranks and not others, or reach them in different
  steps, and every rank must stop after the SAME step for the checkpoint to be consistent;
- the trainer then saves (and publishes) the checkpoint of that step and returns; the program
  exits with ``EXIT_STOPPED_EARLY`` (75, EX_TEMPFAIL: "stopped early, run me again"), which the
  sbatch scripts turn into ``scontrol requeue`` (only after their time-limit signal, not after
  ``scancel``: docs/faults.md). A requeued run resumes after that step, so no step is lost or
  repeated;
- a stop whose checkpoint cannot be written raises :class:`StopCheckpointError`: one line, exit
  status 1, never 75, so a full disk does not requeue the job forever without progress;
- a second SIGTERM at least ``SECOND_TERM_GRACE_S`` after the first ends the process (stacks
  dumped, status 143), also when it is stuck in a collective and never reaches a boundary;
- torchrun reports any failed worker as status 1, so each rank also records its own status in
  ``$GENLIP_EXIT_STATUS_DIR`` (:func:`record_exit_status`), from which
  examples/slurm/torchrun_node.sh derives the node's status.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import psutil
import torch
import torch.distributed as dist

from genlip_megatron.training.logging_setup import dump_stacks, write_line

logger = logging.getLogger(__name__)

EXIT_STOPPED_EARLY = 75
"""Exit status of a run that stopped on a signal or budget after writing its checkpoint."""

EXIT_STATUS_ENV = "GENLIP_EXIT_STATUS_DIR"
"""Directory where each rank writes its exit status as ``rank<RANK>`` (set by a launcher
wrapper that cannot see the workers' statuses, e.g. examples/slurm/torchrun_node.sh)."""


class StopCheckpointError(RuntimeError):
    """A stop was requested but its checkpoint could not be written (disk full, permissions):
    the run must not report "stopped early, rerun me" (75), or it would be requeued forever."""


def record_exit_status(code: int) -> int:
    """Write ``code`` to ``$GENLIP_EXIT_STATUS_DIR/rank<RANK>`` when set; returns ``code``.

    torchrun turns every worker failure, 75 included, into its own status 1; the wrapper reads
    these files instead. A rank that dies before this runs (a crash, SIGKILL) leaves no file,
    which the wrapper counts as a failure.
    """
    where = os.environ.get(EXIT_STATUS_ENV)
    if where:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        try:
            (Path(where) / f"rank{rank}").write_text(f"{int(code)}\n")
        except OSError as exc:   # the status is advisory; never turn a result into a crash
            logger.warning("could not record exit status %d in %s: %s", code, where, exc)
    return code


def exit_process(code: int) -> None:
    """Record ``code`` (:func:`record_exit_status`) and end the process with it.

    After a stop the checkpoint is published, the trainer closed and the process group
    destroyed; the interpreter's own teardown then took 5 s (1 rank) to 20 s (2 ranks under
    torchrun, measured on CPU) inside the preemption window, while torchrun, seeing the first
    rank exit, sends SIGTERM to the others. So a stopped run leaves at once (``os._exit`` after
    flushing); every other status takes the normal way out.
    """
    record_exit_status(code)
    if code != EXIT_STOPPED_EARLY:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _process_start_time() -> float:
    """Wall-clock start of this process (the scheduler's budget counts from the launch)."""
    return psutil.Process().create_time()


SECOND_TERM_GRACE_S = 5.0
"""A SIGTERM at least this long after the first one ends the process (see _SecondTerm)."""


class _SecondTerm:
    """Ends the process on a second SIGTERM, also while the main thread is stuck in C.

    A Python signal handler runs only when the main thread returns to the interpreter, so a
    rank blocked in a collective whose peer is gone never sees the signal and ignored SIGTERM
    for good. The C-level handler also writes every signal number to a wakeup fd
    (``signal.set_wakeup_fd``); this thread reads it and, on a SIGTERM at least
    ``SECOND_TERM_GRACE_S`` after the first (the copies that srun and slurmstepd deliver
    together are one request), dumps the Python stacks and exits 143 (killed by SIGTERM).
    """

    def __init__(self, grace_s: Optional[float] = None):
        self.grace_s = SECOND_TERM_GRACE_S if grace_s is None else grace_s
        self.first: Optional[float] = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._previous_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._closed = False
        threading.Thread(target=self._listen, name="genlip-second-sigterm", daemon=True).start()

    def _listen(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data or self._closed:
                os.close(self._r)
                return
            for signum in data:
                if signum == signal.SIGTERM:
                    self._on_term(time.monotonic())

    def _on_term(self, now: float) -> None:
        if self.first is None:
            self.first = now
        elif now - self.first >= self.grace_s:
            write_line(f"error: second SIGTERM {now - self.first:.0f} s after the first and the "
                       "run has not stopped (stuck?); Python stacks follow; exiting with status "
                       "143", sys.stderr)
            dump_stacks(sys.stderr)
            record_exit_status(128 + signal.SIGTERM)
            os._exit(128 + signal.SIGTERM)

    def close(self) -> None:
        self._closed = True
        signal.set_wakeup_fd(self._previous_fd)
        os.write(self._w, b"\0")   # wake the reader, which then returns
        os.close(self._w)


class PreemptionGuard:
    """Records exit signals and checks the time budget; ``should_stop()`` is collective."""

    def __init__(self, signals: list[str], exit_duration_mins: Optional[float],
                 start_time: Optional[float] = None):
        self.signals = [getattr(signal, name) for name in signals]
        self.exit_duration_s = None if exit_duration_mins is None else 60.0 * exit_duration_mins
        self.start_time = _process_start_time() if start_time is None else start_time
        self.received: Optional[int] = None
        self.reason = ""
        self._previous = {}
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._second_term = _SecondTerm() if signal.SIGTERM in self.signals else None

    @property
    def enabled(self) -> bool:
        return bool(self.signals) or self.exit_duration_s is not None

    def _on_signal(self, signum: int, frame) -> None:
        """Only record: the step in flight finishes, the trainer saves at its boundary."""
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank once any rank saw a signal or ran out of time (collective).

        One 2-element all-reduce per step; all ranks must call it at the same step. Its
        ``tolist()`` is a host sync each step, like the trainer's global-loss sync for the skip
        decision (Megatron-LM checks its exit signal every iteration the same way).
        """
        if not self.enabled:
            return False
        over_budget = (self.exit_duration_s is not None
                       and time.time() - self.start_time >= self.exit_duration_s)
        # The signal's number, not a flag: every rank then names the same signal.
        flags = torch.tensor([float(self.received or 0), float(over_budget)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, out_of_time = (int(v) for v in flags.tolist())
        got_signal = signum > 0
        if got_signal:
            self.reason = f"{signal.Signals(signum).name} received (on this or another rank)"
        elif out_of_time:
            self.reason = (f"training.exit_duration_mins ({self.exit_duration_s / 60:g}) "
                           "reached")
        return got_signal or out_of_time

    def close(self) -> None:
        """Put the previous handlers back (in-process callers such as tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._second_term is not None:
            self._second_term.close()
            self._second_term = None
