"""Measured training memory per rank on CPU, by tensor accounting (for the planner's check).

RSS deltas are useless for a ±15 % check here (glibc keeps freed arenas, other threads allocate,
the data loader shares the process), and CPU torch has no ``max_memory_allocated``. Instead the
two parts the planner predicts are counted from the tensors themselves:

* **model state** (:func:`model_state_bytes`): the unique storages behind the parameters, the
  megatron DDP param/grad buffers and every tensor the optimizers hold (fp32 main params, Adam
  moments), each storage once.
* **activations** (:class:`SavedActivationMeter`): the storages autograd keeps for backward,
  tracked live through ``torch.autograd.graph.saved_tensors_hooks`` — a storage counts from the
  first time it is saved until the last saved reference to it is freed; model-state storages
  (weights saved by the linears) are excluded. Its peak over a forward/backward step is the
  activation peak (micro-batches in flight under pipeline schedules and the layer recomputed
  during backward included).

Peak = model state + activation peak. Transient workspaces (a GEMM output before it is saved,
gradients in flight) are not counted; the planner does not model them either.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Iterator

import torch

__all__ = ["model_state_bytes", "model_state_storages", "SavedActivationMeter"]


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def _inner_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        if isinstance(inner, torch.optim.Optimizer):
            yield inner


def model_state_storages(model_chunks: Iterable[torch.nn.Module], optimizer: Any = None
                         ) -> dict[int, int]:
    """``{storage data_ptr: nbytes}`` of params, DDP buffers and optimizer tensors."""
    found: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.nbytes():
            found[s.data_ptr()] = s.nbytes()

    for chunk in model_chunks:
        for p in chunk.parameters():
            add(p)
            if getattr(p, "main_grad", None) is not None:
                add(p.main_grad)
            if p.grad is not None:
                add(p.grad)
        ddp_buffers = [b for attr in ("buffers", "expert_parallel_buffers")
                       if isinstance(getattr(chunk, attr, None), list)
                       for b in getattr(chunk, attr)]       # megatron DDP param/grad buffers
        for buf in ddp_buffers:
            for name in ("param_data", "grad_data"):
                if getattr(buf, name, None) is not None:
                    add(getattr(buf, name))
    if optimizer is not None:
        for opt in _inner_optimizers(optimizer):
            for group in opt.param_groups:
                for p in group["params"]:
                    add(p)
            for t in _tensors_in(list(opt.state.values())):
                add(t)
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
                for t in _tensors_in(getattr(opt, name, [])):
                    add(t)
    return found


def model_state_bytes(model_chunks: Iterable[torch.nn.Module], optimizer: Any = None) -> int:
    """Bytes of the unique storages behind model state (see module docstring)."""
    return sum(model_state_storages(model_chunks, optimizer).values())


class _Held:
    """A saved tensor; tells the meter when autograd drops it."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: "SavedActivationMeter") -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedActivationMeter:
    """Context manager: live and peak bytes of the storages autograd saves for backward.

    Args:
        exclude: storage data_ptrs not to count (model state: weights saved by linears).
    """

    def __init__(self, exclude: Iterable[int] = ()) -> None:
        self.exclude = set(exclude)
        self.refs: Counter = Counter()
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        s = t.untyped_storage()
        key = s.data_ptr()
        if not s.nbytes() or key in self.exclude:
            return t
        if self.refs[key] == 0:
            self.sizes[key] = s.nbytes()
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Held(t, key, self)

    @staticmethod
    def _unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __enter__(self) -> "SavedActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
