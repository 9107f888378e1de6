"""Fix for megatron-core's DistributedOptimizer checkpoint load with torch Adam (no Apex/TE).

Without Apex or Transformer Engine megatron uses ``torch.optim.AdamW``, whose per-parameter state
has a ``step`` tensor besides ``exp_avg``/``exp_avg_sq``. Two bugs follow (megatron-core 0.16.1 and
0.19.2; shared/reference/megatron-core-on-cpu.md §3.3):

1. ``DistributedOptimizer.load_state_dict`` builds ONE ``step`` tensor and assigns it to every
   parameter's state, so after a resume AdamW's in-place ``step += 1`` advances it once per
   parameter per iteration and bias correction is silently wrong.
2. ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every state tensor from
   the checkpoint's per-parameter dict, which has no ``step``: ``KeyError: 'step'`` (0.19.2) or
   ``copy_(None)`` (0.16.1) when loading a ``fully_reshardable`` checkpoint.

Any GPU run without TE/Apex has the same bugs, so this group is applied whenever megatron uses
torch's Adam; ``apply_cpu_compat`` applies it on CPU.
"""

from __future__ import annotations

import functools

import torch

from genlip_megatron.compat._patching import PatchSet, resolve

_DISTOPT = "megatron.core.optimizer.distrib_optimizer"


def _own_step_tensors(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter state its own ``step`` tensor (same value)."""
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.detach().clone()


def _load_state_dict_with_own_steps(load_state_dict):
    @functools.wraps(load_state_dict)
    def wrapper(self, state_dict):
        out = load_state_dict(self, state_dict)
        inner = getattr(self, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            _own_step_tensors(inner)
        return out

    wrapper.__genlip_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def _set_states_keeping_missing(set_states):
    @functools.wraps(set_states)
    def wrapper(self, model_param, tensors):
        if not getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            current = self.optimizer.state.get(main_param, {})
            # States the checkpoint dict does not carry (torch Adam's "step") keep their value:
            # copying a tensor onto itself is a no-op.
            tensors = dict(tensors)
            for key, value in current.items():
                if torch.is_tensor(value) and not torch.is_tensor(tensors.get(key)):
                    tensors[key] = value
        return set_states(self, model_param, tensors)

    wrapper.__genlip_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def patch_distopt_adam_step(patches: PatchSet) -> None:
    """Per-parameter Adam ``step`` tensors after ``DistributedOptimizer.load_state_dict``.

    Covers ``optimizer/distrib_optimizer.py`` ``DistributedOptimizer.load_state_dict`` (the
    ``# Extract 'step', for non-Apex/TE support.`` block: one shared tensor) and
    ``DistributedOptimizer._set_main_param_and_optimizer_states`` (``KeyError: 'step'``).

    TODO(upstream): remove when megatron-core clones the step per parameter and skips states
    absent from the checkpoint (both still present in 0.19.2).
    """
    for qualname, make in (("DistributedOptimizer.load_state_dict",
                            _load_state_dict_with_own_steps),
                           ("DistributedOptimizer._set_main_param_and_optimizer_states",
                            _set_states_keeping_missing)):
        owner, attr, raw = resolve(_DISTOPT, qualname)
        if callable(raw) and not getattr(raw, "__genlip_compat__", False):
            patches.setattr(owner, attr, make(raw))
