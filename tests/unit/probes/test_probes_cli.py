"""The probe CLIs on a tiny export with a tokenizer: captions, patch readout PNG, features."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from convert_testlib import TINY, random_hf_state_dict, write_hf_export

ROOT = Path(__file__).resolve().parents[3]


def _cli(name):
    sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from genlip_megatron.data.synthetic import caption_corpus, render_sample
    from genlip_megatron.data.tokenizer import train_tiny_bpe

    root = tmp_path_factory.mktemp("probe_cli")
    train_tiny_bpe(caption_corpus(), 256, root / "tok" / "tokenizer.json")
    d = write_hf_export(root / "hf", TINY, random_hf_state_dict(TINY, seed=2),
                        tokenizer=root / "tok" / "tokenizer.json")
    rng = np.random.default_rng(1)
    imgs = []
    for i in range(2):
        img, _ = render_sample(rng, p_two=0.0, p_word=0.0)
        img.save(root / f"img{i}.png")
        imgs.append(str(root / f"img{i}.png"))
    return d, imgs, root


def test_generate_captions_cli(export, capsys):
    d, imgs, root = export
    rc = _cli("generate_captions").main([str(d), *imgs, "--size", "32", "--max-new-tokens", "6",
                                         "--json", str(root / "caps.jsonl")])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == imgs
    assert len((root / "caps.jsonl").read_text().splitlines()) == 2


def test_patch_readout_cli(export, capsys):
    d, imgs, root = export
    rc = _cli("patch_readout").main([str(d), imgs[0], "--size", "48", "--patches", "0,0;2,2",
                                     "--top-k", "3", "--out", str(root / "r.png"),
                                     "--json", str(root / "r.json")])
    assert rc == 0 and (root / "r.png").stat().st_size > 0
    rows = json.loads((root / "r.json").read_text())
    assert [(r["row"], r["col"]) for r in rows] == [(0, 0), (2, 2)]
    assert all(len(r["words"]) == 3 for r in rows)
    assert capsys.readouterr().out.startswith("0,0\t")


def test_extract_features_cli(export):
    from safetensors.torch import load_file

    d, imgs, root = export
    rc = _cli("extract_features").main([str(d), *imgs, "--size", "32", "--pool",
                                        "--out", str(root / "f.safetensors")])
    assert rc == 0
    feats = load_file(root / "f.safetensors")
    assert feats["features/1"].shape == (64,) and feats["grid/0"].tolist() == [2, 2]


def test_probe_cli_errors(export, tmp_path, caplog):
    d, imgs, root = export
    bare = write_hf_export(tmp_path / "bare", TINY, random_hf_state_dict(TINY))
    with caplog.at_level(logging.ERROR):
        assert _cli("generate_captions").main([str(bare), imgs[0]]) == 2
        assert "no tokenizer found" in caplog.text
        assert _cli("patch_readout").main([str(d), imgs[0], "--patches", "20,1",
                                          "--out", str(tmp_path / "x.png")]) == 2
        assert "outside the 14x14 grid" in caplog.text
        assert _cli("extract_features").main([str(tmp_path), imgs[0]]) == 2
        assert "neither an HF export" in caplog.text


def test_caption_accuracy_on_held_out_shards(tmp_path, capsys):
    """--eval-config: the run's data.eval_sources, exact match against their captions."""
    import yaml

    mk = _cli("make_demo_data")
    mk.main(["--out", str(tmp_path / "demo"), "--train", "0", "--eval", "6",
             "--vocab-size", "256", "--samples-per-shard", "3"])
    cfg = {"model": {"variant": "tiny"},
           "data": {"eval_sources": [{"paths": str(tmp_path / "demo/eval/*.tar")}],
                    "image": {"policy": "fixed", "fixed_size": 32, "decoder": "pillow"},
                    "text": {"tokenizer_path": str(tmp_path / "demo/tokenizer.json")}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    d = write_hf_export(tmp_path / "hf", TINY, random_hf_state_dict(TINY, seed=3),
                        tokenizer=tmp_path / "demo/tokenizer.json")
    rc = _cli("generate_captions").main([str(d), "--eval-config", str(tmp_path / "run.yaml"),
                                         "--max-new-tokens", "4", "--limit", "5"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[-1].startswith("EVAL caption_exact_match=0.0000 n=5")
    assert "(ref: a" in lines[0] or "(ref: an" in lines[0]
