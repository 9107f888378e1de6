"""Top-level test configuration.

Tests under tests/multirank/ need several processes; they are collected only inside torchrun
(tests/test_multirank_sessions.py launches those sessions), never by the plain pytest run.
"""

import os

import pytest
import torch

if "TORCHELASTIC_RUN_ID" not in os.environ:
    collect_ignore_glob = ["multirank/*"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (not present on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
