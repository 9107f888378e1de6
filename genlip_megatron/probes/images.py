"""Image files → model inputs for the probes, with the training resize policy.

Uses the data pipeline's own functions (``data.inference.image_to_patches``: the reference size
policy, the run's resize kernel, patches in (C, ph, pw) order, mean = std = 0.5) with the
checkpoint's ``data.image`` settings (``probes.checkpoint_image_config``), so a probe sees an
image exactly as training did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from PIL import Image

from genlip_megatron.config.data import DataConfig, ImageConfig
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
               config: Optional[ImageConfig] = None,
               policy: Optional[Literal["fixed", "native"]] = None, size: Optional[int] = None,
               patch_size: Optional[int] = None) -> ProbeImage:
    """Decode and resize like training (``data.image``: fixed square or native smart-resize).

    Args:
        source: file path, PIL image or uint8 ``[H, W, 3]`` array.
        config: the training ``data.image`` section (:func:`checkpoint_image_config`); None =
            the defaults (fixed 224, PIL resize).
        policy / size / patch_size: override ``config`` (``size`` is the fixed side).

    Raises:
        genlip_megatron.data.template.SampleError: undecodable, 1×1 or too elongated image.
    """
    if isinstance(source, (str, Path)):
        source = Path(source).read_bytes()
    cfg = dataclasses.replace(config) if config is not None else \
        ImageConfig(decoder="pillow", device="cpu")
    if policy is not None:
        cfg.policy = policy
    if size is not None:
        cfg.fixed_size = size
    if patch_size is not None:
        cfg.patch_size = patch_size
    patches, grid = image_to_patches(source, DataConfig(image=cfg))
    patches_t = torch.from_numpy(np.ascontiguousarray(patches))
    return ProbeImage(normalize_patches(patches_t), grid,
                      patches_to_image(patches_t, grid, cfg.patch_size))


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
