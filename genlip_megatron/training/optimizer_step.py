"""The optimizer step, skipped when a gradient is not finite, on every optimizer megatron builds.

megatron skips a step with inf/NaN gradients only inside its mixed-precision optimizers, and
only when they have a grad scaler (``MixedPrecisionOptimizer.prepare_grads`` →
``_unscale_main_grads_and_check_for_nan``); ``training/parallel.py:build_optimizer`` gives them
a constant scale of 1 for that reason (bf16, or the distributed optimizer). An fp32 run without
the distributed optimizer (the default at DP = 1, i.e. every single-process CPU run) gets
megatron's ``FP32Optimizer``, which checks nothing: a NaN gradient makes the clip coefficient
NaN (no clipping happens) and Adam writes NaN into every weight.

:func:`optimizer_step` runs megatron's own step where it checks, and otherwise megatron's own
pieces in the order of ``FP32Optimizer.step`` / ``ChainedOptimizer.step`` (``prepare_grads``,
``get_grad_norm``, ``clip_grad_by_total_norm_fp32``, ``step_with_ready_grads``) with one check
in between: the global gradient norm is finite iff every gradient is. Clipping computes that
norm anyway, so the check adds no pass over the gradients (with ``optimizer.clip_grad: 0`` the
norm is computed for the check: one pass).
"""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["optimizer_step", "checks_non_finite_grads"]


def _parts(optimizer: Any) -> list:
    """The optimizers a ``ChainedOptimizer`` holds (``[optimizer]`` for a single one)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def checks_non_finite_grads(optimizer: Any) -> bool:
    """True when megatron's own ``step()`` already skips on inf/NaN gradients (every part has
    a grad scaler, whose found-inf check runs in ``prepare_grads``)."""
    return all(getattr(part, "grad_scaler", None) is not None for part in _parts(optimizer))


def optimizer_step(optimizer: Any) -> tuple[bool, Optional[float]]:
    """One megatron optimizer step that never applies non-finite gradients.

    Args:
        optimizer: what ``get_megatron_optimizer`` returned (single or chained).

    Returns:
        ``(updated, grad_norm)``: ``updated`` is False when the step was skipped because a
        gradient is inf/NaN (the weights and optimizer state are untouched); ``grad_norm`` is
        the global norm before clipping (None when megatron did not compute one).
    """
    if checks_non_finite_grads(optimizer):
        updated, grad_norm, _ = optimizer.step()
        return bool(updated), grad_norm
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():          # FP32Optimizer: points param.grad at main_grad
        return False, None
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for part in _parts(optimizer):
        if getattr(part, "is_stub_optimizer", False) or part.config.clip_grad <= 0.0:
            continue
        params = part.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=part.config.clip_grad,
                                         total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm
