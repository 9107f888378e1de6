"""convert/megatron_io.py on both torch generations: ``no_dist`` only where DCP has it."""

from __future__ import annotations

import inspect

import pytest
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from genlip_megatron.compat.versions import torch_at_least
from genlip_megatron.convert import megatron_io
from genlip_megatron.convert.registry import ConversionError


def test_no_dist_threshold_matches_the_installed_torch():
    """DCP_NO_DIST_TORCH is right for this torch: the argument exists iff torch is new enough."""
    has = {"no_dist" in inspect.signature(fn).parameters for fn in (dcp_save, dcp_load)}
    assert has == {torch_at_least(megatron_io.DCP_NO_DIST_TORCH)}


def test_new_torch_reads_in_one_process_even_inside_a_process_group(gloo_world, monkeypatch):
    monkeypatch.setattr(megatron_io, "torch_at_least", lambda version: True)
    assert megatron_io._one_process_dcp_kwargs() == {"no_dist": True}


def test_old_torch_without_process_group_needs_no_argument(monkeypatch):
    monkeypatch.setattr(megatron_io, "torch_at_least", lambda version: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert megatron_io._one_process_dcp_kwargs() == {}


def test_old_torch_inside_a_process_group_is_refused_clearly(gloo_world, monkeypatch):
    """torch 2.6 DCP would run collectives over the world group (a hang): a clear error."""
    monkeypatch.setattr(megatron_io, "torch_at_least", lambda version: False)
    with pytest.raises(ConversionError, match=r"needs torch >= 2\.7 .*no_dist"):
        megatron_io._one_process_dcp_kwargs()
