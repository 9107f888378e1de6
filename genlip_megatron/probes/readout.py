"""Patch-semantics readout: what the LM head "says" about individual image patches.

Image tokens never attend to text in GenLIP's prefix-LM, so a patch's ``ln_post`` feature is
the same with or without a prompt; the readout applies ``proj`` + ``lm_head`` to it and lists
the top-k tokens. :func:`render_readout` draws the image with the chosen patches boxed and their
top words written next to them (PNG via Pillow).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.data.tokenizer import TextTokenizer

__all__ = ["PatchWords", "patch_readout", "render_readout", "parse_patches"]


@dataclass
class PatchWords:
    """Top-k tokens of one patch.

    Attributes:
        row, col: patch coordinates in the grid.
        token_ids: top-k token ids, most likely first.
        words: their decoded strings (special tokens kept, whitespace stripped).
        probs: their softmax probabilities.
    """

    row: int
    col: int
    token_ids: list[int]
    words: list[str]
    probs: list[float]


def parse_patches(spec: Optional[str], grid: tuple[int, int]) -> list[tuple[int, int]]:
    """``"r,c;r,c"`` → coordinates; ``None`` or ``"all"`` → every patch; ``"center"`` → one.

    Raises:
        ValueError: malformed or outside the grid.
    """
    gh, gw = grid
    if spec is None or spec == "all":
        return [(r, c) for r in range(gh) for c in range(gw)]
    if spec == "center":
        return [(gh // 2, gw // 2)]
    out = []
    for item in spec.split(";"):
        try:
            r, c = (int(x) for x in item.split(","))
        except ValueError:
            raise ValueError(f"patch {item!r} is not 'row,col' (e.g. --patches '3,4;7,7').") \
                from None
        if not (0 <= r < gh and 0 <= c < gw):
            raise ValueError(f"patch ({r},{c}) is outside the {gh}x{gw} grid.")
        out.append((r, c))
    return out


@torch.no_grad()
def patch_readout(model: GenLIPModel, pixel_values: torch.Tensor, grid: tuple[int, int],
                  tokenizer: Optional[TextTokenizer] = None,
                  patches: Optional[Sequence[tuple[int, int]]] = None,
                  top_k: int = 5) -> list[PatchWords]:
    """Top-k LM-head tokens of chosen patch features of one image.

    Args:
        model: HF-format GenLIP (not vision-only).
        pixel_values: float ``[gh*gw, C*p*p]``.
        grid: (gh, gw).
        tokenizer: decodes the ids (ids only without it).
        patches: (row, col) list; default every patch.
        top_k: tokens per patch.
    """
    gh, gw = grid
    patches = list(patches) if patches is not None else parse_patches(None, grid)
    dtype = model.ln_post.weight.dtype
    feats = model.encode_images(pixel_values.to(dtype), torch.tensor([[1, gh, gw]]))[0]
    idx = torch.tensor([r * gw + c for r, c in patches], dtype=torch.long)
    probs = torch.softmax(model.text_logits(feats[idx]).float(), dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    out = []
    for (r, c), ids, ps in zip(patches, top_i.tolist(), top_p.tolist()):
        words = [tokenizer.decode([i], skip_special_tokens=False).strip() if tokenizer else
                 str(i) for i in ids]
        out.append(PatchWords(r, c, ids, words, ps))
    return out


def render_readout(image: Image.Image, readout: Sequence[PatchWords], path: str | Path,
                   patch_size: int = 16, scale: int = 3, words: int = 2) -> Path:
    """Write a PNG: the image (upscaled ×``scale``) with each read-out patch boxed and labelled.

    Args:
        image: the resized image the patches come from (``ProbeImage.image``).
        readout: from :func:`patch_readout`.
        path: output ``.png``.
        words: top words written per patch.
    """
    canvas = image.convert("RGB").resize((image.width * scale, image.height * scale),
                                         Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    p = patch_size * scale
    palette = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255)]
    for k, pw in enumerate(readout):
        color = palette[k % len(palette)]
        x0, y0 = pw.col * p, pw.row * p
        draw.rectangle([x0, y0, x0 + p - 1, y0 + p - 1], outline=color, width=2)
        label = "|".join(w or "_" for w in pw.words[:words])
        tx, ty = x0 + 2, y0 + p + 1 if y0 + p + 12 < canvas.height else y0 - 12
        try:
            box = draw.textbbox((tx, ty), label, font=font)
        except UnicodeError:  # bitmap fallback font: latin-1 only (the JSON keeps the words)
            label = label.encode("ascii", "replace").decode()
            box = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=color, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
