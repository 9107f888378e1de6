"""Image policies (reference smart-resize rule), patch layout, and DALI / Pillow decoding."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from genlip_megatron.data import image as image_mod
from genlip_megatron.config.data import ImageConfig
from genlip_megatron.data.image import DaliDecoder, PillowDecoder, build_decoder, \
    normalize_patches, patchify, resize_uint8, smart_resize, target_size
from genlip_megatron.data.synthetic import bad_sample, encode_image, render_sample
from genlip_megatron.data.template import SampleError


# (height, width) → (height, width) worked out by hand from the rule
HAND = {
    (224, 224): (224, 224),    # already multiples of 16, area in range
    (1024, 768): (576, 432),   # beta = sqrt(3): floor(36.95)*16, floor(27.71)*16
    (40, 24): (96, 64),        # round(2.5)=2, round(1.5)=2 (banker's) → 32×32 < min → ceil
    (10, 2000): (16, 2000),    # aspect exactly 200 is allowed: 125 tokens
    (300, 500): (304, 496),    # round(18.75)=19, round(31.25)=31
    (200, 264): (192, 256),    # round(12.5)=12, round(16.5)=16 (half to even; half up: 208×272)
    (64, 64): (64, 64),        # exactly min_pixels
    (512, 512): (512, 512),    # exactly max_pixels
}
# More sizes, from the rule in docs/reference-architecture.md (round to 16; above max_pixels: beta =
# sqrt(HW/max), floor(H/beta/16)·16; below min_pixels: beta = sqrt(min/HW), ceil(H·beta/16)·16).
# Spot checks: (480, 640): beta 1.0825 → floor(27.7)=27, floor(36.9)=36 → 432×576;
# (1, 2): rounds to 0×0 → beta 45.25 → ceil(2.83)=3, ceil(5.66)=6 → 48×96;
# (7, 1400): 0×1408 → beta 0.6465 → ceil(0.28)=1, ceil(56.6)=57 → 16×912.
RULE = {
    (1, 2): (48, 96), (17, 33): (48, 96), (63, 65): (64, 64), (100, 3000): (80, 2800),
    (480, 640): (432, 576), (720, 1280): (384, 672), (1080, 1920): (384, 672),
    (3000, 4000): (432, 576), (5000, 5000): (512, 512), (513, 511): (512, 512),
    (7, 1400): (16, 912), (999, 5): (912, 16),
}
TABLE = list(HAND) + list(RULE)


@pytest.mark.parametrize("hw", TABLE)
def test_native_policy_matches_reference_rule(hw):
    got = target_size(ImageConfig(policy="native"), *hw)
    assert got == {**HAND, **RULE}[hw]
    tokens = got[0] * got[1] // 256
    assert got[0] % 16 == 0 and got[1] % 16 == 0 and 16 <= tokens <= 1024 or hw == (10, 2000)


def test_native_policy_rejects_aspect_over_200():
    with pytest.raises(SampleError) as info:
        target_size(ImageConfig(policy="native"), 10, 2001)
    assert info.value.reason == "aspect_ratio"
    assert smart_resize(10, 2000) == (16, 2000)


@pytest.mark.parametrize("hw", TABLE)
def test_fixed_policy_is_square_no_crop(hw):
    if max(hw) / min(hw) > 200:
        return
    assert target_size(ImageConfig(), *hw) == (224, 224)
    assert target_size(ImageConfig(fixed_size=64), *hw) == (64, 64)


def test_one_by_one_is_rejected():
    for policy in ("fixed", "native"):
        with pytest.raises(SampleError) as info:
            target_size(ImageConfig(policy=policy), 1, 1)
        assert info.value.reason == "image_too_small"


def test_patchify_raster_order_and_channel_layout():
    h, w, p = 32, 48, 16
    img = torch.zeros(h, w, 3, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img[..., 0], img[..., 1], img[..., 2] = ys.to(torch.uint8), xs.to(torch.uint8), 7
    patches = patchify(img, p)
    assert patches.shape == (6, 3 * 16 * 16)
    for j in range(6):
        r, c = divmod(j, 3)  # raster: row-major over the 2×3 grid
        chw = patches[j].view(3, p, p)  # (C, ph, pw)
        assert torch.equal(chw[0], ys[r * p:(r + 1) * p, c * p:(c + 1) * p].to(torch.uint8))
        assert torch.equal(chw[1], xs[r * p:(r + 1) * p, c * p:(c + 1) * p].to(torch.uint8))
        assert (chw[2] == 7).all()


def test_normalize_mean_std_half():
    x = torch.arange(256, dtype=torch.uint8).view(1, 256)
    ref = (x.numpy().astype(np.float64) / 255 - 0.5) / 0.5
    got = normalize_patches(x)
    assert got.dtype == torch.float32
    assert np.abs(got.numpy() - ref).max() < 1e-6 and got[0, 0] == -1 and got[0, -1] == 1


def _jpeg(seed=0, side=200):
    img, _ = render_sample(np.random.default_rng(seed), min_side=side, max_side=side)
    return encode_image(img)


def test_pillow_decoder_is_the_reference_pixel_path():
    data = _jpeg()
    (got,) = PillowDecoder().decode([data], [(64, 96)])
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((96, 64), Image.BILINEAR))
    assert got.shape == (64, 96, 3) and np.array_equal(got.numpy(), ref)


def test_torch_resize_close_to_pil_bilinear():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    for size in [(224, 224), (64, 96), (480, 640)]:  # down- and up-scaling
        ref = np.asarray(Image.fromarray(arr).resize(size[::-1], Image.BILINEAR)).astype(int)
        got = resize_uint8(torch.from_numpy(arr), size).numpy().astype(int)
        assert np.abs(got - ref).mean() < 0.1 and np.abs(got - ref).max() <= 2


@pytest.mark.parametrize("backend, tol", [("torch", 0.2), ("dali", 1.0)])
def test_dali_cpu_close_to_reference(backend, tol):
    cfg = ImageConfig(resize_backend=backend, decode_batch_size=4)
    datas = [_jpeg(s, 150 + 40 * s) for s in range(5)]
    sizes = [(224, 224), (64, 64), (96, 160), (224, 224), (32, 48)]
    dali = build_decoder(cfg, "cpu").decode(datas, sizes)
    ref = PillowDecoder().decode(datas, sizes)
    for a, b, s in zip(dali, ref, sizes):
        assert a.shape == (*s, 3)
        assert np.abs(a.numpy().astype(int) - b.numpy().astype(int)).mean() < tol


def test_dali_decodes_odd_modes_like_pil():
    dec = DaliDecoder(ImageConfig(decode_batch_size=8), "cpu")
    kinds = ["cmyk_jpeg", "grayscale_jpeg", "rgba_png", "palette_png"]
    datas = [next(v for k, v in bad_sample(kind, "k", 3).items() if k in ("jpg", "png"))
             for kind in kinds]
    webp = encode_image(render_sample(np.random.default_rng(1))[0].convert("RGB"), "webp")
    datas.append(webp)
    sizes = [(64, 64)] * len(datas)
    for got, data in zip(dec.decode(datas, sizes), datas):
        ref = np.asarray(image_mod.pil_decode(data))
        want = resize_uint8(torch.from_numpy(ref.copy()), (64, 64))
        assert np.array_equal(got.numpy(), want.numpy())
    assert dec.fallbacks == 0  # all of them in one DALI batch, no Pillow fallback


def test_dali_survives_bad_images():
    dec = DaliDecoder(ImageConfig(decode_batch_size=4), "cpu")
    good = _jpeg()
    truncated = bad_sample("truncated_jpeg", "k")["jpg"]
    garbage = bad_sample("garbage_image", "k")["jpg"]
    cut_png = encode_image(Image.new("RGB", (50, 50), (1, 2, 3)), "png")[:60]
    out = dec.decode([good, truncated, garbage, cut_png, good], [(32, 32)] * 5)
    assert [getattr(o, "reason", "ok") for o in out] == \
        ["ok", "undecodable_image", "undecodable_image", "undecodable_image", "ok"]
    assert dec.fallbacks == 0  # undecodable by Pillow too: skips, not fallbacks
    again = dec.decode([good, good], [(32, 32)] * 2)  # the rebuilt pipeline works
    assert torch.equal(again[0], out[0])


def test_missing_dali_gives_install_hint(monkeypatch):
    monkeypatch.setattr(image_mod, "dali_available", lambda: False)
    with pytest.raises(ImportError, match="pip install nvidia-dali.*decoder: pillow"):
        build_decoder(ImageConfig(decoder="dali"), "cpu")
    assert isinstance(build_decoder(ImageConfig(decoder="pillow")), PillowDecoder)


def test_half_to_even_case_is_decided_by_rounding_alone():
    """(200, 264) must exercise the rounding branch: its rounded area is inside
    [min_pixels, max_pixels], so neither rescaling branch can hide a half-up bug."""
    h, w = smart_resize(200, 264)
    assert (h, w) == (192, 256) and 4096 <= h * w <= 262144
    assert 4096 <= 208 * 272 <= 262144  # half-up would also stay in range, and differ
