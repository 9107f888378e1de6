"""Streaming safetensors reader/writer against the safetensors library."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from genlip_megatron.convert.safetensors_io import SafetensorsReader, SafetensorsStreamWriter, \
    dtype_from_name


def test_stream_writer_output_is_a_valid_safetensors_file(tmp_path):
    tensors = {"a.weight": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(4, dtype=torch.int64), "empty": torch.zeros(0, 2)}
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with SafetensorsStreamWriter(tmp_path / "m.safetensors", layout) as w:
        for k, v in tensors.items():
            w.write(k, v)
    loaded = load_file(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    raw = (tmp_path / "m.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}


def test_stream_writer_refuses_out_of_order_and_missing_tensors(tmp_path):
    layout = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
    with pytest.raises(AssertionError, match="expected a"):
        with SafetensorsStreamWriter(tmp_path / "x.safetensors", layout) as w:
            w.write("b", torch.zeros(2))
    with pytest.raises(AssertionError, match="only 1 of 2"):
        with SafetensorsStreamWriter(tmp_path / "y.safetensors", layout) as w:
            w.write("a", torch.zeros(2))


def test_reader_matches_library_and_reads_index_dirs(tmp_path):
    a = {"x": torch.randn(4, 4), "y": torch.randn(3).half()}
    b = {"z": torch.randn(2, 2).to(torch.bfloat16)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors",
                            "y": "model-00001-of-00002.safetensors",
                            "z": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    r = SafetensorsReader(tmp_path)
    assert sorted(r.keys()) == ["x", "y", "z"]
    assert r.shape("x") == (4, 4) and r.dtype("z") == torch.bfloat16
    for k, v in {**a, **b}.items():
        assert torch.equal(r.get(k), v)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafetensorsReader(tmp_path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="nope"):
        SafetensorsReader(tmp_path).get("nope")
    with pytest.raises(ValueError, match="--dtype 'fp64'"):
        dtype_from_name("fp64")
