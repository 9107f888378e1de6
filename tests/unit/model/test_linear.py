"""Bias-in-GEMM linears: the same outputs and gradients as megatron's own linears."""

from __future__ import annotations

import contextlib

import copy

import pytest
import torch


def _pair(config, kind: str, skip_bias_add: bool):
    """(ours, megatron's) linear of one kind with identical weights; ours folds the bias."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from genlip_megatron.model.linear import BiasGemmColumnParallelLinear, \
        BiasGemmRowParallelLinear

    ours_cls, theirs_cls = {"column": (BiasGemmColumnParallelLinear, ColumnParallelLinear),
                            "row": (BiasGemmRowParallelLinear, RowParallelLinear)}[kind]
    extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True}
    theirs_cfg = copy.copy(config)
    theirs_cfg.fold_bias_into_gemm = False
    made = []
    for cls, cfg in ((ours_cls, config), (theirs_cls, theirs_cfg)):
        torch.manual_seed(0)
        layer = cls(12, 10, config=cfg, init_method=torch.nn.init.normal_, bias=True,
                    skip_bias_add=skip_bias_add, **extra)
        with torch.no_grad():
            layer.bias.normal_()                     # megatron initialises biases to zero
        made.append(layer)
    return made


def _run(layer, x, dy):
    x = x.clone().requires_grad_()
    out, bias = layer(x)
    if bias is not None:                             # what megatron's callers do with it
        out = out + bias
    out.backward(dy)
    return out, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_outputs_and_gradients_equal_megatron(mp_state, make_config, kind, skip_bias_add):
    config = make_config()
    assert config.fold_bias_into_gemm               # the CPU path turns it on
    ours, theirs = _pair(config, kind, skip_bias_add)
    assert ours.fold_bias
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(7, 2, 12, generator=gen), torch.randn(7, 2, 10, generator=gen)
    _, returned_bias = ours(x)
    assert returned_bias is None                     # nothing left for the caller to add
    for got, want in zip(_run(ours, x, dy), _run(theirs, x, dy)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("saved_tensor_copies", [False, True])
def test_weight_gradient_accumulates_into_main_grad(mp_state, make_config, saved_tensor_copies):
    """With gradient_accumulation_fusion (DDP-wrapped): main_grad += dYᵀX, a placeholder grad.

    Also under a saved-tensor hook that unpacks copies (activation offload, the sweep's memory
    meter): the unpacked weight has no ``main_grad`` of its own (the sweep crashed on it)."""
    config = make_config()
    config.gradient_accumulation_fusion = True
    ours, _ = _pair(config, "column", skip_bias_add=False)
    start = torch.randn(10, 12)
    ours.weight.main_grad = start.clone()
    ours.weight.grad_added_to_main_grad = False      # what megatron DDP sets up
    gen = torch.Generator().manual_seed(2)
    x, dy = torch.randn(5, 1, 12, generator=gen), torch.randn(5, 1, 10, generator=gen)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach().clone(), lambda t: t) \
        if saved_tensor_copies else contextlib.nullcontext()
    main_grad = ours.weight.main_grad
    with hooks:
        out, _ = ours(x)
    out.backward(dy)
    want = start + dy.reshape(-1, 10).t() @ x.reshape(-1, 12)
    torch.testing.assert_close(main_grad, want)
    if saved_tensor_copies:   # as megatron's linear: no flag on the copy, no placeholder grad
        assert ours.weight.grad is None
    else:
        assert ours.weight.grad_added_to_main_grad
    torch.testing.assert_close(ours.bias.grad, dy.reshape(-1, 10).sum(0))


def test_off_path_and_sequence_parallel_keep_megatron(mp_state, make_config):
    config = make_config()
    config.fold_bias_into_gemm = False               # the GPU setting
    ours, _ = _pair(config, "column", skip_bias_add=True)
    assert not ours.fold_bias and ours.skip_bias_add
    _, bias = ours(torch.randn(3, 1, 12))
    assert bias is ours.bias                         # megatron's contract, unchanged
    config = make_config()
    config.sequence_parallel = True
    row, _ = _pair(config, "row", skip_bias_add=True)
    assert not row.fold_bias                         # bias is added after the reduce-scatter


def test_newer_megatron_keywords_take_the_fast_path_only_when_inactive():
    from genlip_megatron.model.linear import _fast_path

    weight = torch.nn.Parameter(torch.ones(2, 2))
    assert _fast_path(weight, False, None, {})
    assert _fast_path(weight, False, None, {"gtp_remat_size": 1})     # megatron-core 0.19 default
    assert not _fast_path(weight, False, None, {"gtp_remat_size": 2})
    assert not _fast_path(weight, False, None, {"some_new_option": True})
    assert not _fast_path(weight, True, None, {})                      # sequence parallel
    assert not _fast_path(torch.ones(2, 2), False, None, {})           # frozen weight
