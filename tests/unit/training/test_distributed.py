"""Launch-environment detection for torchrun, srun and single-process runs."""

from __future__ import annotations

from genlip_megatron.training.distributed import _first_slurm_host, detect_launch_env


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3, 8, 1, "n0", 1234, "torchrun")


def test_srun_one_task_per_gpu():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_ID": "70001", "SLURM_JOB_NODELIST": "gpu[003-004]"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (9, 16, 1, "slurm")
    assert e.master_port == 10000 + 70001 % 50000
    assert e.master_addr == "gpu003"


def test_slurm_nodelist_parsing_without_scontrol():
    assert _first_slurm_host("node[12-14,20],login1") == "node12"
    assert _first_slurm_host("a1,b2") == "a1"
    assert _first_slurm_host("single") == "single"


def test_single_process_default_asks_for_a_free_port():
    e = detect_launch_env({})
    assert (e.rank, e.world_size, e.master_port, e.launcher) == (0, 1, 0, "single")
    assert detect_launch_env({"MASTER_PORT": "4321"}).master_port == 4321
