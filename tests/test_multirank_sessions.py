"""Runs tests/multirank under torchrun (gloo, CPU) once per world size.

One torchrun session per world size amortises the ~8-15 s start-up cost over all multi-rank
tests. The inner sessions' output is shown when they fail.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nproc", [2, 4])
def test_multirank_session(nproc, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENLIP_TEST_TMP": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", "-m", "pytest", "-q", "-x",
           "-p", "no:cacheprovider", str(ROOT / "tests" / "multirank")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun --nproc-per-node {nproc} failed:\n{out[-20000:]}"
    assert " passed" in out, out[-5000:]
