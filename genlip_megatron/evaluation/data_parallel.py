"""Evaluators spread over data-parallel ranks: a deterministic split and the reduction.

An evaluator that can be split exposes (see ``suite.SplitEvaluator``)

- ``num_items`` and ``batch_size``: its evaluation items (held-out images) and the block it
  processes at a time;
- ``partial(model, indices) -> state``: sufficient statistics over the given items, picklable
  (sums and counts, per-item predictions, generated captions keyed by item index);
- ``reduce(states) -> metrics``: the metrics from every rank's state (corpus-level metrics such
  as CIDEr-D are computed here, over the gathered captions of the whole set).

The items are cut into blocks of ``batch_size`` exactly as a single process would batch them,
and whole blocks are dealt round-robin to the ranks (block b → rank b mod W). Every block is
then computed with the same shapes as at DP = 1 and the states are reduced in block order, so
the metrics are bit-identical to the single-process ones for any number of ranks
(tests/multirank/test_evaluation_parallel.py). States are exchanged with
``all_gather_object`` (small: a few numbers per item), and every rank reduces them, so every
rank returns the same metrics.

An evaluator whose states are large (the probes' encoder features) sets
``reduce_on_last_rank = True``: the states are gathered to the group's last rank only, which
reduces them (trains the probe) and broadcasts the metrics.

An evaluator without ``partial`` (a plain ``evaluator(model) -> metrics``) still works: the
group's last rank runs it and broadcasts its metrics. The last rank because the trainer's
logging rank (the last global rank) is the last rank of its data-parallel group: an evaluator
with side products (the probe gallery's page and images) leaves them where they are logged.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch.distributed as dist

__all__ = ["BatchedEvaluator", "block_indices", "group_rank_and_size", "gather_states",
           "gather_states_to_last", "evaluate_spread", "ordered_blocks"]


def block_indices(num_items: int, block: int, rank: int, world: int) -> list[int]:
    """The item indices of ``rank``: blocks ``rank, rank + world, ...`` of ``block`` items.

    Args:
        num_items: items of the evaluator.
        block: its batch size (the last block may be shorter, as at DP = 1).
        rank, world: this rank's index in the evaluation group and the group size.
    """
    if block < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"block ({block}) and world ({world}) must be ≥ 1 and 0 ≤ rank "
                         f"({rank}) < world.")
    out: list[int] = []
    for start in range(rank * block, num_items, world * block):
        out.extend(range(start, min(start + block, num_items)))
    return out


def group_rank_and_size(group: Optional[Any]) -> tuple[int, int]:
    """(rank in ``group``, its size); (0, 1) without a group or a process group."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_states(state: Any, group: Optional[Any]) -> list[Any]:
    """Every rank's ``state``, in group-rank order (``[state]`` for a single process)."""
    _, size = group_rank_and_size(group)
    if size == 1:
        return [state]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, state, group=group)
    return out


def _last_global_rank(group: Any) -> int:
    return dist.get_global_rank(group, dist.get_world_size(group) - 1)


def _broadcast_from_last(obj: Any, group: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=_last_global_rank(group), group=group)
    return box[0]


def gather_states_to_last(state: Any, group: Optional[Any]) -> Optional[list[Any]]:
    """Every rank's ``state`` in group-rank order on the group's last rank, None elsewhere."""
    rank, size = group_rank_and_size(group)
    if size == 1:
        return [state]
    out: Optional[list[Any]] = [None] * size if rank == size - 1 else None
    dist.gather_object(state, out, dst=_last_global_rank(group), group=group)
    return out


def evaluate_spread(evaluator: Any, model: Any, group: Optional[Any] = None) -> dict:
    """``evaluator``'s metrics on ``model``, its items split over the ranks of ``group``.

    Collective over ``group``: every rank of it must call with the same evaluator (same
    items) and gets the same metrics. ``group`` None: this process evaluates everything.
    """
    rank, size = group_rank_and_size(group)
    if not hasattr(evaluator, "partial"):
        metrics = evaluator(model) if rank == size - 1 else None
        return metrics if size == 1 else _broadcast_from_last(metrics, group)
    indices = block_indices(evaluator.num_items, evaluator.batch_size, rank, size)
    state = evaluator.partial(model, indices)
    if getattr(evaluator, "reduce_on_last_rank", False):
        states = gather_states_to_last(state, group)
        metrics = evaluator.reduce(states) if states is not None else None
        return metrics if size == 1 else _broadcast_from_last(metrics, group)
    return evaluator.reduce(gather_states(state, group))


def ordered_blocks(states: Sequence[dict]) -> list:
    """The ``blocks`` entries of every state, in block (= single-process) order.

    States of the splittable evaluators hold ``{"blocks": [(first_index, ...), ...]}``.
    """
    return sorted((b for s in states for b in s["blocks"]), key=lambda b: b[0])


class BatchedEvaluator:
    """The split plumbing of an evaluator over ``samples``, ``batch_size`` at a time.

    A subclass (a dataclass with ``samples`` and ``batch_size``) implements
    ``block(model, batch, context) -> tuple`` (the statistics of one batch of item indices)
    and ``reduce(states)``, and may override ``context()`` (what every batch of a ``partial``
    call shares, computed once per call: the held-out samples' prompt); ``partial`` gives
    ``{"blocks": [(first_index, *block), ...]}`` and ``__call__`` is
    ``reduce([partial(model, every item)])``, the single-process path.
    """

    samples: Sequence[Any]
    batch_size: int

    @property
    def num_items(self) -> int:
        return len(self.samples)

    def context(self) -> Any:
        return None

    def block(self, model: Any, batch: list[int], context: Any) -> tuple:
        raise NotImplementedError

    def reduce(self, states: Sequence[dict]) -> dict:
        raise NotImplementedError

    def partial(self, model: Any, indices: Sequence[int]) -> dict:
        indices, context = list(indices), self.context()
        return {"blocks": [(indices[i], *self.block(model, indices[i:i + self.batch_size],
                                                    context))
                           for i in range(0, len(indices), self.batch_size)]}

    def __call__(self, model: Any) -> dict:
        return self.reduce([self.partial(model, range(self.num_items))])
