"""The parallelism planner's memory model against measured per-rank memory (2 ranks, gloo).

Measured = model-state storages + peak of the storages autograd keeps for backward
(``training/memory.py``) over one training step of the tiny config; predicted =
``training/planner.memory_per_rank`` for the rank's pipeline stage with the step's real sample
mix. Each layout must agree within 15 % on every rank.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from training_helpers import TINY_CONFIG, tiny_overrides

TOLERANCE = 0.15

LAYOUTS = {
    "dp2": [],
    "dp2_distopt_bf16": ["parallel.use_distributed_optimizer=true",
                         "precision.params_dtype=bf16"],
    "tp2": ["parallel.tp=2"],
    "tp2_sp_varlen": ["parallel.tp=2", "parallel.sp=true", "model.attention_backend=varlen"],
    "tp2_recompute_full": ["parallel.tp=2", "parallel.recompute.granularity=full"],
    "pp2": ["parallel.pp=2"],
    "pp2_recompute_selective": ["parallel.pp=2", "parallel.recompute.granularity=selective"],
}


class _Prebuilt:
    """One fixed micro-batch, repeated (so every micro-batch of the step has the same mix)."""

    def __init__(self, batch) -> None:
        self.batch = batch

    def __next__(self):
        return self.batch

    def counters(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def measure_and_predict(sets: list[str]) -> tuple[float, float, str]:
    """(measured, predicted, details) bytes of this rank after one measured step."""
    from megatron.core import parallel_state

    from genlip_megatron.config import load_config
    from genlip_megatron.training import planner
    from genlip_megatron.training.memory import SavedActivationMeter, model_state_storages
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer

    cfg = load_config(TINY_CONFIG, sets + ["logging.log_interval=100", "training.train_steps=2"]
                      ).validate(world_size=dist.get_world_size())
    trainer = Trainer(cfg)
    try:
        for chunk in trainer.model:
            chunk.train()
        trainer.state.step += 1
        trainer.train_step()                       # optimizer states now exist
        batch = next(trainer.loader)
        trainer.loader = _Prebuilt(batch)
        state = model_state_storages(trainer.model, trainer.optimizer)
        with SavedActivationMeter(state) as meter:
            trainer.state.step += 1
            trainer.train_step()
        p, topo = cfg.parallel, trainer.topo
        layout = planner.Layout(
            tp=p.tp, pp=p.pp, dp=topo.dp, vpp=p.vpp, sp=p.sp,
            distributed_optimizer=p.use_distributed_optimizer,
            recompute=p.recompute.granularity, micro_batches=trainer.n_micro,
            params_bytes=4 if cfg.precision.params_dtype == "fp32" else 2,
            attention=trainer.tconfig.prefix_attention_backend,     # "auto" resolved
            loss_impl=trainer.tconfig.loss_impl)
        mix = planner.SampleMix(batch.tokens.shape[1], batch.tokens.shape[0],
                                tuple(batch.image_lens.tolist()),
                                tuple(batch.text_lens.tolist()), labels=batch.num_loss_tokens)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        est = planner.memory_per_rank(planner.ModelDims.from_model_config(cfg.model), layout,
                                      mix)[stage]
        measured = sum(state.values()) + meter.peak
        detail = (f"rank {dist.get_rank()} stage {stage}: state {sum(state.values())} vs "
                  f"{est.state:.0f}, activations {meter.peak} vs {est.activations:.0f}")
        return measured, est.total, detail
    finally:
        trainer.close()
        destroy_topology()


@pytest.mark.world_size(2)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_planner_memory_within_15_percent_of_measured(layout, data_dir):
    measured, predicted, detail = measure_and_predict(tiny_overrides(data_dir) + LAYOUTS[layout])
    ok = abs(predicted - measured) <= TOLERANCE * measured
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, (ok, detail, predicted / measured))
    assert all(f[0] for f in flags), f"{layout}: " + "; ".join(
        f"{d} (ratio {r:.3f})" for _, d, r in flags)
