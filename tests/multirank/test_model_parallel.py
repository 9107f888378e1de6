"""GenLIPMegatronModel under TP / SP / PP (gloo, CPU) equals the TP=1/PP=1 model: loss, grads.

Every rank also builds the TP=1/PP=1 reference itself (same init seed: the reference init is
layout-invariant), runs it on the same micro-batches, and compares its own shards against the
matching slices of the reference tensors, using megatron's TP attributes (``partition_dim``,
``partition_stride``) to slice. Run by tests/test_multirank_sessions.py under torchrun.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from reference_genlip import make_packed_batch

from genlip_megatron.config import ParallelConfig, PrecisionConfig, RecomputeConfig, \
    decode_variant
from genlip_megatron.model.genlip import GenLIPMegatronModel
from genlip_megatron.model.transformer_config import build_transformer_config

SEQ = 48
ROWS = [
    [[(2, 3, 7), (3, 3, 5), (1, 2, 6)], [(4, 2, 9), (2, 2, 12)]],
    [[(3, 2, 11), (2, 2, 4)], [(1, 1, 20), (2, 5, 6)]],
    [[(4, 4, 10), (1, 3, 9)], [(2, 2, 30)]],
    [[(2, 2, 5), (2, 2, 5), (2, 2, 5)], [(3, 3, 8), (1, 4, 7)]],
]
SEED = 1234


def _config(tp=1, pp=1, vpp=None, sp=False, recompute=None, **model_overrides):
    model = dataclasses.replace(decode_variant("tiny"), **model_overrides)
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp, sp=sp,
                              recompute=recompute or RecomputeConfig())
    return build_transformer_config(model, parallel, PrecisionConfig(params_dtype="fp32"),
                                    init_seed=SEED, has_cuda=False)


def _init_parallel(tp: int, pp: int, vpp=None) -> None:
    from megatron.core import parallel_state, tensor_parallel

    from genlip_megatron.training.parallel import destroy_topology

    destroy_topology()
    parallel_state.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)


@pytest.fixture(autouse=True)
def _teardown_parallel_state():
    yield
    from genlip_megatron.training.parallel import destroy_topology

    destroy_topology()


def _batches(n=len(ROWS)):
    return [make_packed_batch(rows, SEQ, 256, seed=i) for i, rows in enumerate(ROWS[:n])]


def _args(b):
    return (b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"], b["pixel_values"])


def _global_name(name: str, model) -> str:
    if not name.startswith("decoder.layers."):
        return name
    local, rest = name[len("decoder.layers."):].split(".", 1)
    return f"decoder.layers.{model.decoder.layers[int(local)].layer_number - 1}.{rest}"


def _reference(batches, **overrides):
    """TP=1/PP=1 loss (mean over micro-batches of token-mean CE), params and grads by name."""
    _init_parallel(1, 1)
    model = GenLIPMegatronModel(_config(**overrides))
    model.train()
    losses = []
    for b in batches:
        per_token = model(*_args(b), labels=b["labels"])
        loss = per_token.sum() / (b["labels"] != -100).sum() / len(batches)
        loss.backward()
        losses.append(loss.detach())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return sum(losses, torch.zeros(())), params, grads


def _my_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of a TP=1 tensor this rank holds, per megatron's TP attributes."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    chunks = torch.chunk(full, size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def _reduce_sequence_parallel_grads(model) -> None:
    """What finalize_model_grads does for SP-replicated params (norms, LayerScale, biases)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            dist.all_reduce(param.grad, group=group)


def _check_against_reference(model, ref_params, ref_grads, grad_scale=1.0):
    checked = 0
    for name, param in model.named_parameters():
        key = _global_name(name, model)
        assert torch.equal(param.detach(), _my_slice(ref_params[key], param)), key
        expected = _my_slice(ref_grads[key], param) * grad_scale
        tol = 2e-5 * float(expected.abs().max()) + 1e-7
        torch.testing.assert_close(param.grad, expected, atol=tol, rtol=1e-4, msg=key)
        checked += 1
    assert checked > 10


def _run_tp(tp, sp, batches, **overrides):
    _init_parallel(tp, 1)
    model = GenLIPMegatronModel(_config(tp=tp, sp=sp, **overrides))
    model.train()
    total = torch.zeros(())
    for b in batches:
        per_token = model(*_args(b), labels=b["labels"])
        loss = per_token.sum() / (b["labels"] != -100).sum() / len(batches)
        loss.backward()
        total += loss.detach()
    if sp:
        _reduce_sequence_parallel_grads(model)
    return total, model


@pytest.mark.world_size(2)
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_matches_tp1(sp):
    batches = _batches(2)
    ref_loss, ref_params, ref_grads = _reference(batches)
    loss, model = _run_tp(2, sp, batches)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _check_against_reference(model, ref_params, ref_grads)


def _reduce_qk_layernorm_grads(model) -> None:
    """What finalize_model_grads does for q/k_layernorm under TP without SP (by name, with
    ``config.qk_layernorm``): each rank normalised only its own heads."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        if ("q_layernorm" in name or "k_layernorm" in name) and \
                not getattr(param, "sequence_parallel", False):
            dist.all_reduce(param.grad, group=group)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("knobs", [{"gated_attention": False}, {"qk_layernorm": True}],
                         ids=["no_gate", "qk_norm"])
def test_ablation_knobs_under_tp_match_tp1(sp, knobs):
    batches = _batches(2)
    ref_loss, ref_params, ref_grads = _reference(batches, **knobs)
    loss, model = _run_tp(2, sp, batches, **knobs)
    if knobs.get("qk_layernorm"):
        _reduce_qk_layernorm_grads(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _check_against_reference(model, ref_params, ref_grads)
    assert any("q_layernorm" in n for n in ref_params) is bool(knobs.get("qk_layernorm"))


@pytest.mark.world_size(2)
def test_tp2_sp_drop_path_and_full_recompute_match_tp1():
    """DropPath draws the same rows on both TP ranks (inside megatron's SP RNG fork) and full
    recompute replays them; the TP=1 run without recompute draws the same rows."""
    batches = _batches(2)
    ref_loss, ref_params, ref_grads = _reference(batches, drop_path_rate=0.5)
    recompute = RecomputeConfig(granularity="full", method="uniform", num_layers=1)
    loss, model = _run_tp(2, True, batches, drop_path_rate=0.5, recompute=recompute)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _check_against_reference(model, ref_params, ref_grads)
    # The rate is high enough that some row was dropped: the loss differs from drop-path off.
    no_drop, _, _ = _reference(batches)
    assert not torch.allclose(no_drop, ref_loss)


def _run_pipeline(tp, pp, sp, batches, vpp=None, **overrides):
    """megatron's pipeline schedule over ``batches`` as micro-batches."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _init_parallel(tp, pp, vpp)
    cfg = _config(tp=tp, pp=pp, vpp=vpp, sp=sp, **overrides)
    chunks = []
    for vp_stage in range(vpp or 1):
        kwargs = {"vp_stage": vp_stage} if vpp else {}
        chunks.append(GenLIPMegatronModel(
            cfg, pre_process=parallel_state.is_pipeline_first_stage(False, **kwargs),
            post_process=parallel_state.is_pipeline_last_stage(False, **kwargs),
            vp_stage=vp_stage if vpp else None))

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        output = model(*_args(b), labels=b["labels"])
        n_valid = (b["labels"] != -100).sum()

        def loss_func(per_token):
            loss = per_token.sum() / n_valid
            return loss, {"loss": loss.detach().clone()}  # megatron divides loss in place

        return output, loss_func

    iters = [iter(batches) for _ in chunks]
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if vpp else iters[0],
        model=chunks, num_microbatches=len(batches), seq_length=SEQ,
        micro_batch_size=len(batches[0]["tokens"]), forward_only=False)
    for chunk in chunks:
        if sp:
            _reduce_sequence_parallel_grads(chunk)
    losses = [o["loss"] for o in out]
    total = torch.stack(losses).sum() / len(batches) if losses else None
    return total, chunks


def _check_pipeline(chunks, total, ref_loss, ref_params, ref_grads):
    from megatron.core import parallel_state

    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(total, ref_loss, rtol=1e-5, atol=0)
    for chunk in chunks:
        _check_against_reference(chunk, ref_params, ref_grads)


@pytest.mark.world_size(2)
def test_pipeline_1f1b_matches_pp1():
    batches = _batches(4)
    ref = _reference(batches)
    total, chunks = _run_pipeline(1, 2, False, batches)
    _check_pipeline(chunks, total, *ref)


@pytest.mark.world_size(2)
def test_interleaved_pipeline_matches_pp1():
    """PP=2 × VPP=2 on gloo (batch_p2p_comm off: see build_transformer_config)."""
    batches = _batches(4)
    ref = _reference(batches, num_layers=4)
    total, chunks = _run_pipeline(1, 2, False, batches, vpp=2, num_layers=4)
    _check_pipeline(chunks, total, *ref)


@pytest.mark.world_size(4)
def test_tp2_sp_pp2_matches_tp1_pp1():
    batches = _batches(4)
    ref = _reference(batches)
    total, chunks = _run_pipeline(2, 2, True, batches)
    _check_pipeline(chunks, total, *ref)


@pytest.mark.world_size(2)
def test_dist_checkpoint_tp2_save_loads_into_pp2():
    """Sharded state dict of every module (LayerScale, norms, stacked layers) reshards."""
    from megatron.core import dist_checkpointing

    root = Path(os.environ.get("GENLIP_TEST_TMP", "/tmp")) / "genlip_model_ckpt"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    _init_parallel(2, 1)
    saved = GenLIPMegatronModel(_config(tp=2, sp=True))
    dist_checkpointing.save(saved.sharded_state_dict(), str(root))
    _, ref_params, _ = _reference([])

    _init_parallel(1, 2)
    from megatron.core import parallel_state

    fresh_cfg = dataclasses.replace(_config(pp=2), init_seed=SEED + 1)
    loaded = GenLIPMegatronModel(fresh_cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage())
    state = dist_checkpointing.load(loaded.sharded_state_dict(), str(root))
    loaded.load_state_dict(state)
    for name, param in loaded.named_parameters():
        assert torch.equal(param.detach(), ref_params[_global_name(name, loaded)]), name


@pytest.mark.world_size(2)
def test_tp2_sp_megatron_ddp_finalize_model_grads():
    """The trainer's path: megatron DDP + schedule + finalize_model_grads sums the grads of the
    SP-tagged params (norms, LayerScale, output_proj, row-parallel biases) over TP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = _batches(2)
    ref_loss, ref_params, ref_grads = _reference(batches)
    _init_parallel(2, 1)
    cfg = _config(tp=2, sp=True)
    model = DistributedDataParallel(cfg, DistributedDataParallelConfig(), GenLIPMegatronModel(cfg))
    cfg.finalize_model_grads_func = finalize_model_grads

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        n_valid = (b["labels"] != -100).sum()
        return chunk(*_args(b), labels=b["labels"]), lambda t: (t.sum() / n_valid, {})

    model.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches),
                                model=[model], num_microbatches=len(batches), seq_length=SEQ,
                                micro_batch_size=2, forward_only=False)
    inner = model.module
    for param in inner.parameters():
        param.grad = param.main_grad
    _check_against_reference(inner, ref_params, ref_grads)


@pytest.mark.world_size(4)
def test_tp4_sp_matches_tp1():
    batches = _batches(2)
    ref_loss, ref_params, ref_grads = _reference(batches)
    loss, model = _run_tp(4, True, batches)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _check_against_reference(model, ref_params, ref_grads)
