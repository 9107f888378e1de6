"""Image files → model inputs for the probes, with the training resize policy.

Uses the data pipeline's own functions (``data.inference.image_to_patches``: the reference size
policy and PIL bilinear resize, patches in (C, ph, pw) order, mean = std = 0.5), so a probe sees
an image exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
from PIL import Image

from genlip_megatron.data.config import DataConfig, ImageConfig
from genlip_megatron.data.image import normalize_patches
from genlip_megatron.data.inference import image_to_patches

__all__ = ["ProbeImage", "load_image", "patches_to_image"]


@dataclass
class ProbeImage:
    """One preprocessed image.

    Attributes:
        pixel_values: float32 ``[N, C*p*p]`` normalised patches (raster order).
        grid: (gh, gw) patch grid.
        image: the resized RGB image the patches come from (for drawing).
    """

    pixel_values: torch.Tensor
    grid: tuple[int, int]
    image: Image.Image

    def as_input(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(pixel_values, grid)`` as the generation / readout APIs take it."""
        return self.pixel_values, self.grid


def load_image(source: Union[str, Path, Image.Image, np.ndarray], *,
               policy: Literal["fixed", "native"] = "fixed", size: int = 224,
               patch_size: int = 16) -> ProbeImage:
    """Decode and resize like training (``data.image``: fixed 224×224 or native smart-resize).

    Raises:
        genlip_megatron.data.template.SampleError: undecodable, 1×1 or too elongated image.
    """
    if isinstance(source, (str, Path)):
        source = Path(source).read_bytes()
    cfg = DataConfig(image=ImageConfig(policy=policy, fixed_size=size, patch_size=patch_size,
                                       decoder="pillow"))
    patches, grid = image_to_patches(source, cfg)
    patches_t = torch.from_numpy(np.ascontiguousarray(patches))
    return ProbeImage(normalize_patches(patches_t), grid,
                      patches_to_image(patches_t, grid, patch_size))


def patches_to_image(patches: torch.Tensor, grid: tuple[int, int],
                     patch_size: int = 16) -> Image.Image:
    """Inverse of patchify: uint8 or normalised float ``[N, 3*p*p]`` → RGB PIL image."""
    gh, gw = grid
    p = patch_size
    x = patches
    if x.dtype != torch.uint8:
        x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    img = x.reshape(gh, gw, 3, p, p).permute(0, 3, 1, 4, 2).reshape(gh * p, gw * p, 3)
    return Image.fromarray(img.numpy())
