"""A synthetic, learnable captioning set (coloured shapes on a 3×3 grid) and bad-sample makers.

Every image has one or two shapes (6 colours × 4 shapes) centred in cells of a 3×3 grid and,
sometimes, a short word drawn in black in a free cell; image sizes and aspect ratios vary. The
caption is a fixed template of exactly what is drawn, with shapes listed in raster order of
their cells, e.g.::

    a red circle at the top left.
    a blue square at the center and a green star at the bottom right.
    a yellow triangle at the left. the word "sun" is written at the top.

Deterministic from a seed; used by tools/make_demo_data.py, the tests and the benchmark.
:func:`bad_sample` builds each kind of broken sample the loader must skip or survive.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
          "yellow": (240, 235, 40), "purple": (140, 40, 170), "orange": (235, 105, 10)}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right")
WORDS = ("sun", "cat", "box", "sky", "map", "pen")


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    pts = []
    for i in range(10):  # star: 5 outer, 5 inner points
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: tuple, box: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) * 0.38
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=color)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=color)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(items: list[tuple[int, str, str]], word: Optional[tuple[int, str]]) -> str:
    parts = [f"{_article(color)} {color} {shape} at the {POSITIONS[cell]}"
             for cell, color, shape in items]
    text = " and ".join(parts) + "."
    if word is not None:
        text += f' the word "{word[1]}" is written at the {POSITIONS[word[0]]}.'
    return text


@dataclass
class Scene:
    """Everything one synthetic image shows: what the caption, the labels and the mask read.

    Attributes:
        width, height: image size in pixels.
        shade: grey level of the background.
        items: ``(cell, colour, shape)`` per shape, cells of the 3×3 grid in raster order.
        word: ``(cell, word)`` of the rendered word, or None.
    """

    width: int
    height: int
    shade: int
    items: list[tuple[int, str, str]]
    word: Optional[tuple[int, str]]

    def cell_box(self, cell: int) -> tuple[float, float, float, float]:
        r, c = divmod(cell, 3)
        w, h = self.width, self.height
        return c * w / 3, r * h / 3, (c + 1) * w / 3, (r + 1) * h / 3

    @property
    def caption(self) -> str:
        return _caption(self.items, self.word)


def sample_scene(rng: np.random.Generator, *, p_two: float = 0.3, p_word: float = 0.1,
                 min_side: int = 48, max_side: int = 192, max_aspect: float = 2.5) -> Scene:
    """Draw a random layout (the random numbers are drawn in a fixed order: same seed, same
    scenes, whatever is rendered from them)."""
    aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
    long_side = int(rng.integers(min_side, max_side + 1))
    w, h = (long_side, max(min_side // 2, int(long_side / aspect))) if aspect >= 1 else \
        (max(min_side // 2, int(long_side * aspect)), long_side)
    shade = int(rng.integers(225, 256))
    n = 2 if rng.random() < p_two else 1
    cells = sorted(int(c) for c in rng.choice(9, size=n + 1, replace=False))
    word_cell = cells.pop(int(rng.integers(0, n + 1))) if rng.random() < p_word else None
    cells = cells[:n]
    items = [(c, str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))) for c in cells]
    word = (word_cell, str(rng.choice(WORDS))) if word_cell is not None else None
    return Scene(w, h, shade, items, word)


def _paint(scene: Scene, mode: str, background, shape_fill, word_fill) -> Image.Image:
    """Draw ``scene`` on a new image; ``*_fill`` give each shape's / the word's fill value."""
    img = Image.new(mode, (scene.width, scene.height), background)
    draw = ImageDraw.Draw(img)
    for cell, color, shape in scene.items:
        _draw_shape(draw, shape, shape_fill(color, shape), scene.cell_box(cell))
    if scene.word is not None:
        if mode == "L":
            draw.fontmode = "1"   # no anti-aliasing: every mask pixel is a class id
        size = max(8, int(min(scene.width, scene.height) / 3 * 0.45))
        font = ImageFont.load_default(size=size)
        x0, y0, x1, y1 = scene.cell_box(scene.word[0])
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), scene.word[1], fill=word_fill, font=font,
                  anchor="mm")
    return img


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of ``scene`` (shapes in their colours, the word in black)."""
    return _paint(scene, "RGB", (scene.shade,) * 3, lambda color, _: COLORS[color], (0, 0, 0))


SEG_CLASSES = (*POSITIONS, *SHAPES, "text")
"""Segmentation classes of the demo masks (``seg.png`` pixel values are indices here): a
background pixel is labelled with the 3×3 region it lies in (ids 0-8, the caption's positions
``top left`` … ``bottom right``), a drawn pixel with what is drawn there (``circle`` …
``star``: 9-12, ``text``: 13).

Why this target. The first one (background, 4 shapes, text) did not separate a trained encoder
from a random-init one (mIoU 0.25 trained vs 0.28 random on the demo): a random encoder's patch
features keep the patch pixels, and at 96 px the shape of a patch is in its pixels. What the
captions teach and a random encoder lacks is WHERE (its patch features carry almost no absolute
position); the background regions need it, the drawn pixels keep the content classes. Measured
on the demo (500 train / 100 held-out images, docs/evaluation.md): mIoU 0.11 random-init vs
0.26 trained. Labelling the shape pixels with their cell instead (background 0) gave no gap
(0.10 vs 0.09): on shape patches the trained features carry what is drawn, not where."""

MASK_TEXT = SEG_CLASSES.index("text")

LABELS_VERSION = 2
"""Version of the demo labels (``cls``, ``seg.png``), written to the demo set's ``meta.json``;
a demo set of another version is written again (same images and captions). 1: masks of
background / shape / text; 2: background pixels labelled with their 3×3 region. Bump it
whenever :func:`scene_label` or :func:`scene_mask` change."""


def region_map(width: int, height: int) -> np.ndarray:
    """uint8 ``[H, W]``: the 3×3 cell (raster order, as :meth:`Scene.cell_box`) of each pixel
    centre."""
    rows = (6 * np.arange(height) + 3) // (2 * height)
    cols = (6 * np.arange(width) + 3) // (2 * width)
    return (rows[:, None] * 3 + cols[None, :]).astype(np.uint8)


def scene_mask(scene: Scene) -> np.ndarray:
    """uint8 ``[H, W]`` per-pixel class (:data:`SEG_CLASSES`): the shape or text id on exactly
    the pixels drawn (text glyphs without anti-aliasing), the pixel's 3×3 region elsewhere."""
    ids = {s: SEG_CLASSES.index(s) for s in SHAPES}
    drawn = np.asarray(_paint(scene, "L", 0, lambda _, shape: ids[shape], MASK_TEXT),
                       dtype=np.uint8)
    return np.where(drawn > 0, drawn, region_map(scene.width, scene.height))


PROBE_CLASSES = POSITIONS
"""Classification label of the demo (``cls``): the cell of the first shape in raster order,
i.e. WHERE the (top-most, then left-most) shape is. Chosen because the encoder must learn it
(captions name every position) while a random-init encoder cannot read it: its patch features
carry no absolute position (docs/evaluation.md, "The demo's labelled tasks")."""


def scene_label(scene: Scene) -> int:
    """Class id of ``scene`` among :data:`PROBE_CLASSES`."""
    return scene.items[0][0]


def render_sample(rng: np.random.Generator, *, p_two: float = 0.3, p_word: float = 0.1,
                  min_side: int = 48, max_side: int = 192, max_aspect: float = 2.5
                  ) -> tuple[Image.Image, str]:
    """Draw one random image and its exact caption."""
    scene = sample_scene(rng, p_two=p_two, p_word=p_word, min_side=min_side,
                         max_side=max_side, max_aspect=max_aspect)
    return render_scene(scene), scene.caption


def encode_image(img: Image.Image, fmt: str = "jpg", quality: int = 92) -> bytes:
    """Encode a PIL image as jpg / png / webp bytes."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


def conversation_json(caption: str, rng: Optional[np.random.Generator] = None,
                      p_multi_turn: float = 0.0) -> dict:
    """Stage-2 json for a caption (``{"conversations": [...]}``, optionally two turns)."""
    conv = [{"from": "human", "value": "<image>Describe this image in detail."},
            {"from": "gpt", "value": caption}]
    if rng is not None and rng.random() < p_multi_turn:
        first = caption.split(" at the ")[0]
        conv += [{"from": "human", "value": "What is the first shape?"},
                 {"from": "gpt", "value": f"{first}."}]
    return {"conversations": conv}


def demo_samples(n: int, seed: int, *, fmt: str = "caption", key_prefix: str = "s",
                 p_two: float = 0.3, p_word: float = 0.1, min_side: int = 48,
                 max_side: int = 192, p_png: float = 0.1, p_webp: float = 0.05,
                 p_multi_turn: float = 0.2, labelled: bool = False) -> Iterator[dict]:
    """``n`` webdataset samples (``__key__``, image member, ``json``) from ``seed``.

    ``labelled`` adds ``cls`` (:func:`scene_label`, decimal text) and ``seg.png`` (the
    :func:`scene_mask`); the images and captions are the same either way.
    """
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = sample_scene(rng, p_two=p_two, p_word=p_word, min_side=min_side,
                             max_side=max_side)
        img, caption = render_scene(scene), scene.caption
        labels = {"cls": str(scene_label(scene)),
                  "seg.png": encode_image(Image.fromarray(scene_mask(scene)), "png")} \
            if labelled else {}
        u = rng.random()
        ext = "png" if u < p_png else "webp" if u < p_png + p_webp else "jpg"
        meta = {"caption": caption} if fmt == "caption" else \
            conversation_json(caption, rng, p_multi_turn)
        yield {"__key__": f"{key_prefix}{i:08d}", ext: encode_image(img, ext), "json": meta,
               **labels}


def caption_corpus() -> list[str]:
    """Every word and phrase the captions use (to train the demo tokenizer)."""
    texts = [f"{_article(c)} {c} {s} at the {p}." for c in COLORS for s in SHAPES
             for p in POSITIONS]
    texts += [f' the word "{w}" is written at the {p}.' for w in WORDS for p in POSITIONS]
    texts += [" and a ", "What is the first shape?", "Describe this image in detail."]
    return texts


# ----------------------------------------------------------------------------- bad samples
BAD_KINDS = ("truncated_jpeg", "garbage_image", "one_by_one", "huge_aspect", "missing_json",
             "bad_json", "json_not_object", "empty_caption", "no_caption", "missing_image",
             "bad_conversation", "too_long")
# Unusual but valid: decoded to RGB, not skipped.
ODD_KINDS = ("cmyk_jpeg", "grayscale_jpeg", "rgba_png", "palette_png", "unknown_keys")
# What the loader reports for each bad kind (counter ``skipped/<reason>``).
BAD_REASON = {"truncated_jpeg": "undecodable_image", "garbage_image": "undecodable_image",
              "one_by_one": "image_too_small", "huge_aspect": "aspect_ratio",
              "missing_json": "missing_json", "bad_json": "bad_json",
              "json_not_object": "bad_json", "empty_caption": "empty_caption",
              "no_caption": "missing_text", "missing_image": "missing_image",
              "bad_conversation": "bad_conversation", "too_long": "too_long"}


def bad_sample(kind: str, key: str, seed: int = 0, long_words: int = 20000) -> dict:
    """A sample of the given :data:`BAD_KINDS` / :data:`ODD_KINDS` kind (caption format)."""
    rng = np.random.default_rng(seed)
    img, caption = render_sample(rng, min_side=64, max_side=96)
    good = {"__key__": key, "jpg": encode_image(img), "json": {"caption": caption}}
    if kind == "truncated_jpeg":
        return {**good, "jpg": good["jpg"][: len(good["jpg"]) // 2]}
    if kind == "garbage_image":
        return {**good, "jpg": b"this is not an image at all" * 4}
    if kind == "one_by_one":
        return {**good, "jpg": encode_image(Image.new("RGB", (1, 1), (9, 9, 9)))}
    if kind == "huge_aspect":
        return clean({**good, "png": encode_image(Image.new("RGB", (402, 2), (9, 9, 9)), "png"),
                      "jpg": None})
    if kind == "missing_json":
        return {k: v for k, v in good.items() if k != "json"}
    if kind == "bad_json":
        return {**good, "json": b'{"caption": "unterminated'}
    if kind == "json_not_object":
        return {**good, "json": b'["a list"]'}
    if kind == "empty_caption":
        return {**good, "json": {"caption": "   "}}
    if kind == "no_caption":
        return {**good, "json": {"text": caption}}
    if kind == "missing_image":
        return {"__key__": key, "json": good["json"], "xyz": b"unknown member"}
    if kind == "bad_conversation":
        return {**good, "json": {"conversations": [{"from": "robot", "value": "hi"}]}}
    if kind == "too_long":
        return {**good, "json": {"caption": " ".join(["word"] * long_words)}}
    if kind == "cmyk_jpeg":
        return {**good, "jpg": encode_image(img.convert("CMYK"))}
    if kind == "grayscale_jpeg":
        return {**good, "jpg": encode_image(img.convert("L"))}
    if kind == "rgba_png":
        return {"__key__": key, "png": encode_image(img.convert("RGBA"), "png"),
                "json": good["json"]}
    if kind == "palette_png":
        return {"__key__": key, "png": encode_image(img.convert("P"), "png"),
                "json": good["json"]}
    if kind == "unknown_keys":
        return {**good, "cls": b"3", "json": {"caption": caption, "url": "http://x"}}
    raise ValueError(f"unknown bad sample kind {kind!r}; choose from {BAD_KINDS + ODD_KINDS}")


def clean(sample: dict) -> dict:
    """Drop members set to None (used to replace one image member by another)."""
    return {k: v for k, v in sample.items() if v is not None}


__all__ = ["render_sample", "demo_samples", "Scene", "sample_scene", "render_scene",
           "scene_mask", "scene_label", "SEG_CLASSES", "LABELS_VERSION", "region_map",
           "PROBE_CLASSES", "conversation_json",
           "caption_corpus", "bad_sample", "BAD_KINDS", "ODD_KINDS", "BAD_REASON", "encode_image",
           "clean"]
