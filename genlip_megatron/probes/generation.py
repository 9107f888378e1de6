"""Caption generation ("let ViT speak") with a KV cache on the HF-format GenLIP module.

The prompt is the training template without the caption: ``[IMG×N] prompt`` (no BOS, no
vision start/end tokens); decoding stops at ``<|im_end|>`` (or ``stop_id``) or after
``max_new_tokens``. Several images are decoded together: rows are left-padded so every prompt
ends at the same column, the padding is masked out of attention and positions are explicit
(image (0, r, c), text t = h = w = max(gh, gw) + k), so a batch gives the same tokens as one image
at a time (greedy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.config.data import DEFAULT_PROMPT
from genlip_megatron.data.tokenizer import TextTokenizer

__all__ = ["ImageInput", "GenerationConfig", "generate_ids", "generate_captions",
           "caption_exact_match"]

ImageInput = tuple[Union[Tensor, np.ndarray], tuple[int, int]]
"""(pixel_values ``[N, C*p*p]`` normalised float (or uint8 patches), grid (gh, gw))."""

MAX_NEW_TOKENS = 256


@dataclass
class GenerationConfig:
    """Decoding settings.

    Attributes:
        max_new_tokens: at most this many generated tokens (capped at 256).
        greedy: argmax decoding; otherwise sample with ``temperature`` and nucleus ``top_p``.
        temperature: softmax temperature for sampling (> 0).
        top_p: keep the smallest set of tokens whose probability mass reaches ``top_p``.
        seed: sampling seed (None: torch's global generator).
        batch_size: images decoded together.
    """

    max_new_tokens: int = MAX_NEW_TOKENS
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    batch_size: int = 8

    def validate(self) -> "GenerationConfig":
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be in "
                             f"[1, {MAX_NEW_TOKENS}].")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature ({self.temperature}) must be > 0 when sampling; use "
                             "greedy=True for argmax decoding.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1].")
        if self.batch_size < 1:
            raise ValueError(f"batch_size ({self.batch_size}) must be >= 1.")
        return self


def _as_pixels(pixels, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(pixels)
    if t.dtype == torch.uint8:  # raw patches: normalise as in training (mean = std = 0.5)
        t = t.float().mul_(2.0 / 255.0).sub_(1.0)
    return t.to(dtype)


def _prefix_batch(items: Sequence[ImageInput], prompt_ids: Sequence[int], dtype, device):
    """Left-padded ``[IMG×N] prompt`` rows: ids, image mask, attention mask, positions, pixels."""
    lens = [int(g[0]) * int(g[1]) + len(prompt_ids) for _, g in items]
    length = max(lens)
    b = len(items)
    ids = torch.zeros(b, length, dtype=torch.long)
    image_mask = torch.zeros(b, length, dtype=torch.bool)
    attn = torch.zeros(b, length, dtype=torch.long)
    pos = torch.zeros(b, 3, length, dtype=torch.long)
    pixels, nxt = [], []
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    for row, ((px, (gh, gw)), n) in enumerate(zip(items, lens)):
        gh, gw = int(gh), int(gw)
        start, n_img = length - n, gh * gw
        px = _as_pixels(px, dtype)
        if px.shape[0] != n_img:
            raise ValueError(f"image {row}: {px.shape[0]} patches but grid {gh}x{gw}.")
        pixels.append(px)
        attn[row, start:] = 1
        image_mask[row, start:start + n_img] = True
        pos[row, 1, start:start + n_img] = torch.arange(gh).repeat_interleave(gw)
        pos[row, 2, start:start + n_img] = torch.arange(gw).repeat(gh)
        t0 = max(gh, gw)
        ids[row, start + n_img:] = prompt
        pos[row, :, start + n_img:] = t0 + torch.arange(len(prompt_ids))
        nxt.append(t0 + len(prompt_ids))
    return (ids.to(device), image_mask.to(device), attn.to(device), pos.to(device),
            torch.cat(pixels).to(device), torch.tensor(nxt, device=device))


def _sample(logits: Tensor, cfg: GenerationConfig, gen: Optional[torch.Generator]) -> Tensor:
    """Next token per row from ``[B, V]`` logits."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass BEFORE it already reaches top_p (the top token is kept)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def _generate_batch(model: GenLIPModel, items: Sequence[ImageInput], prompt_ids: Sequence[int],
                    stop_id: Optional[int], cfg: GenerationConfig,
                    gen: Optional[torch.Generator]) -> list[list[int]]:
    device = model.ln_post.weight.device
    dtype = model.ln_post.weight.dtype
    ids, image_mask, attn, pos, pixels, nxt = _prefix_batch(items, prompt_ids, dtype, device)
    out = model(input_ids=ids, pixel_values=pixels, image_mask=image_mask, position_ids=pos,
                attention_mask=attn, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    rows = torch.arange(len(items), device=device)   # original row of each active row
    result: list[list[int]] = [[] for _ in items]
    for step in range(cfg.max_new_tokens):
        token = _sample(logits, cfg, gen)
        for r, t in zip(rows.tolist(), token.tolist()):
            result[r].append(t)
        keep = token != stop_id if stop_id is not None else torch.ones_like(token, dtype=torch.bool)
        if step + 1 == cfg.max_new_tokens or not bool(keep.any()):
            break
        if not bool(keep.all()):  # drop finished rows from the batch and the cache
            idx = keep.nonzero().flatten()
            rows, token, attn, nxt = rows[idx], token[idx], attn[idx], nxt[idx]
            cache = cache.select(idx)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        step_pos = nxt[:, None, None].expand(-1, 3, 1)
        out = model(input_ids=token[:, None], position_ids=step_pos, attention_mask=attn,
                    image_mask=torch.zeros(token.shape[0], 1, dtype=torch.bool, device=device),
                    past_key_values=cache, use_cache=True)
        cache, logits, nxt = out.past_key_values, out.logits[:, -1], nxt + 1
    if stop_id is not None:  # cut at (and drop) the stop token
        result = [r[: r.index(stop_id)] if stop_id in r else r for r in result]
    return result


def generate_ids(model: GenLIPModel, images: Sequence[ImageInput], prompt_ids: Sequence[int],
                 *, stop_id: Optional[int] = None,
                 config: Optional[GenerationConfig] = None) -> list[list[int]]:
    """Generated token ids per image (without the stop token).

    Args:
        model: an HF-format GenLIP (``load_genlip_for_inference`` / ``from_megatron_state_dict``).
        images: ``(pixel_values [N, C*p*p], (gh, gw))`` per image; float normalised (as
            ``PackedBatch.pixel_values``) or uint8 patches (normalised here).
        prompt_ids: token ids of the user prompt (``TextEncoder.encode_prompt``).
        stop_id: ``<|im_end|>`` id; None decodes ``max_new_tokens`` tokens.
        config: decoding settings.
    """
    cfg = (config or GenerationConfig()).validate()
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    out: list[list[int]] = []
    for i in range(0, len(images), cfg.batch_size):
        out += _generate_batch(model, images[i:i + cfg.batch_size], prompt_ids, stop_id, cfg,
                               gen)
    return out


def generate_captions(model: GenLIPModel, images: Sequence[ImageInput],
                      tokenizer: TextTokenizer, prompt: str = DEFAULT_PROMPT, *,
                      max_new_tokens: int = MAX_NEW_TOKENS, greedy: bool = True,
                      temperature: float = 1.0, top_p: float = 1.0,
                      stop_id: Optional[int] = None, seed: Optional[int] = None,
                      batch_size: int = 8, prompt_ids: Optional[Sequence[int]] = None
                      ) -> list[str]:
    """Captions for images, decoded with the training template.

    Args:
        model: HF-format GenLIP in eval mode.
        images: ``(pixel_values, (gh, gw))`` per image (see :func:`generate_ids`).
        tokenizer: the training tokenizer (encodes the prompt, decodes the output).
        prompt: user prompt after the image (the training prompt by default); stripped on the
            right as the template does.
        max_new_tokens: cap (≤ 256).
        greedy / temperature / top_p / seed: decoding (see :class:`GenerationConfig`).
        stop_id: default ``tokenizer.im_end_id`` (``<|im_end|>``).
        batch_size: images per forward.
        prompt_ids: ready prompt ids (overrides ``prompt``; e.g. ``EvalSample.prompt_ids``).

    Returns:
        one stripped caption per image.
    """
    ids = list(prompt_ids) if prompt_ids is not None else tokenizer.encode(prompt.rstrip())
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, greedy=greedy,
                           temperature=temperature, top_p=top_p, seed=seed,
                           batch_size=batch_size)
    stop = tokenizer.im_end_id if stop_id is None else stop_id
    tokens = generate_ids(model, images, ids, stop_id=stop, config=cfg)
    return [tokenizer.decode(t).strip() for t in tokens]


def caption_exact_match(model: GenLIPModel, samples: Sequence, tokenizer: TextTokenizer,
                        **decoding) -> tuple[float, list[str]]:
    """Exact-match caption accuracy on held-out samples (the demo's caption evaluation).

    Args:
        model: HF-format GenLIP.
        samples: objects with ``patches`` (uint8 or float ``[N, C*p*p]``), ``grid`` (gh, gw),
            ``prompt_ids`` and ``caption`` (``data.inference.EvalSample``); samples with
            different prompts are decoded in separate groups.
        tokenizer: the training tokenizer.
        decoding: :func:`generate_captions` keywords (max_new_tokens, greedy, batch_size, ...).

    Returns:
        (fraction of generated captions equal to the reference, the captions in order).
    """
    if not samples:
        raise ValueError("caption_exact_match needs at least one sample.")
    caps = [""] * len(samples)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(int(t) for t in s.prompt_ids), []).append(i)
    for prompt_ids, idx in groups.items():
        out = generate_captions(model, [(samples[i].patches, samples[i].grid) for i in idx],
                                tokenizer, prompt_ids=list(prompt_ids), **decoding)
        for i, c in zip(idx, out):
            caps[i] = c
    hits = sum(c == s.caption.strip() for c, s in zip(caps, samples))
    return hits / len(samples), caps
