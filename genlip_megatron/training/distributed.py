"""Process-group start-up from torchrun or Slurm environment variables, and seeding.

The same entry point runs under ``torchrun`` on one box and under ``srun`` on many nodes:
torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a bare ``srun`` sets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST, from which we derive the same.
A single process without MASTER_PORT binds a free port (port 0) so that several runs can share
a host; set MASTER_ADDR/MASTER_PORT to choose the rendezvous yourself.
"""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    """0: let the OS pick a free port (single process only)."""
    launcher: str  # "torchrun" | "slurm" | "single"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as ``node[003-005,9],gpu1`` (scontrol when present)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.match(r"([^\[]+)\[([^\]]+)\]", first)
    if not match:
        return first
    prefix, ranges = match.groups()
    start = ranges.split(",")[0].split("-")[0]
    return prefix + start


def detect_launch_env(environ: Optional[dict] = None) -> LaunchEnv:
    """Read rank/world/master from torchrun variables, else Slurm's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                         "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
                         int(env.get("MASTER_PORT", 10000 + job_id % 50000)), "slurm")
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                     int(env.get("MASTER_PORT", 0)), "single")


def init_distributed(timeout_s: int = 1800) -> LaunchEnv:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) once; returns the launch env."""
    launch = detect_launch_env()
    if dist.is_initialized():
        return launch
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    if launch.master_port == 0:  # single process: a store on a free port, no collisions
        store = dist.TCPStore(launch.master_addr, 0, 1, is_master=True,
                              timeout=timedelta(seconds=timeout_s))
        os.environ["MASTER_PORT"] = str(store.port)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
    else:
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                                init_method="env://", timeout=timedelta(seconds=timeout_s))
    logger.info("torch.distributed: %s backend, rank %d/%d (%s)", backend, launch.rank,
                launch.world_size, launch.launcher)
    return launch


def set_seeds(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker.

    Every rank of a tensor-parallel group gets the same default-generator seed (replicated
    randomness must agree across TP ranks); pipeline stages differ by 100 per stage, as in
    megatron-training, because they hold different layers. DropPath draws from its own tracker
    state, equal across TP ranks and different per data-parallel rank, so replicas drop
    different rows (GenLIP's DropPath drops whole packed rows).
    """
    from megatron.core import parallel_state, tensor_parallel

    from genlip_megatron.model.transformer_layer import DROP_PATH_RNG_TRACKER_NAME

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    dp_rank = parallel_state.get_data_parallel_rank()
    tracker.add(DROP_PATH_RNG_TRACKER_NAME, stage_seed + 7919 * (dp_rank + 1))
