"""LayerScale + DropPath residual, SP-capable LayerNorm, layer spec and checkpoint keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from genlip_megatron.model.norm import GenLIPLayerNorm
from genlip_megatron.model.transformer_layer import DropPath, LayerScaleDropPathAdd, drop_path


def _cfg(**kw):
    base = dict(hidden_size=8, layerscale_init=0.1, drop_path_rate=0.0, params_dtype=torch.float32,
                sequence_parallel=False, normalization="LayerNorm")
    return SimpleNamespace(**{**base, **kw})


def test_drop_path_drops_whole_rows_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(5, 400, 3)                                 # [S, B, H]
    y = drop_path(x, 0.25, training=True)
    per_row = y.transpose(0, 1).reshape(400, -1)
    kept = per_row[:, 0] != 0
    assert torch.all(per_row[kept] == 1 / 0.75) and torch.all(per_row[~kept] == 0)
    assert 0.65 < kept.float().mean() < 0.85                  # about 1 - rate
    assert drop_path(x, 0.25, training=False) is x
    assert drop_path(x, 0.0, training=True) is x


def test_layer_scale_residual_add():
    module = LayerScaleDropPathAdd(_cfg())
    with torch.no_grad():
        module.layer_scale.copy_(torch.arange(8.0))
    x, bias, residual = torch.randn(3, 2, 8), torch.randn(8), torch.randn(3, 2, 8)
    out = module(False, False)((x, bias), residual, 0.0)
    torch.testing.assert_close(out, residual + torch.arange(8.0) * (x + bias))
    out = module(False, False)((x, None), residual, 0.0)
    torch.testing.assert_close(out, residual + torch.arange(8.0) * x)


def test_drop_path_in_residual_is_per_row_and_training_only():
    module = LayerScaleDropPathAdd(_cfg(drop_path_rate=0.5))
    x, residual = torch.ones(3, 64, 8), torch.zeros(3, 64, 8)
    torch.manual_seed(1)
    out = module(True, False)((x, None), residual, 0.0)
    rows = out[0, :, 0]
    kept = rows != 0
    torch.testing.assert_close(rows[kept], torch.full_like(rows[kept], 0.1 / 0.5))
    assert 0 < kept.sum() < 64
    assert torch.all(out == out[:1])                          # same decision along S and H
    assert torch.equal(module(False, False)((x, None), residual, 0.0), torch.full_like(x, 0.1))


@pytest.mark.parametrize("sp", [False, True])
def test_sequence_parallel_tags(sp):
    norm = GenLIPLayerNorm(_cfg(sequence_parallel=sp), 8, eps=1e-6)
    bda = LayerScaleDropPathAdd(_cfg(sequence_parallel=sp))
    assert norm.eps == 1e-6
    for p in list(norm.parameters()) + list(bda.parameters()):
        assert getattr(p, "sequence_parallel") is sp
    with pytest.raises(ValueError, match="normalization"):
        GenLIPLayerNorm(_cfg(normalization="RMSNorm"), 8)


def test_drop_path_module_repr_and_eval():
    module = DropPath(0.3).eval()
    x = torch.randn(2, 3, 4)
    assert module(x) is x and "rate=0.3" in repr(module)


# Canonical (dist-checkpoint) keys of the tiny model: TE-style fused norm names, layers stacked
# along a leading axis (megatron's homogeneous-layer sharded state dict).
CANONICAL = {
    "embedding.patch_embed.weight": (64, 768), "embedding.patch_embed.bias": (64,),
    "embedding.word_embeddings.weight": (256, 48),
    "embedding.in_proj.weight": (64, 48), "embedding.in_proj.bias": (64,),
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (2, 64),
    "decoder.layers.self_attention.linear_qkv.layer_norm_bias": (2, 64),
    "decoder.layers.self_attention.linear_qkv.weight": (2, 256, 64),
    "decoder.layers.self_attention.linear_qkv.bias": (2, 256),
    "decoder.layers.self_attention.linear_proj.weight": (2, 64, 64),
    "decoder.layers.self_attention.linear_proj.bias": (2, 64),
    "decoder.layers.self_attn_bda.layer_scale": (2, 64),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": (2, 64),
    "decoder.layers.mlp.linear_fc1.layer_norm_bias": (2, 64),
    "decoder.layers.mlp.linear_fc1.weight": None,            # SwiGLU factory (stride-2 shards)
    "decoder.layers.mlp.linear_fc1.bias": None,
    "decoder.layers.mlp.linear_fc2.weight": (2, 64, 176),
    "decoder.layers.mlp.linear_fc2.bias": (2, 64),
    "decoder.layers.mlp_bda.layer_scale": (2, 64),
    "decoder.final_layernorm.weight": (64,), "decoder.final_layernorm.bias": (64,),
    "output_proj.weight": (48, 64), "output_proj.bias": (48,),
    "output_layer.weight": (256, 48),
}


def test_canonical_checkpoint_keys(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    model = GenLIPMegatronModel(make_config())
    tensors = {}
    for value in model.sharded_state_dict().values():
        if type(value).__name__ in ("ShardedTensor", "ShardedTensorFactory"):
            tensors[value.key] = getattr(value, "global_shape", None)
    assert tensors == CANONICAL
