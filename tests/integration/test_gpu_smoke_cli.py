"""tools/gpu_smoke.py on a machine without CUDA: one line, exit status 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from training_helpers import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the smoke runs")
def test_gpu_smoke_without_cuda_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_smoke.py")], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_smoke: no CUDA device present"), \
        proc.stdout


def test_gpu_smoke_rejects_unknown_checks():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_smoke.py"), "--checks",
                           "nope"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
