"""Fixtures for the compat tests: the compat layer applied, a gloo world of size 1."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from genlip_megatron.compat import apply_cpu_compat

# Before any test module imports megatron: on megatron-core >= 0.19 without triton the
# triton_stub group must precede the first import of megatron's pipeline code.
apply_cpu_compat()


@pytest.fixture(scope="session")
def compat_world(tmp_path_factory):
    """Apply the CPU compat layer and open a gloo world of size 1 (reused when one is open)."""
    assert apply_cpu_compat()
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    rdzv = tmp_path_factory.mktemp("gloo") / "rdzv"
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def mp1(compat_world):
    """megatron parallel state TP = PP = 1, seeded."""
    import torch
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()
