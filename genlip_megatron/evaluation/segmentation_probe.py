"""Linear patch segmentation probe (``seg/miou``), the paper's ADE20K protocol in small.

A linear layer maps each frozen patch feature (standardised with the train statistics) to class
logits; the ``[C, gh, gw]`` logit map is upsampled bilinearly to the image's pixels and trained
with per-pixel cross-entropy against the mask (pixels valued :data:`IGNORE` are left out).
mIoU on the test images: one confusion matrix over every test pixel, IoU = TP / (TP + FP + FN)
per class, averaged over the classes present in the test masks. The recipe (AdamW, warm-up +
cosine, fixed epochs and seed, under ``fork_rng``) is that of the attentive probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from genlip_megatron.evaluation.attentive_probe import cosine_schedule
from genlip_megatron.evaluation.probe_features import FeatureProbe, ProbeFeatures, standardise

__all__ = ["IGNORE", "SegProbeRecipe", "pixel_logits", "train_segmentation_probe",
           "segmentation_miou", "confusion_miou", "SegmentationProbeEvaluator"]

IGNORE = 255
"""Mask value of pixels without a class (the usual segmentation ignore index)."""


@dataclass(kw_only=True)
class SegProbeRecipe:
    """Hyper-parameters of the segmentation probe (docs/evaluation.md)."""

    epochs: int = 20
    """Passes over the train images."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-2
    """Peak AdamW learning rate (a linear layer on standardised features)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_fraction: float = 0.1
    """Share of the steps with a linear warm-up."""
    seed: int = 0
    """Initialisation and shuffling seed."""


def pixel_logits(head: nn.Linear, feats: Tensor, grid: tuple[int, int],
                 size: tuple[int, int]) -> Tensor:
    """``[C, H, W]`` logits: per-patch logits ``[C, gh, gw]`` upsampled (bilinear) to ``size``."""
    gh, gw = grid
    logits = head(feats).T.reshape(1, -1, gh, gw)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]


def _groups(grids: Sequence[tuple[int, int]], masks: Sequence[np.ndarray], batch: int,
            gen: torch.Generator) -> list[list[int]]:
    """Shuffled mini-batches of image indices sharing one grid and mask size."""
    by_shape: dict[tuple, list[int]] = {}
    for i, (g, m) in enumerate(zip(grids, masks)):
        by_shape.setdefault((tuple(g), m.shape), []).append(i)
    out = []
    for idx in by_shape.values():
        perm = torch.randperm(len(idx), generator=gen).tolist()
        out += [[idx[j] for j in perm[k:k + batch]] for k in range(0, len(idx), batch)]
    order = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in order]


def train_segmentation_probe(feats: Sequence[Tensor], grids: Sequence[tuple[int, int]],
                             masks: Sequence[np.ndarray], num_classes: int,
                             recipe: SegProbeRecipe) -> nn.Linear:
    """Train the per-patch linear classifier on standardised features and pixel masks."""
    if not feats or not (len(feats) == len(grids) == len(masks)):
        raise ValueError(f"segmentation probe needs one mask per train image ({len(feats)} "
                         f"images, {len(masks)} masks) and at least one image.")
    targets = [torch.from_numpy(m.astype(np.int64)) for m in masks]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        head = nn.Linear(feats[0].shape[1], num_classes)
        gen = torch.Generator().manual_seed(recipe.seed)
        steps = recipe.epochs * len(_groups(grids, masks, recipe.batch_size,
                                            torch.Generator().manual_seed(0)))
        opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr,
                                weight_decay=recipe.weight_decay)
        sched = cosine_schedule(opt, steps, recipe.warmup_fraction)
        for _ in range(recipe.epochs):
            for idx in _groups(grids, masks, recipe.batch_size, gen):
                gh, gw = grids[idx[0]]
                x = torch.stack([feats[i] for i in idx])                   # [B, N, E]
                logits = head(x).transpose(1, 2).reshape(len(idx), -1, gh, gw)
                logits = F.interpolate(logits, size=masks[idx[0]].shape, mode="bilinear",
                                       align_corners=False)
                loss = F.cross_entropy(logits, torch.stack([targets[i] for i in idx]),
                                       ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return head


def confusion_miou(confusion: Tensor) -> float:
    """Mean IoU over the classes present in the ground truth (rows of ``confusion[gt, pred]``)."""
    tp = confusion.diag().double()
    gt, pred = confusion.sum(1).double(), confusion.sum(0).double()
    present = gt > 0
    if not bool(present.any()):
        return float("nan")
    iou = tp[present] / (gt[present] + pred[present] - tp[present])
    return float(iou.mean())


@torch.no_grad()
def segmentation_miou(head: nn.Linear, feats: Sequence[Tensor],
                      grids: Sequence[tuple[int, int]], masks: Sequence[np.ndarray],
                      num_classes: int) -> float:
    """mIoU of the probe's predictions on (standardised) test features."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for f, g, m in zip(feats, grids, masks):
        pred = pixel_logits(head, f, g, m.shape).argmax(0).flatten()
        gt = torch.from_numpy(m.astype(np.int64)).flatten()
        keep = (gt != IGNORE) & (gt < num_classes)
        confusion += torch.bincount(gt[keep] * num_classes + pred[keep],
                                    minlength=num_classes ** 2).reshape(num_classes, -1)
    return confusion_miou(confusion)


def num_mask_classes(masks: Sequence[np.ndarray]) -> int:
    """Classes the masks use: the largest value other than :data:`IGNORE`, plus one."""
    top = [int(m[m != IGNORE].max()) for m in masks if (m != IGNORE).any()]
    return max(top) + 1 if top else 0


@dataclass
class SegmentationProbeEvaluator(FeatureProbe):
    """``seg/miou`` (and ``seg/classes``) of the masks (``EvalSample.mask``) of
    ``features.train`` / ``.test``; the class count is read off the masks unless given."""

    features: ProbeFeatures
    num_classes: Optional[int] = None
    recipe: SegProbeRecipe = field(default_factory=SegProbeRecipe)
    name: str = "seg"

    def score(self, train: list[torch.Tensor], test: list[torch.Tensor]) -> dict[str, float]:
        keep_tr = [i for i, s in enumerate(self.features.train) if s.mask is not None]
        keep_te = [i for i, s in enumerate(self.features.test) if s.mask is not None]
        tr = [self.features.train[i] for i in keep_tr]
        te = [self.features.test[i] for i in keep_te]
        n = self.num_classes or num_mask_classes([s.mask for s in tr + te])
        if n < 2:
            raise ValueError(f"segmentation probe needs masks with at least 2 classes ({n}).")
        train_s, test_s = standardise([train[i] for i in keep_tr], [test[i] for i in keep_te])
        head = train_segmentation_probe(train_s, [s.grid for s in tr], [s.mask for s in tr],
                                        n, self.recipe)
        miou = segmentation_miou(head, test_s, [s.grid for s in te], [s.mask for s in te], n)
        return {"seg/miou": miou, "seg/classes": float(n)}

