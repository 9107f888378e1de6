"""Patch-semantics readout (PNG) and feature extraction."""

from __future__ import annotations

import pytest
import torch
from convert_testlib import TINY, random_hf_state_dict
from PIL import Image

from genlip_megatron.probes import encode_images, load_image, patch_readout, render_readout, \
    save_features
from genlip_megatron.probes.images import patches_to_image
from genlip_megatron.probes.loading import build_hf_model
from genlip_megatron.probes.readout import parse_patches


@pytest.fixture(scope="module")
def model():
    return build_hf_model(TINY, random_hf_state_dict(TINY, seed=6, scale=0.3))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from genlip_megatron.data.synthetic import render_sample
    import numpy as np

    img, _ = render_sample(np.random.default_rng(0), p_two=0.0, p_word=0.0)
    path = tmp_path_factory.mktemp("img") / "shape.png"
    img.save(path)
    return path


def test_load_image_uses_the_training_policy(image):
    im = load_image(image, policy="fixed", size=64)
    assert im.grid == (4, 4) and im.pixel_values.shape == (16, 768)
    assert float(im.pixel_values.min()) >= -1.0 and float(im.pixel_values.max()) <= 1.0
    assert im.image.size == (64, 64)
    back = patches_to_image(im.pixel_values, im.grid)
    assert back.tobytes() == im.image.tobytes()
    native = load_image(image, policy="native")
    assert native.grid[0] * native.grid[1] >= 16


def test_readout_is_the_lm_head_on_patch_features(model, image, tmp_path):
    im = load_image(image, size=64)
    out = patch_readout(model, im.pixel_values, im.grid, None, [(0, 0), (3, 2)], top_k=3)
    feats = model.encode_images(im.pixel_values, torch.tensor([[1, 4, 4]]))[0]
    with torch.no_grad():
        probs = torch.softmax(model.lm_head(model.proj(feats[[0, 14]])), dim=-1)
    top = probs.topk(3)
    assert [o.token_ids for o in out] == top.indices.tolist()
    assert torch.allclose(torch.tensor([o.probs for o in out]), top.values)
    assert (out[1].row, out[1].col) == (3, 2) and out[0].words == [str(i) for i in
                                                                  out[0].token_ids]
    png = render_readout(im.image, out, tmp_path / "r" / "readout.png", grid=im.grid)
    with Image.open(png) as img:   # 64 px image upscaled ×6 at offset 22, panel on the right
        assert img.format == "PNG" and img.width > 22 + 384 + 200 and img.height >= 384
        first = img.getpixel((23, 22 + 60))                  # left edge of patch (0, 0)'s box
        assert first == (230, 25, 75), first                 # outlined in the first colour
        panel = img.crop((22 + 384 + 10, 0, img.width, 200)).convert("L")
        assert min(panel.getdata()) < 100                    # the word list is written


def test_parse_patches():
    assert parse_patches("1,2;0,0", (3, 3)) == [(1, 2), (0, 0)]
    assert parse_patches("center", (4, 6)) == [(2, 3)]
    assert len(parse_patches("all", (2, 3))) == 6
    with pytest.raises(ValueError, match="outside the 3x3 grid"):
        parse_patches("3,0", (3, 3))
    with pytest.raises(ValueError, match="is not 'row,col'"):
        parse_patches("a,b", (3, 3))


def test_features_batching_pooling_and_file(model, tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(1)
    imgs = [(torch.rand(h * w, 768, generator=g), (h, w)) for h, w in ((2, 2), (3, 1), (2, 3))]
    feats = encode_images(model, imgs, batch_size=2)
    alone = [model.encode_images(px, torch.tensor([[1, *gr]]))[0] for px, gr in imgs]
    for f, a in zip(feats, alone):
        torch.testing.assert_close(f, a, atol=1e-5, rtol=1e-5)
    pooled = encode_images(model, imgs, pool=True)
    assert pooled[1].shape == (64,) and torch.allclose(pooled[1], alone[1].mean(0), atol=1e-5)
    path = save_features(tmp_path / "f.safetensors", feats, [g for _, g in imgs], ["a", "b", "c"])
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["names"] == "a\nb\nc"
        assert torch.equal(fh.get_tensor("grid/2"), torch.tensor([2, 3]))
        assert torch.equal(fh.get_tensor("features/0"), feats[0])
