"""Vision-encoder features (``ln_post`` output, width H) for downstream use.

``encode_images`` batches images through the HF module's image-only pass (bidirectional
attention inside each image, positions (0, r, c)); :func:`save_features` writes them to a
safetensors file, one ``[gh*gw, H]`` tensor per image plus its grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.convert.hf.modeling_genlip import stack_grids

__all__ = ["encode_images", "save_features"]


@torch.no_grad()
def encode_images(model: GenLIPModel, images: Sequence[tuple[torch.Tensor, tuple[int, int]]],
                  batch_size: int = 16, pool: bool = False) -> list[torch.Tensor]:
    """Patch features per image: ``[gh*gw, H]`` (or ``[H]`` mean-pooled with ``pool``).

    Args:
        model: HF-format GenLIP (a vision-only export works).
        images: ``(pixel_values [N, C*p*p], (gh, gw))`` per image.
        batch_size: images per forward.
        pool: mean over patches (a global image vector).
    """
    dtype = model.ln_post.weight.dtype
    device = model.ln_post.weight.device
    out: list[torch.Tensor] = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pixels = torch.cat([torch.as_tensor(px) for px, _ in chunk]).to(device, dtype)
        feats = model.encode_images(pixels, stack_grids([g for _, g in chunk]).to(device))
        out += [f.mean(0) if pool else f for f in feats]
    return out


def save_features(path: str | Path, features: Sequence[torch.Tensor],
                  grids: Sequence[tuple[int, int]], names: Sequence[str]) -> Path:
    """Write ``features/<i>`` and ``grid/<i>`` tensors plus the image names as metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (f, g) in enumerate(zip(features, grids)):
        tensors[f"features/{i}"] = f.detach().float().cpu().contiguous()
        tensors[f"grid/{i}"] = torch.tensor(list(g), dtype=torch.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"names": "\n".join(map(str, names))})
    return path
