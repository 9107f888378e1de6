"""Megatron(TP=2, PP=2) → HF → Megatron(TP=1) is bit-exact in fp32 (4 gloo ranks, CPU).

Every rank fills its TP/PP shard of the tiny model from one canonical random TP=1 state dict
(split through the conversion registry) and the trainer's CheckpointManager saves the sharded
model. Rank 0 then converts to HF (one CPU process reading the 4-rank checkpoint) and back to a
TP=1 checkpoint; every rank loads that through the trainer's ``training.init_from`` path into a
TP=1 model (and into a fresh TP=2/PP=2 model) and compares bit for bit. The per-rank
in-memory state dicts are also gathered and merged with the registry's TP gather / PP
renumbering, which must give the same tensors.
Run by tests/test_multirank_sessions.py under torchrun.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "convert"))

from convert_testlib import TINY, load_megatron, random_hf_state_dict, save_megatron, \
    transformer_config  # noqa: E402
from genlip_megatron.convert import hf_state_dict_to_megatron, hf_to_megatron, \
    mapping_registry, megatron_state_dict_to_hf, megatron_to_hf  # noqa: E402

TP, PP = 2, 2


def _init(tp: int, pp: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    from genlip_megatron.training.parallel import destroy_topology

    destroy_topology()
    parallel_state.initialize_model_parallel(tp, pp)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


@pytest.fixture(autouse=True)
def _teardown_parallel_state():
    yield
    from genlip_megatron.training.parallel import destroy_topology

    destroy_topology()


def _shared_dir() -> Path:
    base = Path(os.environ.get("GENLIP_TEST_TMP", tempfile.gettempdir())) / "convert_rt"
    if dist.get_rank() == 0:
        base.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return base


def _tensors(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.world_size(4)
def test_tp2_pp2_to_hf_to_tp1_is_bit_exact():
    from megatron.core import parallel_state as ps

    from genlip_megatron.model.genlip import build_genlip_model

    root = _shared_dir()
    full = hf_state_dict_to_megatron(random_hf_state_dict(TINY, seed=21), TINY)  # same on all
    reg = mapping_registry(TINY)

    # ---- TP=2/PP=2 model holding the canonical weights, saved by the trainer's manager
    _init(TP, PP)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    chunk = build_genlip_model(transformer_config(TINY, TP, PP),
                               pre_process=ps.is_pipeline_first_stage(),
                               post_process=ps.is_pipeline_last_stage())
    shard = reg.split_ranks(full, TP, PP, local_names=True)[(pp_rank, tp_rank)]
    missing, unexpected = chunk.load_state_dict(shard, strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), missing
    local = _tensors(chunk)
    save_megatron([chunk], TINY, root / "mg_tp2pp2", tp=TP, pp=PP)

    # ---- per-rank state dicts merged by the registry (TP gather incl. stride 2, PP renumber)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ((pp_rank, tp_rank), local))
    merged = reg.merge_ranks(dict(gathered))
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)

    # ---- rank 0: Megatron(TP2, PP2) → HF → Megatron(TP1) on one CPU process
    if dist.get_rank() == 0:
        from safetensors.torch import load_file

        megatron_to_hf(root / "mg_tp2pp2", root / "hf", dtype="fp32", force=True,
                       progress=False, require_tokenizer=False)
        stored = load_file(root / "hf" / "model.safetensors")
        want = megatron_state_dict_to_hf(full, TINY)
        assert stored.keys() == want.keys()
        assert all(torch.equal(stored[k], want[k]) for k in want)
        hf_to_megatron(root / "hf", root / "mg_tp1", tp=1, pp=1, force=True, progress=False)
    dist.barrier()

    # ---- the converted checkpoint also loads straight into a TP=2/PP=2 model (resharded)
    chunk2 = build_genlip_model(transformer_config(TINY, TP, PP, seed=55),
                                pre_process=ps.is_pipeline_first_stage(),
                                post_process=ps.is_pipeline_last_stage())
    load_megatron([chunk2], TINY, root / "mg_tp1")
    again = _tensors(chunk2)
    assert again.keys() == local.keys() and all(torch.equal(again[k], local[k]) for k in local)

    # ---- every rank: TP=1 model through the trainer's init_from path, bit-exact
    _init(1, 1)
    model = build_genlip_model(transformer_config(TINY, 1, 1, seed=77))
    load_megatron([model], TINY, root / "mg_tp1")
    got = reg.merge_ranks({(0, 0): _tensors(model)})
    assert got.keys() == full.keys()
    bad = [k for k in full if not torch.equal(got[k], full[k])]
    assert not bad, bad
    # and the TP=1 model's shards are exactly this rank's TP=2/PP=2 tensors
    again = reg.split_ranks(got, TP, PP, local_names=True)[(pp_rank, tp_rank)]
    assert again.keys() == local.keys() and all(torch.equal(again[k], local[k]) for k in local)
