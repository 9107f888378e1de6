"""optimizer_step: a non-finite gradient skips the step (and is counted) on every optimizer path;
finite steps equal megatron's own ``optimizer.step()``."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch

from genlip_megatron.training.optimizer_step import checks_non_finite_grads, optimizer_step

PATHS = {
    # fp32 at DP = 1: megatron's FP32Optimizer, which has no inf/NaN check of its own
    "fp32": (),
    "fp32_distopt": ("parallel.use_distributed_optimizer=true",),
    "bf16": ("precision.params_dtype=bf16",),
}


def _forward_backward(trainer) -> None:
    from genlip_megatron.training.trainer import forward_step

    batches = [next(trainer.loader) for _ in range(trainer.n_micro)]
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    seq = batches[0].tokens.shape[1]
    trainer.forward_backward(forward_step_func=partial(forward_step, device=trainer.device),
                             data_iterator=iter(batches), model=trainer.model[0],
                             num_microbatches=len(batches), seq_length=seq,
                             micro_batch_size=batches[0].tokens.shape[0],
                             decoder_seq_length=seq, forward_only=False)


def _poison_one_gradient(trainer, value: float) -> None:
    """After the backward: one entry of one weight's main_grad becomes ``value``."""
    original = trainer.forward_backward

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        weight = next(p for p in trainer.model[0].parameters() if p.dim() == 2)
        weight.main_grad.view(-1)[3] = value
        return out

    trainer.forward_backward = poisoned


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in trainer.model for p in chunk.parameters()]


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_non_finite_gradient_skips_the_step_and_is_counted(make_trainer, path, value):
    trainer = make_trainer(*PATHS[path])
    assert checks_non_finite_grads(trainer.optimizer) == (path != "fp32")
    before, lr_before = _weights(trainer), trainer.optimizer.param_groups[0]["lr"]
    _poison_one_gradient(trainer, value)
    trainer.state.step = 1
    result = trainer.train_step()
    assert result.skipped and result.reason == "non-finite gradients", result
    assert math.isfinite(result.loss)               # the loss was fine: only the gradient
    for got, want in zip(_weights(trainer), before):
        assert torch.equal(got, want)               # untouched weights
    assert trainer.totals.metrics()["train/skipped_steps_total"] == 1
    assert trainer.optimizer.param_groups[0]["lr"] == lr_before   # no scheduler step either


def test_megatron_fp32_optimizer_alone_would_apply_the_nan(make_trainer):
    """Why the check is needed: megatron's FP32Optimizer steps with a NaN gradient."""
    trainer = make_trainer()
    _forward_backward(trainer)
    weight = next(p for p in trainer.model[0].parameters() if p.dim() == 2)
    weight.main_grad.view(-1)[3] = math.nan
    updated, _, _ = trainer.optimizer.step()
    assert updated and torch.isnan(weight).any()


def test_finite_step_equals_megatron_step(make_trainer):
    """Same gradients, same starting state: the split step and megatron's step agree exactly."""
    trainer = make_trainer("optimizer.clip_grad=1e-3")   # clipping active: the split path clips
    assert not checks_non_finite_grads(trainer.optimizer)
    _forward_backward(trainer)
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    start = [(p.detach().clone(), p.main_grad.clone()) for p in params]
    inner = trainer.optimizer.optimizer                   # torch AdamW inside FP32Optimizer
    fresh_state = copy.deepcopy(inner.state_dict())
    theirs_updated, theirs_norm, _ = trainer.optimizer.step()
    theirs = _weights(trainer)
    with torch.no_grad():
        for p, (w, g) in zip(params, start):
            p.copy_(w)
            p.main_grad.copy_(g)
    inner.load_state_dict(fresh_state)
    updated, norm = optimizer_step(trainer.optimizer)
    assert updated and theirs_updated and norm == theirs_norm
    assert norm > 1e-3                                    # the clip had work to do
    for got, want in zip(_weights(trainer), theirs):
        assert torch.equal(got, want)
