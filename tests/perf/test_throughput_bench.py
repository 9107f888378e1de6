"""benchmarks/throughput.py: the plain step counts flops.py's FLOPs; the sweep writes its files."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_plain_step_flops_equal_flops_py_and_it_learns():
    """The benchmark's hand-written step runs exactly the FLOPs flops.py counts for our model."""
    from benchmarks.throughput import PlainGenLIP, batch_flops, synthetic_batch
    from genlip_megatron.config import decode_variant
    from genlip_megatron.training.flops import FlopDims

    m = decode_variant("tiny")
    rows = [[(3, 4, 9), (2, 2, 5), (0, 0, 6)], [(5, 3, 12), (4, 4, 0)]]   # incl. text/image-only
    batch = synthetic_batch(rows, 64, m.vocab_size, m.patch_dim, seed=1)
    torch.manual_seed(0)
    plain = PlainGenLIP(m)
    prepared = plain.prepare(batch)
    first = float(plain.loss(batch, prepared))
    flops = [plain.step(batch) for _ in range(5)]
    assert flops[0] == batch_flops(FlopDims.from_model_config(m), batch)
    assert len(set(flops)) == 1
    assert float(plain.loss(batch, plain.prepare(batch))) < first


@pytest.mark.slow
def test_cpu_sweep_writes_csv_markdown_and_png(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sweep.py"),
           "--limit", "3", "--out-dir", str(tmp_path / "out"),
           "--data-dir", str(tmp_path / "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("BENCH sweep points=3 ok=3")
    with open(tmp_path / "out" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "fp8-emulated"]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["memory_gib"]) > 0 for r in rows)
    # bf16 halves parameters and activations: less memory than fp32 at the same point
    assert float(rows[1]["memory_gib"]) < float(rows[0]["memory_gib"])
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert md.count("| tiny |") == 3
    png = (tmp_path / "out" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
