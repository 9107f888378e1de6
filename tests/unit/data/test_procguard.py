"""Loader helper processes and the trainer's stop signals (data/procguard.py).

A launcher or scheduler may deliver the stop signal to the trainer's whole process group
(srun's forwarding under most proctrack plugins, a terminal's Ctrl-C): workers and the
forkserver must survive it (USR1's default action is to terminate) and keep delivering without
a restart, while SIGTERM from the trainer's own shutdown ends a worker at once, also one forked
from a trainer whose SIGTERM handler only records the signal.
"""

from __future__ import annotations

import multiprocessing.forkserver as forkserver
import os
import signal
import time

import pytest

from genlip_megatron.data.loader import build_train_loader

from .conftest import make_cfg


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_workers_survive_the_stop_signals_sent_to_the_process_group(data_root, start_method):
    loader = build_train_loader(make_cfg(data_root, num_workers=2, start_method=start_method),
                                dp_rank=0, dp_size=1, micro_batch_size=1, seed=0)
    try:
        next(loader)
        helpers = [w.proc.pid for w in loader._procs]
        if start_method == "forkserver":
            helpers.append(forkserver._forkserver._forkserver_pid)
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP):
            for pid in helpers:
                os.kill(pid, sig)
        time.sleep(0.5)
        for _ in range(20):
            next(loader)
        assert all(w.proc.is_alive() for w in loader._procs)
        assert loader.counters()["worker_restarts"] == 0
    finally:
        loader.close()


def test_forked_worker_ends_on_sigterm_despite_the_trainers_handler(data_root):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    loader = build_train_loader(make_cfg(data_root, num_workers=1, start_method="fork"),
                                dp_rank=0, dp_size=1, micro_batch_size=1, seed=0)
    try:
        next(loader)
        proc = loader._procs[0].proc
        proc.terminate()
        proc.join(timeout=3)
        assert proc.exitcode == -signal.SIGTERM   # not still alive, waiting for a SIGKILL
        assert not seen   # the trainer (this process) did not get it
    finally:
        loader.close()
        signal.signal(signal.SIGTERM, previous)
