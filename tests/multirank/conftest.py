"""Multi-rank test session: one gloo process group per torchrun process.

Each rank runs the same pytest session; tests that need another world size are skipped with
``@pytest.mark.world_size(n)``. The process group lives for the whole session (start-up cost is
paid once); each test sets up and tears down megatron's parallel_state itself.
"""

import faulthandler
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from training_helpers import make_tiny_data


def pytest_configure(config):
    config.addinivalue_line("markers", "world_size(n): run only when torchrun has n ranks")
    if "TORCHELASTIC_RUN_ID" not in os.environ or dist.is_initialized():
        return
    # A rank that dies leaves the others in a collective: bound every wait.
    faulthandler.dump_traceback_later(900, exit=True)
    from genlip_megatron.compat import apply_cpu_compat

    apply_cpu_compat()
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    if dist.get_rank() != 0:
        config.option.verbose = -2


def pytest_collection_modifyitems(config, items):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for item in items:
        marker = item.get_closest_marker("world_size")
        if marker is not None and marker.args[0] != world:
            item.add_marker(pytest.mark.skip(reason=f"needs {marker.args[0]} ranks, have {world}"))


def pytest_unconfigure(config):
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The tiny training shards, written once by rank 0 where every rank can read them."""
    root = Path(os.environ.get("GENLIP_TEST_TMP", "/tmp/genlip_test")) / "tiny_data"
    if dist.get_rank() == 0:
        make_tiny_data(root)
    dist.barrier()
    return root
