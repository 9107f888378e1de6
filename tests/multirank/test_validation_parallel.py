"""The validation loss under DP / TP / PP equals the single-rank computation.

DP=2: each rank recomputes the loss over the WHOLE held-out set (the single-rank batches) with a
plain forward of its full model replica; the trainer's DP-split, all-reduced value must match.
TP=2 and PP=2 shard the model, so they are compared with the DP=2 value of the same training
run (the layouts reproduce the same loss curve, tests/multirank/test_training_parallel.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from training_helpers import TINY_CONFIG, tiny_overrides

VAL_ATOL = 1e-5   # layouts reorder float sums; a dropped or doubled micro-batch moves it > 1e-2


def _trainer(sets: list[str]):
    from genlip_megatron.config import load_config
    from genlip_megatron.training.trainer import Trainer

    cfg = load_config(TINY_CONFIG, sets).validate(world_size=dist.get_world_size())
    return cfg, Trainer(cfg)


def _single_rank_value(cfg, trainer) -> float:
    """Σ loss / Σ tokens over the single-rank held-out batches, plain forward, this rank."""
    from genlip_megatron.data.heldout import build_held_out_batches
    from genlip_megatron.training.checkpointing import unwrap_model

    t = cfg.training
    held = build_held_out_batches(cfg.data, micro_batch_size=t.micro_batch_size,
                                  microbatches_per_rank=t.global_batch_size // t.micro_batch_size,
                                  iters=cfg.evaluation.iters, dp_rank=0, dp_size=1)
    module = unwrap_model(trainer.model[0]).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in (b for it in held.iterations for b in it):
            loss = module(b.tokens, b.position_ids, b.image_mask, b.segment_ids,
                          b.pixel_values, labels=b.labels).float().reshape(-1)
            mask = b.loss_mask.reshape(-1).float()
            total, tokens = total + float((loss * mask).sum()), tokens + int(mask.sum())
    module.train()
    return total / tokens


@pytest.mark.world_size(2)
def test_validation_loss_matches_single_rank_for_dp_tp_pp(data_dir):
    from genlip_megatron.training.parallel import destroy_topology

    evals = ["evaluation.interval=4", "evaluation.iters=2", "training.micro_batch_size=1",
             "training.global_batch_size=2"]
    got = {}
    for name, layout in (("dp2", []), ("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"])):
        cfg, trainer = _trainer(tiny_overrides(data_dir) + evals + layout)
        try:
            summary = trainer.train()
            if name == "dp2":
                assert len(trainer.held_out.iterations) == 2
                direct = _single_rank_value(cfg, trainer)
                assert summary.val_loss == pytest.approx(direct, abs=1e-6)
        finally:
            trainer.close()
            destroy_topology()
        got[name] = summary.val_loss
    assert abs(got["tp2"] - got["dp2"]) < VAL_ATOL, got
    assert abs(got["pp2"] - got["dp2"]) < VAL_ATOL, got
