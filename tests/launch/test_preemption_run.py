"""Preemption drill through torchrun without Slurm (runs wherever the Slurm test skips).

A SIGUSR1 reaches rank 1 only, after step 3 (GENLIP_FAULT_INJECT): both ranks must stop after
step 3, publish that checkpoint and exit 75. The resumed run is given a time budget it has
already used up (training.exit_duration_mins), so it stops after one more step, again with
status 75. Each step is logged exactly once and the curve matches the single-process golden
file. (Finishing after a stop is checked on a real Slurm in test_slurm.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

from training_helpers import ROOT, TINY_CONFIG, assert_losses_close, make_tiny_data, \
    read_golden, read_jsonl_losses, tiny_overrides


def torchrun(sets: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENLIP_FAULT_INJECT": fault}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "pretrain_genlip.py"), "--config", str(TINY_CONFIG), "--set", *sets]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_signal_on_one_rank_then_time_budget(tmp_path):
    data = make_tiny_data(tmp_path / "data")
    save = tmp_path / "run"
    sets = tiny_overrides(data, save)

    first = torchrun(sets, fault="after_step:3=SIGUSR1:rank1")
    out = first.stdout + first.stderr
    assert first.returncode != 0 and "exitcode  : 75" in out, out[-5000:]  # torchrun: 1
    assert out.count("STOPPED steps=3 ") == 2, out[-5000:]  # both ranks, same step
    assert (save / "latest").read_text().strip() == "iter_0000003"

    second = torchrun(sets + ["training.exit_duration_mins=0.001"])
    out = second.stdout + second.stderr
    assert "(step 3)" in out and out.count("STOPPED steps=4 ") == 2, out[-5000:]
    assert "exit_duration_mins (0.001) reached" in out
    assert (save / "latest").read_text().strip() == "iter_0000004"

    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (save / "metrics.jsonl").read_text().splitlines()
             if '"loss/global_avg"' in line]
    assert steps == [1, 2, 3, 4], steps   # no step lost, none repeated
    golden = read_golden()
    assert_losses_close(read_jsonl_losses(save / "metrics.jsonl"),
                        {s: golden[s] for s in steps}, what="2 ranks, stopped twice")
