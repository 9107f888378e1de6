"""GenLIP's SwiGLU module: bit-identical to megatron's unfused GLU, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from genlip_megatron.model.swiglu import SwiGLU, swiglu


def _megatron_glu(y: torch.Tensor) -> torch.Tensor:
    """megatron MLP.forward's unfused gated path (glu_linear_offset 0, no clamp)."""
    x_glu, x_linear = torch.chunk(y, 2, dim=-1)
    return F.silu(x_glu) * (x_linear + 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradient_are_megatrons_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    y = (3 * torch.randn(9, 2, 2 * 13, generator=gen)).to(dtype)
    grad = torch.randn(9, 2, 13, generator=gen).to(dtype)
    a, b = y.clone().requires_grad_(), y.clone().requires_grad_()
    ours, theirs = swiglu(a), _megatron_glu(b)
    ours.backward(grad)
    theirs.backward(grad)
    assert torch.equal(ours, theirs)
    assert torch.equal(a.grad, b.grad)
    assert a.grad.is_contiguous()


def test_module_refuses_other_activations(make_config):
    config = make_config()
    assert config.use_te_activation_func             # the CPU path uses the module slot
    SwiGLU(config)
    for change in ({"activation_func": F.gelu}, {"glu_linear_offset": 1.0},
                   {"activation_func_clamp_value": 7.0}):
        bad = copy.copy(config)                      # no __post_init__ re-validation
        for key, value in change.items():
            setattr(bad, key, value)
        with pytest.raises(ValueError, match="silu"):
            SwiGLU(bad)


def test_model_mlp_uses_it_on_cpu(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    model = GenLIPMegatronModel(make_config())
    assert all(isinstance(layer.mlp.activation_func, SwiGLU) for layer in model.decoder.layers)
