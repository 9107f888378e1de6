"""Shared helpers of the convert/probes tests: tiny random checkpoints and packed batches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from genlip_megatron.config import GenLIPConfig, ModelConfig, ParallelConfig, PrecisionConfig, \
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
            if name.endswith(("layer_norm1.weight", "layer_norm2.weight", "ln_post.weight")):
                t += 1.0
            if name.endswith("lambda1"):
                t = t * 0.2 + 0.1
            out[name] = t
    return out


def write_hf_export(dst: Path, m: ModelConfig, sd: dict, *, dtype: str = "fp32",
                    vision_only: bool = False, tokenizer=None,
                    config_edit: Optional[dict] = None, drop_config: Sequence[str] = ()) -> Path:
    """An export directory as our converter writes it (config edits simulate the reference's)."""
    dst.mkdir(parents=True, exist_ok=True)
    write_hf_files(dst, m, dtype=dtype, vision_only=vision_only, tokenizer=tokenizer)
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
    """PackedBatch-layout tensors: per row, samples (gh, gw, text_len) of [image | text]."""
    gen = torch.Generator().manual_seed(seed)
    b = len(rows)
    tokens = torch.zeros(b, seq_len, dtype=torch.int64)
    pos = torch.zeros(b, 3, seq_len, dtype=torch.int64)
    image_mask = torch.zeros(b, seq_len, dtype=torch.bool)
    segment_ids = torch.full((b, seq_len), -1, dtype=torch.int32)
    grids = []
    for r, samples in enumerate(rows):
        at = 0
        for j, (gh, gw, n_text) in enumerate(samples):
            n_img = gh * gw
            segment_ids[r, at:at + n_img + n_text] = j
            image_mask[r, at:at + n_img] = True
            pos[r, 1, at:at + n_img] = torch.arange(gh).repeat_interleave(gw)
            pos[r, 2, at:at + n_img] = torch.arange(gw).repeat(gh)
            t0 = at + n_img
            tokens[r, t0:t0 + n_text] = torch.randint(1, vocab, (n_text,), generator=gen)
            pos[r, :, t0:t0 + n_text] = max(gh, gw) + torch.arange(n_text)
            grids.append((gh, gw))
            at = t0 + n_text
    pixels = torch.rand(int(image_mask.sum()), patch_dim, generator=gen) * 2 - 1
    return dict(tokens=tokens, position_ids=pos, image_mask=image_mask, segment_ids=segment_ids,
                pixel_values=pixels, grid_hw=torch.tensor(grids))


def full_config_dict(m: ModelConfig, tp: int = 1, pp: int = 1) -> dict:
    """The run config dict a trainer saves in a checkpoint's common state."""
    return GenLIPConfig(model=m, parallel=ParallelConfig(tp=tp, pp=pp)).to_dict()


def transformer_config(m: ModelConfig, tp: int = 1, pp: int = 1, seed: int = 1234):
    from genlip_megatron.model.transformer_config import build_transformer_config

    return build_transformer_config(m, ParallelConfig(tp=tp, pp=pp),
                                    PrecisionConfig(params_dtype="fp32"), init_seed=seed,
                                    has_cuda=False)


def save_megatron(models: list, m: ModelConfig, save_dir: Path, step: int = 3,
                  tp: int = 1, pp: int = 1) -> Path:
    """Save model chunks the way the trainer does (CheckpointManager, no optimizer)."""
    from genlip_megatron.training.checkpointing import CheckpointManager, TrainingState
    from genlip_megatron.training.config import CheckpointConfig

    mgr = CheckpointManager(CheckpointConfig(save_dir=str(save_dir)))
    return mgr.save(models, None, None, TrainingState(step=step), None,
                    full_config_dict(m, tp, pp))


def load_megatron(models: list, m: ModelConfig, path: Path) -> None:
    """The trainer's ``training.init_from`` path (weights only)."""
    from genlip_megatron.training.checkpointing import CheckpointManager
    from genlip_megatron.training.config import CheckpointConfig

    CheckpointManager(CheckpointConfig()).load(path, models, None, None, None,
                                               full_config_dict(m), with_optimizer=False)
