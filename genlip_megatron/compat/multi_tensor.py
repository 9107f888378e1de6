"""In-place fallback for megatron's ``multi_tensor_scale`` when Apex and TE are both missing.

Upstream: ``megatron.core.utils.local_multi_tensor_scale`` (bound as ``multi_tensor_scale_impl``
in ``optimizer/clip_grads.py`` and ``optimizer/optimizer.py`` when neither Apex's ``amp_C``
nor Transformer Engine is importable, i.e. every CPU run) does ``dst.copy_(src * scale)`` per
tensor: a fresh temporary the size of each gradient, then a copy. Gradient clipping
(``clip_grad_by_total_norm_fp32``) calls it with ``src is dst`` on every gradient, so each
clipped step allocates and writes the whole fp32 grad buffer twice — ≈ 5 % of a CPU step at
L/16 width (docs/performance.md), where a hand-written loop (``torch.nn.utils.clip_grad_norm_``)
scales in place with one ``_foreach_mul_``.

:func:`foreach_multi_tensor_scale` keeps the contract (``dst = src · scale``, same signature as
``amp_C.multi_tensor_scale`` through megatron's local applier) with one pass and no temporary.
TODO(upstream): drop when megatron-core's local fallback scales in place.
"""

from __future__ import annotations

from typing import Any

import torch

from genlip_megatron.compat._patching import PatchSet, import_or_none

__all__ = ["foreach_multi_tensor_scale", "install_foreach_multi_tensor_scale"]

_MODULES = ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer")


def foreach_multi_tensor_scale(chunk_size: int, noop_flag: Any, tensor_lists: list,
                               scale: float) -> None:
    """``dst = src · scale`` for each pair of ``tensor_lists = [srcs, dsts]``, without temporaries.

    In place (one ``_foreach_mul_``) when every destination is its source, as in clipping;
    otherwise one ``mul(out=dst)`` per pair (the result is cast to ``dst``'s dtype, as the
    ``copy_`` of the upstream fallback does).
    """
    srcs, dsts = tensor_lists
    if not dsts:
        return
    if all(s is d for s, d in zip(srcs, dsts)):
        torch._foreach_mul_(dsts, scale)
        return
    for src, dst in zip(srcs, dsts):
        if src.dtype == dst.dtype:
            torch.mul(src, scale, out=dst)
        else:
            dst.copy_(src * scale)


def install_foreach_multi_tensor_scale(patches: PatchSet) -> None:
    """Replace megatron's local ``multi_tensor_scale`` fallback where it is bound (only there:
    with Apex or TE the bound kernel is theirs and stays)."""
    from megatron.core import utils

    for name in _MODULES:
        module = import_or_none(name)
        if module is not None and \
                getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            patches.setattr(module, "multi_tensor_scale_impl", foreach_multi_tensor_scale)
