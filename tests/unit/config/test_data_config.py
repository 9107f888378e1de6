"""DataConfig: YAML mapping, defaults and data-only validation with dotted keys."""

import pytest
import yaml

from genlip_megatron.config import config_from_dict
from genlip_megatron.config.loader import ConfigError
from genlip_megatron.config.data import DataConfig, ImageConfig, SourceConfig, TextConfig

YAML = """
data:
  max_seq_len: 16384
  sources:
    - {paths: "/d/a/{00000..00009}.tar", weight: 3.0, format: conversations}
    - {paths: ["/d/b/*.tar"], format: caption, name: recap}
  eval_sources: [{paths: /d/heldout/*.tar}]
  image: {policy: native, decoder: pillow}
  text: {tokenizer_path: .cache/qwen3/tokenizer.json, prompt: "Describe the image."}
  reader: {num_workers: 4}
"""


def test_yaml_maps_onto_dataclasses():
    cfg = config_from_dict(yaml.safe_load(YAML)).data.validate()
    assert cfg.sources[0] == SourceConfig(paths="/d/a/{00000..00009}.tar", weight=3.0,
                                          format="conversations")
    assert cfg.sources[1].paths == ["/d/b/*.tar"] and cfg.sources[1].name == "recap"
    assert cfg.image.policy == "native" and cfg.image.max_pixels == 262144
    assert cfg.text.prompt == "Describe the image." and cfg.reader.num_workers == 4


def test_defaults_follow_the_reference():
    cfg = DataConfig()
    assert (cfg.max_seq_len, cfg.pad_multiple) == (16384, 16)
    assert (cfg.image.fixed_size, cfg.image.min_pixels, cfg.image.max_pixels,
            cfg.image.max_aspect_ratio, cfg.image.patch_size) == (224, 4096, 262144, 200.0, 16)
    assert cfg.text.prompt == "Describe the image in detail."


@pytest.mark.parametrize("change, key", [
    (dict(max_seq_len=1000), "data.max_seq_len"),
    (dict(image=ImageConfig(fixed_size=100)), "data.image.fixed_size"),
    (dict(image=ImageConfig(min_pixels=10)), "data.image.min_pixels"),
    (dict(text=TextConfig(max_sample_len=20000)), "data.text.max_sample_len"),
    (dict(sources=[SourceConfig(paths="x", weight=0.0)]), "data.sources[0].weight"),
    (dict(sources=[SourceConfig(paths=[])]), "data.sources[0].paths"),
])
def test_validate_names_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        DataConfig(**change).validate()


def test_unknown_and_mistyped_keys_are_errors():
    with pytest.raises(ConfigError, match="data.image.polcy"):
        config_from_dict({"data": {"image": {"polcy": "native"}}})
    with pytest.raises(ConfigError, match="data.sources"):
        config_from_dict({"data": {"sources": [{"paths": "x", "format": "captions"}]}})
