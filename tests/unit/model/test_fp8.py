"""The Transformer Engine FP8 branch: recipe builder, megatron config fields, GEMM shape check."""

from __future__ import annotations

import dataclasses

import pytest
from megatron.core.transformer.transformer_config import TransformerConfig

from genlip_megatron.compat.te import transformer_engine_available
from genlip_megatron.config import Fp8Config
from genlip_megatron.model.fp8 import (
    build_te_fp8_recipe,
    fp8_gemm_shape_problems,
    te_transformer_config_kwargs,
)

RECIPES = ["delayed", "tensorwise", "mxfp8", "blockwise"]


@pytest.mark.skipif(transformer_engine_available(), reason="TE and a GPU are present")
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builder_refuses_clearly_without_te(recipe):
    with pytest.raises(RuntimeError) as info:
        build_te_fp8_recipe(Fp8Config(recipe=recipe))
    msg = str(info.value)
    assert f"recipe '{recipe}'" in msg and "Transformer Engine" in msg
    assert "precision.fp8.emulate: true" in msg


def test_recipe_builder_rejects_unknown_recipe_before_probing_te():
    with pytest.raises(ValueError, match="precision.fp8.recipe"):
        build_te_fp8_recipe(Fp8Config(recipe="nvfp4"))


@pytest.mark.gpu
@pytest.mark.parametrize("recipe,cls", [("delayed", "DelayedScaling"),
                                        ("tensorwise", "Float8CurrentScaling"),
                                        ("mxfp8", "MXFP8BlockScaling"),
                                        ("blockwise", "Float8BlockScaling")])
@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_recipe_builder_on_gpu(recipe, cls, fmt):
    from transformer_engine.common import recipe as te_recipe

    cfg = Fp8Config(recipe=recipe, format=fmt, margin=1, amax_history_len=16,
                    amax_compute_algo="most_recent")
    built = build_te_fp8_recipe(cfg)
    assert type(built).__name__ == cls
    assert built.fp8_format == getattr(te_recipe.Format, fmt.upper())
    if recipe == "delayed":
        assert (built.margin, built.amax_history_len, built.amax_compute_algo) == (
            1, 16, "most_recent")


@pytest.mark.parametrize("recipe", ["tensorwise", "mxfp8", "blockwise"])
def test_config_kwargs_are_megatron_fields(recipe):
    cfg = Fp8Config(recipe=recipe, format="e4m3", margin=2, num_layers_at_end_in_bf16=2,
                     first_last_layers_bf16=True)
    kw = te_transformer_config_kwargs(cfg)
    assert set(kw) <= {f.name for f in dataclasses.fields(TransformerConfig)}
    tc = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, **kw)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_margin) == ("e4m3", recipe, 2)
    assert (tc.first_last_layers_bf16, tc.num_layers_at_start_in_bf16,
            tc.num_layers_at_end_in_bf16) == (True, 1, 2)


def test_config_kwargs_delayed_recipe():
    cfg = Fp8Config(recipe="delayed", first_last_layers_bf16=False, amax_history_len=16)
    kw = te_transformer_config_kwargs(cfg)
    assert (kw["fp8_recipe"], kw["fp8_amax_history_len"], kw["fp8_amax_compute_algo"]) == (
        "delayed", 16, "max")
    with pytest.raises(ValueError, match="first_last_layers_bf16: false"):
        te_transformer_config_kwargs(Fp8Config(recipe="delayed", first_last_layers_bf16=True))


def test_config_kwargs_refuse_emulation():
    with pytest.raises(ValueError, match="emulation_config_kwargs"):
        te_transformer_config_kwargs(Fp8Config(emulate=True))


def test_gemm_shape_problems():
    # So/400m's FFN 4304 is fine at TP=1 (269 x 16), not at TP=2 (2152 = 134.5 x 16)
    assert fp8_gemm_shape_problems([(4304, 1152), (2048, 1152)]) == []
    probs = fp8_gemm_shape_problems({"linear_fc1 weight": (2152, 1152),
                                     "linear_fc2 weight": (1152, 2152), "tokens": (4, 3, 64)})
    assert probs == ["linear_fc2 weight [1152, 2152]: last dim 2152 is not a multiple of 16.",
                     "tokens [4, 3, 64]: product of leading dims 12 is not a multiple of 8."]
    assert fp8_gemm_shape_problems([(64, 48)], recipe="mxfp8") == [
        "shape [64, 48]: last dim 48 is not a multiple of 32."]
    assert "at least 2 dims" in fp8_gemm_shape_problems([(16,)])[0]
