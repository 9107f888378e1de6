"""Fault injection for crash/resume drills (tests and cluster chaos runs).

``GENLIP_FAULT_INJECT`` holds comma-separated points; reaching one SIGKILLs the process, the
way a node failure or OOM-kill would (no ``finally`` blocks, no flushing):

- ``after_step:N``        right after optimizer step N finished (and any save of step N)
- ``checkpoint:after_shards``  inside a save, after every shard is written but before the
                               checkpoint is published (the ``.tmp`` directory is left behind);
- ``checkpoint:marked``        publication: ``COMPLETE`` written into the ``.tmp``, not renamed;
- ``checkpoint:moved_aside``   publication of a re-saved step: the old copy is ``iter_N.old``,
                               the new one still ``iter_N.tmp``;
- ``checkpoint:renamed``       publication: ``iter_N`` in place, ``latest`` not yet moved;
  ``checkpoint:<point>:step=N``  any of these, only in the save of step N

A point followed by ``=SIGNAME`` sends that signal instead of SIGKILL, optionally to one rank
only (``after_step:3=SIGUSR1:rank1``): a scheduler's preemption signal at a known step, for the
exit-signal drills (training/preemption.py). A point followed by ``=ENOSPC``, ``=EIO``,
``=EACCES`` or ``=ESTALE`` raises that ``OSError`` there instead (a full disk, a failing file
system): ``checkpoint:begin=ENOSPC`` makes every save fail before anything is written.
A count after the name limits the fault to the first N times this process reaches the point
(``checkpoint:load=EIO*1``: one transient read error, then the read succeeds; the retry drills).
``grad_sync:N`` is reached in step N where megatron finalizes the gradients, before the
data-parallel all-reduce (``grad_sync:5=SIGKILL:rank1``: rank 1 dies while rank 0 waits in that
all-reduce). ``shards:check`` is reached once per shard in the start-up shard check
(training/agreement.py); an error there counts that shard ``unreachable``
(``shards:check=EIO*1:rank1``: one rank's transient read error). ``=HANG`` makes the process
sleep there for good (``after_step:3=HANG:rank1``: a stuck rank, for the hang watchdog,
training/watchdog.py).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

logger = logging.getLogger(__name__)

ENV = "GENLIP_FAULT_INJECT"
_FIRED: dict[str, int] = {}
"""How often each counted entry (``=EIO*N``) fired in this process."""


def maybe_inject(point: str) -> None:
    """SIGKILL this process (or signal it, or raise an OSError) when ``point`` is listed in
    $GENLIP_FAULT_INJECT."""
    wanted = {p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()}
    for entry in wanted:
        where, _, sig = entry.partition("=")
        name, _, rank = sig.partition(":rank")
        if not (sig and where == point and rank in ("", os.environ.get("RANK", "0"))):
            continue
        name, _, times = name.partition("*")
        if times:
            if _FIRED.get(entry, 0) >= int(times):
                continue
            _FIRED[entry] = _FIRED.get(entry, 0) + 1
        if name.startswith("E") and hasattr(errno, name):
            code = getattr(errno, name)
            raise OSError(code, f"{os.strerror(code)} ({ENV}: {entry})")
        if name == "HANG":   # a rank stuck for good (hang-watchdog drills)
            logger.warning("%s: hanging this process at %s", ENV, point)
            while True:
                time.sleep(3600)
        logger.warning("%s: sending %s to this process at %s", ENV, name, point)
        os.kill(os.getpid(), getattr(signal, name))
    if point in wanted:
        logger.error("%s: killing the process at %s", ENV, point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
