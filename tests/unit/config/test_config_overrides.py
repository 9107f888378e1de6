"""``--set`` overrides and YAML numbers: what a user types is what the run gets."""

from __future__ import annotations

import pytest

from genlip_megatron.config import ConfigError, RunConfig, load_config
from genlip_megatron.config.loader import load_yaml, parse_override_value
from genlip_megatron.run import parse_args


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("1.0e6", 1e6), ("-2E+2", -200.0),
                                        (".5e1", 5.0), ("1e3", 1000.0), ("3", 3),
                                        ("1.5", 1.5), ("e5", "e5"), ("v1e3", "v1e3")])
def test_yaml_numbers_in_exponent_form_are_floats(text, value):
    got = parse_override_value(text, "optimizer.lr")
    assert got == value and type(got) is type(value)


def test_config_file_exponent_floats_load_as_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  min_lr: 1.0e-6\n")
    cfg = load_config(path, ["optimizer.weight_decay=5e-2"])
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.weight_decay) == \
        (1e-3, 1e-6, 5e-2)
    assert load_yaml("a: 1e-3")["a"] == 1e-3


def test_repeated_set_flags_accumulate():
    args = parse_args(["--config", "c.yaml", "--set", "a.b=1", "c.d=2", "--set", "e.f=3"])
    assert args.set == ["a.b=1", "c.d=2", "e.f=3"]


def test_bad_yaml_value_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"^--set data\.sources: value '\[\{paths: x' is not "
                                          r"valid YAML"):
        load_config(path, ["data.sources=[{paths: x"])
    path.write_text("optimizer: [1,\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line \d+ is not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("section,field,value,key", [
    ("optimizer", "lr", -1.0, "optimizer.lr"),
    ("optimizer", "weight_decay", -0.1, "optimizer.weight_decay"),
    ("optimizer", "min_lr", 2e-3, "optimizer.min_lr"),
    ("training", "micro_batch_size", 0, "training.micro_batch_size"),
    ("training", "train_steps", -1, "training.train_steps"),
    ("logging", "log_interval", 0, "logging.log_interval"),
    ("checkpoint", "keep_last", -1, "checkpoint.keep_last"),
])
def test_section_rules_name_the_key(section, field, value, key):
    cfg = RunConfig()
    cfg.validate(world_size=1)
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate(world_size=1)
