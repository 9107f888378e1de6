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


def _labelled_tree(tmp):
    """imgs/{cat,dog}/*.png + masks/{cat,dog}/*.png with one of each mismatch."""
    rng = np.random.default_rng(1)
    for cls, n in (("cat", 3), ("dog", 2), ("eel", 1)):
        for i in range(n):
            img, _ = render_sample(rng)
            (tmp / "imgs" / cls).mkdir(parents=True, exist_ok=True)
            (tmp / "masks" / cls).mkdir(parents=True, exist_ok=True)
            img.save(tmp / "imgs" / cls / f"{i}.png")
            mask = np.full((img.height, img.width), i, np.uint8)
            from PIL import Image
            Image.fromarray(mask).save(tmp / "masks" / cls / f"{i}.png")
    from PIL import Image
    Image.new("L", (5, 5)).save(tmp / "masks" / "cat" / "1.png")       # wrong size
    (tmp / "masks" / "dog" / "1.png").unlink()                          # image without mask
    Image.new("L", (5, 5)).save(tmp / "masks" / "dog" / "orphan.png")   # mask without image
    (tmp / "classes.txt").write_text("dog\ncat\n")


def _members(paths):
    import tarfile
    out = {}
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_make_shards_class_folders_and_masks(tmp_path, capsys):
    _labelled_tree(tmp_path)
    tool = load_tool("make_shards")
    paths = tool.main(["--images", str(tmp_path / "imgs"), "--class-folders", "--out",
                       str(tmp_path / "a")])
    got = _members(paths)
    assert json.loads((tmp_path / "a" / "classes.json").read_text()) == ["cat", "dog", "eel"]
    assert [v["cls"] for v in got.values()] == [b"0"] * 3 + [b"1"] * 2 + [b"2"]
    assert json.loads(got["000000003"]["json"]) == {"caption": "a photo of a dog."}
    assert "wrote 6 samples in 1 shards" in capsys.readouterr().out
    # fixed class list: folders not in it are counted; masks matched by stem, mismatches skipped
    paths = tool.main(["--images", str(tmp_path / "imgs"), "--class-folders", "--classes",
                       str(tmp_path / "classes.txt"), "--masks", str(tmp_path / "masks"),
                       "--out", str(tmp_path / "b")])
    got = _members(paths)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"make_shards: wrote 3 samples in 1 shards to {tmp_path / 'b'}; skipped "
                    "mask_size=1 mask_without_image=2 no_mask=1 unknown_class=1")  # orphan, eel
    assert [(v["cls"], v["seg.png"][:4]) for v in got.values()] == \
        [(b"1", b"\x89PNG"), (b"1", b"\x89PNG"), (b"0", b"\x89PNG")]   # cat 0, 2; dog 0


def test_make_shards_mask_pairs_read_back(tmp_path, data_root, tiny_tok):
    from genlip_megatron.data.inference import iter_eval_samples
    _labelled_tree(tmp_path)
    paths = load_tool("make_shards").main(["--images", str(tmp_path / "imgs" / "cat"),
                                           "--masks", str(tmp_path / "masks" / "cat"),
                                           "--out", str(tmp_path / "p")])
    cfg = make_cfg(data_root)
    cfg.eval_sources = [SourceConfig(paths=paths)]
    samples = list(iter_eval_samples(cfg, tiny_tok))
    assert [s.label for s in samples] == [-1, -1]
    assert [int(s.mask.max()) for s in samples] == [0, 2]     # 0.png and 2.png; 1.png skipped


@pytest.mark.parametrize("argv, message", [
    (["--out", "x"], "nothing to read"),
    (["--class-folders", "--masks", "/nonexistent", "--out", "x"], "--masks /nonexistent"),
])
def test_make_shards_argument_errors(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        load_tool("make_shards").main(["--images", str(tmp_path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
