"""The project's sbatch scripts on a real (single-host, loopback) Slurm 22.05 cluster.

Installs Slurm from Debian packages when missing (skips with the reason without root/apt),
submits the examples/slurm/ scripts unchanged (environment overrides and sbatch options only: 2
tasks, CPU, the tiny config, loader workers on) to a cluster with proctrack/pgid, which signals a
step's process group only: torchrun's workers (each in its own session) are reached only through
torchrun_node.sh. It checks that

- a job completes and writes its log into logs/ of a fresh checkout;
- ``scancel --batch --signal=USR1`` (what ``#SBATCH --signal=B:USR1@300`` delivers) makes the
  ranks checkpoint at the step where it arrived, the script requeues the job, and the requeued
  run resumes from exactly that step: per-step losses equal the uninterrupted job's;
- a plain ``scancel`` (SIGTERM to every step) also checkpoints at that step, and the job is not
  requeued (torchrun variant).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from local_slurm import LocalSlurm, install, unavailable_reason
from training_helpers import ROOT, make_tiny_data, read_jsonl_losses, tiny_overrides

SUBMITTED: list[str] = []
STEPS = 16  # long enough that the signal lands mid-run (a step takes ~0.3 s on 2 cores)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason() or install()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), proctrack="pgid")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        for job_id in SUBMITTED:   # the job logs the scripts wrote into the checkout's logs/
            for path in (ROOT / "logs").glob(f"genlip*-{job_id}.out"):
                path.unlink()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


def submit(slurm: LocalSlurm, data_dir: Path, save_dir: Path, torchrun: bool = False) -> str:
    """The commands from docs/launching.md (CPU, 2 ranks), run from the checkout root."""
    env = {**slurm.env, "GENLIP_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    for key in ("MASTER_PORT", "MASTER_ADDR", "OMP_NUM_THREADS"):
        env.pop(key, None)   # the scripts derive them from the allocation
    sets = tiny_overrides(data_dir, save_dir, training__train_steps=STEPS,
                          data__reader__num_workers=2)
    if torchrun:  # one torchrun (task) on the node, two processes
        env["GENLIP_NPROC_PER_NODE"] = "2"
        cmd = ["sbatch", "--parsable", "--cpus-per-task", "2", "--time", "10",
               "examples/slurm/pretrain_torchrun.sbatch"]
    else:
        cmd = ["sbatch", "--parsable", "--ntasks", "2", "--cpus-per-task", "1", "--time", "10",
               "examples/slurm/pretrain.sbatch"]
    cmd += ["tests/assets/configs/tiny_train.yaml", "--set", *sets]
    SUBMITTED.append(slurm.run(cmd, env=env, cwd=ROOT).stdout.strip().split(";")[0])
    return SUBMITTED[-1]


def job_log(job_id: str) -> str:
    found = list((ROOT / "logs").glob(f"genlip*-{job_id}.out"))
    path = found[0] if found else ROOT / "logs" / f"genlip-{job_id}.out"
    return path.read_text() if path.is_file() else f"(no {path})"


@pytest.fixture(scope="module")
def uninterrupted(slurm, data_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("slurm_ref")
    job = submit(slurm, data_dir, save)
    info = slurm.wait(job, timeout=300)
    log = job_log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    return save, log


def test_sbatch_job_completes_with_log_in_fresh_checkout_folder(uninterrupted):
    save, log = uninterrupted
    assert "2 tasks" in log and "1 threads/task" in log, log
    assert f"RUN steps={STEPS} " in log, log[-3000:]
    assert (save / "latest").read_text().strip() == f"iter_{STEPS:07d}"


@pytest.mark.parametrize("torchrun", [False, True], ids=["srun", "torchrun"])
def test_usr1_checkpoints_requeues_and_resumes_at_the_same_step(slurm, data_dir, uninterrupted,
                                                                 tmp_path, torchrun):
    ref = read_jsonl_losses(uninterrupted[0] / "metrics.jsonl")
    job = submit(slurm, data_dir, tmp_path, torchrun)
    metrics = tmp_path / "metrics.jsonl"
    slurm.wait(job, timeout=300, until=lambda info: metrics.is_file()
               and len(metrics.read_text().splitlines()) >= 2)
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    info = slurm.wait(job, timeout=300, until=lambda i: i.get("JobState") == "COMPLETED"
                      or (i.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING",
                                                    "REQUEUED", "CONFIGURING")))
    log = job_log(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-6000:])
    stopped = [line for line in log.splitlines() if line.startswith("STOPPED steps=")]
    assert stopped and "SIGUSR1" in stopped[0], log[-6000:]
    step = int(stopped[0].split()[1].split("=")[1])
    assert 2 <= step < STEPS, stopped
    assert "requeueing job" in log and "(restart 1)" in log, log[-6000:]
    assert f"(step {step})" in log.split("(restart 1)")[1], "requeued run did not resume there"
    assert f"RUN steps={STEPS} " in log
    if torchrun:
        assert "node 0/1: 2 processes, 1 threads each" in log, log[:3000]
    # The requeued run starts at step+1: the JSONL holds each step once, and every loss equals
    # the uninterrupted job's (same ranks, same machine: bit-identical).
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in metrics.read_text().splitlines() if '"loss/global_avg"' in line]
    assert steps == list(range(1, STEPS + 1)), steps
    assert read_jsonl_losses(metrics) == ref


def test_plain_scancel_checkpoints_and_is_not_requeued(slurm, data_dir, tmp_path):
    """Through torchrun_node.sh (the requeue rule is the same code in both sbatch scripts)."""
    job = submit(slurm, data_dir, tmp_path, torchrun=True)
    metrics = tmp_path / "metrics.jsonl"
    slurm.wait(job, timeout=300, until=lambda info: metrics.is_file()
               and len(metrics.read_text().splitlines()) >= 2)
    slurm.run(["scancel", job])
    slurm.wait(job, timeout=120)   # KillWait (10 s) bounds the save
    time.sleep(3)   # a requeue (the bug) would show up as PENDING/RUNNING again by now
    info = slurm.job(job)
    log = job_log(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, log[-6000:])
    stopped = [line for line in log.splitlines() if line.startswith("STOPPED steps=")]
    assert stopped, log[-6000:]
    step = int(stopped[0].split()[1].split("=")[1])
    assert step < STEPS and (tmp_path / "latest").read_text().strip() == f"iter_{step:07d}"
    # (the script's own "not requeueing" line may be cut off by Slurm's kill after KillWait)
    assert "requeueing job" not in log, log[-6000:]
