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


def test_gpu_smoke_configs_are_valid_gpu_runs(tmp_path):
    # The GPU-size configs of every training check validate as on a GPU node with TE, FP8
    # alignment included (catches a config typo before anyone queues for a GPU).
    import importlib.util

    from genlip_megatron.config import config_from_dict

    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "tools" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = smoke
    spec.loader.exec_module(smoke)
    ctx = smoke.Smoke(tmp_path, size="small")
    for kwargs in ({}, {"te": False}, {"fp8": True},
                   {"steps": 4, "save_dir": tmp_path / "c", "async_save": True}):
        cfg = config_from_dict(smoke.raw_config(ctx, **kwargs)).validate(
            world_size=1, has_cuda=True, has_te=True)
        assert cfg.model.hidden_size == 1024
    assert set(smoke.CHECK_FUNCS) == set(smoke.CHECKS)
