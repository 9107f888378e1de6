"""Reference initialisation (docs/reference-architecture.md): per-tensor rules, TP slicing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from genlip_megatron.model import init as ginit

NORMAL = ("linear_fc1.weight", "linear_fc2.weight", "word_embeddings.weight",
          "output_layer.weight", "patch_embed.weight", "in_proj.weight", "output_proj.weight")


@pytest.fixture
def model(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    return GenLIPMegatronModel(make_config())


def test_rules(model):
    H, n, d, std = 64, 4, 16, 0.02
    seen = set()
    for name, p in model.named_parameters():
        p = p.detach()
        if name.endswith("layer_scale"):
            assert torch.all(p == 0.1), name
        elif name.endswith("layernorm.weight"):
            assert torch.all(p == 1.0), name
        elif name.endswith("bias"):
            assert torch.all(p == 0.0), name
        elif name.endswith("linear_qkv.weight"):
            per_head = p.view(n, 4, d, H)                       # [q, gate, k, v] per head
            qg, kv = per_head[:, :2], per_head[:, 2:]
            bound_qg, bound_kv = math.sqrt(6 / (3 * H)), math.sqrt(6 / (2 * H))
            assert qg.abs().max() <= bound_qg < kv.abs().max() <= bound_kv
            assert qg.abs().max() > 0.97 * bound_qg and kv.abs().max() > 0.97 * bound_kv
        elif name.endswith("linear_proj.weight"):
            bound = math.sqrt(6 / (2 * H))
            assert 0.97 * bound < p.abs().max() <= bound
        elif name.endswith(NORMAL):
            assert abs(p.mean()) < 0.1 * std and abs(p.std() / std - 1) < 0.1, name
        else:
            raise AssertionError(f"unchecked parameter {name}")
        seen.add(name.split(".")[-1])
    assert {"layer_scale", "weight", "bias"} <= seen


def test_deterministic_and_seeded_by_config(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    torch.manual_seed(0)
    a = GenLIPMegatronModel(make_config())
    torch.manual_seed(999)                    # the global generator does not matter
    b = GenLIPMegatronModel(make_config())
    c = GenLIPMegatronModel(make_config(init_seed=7))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.unique().numel() > 1:                   # random tensors only
            assert not torch.equal(pa, pc), name


def test_bf16_params_are_the_rounded_fp32_init(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    fp32 = GenLIPMegatronModel(make_config())
    bf16 = GenLIPMegatronModel(make_config(params_dtype="bf16"))
    for (name, p32), p16 in zip(fp32.named_parameters(), bf16.parameters()):
        assert p16.dtype == torch.bfloat16 and torch.equal(p32.to(torch.bfloat16), p16), name


@pytest.mark.parametrize("stride", [1, 2])
def test_shard_matches_megatron_cpu_init_slicing(mp_state, stride):
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    full = torch.arange(24.0).view(8, 3)
    for rank in range(2):
        local = torch.empty(4, 3)
        _initialize_affine_weight_cpu(local, 8, 3, 4, 0, lambda w: w.copy_(full), stride=stride,
                                      rank=rank, world_size=2)
        assert torch.equal(ginit._shard(full, 0, stride, rank, 2), local)


def test_names_and_unknown_parameters():
    assert ginit.global_param_name("decoder.layers.1.mlp.linear_fc1.weight", [5, 6]) == \
        "decoder.layers.5.mlp.linear_fc1.weight"
    assert ginit.global_param_name("output_layer.weight", [5, 6]) == "output_layer.weight"
    kind, shape, dim, stride = ginit.full_shape_and_sharding(
        "decoder.layers.0.mlp.linear_fc1.weight", torch.Size([176, 64]), 2)
    assert (kind, shape, dim, stride) == ("normal", (352, 64), 0, 2)
    with pytest.raises(RuntimeError, match="no reference initialisation rule"):
        ginit.full_shape_and_sharding("decoder.layers.0.new_thing.scale", torch.Size([4]), 1)


def test_perform_initialization_false_keeps_megatron_init(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    cfg = dataclasses.replace(make_config(), perform_initialization=False)
    model = GenLIPMegatronModel(cfg)          # no reference init: layer scale still 0.1 (ctor)
    assert all(torch.all(m.layer_scale == 0.1) for m in model.modules()
               if hasattr(m, "layer_scale"))
