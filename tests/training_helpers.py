"""Shared pieces of the training tests: synthetic data, the tiny config, golden loss files.

The golden loss file ``tests/assets/losses/tiny_train_cpu.txt`` holds ``step loss`` lines of a
single-rank run of ``tests/assets/configs/tiny_train.yaml`` on this machine type (fp32, CPU).
Parallel runs (TP/PP/DP, distributed optimizer) and resumed runs are compared to it.
Regenerate after an intended numerics change with ``GENLIP_UPDATE_GOLDEN=1 pytest
tests/integration/test_pretrain.py -k golden``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "tests" / "assets" / "configs" / "tiny_train.yaml"
GOLDEN = ROOT / "tests" / "assets" / "losses" / "tiny_train_cpu.txt"
# Same code, same machine type: single-rank reruns are bit-identical. Parallel layouts reorder
# floating-point sums (TP all-reduces, DP grad reduction): measured ≤ 2.3e-7 over the 8 steps
# for every layout tested. 1e-4 absolute leaves room for other BLAS builds/CPUs and still
# catches real bugs (a wrong mask, a missing gradient all-reduce or a dropped micro-batch move
# the curve by > 1e-2 within a few steps at this learning rate).
LOSS_ATOL = 1e-4


def make_tiny_data(out: Path) -> Path:
    """Synthetic demo-style set for tests (small: a few seconds); idempotent."""
    from genlip_megatron.data.demo import generate_demo_data

    if not (out / "meta.json").is_file():
        generate_demo_data(out, num_train=240, num_eval=16, seed=3, vocab_size=200,
                           min_side=32, max_side=64, samples_per_shard=60)
    return out


def tiny_overrides(data_dir: Path, save_dir: Path | None = None, **extra) -> list[str]:
    """--set overrides pointing the tiny config at ``data_dir`` (and ``save_dir``)."""
    sets = [f"data.sources=[{{paths: '{data_dir}/train/*.tar'}}]",
            f"data.eval_sources=[{{paths: '{data_dir}/eval/*.tar'}}]",
            f"data.text.tokenizer_path={data_dir}/tokenizer.json"]
    if save_dir is not None:
        sets += [f"checkpoint.save_dir={save_dir}", f"logging.jsonl_path={save_dir}/metrics.jsonl"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return sets


def read_jsonl_losses(path: Path) -> dict[int, float]:
    """step → loss/global_avg from a metrics JSONL (the last entry wins for a repeated step)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if "loss/global_avg" in rec and "train/skipped_step" not in rec:
            out[int(rec["step"])] = float(rec["loss/global_avg"])
    return out


def read_golden() -> dict[int, float]:
    return {int(a): float(b) for a, b in
            (line.split() for line in GOLDEN.read_text().splitlines() if line.strip())}


def write_golden(losses: dict[int, float]) -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text("".join(f"{s} {losses[s]:.8f}\n" for s in sorted(losses)))


def update_golden_requested() -> bool:
    return os.environ.get("GENLIP_UPDATE_GOLDEN") == "1"


def assert_losses_close(got: dict[int, float], want: dict[int, float], atol: float = LOSS_ATOL,
                        what: str = "run") -> None:
    """Same steps, each loss within ``atol``; the message shows every step."""
    assert sorted(got) == sorted(want), f"{what}: steps {sorted(got)} != {sorted(want)}"
    rows = [f"  step {s}: {got[s]:.6f} vs {want[s]:.6f} (diff {abs(got[s] - want[s]):.2e})"
            for s in sorted(want)]
    assert all(abs(got[s] - want[s]) <= atol for s in want), \
        f"{what} loss curve differs beyond {atol}:\n" + "\n".join(rows)


def free_port() -> int:
    """A TCP port free right now (the rendezvous of a single-process run must not collide with
    other test processes on the machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pretrain_command(overrides: list[str]) -> list[str]:
    """``python pretrain_genlip.py --config tiny_train.yaml --set ...``."""
    return [sys.executable, str(ROOT / "pretrain_genlip.py"), "--config", str(TINY_CONFIG),
            "--set", *overrides]


def pretrain_env(fault: str | None = None) -> dict:
    """Environment of a test run: 2 threads, a free port, optional fault injection."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port())}
    env.pop("GENLIP_FAULT_INJECT", None)
    if fault:
        env["GENLIP_FAULT_INJECT"] = fault
    return env


def run_pretrain(overrides: list[str], fault: str | None = None, timeout: int = 600
                 ) -> subprocess.CompletedProcess:
    """Run pretrain_genlip.py on the tiny config to completion (or to its injected fault)."""
    return subprocess.run(pretrain_command(overrides), cwd=ROOT, env=pretrain_env(fault),
                          capture_output=True, text=True, timeout=timeout)


def run_launcher(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a multi-process launch that, on a timeout, fails with what every
    process it started was doing (state, kernel wait channel, command) before killing them, so
    a hang seen once on a loaded CI machine can be told apart (a rank in a collective, torchrun
    not exiting, a leftover child holding the output pipe)."""
    import psutil
    import pytest

    started = time.time() - 1
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True) \
            if proc.poll() is None else []
        # also processes of ours that outlived the script (they may hold the output pipe)
        ours = ("pretrain_genlip", "torch.distributed.run", "multiprocessing", "genlip_megatron")
        lines = []
        for p in psutil.process_iter():
            try:
                cmdline = " ".join(p.cmdline())
                if p not in family and (p.create_time() < started or p.pid == os.getpid()
                                        or not any(k in cmdline for k in ours)):
                    continue
                wchan = Path(f"/proc/{p.pid}/wchan").read_text()
                lines.append(f"{p.pid} ppid={p.ppid()} {p.status()} wchan={wchan} "
                             f"{cmdline[:160]}")
            except (psutil.Error, OSError):
                continue
        for p in family:
            try:
                p.kill()
            except psutil.Error:
                pass
        out, err = proc.communicate()
        pytest.fail(f"launch still running after {timeout} s (script exit "
                    f"{proc.returncode}); processes:\n" + "\n".join(lines) +
                    f"\n--- output:\n{(out + err)[-6000:]}")
