"""``load_model_state``: only missing ``*._extra_state`` entries are tolerated (issue 10, item 1).

The module below mimics Transformer Engine's ``DotProductAttention``: it has extra state that
``state_dict()`` includes and megatron's ``TEDotProductAttention.sharded_state_dict`` does not
save (the TE-backed end-to-end version is tests/te_standin/test_standin_checkpoints.py).
"""

from __future__ import annotations

import pytest
import torch

from genlip_megatron.training.checkpointing import CheckpointManager, load_model_state
from genlip_megatron.config.training import CheckpointConfig


class _CoreAttention(torch.nn.Module):
    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loaded = state


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.core_attention = _CoreAttention()


def _saved_without_extra_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def test_missing_extra_state_is_tolerated_and_weights_load():
    src, dst = _Layer(), _Layer()
    state = _saved_without_extra_state(src)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*core_attention._extra_state"):
        _Layer().load_state_dict(state)          # what a strict load did on every TE resume
    load_model_state(dst, state)
    assert torch.equal(dst.linear.weight, src.linear.weight)


def test_other_mismatches_are_still_errors():
    state = _saved_without_extra_state(_Layer())
    missing = {k: v for k, v in state.items() if k != "linear.bias"}
    with pytest.raises(RuntimeError, match=r"missing keys \['linear.bias'\]"):
        load_model_state(_Layer(), missing)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['extra.weight'\]"):
        load_model_state(_Layer(), {**state, "extra.weight": torch.zeros(1)})


def test_poll_async_without_pending_saves_is_a_no_op(tmp_path):
    manager = CheckpointManager(CheckpointConfig(save_dir=str(tmp_path)))
    manager.poll_async()  # no queue yet: no collective, no error
    assert manager._async_queue is None
