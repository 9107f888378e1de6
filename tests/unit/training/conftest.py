"""Fixtures of the trainer tests: the tiny data set and a factory of tiny Trainers (TP=PP=1,
one process) that closes what it built."""

from pathlib import Path

import pytest

from training_helpers import TINY_CONFIG, make_tiny_data, tiny_overrides


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def make_trainer(gloo_world, data_dir):
    from genlip_megatron.config import load_config
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer

    built = []

    def make(*sets: str):
        destroy_topology()
        cfg = load_config(TINY_CONFIG, tiny_overrides(data_dir) + list(sets))
        built.append(Trainer(cfg.validate(world_size=1)))
        return built[-1]

    yield make
    for trainer in built:
        trainer.close()
    destroy_topology()
