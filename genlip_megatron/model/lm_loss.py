"""Chunked vocab-parallel linear + cross-entropy: the LM head's loss without the full logits.

At the Qwen3 vocabulary (V = 151936) the logits of every label position of a 16384-token row
(≈ 4900 positions) take 1.5 GB in bf16, plus the fp32 softmax and its gradient. The loss never
needs them all at once. :func:`chunked_linear_cross_entropy` takes the label positions only
(``[N, T]``) and walks this rank's vocabulary shard in blocks of ``Vb`` rows, so that one
``[N, Vb]`` block of logits (about ``chunk_logits`` values) is alive at a time:

* forward: per block, the logits, their row max and sum of exponentials (online softmax: the
  running sum is rescaled when the max grows) and the target's logit; then the max and the sums
  are combined over the TP group (all-reduce MAX, then SUM), exactly as megatron-core's
  ``vocab_parallel_cross_entropy`` combines its shards. Saved: inputs, per-row max and sum-exp.
* backward: per block, the logits are recomputed (one extra head GEMM), turned into
  ``softmax - onehot`` scaled by the incoming gradient and cast to the weight dtype, as megatron
  does; the block's weight gradient ``[Vb, T]`` is written ONCE (no accumulation pass over the
  whole ``[V/tp, T]`` gradient), the input gradient ``[N, T]`` accumulates in fp32 and is
  all-reduced over TP (the head's input is replicated on every TP rank, like megatron's
  ``ColumnParallelLinear`` with ``allreduce_dgrad``).

Blocking the vocabulary rather than the positions keeps the weight-gradient traffic of the full
path (one write), which is what a GPU run pays for. The sum-exp runs in float64 across blocks
and the loss formula in float64 up to its final rounding, so the loss is at least as accurate
as megatron's single fp32 pass (they differ by fp32 roundings); the gradients follow megatron's
recipe (fp32 softmax from the all-reduced max and sum, cast to the weight dtype).
Where the head fuses weight-gradient accumulation (megatron's ``gradient_accumulation_fusion``
and a DDP ``main_grad``), each block's gradient goes straight into ``main_grad``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor

__all__ = ["chunked_linear_cross_entropy", "vocab_block_size", "LOSS_IMPLS", "CHUNK_LOGITS"]

LOSS_IMPLS = ("chunked", "full")
"""LM-head loss implementations (``model.loss_impl``); "full" is the full-logits oracle."""
CHUNK_LOGITS = 2 ** 24
"""Default logits per block (64 MiB in fp32): 4096 vocabulary entries for 4096 label positions.

The weight gradient (``[V/tp, T]``, 0.6 GB fp32 at V = 151936, T = 1024) is produced by any
head; blocks well below it keep the head + loss peak near that floor
(``benchmarks/loss_memory.py``)."""


def vocab_block_size(num_positions: int, vocab_shard: int, chunk_logits: int) -> int:
    """Vocabulary rows per block so that ``[num_positions, block]`` holds ~``chunk_logits``."""
    return min(vocab_shard, max(1, chunk_logits // max(1, num_positions)))


def _tp(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) in the TP group; (0, 1) without one (single process)."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _target_in_block(target: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """(rows whose target lies in vocab ``[start, end)``, its index inside the block)."""
    inside = (target >= start) & (target < end)
    return inside, torch.where(inside, target - start, 0)


def _forward_stats(hidden: Tensor, weight: Tensor, target: Tensor, vocab_start: int,
                   block: int) -> tuple[Tensor, Tensor, Tensor]:
    """This shard's per-row max logit, sum of exp(logit - max) (float64) and target logit."""
    n = hidden.shape[0]
    row_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
    # float64 running sum: the rescaling when the max grows then adds no fp32 error per block
    sum_exp = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    predicted = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    for b0 in range(0, weight.shape[0], block):
        b1 = min(b0 + block, weight.shape[0])
        logits, block_max = VocabParallelCrossEntropy.calculate_logits_max(
            torch.matmul(hidden, weight[b0:b1].t()))                   # [N, Vb] fp32
        inside, index = _target_in_block(target, vocab_start + b0, vocab_start + b1)
        picked = logits.gather(1, index.unsqueeze(1)).squeeze(1)
        predicted = torch.where(inside, picked, predicted)
        new_max = torch.maximum(row_max, block_max)
        sum_exp *= torch.exp(row_max.double() - new_max.double())      # 0 on the first block
        logits -= new_max.unsqueeze(1)
        sum_exp += torch.exp_(logits).sum(dim=1)
        row_max = new_max
        del logits
    return row_max, sum_exp, predicted


def _combine_over_tp(row_max: Tensor, sum_exp: Tensor, predicted: Tensor,
                     group: Optional[dist.ProcessGroup]) -> tuple[Tensor, Tensor, Tensor]:
    """Global max, sum-exp (relative to it) and target logit over the TP vocabulary shards."""
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    both = torch.stack([sum_exp * torch.exp(row_max.double() - global_max.double()),
                        predicted.double()])                             # float64 [2, N]
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)          # one collective for both
    return global_max, both[0], both[1].float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-row CE of ``hidden @ weight.T`` against ``target``, block by block (module doc)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor,
                group: Optional[dist.ProcessGroup], chunk_logits: int,
                fuse_wgrad: bool) -> Tensor:
        rank, size = _tp(group)
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
            weight.shape[0], rank, size)
        block = vocab_block_size(hidden.shape[0], weight.shape[0], chunk_logits)
        row_max, sum_exp, predicted = _forward_stats(hidden, weight, target, vocab_start, block)
        if size > 1:
            row_max, sum_exp, predicted = _combine_over_tp(row_max, sum_exp, predicted, group)
        ctx.save_for_backward(hidden, weight, target, row_max, sum_exp.float())
        ctx.group, ctx.tp_size, ctx.vocab_start, ctx.block = group, size, vocab_start, block
        ctx.fuse_wgrad = fuse_wgrad and getattr(weight, "main_grad", None) is not None
        # megatron's formula, in float64 up to the final rounding
        return (torch.log(sum_exp) - (predicted.double() - row_max.double())).float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, target, row_max, sum_exp = ctx.saved_tensors
        grad_loss = grad_loss.float().unsqueeze(1)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        wgrad = _WeightGrad(weight, ctx.fuse_wgrad)
        for b0 in range(0, weight.shape[0], ctx.block):
            b1 = min(b0 + ctx.block, weight.shape[0])
            logits = torch.matmul(hidden, weight[b0:b1].t()).float()   # [N, Vb], recomputed
            logits -= row_max.unsqueeze(1)
            softmax = torch.exp_(logits).div_(sum_exp.unsqueeze(1))
            inside, index = _target_in_block(target, ctx.vocab_start + b0, ctx.vocab_start + b1)
            softmax.scatter_add_(1, index.unsqueeze(1), -inside.float().unsqueeze(1))
            grad_logits = softmax.mul_(grad_loss).to(weight.dtype)
            del logits, softmax
            if grad_logits.dtype == torch.float32:
                grad_hidden.addmm_(grad_logits, weight[b0:b1])
            else:
                grad_hidden += torch.matmul(grad_logits, weight[b0:b1])
            wgrad.write(b0, b1, grad_logits, hidden)
            del grad_logits
        if ctx.tp_size > 1:   # every TP rank holds the whole input: sum the vocab shards' parts
            dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden.to(hidden.dtype), wgrad.result(), None, None, None, None


class _WeightGrad:
    """The weight gradient, one vocabulary block at a time (each row block written once).

    With ``fuse`` (megatron's ``gradient_accumulation_fusion`` on the head and a DDP
    ``main_grad`` on the weight) each block goes straight into its rows of ``main_grad`` through
    megatron's ``fused_weight_gradient_mlp_cuda`` (Apex on GPU, ``compat/wgrad.py`` on CPU) and
    a dummy gradient is returned, as megatron's ``LinearWithGradAccumulationAndAsyncCommunication``
    does; otherwise into a fresh ``[V/tp, T]`` gradient in the weight dtype.
    """

    def __init__(self, weight: Tensor, fuse: bool) -> None:
        self.weight, self.fuse = weight, fuse
        self.grad = None if fuse else torch.empty_like(weight)

    def write(self, b0: int, b1: int, grad_logits: Tensor, hidden: Tensor) -> None:
        if not self.fuse:
            torch.matmul(grad_logits.t(), hidden, out=self.grad[b0:b1])
            return
        from megatron.core.tensor_parallel import layers

        main_grad = self.weight.main_grad[b0:b1]          # rows: a contiguous view
        kernels = layers.fused_weight_gradient_mlp_cuda
        accum = (kernels.wgrad_gemm_accum_fp32 if main_grad.dtype == torch.float32 else
                 kernels.wgrad_gemm_accum_fp16)
        accum(hidden, grad_logits, main_grad)

    def result(self) -> Tensor:
        if not self.fuse:
            return self.grad
        # megatron DDP's hook skips a grad already added to main_grad (dummy, never read).
        if hasattr(self.weight, "grad_added_to_main_grad"):
            self.weight.grad_added_to_main_grad = True
        make = torch.zeros if getattr(self.weight, "zero_out_wgrad", False) else torch.empty
        return make(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device)


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                                 group: Optional[dist.ProcessGroup] = None,
                                 chunk_logits: int = CHUNK_LOGITS,
                                 fuse_wgrad: bool = False) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T`` per row, holding one block of logits at a time.

    Args:
        hidden: ``[N, T]`` head inputs of the label positions only (replicated over TP).
        weight: ``[V/tp, T]`` this rank's vocab shard of the LM head (rows in rank order).
        target: int64 ``[N]`` global token ids (every entry is a real label).
        group: the tensor-parallel group the vocabulary is sharded over (None: no TP).
        chunk_logits: logits per block (``[N, chunk_logits / N]``; fp32: × 4 bytes).
        fuse_wgrad: accumulate the weight gradient straight into ``weight.main_grad`` (the
            head's ``gradient_accumulation_fusion``; ignored without ``main_grad``).

    Returns:
        float32 ``[N]``: ``logsumexp(logits) - logits[target]`` over the whole vocabulary.
    """
    if chunk_logits < 1:
        raise ValueError(f"model.loss_chunk_logits ({chunk_logits}) must be at least 1.")
    if hidden.dim() != 2 or target.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_linear_cross_entropy expects hidden [N, T] and target [N], "
                         f"got {tuple(hidden.shape)} and {tuple(target.shape)}.")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, target, group, chunk_logits,
                                            fuse_wgrad)
