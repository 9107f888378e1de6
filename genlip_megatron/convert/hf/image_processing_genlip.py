"""GenLIP image processor for Hugging Face ``transformers`` (self-contained: no genlip_megatron).

Copied into every export with a ``preprocessor_config.json`` written from the training config,
so ``AutoImageProcessor.from_pretrained(export, trust_remote_code=True)`` preprocesses images
exactly as training did (``genlip_megatron.data.image``, docs/reference-architecture.md, Image
processor):

1. decode to RGB (palette images through RGBA, as PIL-based training does);
2. size: ``fixed`` = ``image_size`` × ``image_size`` (stage 1), or ``native`` = the reference
   smart-resize (multiples of ``patch_size``, area within [min_pixels, max_pixels]) (stage 2);
   1×1 images and aspect ratios above ``max_aspect_ratio`` are refused as in training;
3. resize: ``resample="pil"`` = PIL BILINEAR (the training ``pillow`` decoder), ``"torch"`` =
   torch's antialiased uint8 bilinear (the training DALI-on-CPU path);
4. patchify in raster (row, col) order, each patch flattened (C, ph, pw);
5. normalise ``(x / 255 - mean) / std`` (mean = std = 0.5: ``x * 2/255 - 1``, float32).

Output, chosen by ``layout`` (a constructor setting or a per-call override):

- ``"packed"`` (default; Qwen2-VL's layout): ``pixel_values`` ``[sum N_i, C*p*p]`` packed over
  the images and ``image_grid_thw`` ``[n, 3]`` = (t=1, gh, gw). This is exactly what
  transformers' Qwen2-VL image processor emits with ``patch_size=p``, ``temporal_patch_size=1``
  and ``merge_size=1`` (``self.merge_size``, ``self.temporal_patch_size``): patches in raster
  order, each flattened (C, T=1, ph, pw), t counting frames after temporal grouping.
- ``"images"`` (LLaVA's layout): ``pixel_values`` ``[B, C, H, W]`` only, the same normalised
  pixels un-patched; it needs every image at one size (always true for ``fixed``; ``native``
  only when the images resize alike) and is refused otherwise.

``GenLIPVisionModel`` takes both; ``[B, C, H, W]`` needs nothing else (its shape gives the grid).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor, bytes, str, Path]

__all__ = ["GenLIPImageProcessor", "smart_resize", "LAYOUTS"]

LAYOUTS = ("packed", "images")


def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 4096,
                 max_pixels: int = 262144, max_aspect_ratio: float = 200.0) -> tuple[int, int]:
    """Reference smart-resize: (H, W) in multiples of ``factor`` with area in [min, max].

    1. round H and W to multiples of ``factor`` (Python's round: halves go to even);
    2. area > max_pixels: ``beta = sqrt(HW/max)``, ``floor(H/beta/factor)*factor`` (>= factor);
    3. area < min_pixels: ``beta = sqrt(min/HW)``, ``ceil(H*beta/factor)*factor``.
    """
    if max(height, width) / min(height, width) > max_aspect_ratio:
        raise ValueError(f"image {width}x{height} has an aspect ratio above "
                         f"max_aspect_ratio={max_aspect_ratio} (training skips such images).")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_pil(image: ImageLike) -> Image.Image:
    """Any supported input → an RGB PIL image (palette images through RGBA, as training)."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)   # CHW → HWC
        if image.dtype != np.uint8:
            raise ValueError(f"array images must be uint8 [H, W, 3], got {image.dtype}.")
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1
                                else image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"unsupported image type {type(image).__name__}; give a PIL image, a "
                         "uint8 array, encoded bytes or a file path.")
    return image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")


def _resize(image: Image.Image, size: tuple[int, int], resample: str) -> torch.Tensor:
    """uint8 ``[h, w, 3]`` of ``image`` resized to ``size`` = (h, w) with the training kernel."""
    h, w = size
    if resample == "pil":
        if image.size != (w, h):
            image = image.resize((w, h), Image.BILINEAR)
        return torch.from_numpy(np.array(image, dtype=np.uint8))
    arr = torch.from_numpy(np.array(image, dtype=np.uint8))
    if tuple(arr.shape[:2]) == (h, w):
        return arr
    # torch's uint8 channels-last antialiased kernel (a port of PIL's resampling)
    x = arr.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    y = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).contiguous()


class GenLIPImagesKwargs(ImagesKwargs, total=False):
    """Our settings as transformers' typed image kwargs: ``from_pretrained(export, layout=...)``
    then reaches the constructor (and its checks) instead of being set on the instance
    unchecked, and composite processors (``LlavaProcessor``) route them to this processor."""

    image_policy: str
    image_size: int
    patch_size: int
    min_pixels: int
    max_pixels: int
    max_aspect_ratio: float
    resample: str
    layout: str


class GenLIPImageProcessor(BaseImageProcessor):
    """Images → ``pixel_values`` ``[sum N_i, C*p*p]`` + ``image_grid_thw`` ``[n, 3]`` (packed),
    or ``pixel_values`` ``[B, C, H, W]`` (``layout="images"``, for LLaVA).

    Args:
        image_policy: ``"fixed"`` (square ``image_size``) or ``"native"`` (smart-resize).
        image_size: side in pixels for ``fixed`` (a multiple of ``patch_size``).
        patch_size: patch side.
        min_pixels / max_pixels: area bounds of ``native``.
        max_aspect_ratio: longer/shorter side above this is refused (training skips it).
        resample: ``"pil"`` (PIL BILINEAR) or ``"torch"`` (antialiased bilinear).
        image_mean / image_std: per-channel normalisation (0.5 each in GenLIP).
        layout: ``"packed"`` (Qwen2-VL) or ``"images"`` (LLaVA); see the module docstring.
    """

    model_input_names = ["pixel_values", "image_grid_thw"]
    valid_kwargs = GenLIPImagesKwargs
    # Qwen2-VL consumers (its processor, its model) read these: one frame, no 2x2 token merge.
    temporal_patch_size = 1
    merge_size = 1

    def __init__(self, image_policy: str = "fixed", image_size: int = 224, patch_size: int = 16,
                 min_pixels: int = 4096, max_pixels: int = 262144,
                 max_aspect_ratio: float = 200.0, resample: str = "pil",
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), layout: str = "packed",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not 'packed' (Qwen2-VL) or 'images' (LLaVA).")
        if image_policy not in ("fixed", "native"):
            raise ValueError(f"image_policy {image_policy!r} is not 'fixed' or 'native'.")
        if resample not in ("pil", "torch"):
            raise ValueError(f"resample {resample!r} is not 'pil' or 'torch'.")
        if image_policy == "fixed" and image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}.")
        self.image_policy = image_policy
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.resample = resample
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.layout = layout

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to (the training rule)."""
        if height * width <= 1:
            raise ValueError(f"image {width}x{height} is too small (training skips 1x1 images).")
        if self.image_policy == "fixed":
            if max(height, width) / min(height, width) > self.max_aspect_ratio:
                raise ValueError(f"image {width}x{height} has an aspect ratio above "
                                 f"max_aspect_ratio={self.max_aspect_ratio}.")
            return self.image_size, self.image_size
        return smart_resize(height, width, self.patch_size, self.min_pixels, self.max_pixels,
                            self.max_aspect_ratio)

    def num_patches(self, height: int, width: int) -> int:
        """Image tokens of an image of this size (``<|image_pad|>`` count in the prompt)."""
        h, w = self.target_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size)

    def _normalize(self, pixels: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """uint8 → float32 with channels along ``channel_dim`` (patches ``[N, C*p*p]``: dim 1,
        C-major); the same float ops as training for uniform mean/std."""
        out = pixels.to(torch.float32)
        mean, std = self.image_mean, self.image_std
        if len(set(mean)) == 1 and len(set(std)) == 1:
            return out.mul_(1.0 / (255.0 * std[0])).sub_(mean[0] / std[0])
        c = len(mean)
        per = pixels.shape[channel_dim] // c
        shape = [1] * pixels.dim()
        shape[channel_dim] = pixels.shape[channel_dim]
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).repeat_interleave(per)
        shift = torch.tensor([m / s for m, s in zip(mean, std)]).repeat_interleave(per)
        return out.mul_(scale.reshape(shape)).sub_(shift.reshape(shape))

    def preprocess_one(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int],
                                                        torch.Tensor]:
        """One image → (normalised patches ``[N, C*p*p]``, grid (gh, gw), resized uint8 HWC)."""
        pil = _to_pil(image)
        h, w = self.target_size(pil.height, pil.width)
        img = _resize(pil, (h, w), self.resample)
        p = self.patch_size
        gh, gw = h // p, w // p
        c = img.shape[2]
        patches = img.reshape(gh, p, gw, p, c).permute(0, 2, 4, 1, 3).reshape(gh * gw, c * p * p)
        return self._normalize(patches), (gh, gw), img

    def preprocess(self, images: Union[ImageLike, Sequence[ImageLike]],
                   return_tensors: Optional[str] = "pt", **kwargs: Any) -> BatchFeature:
        """Preprocess one image or a list (nested lists are flattened, in order).

        Args:
            images: PIL images, uint8 ``[H, W, 3]`` arrays, encoded bytes or file paths.
            return_tensors: ``"pt"`` (default) or ``"np"``.
            kwargs: per-call overrides of the constructor settings (e.g. ``image_size=224``,
                ``layout="images"``).
        """
        if kwargs:
            unknown = sorted(set(kwargs) - set(_SETTINGS))
            if unknown:
                raise ValueError(f"unknown GenLIPImageProcessor options {unknown}.")
            settings = {**{k: getattr(self, k) for k in _SETTINGS}, **kwargs}
            return GenLIPImageProcessor(**settings).preprocess(images, return_tensors)
        flat = list(_flatten(images))
        if not flat:
            raise ValueError("no images given.")
        data = self._images_layout(flat) if self.layout == "images" else self._packed(flat)
        if return_tensors == "np":
            data = {k: v.numpy() for k, v in data.items()}
        elif return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors {return_tensors!r} is not 'pt' or 'np'.")
        return BatchFeature(data=data, tensor_type=None)

    def _packed(self, flat: list) -> dict[str, torch.Tensor]:
        """Qwen2-VL layout: packed patches + ``image_grid_thw`` (t=1, gh, gw)."""
        pixels, grids = [], []
        for im in flat:
            px, (gh, gw), _ = self.preprocess_one(im)
            pixels.append(px)
            grids.append([1, gh, gw])
        return {"pixel_values": torch.cat(pixels),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def _images_layout(self, flat: list) -> dict[str, torch.Tensor]:
        """LLaVA layout: ``[B, C, H, W]`` of the same normalised pixels (one size for all)."""
        resized = []
        for im in flat:
            pil = _to_pil(im)
            resized.append(_resize(pil, self.target_size(pil.height, pil.width), self.resample))
        sizes = sorted({tuple(r.shape[:2]) for r in resized})
        if len(sizes) > 1:
            raise ValueError(f"layout='images' stacks [B, C, H, W] but the {self.image_policy} "
                             f"policy resized these images to {len(sizes)} sizes (h, w) "
                             f"{sizes}; use layout='packed' (+ image_grid_thw) for native "
                             "resolution.")
        batch = torch.stack(resized).permute(0, 3, 1, 2)   # uint8 [B, C, H, W]
        return {"pixel_values": self._normalize(batch, channel_dim=1).contiguous()}

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


_SETTINGS = ("image_policy", "image_size", "patch_size", "min_pixels", "max_pixels",
             "max_aspect_ratio", "resample", "image_mean", "image_std", "layout")


def _flatten(images):
    if isinstance(images, (list, tuple)):
        for im in images:
            yield from _flatten(im)
    else:
        yield images
