"""Checkpoint conversion with the real GenLIPMegatronModel (TP=1, one process) and its errors.

Must-shows covered here: the HF export run through the bundled modeling file gives the Megatron
model's logits (fp32, atol 1e-4) on a packed batch and its encoder features; HF → Megatron loads
through the trainer's ``training.init_from`` path bit-exactly. The TP=2/PP=2 round trip is in
tests/multirank/test_convert_roundtrip.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from convert_testlib import TINY, load_megatron, packed_batch, random_hf_state_dict, \
    save_megatron, transformer_config, write_hf_export
from safetensors.torch import load_file

from genlip_megatron.convert import ConversionError, hf_state_dict_to_megatron, \
    hf_to_megatron, mapping_registry, megatron_state_dict_to_hf, megatron_to_hf
from genlip_megatron.convert.megatron_io import DistCheckpointReader

ROWS = [[(2, 3, 7), (3, 3, 5), (1, 2, 6)], [(4, 2, 9), (2, 2, 12)]]


def _model(seed=1234):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    tconfig = transformer_config(dataclasses.replace(TINY, init_std=0.2), seed=seed)
    model = GenLIPMegatronModel(tconfig)
    with torch.no_grad():   # move LayerNorm/LayerScale/biases off their init values
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _canonical(model) -> dict:
    """The model's weights under canonical names (via the registry's aliases)."""
    sd = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    return hf_state_dict_to_megatron(megatron_state_dict_to_hf(sd, TINY), TINY)


@pytest.fixture
def megatron_ckpt(mp_state, tmp_path):
    model = _model()
    save_megatron([model], TINY, tmp_path / "mg", step=7)
    return model, tmp_path / "mg"


def test_hf_export_logits_and_features_match_megatron(megatron_ckpt, tmp_path):
    from transformers import AutoModel

    model, ckpt = megatron_ckpt
    out = megatron_to_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False,
                         require_tokenizer=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "configuration_genlip.py", "image_processing_genlip.py",
        "model.safetensors", "modeling_genlip.py", "preprocessor_config.json",
        "processing_genlip.py"]
    hf = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    b = packed_batch(ROWS, 48, 256, seed=3)
    with torch.no_grad():
        want = model(b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"],
                     b["pixel_values"])                                          # [B, S, V]
        got = hf(input_ids=b["tokens"], pixel_values=b["pixel_values"],
                 image_mask=b["image_mask"], position_ids=b["position_ids"],
                 segment_ids=b["segment_ids"]).logits
    real = b["segment_ids"] >= 0
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    assert want[real].std() > 0.5
    grid = torch.tensor([[2, 3], [4, 4], [1, 5]])
    px = torch.rand(27, 768, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        fm, fh = model.encode_images(px, grid), hf.encode_images(px, grid)
    for a, c in zip(fm, fh):
        torch.testing.assert_close(c, a, atol=1e-4, rtol=0)


def test_export_defaults_bf16_and_reads_tp_pp_free(megatron_ckpt, tmp_path):
    model, ckpt = megatron_ckpt
    megatron_to_hf(ckpt / "iter_0000007", tmp_path / "hf", progress=False,   # iter dir works too
                   require_tokenizer=False)
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    want = megatron_state_dict_to_hf(_canonical(model), TINY)
    assert stored.keys() == want.keys()
    assert all(torch.equal(stored[k], want[k].to(torch.bfloat16)) for k in want)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["genlip_megatron"]["variant"] == "tiny"


def test_from_hf_loads_through_the_trainer_init_from_path(mp_state, tmp_path):
    hf = random_hf_state_dict(TINY, seed=2)
    src = write_hf_export(tmp_path / "hf", TINY, hf)
    ckpt = hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, progress=False)
    assert ckpt == tmp_path / "mg" / "iter_0000000"
    assert (tmp_path / "mg" / "latest").read_text().strip() == "iter_0000000"
    model = _model(seed=99)
    load_megatron([model], TINY, tmp_path / "mg")          # check_model_compatible passes too
    want = hf_state_dict_to_megatron(hf, TINY)
    got = _canonical(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # and back: bit-exact
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf2", dtype="fp32", progress=False,
                   require_tokenizer=False)
    back = load_file(tmp_path / "hf2" / "model.safetensors")
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_from_hf_chunks_like_the_target_layout(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    src = write_hf_export(tmp_path / "hf", TINY, random_hf_state_dict(TINY))
    ckpt = hf_to_megatron(src, tmp_path / "mg", tp=2, pp=1, dtype="bf16", progress=False)
    md = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    fc1 = md["decoder.layers.mlp.linear_fc1.weight"]
    assert tuple(fc1.size) == (2, 352, 64) and len(fc1.chunks) == 2 * 4   # layers × tp × stride
    assert fc1.properties.dtype == torch.bfloat16
    assert "output_layer._extra_state/shard_0_1" in md
    common = torch.load(ckpt / "common.pt", weights_only=False)
    assert common["layout"] == {"tp": 2, "pp": 1, "dp": 0}
    assert common["config"]["model"]["text_dim"] == 48
    r = DistCheckpointReader(tmp_path / "mg")
    assert r.shape("decoder.layers.1.self_attention.linear_qkv.weight") == (256, 64)


def test_vision_only_export(megatron_ckpt, tmp_path):
    from transformers import AutoModel

    model, ckpt = megatron_ckpt
    out = megatron_to_hf(ckpt, tmp_path / "vit", dtype="fp32", vision_only=True, progress=False,
                         require_tokenizer=False)
    keys = set(load_file(out / "model.safetensors"))
    assert keys == set(mapping_registry(TINY, vision_only=True).hf_keys())
    assert not any(k.startswith(("embeddings", "lm_head", "in_proj", "proj.")) for k in keys)
    vit = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    px = torch.rand(6, 768)
    with torch.no_grad():
        torch.testing.assert_close(vit.encode_images(px, torch.tensor([[1, 2, 3]]))[0],
                                   model.encode_images(px, torch.tensor([[2, 3]]))[0],
                                   atol=1e-4, rtol=0)
    with pytest.raises(ConversionError, match="vision-only export"):
        hf_to_megatron(out, tmp_path / "back", progress=False)


def test_tokenizer_files_are_copied_and_ids_recorded(megatron_ckpt, tmp_path):
    from genlip_megatron.data.synthetic import caption_corpus
    from genlip_megatron.data.tokenizer import train_tiny_bpe

    _, ckpt = megatron_ckpt
    tok = train_tiny_bpe(caption_corpus(), 200, tmp_path / "tok" / "tokenizer.json")
    out = megatron_to_hf(ckpt, tmp_path / "hf", tokenizer=tmp_path / "tok", progress=False)
    assert (out / "tokenizer.json").read_text() == (tmp_path / "tok/tokenizer.json").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_token_id"] == tok.image_pad_id
    with pytest.raises(ConversionError, match="--tokenizer .* does not exist"):
        megatron_to_hf(ckpt, tmp_path / "hf2", tokenizer=tmp_path / "nope", progress=False)


# ------------------------------------------------------------------------------ error cases
def test_refuses_existing_output_without_force(tmp_path):
    src = write_hf_export(tmp_path / "hf", TINY, random_hf_state_dict(TINY))
    (tmp_path / "mg").mkdir()
    (tmp_path / "mg" / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        hf_to_megatron(src, tmp_path / "mg", progress=False)
    assert (tmp_path / "mg" / "keep").exists()
    hf_to_megatron(src, tmp_path / "mg", force=True, progress=False)
    assert not (tmp_path / "mg" / "keep").exists() and not (tmp_path / "mg.partial").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        megatron_to_hf(tmp_path / "mg", src, progress=False, require_tokenizer=False)


@pytest.mark.parametrize("tp,pp,match", [
    (3, 1, r"num_attention_heads \(4\) is not divisible by --tp \(3\); use tp in \[1, 2, 4\]"),
    (1, 3, r"num_layers \(2\) is not divisible by --pp \(3\); use pp in \[1, 2\]"),
    (0, 1, "must be >= 1"),
])
def test_impossible_target_layouts(tmp_path, tp, pp, match):
    src = write_hf_export(tmp_path / "hf", TINY, random_hf_state_dict(TINY))
    with pytest.raises(ConversionError, match=match):
        hf_to_megatron(src, tmp_path / "mg", tp=tp, pp=pp, progress=False)
    assert not (tmp_path / "mg").exists()


def test_hf_shape_and_key_mismatches(tmp_path):
    sd = random_hf_state_dict(TINY)
    bad = write_hf_export(tmp_path / "a", TINY, sd, config_edit={"intermediate_size": 128})
    with pytest.raises(ConversionError, match=r"visual.layers.0.mlp.gate_fc.weight has shape "
                                              r"\[176, 64\] but config.json .* "
                                              r"implies \[128, 64\]"):
        hf_to_megatron(bad, tmp_path / "mg", progress=False)
    missing = dict(sd)
    missing.pop("visual.layers.1.layer_scale2.lambda1")
    src = write_hf_export(tmp_path / "b", TINY, missing)
    with pytest.raises(ConversionError, match=r"missing \[visual.layers.1.layer_scale2.lambda1\]"):
        hf_to_megatron(src, tmp_path / "mg", progress=False)
    extra_layers = write_hf_export(tmp_path / "c", TINY, sd, config_edit={"num_hidden_layers": 3})
    with pytest.raises(ConversionError, match=r"missing \[visual.layers.2"):
        hf_to_megatron(extra_layers, tmp_path / "mg", progress=False)


def test_wrong_preset_and_wrong_directory_kinds(tmp_path):
    src = write_hf_export(tmp_path / "hf", TINY, random_hf_state_dict(TINY))
    with pytest.raises(ConversionError, match="not a L/16 model"):
        hf_to_megatron(src, tmp_path / "mg", variant="L/16", progress=False)
    with pytest.raises(ConversionError, match="looks like an HF export"):
        megatron_to_hf(src, tmp_path / "out", progress=False, require_tokenizer=False)
    with pytest.raises(ConversionError, match="not a Megatron distributed checkpoint"):
        megatron_to_hf(tmp_path, tmp_path / "out", progress=False, require_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf_to_megatron(tmp_path, tmp_path / "mg", progress=False)
    ckpt = hf_to_megatron(src, tmp_path / "mg", progress=False)
    (tmp_path / "mg" / "latest").write_text("iter_0000099\n")
    shutil.rmtree(ckpt)   # a dangling pointer and nothing finished to fall back to
    with pytest.raises(ConversionError, match="names iter_0000099, which is not a finished "
                                              r"checkpoint, and .* holds no finished"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False, require_tokenizer=False)


def test_megatron_config_that_does_not_describe_the_weights(tmp_path):
    src = write_hf_export(tmp_path / "hf", TINY, random_hf_state_dict(TINY))
    ckpt = hf_to_megatron(src, tmp_path / "mg", progress=False)
    common = torch.load(ckpt / "common.pt", weights_only=False)
    common["config"]["model"]["ffn_hidden_size"] = 128
    torch.save(common, ckpt / "common.pt")
    with pytest.raises(ConversionError, match=r"decoder.layers.mlp.linear_fc1.weight|"
                                              r"linear_fc1.weight has shape \[352, 64\]"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False, require_tokenizer=False)
    common["config"]["model"]["ffn_hidden_size"] = 176
    common["config"]["model"]["num_layers"] = 3
    torch.save(common, ckpt / "common.pt")
    with pytest.raises(ConversionError, match=r"missing \[decoder.layers.2."):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False, require_tokenizer=False)
    del common["config"]
    torch.save(common, ckpt / "common.pt")
    with pytest.raises(ConversionError, match="no config\\['model'\\] section"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False, require_tokenizer=False)
    assert not (tmp_path / "out").exists()


def test_released_style_export_converts_and_loads(mp_state, tmp_path, caplog):
    """Config as the released checkpoints: no text_embed_dim, no auto_map, ["GenLIP"], bf16."""
    import logging

    from transformers import AutoModel

    hf = random_hf_state_dict(TINY, seed=4)
    src = write_hf_export(tmp_path / "hf", TINY, hf, dtype="bf16",
                          config_edit={"architectures": ["GenLIP"]},
                          drop_config=["text_embed_dim", "genlip_megatron", "layer_norm_eps",
                                       "image_token_id", "vision_only"])
    with caplog.at_level(logging.WARNING):
        ckpt = hf_to_megatron(src, tmp_path / "mg", progress=False)
    assert "has no text_embed_dim" in caplog.text and "known bug" in caplog.text
    common = torch.load(ckpt / "common.pt", weights_only=False)
    assert common["config"]["model"]["text_dim"] == 48
    assert common["config"]["model"]["variant"] == "tiny"
    model = _model(seed=5)
    load_megatron([model], TINY, tmp_path / "mg")
    want = hf_state_dict_to_megatron({k: v.to(torch.bfloat16).float() for k, v in hf.items()},
                                     TINY)
    got = _canonical(model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the bundled modeling file infers the text width from the weights as well
    loaded = AutoModel.from_pretrained(src, trust_remote_code=True, dtype=torch.float32)
    assert loaded.config.text_embed_dim == 48 and loaded.in_proj.weight.shape == (64, 48)


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    from genlip_megatron.convert.safetensors_io import SafetensorsReader

    src = write_hf_export(tmp_path / "hf", TINY, random_hf_state_dict(TINY))
    real_get = SafetensorsReader.get

    def failing_get(self, name):
        if name == "visual.layers.1.mlp.fc2.weight":
            raise OSError("disk went away")
        return real_get(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", failing_get)
    with pytest.raises(OSError, match="disk went away"):
        hf_to_megatron(src, tmp_path / "mg", progress=False)
    assert not (tmp_path / "mg").exists() and not (tmp_path / "mg.partial").exists()


def test_tokenizer_argument_must_be_a_tokenizer(tmp_path):
    from genlip_megatron.convert.converter import _copy_tokenizer

    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ConversionError, match="is not a tokenizer.json"):
        _copy_tokenizer(tmp_path / "vocab.txt", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="holds none of"):
        _copy_tokenizer(tmp_path / "empty", tmp_path)
