"""data.reshard_on_resume through the public entry point, 2 ranks with 2 loader workers each
(examples/slurm/torchrun_node.sh): train to step 4 over 4 shards, drop one shard, then

- resume without the switch: refused, one ``error:`` line naming ``data.reshard_on_resume=true``
  and the change (4 → 3 shards), status 2, the checkpoint untouched;
- resume with the switch: the model/optimizer/step come from the checkpoint (the run logs steps
  5..8 only, consumed samples continue), the streams restart over the 3 shards (logged), and
  the run trains to the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training_helpers import ROOT, TINY_CONFIG, make_tiny_data, tiny_overrides

TIMEOUT = 400


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


def _run(sets: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "GENLIP_")) and k != "OMP_NUM_THREADS"}
    env.update(GENLIP_PYTHON=sys.executable, GENLIP_NPROC_PER_NODE="2", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    cmd = ["bash", str(ROOT / "examples" / "slurm" / "torchrun_node.sh"), "--config",
           str(TINY_CONFIG), "--set", *sets]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _records(metrics: Path) -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines())
            if "loss/global_avg" in r]


@pytest.mark.slow
def test_dropped_shard_is_refused_then_resharded_on_two_ranks(data_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data_dir / "train", shards)
    run = tmp_path / "run"
    sets = tiny_overrides(data_dir, run, training__dp_invariant_data="false",
                          data__reader__num_workers=2) + [
        f"data.sources=[{{paths: '{shards}/*.tar'}}]"]
    first = _run(sets + ["training.train_steps=4"])
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    metrics = run / "metrics.jsonl"
    consumed = _records(metrics)[-1]
    assert consumed["step"] == 4
    sorted(shards.glob("*.tar"))[-1].unlink()   # one shard is gone
    saved = sorted(p.name for p in run.iterdir())

    refused = _run(sets + ["training.train_steps=8"])
    out = refused.stdout + refused.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2, out[-4000:]
    assert len(errors) == 1 and "data.reshard_on_resume=true" in errors[0], out[-4000:]
    assert "4 → 3 shards, 1 removed" in errors[0], errors[0]
    # torchrun prints its own ChildFailedError traceback; none of our frames may appear
    assert not [line for line in out.splitlines() if "genlip_megatron/" in line
                and line.strip().startswith("File ")], out[-4000:]
    assert sorted(p.name for p in run.iterdir()) == saved   # nothing written or removed

    resumed = _run(sets + ["training.train_steps=8", "data.reshard_on_resume=true"])
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert "restored" in out and "(step 4)" in out, out[-4000:]
    assert "data.reshard_on_resume: the shard set changed" in out, out[-4000:]
    assert "4 → 3 shards, 1 removed" in out and "step 4" in out
    after = [r for r in _records(metrics) if r["step"] > 4]
    assert [r["step"] for r in after] == [5, 6, 7, 8], after
    assert after[0]["consumed/samples"] > consumed["consumed/samples"]   # continued, not reset
    assert "RUN steps=8" in out
    assert (run / "latest").read_text().strip().endswith("8")
