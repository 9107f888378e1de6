"""Top-level test configuration.

Tests under tests/multirank/ need several processes; they are collected only inside torchrun
(tests/test_multirank_sessions.py launches those sessions), never by the plain pytest run.
"""

import os

import pytest
import torch
import torch.distributed as dist

if "TORCHELASTIC_RUN_ID" not in os.environ:
    collect_ignore_glob = ["multirank/*"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (not present on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def gloo_world(tmp_path_factory):
    """CPU compat applied and a gloo world of size 1 on a file:// rendezvous.

    Reused when the process already has a process group (inside torchrun sessions).
    """
    from genlip_megatron.compat import apply_cpu_compat

    apply_cpu_compat()
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    rdzv = tmp_path_factory.mktemp("gloo") / "rdzv"
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def mp_state(gloo_world):
    """megatron parallel state with TP = PP = 1 and seeded RNGs (CPU generator + tracker)."""
    from megatron.core import parallel_state, tensor_parallel

    from genlip_megatron.training.parallel import destroy_topology

    destroy_topology()
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield
    destroy_topology()
