"""Frozen encoder features of the probe images, extracted once per checkpoint.

The attentive probe and the segmentation probe read the same features: the exported encoder's
output (``ln_post`` of the image-only, bidirectional pass, ``probes/features.py``), one
``[gh*gw, E]`` tensor per image. :class:`ProbeFeatures` computes them for the probe's train and
test images the first time a model asks and hands the same tensors to every probe of that
model (the suite runs all evaluators on one loaded checkpoint), so a checkpoint costs one
encoder pass per image whatever the number of probes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.data.inference import EvalSample
from genlip_megatron.probes.features import encode_images

__all__ = ["ProbeFeatures", "standardise"]


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

    def __call__(self, model: GenLIPModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(train features, test features), each a list of float32 ``[gh*gw, E]`` on CPU."""
        if self._model is None or self._model() is not model:
            self._feats = (self._encode(model, self.train), self._encode(model, self.test))
            self._model = weakref.ref(model)
        return self._feats

    def _encode(self, model: GenLIPModel, samples: Sequence[EvalSample]) -> list[torch.Tensor]:
        if not samples:
            return []
        images = [(s.pixel_values, s.grid) for s in samples]
        return [f.float().cpu() for f in encode_images(model, images, self.batch_size)]


def standardise(train: Sequence[torch.Tensor], *others: Sequence[torch.Tensor]
                ) -> list[list[torch.Tensor]]:
    """Per-channel zero mean / unit variance with the TRAIN patches' statistics (the issue's
    measurement did so; ``ln_post`` features of different checkpoints differ in scale, and the
    fixed probe recipe should not have to adapt its learning rate to that)."""
    flat = torch.cat(list(train))
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    return [[(f - mean) / std for f in group] for group in (train, *others)]
