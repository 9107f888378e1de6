"""Probe gallery: fixed held-out images, what the model says about them, in one page.

For each gallery image (the first ``evaluation.gallery_images`` held-out samples, the same at
every evaluation) the gallery holds the greedy caption next to the reference and the
patch-readout picture (``probes/readout.py``: every patch tinted by the LM-head word its
``ln_post`` feature reads out as, with a legend). One evaluation gives

- ``images``: ``{"gallery/NN": uint8 [H, W, 3]}`` for TensorBoard / W&B / MLflow (the caption
  is the picture's title), logged by the caller at the checkpoint's step;
- ``html``: one self-contained page (PNG files inlined as base64), which the in-loop hook writes
  beside the checkpoint (``<save_dir>/gallery/iter_NNNNNNN.html``) and ``tools/evaluate.py
  --gallery DIR`` into ``DIR``.

Its metric is only ``gallery/images``: the pictures are for people, not for curves.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.data.inference import EvalSample
from genlip_megatron.data.tokenizer import TextTokenizer
from genlip_megatron.evaluation.captioning import shared_prompt
from genlip_megatron.probes.generation import generate_captions
from genlip_megatron.probes.images import patches_to_image
from genlip_megatron.probes.readout import patch_readout, render_readout

__all__ = ["GalleryEvaluator", "gallery_html", "write_gallery"]


def _png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gallery_html(title: str, samples: Sequence[EvalSample], captions: Sequence[str],
                 pictures: Sequence[np.ndarray]) -> str:
    """A self-contained HTML page: per image its key, caption, reference and readout."""
    rows = []
    for s, cap, pic in zip(samples, captions, pictures):
        mark = "✓" if cap == s.caption.strip() else "✗"
        rows.append(
            f'<div class="item"><h3>{html.escape(s.key)}</h3>'
            f'<p><b>generated</b> {mark} {html.escape(cap)}<br>'
            f'<b>reference</b> {html.escape(s.caption.strip())}</p>'
            f'<img src="data:image/png;base64,{_png_b64(pic)}" alt="{html.escape(s.key)}">'
            f'</div>')
    style = ("body{font-family:sans-serif;margin:1em}.item{display:inline-block;"
             "vertical-align:top;margin:0.5em;max-width:760px}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + "".join(rows) + "</body></html>\n")


@dataclass
class GalleryEvaluator:
    """Captions + patch readouts of fixed images; fills ``images`` and ``html`` per call."""

    samples: list[EvalSample]
    tokenizer: TextTokenizer
    max_new_tokens: int = 48
    name: str = "gallery"
    title: str = "GenLIP probe gallery"
    images: dict[str, np.ndarray] = field(default_factory=dict)
    html: str = ""

    def __call__(self, model: GenLIPModel) -> dict[str, float]:
        captions = generate_captions(model, [(s.patches, s.grid) for s in self.samples],
                                     self.tokenizer, prompt_ids=shared_prompt(self.samples),
                                     max_new_tokens=self.max_new_tokens)
        pictures = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (s, cap) in enumerate(zip(self.samples, captions)):
                readout = patch_readout(model, s.pixel_values, s.grid, self.tokenizer,
                                        top_k=1)
                p = int(round((s.patches.shape[1] / 3) ** 0.5))   # [N, 3*p*p] patches
                image = patches_to_image(s.pixel_values, s.grid, p)
                path = render_readout(image, readout, Path(tmp) / f"{i}.png", s.grid, p,
                                      title=cap[:60])
                pictures.append(np.asarray(Image.open(path).convert("RGB")))
        self.images = {f"gallery/{i:02d}": p for i, p in enumerate(pictures)}
        self.html = gallery_html(self.title, self.samples, captions, pictures)
        return {"gallery/images": float(len(pictures))}


def write_gallery(page: str, path: str | Path) -> Path:
    """Write one gallery page (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
