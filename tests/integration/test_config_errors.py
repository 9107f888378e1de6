"""Configuration errors through the public entry point: exit status 2 and ONE line
``error: <message>`` naming the key, printed before any process group starts (≈2 s per case)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_helpers import ROOT, TINY_CONFIG, make_tiny_data, pretrain_command, \
    pretrain_env, run_launcher, tiny_overrides

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


# Data inputs: checked before any process group (data/preflight.py), except shard readability,
# which the loader finds after start-up and the ranks agree on (training/agreement.py).
DATA_CASES = [
    ("data.sources=[{{paths: '{data}/trian/*.tar'}}]", "data.sources[0].paths"),
    ("data.sources=[{{paths: '{data}/train/nope.tar'}}]", "data.sources[0].paths"),
    ("data.sources=[]", "data.sources"),
    ("data.eval_sources=[{{paths: '{data}/evl/*.tar'}}]", "data.eval_sources[0].paths"),
    ("data.text.tokenizer_path={data}/tokenizer.jsn", "data.text.tokenizer_path"),
    ("data.image.decoder=dali", "data.image.decoder"),   # DALI hidden by the test
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    data = make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
    few = data / "two_files"   # one readable shard and one that is not a tar
    few.mkdir()
    shutil.copy(sorted((data / "train").glob("*.tar"))[0], few / "a.tar")
    (few / "b.tar").write_bytes(b"not a tar archive\n" * 64)
    return data


def _data_sets(tiny_data: Path, override: str, tmp_path: Path) -> tuple[list[str], dict]:
    env = pretrain_env()
    if override.startswith("data.image.decoder=dali"):   # a regular `nvidia` package hides DALI
        (tmp_path / "nvidia").mkdir()
        (tmp_path / "nvidia" / "__init__.py").write_text("")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    sets = tiny_overrides(tiny_data, tmp_path / "run") + [
        "training.train_steps=1", override.format(data=tiny_data)]
    return sets, env


def _assert_one_error_line(proc, key: str, status: int = 2) -> None:
    errors = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("error:")]
    assert proc.returncode == status, (proc.stdout + proc.stderr)[-3000:]
    assert len(errors) == 1 and key in errors[0], (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.parametrize("override,key", DATA_CASES, ids=[c[1] for c in DATA_CASES])
def test_data_input_error_is_one_line_before_start_up(override, key, tiny_data, tmp_path):
    sets, env = _data_sets(tiny_data, override, tmp_path)
    proc = subprocess.run(pretrain_command(sets), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    _assert_one_error_line(proc, key)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]   # nothing else: no process group started
    assert "Traceback" not in proc.stdout + proc.stderr


TWO_RANK_CASES = [
    (DATA_CASES[0][0], DATA_CASES[0][1]),   # before start-up, on both ranks
    # after start-up, in the loader: 1 readable shard for 2 data-parallel ranks
    ("data.sources=[{{paths: '{data}/two_files/*.tar'}}]", "data.sources[0].paths"),
]


@pytest.mark.slow
@pytest.mark.parametrize("override,key", TWO_RANK_CASES, ids=["typo", "too_few_readable"])
def test_data_input_error_on_two_ranks_is_one_line_and_status_2(override, key, tiny_data,
                                                                 tmp_path):
    """Through torchrun_node.sh (torchrun alone reports 1): rank 0 prints the line, no rank
    waits for a rendezvous timeout."""
    sets, env = _data_sets(tiny_data, override, tmp_path)
    env.pop("MASTER_PORT", None)
    env.update(GENLIP_PYTHON=sys.executable, GENLIP_NPROC_PER_NODE="2", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    cmd = ["bash", str(ROOT / "examples" / "slurm" / "torchrun_node.sh"), "--config",
           str(TINY_CONFIG), "--set", *sets, "training.dp_invariant_data=false"]
    t0 = time.monotonic()
    proc = run_launcher(cmd, env, timeout=300)
    _assert_one_error_line(proc, key)
    assert "readable shard" in proc.stderr or "matches no files" in proc.stderr
    assert time.monotonic() - t0 < 240   # not a rendezvous/collective timeout
