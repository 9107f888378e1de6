"""checkpoint_queue, jit and triton_stub groups."""

from __future__ import annotations

import importlib.machinery
import queue
import sys
import time

import pytest
import torch
from packaging.version import Version

from genlip_megatron.compat import _patching, cpu_compat_disabled, jit
from genlip_megatron.compat.versions import megatron_version, torch_at_least


def test_checkpoint_queue_avoids_spawn_manager(gloo_world, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fs

    getter = getattr(fs, "get_write_results_queue", None) or fs._get_write_results_queue

    class SpawnCalled(Exception):
        pass

    def no_spawn(method):
        raise SpawnCalled(method)

    with cpu_compat_disabled("checkpoint_queue"):
        monkeypatch.setattr(fs.mp, "get_context", no_spawn)
        with pytest.raises(SpawnCalled):          # upstream starts a spawn Manager here
            getter()
    assert isinstance(getter(), queue.Queue)      # ours: an in-process queue, no spawn


@pytest.mark.skipif(megatron_version() is not None and megatron_version() >= Version("0.19")
                    and not torch_at_least("2.7"),
                    reason=f"megatron-core {megatron_version()} saves/loads torch_dist through "
                           f"DCP's no_dist, which torch {torch.__version__} lacks (needs >= 2.7)")
def test_torch_dist_save_is_fast_and_loads(gloo_world, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    tensor = torch.arange(12.0).view(3, 4)
    start = time.perf_counter()
    dist_checkpointing.save({"t": ShardedTensor.from_rank_offsets("t", tensor)}, str(tmp_path))
    assert time.perf_counter() - start < 3.0      # ~5 s with the spawn Manager on 2 cores
    loaded = dist_checkpointing.load(
        {"t": ShardedTensor.from_rank_offsets("t", torch.empty(3, 4))}, str(tmp_path))
    assert torch.equal(loaded["t"], tensor)


def test_jit_group_no_compile_of_output_gate(gloo_world):
    import megatron.core.jit as mjit
    from megatron.core.transformer.attention import Attention

    with cpu_compat_disabled("jit"):
        assert mjit.jit_fuser is torch.compile
    assert mjit.jit_fuser is mjit.noop_decorator
    gate = Attention._apply_output_gate
    assert not hasattr(gate, "_torchdynamo_orig_callable")
    x, g = torch.randn(3, 2, 8), torch.randn(3, 2, 2, 4)
    torch.testing.assert_close(gate(None, x, g), x * torch.sigmoid(g.view(3, 2, 8)))


def test_jit_unwraps_already_compiled_functions():
    def f(x):
        return x + 1

    compiled = torch.compile(f)
    assert compiled is not f and jit._uncompiled(compiled) is f
    assert jit._uncompiled(f) is f


def test_triton_stub_registers_and_reverts(monkeypatch, tmp_path):
    """megatron-core ≥ 0.19 imports a triton kernel module from its pipeline schedules."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    (tmp_path / "transformer/moe/ops").mkdir(parents=True)
    (tmp_path / "transformer/moe/ops/paged_stash.py").write_text("import triton\n")
    spec = importlib.machinery.ModuleSpec("megatron.core", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real_find_spec = jit.importlib.util.find_spec
    monkeypatch.setattr(jit.importlib.util, "find_spec", lambda n, *a: (
        None if n == "triton" else spec if n == "megatron.core" else real_find_spec(n, *a)))
    saved = sys.modules.pop(name, None)
    try:
        patches = _patching.PatchSet("triton_stub")
        jit.stub_triton_paged_stash(patches)
        stub = sys.modules[name]
        assert stub.GLOBAL_BLOCK_SIZE == 1024
        with pytest.raises(RuntimeError, match="triton"):
            stub.paged_stash_copy_kernel()
        patches.revert()
        assert name not in sys.modules
    finally:
        if saved is not None:
            sys.modules[name] = saved
