"""Tests against the Transformer Engine stand-in (``standin_site/transformer_engine``).

Every test module here is marked ``te_standin`` and runs its bodies in the stand-in worker
process (``harness.py``); the pytest process itself never imports the stand-in.
"""

from __future__ import annotations

import pytest

from harness import StandinWorker


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """The session's stand-in worker process."""
    worker = StandinWorker(tmp_path_factory.mktemp("te_standin"))
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Synthetic training shards + tokenizer (the training tests' generator)."""
    from training_helpers import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("te_standin_data"))
