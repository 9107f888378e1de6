"""tools/gpu_smoke.py's device-independent checks, run on CPU against the TE stand-in so the
script has executed before it meets its first GPU (NCCL, DALI mixed and FP8 need CUDA)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.te_standin


def test_gpu_smoke_checks_pass_on_the_standin(standin, tiny_data, tmp_path):
    checks = ["te_spec", "te_vs_dense", "train_bf16", "async_resume", "step_time_mfu"]
    results = standin.run("gpu_smoke", tmp=str(tmp_path), data_dir=str(tiny_data),
                          checks=checks)
    assert [r[0] for r in results] == checks
    failed = [f"{name}: {detail}" for name, ok, detail in results if not ok]
    assert not failed, "\n".join(failed)
    details = dict((name, detail) for name, _, detail in results)
    assert "TEPrefixLMAttention" in details["te_spec"]
    assert "MFU n/a" in details["step_time_mfu"]  # no GPU peak on CPU
