"""Load any GenLIP checkpoint as the HF-format module (the one inference implementation).

- an HF export (``config.json`` + ``model.safetensors``) loads directly;
- a Megatron torch_dist checkpoint (any TP/PP) is read tensor by tensor on CPU and mapped in
  memory through the conversion registry, no export needed;
- a live megatron model's TP=1 state dict maps through :func:`from_megatron_state_dict` (the
  trainer's caption evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor

from genlip_megatron.config import ImageConfig, ModelConfig, from_dict
from genlip_megatron.convert.converter import megatron_state_dict_to_hf, resolve_run_tokenizer
from genlip_megatron.convert.hf.configuration_genlip import GenLIPConfig
from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.convert.hf_config import hf_config_dict, image_section_from_export, \
    model_config_from_dict, read_hf_config
from genlip_megatron.convert.megatron_io import DistCheckpointReader, find_checkpoint_dir
from genlip_megatron.convert.registry import ConversionError, mapping_registry
from genlip_megatron.convert.safetensors_io import SafetensorsReader
from genlip_megatron.data.tokenizer import TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["load_genlip_for_inference", "from_megatron_state_dict", "build_hf_model",
           "checkpoint_image_config", "image_config_from_export"]


def build_hf_model(m: ModelConfig, state_dict: Mapping[str, Tensor], *,
                   vision_only: bool = False, dtype: Optional[torch.dtype] = None,
                   image_token_id: Optional[int] = None) -> GenLIPModel:
    """An HF ``GenLIPModel`` for architecture ``m`` holding ``state_dict`` (HF keys).

    Built on the meta device and filled with ``assign=True``: no random init, no second copy.
    """
    cfg = GenLIPConfig(**{k: v for k, v in hf_config_dict(
        m, vision_only=vision_only, image_token_id=image_token_id).items()
        if k not in ("architectures", "auto_map", "model_type", "torch_dtype")})
    with torch.device("meta"):
        model = GenLIPModel(cfg)
    sd = {k: (v.to(dtype) if dtype is not None else v) for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def from_megatron_state_dict(state_dict: Mapping[str, Tensor], model_config: ModelConfig, *,
                             vision_only: bool = False, dtype: Optional[torch.dtype] = None,
                             copy: bool = True) -> GenLIPModel:
    """HF module from a megatron TP=1 state dict (``model.state_dict()`` of a TP=1, PP=1 chunk,
    local or canonical names; ``module.`` prefixes of DDP/Float16Module wrappers and
    ``_extra_state`` entries are ignored).

    For TP/PP > 1 merge the per-rank dicts first with
    ``mapping_registry(m).merge_ranks({(pp, tp): sd, ...})``.

    Args:
        state_dict: megatron tensors (any device; the module is built on that device).
        model_config: the run's ``model`` section.
        vision_only: keep only the vision trunk.
        dtype: cast the weights (default: keep; pass torch.float32 for bf16 training weights
            evaluated on CPU).
        copy: copy the weights (default) so the module never shares storage with a model that
            keeps training; False saves one model's worth of memory.
    """
    sd = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if torch.is_tensor(value):
            sd[key] = value.detach().clone() if copy else value.detach()
    hf = megatron_state_dict_to_hf(sd, model_config, vision_only=vision_only)
    return build_hf_model(model_config, hf, vision_only=vision_only, dtype=dtype)


def _load_megatron(path: Path, dtype: Optional[torch.dtype]) -> tuple[GenLIPModel, dict]:
    reader = DistCheckpointReader(path)
    m = model_config_from_dict((reader.common.get("config") or {}).get("model"))
    reg = mapping_registry(m)
    hf = dict(reg.megatron_to_hf(reader.get, reader.keys()))
    return build_hf_model(m, hf, dtype=dtype), reader.common


def _load_hf(path: Path, dtype: Optional[torch.dtype]) -> GenLIPModel:
    """An export through our modeling file (``from_pretrained`` equivalent, no remote code)."""
    reader = SafetensorsReader(path)
    emb = reader.shape("embeddings.weight") if "embeddings.weight" in reader.entries else None
    m, raw = read_hf_config(path, emb)
    vision_only = bool(raw.get("vision_only")) or emb is None
    reg = mapping_registry(m, vision_only=vision_only)
    reg.check_hf_keys(reader.keys())
    hf = {k: reader.get(k) for k in reg.hf_keys()}
    return build_hf_model(m, hf, vision_only=vision_only, dtype=dtype,
                          image_token_id=raw.get("image_token_id"))


def image_config_from_export(cfg: Mapping) -> ImageConfig:
    """The training image preprocessing recorded in an export (preprocessor_config.json or
    config.json keys ``image_policy``, ``image_size``, ...); defaults where absent."""
    return from_dict(ImageConfig, {**image_section_from_export(cfg), "device": "cpu"},
                     "data.image")


def checkpoint_image_config(path: str | Path) -> ImageConfig:
    """How the model at ``path`` saw images in training (size policy, side, resize kernel).

    HF export: its ``preprocessor_config.json`` (else ``config.json``); Megatron checkpoint: the
    run config's ``data.image``. The probes resize with it, so a model trained at 96 px is
    probed at 96 px without ``--size``.

    Raises:
        ConversionError: ``path`` is neither kind of checkpoint.
    """
    path = Path(path)
    for name in ("preprocessor_config.json", "config.json"):
        if (path / name).is_file():
            cfg = json.loads((path / name).read_text())
            if "image_policy" in cfg:
                return image_config_from_export(cfg)
    if (path / "config.json").is_file():
        logger.warning("%s records no image preprocessing (an older export); assuming fixed "
                       "224 px. Pass --size/--policy if it was trained otherwise.", path)
        return ImageConfig(decoder="pillow", device="cpu")
    common = DistCheckpointReader(path).common
    section = ((common.get("config") or {}).get("data") or {}).get("image") or {}
    known = {f.name for f in dataclasses.fields(ImageConfig)}
    img = ImageConfig(**{k: v for k, v in section.items() if k in known})
    img.device = "cpu"
    return img


def load_genlip_for_inference(path: str | Path, *, dtype: Optional[torch.dtype] = torch.float32,
                              device: str | torch.device = "cpu",
                              tokenizer: Optional[str | Path] = None
                              ) -> tuple[GenLIPModel, Optional[TextTokenizer]]:
    """Load an HF export or a Megatron checkpoint as an eval-mode HF ``GenLIPModel``.

    Args:
        path: HF export dir, Megatron ``iter_N`` dir, or a Megatron save dir (its ``latest``,
            else its newest finished checkpoint).
        dtype: weight dtype (fp32 default; None keeps the stored dtype).
        device: where to put the model.
        tokenizer: tokenizer.json to use; default: the export's ``tokenizer.json``, or the
            training config's ``data.text.tokenizer_path`` of a Megatron checkpoint.

    Returns:
        (model, tokenizer or None when none was found).
    """
    path = Path(path)
    tok_path: Optional[Path] = Path(tokenizer) if tokenizer is not None else None
    if (path / "config.json").is_file():
        model = _load_hf(path, dtype)
        if tok_path is None and (path / "tokenizer.json").is_file():
            tok_path = path / "tokenizer.json"
    else:
        try:   # the checkpoint a save dir means, as to-hf and the trainer choose it
            ckpt = find_checkpoint_dir(path)
        except ConversionError as exc:
            raise ConversionError(f"neither an HF export (config.json) nor a Megatron "
                                  f"checkpoint: {exc}") from exc
        model, common = _load_megatron(ckpt, dtype)
        if tok_path is None:   # the run's tokenizer, from here or above the checkpoint
            tok_path, _ = resolve_run_tokenizer(common, path)
    tok = load_tokenizer(tok_path) if tok_path is not None else None
    if tok is None:
        logger.warning("no tokenizer found for %s; pass tokenizer= to decode text.", path)
    return model.to(device), tok
