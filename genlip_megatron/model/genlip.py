"""GenLIPMegatronModel: the GenLIP transformer on megatron-core (TransformerBlock + ModuleSpec).

Pipeline stages: embeddings only on the first stage (``pre_process``); final LayerNorm
(``ln_post``), ``output_proj`` (H→T, only when T ≠ H), untied ``output_layer`` (lm_head, no bias,
vocab-parallel) and vocab-parallel cross-entropy only on the last stage (``post_process``); by
default the head and the loss run chunked over the label positions (``model/lm_loss.py``).

Canonical tensor names (TP=1 shapes; H hidden, T text width, V vocab, F SwiGLU width, C·p·p
patch length, L layers, i = GLOBAL layer index 0..L-1). They are the same for the local and TE
backends and every TP/PP layout:

===========================================================  ==================  =================
name                                                         shape               reference (HF)
===========================================================  ==================  =================
embedding.patch_embed.weight / .bias                         [H, C·p·p] / [H]    vision_embeddings
                                                                                 .patch_embedding
                                                                                 (conv weight
                                                                                 .flatten(1))
embedding.word_embeddings.weight                             [V, T]              embeddings
embedding.in_proj.weight / .bias  (T ≠ H only)               [H, T] / [H]        in_proj
decoder.layers.{i}.self_attention.linear_qkv.layer_norm_     [H]                 visual.layers.{i}
  weight / layer_norm_bias                                                       .layer_norm1
decoder.layers.{i}.self_attention.linear_qkv.weight          [4H, H]             q/k/v_proj, see
decoder.layers.{i}.self_attention.linear_qkv.bias            [4H]                below
decoder.layers.{i}.self_attention.linear_proj.weight / .bias [H, H] / [H]        self_attn.out_proj
decoder.layers.{i}.self_attn_bda.layer_scale                 [H]                 layer_scale1
                                                                                 .lambda1
decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight /        [H]                 layer_norm2
  layer_norm_bias
decoder.layers.{i}.mlp.linear_fc1.weight / .bias             [2F, H] / [2F]      cat[mlp.gate_fc,
                                                                                 mlp.fc1] rows
decoder.layers.{i}.mlp.linear_fc2.weight / .bias             [H, F] / [H]        mlp.fc2
decoder.layers.{i}.mlp_bda.layer_scale                       [H]                 layer_scale2
                                                                                 .lambda1
decoder.final_layernorm.weight / .bias                       [H]                 ln_post
output_proj.weight / .bias  (T ≠ H only)                     [T, H] / [T]        proj
output_layer.weight                                          [V, T]              lm_head
===========================================================  ==================  =================

``linear_qkv`` rows are grouped per head h (n heads, head dim d = H/n): rows
``[h·4d, h·4d + d)`` = query_h, ``+d`` gate_h, ``+2d`` key_h, ``+3d`` value_h, i.e.
``stack([Wq.view(n,d,H), Wg.view(n,d,H), Wk.view(n,d,H), Wv.view(n,d,H)], 1).reshape(4H, H)``
with ``Wq = q_proj.weight[:H]``, ``Wg = q_proj.weight[H:]``; the bias the same way.
``linear_fc1`` rows: ``[0, F)`` gate_fc (SiLU branch), ``[F, 2F)`` fc1 (linear branch).

Where the names appear:

* dist checkpoint (``sharded_state_dict()`` → ``ShardedTensor.key``): megatron's homogeneous-layer
  format stacks the per-layer tensors along a leading axis of size L under one key without the
  index, e.g. ``decoder.layers.self_attention.linear_qkv.weight`` of global shape ``[L, 4H, H]``
  ``linear_fc1.weight/bias`` go through megatron's SwiGLU ``ShardedTensorFactory``: each rank
  saves its gate and fc1 halves as two shards of the same key, so the stored global tensor has
  the TP=1 row layout ``[gate_fc; fc1]`` for any TP. With ``metadata={"non_homogeneous_layers":
  True}`` the keys are per layer, ``decoder.layers.{i}.<name>``, as in the table; with
  ``singleton_local_shards`` also per layer, and fc1 is split into ``linear_fc1.weight_w``
  (gate_fc) and ``linear_fc1.weight_v`` (fc1).
* ``model.state_dict()`` (in memory, one pipeline chunk): per layer with the LOCAL index ``j``
  (global ``i = j + stage offset``); the local backend names the block norms
  ``decoder.layers.{j}.input_layernorm.{weight,bias}`` and ``...pre_mlp_layernorm.{weight,bias}``
  (mapped to the ``layer_norm_*`` names by ``layer_spec.LOCAL_TO_TE_KEYS``); tensors are this
  rank's TP shards. ``*._extra_state`` entries (None, or TE FP8 metadata) carry no weights.

TP shards: ``word_embeddings``/``output_layer`` rows ``[V/tp]``; ``linear_qkv`` rows: contiguous
heads ``[r·n/tp, (r+1)·n/tp)``; ``linear_proj``/``linear_fc2`` columns ``[H/tp]``/``[F/tp]``;
``linear_fc1`` rows ``[gate_r; fc1_r]`` (partition stride 2); everything else replicated.
No buffers are saved (MRoPE angles are computed from position ids).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor

from genlip_megatron.model.attention import build_prefix_lm_params
from genlip_megatron.model.embedding import GenLIPEmbedding
from genlip_megatron.model.init import init_genlip_weights
from genlip_megatron.model.layer_spec import get_genlip_block_spec
from genlip_megatron.model.lm_loss import chunked_linear_cross_entropy
from genlip_megatron.model.rope import MRoPERotaryEmbedding
from genlip_megatron.model.transformer_config import GenLIPTransformerConfig, \
    local_linear_config

__all__ = ["GenLIPMegatronModel", "build_genlip_model", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class GenLIPMegatronModel(MegatronModule):
    """GenLIP prefix-LM transformer (one pipeline chunk).

    Args:
        config: ``GenLIPTransformerConfig`` (the only configuration input).
        pre_process: this chunk holds the embeddings (first pipeline stage).
        post_process: this chunk holds ln_post, output_proj, lm_head and the loss (last stage).
        vp_stage: virtual pipeline stage of this chunk (interleaved schedules).
        pg_collection: process groups (tp, pp, ...); None uses megatron's global groups.
    """

    def __init__(self, config: GenLIPTransformerConfig, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        # Read by megatron's schedules and finalize_model_grads.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False

        self.rotary = MRoPERotaryEmbedding(config.kv_channels, config.mrope_section,
                                            config.rope_theta)
        if pre_process:
            self.embedding = GenLIPEmbedding(config, tp_group=self.tp_group)
        pp_rank = get_pg_rank(getattr(pg_collection, "pp", None))
        self.decoder = TransformerBlock(
            config=config, spec=get_genlip_block_spec(config, vp_stage, pp_rank),
            pre_process=pre_process, post_process=post_process, pg_collection=pg_collection,
            vp_stage=vp_stage)
        if post_process:
            # The head runs on the sequence-GATHERED hidden states (see _lm_head), so
            # output_proj sees full rows on every TP rank (no SP grad tag), and output_layer
            # must not gather again: it behaves as a plain column-parallel layer whose input
            # gradient is all-reduced over TP.
            self.output_proj = (torch.nn.Linear(config.hidden_size, config.text_dim,
                                                dtype=config.params_dtype)
                                if config.text_dim != config.hidden_size else None)
            self.output_layer = ColumnParallelLinear(
                config.text_dim, config.vocab_size, config=local_linear_config(config),
                init_method=config.init_method,
                bias=False, gather_output=False, skip_bias_add=False, tp_group=self.tp_group)
            tp_size = get_pg_size(self.tp_group)
            self.output_layer.sequence_parallel = False
            self.output_layer.allreduce_dgrad = tp_size > 1
        if config.perform_initialization:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation (``model/init.py``), identical under any TP/PP layout."""
        init_genlip_weights(self, get_pg_rank(self.tp_group), get_pg_size(self.tp_group),
                            [layer.layer_number for layer in self.decoder.layers])

    def set_input_tensor(self, input_tensor: Union[Tensor, list[Tensor]]) -> None:
        """Pipeline schedules hand the previous stage's output here (``[S(/tp), B, H]``)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise RuntimeError(f"GenLIPMegatronModel.set_input_tensor expects one tensor, got "
                                   f"{len(input_tensor)}.")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, tokens: Optional[Tensor], position_ids: Tensor, image_mask: Tensor,
                segment_ids: Tensor, pixel_values: Optional[Tensor],
                labels: Optional[Tensor] = None) -> Tensor:
        """Run this chunk on one packed micro-batch (layout: ``data/batch.py`` PackedBatch).

        Args:
            tokens: int64 ``[B, S]`` (first stage only; may be None elsewhere).
            position_ids: int64 ``[B, 3, S]`` MRoPE (t, h, w); needed on every stage.
            image_mask: bool ``[B, S]``; needed on every stage (mask).
            segment_ids: int32 ``[B, S]`` sample index per row, -1 on padding; every stage.
            pixel_values: float ``[N, C·p·p]`` (first stage only; may be None elsewhere).
            labels: int64 ``[B, S]`` already-shifted targets (-100 = no loss), last stage.

        Returns:
            Non-last stages: hidden states ``[S, B, H]`` (``[S/tp, B, H]`` under SP).
            Last stage with labels: per-token CE, float32 ``[B, S]``, 0 where labels == -100
            (the caller normalises by the number of loss tokens).
            Last stage without labels: vocab-parallel logits ``[B, S, V/tp]``.
        """
        if self.config.sequence_parallel and segment_ids.shape[1] % get_pg_size(self.tp_group):
            raise ValueError(f"sequence length {segment_ids.shape[1]} is not divisible by "
                             f"parallel.tp ({get_pg_size(self.tp_group)}) under parallel.sp; "
                             "pad data.max_seq_len to a multiple of tp.")
        attention = build_prefix_lm_params(self.config.prefix_attention_backend, segment_ids,
                                           image_mask)   # once per forward, shared by all layers
        rotary = self.rotary(position_ids)                # [S, B, 1, head_dim] fp32
        hidden = self.embedding(tokens, image_mask, pixel_values) if self.pre_process else None
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary,
                              packed_seq_params=attention)
        if not self.post_process:
            return hidden
        return self._lm_head(hidden, labels)

    def _lm_head(self, hidden: Tensor, labels: Optional[Tensor]) -> Tensor:
        """ln_post output ``[S(/tp), B, H]`` → per-token loss ``[B, S]`` or logits.

        With labels, only positions that carry a target go through proj, lm_head and the
        cross-entropy: image and prompt tokens have none (≈ 70 % of a stage-1 row). Even so, at
        V = 151936 their logits would take 1.5 GB in bf16 per 16384-token row, so by default
        (``loss_impl: chunked``) the head and the loss run one vocabulary block at a time.
        """
        if self.config.sequence_parallel:   # [S/tp, B, H] -> [S, B, H]; grad: split back
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.tp_group)
        if labels is None:
            logits, _ = self.output_layer(self._proj(hidden))     # [S, B, V/tp]
            return logits.transpose(0, 1).contiguous()
        target = labels.transpose(0, 1)                           # [S, B]
        where = (target != IGNORE_INDEX).nonzero(as_tuple=True)
        selected = self._proj(hidden[where])                      # [N, T]
        if self.config.loss_impl == "chunked":   # one block of logits alive (model/lm_loss.py)
            picked = chunked_linear_cross_entropy(
                selected, self.output_layer.weight, target[where], self.tp_group,
                self.config.loss_chunk_logits,
                getattr(self.output_layer, "gradient_accumulation_fusion", False))
        else:   # "full": all N × V/tp logits at once (the oracle)
            logits, _ = self.output_layer(selected.unsqueeze(1))  # [N, 1, V/tp]
            picked = tensor_parallel.vocab_parallel_cross_entropy(
                logits, target[where][:, None])[:, 0]
        loss = torch.zeros(target.shape, dtype=torch.float32, device=hidden.device)
        loss = loss.index_put(where, picked.float())              # 0 where labels == -100
        return loss.transpose(0, 1).contiguous()

    def _proj(self, hidden: Tensor) -> Tensor:
        return hidden if self.output_proj is None else self.output_proj(hidden)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, grid_hw: Tensor) -> list[Tensor]:
        """Vision-encoder use: ln_post features of images alone (the MLLM encoder;
        docs/reference-architecture.md).

        Each image attends bidirectionally to itself only, with positions (0, r, c).

        Args:
            pixel_values: float ``[N, C·p·p]``, the images' patches in raster order, image after
                image.
            grid_hw: int ``[num_images, 2]`` patch grid (rows, cols); N = Σ rows·cols.

        Returns:
            One ``[rows·cols, H]`` tensor per image (final LayerNorm output, params dtype).
        """
        if not (self.pre_process and self.post_process):
            raise RuntimeError("encode_images needs the whole model in one chunk; build it with "
                               "parallel.pp: 1 (pre_process and post_process).")
        tokens, position_ids, image_mask, segment_ids, lens = _image_only_row(
            grid_hw, pixel_values.shape[0], get_pg_size(self.tp_group), pixel_values.device)
        attention = build_prefix_lm_params(self.config.prefix_attention_backend, segment_ids,
                                           image_mask)
        hidden = self.embedding(tokens, image_mask, pixel_values)
        hidden = self.decoder(hidden_states=hidden, attention_mask=None,
                              rotary_pos_emb=self.rotary(position_ids),
                              packed_seq_params=attention)       # [S(/tp), 1, H], ln_post'd
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.tp_group)
        return list(hidden[: sum(lens), 0].split(lens))


def _image_only_row(grid_hw: Tensor, num_patches: int, multiple: int, device
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """One packed row holding every image (one segment each), padded to ``multiple``."""
    grid = grid_hw.to("cpu", torch.int64)
    lens = (grid[:, 0] * grid[:, 1]).tolist()
    if sum(lens) != num_patches:
        raise ValueError(f"grid_hw describes {sum(lens)} patches but pixel_values has "
                         f"{num_patches} rows.")
    seq = -(-max(sum(lens), 1) // multiple) * multiple
    segment_ids = torch.full((1, seq), -1, dtype=torch.int32)
    position_ids = torch.zeros((1, 3, seq), dtype=torch.int64)
    start = 0
    for index, (rows, cols) in enumerate(grid.tolist()):
        n = rows * cols
        segment_ids[0, start:start + n] = index
        r = torch.arange(rows).repeat_interleave(cols)
        position_ids[0, 1, start:start + n] = r
        position_ids[0, 2, start:start + n] = torch.arange(cols).repeat(rows)
        start += n
    image_mask = segment_ids >= 0
    tokens = torch.zeros((1, seq), dtype=torch.int64)
    return (tokens.to(device), position_ids.to(device), image_mask.to(device),
            segment_ids.to(device), lens)


def build_genlip_model(config: GenLIPTransformerConfig, pre_process: bool = True,
                       post_process: bool = True, vp_stage: Optional[int] = None,
                       pg_collection: Optional[ProcessGroupCollection] = None
                       ) -> GenLIPMegatronModel:
    """Model factory for the trainer (megatron's ``model_provider`` signature).

    Args: as :class:`GenLIPMegatronModel`. Returns the chunk on the default device (CPU init without
    CUDA); the trainer moves it to the GPU and wraps it (DDP, Float16Module).
    """
    return GenLIPMegatronModel(config, pre_process=pre_process, post_process=post_process,
                       vp_stage=vp_stage, pg_collection=pg_collection)
