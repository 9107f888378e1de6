"""Generative zero-shot classification: score class captions by log P(caption | image).

GenLIP has no text tower: a class is scored by how likely the model finds a caption naming it
after the image (open_clip's GenLIP "generative zero-shot"). For every image and every
candidate caption (class name × template) the score is the length-normalised log-likelihood

    s(image, c) = 1/|c| · Σ_t log P(c_t | image, prompt, c_<t),

a class's score is the mean over its templates, and the prediction is the best class.

The image prefix ``[IMG×N] prompt`` is the expensive part (N ≫ |c|). open_clip's scorer
recomputes it for every batch of candidates because it has no KV cache; here it runs ONCE per
image: its keys/values are cached (``GenLIPKVCache``) and repeated for every candidate row, and
only the candidate tokens run through the model (batched over images × candidates). The text
tokens attend causally to the cached prefix, exactly as in the full forward, so the scores are
those of recomputing the prefix (``use_cache=False``, kept as the reference; the benchmark
``benchmarks/zeroshot.py`` and the tests compare both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.data.tokenizer import TextTokenizer
from genlip_megatron.probes.generation import ImageInput, prefix_batch

__all__ = ["ZeroShotTask", "build_task", "score_candidates", "classify", "zero_shot_accuracy",
           "row_log_probs", "padded_ids"]


@dataclass
class ZeroShotTask:
    """Class names × templates as token ids.

    Attributes:
        class_names: one name per class.
        templates: format strings with one ``{}`` for the class name.
        candidates: token ids of each (class, template) caption, class-major.
    """

    class_names: list[str]
    templates: list[str]
    candidates: list[list[int]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_task(tokenizer: TextTokenizer, class_names: Sequence[str],
               templates: Sequence[str] = ("{}",)) -> ZeroShotTask:
    """Tokenise every class × template caption (stripped, as the template encodes captions).

    Raises:
        ValueError: no classes or templates, or a caption that tokenises to nothing.
    """
    if not class_names or not templates:
        raise ValueError("zero-shot needs at least one class name and one template.")
    cands = []
    for name in class_names:
        for tpl in templates:
            ids = tokenizer.encode(tpl.format(name).strip())
            if not ids:
                raise ValueError(f"zero-shot caption {tpl.format(name)!r} has no tokens.")
            cands.append(ids)
    return ZeroShotTask(list(class_names), list(templates), cands)


def padded_ids(candidates: Sequence[Sequence[int]], device) -> tuple[Tensor, Tensor]:
    """Right-padded ids ``[K, Lc]`` and their validity mask."""
    lc = max(len(c) for c in candidates)
    ids = torch.zeros(len(candidates), lc, dtype=torch.long)
    valid = torch.zeros(len(candidates), lc, dtype=torch.bool)
    for k, c in enumerate(candidates):
        ids[k, :len(c)] = torch.as_tensor(list(c))
        valid[k, :len(c)] = True
    return ids.to(device), valid.to(device)


def packed_continuations(ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Candidates ``[G, Lc]`` laid end to end as one row of continuations.

    Candidate g feeds its tokens ``0..n_g-2`` (each predicts the next one; token 0 is predicted
    by the prefix). Returns ``(feed, target, segment, offset)``, each ``[T]`` with
    T = Σ (n_g - 1): the fed ids, the ids they predict, the candidate index and the position
    offset within the candidate.
    """
    n_fed = valid.sum(1) - 1
    segment = torch.repeat_interleave(torch.arange(ids.shape[0], device=ids.device), n_fed)
    starts = torch.cumsum(n_fed, 0) - n_fed
    offset = torch.arange(segment.numel(), device=ids.device) - starts[segment]
    return ids[segment, offset], ids[segment, offset + 1], segment, offset


@torch.no_grad()
def _scores_cached(model: GenLIPModel, items: Sequence[ImageInput], prompt_ids, ids: Tensor,
                   valid: Tensor, rows_per_pass: int) -> Tensor:
    """``[B, K]`` scores: one prefix pass for the B images, then the candidates on the cache.

    Each pass feeds a group of candidates packed in one row per image (``segment_ids`` on the
    cache: each candidate sees the prefix and its own tokens), so the prefix's keys and values
    are never copied per candidate; ``rows_per_pass`` bounds images × candidates per pass.
    """
    device, dtype = model.ln_post.weight.device, model.ln_post.weight.dtype
    p_ids, p_img, p_attn, p_pos, pixels, nxt = prefix_batch(items, prompt_ids, dtype, device)
    out = model(input_ids=p_ids, pixel_values=pixels, image_mask=p_img, position_ids=p_pos,
                attention_mask=p_attn, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)      # [B, V]
    cache = out.past_key_values
    b, k = len(items), ids.shape[0]
    lengths = valid.sum(1)
    scores = torch.empty(b, k, device=device)
    for group in torch.arange(k, device=device).split(max(1, rows_per_pass // b)):
        total = first[:, ids[group, 0]]                                # [B, G]
        feed, target, segment, offset = packed_continuations(ids[group], valid[group])
        if feed.numel():
            rows = feed.expand(b, -1)
            pos = (nxt[:, None] + offset[None])[:, None].expand(-1, 3, -1)
            step = model(input_ids=rows, position_ids=pos, past_key_values=cache.branch(),
                         attention_mask=torch.cat([p_attn, torch.ones_like(rows)], dim=1),
                         segment_ids=segment.expand(b, -1),
                         image_mask=torch.zeros_like(rows, dtype=torch.bool), use_cache=True)
            lp = torch.log_softmax(step.logits.float(), dim=-1).gather(
                2, target.expand(b, -1)[..., None])[..., 0]            # [B, T]
            total = total.index_add(1, segment, lp)
        scores[:, group] = total / lengths[group]
    return scores


@torch.no_grad()
def row_log_probs(model: GenLIPModel, items: Sequence[ImageInput], prompt_ids, ids: Tensor,
                  valid: Tensor) -> Tensor:
    """``[R, Lc]`` log P(ids[r, t] | image r, prompt, ids[r, <t]) from ONE full forward of
    ``[IMG×N] prompt ids`` rows (no cache; right padding masked out, zeros there).

    Args:
        items: the image of each row (R of them).
        ids / valid: ``[R, Lc]`` right-padded caption ids and their mask.
    """
    device, dtype = model.ln_post.weight.device, model.ln_post.weight.dtype
    lc = ids.shape[1]
    # prompt + a placeholder caption: the same layout and positions as the cached path
    row_ids, img_mask, attn, pos, pixels, _ = prefix_batch(items, list(prompt_ids) + [0] * lc,
                                                           dtype, device)
    row_ids[:, -lc:] = ids
    attn[:, -lc:] = valid.long()
    out = model(input_ids=row_ids, pixel_values=pixels, image_mask=img_mask,
                position_ids=pos, attention_mask=attn, logits_to_keep=lc + 1)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)     # predicts tokens 0..
    return logp.gather(2, ids[..., None])[..., 0].masked_fill(~valid, 0.0)


def _scores_recomputed(model: GenLIPModel, items: Sequence[ImageInput], prompt_ids,
                       ids: Tensor, valid: Tensor, rows_per_pass: int) -> Tensor:
    """``[B, K]`` scores with the prefix recomputed for every candidate row (no cache)."""
    b, k = len(items), ids.shape[0]
    scores = torch.empty(b * k, device=ids.device)
    for chunk in torch.arange(b * k).split(rows_per_pass):
        img, cand = (chunk // k).tolist(), (chunk % k).to(ids.device)
        lp = row_log_probs(model, [items[i] for i in img], prompt_ids, ids[cand], valid[cand])
        scores[chunk.to(ids.device)] = lp.sum(1) / valid[cand].sum(1)
    return scores.reshape(b, k)


def score_candidates(model: GenLIPModel, images: Sequence[ImageInput],
                     prompt_ids: Sequence[int], candidates: Sequence[Sequence[int]], *,
                     use_cache: bool = True, image_batch: int = 8,
                     rows_per_pass: int = 256) -> Tensor:
    """Length-normalised log P(candidate | image, prompt) for every image × candidate.

    Args:
        model: HF-format GenLIP (``load_genlip_for_inference``), eval mode.
        images: ``(pixel_values [N, C*p*p], (gh, gw))`` per image (uint8 patches or normalised
            floats, as for :func:`generate_ids`).
        prompt_ids: the user prompt's ids (the training prompt; ``EvalSample.prompt_ids``).
        candidates: token ids of each candidate caption (no end token: a class caption is
            usually a prefix of a full caption).
        use_cache: compute each image prefix once and reuse it through the KV cache; False
            recomputes it for every candidate row (the reference the cache must match).
        image_batch: images whose prefixes run together.
        rows_per_pass: image × candidate rows per forward of the candidate tokens.

    Returns:
        float32 ``[num_images, num_candidates]`` on the model's device.
    """
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("score_candidates needs non-empty candidate captions.")
    device = model.ln_post.weight.device
    ids, valid = padded_ids(candidates, device)
    fn = _scores_cached if use_cache else _scores_recomputed
    out = [fn(model, images[i:i + image_batch], prompt_ids, ids, valid, rows_per_pass)
           for i in range(0, len(images), image_batch)]
    return torch.cat(out) if out else torch.empty(0, len(candidates), device=device)


def classify(scores: Tensor, task: ZeroShotTask) -> Tensor:
    """Predicted class per image from ``[B, classes × templates]`` scores (template mean)."""
    per_class = scores.reshape(scores.shape[0], task.num_classes, len(task.templates))
    return per_class.mean(dim=2).argmax(dim=1)


def zero_shot_accuracy(model: GenLIPModel, images: Sequence[ImageInput],
                       labels: Sequence[int], prompt_ids: Sequence[int], task: ZeroShotTask,
                       **kwargs) -> tuple[float, Tensor]:
    """(top-1 accuracy, predictions) of generative zero-shot classification.

    ``kwargs`` go to :func:`score_candidates`.
    """
    if len(images) != len(labels) or not images:
        raise ValueError(f"zero-shot needs one label per image ({len(images)} images, "
                         f"{len(labels)} labels) and at least one image.")
    pred = classify(score_candidates(model, images, prompt_ids, task.candidates, **kwargs),
                    task).cpu()
    acc = float((pred == torch.as_tensor(list(labels))).float().mean())
    return acc, pred
