"""Per-tensor rules and the registry engine on synthetic tensors (no megatron model needed)."""

from __future__ import annotations

import pytest
import torch
from convert_testlib import TINY, random_hf_state_dict, tiny

from genlip_megatron.convert.converter import hf_state_dict_to_megatron, megatron_shapes, \
    megatron_state_dict_to_hf
from genlip_megatron.convert import registry
from genlip_megatron.convert.registry import BACKEND_ALIASES, ConversionError, \
    mapping_registry, renumber_layers
from genlip_megatron.convert.rules import ConvAsLinear, GatedMLPMapping, QKVGateMapping, \
    tp_gather, tp_shard


def test_qkv_gate_layout_is_megatron_per_group_q_g_k_v():
    e, nh = 8, 4
    hd = e // nh
    q_proj = torch.arange(2 * e * 3, dtype=torch.float32).reshape(2 * e, 3)
    k = torch.randn(e, 3)
    v = torch.randn(e, 3)
    rule = QKVGateMapping("qkv", q="q", k="k", v="v", num_heads=nh, tp_axis=0)
    fused = rule.to_megatron((q_proj, k, v))
    for h in range(nh):   # rows of head h: [q_h; g_h; k_h; v_h]
        block = fused[h * 4 * hd:(h + 1) * 4 * hd]
        torch.testing.assert_close(block[:hd], q_proj[h * hd:(h + 1) * hd], rtol=0, atol=0)
        torch.testing.assert_close(block[hd:2 * hd], q_proj[e + h * hd:e + (h + 1) * hd],
                                   rtol=0, atol=0)
        torch.testing.assert_close(block[2 * hd:3 * hd], k[h * hd:(h + 1) * hd], rtol=0, atol=0)
        torch.testing.assert_close(block[3 * hd:], v[h * hd:(h + 1) * hd], rtol=0, atol=0)
    back = rule.to_hf(fused)
    assert all(torch.equal(a, b) for a, b in zip(back, (q_proj, k, v)))
    bias = rule.to_megatron((q_proj[:, 0], k[:, 0], v[:, 0]))   # biases: same rows
    assert torch.equal(bias, fused[:, 0])


def test_qkv_reference_formula():
    """The derivation in docs/reference-architecture.md (stack of [Wq, Wg, Wk, Wv] per head)."""
    e, nh = 12, 3
    qp, kp, vp = torch.randn(2 * e, e), torch.randn(e, e), torch.randn(e, e)
    want = torch.stack([qp[:e].view(nh, -1, e), qp[e:].view(nh, -1, e), kp.view(nh, -1, e),
                        vp.view(nh, -1, e)], 1).reshape(4 * e, e)
    rule = QKVGateMapping("qkv", q="q", k="k", v="v", num_heads=nh)
    assert torch.equal(rule.to_megatron((qp, kp, vp)), want)


def test_qkv_wrong_heads_is_a_clear_error():
    rule = QKVGateMapping("decoder.layers.0.x", q="q", k="k", v="v", num_heads=5)
    with pytest.raises(ValueError, match="4 × heads"):
        rule.to_hf(torch.zeros(32, 8))


def test_glu_fc1_is_cat_gate_up_and_tp_stride_two():
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    rule = GatedMLPMapping("fc1", gate="g", up="u", tp_axis=0, tp_stride=2)
    full = rule.to_megatron((gate, up))
    assert torch.equal(full, torch.cat([gate, up]))
    shards = [rule.shard(full, r, 2) for r in range(2)]
    # each TP rank holds [gate_r; up_r] (megatron partition_stride 2)
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    assert torch.equal(rule.gather(shards), full)


def test_conv_as_linear_matches_conv2d_on_patches():
    conv = torch.nn.Conv2d(3, 5, 16, 16)
    rule = ConvAsLinear("pe", hf="conv", channels=3, patch_size=16)
    lin = rule.to_megatron((conv.weight.detach(),))
    patches = torch.randn(7, 3, 16, 16)
    want = conv(patches).flatten(1)
    got = torch.nn.functional.linear(patches.flatten(1), lin, conv.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(rule.to_hf(lin)[0], conv.weight.detach())


@pytest.mark.parametrize("axis,stride", [(0, 1), (1, 1), (0, 2), (None, 1)])
def test_tp_shard_gather_roundtrip(axis, stride):
    t = torch.randn(8, 12)
    shards = [tp_shard(t, r, 4, axis, stride) for r in range(4)]
    assert torch.equal(tp_gather(shards, axis, stride), t)


def test_tp_shard_uneven_is_an_error():
    with pytest.raises(ValueError, match="cannot split dimension 0 of size 6 into 4"):
        tp_shard(torch.zeros(6, 2), 0, 4, 0)


def test_registry_bit_exact_both_ways_and_every_key_once():
    hf = random_hf_state_dict(TINY)
    mg = hf_state_dict_to_megatron(hf, TINY)
    assert set(mg) == set(megatron_shapes(TINY))
    assert all(tuple(v.shape) == megatron_shapes(TINY)[k] for k, v in mg.items())
    back = megatron_state_dict_to_hf(mg, TINY)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_registry_without_in_proj_when_text_width_equals_hidden():
    m = tiny(text_dim=64)
    keys = mapping_registry(m).hf_keys()
    assert "in_proj.weight" not in keys and "proj.weight" not in keys
    hf = random_hf_state_dict(m)
    assert megatron_state_dict_to_hf(hf_state_dict_to_megatron(hf, m), m).keys() == hf.keys()


def test_vision_only_drops_text_keys():
    reg = mapping_registry(TINY, vision_only=True)
    keys = set(reg.hf_keys())
    assert not keys & {"embeddings.weight", "in_proj.weight", "proj.bias", "lm_head.weight"}
    mg = hf_state_dict_to_megatron(random_hf_state_dict(TINY), TINY)
    out = megatron_state_dict_to_hf(mg, TINY, vision_only=True)
    assert set(out) == keys


def test_missing_and_unexpected_megatron_keys_are_named():
    mg = hf_state_dict_to_megatron(random_hf_state_dict(TINY), TINY)
    del mg["decoder.layers.1.mlp.linear_fc2.bias"]
    mg["decoder.layers.1.mlp.new_param"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"missing \[decoder.layers.1.mlp.linear_fc2.bias\]"
                       r".*unexpected \[decoder.layers.1.mlp.new_param\]"):
        megatron_state_dict_to_hf(mg, TINY)


def test_hf_model_prefix_gets_a_hint():
    hf = {f"model.{k}": v for k, v in random_hf_state_dict(TINY).items()}
    with pytest.raises(ConversionError, match="'model.' prefix"):
        hf_state_dict_to_megatron(hf, TINY)


def test_extra_state_and_local_norm_names_are_accepted():
    mg = hf_state_dict_to_megatron(random_hf_state_dict(TINY), TINY)
    local = {}
    inverse = {v: k for k, v in BACKEND_ALIASES.items()}
    for k, v in mg.items():
        head, _, tail = k.partition(".layers.")
        idx, _, suffix = tail.partition(".")
        local[f"{head}.layers.{idx}.{inverse.get(suffix, suffix)}" if tail else k] = v
    local["decoder.layers.0.mlp.linear_fc1._extra_state"] = None
    out = megatron_state_dict_to_hf({k: v for k, v in local.items()}, TINY)
    assert torch.equal(out["visual.layers.1.layer_norm2.bias"],
                       mg["decoder.layers.1.mlp.linear_fc1.layer_norm_bias"])


def test_backend_aliases_match_the_model_layer_spec():
    from genlip_megatron.model.layer_spec import LOCAL_TO_TE_KEYS

    expected = {f"{k}{p}": f"{v}{p}" for k, v in LOCAL_TO_TE_KEYS.items()
                for p in ("weight", "bias")}
    assert BACKEND_ALIASES == expected


def test_pp_renumbering_and_rank_split_merge_roundtrip():
    m = tiny(num_layers=4)
    reg = mapping_registry(m)
    full = hf_state_dict_to_megatron(random_hf_state_dict(m), m)
    ranks = reg.split_ranks(full, tp=2, pp=2, local_names=True)
    # stage 1 numbers its layers from 0; the embedding lives on stage 0, the head on stage 1
    assert "decoder.layers.1.input_layernorm.weight" in ranks[(1, 0)]
    assert "decoder.layers.2.input_layernorm.weight" not in ranks[(1, 0)]
    assert "embedding.word_embeddings.weight" in ranks[(0, 1)]
    assert "output_layer.weight" in ranks[(1, 1)] and "output_layer.weight" not in ranks[(0, 0)]
    assert ranks[(0, 1)]["embedding.word_embeddings.weight"].shape == (128, 48)
    assert ranks[(1, 0)]["decoder.layers.0.mlp.linear_fc2.weight"].shape == (64, 88)
    merged = reg.merge_ranks(ranks)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    moved = renumber_layers({"decoder.layers.0.x": 1, "embedding.y": 2}, 3)
    assert moved == {"decoder.layers.3.x": 1, "embedding.y": 2}


def test_merge_ranks_needs_a_full_grid():
    reg = mapping_registry(TINY)
    with pytest.raises(ConversionError, match="full \\(pp, tp\\) grid"):
        reg.merge_ranks({(0, 0): {}, (1, 1): {}})


def test_table_lists_every_rule_and_dropped_key():
    table = mapping_registry(TINY).table()
    assert "`decoder.layers.*.self_attention.linear_qkv.weight`" in table
    assert "QKVGateMapping" in table and "axis 0, stride 2" in table
    assert "None (dropped" in table and "rotary_emb.inv_freq" in table
    assert table.count("\n") + 1 == 2 + len(mapping_registry(TINY).rules) + \
        len(registry.MEGATRON_EXTRA_STATE) + 2


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_tp_shard_holds_the_per_head_rows_of_its_heads(tp):
    """Rank r's shard of the registry's fused-qkv rule = [q_h; g_h; k_h; v_h] for exactly the
    heads r·nh/tp … (r+1)·nh/tp-1, built here from per-head HF row slices (megatron's
    column-parallel linear_qkv split), for weights and biases."""
    reg = mapping_registry(TINY)
    bound = next(b for b in reg.bound if b.megatron.endswith("0.self_attention.linear_qkv.weight"))
    rule, nh, e = bound.rule, TINY.num_attention_heads, TINY.hidden_size
    hd, per_rank = e // nh, TINY.num_attention_heads // tp
    qp, kp, vp = torch.randn(2 * e, e), torch.randn(e, e), torch.randn(e, e)
    fused = rule.to_megatron((qp, kp, vp))
    for r in range(tp):
        rows = []
        for h in range(r * per_rank, (r + 1) * per_rank):
            head = slice(h * hd, (h + 1) * hd)
            rows += [qp[head], qp[e:][head], kp[head], vp[head]]
        assert torch.equal(rule.shard(fused, r, tp), torch.cat(rows)), f"tp rank {r}/{tp}"
    assert torch.equal(rule.gather([rule.shard(fused, r, tp) for r in range(tp)]), fused)
