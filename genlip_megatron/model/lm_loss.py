"""Chunked vocab-parallel linear + cross-entropy: the LM head's loss without the full logits.

At the Qwen3 vocabulary (V = 151936) the logits of every label position of a 16384-token row
(≈ 4900 positions) take 1.5 GB in bf16, plus the fp32 softmax and its gradient. The loss never
needs them all at once: :func:`chunked_linear_cross_entropy` walks the label positions in
chunks of ``chunk_size`` rows, so only one chunk's ``[chunk, V/tp]`` logits are alive at a
time, and the backward pass recomputes each chunk's logits from the saved inputs (one extra
head GEMM; the per-row max and sum-exp are kept, so the recompute needs no collective).

The softmax is exact over the TP-sharded vocabulary: per chunk, the row max and the sum of
exponentials (with the target logit) are all-reduced over the TP group, as megatron-core's
``vocab_parallel_cross_entropy`` does; its ``VocabParallelCrossEntropy`` pieces compute the
target logit, the sum-exp and the gradient, so the numbers are megatron's: logits are formed in
the weight dtype and promoted to fp32, the gradient is cast back to the weight dtype before the
input/weight GEMMs. The input gradient is all-reduced over TP (the head's input is replicated on
every TP rank, like megatron's ``ColumnParallelLinear`` with ``allreduce_dgrad``); the weight
gradient is this rank's ``[V/tp, T]`` shard, accumulated in fp32 over the chunks (straight into
megatron DDP's ``main_grad`` where the head fuses weight-gradient accumulation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor

__all__ = ["chunked_linear_cross_entropy", "default_chunk_size", "LOSS_IMPLS",
           "CHUNK_LOGITS"]

LOSS_IMPLS = ("chunked", "full")
"""LM-head loss implementations (``model.loss_impl``); "full" is the full-logits oracle."""
CHUNK_LOGITS = 2 ** 25
"""Default logits per chunk (128 MiB in fp32): 220 label positions at V = 151936, TP = 1.

The weight gradient (``[V/tp, T]``, 0.6 GB fp32 at T = 1024) is produced by any head; a chunk
well below it keeps the head + loss peak near that floor (``benchmarks/loss_memory.py``)."""


def default_chunk_size(vocab_shard: int) -> int:
    """Label positions per chunk so that one chunk holds about :data:`CHUNK_LOGITS` logits."""
    return max(1, CHUNK_LOGITS // max(1, vocab_shard))


def _tp(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) in the TP group; (0, 1) without one (single process)."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _chunk_stats(hidden: Tensor, weight: Tensor, target: Tensor, vocab_start: int,
                 group: Optional[dist.ProcessGroup], tp_size: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's per-row loss, max logit and sum-exp (fp32, ``[C]`` each), all-reduced."""
    logits = torch.matmul(hidden, weight.t())                         # [C, V/tp], weight dtype
    logits, row_max = VocabParallelCrossEntropy.calculate_logits_max(logits)   # fp32
    if tp_size > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    _, _, predicted, sum_exp, _ = VocabParallelCrossEntropy.calculate_predicted_logits(
        logits, target, row_max, vocab_start, vocab_start + weight.shape[0])
    del logits                                                        # exp'd in place; not kept
    if tp_size > 1:   # one collective for both sums
        both = torch.stack([predicted, sum_exp])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        predicted, sum_exp = both[0], both[1]
    return torch.log(sum_exp) - predicted, row_max, sum_exp


def _chunk_grad_logits(hidden: Tensor, weight: Tensor, target: Tensor, row_max: Tensor,
                       sum_exp: Tensor, grad_loss: Tensor, vocab_start: int) -> Tensor:
    """d loss / d logits of one chunk ``[C, V/tp]`` in the weight dtype (recomputed logits)."""
    logits = torch.matmul(hidden, weight.t()).float()
    logits -= row_max.unsqueeze(-1)
    torch.exp(logits, out=logits)
    softmax = logits.div_(sum_exp.unsqueeze(-1))
    target_mask = (target < vocab_start) | (target >= vocab_start + weight.shape[0])
    masked_target = torch.where(target_mask, 0, target - vocab_start)
    grad_2d, arange_1d, softmax_update, grad_input = \
        VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
    grad = VocabParallelCrossEntropy.calculate_gradients(
        grad_2d, arange_1d, masked_target, softmax_update, grad_input, grad_loss)
    return grad.to(weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-row CE of ``hidden @ weight.T`` against ``target``, chunk by chunk (module doc)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor,
                group: Optional[dist.ProcessGroup], chunk_size: int,
                fuse_wgrad: bool) -> Tensor:
        rank, size = _tp(group)
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
            weight.shape[0], rank, size)
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        row_max, sum_exp = torch.empty_like(loss), torch.empty_like(loss)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            loss[start:end], row_max[start:end], sum_exp[start:end] = _chunk_stats(
                hidden[start:end], weight, target[start:end], vocab_start, group, size)
        ctx.save_for_backward(hidden, weight, target, row_max, sum_exp)
        ctx.group, ctx.chunk_size, ctx.vocab_start, ctx.tp_size = group, chunk_size, \
            vocab_start, size
        ctx.fuse_wgrad = fuse_wgrad and getattr(weight, "main_grad", None) is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, target, row_max, sum_exp = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        wgrad = _WeightGrad(weight, ctx.fuse_wgrad)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            grad_logits = _chunk_grad_logits(h, weight, target[start:end], row_max[start:end],
                                             sum_exp[start:end], grad_loss[start:end].float(),
                                             ctx.vocab_start)                # [C, V/tp]
            torch.matmul(grad_logits, weight, out=grad_hidden[start:end])
            wgrad.add(grad_logits, h)
            del grad_logits
        if ctx.tp_size > 1:   # every TP rank holds the whole input: sum the vocab shards' parts
            dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden, wgrad.result(), None, None, None, None


class _WeightGrad:
    """Accumulates ``grad_logitsᵀ @ hidden`` over chunks, in fp32.

    With ``fuse`` (megatron's ``gradient_accumulation_fusion`` on the head and a DDP
    ``main_grad`` on the weight) each chunk goes straight into ``main_grad`` through megatron's
    ``fused_weight_gradient_mlp_cuda`` (Apex on GPU, ``compat/wgrad.py`` on CPU) and a dummy
    gradient is returned, as megatron's ``LinearWithGradAccumulationAndAsyncCommunication``
    does; otherwise into a fresh fp32 ``[V/tp, T]`` buffer returned in the weight dtype.
    """

    def __init__(self, weight: Tensor, fuse: bool) -> None:
        self.weight, self.fuse = weight, fuse
        self.buffer = None if fuse else torch.zeros(weight.shape, dtype=torch.float32,
                                                    device=weight.device)

    def add(self, grad_logits: Tensor, hidden: Tensor) -> None:
        if self.fuse:
            from megatron.core.tensor_parallel import layers

            main_grad = self.weight.main_grad
            accum = (layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32
                     if main_grad.dtype == torch.float32 else
                     layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16)
            accum(hidden, grad_logits, main_grad)
        elif grad_logits.dtype == torch.float32:
            self.buffer.addmm_(grad_logits.t(), hidden)
        else:
            self.buffer += torch.matmul(grad_logits.t(), hidden)

    def result(self) -> Tensor:
        if not self.fuse:
            return self.buffer.to(self.weight.dtype)
        # megatron DDP's hook skips a grad already added to main_grad (dummy, never read).
        if hasattr(self.weight, "grad_added_to_main_grad"):
            self.weight.grad_added_to_main_grad = True
        make = torch.zeros if getattr(self.weight, "zero_out_wgrad", False) else torch.empty
        return make(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device)


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                                 group: Optional[dist.ProcessGroup] = None,
                                 chunk_size: Optional[int] = None,
                                 fuse_wgrad: bool = False) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T`` per row, never holding more than one chunk's logits.

    Args:
        hidden: ``[N, T]`` head inputs of the label positions only (replicated over TP).
        weight: ``[V/tp, T]`` this rank's vocab shard of the LM head (rows in rank order).
        target: int64 ``[N]`` global token ids (every entry is a real label).
        group: the tensor-parallel group the vocabulary is sharded over (None: no TP).
        chunk_size: rows per chunk; logits of one ``[chunk_size, V/tp]`` chunk are alive
            (None: :func:`default_chunk_size`).
        fuse_wgrad: accumulate the weight gradient straight into ``weight.main_grad`` (the
            head's ``gradient_accumulation_fusion``; ignored without ``main_grad``).

    Returns:
        float32 ``[N]``: ``logsumexp(logits) - logits[target]`` over the whole vocabulary.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"model.loss_chunk_size ({chunk_size}) must be at least 1.")
    if hidden.dim() != 2 or target.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_linear_cross_entropy expects hidden [N, T] and target [N], "
                         f"got {tuple(hidden.shape)} and {tuple(target.shape)}.")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, target, group, chunk_size,
                                            fuse_wgrad)
