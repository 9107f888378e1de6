"""Model architecture section: the preset table (``decode_variant``) and ``ModelConfig``.

Model sizes are variant strings (``"L/16"``, ``"So/16"``, ``"g/16"``, ``"G/16"``, ``"tiny"``)
resolved by :func:`decode_variant` from one table, in the manner of big_vision's ``vit.py``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal

from genlip_megatron.config.loader import ConfigError

__all__ = ["QWEN3_VOCAB", "VARIANTS", "ModelConfig", "decode_variant", "validate_model"]

QWEN3_VOCAB = 151936

# One row per size: hidden, layers, heads, SwiGLU width, text width, mrope sections, drop path.
# Sources: reference repo YanFangCS/GenLIP@db2c226 configs/model_configs/genlip/genlip_*_224.json
# (text width 1024 as in the released checkpoints; So/16 says 1152 at HEAD, see docs/reference-architecture.md).
VARIANTS: dict[str, tuple[int, int, int, int, int, tuple[int, int, int], float]] = {
    "tiny": (64, 2, 4, 176, 48, (2, 3, 3), 0.0),          # ours: unit tests (text ≠ hidden)
    "demo": (192, 4, 4, 512, 128, (8, 8, 8), 0.0),        # ours: CPU demo
    "L": (1152, 24, 16, 2752, 1024, (8, 12, 12), 0.1),    # reference genlip_l16_224.json
    "So": (1152, 27, 16, 3072, 1024, (12, 12, 12), 0.1),  # reference genlip_so16_224.json
    "g": (1536, 40, 16, 4096, 1024, (16, 16, 16), 0.2),   # reference genlip_g16_224.json
    "G": (2048, 36, 16, 5504, 1024, (22, 21, 21), 0.2),   # ours: ~2.0B trunk for scale runs
}
# Tests and the demo use their own small tokenizers.
_SMALL_VOCAB = {"tiny": 256, "demo": 1024}


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of one GenLIP transformer (docs/reference-architecture.md)."""

    variant: str = "tiny"
    """Size name, e.g. "L/16", "So/16", "g/16", "G/16", "tiny", "demo"; fills every field below."""
    hidden_size: int = 64
    """Transformer width H (image patches are embedded straight into H)."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Attention heads (MHA: key/value heads = query heads)."""
    ffn_hidden_size: int = 176
    """SwiGLU inner width (each of gate_fc and fc1)."""
    text_dim: int = 48
    """Text embedding width T; in_proj T→H and proj H→T exist only when T ≠ H."""
    vocab_size: int = 256
    """LM vocabulary (151936 for Qwen3)."""
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    """Interleaved MRoPE sections (T, H, W); H/W channel sets are capped at 3·section."""
    rope_theta: float = 10000.0
    """RoPE base."""
    patch_size: int = 16
    """Square patch side in pixels."""
    num_channels: int = 3
    """Image channels."""
    layernorm_eps: float = 1e-6
    """Epsilon of every LayerNorm."""
    layerscale_init: float = 0.1
    """Initial LayerScale value (two per block)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate, the same for every layer (reference, no linear ramp)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (reference: 0)."""
    init_std: float = 0.02
    """Std of the normal init of linears and embeddings (attention projections use xavier)."""
    gated_attention: bool = True
    """Elementwise sigmoid output gate on attention (the reference; ``q_proj`` holds query and
    gate rows). false is the paper's "w/o GA" ablation: no gate and no gate weights."""
    qk_layernorm: bool = False
    """LayerNorm (per head, over the head dim, with bias) on queries and keys before RoPE:
    megatron-core's ``qk_layernorm``. Not in the released GenLIP; exports carry it as
    ``qk_layernorm`` with ``q_norm``/``k_norm`` weights that only this repository's HF code
    reads (docs/conversion.md)."""
    attention_backend: Literal["auto", "dense", "flex", "te", "varlen"] = "auto"
    """Prefix-LM core attention: auto (resolved once at start-up and logged: te with
    transformer_impl te on a GPU, flex on a GPU otherwise, varlen on CPU; dense when
    attention_dropout > 0 outside TE), dense mask (the oracle; O(S²) memory), torch
    flex_attention, TE two-call, or varlen (per-sample torch SDPA, see model/attention.py)."""
    transformer_impl: Literal["local", "te"] = "local"
    """megatron-core layer implementation: local (torch, CPU-capable) or transformer_engine."""
    loss_impl: Literal["chunked", "full"] = "chunked"
    """LM-head loss on the label positions: chunked (the vocabulary in blocks, one block of
    logits alive at a time, recomputed in backward; exact vocab-parallel softmax, see
    model/lm_loss.py) or full (all logits at once: the oracle, and 1.5 GB of bf16 logits per
    16k-token row at V = 151936)."""
    loss_chunk_logits: int = 16777216
    """Logits alive at a time in the chunked loss (2^24: 64 MiB in fp32); larger blocks mean
    fewer, bigger GEMMs, smaller ones less memory."""

    @property
    def kv_channels(self) -> int:
        """Head dimension (hidden / heads)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, (C, ph, pw) order."""
        return self.num_channels * self.patch_size * self.patch_size


def decode_variant(variant: str) -> ModelConfig:
    """Resolve ``"g/16"``-style names (or ``"tiny"``) to a ModelConfig from the preset table."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS), n=1)
        hint = f"; did you mean '{close[0]}/16'?" if close else ""
        raise ConfigError(f"model.variant '{variant}' is unknown; choose one of "
                          f"{[k if k in _SMALL_VOCAB else k + '/16' for k in VARIANTS]}{hint}")
    hidden, layers, heads, ffn, text, sections, dpr = VARIANTS[name]
    return ModelConfig(
        variant=variant, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
        ffn_hidden_size=ffn, text_dim=text, mrope_section=list(sections), drop_path_rate=dpr,
        vocab_size=_SMALL_VOCAB.get(name, QWEN3_VOCAB), patch_size=int(patch) if patch else 16,
    )


def validate_model(m: ModelConfig) -> None:
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) is not divisible by "
                          f"model.num_attention_heads ({m.num_attention_heads}).")
    if m.kv_channels % 2:
        raise ConfigError(f"model head dim ({m.kv_channels}) must be even for rotary embeddings.")
    if len(m.mrope_section) != 3:
        raise ConfigError(f"model.mrope_section must have 3 entries (T, H, W), got "
                          f"{m.mrope_section}.")
    if not 0.0 <= m.drop_path_rate < 1.0:
        raise ConfigError(f"model.drop_path_rate ({m.drop_path_rate}) must be in [0, 1).")
    if m.loss_chunk_logits < 1:
        raise ConfigError(f"model.loss_chunk_logits ({m.loss_chunk_logits}) must be at least 1; "
                          "the default is 16777216.")

