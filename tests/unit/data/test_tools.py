"""tools/make_shards.py, tools/make_demo_data.py, tools/fetch_qwen3_tokenizer.py."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from genlip_megatron.config.data import SourceConfig
from genlip_megatron.data.loader import build_train_loader
from genlip_megatron.data.synthetic import encode_image, render_sample

from .conftest import REPO, make_cfg


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, ext in enumerate(["jpg", "png", "webp", "jpg", "jpeg"]):
        img, caption = render_sample(rng)
        (tmp_path / "imgs" / "sub").mkdir(parents=True, exist_ok=True)
        rel = f"sub/{i}.{ext}"
        (tmp_path / "imgs" / rel).write_bytes(encode_image(img, "jpg" if ext == "jpeg" else ext))
        rows.append({"image": rel, "caption": caption})
    rows.append({"image": "sub/missing.jpg", "caption": "gone"})
    return tmp_path, rows


def test_make_shards_from_jsonl_and_csv(image_folder, data_root):
    tmp, rows = image_folder
    (tmp / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with (tmp / "caps.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["file", "text"])
        w.writeheader()
        w.writerows({"file": r["image"], "text": r["caption"]} for r in rows)
    tool = load_tool("make_shards")
    a = tool.main(["--images", str(tmp / "imgs"), "--captions", str(tmp / "caps.jsonl"),
                   "--out", str(tmp / "a"), "--samples-per-shard", "2", "--dali-index"])
    b = tool.main(["--images", str(tmp / "imgs"), "--captions", str(tmp / "caps.csv"),
                   "--out", str(tmp / "b"), "--image-field", "file", "--caption-field", "text"])
    assert len(a) == 3 and len(b) == 1 and all(Path(p).with_suffix(".idx").is_file() for p in a)
    cfg = make_cfg(data_root, streams_per_source=1, shuffle=1)
    cfg.sources = [SourceConfig(paths=str(tmp / "a" / "*.tar"))]
    cfg.reader.shuffle_shards = False
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=1, seed=0)
    for _ in range(5):
        loader._consume(loader._pull())
    assert loader.counters()["samples/used"] == 5  # the missing image was never written


def test_make_shards_conversations(image_folder):
    tmp, rows = image_folder
    lines = [{"image": r["image"], "conversation": [{"from": "human", "value": "<image>Hi"},
                                                     {"from": "gpt", "value": r["caption"]}]}
             for r in rows[:3]]
    (tmp / "conv.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (path,) = load_tool("make_shards").main(["--images", str(tmp / "imgs"), "--conversations",
                                             str(tmp / "conv.jsonl"), "--out", str(tmp / "c")])
    import tarfile
    with tarfile.open(path) as tf:
        meta = json.loads(tf.extractfile("000000000.json").read())
    assert meta["conversations"][1]["value"] == rows[0]["caption"]


def test_make_demo_data(tmp_path):
    meta = load_tool("make_demo_data").main(["--out", str(tmp_path), "--train", "60",
                                             "--eval", "20", "--samples-per-shard", "20"])
    assert meta["train_shards"] == 3 and meta["eval_shards"] == 1
    assert (tmp_path / "tokenizer.json").is_file() and meta["vocab_size"] <= 256
    again = tmp_path / "again"
    load_tool("make_demo_data").main(["--out", str(again), "--train", "60", "--eval", "20",
                                      "--samples-per-shard", "20"])
    for split in ("train", "eval"):  # deterministic from the seed
        for p in sorted((tmp_path / split).glob("*.tar")):
            assert p.read_bytes() == (again / split / p.name).read_bytes()


def test_fetch_qwen3_tokenizer_is_verified(qwen3_tok):
    tool = load_tool("fetch_qwen3_tokenizer")
    path = REPO / ".cache" / "qwen3" / "tokenizer.json"
    assert tool.sha256(path) == tool.TOKENIZER_SHA256
    assert tool.fetch(path.parent) == path  # already there: no download
