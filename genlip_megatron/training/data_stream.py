"""Micro-batch sources for the trainer.

By default each data-parallel rank reads its own shard streams (the data pipeline's sharding).
``training.dp_invariant_data`` instead makes every rank read the one global stream and keep its
slice of each global batch: the sequence of global batches is then the same for ANY
data-parallel size, so a DP=2 run reproduces the loss curve of a single-rank run with the same
global batch, and a resume under another DP size continues exactly. It costs DP× decoding, so
it is meant for small runs and parallel-equivalence tests.
"""

from __future__ import annotations

from typing import Iterator

from genlip_megatron.data.batch import PackedBatch


class GlobalStreamSlice:
    """Iterator over this rank's micro-batches cut from the global micro-batch stream.

    Every step the global stream yields ``dp_size × per_rank`` micro-batches; rank d keeps
    micro-batches ``[d·per_rank, (d+1)·per_rank)``.
    """

    def __init__(self, loader, dp_rank: int, dp_size: int, per_rank: int):
        self.loader = loader
        self.dp_rank, self.dp_size, self.per_rank = dp_rank, dp_size, per_rank
        self._pending: list[PackedBatch] = []

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        if not self._pending:
            step = [next(self.loader) for _ in range(self.dp_size * self.per_rank)]
            lo = self.dp_rank * self.per_rank
            self._pending = step[lo:lo + self.per_rank]
        return self._pending.pop(0)

    def state_dict(self) -> dict:
        """The global loader's state; only valid at step boundaries (nothing pending)."""
        if self._pending:
            raise RuntimeError("GlobalStreamSlice.state_dict() called in the middle of a step.")
        return self.loader.state_dict()

    def load_state_dict(self, state: dict, **kwargs) -> None:
        self.loader.load_state_dict(state, **kwargs)

    def counters(self) -> dict[str, int]:
        return self.loader.counters()

    def close(self) -> None:
        self.loader.close()


def build_microbatch_source(data_cfg, *, dp_invariant: bool, dp_rank: int, dp_size: int,
                            micro_batch_size: int, per_rank: int, seed: int, survey=None):
    """The trainer's micro-batch iterator (``state_dict``/``load_state_dict``/``counters``);
    ``survey``: the shard list every rank agreed on (``agreement.agree_on_shards``)."""
    from genlip_megatron.data.loader import build_train_loader

    if not dp_invariant:
        return build_train_loader(data_cfg, dp_rank=dp_rank, dp_size=dp_size,
                                  micro_batch_size=micro_batch_size, seed=seed, survey=survey)
    loader = build_train_loader(data_cfg, dp_rank=0, dp_size=1,
                                micro_batch_size=micro_batch_size, seed=seed, survey=survey)
    return GlobalStreamSlice(loader, dp_rank, dp_size, per_rank)
