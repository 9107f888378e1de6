"""The ablation knobs ``model.gated_attention`` and ``model.qk_layernorm`` in the model.

Default path unchanged (gate on, no qk-norm); each knob changes exactly the tensors it names, is
initialised by the reference rules, and gives the same logits on every CPU attention backend.
Megatron vs HF logits and conversion: tests/unit/convert/test_convert_ablation_knobs.py; TP=2:
tests/multirank/test_model_parallel.py; TE: tests/te_standin/test_standin_layers.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from reference_genlip import make_packed_batch

KNOBS = {"no_gate": {"gated_attention": False}, "qk_norm": {"qk_layernorm": True},
         "no_gate_qk_norm": {"gated_attention": False, "qk_layernorm": True}}
ROWS = [[(2, 3, 7), (0, 0, 5), (1, 2, 6)], [(4, 2, 9), (2, 2, 12)]]


def _model(make_config, backend="dense", **knobs):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    cfg = make_config(init_std=0.2, **knobs)
    return GenLIPMegatronModel(dataclasses.replace(cfg, prefix_attention_backend=backend)).eval()


def _logits(model, b):
    with torch.no_grad():
        return model(b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"],
                     b["pixel_values"])


def test_defaults_keep_the_reference_attention(mp_state, make_config):
    cfg = make_config()
    assert cfg.attention_output_gate and not cfg.qk_layernorm
    names = dict(_model(make_config).named_parameters())
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (256, 64)
    assert not [n for n in names if "q_layernorm" in n or "k_layernorm" in n]


@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
def test_knob_changes_only_its_tensors(mp_state, make_config, knobs):
    base = dict(_model(make_config).named_parameters())
    got = dict(_model(make_config, **knobs).named_parameters())
    gated = knobs.get("gated_attention", True)
    qkv = "self_attention.linear_qkv"
    for layer in range(2):
        assert got[f"decoder.layers.{layer}.{qkv}.weight"].shape == ((4 if gated else 3) * 64, 64)
        assert got[f"decoder.layers.{layer}.{qkv}.bias"].shape == ((4 if gated else 3) * 64,)
    norms = {n for n in got if "q_layernorm" in n or "k_layernorm" in n}
    if knobs.get("qk_layernorm"):
        assert len(norms) == 2 * 2 * 2                  # layers × (q, k) × (weight, bias)
        for n in norms:
            want = torch.ones(16) if n.endswith("weight") else torch.zeros(16)   # head dim 16
            assert torch.equal(got[n].detach(), want), n
    else:
        assert not norms
    # Everything else is bit-identical to the default model (same per-tensor init seeds).
    for n, p in base.items():
        if qkv not in n or gated:
            assert torch.equal(got[n], p), n


def test_ungated_qkv_is_xavier_per_projection(mp_state, make_config):
    """q_proj is [H, H] without the gate: xavier bound sqrt(6 / 2H), not the [2H, H] one."""
    w = dict(_model(make_config, gated_attention=False).named_parameters())[
        "decoder.layers.0.self_attention.linear_qkv.weight"].detach().view(4, 3, 16, 64)
    bound_hh, bound_2hh = math.sqrt(6 / 128), math.sqrt(6 / 192)
    for j in range(3):                                  # q, k, v of every head
        part = w[:, j]
        assert part.abs().max() <= bound_hh
        assert part.abs().max() > bound_2hh             # drawn with the [H, H] bound
        assert part.std() == pytest.approx(bound_hh / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_every_cpu_backend_equals_dense(mp_state, make_config, knobs, backend):
    b = make_packed_batch(ROWS, 64, 256, seed=2)
    want = _logits(_model(make_config, **knobs), b)
    torch.testing.assert_close(_logits(_model(make_config, backend, **knobs), b), want,
                               atol=1e-4, rtol=1e-4)
    # and the knob changes the function (the test would pass vacuously otherwise)
    assert not torch.allclose(_logits(_model(make_config), b), want, atol=1e-3)
