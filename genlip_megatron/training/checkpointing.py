"""Training checkpoints on megatron.core.dist_checkpointing (torch_dist format).

Layout of ``save_dir``::

    iter_0000100/        one finished checkpoint (model, optimizer, scheduler, RNG, data, counters)
    iter_0000200.tmp/    a save in progress (or one that crashed): never loaded, removed later
    latest               text file naming the newest finished checkpoint ("iter_0000200")

A save writes into ``iter_N.tmp``, and only after every rank has finished does rank 0 rename it
to ``iter_N`` and replace ``latest`` atomically (``os.replace``). A crash at any point therefore
leaves the previous checkpoint and pointer intact.

What is sharded how:
- model / optimizer: megatron ShardedTensors; the distributed optimizer uses the
  ``fully_reshardable`` format, the one that reshards across TP/PP/DP and keeps Adam's ``step``
  (megatron-core-on-cpu.md §3.3). Loading under another TP/PP/DP layout works for both.
- RNG: one ShardedObject per (pp, tp, dp) rank; restored only when the layout is unchanged.
- data-loader state: one ShardedObject per data-parallel rank (TP/PP replicas hold the same
  stream); restored only when the data-parallel size is unchanged.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from genlip_megatron.training.config import CheckpointConfig
from genlip_megatron.training.faults import maybe_inject

logger = logging.getLogger(__name__)

_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
LATEST = "latest"


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    """``save_dir/iter_000000N``."""
    return Path(save_dir) / f"iter_{step:07d}"


def finished_checkpoints(save_dir: str | Path) -> list[Path]:
    """Finished checkpoint directories, oldest first (``.tmp`` dirs excluded)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _ITER_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_ITER_RE.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Optional[Path]:
    """A checkpoint dir from either an ``iter_N`` dir or a save dir holding ``latest``."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if not (target / "metadata.json").is_file():
            raise RuntimeError(f"{pointer} names {target.name}, which is not a finished "
                               "checkpoint; restore it or delete the pointer to start over.")
        return target
    return None


@dataclass
class Layout:
    """The parallel coordinates that decide which per-rank state can be restored."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @classmethod
    def current(cls) -> "Layout":
        from megatron.core import parallel_state as ps

        return cls(ps.get_tensor_model_parallel_world_size(),
                   ps.get_pipeline_model_parallel_world_size(),
                   ps.get_data_parallel_world_size(),
                   ps.get_tensor_model_parallel_rank(),
                   ps.get_pipeline_model_parallel_rank(),
                   ps.get_data_parallel_rank())

    def sizes(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}


def get_rng_state() -> dict:
    """Every RNG that affects training: python, numpy, torch CPU/CUDA, megatron's tracker."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`get_rng_state`."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


@dataclass
class TrainingState:
    """What the loop needs to continue exactly: counters and the stateful pieces."""

    step: int = 0
    consumed_rows: int = 0
    extra: dict = field(default_factory=dict)


def unwrap_model(chunk):
    """The GenLIPModel inside a megatron DDP wrapper (checkpoint keys carry no ``module.``).

    Public API only (``megatron.core.utils.unwrap_model`` and the public wrapper classes, 0.16.1 …
    0.19.2), not the private ``_BaseDataParallel`` base class.
    """
    from megatron.core.distributed import DistributedDataParallel, FullyShardedDataParallel, \
        TorchFullyShardedDataParallel
    from megatron.core.utils import unwrap_model as mcore_unwrap_model

    return mcore_unwrap_model(chunk, (DistributedDataParallel, FullyShardedDataParallel,
                                      TorchFullyShardedDataParallel))


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _sharded_objects(layout: Layout, data_state: Optional[dict], rng: Optional[dict],
                     data_replicated: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    if rng is not None:
        out["rng_state"] = ShardedObject("rng_state", rng, (layout.pp, layout.tp, layout.dp),
                                         (layout.pp_rank, layout.tp_rank, layout.dp_rank),
                                         replica_id=0)
    if data_state is not None and data_replicated:
        # Every rank holds the same global-stream state: one copy, loadable by any layout.
        replica = (layout.tp_rank * layout.pp + layout.pp_rank) * layout.dp + layout.dp_rank
        out["data_state_global"] = ShardedObject("data_state_global", data_state, (1,), (0,),
                                                 replica_id=replica)
    elif data_state is not None:
        replica = layout.tp_rank * layout.pp + layout.pp_rank
        out["data_state"] = ShardedObject("data_state", data_state, (layout.dp,),
                                          (layout.dp_rank,), replica_id=replica)
    return out


def build_state_dict(model_chunks: list, optimizer, scheduler, state: TrainingState,
                     data_state: Optional[dict], config_dict: dict, layout: Layout,
                     is_loading: bool = False, rng: bool = True,
                     with_optimizer: bool = True, data_replicated: bool = False) -> dict:
    """The sharded state dict for save (or the template for load)."""
    sd: dict[str, Any] = {}
    for i, chunk in enumerate(model_chunks):
        sd[_model_key(i, len(model_chunks))] = unwrap_model(chunk).sharded_state_dict()
    if with_optimizer and optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                       metadata=_OPTIM_METADATA)
        if scheduler is not None:
            sd["opt_param_scheduler"] = scheduler.state_dict()
    sd.update(_sharded_objects(layout, data_state, get_rng_state() if rng else None,
                               data_replicated))
    sd["training_state"] = {"step": state.step, "consumed_rows": state.consumed_rows,
                            "extra": state.extra}
    sd["layout"] = layout.sizes()
    sd["config"] = config_dict
    sd["num_model_chunks"] = len(model_chunks)
    return sd


class CheckpointManager:
    """Atomic save / exact restore of training state, with keep-last-K pruning."""

    def __init__(self, cfg: CheckpointConfig, data_replicated: bool = False):
        self.cfg = cfg
        self.data_replicated = data_replicated
        self._async_queue = None

    # ---------------------------------------------------------------- save
    def save(self, model_chunks: list, optimizer, scheduler, state: TrainingState,
             data_state: Optional[dict], config_dict: dict) -> Path:
        """Write ``iter_<step>`` atomically; returns its final path."""
        from megatron.core import dist_checkpointing

        if self.cfg.save_dir is None:
            raise RuntimeError("checkpoint.save_dir is not set; cannot save.")
        self.finalize_pending(blocking=True)
        final = iteration_dir(self.cfg.save_dir, state.step)
        tmp = final.with_name(final.name + ".tmp")
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # dist_checkpointing needs the directory to exist
        dist.barrier()
        layout = Layout.current()
        sd = build_state_dict(model_chunks, optimizer, scheduler, state, data_state,
                              config_dict, layout, data_replicated=self.data_replicated)
        use_async = self.cfg.async_save and torch.cuda.is_available()
        request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=use_async)
        if use_async:
            request.add_finalize_fn(lambda: self._publish(tmp, final))
            self._queue().schedule_async_request(request)
            return final
        self._fire_fault("after_shards", state.step)
        self._publish(tmp, final)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename tmp → final, move the ``latest`` pointer, prune old checkpoints."""
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = final.parent / LATEST
            tmp_pointer = final.parent / (LATEST + ".tmp")
            tmp_pointer.write_text(final.name + "\n")
            os.replace(tmp_pointer, pointer)
            self._prune(final.parent, keep=final)
        dist.barrier()
        logger.info("saved checkpoint %s", final)

    def _prune(self, save_dir: Path, keep: Path) -> None:
        done = finished_checkpoints(save_dir)
        if self.cfg.keep_last > 0:
            for old in done[: max(0, len(done) - self.cfg.keep_last)]:
                if old != keep:
                    shutil.rmtree(old, ignore_errors=True)
        for stale in save_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()
        return self._async_queue

    def finalize_pending(self, blocking: bool = False) -> None:
        """Finish outstanding async saves (no-op for synchronous saves)."""
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    @staticmethod
    def _fire_fault(point: str, step: int) -> None:
        maybe_inject(f"checkpoint:{point}")
        maybe_inject(f"checkpoint:{point}:step={step}")

    # ---------------------------------------------------------------- load
    def load(self, path: str | Path, model_chunks: list, optimizer, scheduler,
             loader_state_template: Optional[dict], config_dict: dict,
             with_optimizer: bool = True) -> tuple[TrainingState, Optional[dict]]:
        """Restore into the built model/optimizer; returns (training state, data state or None).

        Works under a different TP/PP/DP layout than the one saved: model and optimizer are
        resharded; RNG and data-loader state are restored only when their layout matches (a
        warning says what was skipped).
        """
        from megatron.core import dist_checkpointing

        ckpt = resolve_checkpoint(path)
        if ckpt is None:
            raise RuntimeError(f"no checkpoint at {path} (expected an iter_N directory or a "
                               f"save dir with a '{LATEST}' file).")
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
        check_model_compatible(common.get("config") or {}, config_dict, ckpt)
        layout = Layout.current()
        saved = common.get("layout", {})
        same_rng_layout = saved == layout.sizes()
        data_ok = self.data_replicated or saved.get("dp") == layout.dp
        template = build_state_dict(
            model_chunks, optimizer if with_optimizer else None, scheduler, TrainingState(),
            loader_state_template if data_ok else None, config_dict, layout,
            is_loading=True, rng=same_rng_layout, with_optimizer=with_optimizer,
            data_replicated=self.data_replicated)
        loaded = dist_checkpointing.load(template, str(ckpt))
        for i, chunk in enumerate(model_chunks):
            unwrap_model(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))])
        if with_optimizer and optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if same_rng_layout:
            set_rng_state(loaded["rng_state"])
        else:
            logger.warning("checkpoint layout %s differs from the current %s: RNG state not "
                           "restored (model and optimizer were resharded).", saved, layout.sizes())
        if not data_ok and loader_state_template is not None:
            logger.warning("data-parallel size changed (%s → %d): the data loader restarts its "
                           "stream from the seed instead of resuming it.", saved.get("dp"),
                           layout.dp)
        ts = common["training_state"]
        state = TrainingState(ts["step"], ts["consumed_rows"], ts.get("extra", {}))
        logger.info("restored %s (step %d)", ckpt, state.step)
        key = "data_state_global" if self.data_replicated else "data_state"
        return state, (loaded.get(key) if data_ok else None)


_ARCH_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "text_dim",
              "vocab_size", "patch_size", "num_channels")


def check_model_compatible(saved: dict, current: dict, ckpt: Path) -> None:
    """Refuse a checkpoint whose architecture differs from the configured model."""
    saved_model, cur_model = saved.get("model") or {}, current.get("model") or {}
    diff = [f"model.{k}: checkpoint {saved_model.get(k)} vs config {cur_model.get(k)}"
            for k in _ARCH_KEYS if k in saved_model and saved_model.get(k) != cur_model.get(k)]
    if diff:
        raise RuntimeError(f"checkpoint {ckpt} does not match this model ({', '.join(diff)}); "
                           "load a checkpoint of the same variant or fix model.* in the config.")
