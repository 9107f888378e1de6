"""Energon index files → plain sources (data/energon.py); field_map access on samples.

The .nv-meta files here are written in the layout ``energon prepare`` 7.4 writes (the
integration test tests/integration/test_energon_pretrain.py runs the real tool).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genlip_megatron.config.data import DataConfig, SourceConfig
from genlip_megatron.config.loader import ConfigError
from genlip_megatron.data.energon import mapped_fields, resolve_data_config, resolve_sources
from genlip_megatron.data.template import SampleError


def _prepared(root: Path, n: int, dataset_yaml: str, split_yaml: str) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"shard-{i:06d}.tar").write_bytes(b"")
    meta = root / ".nv-meta"
    meta.mkdir()
    (meta / "dataset.yaml").write_text(dataset_yaml)
    (meta / "split.yaml").write_text(split_yaml)
    return root


CAPTIONING = ("sample_type:\n  __module__: megatron.energon\n  __class__: CaptioningSample\n"
              "field_map:\n  image: jpg,png\n  caption: json[caption]\n")
SPLITS = ("split_parts:\n  train:\n  - shard-{000000..000003}.tar\n  val:\n"
          "  - shard-000004.tar\nexclude:\n- shard-000002.tar\n")


def test_dataset_folder_becomes_the_split_tars_minus_excluded(tmp_path):
    root = _prepared(tmp_path / "ds", 5, CAPTIONING, SPLITS)
    [src] = resolve_sources([SourceConfig(path=str(root), format="energon", weight=3.0)],
                            "data.sources")
    assert src.paths == [str(root / f"shard-00000{i}.tar") for i in (0, 1, 3)]
    assert (src.format, src.weight) == ("caption", 3.0)
    assert src.field_map == {"image": "jpg,png", "caption": "json[caption]"}
    [val] = resolve_sources([SourceConfig(path=str(root), format="energon", split="val")], "x")
    assert val.paths == [str(root / "shard-000004.tar")]


def test_metadataset_blend_multiplies_weights_and_resolves_relative_paths(tmp_path):
    _prepared(tmp_path / "a", 2, CAPTIONING, "split_parts:\n  train:\n  - shard-000000.tar\n")
    _prepared(tmp_path / "b", 2, "__module__: megatron.energon\n__class__: CrudeWebdataset\n",
              "split_parts:\n  train:\n  - shard-{000000..000001}.tar\n")
    inner = tmp_path / "inner.yaml"
    inner.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n"
                     "  train: {path: b}\n")
    blend = tmp_path / "blend.yaml"
    blend.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n"
                     "  train:\n    blend:\n      - {weight: 2, path: a}\n"
                     "      - {weight: 0.5, path: inner.yaml}\n")
    cfg = DataConfig(sources=[SourceConfig(path=str(blend), format="energon", weight=2.0,
                                           name="mix")])
    out = resolve_data_config(cfg.validate()).sources
    assert [(s.weight, s.format, s.name) for s in out] == [
        (4.0, "caption", "mix:a"), (1.0, "conversations", "mix:b")]
    assert out[1].paths == [str(tmp_path / "b" / f"shard-00000{i}.tar") for i in (0, 1)]
    assert out[1].field_map is None


@pytest.mark.parametrize("dataset_yaml, split, message", [
    ("sample_type: {__module__: megatron.energon, __class__: CaptioningSample}\n"
     "sample_loader: sample_loader.py:sample_loader\n", "train", "Python sample_loader"),
    ("sample_type: {__module__: megatron.energon, __class__: OCRSample}\n"
     "field_map: {image: jpg, text: txt}\n", "train", "sample type 'OCRSample'"),
    (CAPTIONING, "test", "no split 'test'"),
])
def test_unreadable_datasets_are_one_line_config_errors(tmp_path, dataset_yaml, split, message):
    root = _prepared(tmp_path / "ds", 1, dataset_yaml, "split_parts:\n  train:\n"
                     "  - shard-000000.tar\n")
    with pytest.raises(ConfigError, match=message) as err:
        resolve_sources([SourceConfig(path=str(root), format="energon", split=split)],
                        "data.sources")
    assert "\n" not in str(err.value) and "data.sources[0]" in str(err.value)


def test_unprepared_folder_and_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="energon prepare"):
        resolve_sources([SourceConfig(path=str(tmp_path), format="energon")], "data.sources")
    with pytest.raises(ConfigError, match="data.sources.0..path"):
        DataConfig(sources=[SourceConfig(paths="x/*.tar", format="energon")]).validate()
    with pytest.raises(ConfigError, match="only read by format energon"):
        DataConfig(sources=[SourceConfig(paths="x/*.tar", path="d")]).validate()
    with pytest.raises(ConfigError, match="format vqa needs field_map"):
        DataConfig(sources=[SourceConfig(paths="x/*.tar", format="vqa")]).validate()


def test_field_map_access_like_energon():
    members = {"png": b"\x89PNG...", "json": json.dumps(
        {"caption": "a cat", "qa": {"q": "what?", "a": ["a cat", "cat"]}}).encode(),
        "txt": b"plain text"}
    image, meta = mapped_fields(members, {"image": "jpg,png", "caption": "json[caption]"},
                                "caption")
    assert image == b"\x89PNG..." and meta == {"caption": "a cat"}
    assert mapped_fields(members, {"image": "png", "caption": "txt"}, "caption")[1] == \
        {"caption": "plain text"}
    _, vqa = mapped_fields(members, {"image": "png", "context": "json[qa][q]",
                                     "answers": "json[qa][a]"}, "vqa")
    assert vqa == {"conversations": [{"from": "human", "value": "what?"},
                                     {"from": "gpt", "value": "a cat"}]}
    with pytest.raises(SampleError) as err:
        mapped_fields(members, {"image": "jpg", "caption": "txt"}, "caption")
    assert err.value.reason == "missing_image"
    with pytest.raises(SampleError) as err:
        mapped_fields(members, {"image": "png", "caption": "json[title]"}, "caption")
    assert err.value.reason == "missing_text"
    with pytest.raises(SampleError) as err:
        mapped_fields({"png": b"x", "json": b"{bad"}, {"image": "png",
                                                       "caption": "json[c]"}, "caption")
    assert err.value.reason == "bad_json"
