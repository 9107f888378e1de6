"""Conversion of the ablation knobs (``model.gated_attention: false``, ``model.qk_layernorm``).

Per knob: the HF export run through the bundled modeling file gives the Megatron model's logits
(fp32, atol 1e-4); its config.json records the knob (``gated_attention`` as in the released
format, ``qk_layernorm`` ours, with the one-line warning of the export); HF → Megatron (TP=2
layout) → HF is bit-exact and loads through the trainer's ``training.init_from`` path.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from convert_testlib import load_megatron, packed_batch, random_hf_state_dict, save_megatron, \
    tiny, transformer_config, write_hf_export
from safetensors.torch import load_file

from genlip_megatron.convert import hf_state_dict_to_megatron, hf_to_megatron, \
    megatron_state_dict_to_hf, megatron_to_hf

KNOBS = {"no_gate": {"gated_attention": False}, "qk_norm": {"qk_layernorm": True},
         "no_gate_qk_norm": {"gated_attention": False, "qk_layernorm": True}}
ROWS = [[(2, 3, 7), (3, 3, 5), (1, 2, 6)], [(4, 2, 9), (2, 2, 12)]]


def _model(m, seed=1234):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    model = GenLIPMegatronModel(transformer_config(dataclasses.replace(m, init_std=0.2),
                                                   seed=seed))
    with torch.no_grad():   # move LayerNorms (q/k norms too), LayerScale, biases off init
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
def test_hf_export_matches_megatron_logits(mp_state, tmp_path, caplog, knobs):
    from transformers import AutoModel

    m = tiny(**knobs)
    model = _model(m)
    save_megatron([model], m, tmp_path / "mg", step=5)
    with caplog.at_level(logging.WARNING, logger="genlip_megatron.convert.converter"):
        out = megatron_to_hf(tmp_path / "mg", tmp_path / "hf", dtype="fp32", progress=False,
                             require_tokenizer=False)
    notes = [r.getMessage() for r in caplog.records if "qk_layernorm" in r.getMessage()]
    assert len(notes) == (1 if m.qk_layernorm else 0) and "\n" not in "".join(notes)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gated_attention"] is m.gated_attention
    assert cfg.get("qk_layernorm", False) is m.qk_layernorm
    stored = load_file(out / "model.safetensors")
    assert stored["visual.layers.0.self_attn.q_proj.weight"].shape[0] == \
        (128 if m.gated_attention else 64)
    assert ("visual.layers.1.self_attn.k_norm.bias" in stored) is m.qk_layernorm
    hf = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    b = packed_batch(ROWS, 48, 256, seed=3)
    with torch.no_grad():
        want = model(b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"],
                     b["pixel_values"])
        got = hf(input_ids=b["tokens"], pixel_values=b["pixel_values"],
                 image_mask=b["image_mask"], position_ids=b["position_ids"],
                 segment_ids=b["segment_ids"]).logits
    real = b["segment_ids"] >= 0
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    assert want[real].std() > 0.5


@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
def test_hf_megatron_round_trip_is_bit_exact(mp_state, tmp_path, knobs):
    m = tiny(**knobs)
    hf = random_hf_state_dict(m, seed=2)
    src = write_hf_export(tmp_path / "hf", m, hf)
    hf_to_megatron(src, tmp_path / "mg", tp=2, pp=1, progress=False)     # resharded layout
    model = _model(m, seed=99)
    load_megatron([model], m, tmp_path / "mg")
    sd = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    got = hf_state_dict_to_megatron(megatron_state_dict_to_hf(sd, m), m)
    want = hf_state_dict_to_megatron(hf, m)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf2", dtype="fp32", progress=False,
                   require_tokenizer=False)
    back = load_file(tmp_path / "hf2" / "model.safetensors")
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_default_export_keeps_the_released_keys(tmp_path):
    write_hf_export(tmp_path / "hf", tiny(), random_hf_state_dict(tiny()))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["gated_attention"] is True and "qk_layernorm" not in cfg


def test_knob_mismatch_between_config_and_weights_is_refused(tmp_path):
    from genlip_megatron.convert import ConversionError

    gated = random_hf_state_dict(tiny())
    src = write_hf_export(tmp_path / "hf", tiny(), gated,
                          config_edit={"gated_attention": False})
    with pytest.raises(ConversionError, match="q_proj"):
        hf_to_megatron(src, tmp_path / "mg", progress=False)
