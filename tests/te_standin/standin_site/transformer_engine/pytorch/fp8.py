"""Deprecated TE module path (megatron-core 0.16.1 still imports from it)."""

from transformer_engine.common.recipe import DelayedScaling, Float8BlockScaling, \
    Float8CurrentScaling, Format, MXFP8BlockScaling, Recipe  # noqa: F401
from transformer_engine.pytorch.quantization import FP8GlobalStateManager, fp8_autocast, \
    fp8_model_init, get_default_recipe, is_fp8_available  # noqa: F401
