"""Probe tools and to-hf take the image size/policy and the tokenizer from the checkpoint.

A Megatron run trained at 32 px with a relative ``data.text.tokenizer_path`` is probed and
exported from another folder: no ``--size`` and no ``--tokenizer`` are needed, ``--size`` only
overrides, and the export records both (preprocessor_config.json, config.json, tokenizer.json).
"""

from __future__ import annotations

import json
import logging

import numpy as np
from convert_testlib import TINY, save_megatron, transformer_config
from test_probes_cli import _cli

from genlip_megatron.config.data import DataConfig, ImageConfig, TextConfig


def _grid(cli, ckpt, img, out, *extra):
    from safetensors.torch import load_file

    assert cli.main([str(ckpt), img, "--out", str(out), *extra]) == 0
    return load_file(out)["grid/0"].tolist()


def test_tools_take_size_and_tokenizer_from_the_checkpoint(mp_state, tmp_path, monkeypatch,
                                                           caplog, capsys):
    from genlip_megatron.data.synthetic import caption_corpus, render_sample
    from genlip_megatron.data.tokenizer import train_tiny_bpe
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    run = tmp_path / "run"
    train_tiny_bpe(caption_corpus(), 256, run / "data" / "tok.json")
    data = DataConfig(image=ImageConfig(policy="fixed", fixed_size=32, decoder="pillow"),
                      text=TextConfig(tokenizer_path="data/tok.json"))   # relative to run/
    save_megatron([GenLIPMegatronModel(transformer_config(TINY))], TINY, run / "runs" / "ckpt",
                  data=data)
    ckpt = run / "runs" / "ckpt"
    image, _ = render_sample(np.random.default_rng(0), p_two=0.0, p_word=0.0)
    img = str(tmp_path / "shape.png")
    image.save(img)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    feats = _cli("extract_features")
    assert _grid(feats, ckpt, img, tmp_path / "a.st") == [2, 2]            # 32 px, as trained
    assert _grid(feats, ckpt, img, tmp_path / "b.st", "--size", "48") == [3, 3]
    assert _grid(feats, ckpt, img, tmp_path / "c.st", "--policy", "native")[0] > 2
    assert _cli("generate_captions").main([str(ckpt), img, "--max-new-tokens", "3"]) == 0

    with caplog.at_level(logging.INFO):
        assert _cli("convert_checkpoint").main(["to-hf", str(ckpt), str(tmp_path / "hf"),
                                                "--dtype", "fp32", "--no-progress"]) == 0
    hf = tmp_path / "hf"
    assert (hf / "tokenizer.json").read_text() == (run / "data" / "tok.json").read_text()
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["image_policy"], cfg["image_size"], cfg["resample"]) == ("fixed", 32, "pil")
    assert json.loads((hf / "preprocessor_config.json").read_text())["image_size"] == 32
    assert _grid(feats, hf, img, tmp_path / "d.st") == [2, 2]
    # from-hf keeps both for the converted Megatron checkpoint
    assert _cli("convert_checkpoint").main(["from-hf", str(hf), str(tmp_path / "mg2"),
                                            "--no-progress"]) == 0
    assert _grid(feats, tmp_path / "mg2", img, tmp_path / "e.st") == [2, 2]
    assert _cli("generate_captions").main([str(tmp_path / "mg2"), img,
                                           "--max-new-tokens", "2"]) == 0

    readout = _cli("patch_readout")
    capsys.readouterr()
    assert readout.main([str(hf), img, "--word", "circle", "--out", str(tmp_path / "h.png")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and all(len(r.split()) == 2 for r in rows)   # 2×2 probabilities
    assert readout.main([str(hf), img, "--patches", "all", "--out", str(tmp_path / "w.png")]) == 0
    assert (tmp_path / "h.png").stat().st_size > 0 and (tmp_path / "w.png").stat().st_size > 0
    with caplog.at_level(logging.ERROR):
        assert readout.main([str(hf), img, "--word", "zzqx", "--out", str(tmp_path / "x.png")]) == 2
    assert "is not one token" in caplog.text


def test_run_tokenizer_is_found_above_the_checkpoint_and_must_fit_the_vocab(tmp_path,
                                                                            monkeypatch):
    from genlip_megatron.convert.converter import resolve_run_tokenizer
    from genlip_megatron.data.synthetic import caption_corpus
    from genlip_megatron.data.tokenizer import train_tiny_bpe

    ckpt = tmp_path / "run" / "runs" / "ckpt" / "iter_0000003"
    ckpt.mkdir(parents=True)
    common = {"config": {"data": {"text": {"tokenizer_path": "data/tok.json"}},
                         "model": {"vocab_size": 140}}}
    big = train_tiny_bpe(caption_corpus(), 400, tmp_path / "run" / "runs" / "data" / "tok.json")
    assert big.vocab_size > 140          # nearer the checkpoint, but another model's tokenizer
    small = train_tiny_bpe(caption_corpus(), 120, tmp_path / "run" / "data" / "tok.json")
    assert small.vocab_size <= 140
    monkeypatch.chdir(tmp_path)
    assert resolve_run_tokenizer(common, ckpt) == (tmp_path / "run" / "data" / "tok.json",
                                                   "data/tok.json")
    (tmp_path / "run" / "data" / "tok.json").unlink()
    assert resolve_run_tokenizer(common, ckpt) == (None, "data/tok.json")
    assert resolve_run_tokenizer({"config": {}}, ckpt) == (None, "")
