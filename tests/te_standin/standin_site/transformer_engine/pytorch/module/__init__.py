"""TE modules (stand-in)."""

from transformer_engine.pytorch.module.base import TransformerEngineBaseModule  # noqa: F401
from transformer_engine.pytorch.module.linear import GroupedLinear, LayerNorm, \
    LayerNormLinear, Linear, RMSNorm  # noqa: F401
