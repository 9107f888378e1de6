"""config.json writing (every reference key) and reading with the reference's quirks."""

from __future__ import annotations

import json
import logging

import pytest
from convert_testlib import TINY, random_hf_state_dict, tiny, write_hf_export

from genlip_megatron.config import decode_variant
from genlip_megatron.convert.hf_config import check_against_variant, hf_config_dict, \
    match_variant, read_hf_config
from genlip_megatron.convert.registry import ConversionError

# Every key of configs/model_configs/genlip/genlip_g16_224.json (docs/reference-architecture.md),
# minus the
# g/16-only unused "num_patches".
REFERENCE_KEYS = {
    "model_type", "architectures", "num_channels", "patch_size", "attention_dropout",
    "hidden_act", "use_swiglu_ffn", "ls_init_value", "initializer_range", "torch_dtype",
    "vocab_size", "max_position_embeddings", "use_llm_head", "llm_decoder", "use_liger_kernel",
    "tokens_per_second", "spatial_merge_size", "vision_start_token_id", "vision_end_token_id",
    "gated_attention", "mrope_interleaved", "rope_theta", "rope_scaling", "tie_word_embeddings",
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "drop_path_rate", "text_embed_dim",
}


def test_written_config_has_every_reference_key_and_auto_map():
    cfg = hf_config_dict(decode_variant("g/16"))
    assert REFERENCE_KEYS <= set(cfg)
    assert cfg["model_type"] == "genlip" and cfg["architectures"] == ["GenLIPModel"]
    assert cfg["auto_map"]["AutoModel"] == "modeling_genlip.GenLIPModel"
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [16, 16, 16]}
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"],
            cfg["text_embed_dim"], cfg["torch_dtype"]) == (1536, 40, 4096, 1024, "bfloat16")
    assert cfg["vision_start_token_id"] == 151652 and cfg["image_token_id"] == 151655
    # tiny vocabularies do not hold the Qwen ids
    assert hf_config_dict(TINY)["image_token_id"] is None


def test_read_roundtrip_and_preset_match(tmp_path):
    write_hf_export(tmp_path, TINY, random_hf_state_dict(TINY))
    m, raw = read_hf_config(tmp_path, (256, 48))
    for f in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "text_dim",
              "vocab_size", "mrope_section", "patch_size"):
        assert getattr(m, f) == getattr(TINY, f), f
    assert m.variant == "tiny" and match_variant(decode_variant("So/16")) == "So/16"


def test_quirk_architectures_genlip_warns(tmp_path, caplog):
    write_hf_export(tmp_path, TINY, {}, config_edit={"architectures": ["GenLIP"]})
    with caplog.at_level(logging.WARNING):
        read_hf_config(tmp_path, (256, 48))
    assert "known bug of the reference L/16" in caplog.text


def test_quirk_missing_text_embed_dim_is_inferred_from_weights(tmp_path, caplog):
    write_hf_export(tmp_path, TINY, {}, drop_config=["text_embed_dim", "genlip_megatron"])
    with caplog.at_level(logging.WARNING):
        m, _ = read_hf_config(tmp_path, (256, 48))
    assert m.text_dim == 48 and "has no text_embed_dim" in caplog.text


def test_quirk_so16_text_width_disagreement_uses_the_weights(tmp_path, caplog):
    write_hf_export(tmp_path, TINY, {}, config_edit={"text_embed_dim": 64})
    with caplog.at_level(logging.WARNING):
        m, _ = read_hf_config(tmp_path, (256, 48))
    assert m.text_dim == 48 and "So/16 config quirk" in caplog.text


@pytest.mark.parametrize("edit,match", [
    ({"model_type": "siglip"}, "model_type 'siglip', not 'genlip'"),
    ({"architectures": ["CLIPModel"]}, "is not \\['GenLIPModel'\\]"),
    ({"num_key_value_heads": 2}, "GenLIP is MHA"),
    ({"use_swiglu_ffn": False}, "use_swiglu_ffn=False is not supported"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [1, 2]}}, "3 sections"),
    ({"vocab_size": 999}, "vocab_size 999 but embeddings.weight has 256 rows"),
    ({"ls_init_value": 0.0}, "no LayerScale"),
])
def test_bad_configs_are_refused_with_the_reason(tmp_path, edit, match):
    write_hf_export(tmp_path, TINY, {}, config_edit=edit)
    with pytest.raises(ConversionError, match=match):
        read_hf_config(tmp_path, (256, 48))


def test_missing_config_and_keys(tmp_path):
    with pytest.raises(ConversionError, match="has no config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "genlip"}))
    with pytest.raises(ConversionError, match="no 'num_attention_heads'"):
        read_hf_config(tmp_path)


def test_variant_check_names_every_difference():
    check_against_variant(decode_variant("g/16"), "g/16")
    with pytest.raises(ConversionError, match="not a g/16 model.*num_layers: checkpoint 27"):
        check_against_variant(decode_variant("So/16"), "g/16")
    with pytest.raises(ConversionError, match="text_dim: checkpoint 1152 vs So/16 1024"):
        check_against_variant(tiny(**{**decode_variant("So/16").__dict__, "text_dim": 1152}),
                              "So/16")


def test_self_contained_hf_code_keeps_the_training_image_defaults():
    """The exported HF files cannot import the package, so they repeat the image defaults;
    this pins them to the one home (``ImageConfig`` via ``image_settings``)."""
    from genlip_megatron.convert.hf.configuration_genlip import GenLIPConfig
    from genlip_megatron.convert.hf.image_processing_genlip import GenLIPImageProcessor
    from genlip_megatron.convert.hf_config import image_section_from_export, image_settings

    expected = image_settings(None, 16)
    config, processor = GenLIPConfig(), GenLIPImageProcessor()
    for key, value in expected.items():
        if key != "resample":   # a bare processor resamples like the reference (PIL)
            assert getattr(processor, key) == value, key
        if key != "patch_size":
            assert getattr(config, key) == value, key
    # and the export → run renaming inverts the run → export one
    from genlip_megatron.config import ImageConfig

    assert image_section_from_export(expected) == {
        k: v for k, v in vars(ImageConfig()).items()
        if k in ("policy", "fixed_size", "min_pixels", "max_pixels", "max_aspect_ratio",
                 "patch_size", "decoder")}
