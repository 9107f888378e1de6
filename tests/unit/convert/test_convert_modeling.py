"""The bundled HF modeling file against an independent plain-PyTorch GenLIP (fp32).

The oracle is tests/reference_genlip.py (written from docs/reference-architecture.md, with HF key
names;
it shares no code with modeling_genlip.py). Covers packed rows, batch > 1 with padding, built
position ids, ``AutoModel.from_pretrained(trust_remote_code=True)`` loading exactly the stored
weights (transformers 5 re-initialisation pitfall), encoder features and vision-only exports.
"""

from __future__ import annotations

import pytest
import torch
from convert_testlib import TINY, packed_batch, random_hf_state_dict, write_hf_export
from reference_genlip import RefGenLIP

from genlip_megatron.convert.hf.modeling_genlip import build_position_ids, build_prefix_lm_mask
from genlip_megatron.probes.loading import build_hf_model

ROWS = [[(2, 3, 7), (3, 3, 5), (1, 2, 6)], [(4, 2, 9), (2, 2, 12)]]
SEQ = 48


@pytest.fixture(scope="module")
def weights():
    return random_hf_state_dict(TINY, seed=11)


@pytest.fixture(scope="module")
def hf_model(weights):
    return build_hf_model(TINY, weights)


@pytest.fixture(scope="module")
def ref_model(weights):
    m = TINY
    ref = RefGenLIP(hidden=m.hidden_size, layers=m.num_layers, heads=m.num_attention_heads,
                    inter=m.ffn_hidden_size, text_dim=m.text_dim, vocab=m.vocab_size,
                    mrope_section=m.mrope_section)
    ref.load_state_dict(weights, strict=True)
    return ref.eval()


def _grids(b):
    return torch.cat([torch.ones(len(b["grid_hw"]), 1, dtype=torch.long), b["grid_hw"]], 1)


@torch.no_grad()
def test_packed_rows_match_reference(hf_model, ref_model):
    b = packed_batch(ROWS, SEQ, 256, seed=3)
    labels = torch.where(b["image_mask"] | (b["segment_ids"] < 0), -100, b["tokens"])
    out = hf_model(input_ids=b["tokens"], pixel_values=b["pixel_values"],
                   image_mask=b["image_mask"], position_ids=b["position_ids"],
                   segment_ids=b["segment_ids"], labels=labels)
    ref_logits, ref_loss = ref_model(b["tokens"], b["pixel_values"].view(-1, 3, 16, 16),
                                     b["image_mask"], b["position_ids"],
                                     b["segment_ids"].long(), labels=labels)
    real = b["segment_ids"] >= 0
    torch.testing.assert_close(out.logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert out.logits.std() > 0.3
    # the reference's loss also crosses sample boundaries in a packed row; compare per-token CE
    # on within-sample targets only
    same = (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]) & (labels[:, 1:] != -100)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                           ignore_index=-100, reduction="none")
    ref_ce = torch.nn.functional.cross_entropy(ref_logits[:, :-1].transpose(1, 2),
                                               labels[:, 1:], ignore_index=-100,
                                               reduction="none")
    torch.testing.assert_close(ce[same], ref_ce[same], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    # without position ids: built from the grids, same result
    built = hf_model(input_ids=b["tokens"], pixel_values=b["pixel_values"],
                     image_mask=b["image_mask"], image_grid_thw=_grids(b),
                     segment_ids=b["segment_ids"])
    assert torch.equal(built.logits, out.logits)


def test_built_position_ids_follow_the_reference_rule():
    b = packed_batch(ROWS, SEQ, 256)
    pos = build_position_ids(b["image_mask"], b["segment_ids"].long(), b["grid_hw"])
    assert torch.equal(pos, b["position_ids"])
    with pytest.raises(ValueError, match="not square; pass image_grid_thw"):
        build_position_ids(b["image_mask"], b["segment_ids"].long(), None)


def test_prefix_lm_mask_rules():
    image = torch.tensor([[1, 1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, -1]])
    allowed = build_prefix_lm_mask(image, seg)[0, 0]
    assert allowed[0, 1] and allowed[1, 0]           # image ↔ image of its sample
    assert not allowed[0, 2] and not allowed[1, 3]   # image never sees text
    assert allowed[3, 0] and allowed[3, 2] and not allowed[2, 3]   # text: causal over sample
    assert not allowed[4, 3] and not allowed[5, 0]   # nothing crosses samples
    assert allowed[6].tolist() == [False] * 6 + [True]             # padding: itself only


@torch.no_grad()
def test_batch_with_padding_equals_one_sample_at_a_time(hf_model):
    """Rows of different lengths, right- or left-padded, no position_ids / segment_ids."""
    gen = torch.Generator().manual_seed(0)
    samples = [((2, 3), 5), ((3, 3), 2), ((1, 4), 7)]
    singles, pix = [], []
    for (gh, gw), n in samples:
        ids = torch.randint(1, 256, (1, gh * gw + n), generator=gen)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, :gh * gw] = True
        px = torch.randn(gh * gw, 768, generator=gen)
        grid = torch.tensor([[1, gh, gw]])
        singles.append((ids, mask, px, grid,
                        hf_model(input_ids=ids, pixel_values=px, image_mask=mask,
                                 image_grid_thw=grid).logits[0]))
        pix.append(px)
    length = max(s[0].shape[1] for s in singles)
    for side in ("right", "left"):
        ids = torch.zeros(len(samples), length, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        attn = torch.zeros_like(ids)
        for r, (i, m, _, _, _) in enumerate(singles):
            sl = slice(0, i.shape[1]) if side == "right" else slice(length - i.shape[1], length)
            ids[r, sl], mask[r, sl], attn[r, sl] = i[0], m[0], 1
        grids = torch.cat([s[3] for s in singles])
        out = hf_model(input_ids=ids, pixel_values=torch.cat(pix), image_mask=mask,
                       image_grid_thw=grids, attention_mask=attn).logits
        for r, s in enumerate(singles):
            n = s[0].shape[1]
            got = out[r, :n] if side == "right" else out[r, length - n:]
            torch.testing.assert_close(got, s[4], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_position_ids_layouts_including_batch_of_three(hf_model):
    b = packed_batch([[(2, 2, 3)], [(1, 3, 4)], [(2, 1, 5)]], 8, 256, seed=1)   # B == 3
    args = dict(input_ids=b["tokens"], pixel_values=b["pixel_values"],
                image_mask=b["image_mask"], segment_ids=b["segment_ids"])
    out = hf_model(position_ids=b["position_ids"], **args).logits            # [B, 3, L]
    built = hf_model(image_grid_thw=_grids(b), **args).logits
    assert torch.equal(out, built)
    b2 = packed_batch(ROWS, SEQ, 256, seed=2)                                  # B == 2
    args2 = dict(input_ids=b2["tokens"], pixel_values=b2["pixel_values"],
                 image_mask=b2["image_mask"], segment_ids=b2["segment_ids"])
    assert torch.equal(hf_model(position_ids=b2["position_ids"], **args2).logits,
                       hf_model(position_ids=b2["position_ids"].transpose(0, 1), **args2).logits)
    with pytest.raises(ValueError, match="neither"):
        hf_model(position_ids=torch.zeros(2, 2, SEQ, dtype=torch.long), **args2)


@torch.no_grad()
def test_image_tensor_input_equals_patches(hf_model):
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    p = images.reshape(2, 3, 2, 16, 3, 16).permute(0, 2, 4, 1, 3, 5).reshape(12, 768)
    grid = torch.tensor([[1, 2, 3], [1, 2, 3]])
    a = hf_model.encode_images(images)
    b = hf_model.encode_images(p, grid)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@torch.no_grad()
def test_encoder_features_match_reference_image_alone(hf_model, ref_model):
    grids = [(2, 3), (4, 4), (1, 5)]
    px = torch.rand(sum(h * w for h, w in grids), 768) * 2 - 1
    feats = hf_model.encode_images(px, torch.tensor([[1, h, w] for h, w in grids]))
    start = 0
    for (gh, gw), feat in zip(grids, feats):
        patches = px[start:start + gh * gw]
        start += gh * gw
        pos = torch.zeros(1, 3, gh * gw, dtype=torch.long)
        pos[0, 1] = torch.arange(gh).repeat_interleave(gw)
        pos[0, 2] = torch.arange(gw).repeat(gh)
        h = ref_model.vision_embeddings(patches.view(-1, 3, 16, 16))[None]
        cos, sin = ref_model.rotary_emb(pos.transpose(0, 1))
        for layer in ref_model.visual.layers:
            h = layer(h, cos, sin, torch.ones(1, gh * gw, gh * gw, dtype=torch.bool))
        torch.testing.assert_close(feat, ref_model.ln_post(h)[0], atol=1e-5, rtol=1e-5)
    # image tokens never attend to text: same features inside a captioning forward
    b = packed_batch([[(2, 3, 6)]], 12, 256, seed=4)
    out = hf_model(input_ids=b["tokens"], pixel_values=px[:6], image_mask=b["image_mask"],
                   position_ids=b["position_ids"])
    torch.testing.assert_close(out.last_hidden_state[0, :6], feats[0], atol=1e-5, rtol=1e-5)


def test_auto_model_loads_exactly_the_stored_weights(tmp_path, weights):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    for dtype in ("fp32", "bf16"):
        d = write_hf_export(tmp_path / dtype, TINY, weights, dtype=dtype)
        cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
        assert cfg.model_type == "genlip" and cfg.text_embed_dim == 48
        model = AutoModel.from_pretrained(d, trust_remote_code=True, dtype=torch.float32)
        stored = load_file(d / "model.safetensors")
        sd = model.state_dict()
        assert sd.keys() == stored.keys()
        for k, v in stored.items():
            assert torch.equal(sd[k], v.float()), k   # nothing re-initialised by from_pretrained
        assert type(model).__name__ == "GenLIPModel"


@torch.no_grad()
def test_vision_only_export_encodes_and_refuses_text(tmp_path, weights, hf_model):
    from transformers import AutoModel

    vis = {k: v for k, v in weights.items()
           if not k.startswith(("embeddings.", "in_proj.", "proj.", "lm_head."))}
    d = write_hf_export(tmp_path / "vit", TINY, vis, vision_only=True)
    model = AutoModel.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    px = torch.rand(6, 768)
    grid = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model.encode_images(px, grid)[0],
                               hf_model.encode_images(px, grid)[0], atol=0, rtol=0)
    assert not hasattr(model, "lm_head")
    ids = torch.zeros(1, 8, dtype=torch.long)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :6] = True
    with pytest.raises(ValueError, match="vision-only export"):
        model(input_ids=ids, pixel_values=px, image_mask=mask, image_grid_thw=grid)


def test_input_errors_are_clear(hf_model):
    ids = torch.zeros(1, 8, dtype=torch.long)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :4] = True
    with pytest.raises(ValueError, match="no pixel_values"):
        hf_model(input_ids=ids, image_mask=mask)
    with pytest.raises(ValueError, match="hold 6 patches but the image_mask marks 4"):
        hf_model(input_ids=ids, image_mask=mask, pixel_values=torch.zeros(6, 768))
    with pytest.raises(ValueError, match="flattened patches"):
        hf_model(input_ids=ids, image_mask=mask, pixel_values=torch.zeros(4, 700))
    with pytest.raises(TypeError, match="unexpected arguments \\['foo'\\]"):
        hf_model(input_ids=ids, foo=1)
