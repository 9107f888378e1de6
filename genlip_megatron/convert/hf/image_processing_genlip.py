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

Output (Qwen2-VL's layout): ``pixel_values`` ``[sum N_i, C*p*p]`` packed over the images and
``image_grid_thw`` ``[n, 3]`` = (1, gh, gw), what ``GenLIPVisionModel`` and ``GenLIPModel``
take.
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

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor, bytes, str, Path]

__all__ = ["GenLIPImageProcessor", "smart_resize"]


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


class GenLIPImageProcessor(BaseImageProcessor):
    """Images → ``pixel_values`` ``[sum N_i, C*p*p]`` + ``image_grid_thw`` ``[n, 3]``.

    Args:
        image_policy: ``"fixed"`` (square ``image_size``) or ``"native"`` (smart-resize).
        image_size: side in pixels for ``fixed`` (a multiple of ``patch_size``).
        patch_size: patch side.
        min_pixels / max_pixels: area bounds of ``native``.
        max_aspect_ratio: longer/shorter side above this is refused (training skips it).
        resample: ``"pil"`` (PIL BILINEAR) or ``"torch"`` (antialiased bilinear).
        image_mean / image_std: per-channel normalisation (0.5 each in GenLIP).
    """

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, image_policy: str = "fixed", image_size: int = 224, patch_size: int = 16,
                 min_pixels: int = 4096, max_pixels: int = 262144,
                 max_aspect_ratio: float = 200.0, resample: str = "pil",
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
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

    def _normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C*p*p]`` → float32; the same float ops as training for uniform mean/std."""
        out = patches.to(torch.float32)
        mean, std = self.image_mean, self.image_std
        if len(set(mean)) == 1 and len(set(std)) == 1:
            return out.mul_(1.0 / (255.0 * std[0])).sub_(mean[0] / std[0])
        c = len(mean)
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).repeat_interleave(
            patches.shape[1] // c)
        shift = torch.tensor([m / s for m, s in zip(mean, std)]).repeat_interleave(
            patches.shape[1] // c)
        return out.mul_(scale).sub_(shift)

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
            kwargs: per-call overrides of the constructor settings (e.g. ``image_size=224``).
        """
        if kwargs:
            unknown = sorted(set(kwargs) - set(self.to_dict()))
            if unknown:
                raise ValueError(f"unknown GenLIPImageProcessor options {unknown}.")
            settings = {**{k: v for k, v in self.to_dict().items()
                           if k in ("image_policy", "image_size", "patch_size", "min_pixels",
                                    "max_pixels", "max_aspect_ratio", "resample", "image_mean",
                                    "image_std")}, **kwargs}
            return GenLIPImageProcessor(**settings).preprocess(images, return_tensors)
        flat = list(_flatten(images))
        if not flat:
            raise ValueError("no images given.")
        pixels, grids = [], []
        for im in flat:
            px, (gh, gw), _ = self.preprocess_one(im)
            pixels.append(px)
            grids.append([1, gh, gw])
        data = {"pixel_values": torch.cat(pixels),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if return_tensors == "np":
            data = {k: v.numpy() for k, v in data.items()}
        elif return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors {return_tensors!r} is not 'pt' or 'np'.")
        return BatchFeature(data=data, tensor_type=None)

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


def _flatten(images):
    if isinstance(images, (list, tuple)):
        for im in images:
            yield from _flatten(im)
    else:
        yield images
