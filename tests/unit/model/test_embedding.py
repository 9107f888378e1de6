"""GenLIP input embedding: the CPU path embeds and projects only non-image positions."""

from __future__ import annotations

import torch


def test_cpu_text_only_path_equals_the_full_row(mp_state, make_config):
    from genlip_megatron.model.embedding import GenLIPEmbedding

    config = make_config()
    assert config.text_dim != config.hidden_size     # in_proj exists: the costly part
    emb = GenLIPEmbedding(config)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, config.vocab_size, (2, 16), generator=gen)
    image_mask = torch.zeros(2, 16, dtype=torch.bool)
    image_mask[0, 2:9] = image_mask[1, 0:4] = True
    tokens[image_mask] = 0
    pixels = torch.randn(int(image_mask.sum()), config.patch_dim, generator=gen)
    calls = []
    emb.in_proj.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    got = emb(tokens, image_mask, pixels)                          # [S, B, H]
    assert calls == [int((~image_mask).sum())]                     # image rows not projected
    full = emb.in_proj(emb.word_embeddings(tokens))                # [B, S, H], every position
    want = full.masked_scatter(image_mask.unsqueeze(-1).expand_as(full),
                               emb.patch_embed(pixels)).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.sum().backward()                                            # gradients reach both
    assert emb.word_embeddings.weight.grad.abs().sum() > 0
    assert emb.patch_embed.weight.grad.abs().sum() > 0
