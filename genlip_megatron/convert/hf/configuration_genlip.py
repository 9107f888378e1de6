"""GenLIP configuration for Hugging Face ``transformers`` (self-contained: no genlip_megatron).

Copied into every exported checkpoint directory and referenced from ``config.json``'s
``auto_map``, so ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works without this
package. Field names and defaults follow the reference ``GenLIPConfig``
(YanFangCS/GenLIP@db2c226 ``veomni/models/transformers/genlip/genlip_modeling.py`` L75-174).

transformers 5.x rewrites a ``rope_scaling`` attribute into ``rope_parameters``; the MRoPE
sections are therefore kept in ``mrope_section`` and ``rope_scaling`` is re-emitted by
:meth:`GenLIPConfig.to_dict` in the reference form ``{"type": "mrope", "mrope_section": [...]}``.
"""

from __future__ import annotations

from typing import Optional

from transformers import LlavaConfig, PretrainedConfig


class GenLIPConfig(PretrainedConfig):
    """Architecture of a GenLIP model (one transformer over ``[image patches | text]``).

    Args:
        hidden_size: transformer width E (patches are embedded straight into E).
        num_hidden_layers: number of blocks.
        num_attention_heads: heads (MHA; ``num_key_value_heads`` must equal it if given).
        intermediate_size: SwiGLU inner width (each of ``gate_fc`` and ``fc1``).
        text_embed_dim: text embedding width T; ``in_proj``/``proj`` exist only when T != E.
            None means "unknown" (released configs omit it): loaders infer it from the shape of
            ``embeddings.weight``.
        vocab_size: LM vocabulary.
        rope_scaling: ``{"type": "mrope", "mrope_section": [t, h, w]}`` (interleaved MRoPE).
        gated_attention: elementwise sigmoid output gate (``q_proj`` [2E, E]); False is the
            paper's "w/o GA" ablation (``q_proj`` [E, E]), as in the reference config.
        qk_layernorm: per-head LayerNorm on queries and keys before RoPE (``self_attn.q_norm``,
            ``k_norm``); genlip_megatron's ``model.qk_layernorm`` ablation, not in the released
            models.
        vision_only: the checkpoint holds only the vision trunk (no embeddings/in_proj/proj/
            lm_head); ``forward`` then refuses text and ``encode_images`` still works.
        image_token_id: id marking image positions in ``input_ids`` when no ``image_mask`` is
            passed (Qwen ``<|image_pad|>`` 151655).
        image_policy / image_size / min_pixels / max_pixels / max_aspect_ratio / resample: the
            training image preprocessing (``fixed`` square of ``image_size`` or ``native``
            smart-resize; the resize kernel); ``preprocessor_config.json`` holds the same for
            ``GenLIPImageProcessor``.
    """

    model_type = "genlip"

    def __init__(self, hidden_size: int = 1152, num_hidden_layers: int = 24,
                 num_attention_heads: int = 16, num_key_value_heads: Optional[int] = None,
                 intermediate_size: int = 2752, text_embed_dim: Optional[int] = None,
                 vocab_size: int = 151936, num_channels: int = 3, patch_size: int = 16,
                 temporal_patch_size: int = 1, hidden_act: str = "silu",
                 use_swiglu_ffn: bool = True, ls_init_value: float = 0.1,
                 layer_norm_eps: float = 1e-6, attention_dropout: float = 0.0,
                 drop_path_rate: float = 0.0, initializer_range: float = 0.02,
                 initializer_factor: float = 1.0, max_position_embeddings: int = 16384,
                 rope_theta: float = 10000.0, rope_scaling: Optional[dict] = None,
                 mrope_section: Optional[list] = None, mrope_interleaved: bool = True,
                 gated_attention: bool = True, qk_layernorm: bool = False,
                 use_llm_head: bool = False,
                 llm_decoder=None, use_liger_kernel: bool = True, tokens_per_second: int = 2,
                 spatial_merge_size: int = 1, vision_start_token_id: int = 151652,
                 vision_end_token_id: int = 151653, image_token_id: int = 151655,
                 vision_only: bool = False, tie_word_embeddings: bool = False,
                 image_policy: str = "fixed", image_size: int = 224, min_pixels: int = 4096,
                 max_pixels: int = 262144, max_aspect_ratio: float = 200.0,
                 resample: str = "torch", **kwargs):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.text_embed_dim = text_embed_dim
        self.vocab_size = vocab_size
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.hidden_act = hidden_act
        self.use_swiglu_ffn = use_swiglu_ffn
        self.ls_init_value = ls_init_value
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        if mrope_section is None:
            mrope_section = (rope_scaling or {}).get("mrope_section")
        if mrope_section is None:
            # Every channel on T is plain 1-D RoPE; the reference configs always set sections.
            mrope_section = [hidden_size // num_attention_heads // 2, 0, 0]
        self.mrope_section = [int(s) for s in mrope_section]
        self.mrope_interleaved = mrope_interleaved
        self.gated_attention = gated_attention
        self.qk_layernorm = qk_layernorm
        self.use_llm_head = use_llm_head
        self.llm_decoder = llm_decoder
        self.use_liger_kernel = use_liger_kernel
        self.tokens_per_second = tokens_per_second
        self.spatial_merge_size = spatial_merge_size
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.image_token_id = image_token_id
        self.vision_only = vision_only
        self.image_policy = image_policy
        self.image_size = image_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.resample = resample
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        """Per-head width E / heads (72 for L/16 and So/16, 96 for g/16)."""
        return self.hidden_size // self.num_attention_heads

    def llava_config(self, text_config, **overrides):
        """transformers' ``LlavaConfig`` with this config as its vision tower, set for GenLIP.

        GenLIP has no CLS token, so ``vision_feature_select_strategy="full"`` (LLaVA's
        ``"default"`` would drop the first patch), and ``vision_feature_layer=-1`` takes
        ``hidden_states[-1]`` of ``GenLIPVisionModel``, the ``ln_post`` output the model was
        trained to give. ``image_seq_length`` is the patch count of a ``fixed`` image (the
        image tokens per image in the prompt). Call ``modeling_genlip.register()`` before
        building the model.

        Args:
            text_config: the language model's config (or its dict).
            overrides: any other ``LlavaConfig`` argument (``image_token_id``, ...).
        """
        kwargs = {"vision_feature_select_strategy": "full", "vision_feature_layer": -1,
                  "image_seq_length": (self.image_size // self.patch_size) ** 2}
        kwargs.update(overrides)
        return LlavaConfig(vision_config=self, text_config=text_config, **kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("rope_parameters", None)
        out["rope_scaling"] = {"type": "mrope", "mrope_section": list(self.mrope_section)}
        return out
