"""Parameter counts of the released sizes, built on the meta device (nothing materialised).

Expected numbers are computed here from the reference module shapes
(docs/reference-architecture.md, HF keys), not
from our model: per layer LN1, q_proj [2H, H] (query + gate), k/v/out [H, H], LN2, fc1 and
gate_fc [F, H], fc2 [H, F], all with biases, plus two LayerScale vectors; vision trunk = patch
conv [H, 3, 16, 16] + bias, layers, ln_post; text side = embeddings [V, T] + lm_head [V, T]
(+ in_proj/proj when T ≠ H).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from genlip_megatron.config import ParallelConfig, PrecisionConfig, decode_variant
from genlip_megatron.model.transformer_config import build_transformer_config


def reference_counts(H: int, F: int, L: int, T: int, V: int = 151936) -> dict:
    layer = (2 * H            # layer_norm1
             + 2 * H * H + 2 * H  # q_proj (query | gate)
             + 3 * (H * H + H)    # k_proj, v_proj, out_proj
             + 2 * H              # layer_norm2
             + 2 * (F * H + F)    # fc1, gate_fc
             + H * F + H          # fc2
             + 2 * H)             # layer_scale1/2
    trunk = 3 * 16 * 16 * H + H + L * layer + 2 * H
    text = 2 * V * T + ((T * H + H) + (H * T + T) if T != H else 0)
    return {"layer": layer, "trunk": trunk, "text": text}


@pytest.mark.parametrize("variant, per_layer_m, trunk_m, text_m", [
    ("L/16", 16.17, 388.9, 313.5),     # docs/reference-architecture.md table
    ("So/16", 17.27, 467.2, 313.5),
    ("g/16", 30.70, 1229.1, 314.3),
])
def test_param_counts_match_reference_shapes(mp_state, variant, per_layer_m, trunk_m, text_m):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    m = decode_variant(variant)
    cfg = build_transformer_config(m, ParallelConfig(), PrecisionConfig(params_dtype="bf16"),
                                   has_cuda=False)
    cfg = dataclasses.replace(cfg, perform_initialization=False)
    with torch.device("meta"):
        model = GenLIPMegatronModel(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())

    def count(prefixes):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))

    ref = reference_counts(m.hidden_size, m.ffn_hidden_size, m.num_layers, m.text_dim)
    layer0 = count(("decoder.layers.0.",))
    trunk = count(("embedding.patch_embed.", "decoder."))
    text = count(("embedding.word_embeddings.", "embedding.in_proj.", "output_proj.",
                  "output_layer."))
    assert (layer0, trunk, text) == (ref["layer"], ref["trunk"], ref["text"])
    assert sum(p.numel() for p in model.parameters()) == ref["trunk"] + ref["text"]
    assert round(layer0 / 1e6, 2) == per_layer_m
    assert round(trunk / 1e6, 1) == trunk_m and round(text / 1e6, 1) == text_m
