"""encode_prompt / extend_batch for generation, and the held-out eval reader."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from genlip_megatron.data.batch import IGNORE_INDEX
from genlip_megatron.config.data import SourceConfig
from genlip_megatron.data.image import normalize_patches
from genlip_megatron.data.inference import encode_prompt, extend_batch, iter_eval_samples
from genlip_megatron.data.loader import build_train_loader
from genlip_megatron.data.synthetic import encode_image, render_sample

from .conftest import make_cfg


def test_encode_prompt_layout(data_root, tiny_tok):
    cfg = make_cfg(data_root)
    img, _ = render_sample(np.random.default_rng(0), min_side=100, max_side=100)
    b = encode_prompt(encode_image(img, "png"), tiny_tok, cfg)  # lossless: same pixels
    prompt = tiny_tok.encode("Describe the image in detail.")
    n = 16  # 64 px fixed → 4×4
    assert b.tokens.shape == (1, n + len(prompt))
    assert b.tokens[0].tolist() == [0] * n + prompt
    assert (b.labels == IGNORE_INDEX).all() and b.image_mask[0, :n].all()
    assert b.position_ids[0, :, n:].tolist() == [list(range(4, 4 + len(prompt)))] * 3
    assert b.cu_seqlens.tolist() == [0, n + len(prompt)] and b.pixel_values.shape == (n, 768)
    # the same pixels from bytes, a PIL image and an array
    for other in (img, np.asarray(img)):
        assert torch.equal(encode_prompt(other, tiny_tok, cfg).pixel_values, b.pixel_values)
    padded = encode_prompt(img, tiny_tok, cfg, prompt="Hi", pad_multiple=16)
    assert padded.tokens.shape[1] % 16 == 0 and padded.segment_ids[0, -1] == -1


def test_extend_batch_continues_positions(data_root, tiny_tok):
    cfg = make_cfg(data_root)
    img, _ = render_sample(np.random.default_rng(1))
    b = encode_prompt(img, tiny_tok, cfg, pad_multiple=16)
    real = int(b.cu_seqlens[-1])
    e = extend_batch(b, [7, 8], pad_multiple=16)
    assert e.tokens[0, :real + 2].tolist() == b.tokens[0, :real].tolist() + [7, 8]
    last = int(b.position_ids[0, 0, real - 1])
    assert e.position_ids[0, :, real:real + 2].tolist() == [[last + 1, last + 2]] * 3
    assert e.text_lens.tolist() == [int(b.text_lens[0]) + 2]
    assert e.cu_seqlens.tolist() == [0, real + 2] and e.tokens.shape[1] % 16 == 0
    assert int((e.segment_ids[0] == 0).sum()) == real + 2


def test_training_and_inference_pixels_agree(data_root, tiny_tok):
    cfg = make_cfg(data_root)
    cfg.sources = [SourceConfig(paths=str(data_root / "s1" / "shard-000000.tar"))]
    cfg.reader.shuffle_buffer, cfg.reader.shuffle_shards = 1, False
    b = next(build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=1, seed=0))
    import tarfile
    with tarfile.open(data_root / "s1" / "shard-000000.tar") as tf:
        first = next(m for m in tf.getmembers() if m.name.split(".")[-1] in ("jpg", "png",
                                                                             "webp"))
        data = tf.extractfile(first).read()
    single = encode_prompt(data, tiny_tok, cfg)
    assert torch.equal(single.pixel_values, b.pixel_values[:16])


def test_eval_reader(data_root, tiny_tok):
    cfg = make_cfg(data_root)
    cfg.eval_sources = [SourceConfig(paths=str(data_root / "s2" / "shard-00000[01].tar"),
                                     format="conversations")]
    samples = list(iter_eval_samples(cfg, tiny_tok))
    assert len(samples) == 80
    s = samples[0]
    assert s.caption.startswith(("a ", "an ")) and s.caption.endswith(".")
    assert tiny_tok.decode(s.prompt_ids) == "Describe this image in detail."
    assert s.patches.dtype == np.uint8 and s.patches.shape == (16, 768) and s.grid == (4, 4)
    assert torch.equal(s.pixel_values, normalize_patches(torch.from_numpy(s.patches)))
    b = s.batch()
    assert b.tokens[0, 16:].tolist() == s.prompt_ids.tolist()
    assert len(list(iter_eval_samples(cfg, tiny_tok, limit=5))) == 5
    half = list(iter_eval_samples(cfg, tiny_tok, dp_rank=1, dp_size=2))
    assert [x.key for x in half] == [x.key for x in samples[40:]]
    with pytest.raises(ValueError, match="data.eval_sources"):
        cfg.eval_sources = []
        next(iter_eval_samples(cfg, tiny_tok))


def test_png_and_rgba_inputs(data_root, tiny_tok):
    cfg = make_cfg(data_root)
    rgba = Image.new("RGBA", (70, 50), (10, 200, 30, 128))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    b = encode_prompt(buf.getvalue(), tiny_tok, cfg)
    assert b.pixel_values.shape == (16, 768)
