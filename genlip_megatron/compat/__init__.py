"""The one place for workarounds of upstream CUDA assumptions (CPU runs of megatron-core).

Call :func:`apply_cpu_compat` once at start-up, before megatron's pipeline/optimizer code runs
(the trainer and tests/multirank/conftest.py do). It is a no-op when CUDA is available and
idempotent. Each group below is a small function in a sibling module whose docstring names the
upstream function it covers and carries a removal TODO; each has a unit test under
tests/unit/compat that shows the upstream failure without it.

=====================  =========================================================================
group                  what it does
=====================  =========================================================================
triton_stub            stub ``megatron.core.transformer.moe.ops.paged_stash`` (0.19: imports
                       triton unconditionally; CPU torch wheels have no triton)
jit                    ``jit_fuser`` → no-op; unwrap ``Attention._apply_output_gate`` (≈2.2 s
                       inductor compile per process and shape on CPU)
device                 ``torch.cuda.current_device()`` → cpu
rng                    megatron's CUDA RNG tracker → the CPU generator
sync                   ``torch.cuda.synchronize`` → no-op
streams                ``torch.cuda.Stream/Event/current_stream/default_stream/stream`` → inert
literals               ``device="cuda"`` in megatron's schedules/optimizer/... and
                       ``Tensor.cuda()`` → cpu
type_strings           ``param.type() == 'torch.cuda.FloatTensor'`` checks pass for CPU tensors
                       (scoped to the optimizer functions that make them)
adam_step              DistributedOptimizer + torch Adam resume: a fresh optimizer can build its
                       loading state dict, no ``KeyError: 'step'``, one ``step`` tensor per
                       param (real bugs for any run without Apex/TE)
checkpoint_queue       in-process result queue for synchronous torch_dist saves (no spawn
                       Manager: ≈5 s per process)
wgrad                  ``fused_weight_gradient_mlp_cuda`` → ``addmm_`` into ``main_grad``, so the
                       trainer can use ``gradient_accumulation_fusion`` on CPU (``wgrad.py``)
multi_tensor           megatron's Apex-less ``multi_tensor_scale`` (``copy_(src * scale)``: a
                       temporary per gradient when clipping) → in-place ``_foreach_mul_``
                       (``multi_tensor.py``)
=====================  =========================================================================

Each group applies only to the megatron-core/torch releases in :data:`SCOPES` (compat/versions.py):
outside them it is skipped, and :func:`compat_report` says why. Tested on megatron-core 0.16.1
(torch 2.13, Python 3.11) and 0.19.2 (torch 2.10, Python 3.13; .ci/newest_stack.sh).

:func:`apply_torch_adam_fixes` applies only ``adam_step``, on any device: megatron uses torch Adam
whenever Apex and TE are both missing, GPU included (``build_optimizer`` calls it then).

Layer-level CPU support (a sequence-parallel torch LayerNorm) is not a patch; it lives in
``genlip_megatron.model.norm``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

from genlip_megatron.compat._patching import PatchSet
from genlip_megatron.compat.versions import Scope

logger = logging.getLogger(__name__)

__all__ = ["apply_cpu_compat", "apply_torch_adam_fixes", "compat_report", "cpu_compat_applied",
           "cpu_compat_disabled", "GROUPS", "SCOPES"]


def _groups() -> dict[str, Callable[[PatchSet], None]]:
    # Imported lazily: importing this package must not import megatron (triton_stub must run
    # before megatron.core is imported on megatron-core ≥ 0.19 without triton).
    from genlip_megatron.compat import checkpointing, cuda, jit, multi_tensor, optimizer, wgrad

    return {
        "triton_stub": jit.stub_triton_paged_stash,
        "jit": jit.disable_jit_fuser,
        "device": cuda.patch_current_device,
        "rng": cuda.patch_cuda_rng,
        "sync": cuda.patch_synchronize,
        "streams": cuda.patch_streams,
        "literals": cuda.patch_cuda_literals,
        "type_strings": cuda.patch_type_strings,
        "adam_step": optimizer.patch_distopt_adam_step,
        "checkpoint_queue": checkpointing.fast_sync_checkpoint_writes,
        "wgrad": wgrad.install_cpu_wgrad_accumulation,
        "multi_tensor": multi_tensor.install_foreach_multi_tensor_scale,
    }


GROUPS = ("triton_stub", "jit", "device", "rng", "sync", "streams", "literals", "type_strings",
          "adam_step", "checkpoint_queue", "wgrad", "multi_tensor")
"""Group names in the order they are applied."""

_BOTH = "0.16.1 and 0.19.2 sources"
SCOPES: dict[str, Scope] = {
    # megatron 0.19 added the unconditional triton import; the group also skips itself when
    # triton is installed (CUDA torch wheels ship it).
    "triton_stub": Scope(megatron=">=0.19", checked="0.19.2 (transformer/moe/ops/paged_stash.py)"),
    # jit_fuser is torch.compile on torch >= 2.2 (megatron core/jit.py); torch.jit.script before.
    "jit": Scope(megatron=">=0.16.1", torch=">=2.2", checked=_BOTH),
    "device": Scope(megatron=">=0.16.1", checked=_BOTH + " (199 current_device() calls in 0.19.2)"),
    "rng": Scope(megatron=">=0.16.1", checked=_BOTH + " (tensor_parallel/random.py)"),
    "sync": Scope(megatron=">=0.16.1", checked=_BOTH),
    "streams": Scope(megatron=">=0.16.1", checked=_BOTH + " (0.16.1: only with overlap enabled)"),
    "literals": Scope(megatron=">=0.16.1",
                      checked=_BOTH + " (modules in cuda.LITERAL_CUDA_MODULES)"),
    "type_strings": Scope(megatron=">=0.16.1", checked=_BOTH + " (optimizer type-string checks)"),
    "adam_step": Scope(megatron=">=0.16.1", checked=_BOTH + " (distrib_optimizer 'step' blocks)"),
    "checkpoint_queue": Scope(megatron=">=0.16.1", checked=_BOTH + " (filesystem_async queue)"),
    # compat/wgrad.py: fused_weight_gradient_mlp_cuda and
    # _grad_accum_fusion_available in tensor_parallel/layers.py.
    "wgrad": Scope(megatron=">=0.16.1", checked=_BOTH + " (tensor_parallel/layers.py)"),
    # compat/multi_tensor.py: utils.local_multi_tensor_scale bound in optimizer/clip_grads.py
    # and optimizer/optimizer.py.
    "multi_tensor": Scope(megatron=">=0.16.1", checked=_BOTH + " (core/utils.py fallback)"),
}
"""Upstream releases each group applies to (:class:`~genlip_megatron.compat.versions.Scope`).

No group has an upper bound yet: every bug is still present in megatron-core 0.19.2, the newest
release (checked 2026-11-29). When upstream fixes one, bound its scope (``<0.20``) rather than
deleting the group, so older supported releases keep the workaround."""

_STATE: dict[str, PatchSet] = {}
_SKIPPED: dict[str, str] = {}


def apply_cpu_compat() -> bool:
    """Apply every CPU workaround group once; a no-op when CUDA is available.

    Returns:
        True when the workarounds are in place (CPU), False on a CUDA machine.
    """
    if torch.cuda.is_available():
        return False
    groups = _groups()
    for name in GROUPS:
        patches = _STATE.setdefault(name, PatchSet(name))
        scope = SCOPES.get(name)  # a group without a scope applies (its unit test fails)
        reason = scope.skip_reason() if scope is not None else None
        if reason is not None:
            _SKIPPED[name] = reason
            continue
        _SKIPPED.pop(name, None)
        if not patches.applied:
            groups[name](patches)
    logger.debug("genlip_megatron CPU compat applied: %s; skipped: %s",
                 [n for n in GROUPS if _STATE[n].applied], _SKIPPED)
    return True


def compat_report() -> dict[str, str]:
    """Group → ``"applied"``, ``"not needed"`` (in scope, nothing to patch on this install) or
    ``"skipped: <reason>"`` (outside its :data:`SCOPES`), for logs and the CI lanes."""
    out = {}
    for name in GROUPS:
        if name in _SKIPPED:
            out[name] = f"skipped: {_SKIPPED[name]}"
        elif name in _STATE and _STATE[name].applied:
            out[name] = "applied"
        else:
            out[name] = "not needed"
    return out


def apply_torch_adam_fixes() -> None:
    """Apply only the ``adam_step`` group, on any device (idempotent).

    megatron-core falls back to torch ``AdamW`` whenever neither Apex nor Transformer Engine is
    installed, on GPU too; its DistributedOptimizer then has the resume bugs described in
    ``compat/optimizer.py``. :func:`apply_cpu_compat` includes this group;
    ``training.parallel.build_optimizer`` calls this function whenever megatron uses torch's
    Adam, on any device.
    """
    patches = _STATE.setdefault("adam_step", PatchSet("adam_step"))
    if SCOPES["adam_step"].skip_reason() is None and not patches.applied:
        _groups()["adam_step"](patches)


def cpu_compat_applied() -> bool:
    """True when :func:`apply_cpu_compat` has run in this process (and CUDA is absent)."""
    return "device" in _STATE and _STATE["device"].applied and not torch.cuda.is_available()


@contextlib.contextmanager
def cpu_compat_disabled(*names: str) -> Iterator[None]:
    """Temporarily revert the named groups (tests use it to show why a group is needed).

    Args:
        names: group names from :data:`GROUPS`.
    """
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown compat group(s) {unknown}; choose from {list(GROUPS)}.")
    groups = _groups()
    reverted = [n for n in names if n in _STATE and _STATE[n].applied]
    for name in reversed(reverted):
        _STATE[name].revert()
    try:
        yield
    finally:
        for name in reverted:
            groups[name](_STATE[name])
