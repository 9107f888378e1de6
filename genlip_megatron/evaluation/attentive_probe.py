"""Attentive probe: image classification from frozen patch features (``probe/accuracy``).

GenLIP has no CLS token, so the paper (like DINOv2 and open_clip's GenLIP probe script) pools
the frozen last-LayerNorm patch features with attention: one learned query, multi-head
cross-attention over the image's patches, LayerNorm, a linear classifier. Only the probe
trains; the encoder is frozen and its features are extracted once per checkpoint
(``probe_features.py``).

The recipe (:class:`AttentiveProbeRecipe`) is fixed so that numbers compare across checkpoints:
features standardised with the train patches' statistics, AdamW, linear warm-up then cosine
decay to zero over a fixed number of epochs, a fixed seed for the initialisation and the
shuffling. It runs under ``torch.random.fork_rng``: the caller's random state (the training
loop's, when the suite runs in the loop) is left as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from genlip_megatron.evaluation.probe_features import FeatureProbe, ProbeFeatures, standardise

__all__ = ["AttentiveProbeRecipe", "AttentivePooler", "train_attentive_probe",
           "attentive_probe_accuracy", "AttentiveProbeEvaluator", "cosine_schedule"]


@dataclass(kw_only=True)
class AttentiveProbeRecipe:
    """Hyper-parameters of the probe (docs/evaluation.md, "Attentive probe")."""

    epochs: int = 20
    """Passes over the train features."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_fraction: float = 0.1
    """Share of the steps with a linear warm-up."""
    heads: int = 4
    """Cross-attention heads (must divide the feature width)."""
    seed: int = 0
    """Initialisation and shuffling seed."""


class AttentivePooler(nn.Module):
    """Learned query → multi-head cross-attention over patches → LayerNorm → linear.

    Args:
        width: feature width E.
        num_classes: output classes.
        heads: attention heads.
    """

    def __init__(self, width: int, num_classes: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, feats: Tensor, pad: Optional[Tensor] = None) -> Tensor:
        """Logits ``[B, C]`` of features ``[B, N, E]`` (``pad`` ``[B, N]``: True = padding)."""
        q = self.query.expand(feats.shape[0], -1, -1)
        pooled, _ = self.attn(q, feats, feats, key_padding_mask=pad, need_weights=False)
        return self.head(self.norm(pooled[:, 0]))


def _padded(feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``[B, Nmax, E]`` zero-padded features and the padding mask ``[B, Nmax]``."""
    n = max(f.shape[0] for f in feats)
    out = torch.zeros(len(feats), n, feats[0].shape[1])
    pad = torch.ones(len(feats), n, dtype=torch.bool)
    for i, f in enumerate(feats):
        out[i, :f.shape[0]] = f
        pad[i, :f.shape[0]] = False
    return out, pad


def cosine_schedule(optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total`` steps, then cosine to zero."""
    warm = max(1, int(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_attentive_probe(feats: Sequence[Tensor], labels: Sequence[int], num_classes: int,
                          recipe: AttentiveProbeRecipe) -> AttentivePooler:
    """Train a pooler on (standardised) features ``[N_i, E]`` with their class ids."""
    if not feats or len(feats) != len(labels):
        raise ValueError(f"attentive probe needs one label per train image ({len(feats)} "
                         f"images, {len(labels)} labels) and at least one image.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        probe = AttentivePooler(feats[0].shape[1], num_classes, recipe.heads)
        x, pad = _padded(feats)
        y = torch.as_tensor(list(labels), dtype=torch.long)
        steps_per_epoch = math.ceil(len(y) / recipe.batch_size)
        opt = torch.optim.AdamW(probe.parameters(), lr=recipe.lr,
                                weight_decay=recipe.weight_decay)
        sched = cosine_schedule(opt, recipe.epochs * steps_per_epoch, recipe.warmup_fraction)
        gen = torch.Generator().manual_seed(recipe.seed)
        probe.train()
        for _ in range(recipe.epochs):
            for idx in torch.randperm(len(y), generator=gen).split(recipe.batch_size):
                loss = nn.functional.cross_entropy(probe(x[idx], pad[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: AttentivePooler, feats: Sequence[Tensor], batch_size: int = 256) -> Tensor:
    """Predicted class per image."""
    out = []
    for i in range(0, len(feats), batch_size):
        x, pad = _padded(feats[i:i + batch_size])
        out.append(probe(x, pad).argmax(-1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def attentive_probe_accuracy(train: Sequence[Tensor], train_labels: Sequence[int],
                             test: Sequence[Tensor], test_labels: Sequence[int],
                             num_classes: int, recipe: Optional[AttentiveProbeRecipe] = None
                             ) -> float:
    """Top-1 accuracy on ``test`` of a probe trained on ``train`` (raw features; standardised
    here with the train statistics)."""
    if not test or len(test) != len(test_labels):
        raise ValueError(f"attentive probe needs one label per test image ({len(test)} images,"
                         f" {len(test_labels)} labels) and at least one image.")
    recipe = recipe or AttentiveProbeRecipe()
    train_s, test_s = standardise(train, test)
    probe = train_attentive_probe(train_s, train_labels, num_classes, recipe)
    pred = predict(probe, test_s)
    return float((pred == torch.as_tensor(list(test_labels))).float().mean())


@dataclass
class AttentiveProbeEvaluator(FeatureProbe):
    """``probe/accuracy`` (and ``probe/majority``: always the most frequent test class,
    ``probe/train_images``, ``probe/test_images``) of the class labels (``EvalSample.label``
    ≥ 0) of ``features.train`` / ``.test``."""

    features: ProbeFeatures
    num_classes: int
    recipe: AttentiveProbeRecipe = field(default_factory=AttentiveProbeRecipe)
    name: str = "probe"

    def score(self, train: list[torch.Tensor], test: list[torch.Tensor]) -> dict[str, float]:
        tr = [i for i, s in enumerate(self.features.train) if s.label >= 0]
        te = [i for i, s in enumerate(self.features.test) if s.label >= 0]
        test_labels = [self.features.test[i].label for i in te]
        acc = attentive_probe_accuracy(
            [train[i] for i in tr], [self.features.train[i].label for i in tr],
            [test[i] for i in te], test_labels, self.num_classes, self.recipe)
        return {"probe/accuracy": acc, "probe/majority": _majority(test_labels),
                "probe/train_images": float(len(tr)), "probe/test_images": float(len(te))}


def _majority(labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent test class (the floor to beat)."""
    counts: dict[int, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return max(counts.values()) / len(labels) if labels else float("nan")
