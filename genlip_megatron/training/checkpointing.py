"""Training checkpoints on megatron.core.dist_checkpointing (torch_dist format).

The folder layout of ``save_dir`` (``iter_N``, ``.tmp``/``.old`` siblings, ``COMPLETE``,
``latest``), the crash-safe publish protocol and the rule for which checkpoint a save dir means
live in :mod:`genlip_megatron.training.checkpoint_layout`, shared with ``to-hf`` and the probes.
Resume follows that rule; a damaged checkpoint is refused naming the file, offering the
previous one; a transient read error is retried, never taken for damage; resuming an older
checkpoint keeps the newer finished ones aside.

What is sharded how:
- model / optimizer: megatron ShardedTensors; the distributed optimizer uses the
  ``fully_reshardable`` format, the one that reshards across TP/PP/DP and keeps Adam's ``step``
  (genlip_megatron/compat/optimizer.py). Loading under another TP/PP/DP layout works for both.
- RNG: one ShardedObject per (pp, tp, dp) rank; restored only when the layout is unchanged.
- data-loader state: one ShardedObject per data-parallel rank (TP/PP replicas hold the same
  stream); restored only when the data-parallel size is unchanged.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from genlip_megatron.config.training import CheckpointConfig
from genlip_megatron.training.checkpoint_layout import LATEST, TMP, CheckpointError, \
    checkpoint_step, finished_checkpoints, iteration_dir, prune_checkpoints, \
    publish_checkpoint, recover_interrupted_publish, remove_checkpoint, resolve_checkpoint, \
    sibling, supersede_checkpoint
from genlip_megatron.training.faults import maybe_inject

logger = logging.getLogger(__name__)

_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class DamagedCheckpoint(CheckpointError):
    """A finished checkpoint whose files cannot be read; names the checkpoint and the file."""

    def __init__(self, ckpt: Path, problem: str):
        self.ckpt = Path(ckpt)
        self.problem = problem
        super().__init__(f"checkpoint {ckpt} is damaged: {problem}")


TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT})
"""Read errors a network file system returns for a moment (a server failover, a stale NFS
handle, a timeout): retried, never taken for a damaged checkpoint."""
READ_ATTEMPTS = 4
"""Tries of a checkpoint read that fails with a transient error (delays 2, 4, 8 s: ~14 s)."""
READ_RETRY_DELAY_S = 2.0


class TransientReadError(CheckpointError):
    """A checkpoint read failed with a transient error (on this rank or another one)."""


def transient_cause(exc: BaseException) -> Optional[BaseException]:
    """The transient read error behind ``exc`` (itself, its causes/contexts, or a DCP
    ``CheckpointException``'s per-rank failures), or None."""
    stack, seen = [exc], set()
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, TransientReadError) or (
                isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS):
            return err
        stack += [err.__cause__, err.__context__]
        failures = getattr(err, "failures", None)   # DCP: {rank: exc or (exc, traceback)}
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def _describe_read_error(err: BaseException, ckpt: Path) -> str:
    where = getattr(err, "filename", None) or ckpt
    return f"{where}: {type(err).__name__}: {_first_line(err)}"


def with_read_retries(read, ckpt: Path):
    """``read()``, retried with back-off while it fails with a transient read error.

    After :data:`READ_ATTEMPTS` tries the error is raised as a one-line
    :class:`TransientReadError` naming the file: the checkpoint is not called damaged and no
    older one is taken in its place.
    """
    delay = READ_RETRY_DELAY_S
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except Exception as exc:  # noqa: BLE001 - only transient errors are retried
            cause = transient_cause(exc)
            if cause is None:
                raise
            what = _describe_read_error(cause, ckpt)
            if attempt == READ_ATTEMPTS:
                raise TransientReadError(
                    f"reading checkpoint {ckpt} failed {READ_ATTEMPTS} times with a transient "
                    f"file-system error ({what}); the checkpoint is not known to be damaged: "
                    "rerun when the file system is healthy.") from exc
            logger.warning("transient read error on checkpoint %s (attempt %d of %d: %s); "
                           "retrying in %.0f s.", ckpt, attempt, READ_ATTEMPTS, what, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _agree_on_problem(ckpt: Path) -> str:
    """:func:`diagnose_checkpoint` on every rank, agreed: the same outcome everywhere.

    One rank's damaged or transient read must not let the others go on into the loading
    collectives alone (a hang), nor make ranks fall back to different checkpoints.
    """
    try:
        mine = ("ok", diagnose_checkpoint(ckpt))
    except Exception as exc:  # noqa: BLE001 - every failure becomes an agreed outcome
        cause = transient_cause(exc)
        mine = (("transient", _describe_read_error(cause, ckpt)) if cause is not None else
                ("ok", f"it cannot be checked ({type(exc).__name__}: {_first_line(exc)})"))
    outcomes = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, mine)
    damaged = [text for kind, text in outcomes if kind == "ok" and text]
    if damaged:
        return damaged[0]
    transient = [text for kind, text in outcomes if kind == "transient"]
    if transient:
        raise TransientReadError(f"transient read error: {transient[0]}")
    return ""


def _warn_once(msg: str, *args) -> None:
    """A warning every rank would log alike: from rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning(msg, *args)


def diagnose_checkpoint(ckpt: Path) -> str:
    """The first damaged file of a finished checkpoint, described; "" when all look intact.

    Raises the OSError of a transient read failure (:data:`TRANSIENT_ERRNOS`) instead.
    Checks what a load reads before any tensor: ``metadata.json``, ``common.pt``, the DCP
    ``.metadata`` index, and that every shard file holds the bytes the index points into
    (a truncated ``.distcp`` is found here, not as an ``EOFError`` deep inside a load).
    """
    import json

    from torch.distributed.checkpoint import FileSystemReader

    try:
        maybe_inject("checkpoint:diagnose")
        json.loads((ckpt / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        if transient_cause(exc) is not None:
            raise   # retried by the caller, not a damaged file
        return f"metadata.json is unreadable ({type(exc).__name__})"
    try:
        index = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any other failure means the index is damaged
        if transient_cause(exc) is not None:
            raise
        return f".metadata (the shard index) is unreadable ({type(exc).__name__})"
    # megatron-core ≤ 0.18 writes the common state to common.pt; 0.19 stores it inside the
    # torch_dist files under "common_state/…" keys.
    if not (ckpt / "common.pt").is_file() and not any(
            key.split("/")[0] == "common_state" for key in index.state_dict_metadata):
        return "common.pt (the common state) is missing"
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = ckpt / name
        if not shard.is_file():
            return f"{name} is missing"
        if shard.stat().st_size < size:
            return f"{name} is truncated ({shard.stat().st_size} of ≥ {size} bytes)"
    return ""


def load_common(ckpt: Path) -> dict:
    """``common.pt`` of a checkpoint (config, layout, counters), or DamagedCheckpoint."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(str(ckpt))
    except BaseException as exc:  # noqa: BLE001 - torch.load/unpickling raise anything
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or transient_cause(exc):
            raise
        raise DamagedCheckpoint(ckpt, f"common.pt cannot be read ({type(exc).__name__}: "
                                f"{_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else ""


def saved_data_key(ckpt: Path) -> Optional[str]:
    """Which data-loader state a checkpoint holds: ``data_state_global`` (written with
    training.dp_invariant_data), ``data_state`` (per DP rank) or None."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    for key in ("data_state_global", "data_state"):
        if any(k == key or k.startswith(key + "/") for k in keys):
            return key
    return None


def check_resume_compatible(common: dict, current: dict, ckpt: Path) -> None:
    """Refuse, in one line with the fix, a resume whose optimizer state cannot be read back."""
    if "converted_from_hf" in common:
        raise CheckpointError(
            f"checkpoint {ckpt} is a weights-only checkpoint written by tools/convert_checkpoint.py"
            " from-hf (no optimizer or training state), so it cannot be resumed from "
            "checkpoint.save_dir; start from it with training.init_from="
            f"{ckpt.parent} and an empty checkpoint.save_dir.")
    key = "use_distributed_optimizer"
    saved = ((common.get("config") or {}).get("parallel") or {}).get(key)
    now = ((current.get("config") or current).get("parallel") or {}).get(key)
    if saved is not None and now is not None and saved != now:
        raise CheckpointError(
            f"checkpoint {ckpt} was saved with parallel.{key}={str(saved).lower()} but this run "
            f"sets {str(now).lower()}; the two store optimizer state differently and switching at"
            f" resume is not supported: set parallel.{key}={str(saved).lower()} to resume, or "
            f"start from its weights with training.init_from={ckpt} (fresh optimizer) and a new "
            "checkpoint.save_dir.")


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
    """The GenLIPMegatronModel inside a megatron DDP wrapper (checkpoint keys carry no ``module.``).

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
        self._resumed_step: Optional[int] = None
        """Step of the checkpoint resumed from while newer finished ones exist (else None):
        the first publish moves those aside (:meth:`_supersede_newer`)."""

    # ---------------------------------------------------------------- save
    def save(self, model_chunks: list, optimizer, scheduler, state: TrainingState,
             data_state: Optional[dict], config_dict: dict) -> Path:
        """Write ``iter_<step>`` atomically; returns its final path."""
        from megatron.core import dist_checkpointing

        if self.cfg.save_dir is None:
            raise RuntimeError("checkpoint.save_dir is not set; cannot save.")
        self._fire_fault("begin", state.step)
        self.finalize_pending(blocking=True)
        final = iteration_dir(self.cfg.save_dir, state.step)
        tmp = sibling(final, TMP)
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # dist_checkpointing needs the directory to exist
        dist.barrier()
        layout = Layout.current()
        sd = build_state_dict(model_chunks, optimizer, scheduler, state, data_state,
                              config_dict, layout, data_replicated=self.data_replicated)
        use_async = self._async_enabled()
        request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=use_async)
        if use_async:
            request.add_finalize_fn(lambda: self._publish(tmp, final))
            self._queue().schedule_async_request(request)
            return final
        self._fire_fault("after_shards", state.step)
        self._publish(tmp, final)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Publish tmp as final (crash-safe, :func:`publish_checkpoint`), prune old ones."""
        dist.barrier()
        if dist.get_rank() == 0:
            step = checkpoint_step(final)
            self._supersede_newer(final.parent)
            publish_checkpoint(tmp, final, fault=lambda point: self._fire_fault(point, step))
            self._prune(final.parent, keep=final)
        dist.barrier()
        logger.info("saved checkpoint %s", final)

    def _supersede_newer(self, save_dir: Path) -> None:
        """Before the first publish after resuming from an older checkpoint, move the newer
        finished ones aside (``iter_N.superseded-<time>``), never delete them.

        They belong to the abandoned line of training (the run fell back from a damaged one,
        or ``latest`` named an older one): republishing step N would replace ``iter_N``,
        pruning by step number could delete them, and a later newest-finished fallback must
        not mix the two lines. Rank 0 only.
        """
        if self._resumed_step is None:
            return
        for path in finished_checkpoints(save_dir):
            if checkpoint_step(path) > self._resumed_step:
                aside = supersede_checkpoint(path)
                logger.warning("kept %s aside as %s: this run resumed from step %d, so its "
                               "checkpoints replace the newer ones; that copy is never "
                               "pruned or resumed (delete it when no longer needed).",
                               path.name, aside.name, self._resumed_step)
        self._resumed_step = None

    def _prune(self, save_dir: Path, keep: Path) -> None:
        """Keep the newest ``keep_last`` finished checkpoints (and always ``keep``); remove
        incomplete ``.tmp`` saves. Runs right after ``keep`` was published, on rank 0."""
        prune_checkpoints(save_dir, keep, self.cfg.keep_last)

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()
        return self._async_queue

    def finalize_pending(self, blocking: bool = False) -> None:
        """Finish outstanding async saves (no-op for synchronous saves)."""
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    def _async_enabled(self) -> bool:
        """Async writes (forked writer process) only on GPU runs that ask for them."""
        return bool(self.cfg.async_save) and torch.cuda.is_available()

    def poll_async(self) -> None:
        """Publish finished async saves now; call once per step on EVERY rank.

        Non-blocking: one small all-reduce tells whether every rank's writer is done (megatron
        ``AsyncCallsQueue.maybe_finalize_async_calls``, as Megatron-LM's training loop does each
        iteration); if so, the ``.tmp`` → ``iter_N`` rename and the ``latest`` update happen
        now instead of at the next ``save()``. No-op without pending async saves.
        """
        if self._async_queue is not None and self._async_queue.get_num_unfinalized_calls():
            self._async_queue.maybe_finalize_async_calls(blocking=False)

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
        warning says what was skipped). Transient read errors (EIO, ESTALE, EAGAIN, ETIMEDOUT)
        are retried with back-off (:func:`with_read_retries`), every rank alike.
        """
        ckpt = resolve_checkpoint(path, warn=_warn_once)
        if ckpt is None:
            raise CheckpointError(f"no checkpoint at {path} (expected an iter_N directory or a "
                                  f"save dir with finished iter_N checkpoints).")
        return with_read_retries(
            lambda: self._load_once(ckpt, model_chunks, optimizer, scheduler,
                                    loader_state_template, config_dict, with_optimizer), ckpt)

    def _load_once(self, ckpt: Path, model_chunks: list, optimizer, scheduler,
                   loader_state_template: Optional[dict], config_dict: dict,
                   with_optimizer: bool) -> tuple[TrainingState, Optional[dict]]:
        """One try of :meth:`load` (every read happens before any state is set)."""
        problem = _agree_on_problem(ckpt)
        if problem:
            raise DamagedCheckpoint(ckpt, problem)
        common = load_common(ckpt)
        check_model_compatible(common.get("config") or {}, config_dict, ckpt)
        if with_optimizer:
            check_resume_compatible(common, config_dict, ckpt)
        layout = Layout.current()
        saved = common.get("layout", {})
        same_rng_layout = saved == layout.sizes()
        want_key = "data_state_global" if self.data_replicated else "data_state"
        data_key = saved_data_key(ckpt)
        data_ok = data_key == want_key and (self.data_replicated or saved.get("dp") == layout.dp)
        template = build_state_dict(
            model_chunks, optimizer if with_optimizer else None, scheduler, TrainingState(),
            loader_state_template if data_ok else None, config_dict, layout,
            is_loading=True, rng=same_rng_layout, with_optimizer=with_optimizer,
            data_replicated=self.data_replicated)
        drop_absent_extra_state(template, ckpt)
        loaded = _load_sharded(template, ckpt)
        for i, chunk in enumerate(model_chunks):
            load_model_state(unwrap_model(chunk), loaded[_model_key(i, len(model_chunks))])
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
            why = (f"training.dp_invariant_data changed (checkpoint holds {data_key})"
                   if data_key != want_key else
                   f"data-parallel size changed ({saved.get('dp')} → {layout.dp})")
            logger.warning("%s: the data loader restarts its stream from the seed instead of "
                           "resuming it.", why)
        ts = common["training_state"]
        state = TrainingState(ts["step"], ts["consumed_rows"], ts.get("extra", {}))
        logger.info("restored %s (step %d)", ckpt, state.step)
        return state, (loaded.get(want_key) if data_ok else None)

    # ---------------------------------------------------------------- resume
    def resume(self, model_chunks: list, optimizer, scheduler,
               loader_state_template: Optional[dict], config_dict: dict
               ) -> Optional[tuple[TrainingState, Optional[dict], Path]]:
        """Restore the run in ``checkpoint.save_dir``: (state, data state, checkpoint) or None
        for a fresh start.

        Finishes interrupted publications first; follows ``latest``, else (missing/damaged
        pointer) the newest finished checkpoint; never starts from scratch over finished
        checkpoints unless ``checkpoint.overwrite``; a damaged checkpoint is refused in one line
        offering the previous one (taken automatically with ``checkpoint.fallback_to_previous``).
        """
        save_dir = Path(self.cfg.save_dir)
        if dist.get_rank() == 0:
            recover_interrupted_publish(save_dir)
        dist.barrier()
        done, ckpt = self._decide_resume(save_dir)
        if ckpt is None:
            if not done and (save_dir / LATEST).exists():
                _warn_once("%s exists but %s holds no finished checkpoint: starting fresh.",
                           save_dir / LATEST, save_dir)
            self._start_over(save_dir, done)
            return None
        newer = [p for p in done if checkpoint_step(p) > checkpoint_step(ckpt)]
        if newer:
            _warn_once("%s names %s, but the newer finished %s exists; following the "
                       "pointer.", save_dir / LATEST, ckpt.name, newer[-1].name)
        while True:
            try:
                state, data_state = self.load(ckpt, model_chunks, optimizer, scheduler,
                                              loader_state_template, config_dict)
                if any(checkpoint_step(p) > checkpoint_step(ckpt) for p in done):
                    self._resumed_step = checkpoint_step(ckpt)
                return state, data_state, ckpt
            except DamagedCheckpoint as exc:
                ckpt = self._fallback(exc, done)

    def _decide_resume(self, save_dir: Path) -> tuple[list[Path], Optional[Path]]:
        """(finished checkpoints, the one to resume or None): decided by rank 0, broadcast.

        Each rank listing ``save_dir`` and reading ``latest`` itself could pick different steps
        (attribute caching on a shared file system, one rank's read error) and then load
        different steps or hang in the loading collectives; Megatron-LM likewise broadcasts
        the iteration it read. A failure on rank 0 is raised on every rank.
        """
        decision: list = [None]
        if dist.get_rank() == 0:
            try:
                done = finished_checkpoints(save_dir)
                ckpt = resolve_checkpoint(save_dir, warn=_warn_once) \
                    if self.cfg.resume and done else None
                decision = [("ok", [str(p) for p in done], str(ckpt) if ckpt else None)]
            except Exception as exc:   # noqa: BLE001 - re-raised on every rank below
                decision = [("error", exc, None)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        kind, value, ckpt = decision[0]
        if kind == "error":
            raise value
        return [Path(p) for p in value], (Path(ckpt) if ckpt else None)

    def _fallback(self, exc: "DamagedCheckpoint", done: list[Path]) -> Path:
        """The finished checkpoint before the damaged one, if allowed; else one-line refusal."""
        earlier = [p for p in done if checkpoint_step(p) < checkpoint_step(exc.ckpt)]
        if not earlier:
            raise CheckpointError(f"{exc}; no earlier finished checkpoint exists: repair it, or "
                                  "start over with checkpoint.overwrite: true and "
                                  "checkpoint.resume: false.") from exc
        prev = earlier[-1]
        if not self.cfg.fallback_to_previous:
            raise CheckpointError(f"{exc}; the previous finished checkpoint is {prev.name}: set "
                                  "checkpoint.fallback_to_previous: true to resume from it.") \
                from exc
        _warn_once("%s; resuming from the previous finished checkpoint %s "
                   "(checkpoint.fallback_to_previous).", exc, prev.name)
        return prev

    def _start_over(self, save_dir: Path, done: list[Path]) -> None:
        """A fresh start: refused over finished checkpoints unless checkpoint.overwrite, which
        then removes them (so pruning and ``latest`` cannot mix two runs)."""
        if not done:
            return
        names = ", ".join(p.name for p in done)
        if not self.cfg.overwrite:
            raise CheckpointError(
                f"checkpoint.resume is false but checkpoint.save_dir {save_dir} holds finished "
                f"checkpoints ({names}); set checkpoint.resume: true to continue them, "
                "checkpoint.overwrite: true to replace them, or choose another save_dir.")
        dist.barrier()
        if dist.get_rank() == 0:
            logger.warning("checkpoint.overwrite: removing %s from %s and starting over.",
                           names, save_dir)
            (save_dir / LATEST).unlink(missing_ok=True)
            for path in done:
                remove_checkpoint(path)
        dist.barrier()


def _load_sharded(template: dict, ckpt: Path) -> dict:
    """dist_checkpointing.load, with read failures reported as a DamagedCheckpoint.

    DCP wraps per-rank errors in ``CheckpointException``, a BaseException.
    """
    from megatron.core import dist_checkpointing

    try:
        maybe_inject("checkpoint:load")
        return dist_checkpointing.load(template, str(ckpt))
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or transient_cause(exc):
            raise   # transient: retried by CheckpointManager.load
        cause = exc
        failures = getattr(exc, "failures", None)  # CheckpointException: {rank: exception}
        if failures:
            cause = next(iter(failures.values()))
            if isinstance(cause, tuple):
                cause = cause[0]
        raise DamagedCheckpoint(ckpt, f"a shard cannot be read ({type(cause).__name__}: "
                                f"{_first_line(cause)})") from exc


_EXTRA_STATE_SUFFIX = "._extra_state"


def drop_absent_extra_state(template: dict, ckpt: Path) -> list[str]:
    """Remove from a load template the ``*._extra_state`` objects the checkpoint lacks.

    A checkpoint written by another implementation misses some: local modules save none for
    TE's final LayerNorm (an ops-based TE module with extra state), so ``training.init_from``
    of a CPU/local checkpoint into a TE model would fail in torch's load planner. Those modules
    keep their defaults (no FP8 metadata yet), like :func:`load_model_state` allows. Only model
    entries named ``*._extra_state`` are touched.

    Returns:
        The dropped object keys.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    # Metadata keys of objects are ShardedObject.unique_key ("<key>/shard_<offset>_<shape>").
    saved = {k.split("/shard_")[0] for k in load_sharded_metadata(str(ckpt)).keys()}
    dropped = []
    for name in [k for k in template if k == "model" or re.fullmatch(r"model\d+", k)]:
        for key, value in list(template[name].items()):
            if isinstance(value, ShardedObject) and value.key.endswith(_EXTRA_STATE_SUFFIX[1:]) \
                    and value.key not in saved:
                del template[name][key]
                dropped.append(value.key)
    if dropped:
        logger.info("checkpoint %s has no %s (written by another layer implementation); "
                    "those modules keep their defaults.", ckpt, ", ".join(sorted(set(dropped))))
    return dropped


def load_model_state(module: torch.nn.Module, state: dict) -> None:
    """``load_state_dict`` that tolerates only missing ``*._extra_state`` entries.

    Transformer Engine's ``DotProductAttention`` puts ``core_attention._extra_state`` (FP8
    metadata) in ``state_dict()``, but megatron's ``TEDotProductAttention.sharded_state_dict``
    does not save it, so a strict load of any TE checkpoint misses it. TE 2.6/2.11 drop that key
    in a load hook it announces it will remove; Megatron-LM and NeMo tolerate it themselves.
    Any other missing or unexpected key is still an error.

    Raises:
        RuntimeError: keys other than ``_extra_state`` are missing, or keys are unexpected.
    """
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint does not match the model: missing keys {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}, unexpected keys "
            f"{list(result.unexpected_keys)[:8]}; check model.* (variant, transformer_impl) "
            "against the checkpoint's config.")
    tolerated = len(result.missing_keys) - len(missing)
    if tolerated:
        logger.debug("checkpoint carries no _extra_state for %d module(s) (TE core attention); "
                     "they keep their defaults.", tolerated)


_ARCH_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "text_dim",
              "vocab_size", "patch_size", "num_channels")
_KNOB_DEFAULTS = {"gated_attention": True, "qk_layernorm": False}
"""Ablation knobs that change the weights; checkpoints written before them hold the default."""


def check_model_compatible(saved: dict, current: dict, ckpt: Path) -> None:
    """Refuse a checkpoint whose architecture differs from the configured model."""
    saved_model, cur_model = saved.get("model") or {}, current.get("model") or {}
    diff = [f"model.{k}: checkpoint {saved_model.get(k)} vs config {cur_model.get(k)}"
            for k in _ARCH_KEYS if k in saved_model and saved_model.get(k) != cur_model.get(k)]
    if saved_model:
        diff += [f"model.{k}: checkpoint {saved_model.get(k, d)} vs config {cur_model.get(k, d)}"
                 for k, d in _KNOB_DEFAULTS.items()
                 if saved_model.get(k, d) != cur_model.get(k, d)]
    if diff:
        raise CheckpointError(f"checkpoint {ckpt} does not match this model ({', '.join(diff)}); "
                           "load a checkpoint of the same variant or fix model.* in the config.")
