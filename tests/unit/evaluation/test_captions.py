"""Unigram baseline of the RUN/DEMO line: label histogram across batches, resumes, and its
entropy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from genlip_megatron.evaluation.captions import unigram_loss
from genlip_megatron.training.metrics import RunTotals


def _add(totals: RunTotals, labels: list) -> None:
    t = torch.tensor(labels)
    totals.add_batch(samples=1, tokens=t.numel(), flops=0.0, labels=t)


def test_unigram_loss_is_the_entropy_of_all_seen_labels():
    assert math.isnan(unigram_loss(None))
    totals = RunTotals({}, vocab_size=6)
    _add(totals, [[1, 1, -100, 3]])
    _add(totals, [[5, -100], [-100, -100]])
    totals.sync()                                   # no process group: this rank's counts
    counts = totals.extra["label_counts"]
    assert counts.tolist() == [0, 2, 0, 1, 0, 1]
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert abs(unigram_loss(counts) - expected) < 1e-12


def test_run_totals_continue_exactly_across_a_resume():
    batches = [[[1, 2, 2]], [[3, -100]], [[4, 4, 1]], [[0, 5]]]
    whole = RunTotals({}, vocab_size=6)
    for b in batches:
        _add(whole, b)
    whole.add_skip()
    whole.sync()
    first = RunTotals({}, vocab_size=6)
    for b in batches[:2]:
        _add(first, b)
    first.add_skip()
    first.sync()                                    # what a save writes into TrainingState.extra
    saved = copy.deepcopy(first.extra)
    _add(first, batches[2])                         # lost with the killed process
    resumed = RunTotals(saved, vocab_size=6)
    for b in batches[2:]:
        _add(resumed, b)
    resumed.sync()
    assert torch.equal(resumed.extra["label_counts"], whole.extra["label_counts"])
    assert resumed.metrics() == whole.metrics() == {
        "consumed/samples": 4.0, "consumed/tokens": 10.0, "train/skipped_steps_total": 1.0}


def test_label_outside_the_vocabulary_is_an_error():
    with pytest.raises(RuntimeError, match=r"label id 7 ≥ model.vocab_size \(4\)"):
        _add(RunTotals({}, vocab_size=4), [[7]])
