"""Caption generation with the KV cache: equal to no-cache greedy decoding, batch-invariant."""

from __future__ import annotations

import pytest
import torch
from convert_testlib import TINY, random_hf_state_dict, random_patch_images, tiny_hf_model, \
    write_hf_export

from genlip_megatron.probes import GenerationConfig, generate_captions, generate_ids, \
    load_genlip_for_inference

PROMPT = [5, 9, 11]


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model()


@pytest.fixture(scope="module")
def images():
    return random_patch_images([(2, 3), (4, 4), (1, 5), (3, 3)])


@torch.no_grad()
def _naive_greedy(model, px, grid, prompt, n):
    """Full recompute every step, positions built by the model (no cache, no padding)."""
    gh, gw = grid
    ids, out = list(prompt), []
    for _ in range(n):
        x = torch.zeros(1, gh * gw + len(ids), dtype=torch.long)
        x[0, gh * gw:] = torch.tensor(ids)
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[0, :gh * gw] = True
        logits = model(input_ids=x, pixel_values=px, image_mask=mask,
                       image_grid_thw=torch.tensor([[1, gh, gw]])).logits
        out.append(int(logits[0, -1].argmax()))
        ids.append(out[-1])
    return out


def test_kv_cache_greedy_equals_full_recompute_and_is_batch_invariant(model, images):
    cfg = GenerationConfig(max_new_tokens=10, batch_size=4)
    batched = generate_ids(model, images, PROMPT, config=cfg)
    single = [generate_ids(model, [im], PROMPT, config=cfg)[0] for im in images]
    naive = [_naive_greedy(model, px, g, PROMPT, 10) for px, g in images]
    assert batched == single == naive
    assert len({tuple(t) for t in naive}) > 1        # the images are told apart


def test_stop_token_ends_each_row_independently(model, images):
    full = generate_ids(model, images, PROMPT, config=GenerationConfig(max_new_tokens=10))
    stop = full[1][4]
    out = generate_ids(model, images, PROMPT, stop_id=stop,
                       config=GenerationConfig(max_new_tokens=10))
    for seq, ref in zip(out, full):
        cut = ref.index(stop) if stop in ref else len(ref)
        assert seq == ref[:cut]


def test_sampling_is_seeded_and_top_p_limits_it(model, images):
    cfg = GenerationConfig(max_new_tokens=8, greedy=False, temperature=1.5, seed=3)
    a = generate_ids(model, images, PROMPT, config=cfg)
    assert a == generate_ids(model, images, PROMPT, config=cfg)
    greedy = generate_ids(model, images, PROMPT, config=GenerationConfig(max_new_tokens=8))
    assert a != greedy
    nucleus = GenerationConfig(max_new_tokens=8, greedy=False, top_p=1e-6, seed=1)
    assert generate_ids(model, images, PROMPT, config=nucleus) == greedy


def test_uint8_patches_are_normalised_like_training(model):
    raw = torch.randint(0, 256, (6, 768), dtype=torch.uint8)
    norm = raw.float() * (2 / 255) - 1
    cfg = GenerationConfig(max_new_tokens=5)
    assert generate_ids(model, [(raw, (2, 3))], PROMPT, config=cfg) == \
        generate_ids(model, [(norm, (2, 3))], PROMPT, config=cfg)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 257}, r"max_new_tokens \(257\) must be in \[1, 256\]"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"greedy": False, "temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
])
def test_bad_settings(model, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_ids(model, images, PROMPT, config=GenerationConfig(**kwargs))


def test_grid_mismatch_is_an_error(model):
    with pytest.raises(ValueError, match="5 patches but grid 2x3"):
        generate_ids(model, [(torch.zeros(5, 768), (2, 3))], PROMPT)


def test_generate_captions_decodes_with_the_tokenizer(model, images, tmp_path):
    from genlip_megatron.data.synthetic import caption_corpus
    from genlip_megatron.data.tokenizer import train_tiny_bpe

    tok = train_tiny_bpe(caption_corpus(), 256)
    ids = generate_ids(model, images, tok.encode("Describe the image in detail."),
                       stop_id=tok.im_end_id, config=GenerationConfig(max_new_tokens=12))
    caps = generate_captions(model, images, tok, max_new_tokens=12)
    assert caps == [tok.decode(t).strip() for t in ids]


def test_megatron_and_hf_checkpoints_load_the_same_module(mp_state, tmp_path):
    from convert_testlib import load_megatron, transformer_config

    from genlip_megatron.convert import hf_to_megatron
    from genlip_megatron.model.genlip import GenLIPMegatronModel
    from genlip_megatron.probes import from_megatron_state_dict

    sd = random_hf_state_dict(TINY, seed=8)
    src = write_hf_export(tmp_path / "hf", TINY, sd, dtype="bf16")
    hf_to_megatron(src, tmp_path / "mg", progress=False)
    a, tok_a = load_genlip_for_inference(src)
    b, tok_b = load_genlip_for_inference(tmp_path / "mg")
    assert tok_a is None and tok_b is None
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and va.dtype == torch.float32 and torch.equal(va, vb)
    # a live megatron model (the trainer's caption evaluation path)
    model = GenLIPMegatronModel(transformer_config(TINY, seed=4))
    load_megatron([model], TINY, tmp_path / "mg")
    c = from_megatron_state_dict(model.state_dict(), TINY)
    for (ka, va), (kc, vc) in zip(a.state_dict().items(), c.state_dict().items()):
        assert ka == kc and torch.equal(va, vc)
    with pytest.raises(Exception, match="neither an HF export"):
        load_genlip_for_inference(tmp_path)
