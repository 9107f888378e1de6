"""genlip_megatron.config: presets, YAML loading, and every refusal with its reason."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from genlip_megatron.config import VARIANTS, ConfigError, config_from_dict, decode_variant, \
    load_config

ROOT = Path(__file__).resolve().parents[3]


def validate(raw: dict, world_size: int = 8, has_cuda: bool = False, has_te: bool = False):
    # A global batch every data-parallel size of an 8-rank world divides (batch rules apart).
    raw = {"training": {"global_batch_size": 64}, **raw}
    return config_from_dict(raw).validate(world_size=world_size, has_cuda=has_cuda,
                                          has_te=has_te)


def test_reference_presets_are_exact():
    # reference configs/model_configs/genlip/genlip_{l16,so16,g16}_224.json
    # (docs/reference-architecture.md)
    L, So, g = decode_variant("L/16"), decode_variant("So/16"), decode_variant("g/16")
    assert (L.hidden_size, L.num_layers, L.num_attention_heads, L.ffn_hidden_size,
            L.mrope_section, L.drop_path_rate) == (1152, 24, 16, 2752, [8, 12, 12], 0.1)
    assert (So.hidden_size, So.num_layers, So.ffn_hidden_size, So.mrope_section,
            So.drop_path_rate) == (1152, 27, 3072, [12, 12, 12], 0.1)
    assert (g.hidden_size, g.num_layers, g.ffn_hidden_size, g.kv_channels, g.mrope_section,
            g.drop_path_rate) == (1536, 40, 4096, 96, [16, 16, 16], 0.2)
    for m in (L, So, g):
        assert (m.vocab_size, m.text_dim, m.patch_size, m.layernorm_eps, m.rope_theta,
                m.layerscale_init) == (151936, 1024, 16, 1e-6, 1e4, 0.1)


def test_every_preset_is_a_valid_model():
    for name in VARIANTS:
        variant = name if name in ("tiny", "demo") else f"{name}/16"
        validate({"model": {"variant": variant}}, has_cuda=True, has_te=True)


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'parallel.tensor_parallel'.*"):
        config_from_dict({"parallel": {"tensor_parallel": 2}})
    with pytest.raises(ConfigError, match=r"'optimizer.weigth_decay'; did you mean "
                                          r"'weight_decay'"):
        config_from_dict({"optimizer": {"weigth_decay": 0.1}})


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="training.train_steps must be an integer"):
        config_from_dict({"training": {"train_steps": "many"}})
    with pytest.raises(ConfigError, match=r"model.attention_backend is 'flash'.*\['auto', "
                                          r"'dense', 'flex', 'te', 'varlen'\]"):
        config_from_dict({"model": {"attention_backend": "flash"}})


def test_unknown_variant_suggests():
    with pytest.raises(ConfigError, match=r"did you mean 'g/16'"):
        decode_variant("gg/16")


def test_tp_must_divide_heads():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(16\) is not divisible by "
                                          r"parallel.tp \(3\); use tp in \[1, 2, 4, 8, 16\]"):
        validate({"model": {"variant": "L/16"}, "parallel": {"tp": 3}}, world_size=6)


def test_context_parallel_refused_for_prefix_lm():
    with pytest.raises(ConfigError, match=r"parallel.cp \(2\) must be 1: .*prefix-LM"):
        validate({"model": {"variant": "L/16"}, "parallel": {"cp": 2}})


def test_fp8_needs_te_and_gpu_unless_emulated():
    raw = {"model": {"variant": "L/16"}, "precision": {"fp8": {"recipe": "tensorwise"}}}
    with pytest.raises(ConfigError, match="needs a CUDA GPU and transformer_engine.*emulate"):
        validate(raw)
    raw["precision"]["fp8"]["emulate"] = True
    validate(raw)  # the CPU emulation is allowed here


def test_fp8_ffn_shard_must_be_multiple_of_16():
    # So400m-style FFN 4304 / tp 2 = 2152 (a So400m-width FFN under TP=2)
    raw = {"model": {"variant": "So/16", "ffn_hidden_size": 4304},
           "parallel": {"tp": 2}, "precision": {"fp8": {"emulate": True}}}
    with pytest.raises(ConfigError, match=r"4304/2 = 2152\) is not a multiple of 16.*use tp in"):
        validate(raw)


def test_delayed_recipe_with_bf16_edge_layers_refused():
    raw = {"model": {"variant": "L/16", "transformer_impl": "te"},
           "precision": {"fp8": {"recipe": "delayed", "first_last_layers_bf16": True}}}
    with pytest.raises(ConfigError, match="first_last_layers_bf16 is not supported with recipe "
                                          "'delayed'"):
        validate(raw, has_cuda=True, has_te=True)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError, match="parallel.sp is true but parallel.tp is 1"):
        validate({"parallel": {"sp": True}})


def test_layers_must_split_over_pipeline_stages():
    with pytest.raises(ConfigError, match=r"num_layers \(27\) is not divisible by parallel.pp "
                                          r"× vpp \(2\)"):
        validate({"model": {"variant": "So/16"}, "parallel": {"pp": 2}})


def test_world_size_must_fit_layout():
    with pytest.raises(ConfigError, match=r"world size \(6\) is not divisible by parallel.tp × "
                                          r"parallel.pp \(2 × 2\)"):
        validate({"model": {"variant": "L/16"}, "parallel": {"tp": 2, "pp": 2}}, world_size=6)


def test_te_impl_without_te_is_refused():
    with pytest.raises(ConfigError, match="transformer_impl is 'te' but transformer_engine/CUDA"):
        validate({"model": {"transformer_impl": "te"}})


def test_patch_size_must_agree_between_data_and_model():
    with pytest.raises(ConfigError, match=r"data.image.patch_size \(14\) differs from "
                                          r"model.patch_size \(16\)"):
        validate({"data": {"image": {"patch_size": 14, "fixed_size": 224}}})


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optimizer: {lr: 0.5}\ntraining: {train_steps: 7}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\noptimizer: {min_lr: 0.1}\n")
    cfg = load_config(tmp_path / "run.yaml", ["training.seed=9", "model.variant=g/16"])
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.training.train_steps,
            cfg.training.seed, cfg.model.hidden_size) == (0.5, 0.1, 7, 9, 1536)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="base' chain loops"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(tmp_path / "run.yaml", ["training.seed"])


def test_example_configs_load_and_validate_for_their_cluster():
    files = sorted(glob.glob(str(ROOT / "examples" / "configs" / "genlip_*.yaml")))
    assert len(files) >= 7
    for f in files:
        gpus = int(Path(f).name.split("_")[3].removesuffix("gpu"))
        cfg = load_config(f)
        cfg.validate(world_size=gpus, has_cuda=True, has_te=True)
        assert cfg.optimizer.adam_beta2 == 0.95 and cfg.optimizer.adam_eps == 1e-8
        stage2 = "stage2" in f
        assert cfg.optimizer.lr == (1e-4 if stage2 else 1e-3)
        assert cfg.data.image.policy == ("native" if stage2 else "fixed")
        assert (cfg.training.init_from is not None) == stage2


def test_demo_config_validates_on_cpu():
    load_config(ROOT / "examples" / "configs" / "demo_cpu.yaml").validate(
        world_size=1, has_cuda=False, has_te=False)
