"""Shared helpers of the convert/probes tests: tiny random checkpoints and packed batches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from reference_genlip import make_packed_batch
from safetensors.torch import save_file

from genlip_megatron.config import RunConfig, ModelConfig, ParallelConfig, PrecisionConfig, \
    decode_variant
from genlip_megatron.convert.converter import write_hf_files
from genlip_megatron.convert.registry import hf_shapes

TINY = decode_variant("tiny")          # H 64, T 48, 2 layers, 4 heads, FFN 176, vocab 256


def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(decode_variant("tiny"), **overrides)


def random_hf_state_dict(m: ModelConfig, seed: int = 0, vision_only: bool = False,
                         scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random tensors of every HF key (LayerNorm weights near 1, LayerScale near 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for pattern, shape in hf_shapes(m, vision_only).items():
        names = [pattern.replace("*", str(i)) for i in range(m.num_layers)] \
            if "*" in pattern else [pattern]
        for name in names:
            t = torch.randn(shape, generator=gen) * scale
            if name.endswith(("layer_norm1.weight", "layer_norm2.weight", "ln_post.weight",
                              "q_norm.weight", "k_norm.weight")):
                t += 1.0
            if name.endswith("lambda1"):
                t = t * 0.2 + 0.1
            out[name] = t
    return out


def write_hf_export(dst: Path, m: ModelConfig, sd: dict, *, dtype: str = "fp32",
                    vision_only: bool = False, tokenizer=None,
                    config_edit: Optional[dict] = None, drop_config: Sequence[str] = (),
                    image: Optional[dict] = None) -> Path:
    """An export directory as our converter writes it (config edits simulate the reference's;
    ``image``: ``hf_config.image_settings`` of the pretend training run)."""
    dst.mkdir(parents=True, exist_ok=True)
    write_hf_files(dst, m, dtype=dtype, vision_only=vision_only, tokenizer=tokenizer,
                   image=image)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    save_file({k: v.to(torch_dtype).contiguous() for k, v in sd.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_edit or drop_config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_edit or {})
        for k in drop_config:
            cfg.pop(k, None)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def packed_batch(rows: Sequence[Sequence[tuple[int, int, int]]], seq_len: int, vocab: int,
                 patch_dim: int = 768, seed: int = 0) -> dict:
    """PackedBatch-layout inputs (no labels): per row, samples (gh, gw, text_len)."""
    b = make_packed_batch(rows, seq_len, vocab, patch_dim=patch_dim, seed=seed)
    return {k: b[k] for k in ("tokens", "position_ids", "image_mask", "segment_ids",
                              "pixel_values", "grid_hw")}


def full_config_dict(m: ModelConfig, tp: int = 1, pp: int = 1, data=None) -> dict:
    """The run config dict a trainer saves in a checkpoint's common state (``data``: a
    ``DataConfig``, default the defaults)."""
    extra = {"data": data} if data is not None else {}
    return RunConfig(model=m, parallel=ParallelConfig(tp=tp, pp=pp), **extra).to_dict()


def transformer_config(m: ModelConfig, tp: int = 1, pp: int = 1, seed: int = 1234):
    from genlip_megatron.model.transformer_config import build_transformer_config

    return build_transformer_config(m, ParallelConfig(tp=tp, pp=pp),
                                    PrecisionConfig(params_dtype="fp32"), init_seed=seed,
                                    has_cuda=False)


def save_megatron(models: list, m: ModelConfig, save_dir: Path, step: int = 3,
                  tp: int = 1, pp: int = 1, data=None) -> Path:
    """Save model chunks the way the trainer does (CheckpointManager, no optimizer)."""
    from genlip_megatron.training.checkpointing import CheckpointManager, TrainingState
    from genlip_megatron.config.training import CheckpointConfig

    mgr = CheckpointManager(CheckpointConfig(save_dir=str(save_dir)))
    return mgr.save(models, None, None, TrainingState(step=step), None,
                    full_config_dict(m, tp, pp, data))


def load_megatron(models: list, m: ModelConfig, path: Path) -> None:
    """The trainer's ``training.init_from`` path (weights only)."""
    from genlip_megatron.training.checkpointing import CheckpointManager
    from genlip_megatron.config.training import CheckpointConfig

    CheckpointManager(CheckpointConfig()).load(path, models, None, None, None,
                                               full_config_dict(m), with_optimizer=False)


def tiny_hf_model():
    """The HF GenLIPModel of ``TINY`` with random, non-initial weights (probe/evaluation tests)."""
    from genlip_megatron.probes.loading import build_hf_model

    return build_hf_model(TINY, random_hf_state_dict(TINY, seed=5, scale=0.3))


def random_patch_images(grids: Sequence[tuple[int, int]], seed: int = 0) -> list:
    """``(patches [h*w, 768] in [-1, 1], (h, w))`` per grid, seeded."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(h * w, 768, generator=g) * 2 - 1, (h, w)) for h, w in grids]
