"""Attentive and segmentation probes (evaluation/attentive_probe.py, segmentation_probe.py)
on hand-made features whose answer is known, and wired into the suite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genlip_megatron.evaluation.attentive_probe import AttentiveProbeRecipe, \
    attentive_probe_accuracy
from genlip_megatron.evaluation.segmentation_probe import IGNORE, SegProbeRecipe, \
    confusion_miou, segmentation_miou, train_segmentation_probe
from genlip_megatron.evaluation.probe_features import standardise


def _where_task(n: int, seed: int, width: int = 16):
    """Images of 9 patches; the class is WHICH patch holds the 'shape' (a fixed direction).
    The patches carry a position code, as trained features do, so the label is readable."""
    pos = torch.randn(9, width, generator=torch.Generator().manual_seed(99))
    shape = torch.randn(width, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for _ in range(n):
        c = int(torch.randint(0, 9, (1,), generator=g))
        f = 0.5 * torch.randn(9, width, generator=g)
        f[c] += 2.0 * shape + pos[c]
        feats.append(f)
        labels.append(c)
    return feats, labels


def test_attentive_probe_reads_a_position_code_and_not_noise():
    train, ytr = _where_task(160, 1)
    test, yte = _where_task(80, 2)
    recipe = AttentiveProbeRecipe(epochs=15, batch_size=32)
    assert attentive_probe_accuracy(train, ytr, test, yte, 9, recipe) > 0.9
    # without the position code (what a random-init encoder gives): near chance, 1/9
    g = torch.Generator().manual_seed(5)
    noise_tr = [torch.randn(9, 16, generator=g) for _ in ytr]
    noise_te = [torch.randn(9, 16, generator=g) for _ in yte]
    assert attentive_probe_accuracy(noise_tr, ytr, noise_te, yte, 9, recipe) < 0.3


def test_attentive_probe_is_deterministic_and_keeps_the_callers_rng():
    train, ytr = _where_task(60, 3)
    test, yte = _where_task(30, 4)
    recipe = AttentiveProbeRecipe(epochs=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = attentive_probe_accuracy(train, ytr, test, yte, 9, recipe)
    assert torch.equal(torch.get_rng_state(), state)   # the training loop's stream untouched
    b = attentive_probe_accuracy(train, ytr, test, yte, 9, recipe)
    assert a == b
    with pytest.raises(ValueError, match="one label per test image"):
        attentive_probe_accuracy(train, ytr, test, yte[:-1], 9, recipe)


def test_miou_by_hand():
    conf = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 0, 0]])   # class 2 absent from the truth
    iou0, iou1 = 8 / (10 + 9 - 8), 3 / (4 + 5 - 3)
    assert confusion_miou(conf) == pytest.approx((iou0 + iou1) / 2)


def _seg_task(n: int, seed: int):
    """2x2 patch grid, 8 px patches: each patch is class 0..2 given by its feature direction;
    the mask paints the patch's pixels (a border of IGNORE pixels tests the ignore index)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.eye(3, 8) * 3
    feats, masks = [], []
    for _ in range(n):
        cls = torch.randint(0, 3, (4,), generator=g)
        feats.append(dirs[cls] + 0.3 * torch.randn(4, 8, generator=g))
        m = cls.reshape(2, 2).repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
        m = m.astype(np.uint8)
        m[0, :] = IGNORE
        masks.append(m)
    return feats, [(2, 2)] * n, masks


def test_segmentation_probe_learns_patch_classes():
    feats, grids, masks = _seg_task(40, 0)
    tfeats, tgrids, tmasks = _seg_task(20, 1)
    tr, te = standardise(feats, tfeats)
    head = train_segmentation_probe(tr, grids, masks, 3, SegProbeRecipe(epochs=30))
    miou = segmentation_miou(head, te, tgrids, tmasks, 3)
    # bilinear upsampling blurs the patch borders: most pixels right, not all
    assert 0.7 < miou <= 1.0
    random_masks = [np.random.default_rng(i).integers(0, 3, m.shape).astype(np.uint8)
                    for i, m in enumerate(tmasks)]
    assert segmentation_miou(head, te, tgrids, random_masks, 3) < 0.5
