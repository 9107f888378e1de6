"""Every parallel decision of a run, applied in this order:

1. topology: megatron ``parallel_state`` (TP, PP with optional virtual stages, DP = rest);
2. model chunks: one GenLIPMegatronModel per virtual pipeline stage (embeddings on the first stage,
   head and loss on the last);
3. DDP wrap: megatron ``DistributedDataParallel`` with grad buffers (fp32 grad reduction) and,
   when configured, the distributed optimizer's sharded buffers;
4. optimizer: ``get_megatron_optimizer`` (AdamW, fp32 main params for bf16 models, clipping)
   and ``OptimizerParamScheduler`` (linear warmup, cosine to min_lr);
5. schedule hooks: no-sync / grad-sync / param-sync / finalize functions in the model config,
   used by ``get_forward_backward_func`` (no pipelining, 1F1B, or interleaved 1F1B).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from genlip_megatron.compat import apply_torch_adam_fixes
from genlip_megatron.compat.optimizer import megatron_uses_torch_adam
from genlip_megatron.config import ParallelConfig, PrecisionConfig, RunConfig, microbatch_count
from genlip_megatron.config.training import OptimizerConfig, SchedulerConfig
from genlip_megatron.model.genlip import build_genlip_model

logger = logging.getLogger(__name__)


@dataclass
class Topology:
    """Sizes and ranks of this process in the megatron mesh."""

    tp: int
    pp: int
    vpp: Optional[int]
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0


def initialize_topology(p: ParallelConfig) -> Topology:
    """Create megatron's process groups for (tp, pp, vpp); DP takes the remaining ranks."""
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tp,
                                     pipeline_model_parallel_size=p.pp,
                                     virtual_pipeline_model_parallel_size=p.vpp,
                                     context_parallel_size=p.cp)
    return Topology(p.tp, p.pp, p.vpp, ps.get_data_parallel_world_size(),
                    ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                    ps.get_data_parallel_rank())


def destroy_topology() -> None:
    """Destroy megatron's process groups, then reset its parallel state.

    megatron-core's ``parallel_state.destroy_model_parallel`` destroys only its dedicated
    ``*_GLOO`` groups and drops its references to the rest, which on CPU are gloo groups too.
    A gloo group keeps its worker threads and sockets until it is destroyed, so a
    process that builds the topology many times (a pytest session, ``benchmarks/sweep.py``)
    gained ~50 threads per build (thousands in a test session, which then crawled). Every group
    megatron holds in a module global (a group, or a list of them) is destroyed here; the world
    group is left to its owner, and groups of a world destroyed earlier are skipped.
    """
    seen: set[int] = set()
    for value in list(vars(ps).values()):
        for group in value if isinstance(value, (list, tuple)) else (value,):
            if (isinstance(group, dist.ProcessGroup) and group is not dist.group.WORLD
                    and id(group) not in seen):
                seen.add(id(group))
                try:
                    dist.destroy_process_group(group)
                except ValueError:   # already gone: its world was destroyed before this call
                    pass
    ps.destroy_model_parallel()
    # A destroyed gloo group stops its threads only when its last reference goes; a closed
    # trainer's modules, optimizer and schedule hooks hold the groups in reference cycles,
    # which Python's cyclic collector otherwise reaches much later.
    gc.collect()


def build_model_chunks(tconfig, topo: Topology) -> list[torch.nn.Module]:
    """One GenLIPMegatronModel per virtual stage of this pipeline rank, on the training device."""
    chunks = []
    for vp_stage in range(topo.vpp or 1):
        vp = vp_stage if topo.vpp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        model = build_genlip_model(tconfig, pre_process=pre, post_process=post, vp_stage=vp)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def resolve_distributed_optimizer(p: ParallelConfig, dp: int) -> bool:
    """``parallel.use_distributed_optimizer`` for this layout (None = auto: on iff DP > 1).

    At DP = 1 the distributed optimizer shards nothing but still copies the whole grad buffer
    into fp32 main grads and the updated params back (three full-buffer passes per step), so
    auto switches it off there, with a log line; an explicit true/false is kept.
    """
    if p.use_distributed_optimizer is not None:
        return p.use_distributed_optimizer
    if dp == 1:
        logger.info("distributed optimizer off: data-parallel size is 1, nothing to shard "
                    "(set parallel.use_distributed_optimizer: true to force it)")
    return dp > 1


def wrap_with_ddp(chunks: list, tconfig, p: ParallelConfig) -> list:
    """Wrap each chunk in megatron DDP (only the first chunk uses bucketing overlap)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=None if p.overlap_grad_reduce else None)
    return [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)]


def build_optimizer(chunks: list, opt: OptimizerConfig, prec: PrecisionConfig,
                    p: ParallelConfig):
    """megatron AdamW; weight decay on every parameter unless decay_norm_and_bias is false."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    bf16 = prec.params_dtype == "bf16"
    config = MegatronOptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
        # A constant scale of 1 turns on megatron's inf/nan grad check for bf16 and the
        # distributed optimizer; fp32 without it (megatron's FP32Optimizer) has no such check,
        # the trainer's optimizer_step (training/optimizer_step.py) adds it there.
        loss_scale=1.0 if (bf16 or p.use_distributed_optimizer) else None,
        decoupled_weight_decay=True)
    overrides = {} if opt.decay_norm_and_bias else None  # {} = decay all (reference recipe)
    apply_torch_adam_fixes_if_needed()
    return get_megatron_optimizer(config, chunks, config_overrides=overrides)


def apply_torch_adam_fixes_if_needed() -> bool:
    """Apply the DistributedOptimizer + torch Adam resume fixes whenever megatron falls back to
    ``torch.optim.AdamW`` (neither TE nor Apex provides a fused Adam), on any device.

    Returns:
        True when megatron uses torch's Adam (and the fixes are now in place).
    """
    if not megatron_uses_torch_adam():
        return False
    apply_torch_adam_fixes()
    return True


def build_scheduler(optimizer, opt: OptimizerConfig, sched: SchedulerConfig, train_steps: int):
    """Linear warmup from 0 then ``decay_style`` to min_lr at ``train_steps`` (step units)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = sched.warmup_steps if sched.warmup_steps is not None else \
        int(train_steps * sched.warmup_fraction)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(train_steps, warmup + 1), lr_decay_style=sched.decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=max(train_steps, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False)


def configure_schedule_hooks(tconfig, ddp_chunks: list, optimizer, p: ParallelConfig) -> None:
    """Hand the DDP sync hooks and finalize function to megatron's pipeline schedules."""
    from megatron.core.distributed import finalize_model_grads

    tconfig.grad_scale_func = optimizer.scale_loss
    if p.overlap_grad_reduce:
        no_sync = [c.no_sync for c in ddp_chunks]
        tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if p.overlap_param_gather:
        sync = [c.start_param_sync for c in ddp_chunks]
        tconfig.param_sync_func = sync[0] if len(sync) == 1 else sync
    tconfig.finalize_model_grads_func = finalize_model_grads


def num_microbatches(cfg: RunConfig, topo: Topology) -> int:
    """global_batch_size / (micro_batch_size × dp), refusing remainders."""
    return microbatch_count(cfg.training, cfg.parallel, topo.dp)
