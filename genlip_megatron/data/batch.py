"""PackedBatch: the one typed contract between the data pipeline and the trainer.

A micro-batch holds B rows of S tokens. Each row packs whole samples ``[image patches | text]``
back to back and is padded at the end. The model never sees this class: the trainer unpacks it
into tensors (``tokens``, ``position_ids``, ``pixel_values``, ...), so data knows nothing of
models and models nothing of data.

Layout rules (docs/reference-architecture.md):
- ``tokens`` is 0 at image and padding positions (the patch embedding replaces image tokens).
- ``labels`` are already shifted: ``labels[b, i]`` is the target predicted at position i, i.e.
  the next token of the same sample, or -100 (image, prompt, last token of a sample, padding).
- ``position_ids[b, :, i]`` = (t, h, w): image patch (0, r, c); text t=h=w=max(gh, gw)+k,
  restarting for every sample; padding 0.
- ``segment_ids`` is the sample index inside its row (0, 1, ...), -1 on padding.
- ``pixel_values`` concatenates the patches of every image in row order (row 0 first), each patch
  flattened in (C, ph, pw) order and normalised with mean = std = 0.5.
- ``sample_offsets`` / ``cu_seqlens_*`` index the flattened ``[B*S]`` token stream: sample j
  starts at ``sample_offsets[j]`` with ``image_lens[j]`` patch tokens followed by ``text_lens[j]``
  text tokens; ``cu_seqlens_image`` = [0, cumsum(image_lens)], same for text and whole samples.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One micro-batch of packed prefix-LM rows (shapes in brackets; N = total patches)."""

    tokens: torch.Tensor          # int64 [B, S]
    labels: torch.Tensor          # int64 [B, S], shifted targets, -100 = no loss
    position_ids: torch.Tensor    # int64 [B, 3, S] MRoPE (t, h, w)
    image_mask: torch.Tensor      # bool  [B, S] True at image patch positions
    segment_ids: torch.Tensor     # int32 [B, S] sample index within the row, -1 = padding
    pixel_values: torch.Tensor    # float32 [N, C*p*p] patches in row order
    image_grid_hw: torch.Tensor   # int32 [num_images, 2] patch grid (rows, cols) per image
    sample_offsets: torch.Tensor  # int32 [num_samples] start of each sample in the [B*S] stream
    image_lens: torch.Tensor      # int32 [num_samples]
    text_lens: torch.Tensor       # int32 [num_samples]
    cu_seqlens: torch.Tensor      # int32 [num_samples + 1] cumulative image+text lengths
    cu_seqlens_image: torch.Tensor  # int32 [num_samples + 1]
    cu_seqlens_text: torch.Tensor   # int32 [num_samples + 1]

    @property
    def loss_mask(self) -> torch.Tensor:
        """float32 [B, S]: 1 where a label is trained on."""
        return (self.labels != IGNORE_INDEX).float()

    @property
    def num_loss_tokens(self) -> int:
        """Number of trained-on tokens (host sync: use on log steps only)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_real_tokens(self) -> int:
        """Non-padding tokens (for packing efficiency)."""
        return int((self.segment_ids >= 0).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """Move every tensor to ``device``."""
        return PackedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                              for f in fields(self)})
