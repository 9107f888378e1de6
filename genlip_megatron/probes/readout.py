"""Patch-semantics readout: what the LM head "says" about individual image patches.

Image tokens never attend to text in GenLIP's prefix-LM, so a patch's ``ln_post`` feature is
the same with or without a prompt; the readout applies ``proj`` + ``lm_head`` to it and lists
the top-k tokens with probabilities. :func:`render_readout` draws the gridded image with the
chosen patches numbered and a panel of their top words and probabilities (or, for many patches,
each patch tinted by its top word with a legend); :func:`word_heatmap` / :func:`render_heatmap`
show the probability of one chosen word at every patch (PNG via Pillow).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.data.tokenizer import TextTokenizer

__all__ = ["PatchWords", "patch_readout", "render_readout", "parse_patches", "word_token_id",
           "word_heatmap", "render_heatmap"]


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


def word_token_id(tokenizer: TextTokenizer, word: str) -> int:
    """The single token id of ``word`` (tried as given and with a leading space).

    Raises:
        ValueError: the word is several tokens in both spellings (names them).
    """
    tried = {}
    for text in (word, " " + word):
        ids = tokenizer.encode(text)
        if len(ids) == 1:
            return ids[0]
        tried[text] = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    raise ValueError(f"--word {word!r} is not one token ({tried}); pick one of those tokens.")


@torch.no_grad()
def word_heatmap(model: GenLIPModel, pixel_values: torch.Tensor, grid: tuple[int, int],
                 token_id: int) -> torch.Tensor:
    """Probability of token ``token_id`` read out from every patch: ``[gh, gw]``."""
    gh, gw = grid
    dtype = model.ln_post.weight.dtype
    feats = model.encode_images(pixel_values.to(dtype), torch.tensor([[1, gh, gw]]))[0]
    probs = torch.softmax(model.text_logits(feats).float(), dim=-1)[:, token_id]
    return probs.reshape(gh, gw).cpu()


# ------------------------------------------------------------------------------ drawing
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
            (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
            (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]
MAX_LISTED = 24   # above this many patches the figure colours patches by their top word


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, fill) -> None:
    try:
        draw.text(xy, text, fill=fill, font=font)
    except UnicodeError:   # bitmap fallback font: latin-1 only (the JSON keeps the words)
        draw.text(xy, text.encode("ascii", "replace").decode(), fill=fill, font=font)


def _label(word: str) -> str:
    return repr(word)[1:-1] if word.strip() else "␣" if word else "∅"


def _canvas(image: Image.Image, grid: tuple[int, int], panel_width: int, min_side: int = 384):
    """Upscaled image with a patch grid and row/column indices, plus a white side panel."""
    gh, gw = grid
    scale = max(1, -(-min_side // max(image.width, image.height)))
    w, h = image.width * scale, image.height * scale
    margin = 22
    canvas = Image.new("RGB", (margin + w + panel_width, margin + h + 8), "white")
    canvas.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (margin, margin))
    draw = ImageDraw.Draw(canvas, "RGBA")
    ph, pw = h / gh, w / gw
    small = _font(11)
    for r in range(gh + 1):
        y = margin + round(r * ph)
        draw.line([(margin, y), (margin + w, y)], fill=(255, 255, 255, 90), width=1)
    for c in range(gw + 1):
        x = margin + round(c * pw)
        draw.line([(x, margin), (x, margin + h)], fill=(255, 255, 255, 90), width=1)
    step = max(1, -(-max(gh, gw) // 16))   # at most ~16 index labels per side
    for r in range(0, gh, step):
        _text(draw, (2, margin + r * ph + ph / 2 - 6), str(r), small, (0, 0, 0))
    for c in range(0, gw, step):
        _text(draw, (margin + c * pw + pw / 2 - 4, 4), str(c), small, (0, 0, 0))
    return canvas, draw, (margin, margin, ph, pw), margin + w + 10


def render_readout(image: Image.Image, readout: Sequence[PatchWords], path: str | Path,
                   grid: Optional[tuple[int, int]] = None, patch_size: int = 16,
                   title: str = "") -> Path:
    """Write a PNG of the patch readout.

    Up to :data:`MAX_LISTED` patches: each is boxed and numbered on the (gridded, upscaled)
    image and the side panel lists its top-k words with probabilities and bars. More patches
    (e.g. ``--patches all``): every patch is tinted by its top-1 word and the panel is a legend
    (word, number of patches, mean probability), so regions that read out alike stand out.

    Args:
        image: the resized image the patches come from (``ProbeImage.image``).
        readout: from :func:`patch_readout`.
        path: output ``.png``.
        grid: (gh, gw); default from the image size and ``patch_size``.
        title: first line of the panel.
    """
    grid = grid or (image.height // patch_size, image.width // patch_size)
    listed = len(readout) <= MAX_LISTED
    top_k = max((len(p.words) for p in readout), default=1)
    line = 16
    panel_h = (len(readout) * (top_k + 1) + 2) * line if listed else 0
    canvas, draw, (x0, y0, ph, pw), px = _canvas(image, grid, 300)
    if panel_h > canvas.height:
        grown = Image.new("RGB", (canvas.width, panel_h), "white")
        grown.paste(canvas, (0, 0))
        canvas, draw = grown, ImageDraw.Draw(grown, "RGBA")
    font, bold = _font(13), _font(14)
    _text(draw, (px, 4), title or "patch readout (LM head on ln_post features)", bold, (0, 0, 0))
    y = 4 + line + 4
    if listed:
        for k, pwords in enumerate(readout):
            color = _PALETTE[k % len(_PALETTE)]
            bx, by = x0 + pwords.col * pw, y0 + pwords.row * ph
            draw.rectangle([bx, by, bx + pw - 1, by + ph - 1], outline=color, width=3)
            draw.rectangle([bx + 1, by + 1, bx + 15, by + 13], fill=color + (220,))
            _text(draw, (bx + 3, by), str(k + 1), _font(11), (0, 0, 0))
            _text(draw, (px, y), f"#{k + 1}  patch ({pwords.row},{pwords.col})", bold, color)
            y += line
            for w, p in zip(pwords.words, pwords.probs):
                draw.rectangle([px + 8, y + 3, px + 8 + round(80 * p), y + 12],
                               fill=color + (200,))
                _text(draw, (px + 94, y), f"{p:5.3f}  {_label(w)}", font, (0, 0, 0))
                y += line
    else:
        words: dict[str, list[float]] = {}
        for pwords in readout:
            words.setdefault(pwords.words[0], []).append(pwords.probs[0])
        order = sorted(words, key=lambda w: -len(words[w]))
        colors = {w: _PALETTE[i % len(_PALETTE)] for i, w in enumerate(order)}
        small = _font(11)
        for pwords in readout:
            bx, by = x0 + pwords.col * pw, y0 + pwords.row * ph
            alpha = int(60 + 150 * pwords.probs[0])
            draw.rectangle([bx, by, bx + pw - 1, by + ph - 1],
                           fill=colors[pwords.words[0]] + (alpha,))
            if pwords.words[0] != order[0] and pw >= 36:   # name the patches that stand out
                _text(draw, (bx + 2, by + 2), _label(pwords.words[0])[: int(pw // 7)], small,
                      (0, 0, 0))
                _text(draw, (bx + 2, by + 14), f"{pwords.probs[0]:.2f}", small, (0, 0, 0))
        _text(draw, (px, y), "top-1 word: patches, mean prob", font, (80, 80, 80))
        y += line
        for w in order[: (canvas.height - y) // line]:
            draw.rectangle([px, y + 2, px + 12, y + 13], fill=colors[w])
            _text(draw, (px + 18, y), f"{_label(w)}: {len(words[w])}, "
                                      f"{sum(words[w]) / len(words[w]):.2f}", font, (0, 0, 0))
            y += line
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def _heat_color(v: float) -> tuple[int, int, int]:
    """Dark blue → red → yellow for v in [0, 1]."""
    stops = [(0.0, (20, 20, 120)), (0.5, (220, 40, 40)), (1.0, (255, 240, 60))]
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(round(x + t * (y - x)) for x, y in zip(ca, cb))
    return stops[-1][1]


def render_heatmap(image: Image.Image, probs: torch.Tensor, word: str, path: str | Path
                   ) -> Path:
    """Write a PNG: per patch the probability of ``word``, as a colour overlay with a scale.

    The colours are normalised to the image's maximum (printed), so the spatial pattern is
    visible even when every probability is small.
    """
    gh, gw = probs.shape
    canvas, draw, (x0, y0, ph, pw), px = _canvas(image, (gh, gw), 190)
    top = float(probs.max()) or 1.0
    for r in range(gh):
        for c in range(gw):
            v = float(probs[r, c]) / top
            draw.rectangle([x0 + c * pw, y0 + r * ph, x0 + (c + 1) * pw - 1,
                            y0 + (r + 1) * ph - 1], fill=_heat_color(v) + (int(70 + 120 * v),))
    font, bold = _font(13), _font(14)
    _text(draw, (px, 4), f"p({_label(word)}) per patch", bold, (0, 0, 0))
    bar_top, bar_h = 30, min(200, canvas.height - 60)
    for i in range(bar_h):
        draw.line([(px, bar_top + i), (px + 18, bar_top + i)], fill=_heat_color(1 - i / bar_h))
    _text(draw, (px + 24, bar_top - 6), f"{top:.3f} (max)", font, (0, 0, 0))
    _text(draw, (px + 24, bar_top + bar_h - 8), "0", font, (0, 0, 0))
    r, c = divmod(int(probs.argmax()), gw)
    _text(draw, (px, bar_top + bar_h + 10), f"argmax patch ({r},{c})", font, (0, 0, 0))
    _text(draw, (px, bar_top + bar_h + 26), f"mean {float(probs.mean()):.3f}", font, (0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
