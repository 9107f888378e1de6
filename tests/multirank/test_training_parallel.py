"""Training under TP / SP / PP (1F1B and interleaved) / DP / distributed optimizer on gloo.

The oracle: every layout reproduces the single-rank golden loss curve of the tiny config
(tests/assets/losses/tiny_train_cpu.txt) with the same global batch — the tiny config reads
the DP-invariant global sample stream, so every layout sees the same global batches.
Also: resume under a changed TP/PP layout continues the curve.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from training_helpers import TINY_CONFIG, assert_losses_close, read_golden, \
    tiny_overrides


def shared_dir(name: str) -> Path:
    """A directory every rank agrees on (rank 0 wipes it first)."""
    path = Path(os.environ.get("GENLIP_TEST_TMP", "/tmp/genlip_test")) / name
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    return path


def train_inprocess(sets: list[str]) -> dict[int, float]:
    """Build and run the Trainer in this process; returns step → global loss."""
    from genlip_megatron.config import load_config
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer

    cfg = load_config(TINY_CONFIG, sets).validate(world_size=dist.get_world_size())
    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
        destroy_topology()
    return {step: loss for step, loss, skipped in summary.losses if not skipped}


LAYOUTS_2 = {
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sp=true"],
    "pp2": ["parallel.pp=2"],
    "pp2_vpp2_interleaved": ["parallel.pp=2", "parallel.vpp=2"],
    "dp2": [],
    "dp2_distopt": ["parallel.use_distributed_optimizer=true"],
    "dp2_distopt_overlap": ["parallel.use_distributed_optimizer=true",
                            "parallel.overlap_grad_reduce=true",
                            "parallel.overlap_param_gather=true"],
    "tp2_recompute_full": ["parallel.tp=2", "parallel.recompute.granularity=full"],
    "pp2_recompute_selective": ["parallel.pp=2", "parallel.recompute.granularity=selective"],
}


@pytest.mark.world_size(2)
@pytest.mark.parametrize("layout", sorted(LAYOUTS_2))
def test_layout_matches_single_rank_golden(layout, data_dir):
    losses = train_inprocess(tiny_overrides(data_dir) + LAYOUTS_2[layout])
    assert_losses_close(losses, read_golden(), what=layout)


LAYOUTS_4 = {
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp2_sp_dp2_distopt": ["parallel.tp=2", "parallel.sp=true",
                           "parallel.use_distributed_optimizer=true"],
}


@pytest.mark.world_size(4)
@pytest.mark.parametrize("layout", sorted(LAYOUTS_4))
def test_layout_matches_single_rank_golden_4ranks(layout, data_dir):
    losses = train_inprocess(tiny_overrides(data_dir) + LAYOUTS_4[layout])
    assert_losses_close(losses, read_golden(), what=layout)


@pytest.mark.world_size(2)
def test_resume_under_changed_tp_pp_layout(data_dir):
    """Save at TP=2 (distributed optimizer state included), resume at PP=2 from step 4."""
    save = shared_dir("reshard_resume")
    first = train_inprocess(tiny_overrides(data_dir, save) + [
        "parallel.tp=2", "training.train_steps=8", "checkpoint.save_interval=4"])
    if dist.get_rank() == 0:  # roll back to the step-4 checkpoint
        shutil.rmtree(save / "iter_0000008")
        (save / "latest").write_text("iter_0000004\n")
    dist.barrier()
    resumed = train_inprocess(tiny_overrides(data_dir, save) + ["parallel.pp=2"])
    assert sorted(resumed) == [5, 6, 7, 8]
    golden = read_golden()
    assert_losses_close(resumed, {s: golden[s] for s in resumed}, what="TP2 → PP2 resume")
    assert_losses_close(first, golden, what="TP2 first run")


@pytest.mark.world_size(2)
def test_non_finite_loss_skips_steps_then_stops_naming_the_step(data_dir, monkeypatch):
    """Steps with a NaN loss leave the weights untouched; K in a row stop the run."""
    import math

    import torch

    from genlip_megatron.config import load_config
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer, TrainingAborted

    cfg = load_config(TINY_CONFIG, tiny_overrides(data_dir) + [
        "parallel.pp=2", "training.max_bad_steps=2"]).validate(world_size=2)
    trainer = Trainer(cfg)
    real = trainer._global_loss
    poisoned = {3, 4}

    def global_loss(reports):
        loss, tokens = real(reports)
        return (math.nan if trainer.state.step in poisoned else loss), tokens

    monkeypatch.setattr(trainer, "_global_loss", global_loss)
    try:
        for _ in range(2):
            trainer.state.step += 1
            assert not trainer.train_step().skipped
        before = [p.detach().clone() for p in trainer.model[0].parameters()]
        lr_before = trainer.optimizer.param_groups[0]["lr"]
        trainer.state.step += 1
        result = trainer.train_step()
        assert result.skipped and result.reason == "non-finite loss"
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model[0].parameters()))
        assert trainer.optimizer.param_groups[0]["lr"] == lr_before  # scheduler held back
        trainer.state.step += 1
        with pytest.raises(TrainingAborted, match="stopping at step 4: 2 consecutive skipped"):
            trainer.train_step()
    finally:
        trainer.close()
        destroy_topology()


@pytest.mark.world_size(2)
def test_fp8_emulation_moves_the_curve_a_little(data_dir):
    """Emulated FP8 linears (E4M3 forward, E5M2 grads) train close to, not on, the fp32 curve."""
    losses = train_inprocess(tiny_overrides(data_dir) + [
        "precision.fp8={emulate: true, recipe: tensorwise, format: hybrid}"])
    golden = read_golden()
    diffs = [abs(losses[s] - golden[s]) for s in golden]
    assert max(diffs) > 1e-4, "FP8 emulation had no effect on the loss"
    assert max(diffs) < 0.1, f"FP8 emulation diverged from the fp32 curve: {diffs}"
    assert losses[8] < losses[1] - 0.3


def sink_after_one_step(data_dir, layout: list[str]) -> dict[str, float]:
    from genlip_megatron.config import load_config
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer

    cfg = load_config(TINY_CONFIG, tiny_overrides(data_dir) + layout)
    trainer = Trainer(cfg.validate(world_size=dist.get_world_size()))
    try:
        trainer.state.step = 1
        trainer.train_step()
        return trainer.attention_sink()
    finally:
        trainer.close()
        destroy_topology()


@pytest.mark.world_size(2)
def test_attention_sink_metric_is_layout_invariant(data_dir):
    """Per-layer sink mass gathered over TP heads and PP stages agrees between layouts."""
    by_tp = sink_after_one_step(data_dir, ["parallel.tp=2"])
    by_pp = sink_after_one_step(data_dir, ["parallel.pp=2"])
    assert sorted(by_tp) == sorted(by_pp)
    assert len(by_tp) == 4 + 1  # four layers and their mean
    for key, value in by_tp.items():
        assert 0.0 < value < 1.0, (key, value)
        assert abs(value - by_pp[key]) < 1e-5, (key, value, by_pp[key])


@pytest.mark.world_size(2)
@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_run_totals_count_every_data_parallel_rank(layout, data_dir):
    """The label histogram behind unigram_loss and the consumed counters sum over DP ranks
    (not only the logging rank's labels): its total equals the global loss-token count."""
    from megatron.core import parallel_state

    from genlip_megatron.config import load_config
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer

    cfg = load_config(TINY_CONFIG, tiny_overrides(data_dir) + LAYOUTS_2[layout] +
                      ["training.train_steps=3"]).validate(world_size=2)
    trainer = Trainer(cfg)
    local = torch.zeros(2, dtype=torch.int64)   # this rank's samples, tokens
    count_batch = trainer.totals.add_batch

    def counting(samples, tokens, *args):
        local.add_(torch.tensor([samples, tokens]))
        count_batch(samples, tokens, *args)

    trainer.totals.add_batch = counting
    try:
        loss_tokens = 0
        while trainer.state.step < 3:
            trainer.state.step += 1
            loss_tokens += trainer.train_step().loss_tokens
        trainer._sync_totals()
        extra = trainer.state.extra
        assert int(extra["label_counts"].sum()) == loss_tokens
        dist.all_reduce(local, group=parallel_state.get_data_parallel_group())
        assert local[0] > 0 and extra["skipped_steps"] == 0
        assert [extra["consumed_samples"], extra["consumed_tokens"]] == local.tolist()
    finally:
        trainer.close()
        destroy_topology()


@pytest.mark.world_size(2)
def test_ablation_knobs_train_alike_under_dp_tp_and_resume_under_pp(data_dir):
    """Both knobs on (no gate, QK LayerNorm): TP=2 (megatron sums the q/k-norm grads over TP
    by name in finalize_model_grads) follows the DP=2 curve (= single rank, dp-invariant data),
    and a TP=2 checkpoint resumes at PP=2 on the same curve."""
    knobs = ["model.gated_attention=false", "model.qk_layernorm=true"]
    dp2 = train_inprocess(tiny_overrides(data_dir) + knobs)
    golden = read_golden()
    assert sorted(dp2) == sorted(golden) and dp2[max(dp2)] < dp2[min(dp2)]   # it trains
    assert any(abs(dp2[s] - golden[s]) > 1e-3 for s in dp2)   # and the knobs took effect
    save = shared_dir("knobs_resume")
    tp2 = train_inprocess(tiny_overrides(data_dir, save) + knobs + [
        "parallel.tp=2", "checkpoint.save_interval=4"])
    assert_losses_close(tp2, dp2, what="knobs TP2 vs DP2")
    if dist.get_rank() == 0:  # roll back to the step-4 checkpoint
        shutil.rmtree(save / "iter_0000008")
        (save / "latest").write_text("iter_0000004\n")
    dist.barrier()
    resumed = train_inprocess(tiny_overrides(data_dir, save) + knobs + ["parallel.pp=2"])
    assert sorted(resumed) == [5, 6, 7, 8]
    assert_losses_close(resumed, {s: dp2[s] for s in resumed}, what="knobs TP2 → PP2 resume")
