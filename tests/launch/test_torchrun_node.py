"""examples/slurm/torchrun_node.sh without Slurm: a stop signal sent to the script reaches the
ranks although torchrun starts every worker in its own session (start_new_session=True).

Two ranks with two loader workers each, as a user runs it: ``kill -USR1 <script pid>`` while
training → both ranks checkpoint at the same step, the script exits 75 (torchrun alone would
report 1), and a rerun resumes there: every step is logged once and each loss equals the
uninterrupted run's (same ranks, same machine: bit-identical). A stop whose checkpoint cannot
be written (injected ENOSPC) exits non-zero with one ``error:`` line naming the cause.
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

from training_helpers import ROOT, TINY_CONFIG, make_tiny_data, read_jsonl_losses, tiny_overrides

SCRIPT = ROOT / "examples" / "slurm" / "torchrun_node.sh"
STEPS = 40   # ~0.2 s a step: the signal lands well before the end
TIMEOUT = 300


def launch(sets: list[str], fault: str = "") -> subprocess.Popen:
    """torchrun_node.sh on this host: 2 processes, standalone rendezvous, loader workers on."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "GENLIP_")) and k != "OMP_NUM_THREADS"}
    env.update(GENLIP_PYTHON=sys.executable, GENLIP_NPROC_PER_NODE="2", PYTHONPATH=str(ROOT),
               GENLIP_FAULT_INJECT=fault)
    cmd = ["bash", str(SCRIPT), "--config", str(TINY_CONFIG), "--set", *sets,
           "data.reader.num_workers=2"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for the script; on a timeout kill it and everything it started (no orphans)."""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        family = psutil.Process(proc.pid).children(recursive=True)
        for p in [psutil.Process(proc.pid), *family]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, _ = proc.communicate()
        pytest.fail(f"torchrun_node.sh still running after {TIMEOUT} s:\n{out[-5000:]}")


def logged_steps(metrics: Path) -> list[int]:
    return [int(line.split('"step": ')[1].split(",")[0])
            for line in metrics.read_text().splitlines() if '"loss/global_avg"' in line]


def wait_for_steps(proc: subprocess.Popen, metrics: Path, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.is_file() and len(logged_steps(metrics)) >= n):
        assert proc.poll() is None, f"exited {proc.returncode} before step {n}"
        assert time.monotonic() < deadline, f"no step {n} after {TIMEOUT} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.mark.slow
def test_usr1_to_the_script_checkpoints_exits_75_and_resumes_exactly(data_dir, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    rc, out = finish(launch(tiny_overrides(data_dir, ref_dir, training__train_steps=STEPS)))
    assert rc == 0 and f"RUN steps={STEPS} " in out, out[-5000:]
    ref = read_jsonl_losses(ref_dir / "metrics.jsonl")

    sets = tiny_overrides(data_dir, run_dir, training__train_steps=STEPS)
    proc = launch(sets)
    metrics = run_dir / "metrics.jsonl"
    wait_for_steps(proc, metrics, 2)
    os.kill(proc.pid, signal.SIGUSR1)
    rc, out = finish(proc)
    stopped = [line for line in out.splitlines() if line.startswith("STOPPED steps=")]
    assert rc == 75, out[-5000:]
    assert len(stopped) == 2 and len(set(stopped)) == 1, out[-5000:]   # both ranks, one step
    assert "SIGUSR1" in stopped[0], stopped
    step = int(stopped[0].split()[1].split("=")[1])
    assert 2 <= step < STEPS, stopped
    assert (run_dir / "latest").read_text().strip() == f"iter_{step:07d}"

    rc, out = finish(launch(sets))
    assert rc == 0 and f"RUN steps={STEPS} " in out and f"(step {step})" in out, out[-5000:]
    assert logged_steps(metrics) == list(range(1, STEPS + 1))   # none lost, none repeated
    assert read_jsonl_losses(metrics) == ref


@pytest.mark.slow
def test_stop_whose_checkpoint_fails_is_one_line_and_not_75(data_dir, tmp_path):
    """Disk full at the stop: not "stopped early, requeue me" (75), one line with the cause."""
    run_dir = tmp_path / "run"
    sets = tiny_overrides(data_dir, run_dir, training__train_steps=STEPS,
                          checkpoint__save_interval=0)
    proc = launch(sets, fault="checkpoint:begin=ENOSPC")
    wait_for_steps(proc, run_dir / "metrics.jsonl", 2)
    os.kill(proc.pid, signal.SIGUSR1)
    rc, out = finish(proc)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc not in (0, 75), out[-5000:]
    assert len(errors) == 1 and "could not be written" in errors[0] \
        and "No space left on device" in errors[0], out[-5000:]
    assert "raise StopCheckpointError" not in out, out[-5000:]   # no worker traceback
    assert not (run_dir / "latest").exists()
