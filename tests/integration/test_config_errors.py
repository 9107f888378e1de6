"""Configuration errors through the public entry point: exit status 2 and ONE line
``error: <message>`` naming the key, printed before any process group starts (≈2 s per case)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from training_helpers import ROOT, pretrain_command, pretrain_env

# (override, the key the message must name)
CASES = [
    ("optimizer.lr=-1e-3", "optimizer.lr"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("optimizer.lrr=1e-3", "optimizer.lrr"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
    ("optimizer.min_lr=0.5", "optimizer.min_lr"),
    ("training.micro_batch_size=0", "training.micro_batch_size"),
    ("training.global_batch_size=3", "training.global_batch_size"),
    ("training.train_steps=-1", "training.train_steps"),
    ("logging.log_interval=0", "logging.log_interval"),
    ("data.sources=[{paths: /x/*.tar", "data.sources"),
    ("checkpoint.save_dir={blocker}/ckpt", "checkpoint.save_dir"),
    ("logging.jsonl_path={blocker}/logs/m.jsonl", "logging.jsonl_path"),
    ("parallel.tp=3", "parallel.tp"),
]


@pytest.mark.parametrize("override,key", CASES, ids=[c[1] + ":" + c[0][:24] for c in CASES])
def test_config_error_is_one_line_and_status_2(override, key, tmp_path):
    blocker = tmp_path / "a_file"           # a path below a regular file cannot be created
    blocker.write_text("")
    sets = ["training.train_steps=1", override.replace("{blocker}", str(blocker))]
    proc = subprocess.run(pretrain_command(sets), cwd=ROOT, env=pretrain_env(),
                          capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert key in lines[0], lines[0]
    assert "Traceback" not in proc.stdout and not Path(tmp_path / "ckpt").exists()
