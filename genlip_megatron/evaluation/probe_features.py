"""Frozen encoder features of the probe images, extracted once per checkpoint.

The attentive probe and the segmentation probe read the same features: the exported encoder's
output (``ln_post`` of the image-only, bidirectional pass, ``probes/features.py``), one
``[gh*gw, E]`` tensor per image. :class:`ProbeFeatures` computes them for the probe's train and
test images the first time a model asks and hands the same tensors to every probe of that
model (the suite runs all evaluators on one loaded checkpoint), so a checkpoint costs one
encoder pass per image whatever the number of probes.

Over data-parallel ranks (``evaluation/data_parallel.py``) the images are items: train images
at ``0..len(train)-1``, test images from the next multiple of ``batch_size`` on (the indices
between are empty), so every block of ``batch_size`` items is one encoder batch of one split,
exactly the batch a single process runs. ``partial`` encodes a rank's blocks; ``assemble``
puts every rank's blocks back in order, so the features (and the probes trained on them) are
bit-identical at any number of ranks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.data.inference import EvalSample
from genlip_megatron.evaluation.data_parallel import ordered_blocks
from genlip_megatron.probes.features import encode_images

__all__ = ["FeatureProbe", "ProbeFeatures", "standardise"]


@dataclass
class ProbeFeatures:
    """Train/test samples of a probe and their features, cached for the last model seen.

    Attributes:
        train, test: labelled samples (``EvalSample.label`` / ``.mask``).
        batch_size: images per encoder forward.
    """

    train: list[EvalSample]
    test: list[EvalSample]
    batch_size: int = 32
    _model: Optional[weakref.ref] = field(default=None, repr=False)
    _feats: tuple[list[torch.Tensor], list[torch.Tensor]] = field(default=((), ()),
                                                                   repr=False)
    _partial: tuple = field(default=(None, None, None), repr=False)

    @property
    def test_start(self) -> int:
        """Item index of the first test image: train rounded up to whole blocks."""
        return -(-len(self.train) // self.batch_size) * self.batch_size

    @property
    def num_items(self) -> int:
        return self.test_start + len(self.test)

    def _item(self, index: int) -> Optional[EvalSample]:
        if index < len(self.train):
            return self.train[index]
        return self.test[index - self.test_start] if index >= self.test_start else None

    def __call__(self, model: GenLIPModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(train features, test features), each a list of float32 ``[gh*gw, E]`` on CPU."""
        if self._model is None or self._model() is not model:
            self._feats = self.assemble([self.partial(model, range(self.num_items))])
            self._model = weakref.ref(model)
        return self._feats

    def partial(self, model: GenLIPModel, indices: Sequence[int]) -> dict:
        """``{"blocks": [(first_index, [features])]}`` of the given whole blocks (the last
        call's result again for the same model and indices: both probes ask)."""
        key = tuple(indices)
        ref, last_key, state = self._partial
        if ref is not None and ref() is model and last_key == key:
            return state
        blocks = []
        for start in range(0, len(key), self.batch_size):
            items = [i for i in key[start:start + self.batch_size] if self._item(i) is not None]
            if items:
                blocks.append((items[0], self._encode(model, [self._item(i) for i in items])))
        state = {"blocks": blocks}
        self._partial = (weakref.ref(model), key, state)
        return state

    def assemble(self, states: Sequence[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(train, test) features from every rank's ``partial`` state, in item order."""
        feats = [f for _, block in ordered_blocks(states) for f in block]
        if len(feats) != len(self.train) + len(self.test):
            raise ValueError(f"probe feature states cover {len(feats)} of "
                             f"{len(self.train) + len(self.test)} images.")
        return feats[:len(self.train)], feats[len(self.train):]

    def _encode(self, model: GenLIPModel, samples: Sequence[EvalSample]) -> list[torch.Tensor]:
        if not samples:
            return []
        images = [(s.pixel_values, s.grid) for s in samples]
        return [f.float().cpu() for f in encode_images(model, images, self.batch_size)]


class FeatureProbe:
    """The split plumbing of a probe trained on :class:`ProbeFeatures` (attentive,
    segmentation): ``partial`` encodes a rank's images, the features are gathered to the
    group's last rank (``reduce_on_last_rank``), which trains and scores the probe in
    ``reduce``. A subclass implements ``score(train_features, test_features)``.
    """

    features: ProbeFeatures
    reduce_on_last_rank = True   # the states are encoder features: gathered to one rank

    @property
    def num_items(self) -> int:
        return self.features.num_items

    @property
    def batch_size(self) -> int:
        return self.features.batch_size

    def score(self, train: list[torch.Tensor], test: list[torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def partial(self, model: GenLIPModel, indices: Sequence[int]) -> dict:
        """Features of this rank's images (shared by the probes: encoded once)."""
        return self.features.partial(model, indices)

    def reduce(self, states: Sequence[dict]) -> dict[str, float]:
        """Train the probe on every rank's features, in image order, and score it."""
        return self.score(*self.features.assemble(states))

    def __call__(self, model: GenLIPModel) -> dict[str, float]:
        return self.score(*self.features(model))


def standardise(train: Sequence[torch.Tensor], *others: Sequence[torch.Tensor]
                ) -> list[list[torch.Tensor]]:
    """Per-channel zero mean / unit variance with the TRAIN patches' statistics (the issue's
    measurement did so; ``ln_post`` features of different checkpoints differ in scale, and the
    fixed probe recipe should not have to adapt its learning rate to that)."""
    flat = torch.cat(list(train))
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    return [[(f - mean) / std for f in group] for group in (train, *others)]
