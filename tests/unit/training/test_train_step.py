"""One training step on a single rank, checked against plain autograd: loss normalisation over
micro-batches with unequal loss-token counts, and gradient clipping bounding the update."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch


def test_loss_is_the_global_token_mean_over_unequal_micro_batches(make_trainer):
    from genlip_megatron.training.checkpointing import unwrap_model
    from genlip_megatron.training.trainer import forward_step

    trainer = make_trainer()
    batches = [next(trainer.loader) for _ in range(trainer.n_micro)]
    counts = [int(b.loss_mask.sum()) for b in batches]
    assert len(batches) == 2 and counts[0] != counts[1], counts
    ddp, module = trainer.model[0], unwrap_model(trainer.model[0])
    ddp.zero_grad_buffer()
    seq = batches[0].tokens.shape[1]
    trainer.forward_backward(forward_step_func=partial(forward_step, device=trainer.device),
                             data_iterator=iter(batches), model=ddp, num_microbatches=2,
                             seq_length=seq, micro_batch_size=batches[0].tokens.shape[0],
                             decoder_seq_length=seq, forward_only=False)
    got = {n: p.main_grad.detach().clone() for n, p in module.named_parameters()}
    # The plain-autograd reference must see real weight gradients: with the (CPU) fused wgrad
    # path on, megatron's linears add them into main_grad and hand autograd a placeholder.
    for layer in module.modules():
        if getattr(layer, "gradient_accumulation_fusion", False):
            layer.gradient_accumulation_fusion = False

    def token_loss_sums():
        return [(module(b.tokens, b.position_ids, b.image_mask, b.segment_ids, b.pixel_values,
                        labels=b.labels).float() * b.loss_mask).sum() for b in batches]

    global_mean = sum(token_loss_sums()) / sum(counts)
    want = torch.autograd.grad(global_mean, list(module.parameters()))
    sums = token_loss_sums()
    per_batch_mean = (sums[0] / counts[0] + sums[1] / counts[1]) / 2   # the tempting mistake
    wrong = torch.autograd.grad(per_batch_mean, list(module.parameters()))
    gap = max((w - g).abs().max().item() for w, g in zip(wrong, want))
    scale = max(w.abs().max().item() for w in want)
    assert gap > 1e-3 * scale, (gap, scale)  # ≫ the tolerance below: the test can tell them apart
    for (name, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5, msg=name)


def test_a_tiny_clip_bounds_the_update(make_trainer):
    clip = 1e-3
    # adam_eps ≫ |g| makes Adam's first update lr·g/(|g| + eps) ≈ lr·g: its norm shows the
    # clipped gradient norm; weight decay off so nothing else moves the weights.
    trainer = make_trainer(f"optimizer.clip_grad={clip}", "optimizer.adam_eps=1.0",
                           "optimizer.weight_decay=0.0", "scheduler.warmup_steps=0")
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    before = [p.detach().clone() for p in params]
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.state.step = 1
    result = trainer.train_step()
    assert not result.skipped and result.grad_norm > 100 * clip   # clipping had work to do
    moved = math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(params, before)))
    assert moved == pytest.approx(lr * clip, rel=5e-3), (moved, lr, result.grad_norm)
