"""The in-loop validation loss: a direct token-weighted computation, deterministic, harmless
to training, logged to the JSONL and reported in the run summary."""

from __future__ import annotations

import json

import pytest
import torch

from training_helpers import TINY_CONFIG, tiny_overrides


def direct_validation_loss(trainer) -> float:
    """Σ token losses / Σ loss tokens over every held-out micro-batch, plain forward."""
    from genlip_megatron.training.checkpointing import unwrap_model

    module = unwrap_model(trainer.model[0])
    module.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batches in trainer.held_out.iterations:
            for b in batches:
                per_token = module(b.tokens, b.position_ids, b.image_mask, b.segment_ids,
                                   b.pixel_values, labels=b.labels)
                mask = b.loss_mask.reshape(-1).float()
                total += float((per_token.float().reshape(-1) * mask).sum())
                tokens += int(mask.sum())
    module.train()
    return total / tokens


def test_validation_loss_is_the_token_weighted_mean_and_repeats(make_trainer):
    trainer = make_trainer("evaluation.interval=2", "evaluation.iters=2",
                           "training.micro_batch_size=1", "training.global_batch_size=2")
    assert [len(it) for it in trainer.held_out.iterations] == [2, 2]
    first = trainer.validate()
    assert first["tokens/val"] == sum(int(b.loss_mask.sum()) for it in
                                      trainer.held_out.iterations for b in it)
    assert first["loss/val"] == pytest.approx(direct_validation_loss(trainer), abs=1e-6)
    assert trainer.validate()["loss/val"] == first["loss/val"]   # same rows, same weights
    assert all(chunk.training for chunk in trainer.model)        # back in training mode


def test_validation_runs_at_the_interval_and_the_end(make_trainer, tmp_path):
    trainer = make_trainer("evaluation.interval=3", "evaluation.iters=1",
                           f"logging.jsonl_path={tmp_path}/m.jsonl")
    summary = trainer.train()
    trainer.metrics.close()
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss/val"] for r in recs if "loss/val" in r}
    assert sorted(val) == [3, 6, 8]                   # every 3 steps and after the last (8)
    assert val[8] < val[3]                             # the model learns the held-out captions
    assert summary.val_loss == val[8] == pytest.approx(direct_validation_loss(trainer),
                                                       abs=1e-6)


def test_interval_without_held_out_sources_is_a_config_error(data_dir):
    from genlip_megatron.config import load_config
    from genlip_megatron.config.loader import ConfigError

    sets = [s for s in tiny_overrides(data_dir) if not s.startswith("data.eval_sources")]
    cfg = load_config(TINY_CONFIG, sets + ["evaluation.interval=5"])
    with pytest.raises(ConfigError, match="evaluation.interval"):
        cfg.validate(world_size=1)
