"""Unigram baseline of the DEMO line: label histogram across batches and its entropy."""

from __future__ import annotations

import math

import torch

from genlip_megatron.training.evaluation import unigram_loss
from genlip_megatron.training.trainer import RunSummary


def test_unigram_loss_is_the_entropy_of_all_seen_labels():
    summary = RunSummary()
    assert math.isnan(unigram_loss(summary.label_counts))
    summary.add_labels(torch.tensor([[1, 1, -100, 3]]))
    summary.add_labels(torch.tensor([[5, -100], [-100, -100]]))   # longer vocab range later
    assert summary.label_counts.tolist() == [0, 2, 0, 1, 0, 1]
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert abs(unigram_loss(summary.label_counts) - expected) < 1e-12
