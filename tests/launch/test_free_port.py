"""Single-process runs on one host do not collide on a fixed rendezvous port."""

from __future__ import annotations

import os
import subprocess
import sys

from training_helpers import ROOT

HOLD = """
import os, sys, time
from genlip_megatron.training.distributed import init_distributed
launch = init_distributed()
print("port", os.environ["MASTER_PORT"], flush=True)
sys.stdin.readline()          # hold the store until the test has started the other process
"""


def test_two_single_process_runs_at_once_get_different_free_ports():
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", HOLD], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    try:
        ports = [p.stdout.readline().split() for p in procs]  # both hold their store now
        outs = [p.communicate("\n", timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert all(len(p) == 2 and p[0] == "port" for p in ports), (ports, outs)
    torch_default_port = 29_500      # what a run bound before free-port picking
    assert ports[0][1] != ports[1][1]
    assert torch_default_port not in (int(ports[0][1]), int(ports[1][1]))
