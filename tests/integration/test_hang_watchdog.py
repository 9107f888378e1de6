"""Hang watchdog (training/watchdog.py) through the public entry points.

- a stuck rank: rank 1 sleeps for good after step 2 (``GENLIP_FAULT_INJECT=after_step:2=HANG:
  rank1``), rank 0 waits for it in the next collective; under torchrun_node.sh with
  ``training.hang_timeout_mins`` of 6 s both ranks dump their stacks and the node exits 76
  within seconds, instead of the 30-minute process-group timeout;
- a stuck loader worker: every loader helper is stopped with SIGSTOP; the trainer runs out of
  batches, its watchdog fires (status 76, its stack shows the wait for the worker) and the
  stopped helpers die with it (no orphan).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from training_helpers import ROOT, TINY_CONFIG, make_tiny_data, pretrain_command, \
    pretrain_env, run_launcher, tiny_overrides

TIMEOUT_MINS = 0.1   # 6 s


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.mark.slow
def test_stuck_rank_dumps_stacks_on_every_rank_and_exits_76(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "GENLIP_")) and k != "OMP_NUM_THREADS"}
    env.update(GENLIP_PYTHON=sys.executable, GENLIP_NPROC_PER_NODE="2", PYTHONPATH=str(ROOT),
               GENLIP_FAULT_INJECT="after_step:2=HANG:rank1")
    sets = tiny_overrides(data_dir, tmp_path / "run", training__train_steps=20,
                          training__hang_timeout_mins=TIMEOUT_MINS)
    cmd = ["bash", str(ROOT / "examples" / "slurm" / "torchrun_node.sh"), "--config",
           str(TINY_CONFIG), "--set", *sets]
    proc = run_launcher(cmd, env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 76, out[-5000:]
    fired = [line for line in out.splitlines() if "hang watchdog: rank" in line]
    assert {line.split("hang watchdog: rank ")[1][0] for line in fired} == {"0", "1"}, out[-5000:]
    assert "after step 2 while finishing it" in out, out[-5000:]
    assert 'in maybe_inject' in out   # rank 1's stack shows where it sleeps
    assert "in all_reduce" in out or "in should_stop" in out or "in train_step" in out, \
        out[-5000:]   # rank 0's stack shows the collective it waits in


def _loader_helpers(trainer_pid: int) -> list[psutil.Process]:
    """The forkserver and the workers it forked (not the resource tracker)."""
    return [p for p in psutil.Process(trainer_pid).children(recursive=True)
            if "forkserver" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_stopped_loader_worker_ends_the_run_with_stacks_and_76(data_dir, tmp_path):
    sets = tiny_overrides(data_dir, tmp_path / "run", training__train_steps=500,
                          training__hang_timeout_mins=TIMEOUT_MINS,
                          data__reader__num_workers=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = subprocess.Popen(pretrain_command(sets), cwd=ROOT, env=pretrain_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    helpers = []
    try:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "no step 2"
            time.sleep(0.2)
        helpers = _loader_helpers(proc.pid)
        assert len(helpers) >= 3, helpers   # forkserver + 2 workers
        for helper in helpers:
            helper.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        took = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
        for helper in helpers:
            try:
                helper.kill()
            except psutil.NoSuchProcess:
                pass
    assert proc.returncode == 76, out[-5000:]
    assert took < 60 * TIMEOUT_MINS + 30, took   # the timeout, not a process-group timeout
    assert "hang watchdog: rank 0 made no progress" in out and "running step" in out
    assert "in _get" in out, out[-5000:]   # the trainer's stack: waiting for the worker
    time.sleep(2)   # the parent-death signal reaches the stopped helpers
    alive = [h.pid for h in helpers if h.is_running() and h.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
