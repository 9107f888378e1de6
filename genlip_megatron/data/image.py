"""Images: size policies, header probe, DALI / Pillow decoding, resize, patchify, normalise.

Pixel path (docs/reference-architecture.md, Image processor):
  encoded bytes → decode to RGB (P → RGBA → RGB; no EXIF rotation, like PIL) → resize bilinear
  with antialiasing to the policy's size → uint8 patches ``[N, C*p*p]`` in raster (row, col)
  order, each flattened (C, ph, pw) → float32 ``x/127.5 - 1`` (= (x/255 - 0.5)/0.5) when rows
  are assembled (uint8 travels between processes: 4× less than float32).

Decoders share one interface, ``decode(datas, sizes) -> list[tensor | SampleError]``:
- :class:`DaliDecoder`: one pipeline definition, ``decoders.image(device="mixed")`` on GPU,
  ``device="cpu"`` with ``device_id=None`` otherwise; resize in DALI (``fn.resize``) or, on CPU
  by default, torch's uint8 antialiased bilinear (measured ~3× faster than DALI's CPU resize and
  closer to the reference's PIL output). Images DALI cannot take (a format other than
  JPEG/PNG/WebP whatever the file name says, e.g. a GIF named .png; a JPEG, PNG or WebP cut
  short) never reach it: they go to Pillow directly, because repeated DALI failures and
  pipeline rebuilds segfault DALI's CPU decoder (see :func:`dali_can_decode`). A failing
  batch invalidates the pipeline; it is rebuilt and the batch bisected, so only the image
  that fails by itself is decoded by Pillow and every image's pixels are independent of its
  batch-mates (exact resume). Pillow fallbacks are counted
  (``last_fallbacks``) and refused with ``data.image.allow_fallback: false``.
- :class:`PillowDecoder`: PIL decode + PIL BILINEAR resize, exactly the reference.

High-bit-depth (16-bit) grayscale PNGs are scaled to 8 bits as DALI does (``round(v / 257)``)
in :func:`pil_decode`, not clipped as PIL's ``convert`` does, so both decoders agree.
"""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from genlip_megatron.config.data import ImageConfig
from genlip_megatron.data.template import SampleError

logger = logging.getLogger(__name__)

DecodeResult = Union[torch.Tensor, SampleError]  # uint8 [H, W, 3] or why it failed
# Formats DALI's decoders.image takes (PIL format names); anything else goes to Pillow.
DALI_FORMATS = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Test hook (read at call time): a decode whose input contains these bytes kills its process
# with SIGSEGV, standing in for a native decoder crash.
CRASH_MARKER_ENV = "GENLIP_TEST_DECODER_CRASH_MARKER"


class FallbackRefused(RuntimeError):
    """DALI failed on an image Pillow decodes, and data.image.allow_fallback is false."""


# ----------------------------------------------------------------------------- sizes
_IMAGE_DEFAULTS = ImageConfig()   # the one home of the size defaults (config/data.py)


def smart_resize(height: int, width: int, factor: int = _IMAGE_DEFAULTS.patch_size,
                 min_pixels: int = _IMAGE_DEFAULTS.min_pixels,
                 max_pixels: int = _IMAGE_DEFAULTS.max_pixels,
                 max_aspect_ratio: float = _IMAGE_DEFAULTS.max_aspect_ratio) -> tuple[int, int]:
    """Reference ``smart_resize`` (tasks/custom_navit_processor.py): size in multiples of factor.

    1. round H and W to multiples of ``factor`` (Python's round: halves go to even);
    2. area > max_pixels: ``beta = sqrt(HW/max)``, ``floor(H/beta/factor)*factor`` (≥ factor);
    3. area < min_pixels: ``beta = sqrt(min/HW)``, ``ceil(H*beta/factor)*factor``.

    Raises:
        SampleError("aspect_ratio") if max(H, W) / min(H, W) > max_aspect_ratio.
    """
    if max(height, width) / min(height, width) > max_aspect_ratio:
        raise SampleError("aspect_ratio", f"{width}x{height}")
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


def target_size(cfg: ImageConfig, height: int, width: int) -> tuple[int, int]:
    """Output (height, width) of an image under ``cfg.policy``, or raise SampleError.

    Rejects 1×1 images (reference) and aspect ratios above ``cfg.max_aspect_ratio``.
    """
    if height * width <= 1:
        raise SampleError("image_too_small", f"{width}x{height}")
    if cfg.policy == "fixed":
        if max(height, width) / min(height, width) > cfg.max_aspect_ratio:
            raise SampleError("aspect_ratio", f"{width}x{height}")
        return cfg.fixed_size, cfg.fixed_size
    return smart_resize(height, width, cfg.patch_size, cfg.min_pixels, cfg.max_pixels,
                        cfg.max_aspect_ratio)


@dataclass
class ImageInfo:
    """What the header says about an encoded image (no pixel decoding)."""

    width: int
    height: int
    format: str  # "JPEG", "PNG", "WEBP", ...
    mode: str    # "RGB", "L", "CMYK", "RGBA", "P", ...


def probe_image(data: bytes) -> ImageInfo:
    """Read size/format from the header (microseconds; PIL opens lazily).

    Raises:
        SampleError: undecodable_image (not an image), image_too_large (more pixels than
            PIL's decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                info = ImageInfo(im.width, im.height, im.format or "?", im.mode)
    except Image.DecompressionBombError as exc:
        raise SampleError("image_too_large", str(exc)[:120]) from None
    except Exception as exc:  # PIL raises several types for garbage bytes
        raise SampleError("undecodable_image", f"{type(exc).__name__}: {exc}"[:120]) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and info.width * info.height > limit:
        raise SampleError("image_too_large", f"{info.width}x{info.height} > {limit} pixels")
    return info


def dali_can_decode(data: bytes) -> bool:
    """True when the bytes are a complete JPEG, PNG or WebP: what DALI's CPU decoder is given.

    Checked on the magic bytes (not the member's file extension) and on the end of the file
    (JPEG end marker, PNG IEND chunk, WebP RIFF length): every DALI failure invalidates the
    pipeline, and repeated failure + rebuild cycles segfault DALI's CPU decoder (measured with
    truncated PNGs, bad WebPs and GIFs named .png), so anything suspect goes to Pillow.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # RIFF length, then a VP8* chunk
        riff = int.from_bytes(data[4:8], "little") + 8
        chunk = int.from_bytes(data[16:20], "little") + 20
        return riff <= len(data) <= riff + 1 and data[12:16] in (b"VP8 ", b"VP8L", b"VP8X") \
            and chunk <= riff
    kind = next((f for magic, f in DALI_FORMATS.items() if data.startswith(magic)), None)
    if kind == "PNG":
        return data.rfind(b"IEND", max(0, len(data) - 64)) >= 0
    return kind == "JPEG" and not jpeg_looks_truncated(data)


def jpeg_looks_truncated(data: bytes) -> bool:
    """True for a JPEG whose last bytes (ignoring up to 4 KiB of padding) are not the EOI
    marker (FF D9). Looks at the tail only: no copy of the whole image."""
    return data[:2] == b"\xff\xd8" and data[-4096:].rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9"


# ----------------------------------------------------------------------------- pixels
def resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 ``[H, W, 3]`` image to ``size`` = (h, w).

    On CPU this is torch's uint8 channels-last kernel (a port of PIL's resampling); elsewhere it
    goes through float32 and rounds.
    """
    if tuple(img.shape[:2]) == tuple(size):
        return img
    # [1, 3, H, W] view of the HWC buffer; channels-last is what the fast uint8 kernel wants
    x = img.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu":
        y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    else:
        y = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True,
                          align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return y[0].permute(1, 2, 0).contiguous()  # no copy when y is channels-last


def patchify(img: torch.Tensor, patch: int) -> torch.Tensor:
    """uint8 ``[H, W, C]`` → ``[H/p * W/p, C*p*p]``: raster order, each patch (C, ph, pw)."""
    h, w, c = img.shape
    gh, gw = h // patch, w // patch
    x = img.reshape(gh, patch, gw, patch, c).permute(0, 2, 4, 1, 3)  # [gh, gw, C, ph, pw]
    return x.reshape(gh * gw, c * patch * patch)


def normalize_patches(patches: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 patches → float32 with mean = std = 0.5: ``(x/255 - 0.5)/0.5``."""
    if out is None:
        out = torch.empty(patches.shape, dtype=torch.float32, device=patches.device)
    # copy_ then in-place float ops: ~8× faster than torch.mul(uint8, float, out=float32)
    out.copy_(patches)
    return out.mul_(2.0 / 255.0).sub_(1.0)


def pil_decode(data: bytes) -> Image.Image:
    """Reference decode: PIL open, P → RGBA → RGB, else convert('RGB'); 16-bit grayscale is
    scaled to 8 bits like DALI (``round(v / 257)``) instead of clipped. Raises SampleError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.mode in _HIGH_BIT_MODES:
                wide = np.asarray(im).astype(np.int64).clip(0, 65535)
                im = Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")
            im = im.convert("RGBA").convert("RGB") if im.mode == "P" else im.convert("RGB")
        return im
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError("undecodable_image", f"{type(exc).__name__}: {exc}"[:120]) from None


def crash_hook(datas: Sequence[bytes]) -> None:
    """Test stand-in for a native decoder crash (see :data:`CRASH_MARKER_ENV`)."""
    marker = os.environ.get(CRASH_MARKER_ENV)
    if marker and any(marker.encode() in d for d in datas):
        os.kill(os.getpid(), signal.SIGSEGV)


@contextmanager
def stderr_to_debug_log():
    """Send what native code writes to file descriptor 2 (libpng warnings from DALI's PNG
    parser) to this module's debug log instead of the console."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(4096).decode("utf-8", "replace").strip()
            if text:
                logger.debug("DALI stderr: %s", text)


# ----------------------------------------------------------------------------- decoders
class PillowDecoder:
    """Reference pixel path: PIL decode, PIL BILINEAR resize (no DALI needed)."""

    device = "cpu"

    def decode(self, datas: Sequence[bytes], sizes: Sequence[tuple[int, int]]
               ) -> list[DecodeResult]:
        """Decode and resize each image; failures come back as SampleError."""
        crash_hook(datas)
        out: list[DecodeResult] = []
        for data, (h, w) in zip(datas, sizes):
            try:
                im = pil_decode(data)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                out.append(torch.from_numpy(np.array(im, dtype=np.uint8)))
            except SampleError as exc:
                out.append(exc)
        return out


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(cfg: ImageConfig) -> str:
    """``cfg.device`` with auto resolved: gpu for DALI when CUDA is available, else cpu."""
    if cfg.device != "auto":
        return cfg.device
    return "gpu" if cfg.decoder == "dali" and torch.cuda.is_available() else "cpu"


class DaliDecoder:
    """DALI decode (+ resize) of a batch of encoded images.

    Args:
        cfg: the ``data.image`` section.
        device: "cpu" (device_id=None) or "gpu" (decoders.image device="mixed").
    """

    def __init__(self, cfg: ImageConfig, device: str = "cpu") -> None:
        if not dali_available():
            raise ImportError("data.image.decoder is 'dali' but NVIDIA DALI is not installed; "
                              "`pip install nvidia-dali-cuda120` (or the 'dali' extra), or set "
                              "data.image.decoder: pillow.")
        self.cfg = cfg
        self.device = device
        backend = cfg.resize_backend
        self.resize_in_dali = backend == "dali" or (backend == "auto" and device == "gpu")
        self._pipe = None
        self.fallbacks = 0  # images decoded by Pillow
        self.last_fallbacks: set[int] = set()  # positions of the last decode() that were
        self._warned = False

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        cfg, device = self.cfg, self.device
        device_id = torch.cuda.current_device() if device == "gpu" else None

        @pipeline_def(batch_size=cfg.decode_batch_size, num_threads=cfg.dali_threads,
                      device_id=device_id, prefetch_queue_depth=1, exec_pipelined=False,
                      exec_async=False)
        def decode_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu",
                                       output_type=types.RGB, adjust_orientation=False)
            if self.resize_in_dali:
                size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)  # (h, w)
                images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR,
                                   antialias=True)
            return images

        pipe = decode_pipeline()
        pipe.build()
        return pipe

    def decode(self, datas: Sequence[bytes], sizes: Sequence[tuple[int, int]]
               ) -> list[DecodeResult]:
        """Decode + resize; returns uint8 ``[h, w, 3]`` tensors (on the GPU for device gpu).
        Positions decoded by Pillow are left in ``self.last_fallbacks``."""
        out: list[DecodeResult] = [None] * len(datas)  # type: ignore[list-item]
        self.last_fallbacks: set[int] = set()
        todo = []
        for i, d in enumerate(datas):
            if dali_can_decode(d):
                todo.append(i)
            else:
                out[i] = self._fallback_one(i, d, sizes[i], "not a JPEG/PNG/WebP DALI decodes")
        bs = self.cfg.decode_batch_size
        for start in range(0, len(todo), bs):
            self._decode_bisect(todo[start:start + bs], datas, sizes, out)
        return out

    def _decode_bisect(self, idx: list[int], datas: Sequence[bytes],
                       sizes: Sequence[tuple[int, int]], out: list) -> None:
        """DALI on ``idx``; on failure rebuild the pipeline and split the batch, down to the
        single images that fail by themselves (those go to Pillow)."""
        try:
            images = self._run([datas[i] for i in idx], [sizes[i] for i in idx])
        except RuntimeError as exc:  # a bad image poisons the batch and the pipeline
            self._pipe = None
            if len(idx) == 1:
                out[idx[0]] = self._fallback_one(idx[0], datas[idx[0]], sizes[idx[0]],
                                                 str(exc))
                return
            half = len(idx) // 2
            self._decode_bisect(idx[:half], datas, sizes, out)
            self._decode_bisect(idx[half:], datas, sizes, out)
            return
        for i, img in zip(idx, images):
            out[i] = img

    def _run(self, datas: list[bytes], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        crash_hook(datas)
        if self._pipe is None:
            self._pipe = self._build()
        with stderr_to_debug_log():
            self._pipe.feed_input("encoded", [np.frombuffer(d, np.uint8) for d in datas])
            if self.resize_in_dali:
                self._pipe.feed_input("size", [np.asarray(s, np.float32) for s in sizes])
            (images,) = self._pipe.run()
        if self.device == "gpu":
            # DALI reuses its output buffers on the next run: copy out now.
            tensors = [torch.as_tensor(images[i], device="cuda").clone()
                       for i in range(len(datas))]
        else:
            tensors = [torch.from_numpy(np.array(images[i])) for i in range(len(datas))]
        if not self.resize_in_dali:
            tensors = [resize_uint8(t, s) for t, s in zip(tensors, sizes)]
        return tensors

    def _fallback_one(self, i: int, data: bytes, size: tuple[int, int], why: str
                      ) -> DecodeResult:
        """Pillow decode of one image DALI did not decode (counted; refused if configured)."""
        try:
            img = torch.from_numpy(np.array(pil_decode(data), dtype=np.uint8))
        except SampleError as exc:
            return exc  # undecodable by either: a skip, not a fallback
        why = " ".join(why.split())[:300]
        if not self.cfg.allow_fallback:
            raise FallbackRefused(f"DALI could not decode an image that Pillow decodes ({why}) "
                                  "and data.image.allow_fallback is false; set it to true to "
                                  "decode such images with Pillow (counted as "
                                  "data/decode_fallbacks), or fix the data.")
        if not self._warned:
            self._warned = True
            logger.warning("DALI could not decode an image (%s); decoding it with Pillow. "
                           "Further fallbacks are counted as data/decode_fallbacks, not logged "
                           "(data.image.allow_fallback: false refuses them).", why)
        self.fallbacks += 1
        self.last_fallbacks.add(i)
        if self.device == "gpu":
            img = img.cuda()
        return resize_uint8(img, size)


def build_decoder(cfg: ImageConfig, device: Optional[str] = None):
    """The decoder ``cfg.decoder`` names, on ``device`` (default: :func:`resolve_device`)."""
    if cfg.decoder == "pillow":
        return PillowDecoder()
    return DaliDecoder(cfg, device or resolve_device(cfg))
