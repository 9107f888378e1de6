"""``config.json`` of the released GenLIP format: writing it, and reading it with its quirks.

Written configs carry every key of the reference configs (docs/reference-architecture.md, in that
order),
``architectures: ["GenLIPModel"]``, the text width ``text_embed_dim`` (which the released configs
omit) and an ``auto_map`` to the self-contained modeling file copied next to the weights.

Reading accepts the reference's known quirks, each with a warning:
- ``architectures: ["GenLIP"]`` (reference ``genlip_l16_224.json``);
- missing ``text_embed_dim`` (released checkpoints): inferred from ``embeddings.weight``;
- ``text_embed_dim`` disagreeing with ``embeddings.weight`` (So/16 at reference HEAD says 1152,
  the released weights are 1024 wide): the weight shape wins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from genlip_megatron.config import VARIANTS, ImageConfig, ModelConfig, decode_variant
from genlip_megatron.config.loader import from_dict, to_dict
from genlip_megatron.convert.registry import ConversionError

logger = logging.getLogger(__name__)

__all__ = ["hf_config_dict", "read_hf_config", "qk_layernorm_note", "match_variant",
           "model_config_from_dict", "image_settings", "image_section_from_export",
           "image_processor_dict", "AUTO_MAP", "VISION_AUTO_MAP", "HF_FILES"]

AUTO_MAP = {"AutoConfig": "configuration_genlip.GenLIPConfig",
            "AutoModel": "modeling_genlip.GenLIPModel",
            "AutoModelForCausalLM": "modeling_genlip.GenLIPForCausalLM"}
VISION_AUTO_MAP = {"AutoConfig": "configuration_genlip.GenLIPConfig",
                   "AutoModel": "modeling_genlip.GenLIPVisionModel"}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_genlip.GenLIPImageProcessor",
                      "AutoProcessor": "processing_genlip.GenLIPProcessor"}
HF_FILES = ("configuration_genlip.py", "modeling_genlip.py", "image_processing_genlip.py",
            "processing_genlip.py")
_IMAGE_KEYS = ("image_policy", "image_size", "min_pixels", "max_pixels", "max_aspect_ratio",
               "resample")
_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32",
                "float32": "float32", "fp16": "float16", "float16": "float16"}
_ARCH_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size")


def match_variant(m: ModelConfig) -> Optional[str]:
    """The preset name (``"g/16"``, ``"tiny"`` …) whose trunk shape equals ``m``, else None."""
    for name in VARIANTS:
        full = name if name in ("tiny", "demo") else f"{name}/{m.patch_size}"
        preset = decode_variant(full)
        if all(getattr(preset, f) == getattr(m, f) for f in _ARCH_FIELDS) and \
                preset.text_dim == m.text_dim and preset.vocab_size == m.vocab_size:
            return full
    return None


# Export key (preprocessor_config.json / config.json) → run key (``data.image``): the one place
# that knows ``image_size`` is the run's ``fixed_size``. ``resample`` ⇄ ``decoder`` is below.
_EXPORT_TO_RUN_IMAGE = {"image_policy": "policy", "image_size": "fixed_size",
                        "min_pixels": "min_pixels", "max_pixels": "max_pixels",
                        "max_aspect_ratio": "max_aspect_ratio", "patch_size": "patch_size"}


def image_settings(image_section: Optional[dict], patch_size: int) -> dict[str, Any]:
    """The preprocessing of a run (its ``data.image`` section) in export terms.

    ``resample`` names the training resize kernel: ``pil`` for the pillow decoder (PIL
    BILINEAR, the reference), ``torch`` for DALI (torch's antialiased bilinear on CPU; DALI's
    GPU resize is within a grey level of it). Absent keys take ``ImageConfig``'s defaults.
    """
    img = {**to_dict(ImageConfig(patch_size=patch_size)), **(image_section or {})}
    out = {export: img[run] for export, run in _EXPORT_TO_RUN_IMAGE.items()}
    out["resample"] = "pil" if img["decoder"] == "pillow" else "torch"
    return out


def image_section_from_export(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The run's ``data.image`` keys recorded in an export (inverse of :func:`image_settings`;
    keys the export lacks are left out, so ``ImageConfig`` defaults apply)."""
    out = {run: settings[export] for export, run in _EXPORT_TO_RUN_IMAGE.items()
           if export in settings}
    out["decoder"] = "pillow" if settings.get("resample", "torch") == "pil" else "dali"
    return out


def image_processor_dict(settings: dict[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json content: GenLIPImageProcessor settings + ``auto_map``."""
    return {"image_processor_type": "GenLIPImageProcessor",
            "processor_class": "GenLIPProcessor",
            "auto_map": dict(PROCESSOR_AUTO_MAP),
            **{k: settings[k] for k in (*_IMAGE_KEYS, "patch_size")},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def hf_config_dict(m: ModelConfig, *, dtype: str = "bf16", vision_only: bool = False,
                   image_token_id: Optional[int] = None,
                   special_ids: Optional[dict[str, Optional[int]]] = None,
                   provenance: Optional[dict] = None,
                   image: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json content for architecture ``m``.

    Args:
        m: the architecture.
        dtype: dtype the weights are stored in (``torch_dtype``).
        vision_only: the export holds only the vision trunk (``AutoModel`` is then
            ``GenLIPVisionModel``).
        image_token_id: id of ``<|image_pad|>`` (151655 for Qwen3; tiny tokenizers differ).
        special_ids: ``vision_start_token_id`` / ``vision_end_token_id`` overrides.
        provenance: free-form ``genlip_megatron`` entry (variant, source checkpoint).
        image: :func:`image_settings` of the training run (default: fixed 224, torch resize).
    """
    image = image or image_settings(None, m.patch_size)
    special = {"vision_start_token_id": 151652, "vision_end_token_id": 151653,
               "image_token_id": 151655}
    special.update(special_ids or {})
    if image_token_id is not None:
        special["image_token_id"] = image_token_id
    # Qwen ids do not exist in small test/demo vocabularies: record "no such token" instead.
    special = {k: (v if v is not None and v < m.vocab_size else None) for k, v in special.items()}
    cfg = {
        "architectures": ["GenLIPVisionModel" if vision_only else "GenLIPModel"],
        "auto_map": dict(VISION_AUTO_MAP if vision_only else AUTO_MAP),
        "model_type": "genlip",
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "intermediate_size": m.ffn_hidden_size,
        "text_embed_dim": m.text_dim,
        "num_channels": m.num_channels,
        "patch_size": m.patch_size,
        "attention_dropout": m.attention_dropout,
        "hidden_act": "silu",
        "use_swiglu_ffn": True,
        "ls_init_value": m.layerscale_init,
        "drop_path_rate": m.drop_path_rate,
        "initializer_range": m.init_std,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "vocab_size": m.vocab_size,
        "max_position_embeddings": 16384,
        "use_llm_head": False,
        "llm_decoder": None,
        "use_liger_kernel": True,  # reference value; the bundled modeling file ignores it
        "tokens_per_second": 2,
        "spatial_merge_size": 1,
        **special,
        "gated_attention": m.gated_attention,
        # Ours, not in the released format: written only when on, so default exports keep
        # exactly the reference keys (qk_layernorm_note below says what loads it).
        **({"qk_layernorm": True} if m.qk_layernorm else {}),
        "mrope_interleaved": True,
        "rope_theta": m.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(m.mrope_section)},
        "tie_word_embeddings": False,
        "layer_norm_eps": m.layernorm_eps,
        "vision_only": vision_only,
        **{k: image[k] for k in _IMAGE_KEYS},
        "genlip_megatron": {"variant": m.variant, **(provenance or {})},
    }
    return cfg


def qk_layernorm_note(m: ModelConfig) -> Optional[str]:
    """The one line an export of ``m`` logs when the released GenLIP format cannot express it.

    ``model.gated_attention: false`` is expressible (the released config's
    ``gated_attention`` key; the reference code builds ``q_proj`` [E, E] from it). QK LayerNorm
    is not: the released code has no ``q_norm``/``k_norm``, so the export is a warning, not an
    error, because the bundled ``modeling_genlip.py`` honours ``qk_layernorm`` and
    ``transformers`` loads it with ``trust_remote_code=True``.
    """
    if not m.qk_layernorm:
        return None
    return ("model.qk_layernorm is on: the export adds qk_layernorm=true and "
            "self_attn.q_norm/k_norm weights, which the released GenLIP code (VeOmni, open_clip) "
            "does not read; load it with the bundled modeling_genlip.py (trust_remote_code=True).")


def _require(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise ConversionError(f"{path}/config.json has no '{key}'; it is not a GenLIP config.")
    return cfg[key]


def read_hf_config(path: str | Path, embeddings_shape: Optional[tuple[int, ...]] = None
                   ) -> tuple[ModelConfig, dict]:
    """Parse an export's config.json into a ModelConfig (text width from the weights).

    Args:
        path: the export directory.
        embeddings_shape: shape of ``embeddings.weight`` (None for vision-only exports).

    Returns:
        (architecture, the raw config dict).

    Raises:
        ConversionError: not a GenLIP config, or an architecture this stack cannot build.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path} has no config.json; is it a GenLIP HF export?")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") != "genlip":
        raise ConversionError(f"{cfg_file} has model_type {cfg.get('model_type')!r}, not "
                              "'genlip'.")
    arch = cfg.get("architectures")
    if arch == ["GenLIP"]:
        logger.warning("%s: architectures is ['GenLIP'] (a known bug of the reference L/16 "
                       "config); treating it as ['GenLIPModel'].", cfg_file)
    elif arch not in (None, ["GenLIPModel"], ["GenLIPVisionModel"]):
        raise ConversionError(f"{cfg_file}: architectures {arch} is not ['GenLIPModel'] or "
                              "['GenLIPVisionModel'].")
    for key, want in (("use_swiglu_ffn", True), ("mrope_interleaved", True)):
        if cfg.get(key, want) != want:
            raise ConversionError(f"{cfg_file}: {key}={cfg[key]} is not supported (every GenLIP "
                                  f"release uses {key}={want}).")
    heads = _require(cfg, "num_attention_heads", path)
    if cfg.get("num_key_value_heads") not in (None, heads):
        raise ConversionError(f"{cfg_file}: num_key_value_heads ({cfg['num_key_value_heads']}) "
                              f"!= num_attention_heads ({heads}); GenLIP is MHA.")
    if float(cfg.get("ls_init_value", 0.1)) <= 1e-6:
        raise ConversionError(f"{cfg_file}: ls_init_value <= 1e-6 means no LayerScale, which the "
                              "Megatron model always has; not supported.")
    hidden = _require(cfg, "hidden_size", path)
    text_dim = cfg.get("text_embed_dim")
    if embeddings_shape is not None:
        inferred = int(embeddings_shape[1])
        if text_dim is None:
            logger.warning("%s has no text_embed_dim (as the released checkpoints); using %d "
                           "from embeddings.weight.", cfg_file, inferred)
        elif int(text_dim) != inferred:
            logger.warning("%s says text_embed_dim=%s but embeddings.weight is %s wide (the "
                           "reference So/16 config quirk); using %d from the weights.",
                           cfg_file, text_dim, inferred, inferred)
        text_dim = inferred
        if cfg.get("vocab_size") is not None and int(cfg["vocab_size"]) != embeddings_shape[0]:
            raise ConversionError(f"{cfg_file}: vocab_size {cfg['vocab_size']} but "
                                  f"embeddings.weight has {embeddings_shape[0]} rows; fix the "
                                  "config or the weights.")
    elif text_dim is None:
        text_dim = hidden
    sections = (cfg.get("rope_scaling") or {}).get("mrope_section") or cfg.get("mrope_section")
    if sections is None or len(sections) != 3:
        raise ConversionError(f"{cfg_file}: rope_scaling.mrope_section must list 3 sections, "
                              f"got {sections}.")
    fields = dict(
        hidden_size=hidden, num_layers=_require(cfg, "num_hidden_layers", path),
        num_attention_heads=heads, ffn_hidden_size=_require(cfg, "intermediate_size", path),
        text_dim=int(text_dim), vocab_size=int(cfg.get("vocab_size", 151936)),
        mrope_section=[int(s) for s in sections], rope_theta=float(cfg.get("rope_theta", 1e4)),
        patch_size=int(cfg.get("patch_size", 16)), num_channels=int(cfg.get("num_channels", 3)),
        layernorm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
        layerscale_init=float(cfg.get("ls_init_value", 0.1)),
        drop_path_rate=float(cfg.get("drop_path_rate", 0.0)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        init_std=float(cfg.get("initializer_range", 0.02)),
        gated_attention=bool(cfg.get("gated_attention", True)),
        qk_layernorm=bool(cfg.get("qk_layernorm", False)),
    )
    m = ModelConfig(**fields)
    m.variant = (cfg.get("genlip_megatron") or {}).get("variant") or match_variant(m) or \
        _nearest_variant(m)
    return m, cfg


def _nearest_variant(m: ModelConfig) -> str:
    """A decodable variant name for a shape that matches no preset (fields are explicit)."""
    name = min((n for n in VARIANTS if n not in ("tiny", "demo")),
               key=lambda n: abs(VARIANTS[n][0] - m.hidden_size) + abs(VARIANTS[n][1]
                                                                        - m.num_layers))
    logger.warning("no preset matches hidden=%d layers=%d heads=%d ffn=%d; recording variant "
                   "%s/%d with explicit overrides.", m.hidden_size, m.num_layers,
                   m.num_attention_heads, m.ffn_hidden_size, name, m.patch_size)
    return f"{name}/{m.patch_size}"


def model_config_from_dict(section: dict) -> ModelConfig:
    """The ``model`` section of a checkpoint's saved config → ModelConfig (unknown keys dropped).

    Raises:
        ConversionError: no model section.
    """
    if not section:
        raise ConversionError("the checkpoint's common state has no config['model'] section; "
                              "was it written by genlip_megatron?")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = sorted(set(section) - known)
    if extra:
        logger.warning("ignoring unknown model config keys %s", extra)
    data = {k: v for k, v in section.items() if k in known}
    try:
        base = to_dict(decode_variant(data.get("variant", "tiny")))
    except ValueError:
        base = to_dict(ModelConfig())
    base.update(data)
    return from_dict(ModelConfig, base, "model")


def check_against_variant(m: ModelConfig, variant: str) -> None:
    """Refuse a checkpoint whose shape differs from the preset ``variant``.

    Raises:
        ConversionError: naming every differing field.
    """
    preset = decode_variant(variant)
    diff = [f"{f}: checkpoint {getattr(m, f)} vs {variant} {getattr(preset, f)}"
            for f in (*_ARCH_FIELDS, "text_dim", "vocab_size", "patch_size")
            if getattr(m, f) != getattr(preset, f)]
    if diff:
        raise ConversionError(f"the checkpoint is not a {variant} model ({'; '.join(diff)}); "
                              "drop --variant or pass the right one.")
