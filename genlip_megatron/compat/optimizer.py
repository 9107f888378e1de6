"""Fix for megatron-core's DistributedOptimizer checkpoint load with torch Adam (no Apex/TE).

Without Apex or Transformer Engine megatron uses ``torch.optim.AdamW``, whose per-parameter state
has a ``step`` tensor besides ``exp_avg``/``exp_avg_sq``. Two bugs follow (megatron-core 0.16.1 and
0.19.2; docs/design.md, CPU workarounds):

1. ``DistributedOptimizer.load_state_dict`` builds ONE ``step`` tensor and assigns it to every
   parameter's state, so after a resume AdamW's in-place ``step += 1`` advances it once per
   parameter per iteration and bias correction is silently wrong.
2. ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every state tensor from
   the checkpoint's per-parameter dict, which has no ``step``: ``KeyError: 'step'`` (0.19.2) or
   ``copy_(None)`` (0.16.1) when loading a ``fully_reshardable`` checkpoint.
3. ``DistributedOptimizer.state_dict`` reads ``step`` from every parameter state and asserts
   they agree; a fresh optimizer (the normal state when resuming: ``sharded_state_dict(...,
   is_loading=True)`` calls it first) has no state, or only megatron's ``init_state_fn``
   ``exp_avg``/``exp_avg_sq`` without ``step``: ``AssertionError`` / ``KeyError: 'step'``.

Any GPU run without TE/Apex has the same bugs, so this group is applied whenever megatron uses
torch's Adam (:func:`megatron_uses_torch_adam`; ``training.parallel.build_optimizer`` checks it
on every device); ``apply_cpu_compat`` also applies it on CPU.
"""

from __future__ import annotations

import functools
import importlib

import torch

from genlip_megatron.compat._patching import PatchSet, resolve

_DISTOPT = "megatron.core.optimizer.distrib_optimizer"


def megatron_uses_torch_adam() -> bool:
    """True when megatron-core's optimizer factory falls back to torch's Adam/AdamW.

    megatron picks ``FusedAdam`` from TE, else from Apex, else ``torch.optim.AdamW``
    (``megatron/core/optimizer/__init__.py``: ``USING_PYTORCH_OPTIMIZER``).
    """
    megatron_optimizer = importlib.import_module("megatron.core.optimizer")
    return bool(getattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", False))


def _own_step_tensors(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter state its own ``step`` tensor (same value)."""
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.detach().clone()


def _scalar_step_zero() -> torch.Tensor:
    get_dtype = getattr(importlib.import_module("torch.optim.optimizer"), "_get_scalar_dtype", None)
    return torch.tensor(0.0, dtype=get_dtype() if get_dtype else torch.float32)


def _ensure_step_states(optimizer: torch.optim.Optimizer, init_state_fn, config) -> None:
    """Allocate a never-stepped torch Adam's states as Adam itself would (step 0, zero moments)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [p for p in params if "step" not in optimizer.state.get(p, {})]
    if not missing:
        return
    if any(len(optimizer.state.get(p, {})) == 0 for p in missing) and init_state_fn is not None:
        init_state_fn(optimizer, config)
    for p in missing:
        state = optimizer.state[p]
        if "exp_avg" in state:  # Adam skips its lazy init for non-empty states: complete them
            state["step"] = _scalar_step_zero()


def _state_dict_of_fresh_optimizer(state_dict_fn):
    @functools.wraps(state_dict_fn)
    def wrapper(self):
        inner = getattr(self, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            _ensure_step_states(inner, getattr(self, "init_state_fn", None),
                                getattr(self, "config", None))
        return state_dict_fn(self)

    wrapper.__genlip_compat__ = True  # type: ignore[attr-defined]
    return wrapper


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
    ``DistributedOptimizer._set_main_param_and_optimizer_states`` (``KeyError: 'step'``) and
    ``DistributedOptimizer.state_dict`` of a never-stepped optimizer (``assert len(steps) == 1``).

    Only torch ``Adam``/``AdamW`` states are touched (megatron uses them without Apex/TE).

    TODO(upstream): remove when megatron-core clones the step per parameter, skips states absent
    from the checkpoint and handles never-stepped torch Adam (all still present in 0.19.2).
    """
    for qualname, make in (("DistributedOptimizer.state_dict", _state_dict_of_fresh_optimizer),
                           ("DistributedOptimizer.load_state_dict",
                            _load_state_dict_with_own_steps),
                           ("DistributedOptimizer._set_main_param_and_optimizer_states",
                            _set_states_keeping_missing)):
        owner, attr, raw = resolve(_DISTOPT, qualname)
        if callable(raw) and not getattr(raw, "__genlip_compat__", False):
            patches.setattr(owner, attr, make(raw))
