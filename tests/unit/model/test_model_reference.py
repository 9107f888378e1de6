"""GenLIPModel (megatron, TP=1) against the independent plain-PyTorch reference (fp32).

The reference (tests/reference_genlip.py) is written from the reference notes with HF key names;
our weights are mapped into it with the documented layout. Packed rows hold several samples with
different image sizes; the tiny preset has text_dim (48) ≠ hidden (64), so in_proj/proj are on.
"""

from __future__ import annotations

import pytest
import torch
from reference_genlip import RefGenLIP, make_packed_batch, megatron_to_hf

ROWS = [[(2, 3, 7), (3, 3, 5), (1, 2, 6)],      # three samples, padding at the end
        [(4, 2, 9), (2, 2, 12)]]
SEQ = 48


def _reference_for(model, cfg) -> RefGenLIP:
    ref = RefGenLIP(hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_attention_heads,
                    inter=cfg.ffn_hidden_size, text_dim=cfg.text_dim, vocab=cfg.vocab_size,
                    mrope_section=cfg.mrope_section, theta=cfg.rope_theta,
                    eps=cfg.layernorm_epsilon, ls_init=cfg.layerscale_init)
    sd = megatron_to_hf({k: v for k, v in model.state_dict().items() if v is not None},
                        num_layers=cfg.num_layers, heads=cfg.num_attention_heads,
                        hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size)
    missing, unexpected = ref.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return ref.eval()


@pytest.fixture
def model_and_ref(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPModel

    cfg = make_config(init_std=0.2)   # larger than 0.02 so logits are O(1)
    model = GenLIPModel(cfg).eval()
    # Perturb LayerScale/LayerNorm/biases away from their init so every tensor matters.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, _reference_for(model, cfg), cfg


def test_logits_and_loss_match_reference(model_and_ref):
    model, ref, cfg = model_and_ref
    b = make_packed_batch(ROWS, SEQ, cfg.vocab_size, seed=3)
    args = (b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"], b["pixel_values"])
    with torch.no_grad():
        logits = model(*args)                                     # [B, S, V]
        per_token = model(*args, labels=b["labels"])              # [B, S]
        ref_logits, ref_loss = ref(b["tokens"], b["pixel_values"].view(-1, 3, 16, 16),
                                   b["image_mask"], b["position_ids"], b["segment_ids"].long(),
                                   labels=b["ref_labels"])
    real = b["segment_ids"] >= 0                                  # padding differs by design
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    valid = b["labels"] != -100
    assert torch.all(per_token[~valid] == 0) and per_token.dtype == torch.float32
    loss = per_token.sum() / valid.sum()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert logits.std() > 0.5                                     # not a degenerate match


def test_encode_images_matches_reference_ln_post(model_and_ref):
    model, ref, cfg = model_and_ref
    grid = torch.tensor([[2, 3], [4, 4], [1, 5]])
    n = int((grid[:, 0] * grid[:, 1]).sum())
    pixels = torch.rand(n, cfg.patch_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        feats = model.encode_images(pixels, grid)
    assert [f.shape for f in feats] == [(6, 64), (16, 64), (5, 64)]
    start = 0
    for (gh, gw), feat in zip(grid.tolist(), feats):
        patches = pixels[start:start + gh * gw]
        start += gh * gw
        pos = torch.zeros(1, 3, gh * gw, dtype=torch.long)
        pos[0, 1] = torch.arange(gh).repeat_interleave(gw)
        pos[0, 2] = torch.arange(gw).repeat(gh)
        mask = torch.ones(1, gh * gw, dtype=torch.bool)
        with torch.no_grad():   # the reference run on one image alone, ln_post output
            h = ref.vision_embeddings(patches.view(-1, 3, 16, 16))[None]
            cos, sin = ref.rotary_emb(pos.transpose(0, 1))
            allowed = torch.ones(1, gh * gw, gh * gw, dtype=torch.bool)
            for layer in ref.visual.layers:
                h = layer(h, cos, sin, allowed)
            expected = ref.ln_post(h)[0]
        torch.testing.assert_close(feat, expected, atol=1e-5, rtol=1e-5)
        assert mask.all()
