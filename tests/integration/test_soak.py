"""Soak test: SIGKILL pretrain_genlip.py at random moments until it finishes, damaging the
checkpoint directory along the way; the run must end with the per-step losses of an
uninterrupted run and never restart from step 1 over existing checkpoints.

Kills come from a seeded schedule: at an injected point (after an optimizer step, after the
shards of a save, after the ``COMPLETE`` marker, after the rename but before ``latest`` moves:
training/faults.py), or from outside at a random moment once
training has started. Between launches the test deletes ``latest``, fills it with garbage, and
truncates a shard of the newest checkpoint (first refused in one line, then taken over with
``checkpoint.fallback_to_previous``). Runtime ≈ 11 launches × 6–10 s on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from training_helpers import ROOT, TINY_CONFIG, make_tiny_data, pretrain_command, \
    pretrain_env, read_jsonl_losses, run_pretrain, tiny_overrides

from genlip_megatron.training.checkpoint_layout import finished_checkpoints, lagging_latest, \
    read_latest

STEPS = 20
KILLS = 8
SEED = 8


def _overrides(data_dir: Path, save: Path, fallback: bool = False) -> list[str]:
    return tiny_overrides(data_dir, save, model__drop_path_rate=0.1,
                          training__train_steps=STEPS, checkpoint__save_interval=2,
                          checkpoint__keep_last=2,
                          checkpoint__fallback_to_previous=str(fallback).lower())


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _launch_timed_kill(overrides: list[str], jsonl: Path, rng: random.Random
                       ) -> tuple[int, str]:
    """Start a run and SIGKILL it at a random moment after its first new training step."""
    before = len(_records(jsonl))
    log = jsonl.parent.parent / "timed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(pretrain_command(overrides), cwd=ROOT, env=pretrain_env(),
                                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if len(_records(jsonl)) > before:
                time.sleep(rng.uniform(0.0, 0.4))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    return proc.returncode, log.read_text()


def _fault_points(rng: random.Random, resume_step: int) -> str:
    """An injected kill reached in this launch, at most two steps on (the run continues from
    ``resume_step``; KILLS launches must not finish it)."""
    step, save_step = rng.randint(resume_step + 1, resume_step + 2), resume_step + 2
    return rng.choice([f"after_step:{step}", f"checkpoint:after_shards:step={save_step}",
                       f"checkpoint:marked:step={save_step}",
                       f"checkpoint:renamed:step={save_step}"])


def _damage_target(save: Path, action: str) -> Path | None:
    """The checkpoint the next launch resumes from, when ``action`` can be tested now: it has a
    finished predecessor and no interrupted publication is pending (whose recovery would
    rewrite ``latest`` first)."""
    if list(save.glob("iter_*.old")) or any((t / "COMPLETE").is_file()
                                           for t in save.glob("iter_*.tmp")):
        return None
    done = finished_checkpoints(save)
    target = lagging_latest(save) or read_latest(save)[0] or (done[-1] if done else None)
    if target is None or (action == "truncate_shard" and target == done[0]):
        return None
    return target


def _resume_step(save: Path) -> int:
    """The step the next launch resumes from: ``latest`` (else the newest finished checkpoint),
    or a newer save whose publication start-up will complete (a ``.tmp`` holding COMPLETE)."""
    target, _ = read_latest(save)
    done = finished_checkpoints(save)
    target = lagging_latest(save) or target or (done[-1] if done else None)
    steps = [int(target.name.split("_")[1])] if target else [0]
    steps += [int(t.name[5:12]) for t in save.glob("iter_*.tmp")
              if (t / "COMPLETE").is_file() and not (save / t.name[:12]).exists()]
    return max(steps)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


def test_soak_random_sigkills_and_damage_end_with_the_uninterrupted_curve(data_dir, tmp_path):
    ref_dir, save = tmp_path / "ref", tmp_path / "soak"
    ref = run_pretrain(_overrides(data_dir, ref_dir))
    assert ref.returncode == 0, ref.stderr[-4000:]
    want = read_jsonl_losses(ref_dir / "metrics.jsonl")
    want_line = ref.stdout.splitlines()[-1]
    assert sorted(want) == list(range(1, STEPS + 1))

    rng = random.Random(SEED)
    jsonl = save / "metrics.jsonl"
    kills, launches, events = 0, 0, []
    damage = {2: "delete_latest", 3: "garbage_latest", 5: "truncate_shard"}  # after N kills
    while True:
        launches += 1
        assert launches < 30, f"soak did not finish: {events}"
        had_checkpoints = bool(finished_checkpoints(save))
        action, fallback = damage.pop(kills, None), False
        target = _damage_target(save, action) if action else None
        if action and target is None:
            later = min(k for k in range(kills + 1, kills + 99) if k not in damage)
            damage[later], action = action, None           # try again after a later kill
        if action == "delete_latest":
            (save / "latest").unlink(missing_ok=True)
        elif action == "garbage_latest":
            (save / "latest").write_bytes(b"\xff\xfe\x00garbage\n")
        elif action == "truncate_shard":
            newest = target
            shard = sorted(newest.glob("*.distcp"))[-1]
            os.truncate(shard, shard.stat().st_size // 3)
            refused = run_pretrain(_overrides(data_dir, save))
            lines = [x for x in refused.stderr.splitlines() if x.strip()]
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr[-3000:]
            assert newest.name in lines[0] and shard.name in lines[0] \
                and "checkpoint.fallback_to_previous" in lines[0], lines[0]
            fallback = True
        before = len(_records(jsonl))
        resume_step = _resume_step(save)
        if kills >= KILLS and not damage:                  # enough: finish the run
            proc = run_pretrain(_overrides(data_dir, save, fallback))
            rc, out = proc.returncode, proc.stdout + proc.stderr
        elif fallback:  # the damaged step is kept aside; kill before `latest` moves past it
            proc = run_pretrain(_overrides(data_dir, save, True), fault="checkpoint:renamed")
            rc, out = proc.returncode, proc.stdout + proc.stderr
            assert len(list(save.glob("iter_*.superseded-*"))) == 1, out[-3000:]
        elif rng.random() < 0.3 and resume_step <= STEPS - 10:
            rc, out = _launch_timed_kill(_overrides(data_dir, save), jsonl, rng)
        else:
            fault = _fault_points(rng, resume_step)
            proc = run_pretrain(_overrides(data_dir, save), fault=fault)
            rc, out = proc.returncode, proc.stdout + proc.stderr
            action = action or fault
        events.append((action or "timed", resume_step, rc))
        new = [r["step"] for r in _records(jsonl)[before:]]
        if had_checkpoints and new:
            assert new[0] > 1, f"restarted from step 1 over checkpoints ({events}):\n{out[-3000:]}"
        if new and not fallback:   # resumed exactly where the directory says (a fallback: before)
            assert new[0] == resume_step + 1, (new[0], events, out[-3000:])
        if action in ("delete_latest", "garbage_latest"):
            assert "using the newest finished checkpoint" in out, out[-3000:]
        if fallback:
            assert "resuming from the previous finished checkpoint" in out, out[-3000:]
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, f"launch {launches} failed ({rc}):\n{out[-4000:]}"
        kills += 1

    assert kills >= KILLS and not damage, f"{kills} kills, damage left {damage}: {events}"
    assert any(e[0].startswith("checkpoint:") for e in events), events
    got = read_jsonl_losses(jsonl)  # a re-run step's last record wins
    assert got == want, f"resumed curve differs after {events}"
    final = proc.stdout.splitlines()[-1]
    # unigram_loss covers the labels of every step, resumed history included.
    pick = lambda line: re.search(r"final_loss=\S+ unigram_loss=\S+", line).group(0)  # noqa: E731
    assert pick(final) == pick(want_line), (final, want_line)
    assert (save / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    assert not list(save.glob("iter_*.tmp")) and not list(save.glob("iter_*.old"))


# ---------------------------------------------------------------------------- 2 ranks
NODE_SCRIPT = ROOT / "examples" / "slurm" / "torchrun_node.sh"
STEPS_2 = 12


def _node_env(fault: str = "") -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "GENLIP_")) and k != "OMP_NUM_THREADS"}
    env.update(GENLIP_PYTHON=sys.executable, GENLIP_NPROC_PER_NODE="2", PYTHONPATH=str(ROOT),
               GENLIP_FAULT_INJECT=fault)
    return env


def _node_cmd(data_dir: Path, save: Path) -> list[str]:
    sets = tiny_overrides(data_dir, save, training__train_steps=STEPS_2,
                          checkpoint__save_interval=2, checkpoint__keep_last=2,
                          data__reader__num_workers=2)
    return ["bash", str(NODE_SCRIPT), "--config", str(TINY_CONFIG), "--set", *sets]


def _ranks(script_pid: int) -> list[psutil.Process]:
    """The two training processes (torchrun's children) under torchrun_node.sh."""
    out = []
    for p in psutil.Process(script_pid).children(recursive=True):
        try:
            if "pretrain_genlip.py" in " ".join(p.cmdline()) \
                    and "torch.distributed.run" in " ".join(p.parent().cmdline()):
                out.append(p)
        except psutil.Error:   # exited meanwhile (a loader worker, a rank that just died)
            continue
    return out


def _launch_2(data_dir: Path, save: Path, fault: str = "", kill_after_step: bool = False,
              rng: random.Random | None = None) -> tuple[int, str]:
    """One torchrun_node.sh launch; optionally SIGKILL one rank at a random moment after its
    first new step (in a step, its all-reduce, a save or the loader)."""
    jsonl, before = save / "metrics.jsonl", len(_records(save / "metrics.jsonl"))
    log = save.parent / "launch.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(_node_cmd(data_dir, save), cwd=ROOT, env=_node_env(fault),
                                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while kill_after_step and proc.poll() is None and time.monotonic() < deadline:
            if len(_records(jsonl)) > before:
                time.sleep(rng.uniform(0.0, 0.6))
                ranks = _ranks(proc.pid)
                if ranks:
                    rng.choice(ranks).kill()
                break
            time.sleep(0.05)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]:
                p.kill()
            raise
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_two_rank_soak_with_loader_workers_ends_with_the_uninterrupted_curve(data_dir,
                                                                             tmp_path):
    """2 ranks × 2 loader workers under torchrun_node.sh, killed four times: one rank inside
    a step's gradient all-reduce (the other waits in it), both inside a save (shards written,
    not published), one rank at a random moment, both between the rename and ``latest``; the
    final curve equals an uninterrupted run's."""
    ref_dir, save = tmp_path / "ref" / "run", tmp_path / "soak" / "run"
    rc, out = _launch_2(data_dir, ref_dir)
    assert rc == 0, out[-4000:]
    want = read_jsonl_losses(ref_dir / "metrics.jsonl")
    assert sorted(want) == list(range(1, STEPS_2 + 1))
    rng = random.Random(SEED)
    # rank 1 killed inside step 3's gradient finalization: rank 0 waits in the DP all-reduce
    plan = [dict(fault="grad_sync:3=SIGKILL:rank1"), dict(fault="checkpoint:after_shards:step=6"),
            dict(kill_after_step=True, rng=rng), dict(fault="checkpoint:renamed:step=10")]
    events = []
    for kill in plan:
        resume = _resume_step(save)
        rc, out = _launch_2(data_dir, save, **kill)
        events.append((kill.get("fault", "timed"), resume, rc))
        assert rc != 0, f"launch survived its kill {events}:\n{out[-4000:]}"
        if kill.get("fault", "").startswith("grad_sync"):
            assert "SIGKILL to this process at grad_sync:3" in out, out[-4000:]
    rc, out = _launch_2(data_dir, save)
    assert rc == 0 and f"RUN steps={STEPS_2} " in out, (events, out[-4000:])
    assert read_jsonl_losses(save / "metrics.jsonl") == want, f"curve differs after {events}"
    assert (save / "latest").read_text().strip() == f"iter_{STEPS_2:07d}"
    assert not list(save.glob("iter_*.tmp")) and not list(save.glob("iter_*.old"))
