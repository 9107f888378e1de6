"""The GenLIP training loop on megatron-core: setup phases, ``train()`` and ``train_step()``.

Loss normalisation: every micro-batch returns (sum of token losses, number of loss tokens);
megatron (``calculate_per_token_loss``) sums both over micro-batches and data-parallel ranks and
divides the gradients by the GLOBAL loss-token count, so each text token weighs the same no
matter which rank or micro-batch holds it. The reference (VeOmni/FSDP) instead averages per
rank and then across ranks, which weighs tokens of short-caption ranks more.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from genlip_megatron.compat.wgrad import cpu_wgrad_accumulation_ready
from genlip_megatron.config import RunConfig
from genlip_megatron.data.batch import PackedBatch
from genlip_megatron.data.energon import resolve_data_config
from genlip_megatron.model.attention_probe import capture_attention_sink
from genlip_megatron.model.transformer_config import build_transformer_config
from genlip_megatron.training.agreement import agree_on_shards, agree_on_startup
from genlip_megatron.training.data_stream import build_microbatch_source
from genlip_megatron.training.checkpointing import CheckpointManager, TrainingState
from genlip_megatron.training.distributed import set_seeds
from genlip_megatron.training.faults import ENV as FAULT_ENV, maybe_inject
from genlip_megatron.training.flops import FlopDims, peak_flops_per_device, training_flops
from genlip_megatron.training.metrics import MetricLogger, RunTotals, memory_metrics
from genlip_megatron.training.optimizer_step import optimizer_step
from genlip_megatron.training.preemption import PreemptionGuard, StopCheckpointError
from genlip_megatron.training.tracking import new_run_id
from genlip_megatron.training.watchdog import HangWatchdog
from genlip_megatron.training.parallel import Topology, build_model_chunks, build_optimizer, \
    build_scheduler, configure_schedule_hooks, initialize_topology, num_microbatches, \
    resolve_distributed_optimizer, wrap_with_ddp

logger = logging.getLogger(__name__)


def _cpu_wgrad_fusion() -> bool:
    """Weight gradients straight into DDP's main_grad on CPU (``compat/wgrad.py``)."""
    return not torch.cuda.is_available() and cpu_wgrad_accumulation_ready()


class TrainingAborted(RuntimeError):
    """Raised when too many consecutive steps were skipped as non-finite or spiking."""


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(loss sum, loss-token count, report) of one micro-batch, for calculate_per_token_loss."""
    mask = loss_mask.reshape(-1).to(per_token_loss.device)
    loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, device: torch.device):
    """megatron forward_step: next micro-batch → model → (output, loss function)."""
    batch: PackedBatch = next(data_iterator).to(device, non_blocking=True)
    output = model(batch.tokens, batch.position_ids, batch.image_mask, batch.segment_ids,
                   batch.pixel_values, labels=batch.labels)
    return output, partial(loss_func, batch.loss_mask)


@dataclass
class StepResult:
    """What one optimizer step produced (loss/tokens are global; None when not on a log step)."""

    loss: float
    loss_tokens: int
    grad_norm: Optional[float]
    skipped: bool
    reason: str = ""


@dataclass
class RunSummary:
    """End-of-run facts (used for the final machine-readable line)."""

    steps: int = 0
    final_loss: float = float("nan")
    checkpoint: Optional[str] = None
    label_counts: Optional[torch.Tensor] = None
    """int64 histogram of every label id trained on, all data-parallel ranks, resumed history
    included (for the unigram baseline; see metrics.RunTotals)."""
    losses: list = field(default_factory=list)
    """(step, global loss, skipped) of every step run by this process."""
    stopped_early: str = ""
    """Why training stopped before train_steps (exit signal, time budget); "" when it did not."""
    val_loss: float = float("nan")
    """The last validation loss (``loss/val``; NaN when evaluation.interval is 0)."""
    eval_metrics: dict = field(default_factory=dict)
    """The checkpoint evaluators' metrics on the last saved checkpoint (logging rank)."""


CheckpointEvaluator = Callable[[int, str, Optional[dist.ProcessGroup]], dict]
"""``evaluator(step, checkpoint_path, group) -> {metric: value}`` ({} when it skips this step),
run after each save on every rank of the logging rank's data-parallel ``group`` (collective
over it: the evaluator spreads its work over those ranks and returns the same metrics on each);
built by ``run`` from ``genlip_megatron.evaluation``, which the trainer never imports."""


class Trainer:
    """Builds everything from a validated RunConfig and runs the loop."""

    def __init__(self, cfg: RunConfig, config_path: Optional[str] = None,
                 overrides: Optional[list[str]] = None,
                 checkpoint_evaluators: Sequence[CheckpointEvaluator] = ()):
        self.cfg = cfg
        self.checkpoint_evaluators = list(checkpoint_evaluators)
        self.config_dict = cfg.to_dict()
        self.preemption = PreemptionGuard(cfg.training.exit_signals,
                                          cfg.training.exit_duration_mins)
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        # ---- topology --------------------------------------------------------------
        self.topo: Topology = initialize_topology(cfg.parallel)
        # Resolved once; the saved config then records what ran (resume checks compare it).
        cfg.parallel.use_distributed_optimizer = resolve_distributed_optimizer(cfg.parallel,
                                                                               self.topo.dp)
        set_seeds(cfg.training.seed)
        self.n_micro = num_microbatches(cfg, self.topo)
        # ---- data -------------------------------------------------------------------
        data_cfg = agree_on_startup("reading the data sources",
                                    lambda: resolve_data_config(cfg.data.validate()))
        survey = agree_on_shards(data_cfg.sources)   # one shard partition for every rank
        self.loader = agree_on_startup("building the data loader", partial(
            build_microbatch_source, data_cfg, dp_invariant=cfg.training.dp_invariant_data,
            dp_rank=self.topo.dp_rank, dp_size=self.topo.dp,
            micro_batch_size=cfg.training.micro_batch_size, per_rank=self.n_micro,
            seed=cfg.training.seed, survey=survey))
        # ---- model + optimizer --------------------------------------------------------
        self.tconfig = build_transformer_config(cfg.model, cfg.parallel, cfg.precision,
                                               init_seed=cfg.training.seed)
        self.tconfig.calculate_per_token_loss = True
        self.tconfig.gradient_accumulation_fusion |= _cpu_wgrad_fusion()   # DDP-wrapped below
        self.model = wrap_with_ddp(build_model_chunks(self.tconfig, self.topo), self.tconfig,
                                   cfg.parallel)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.precision, cfg.parallel)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.scheduler,
                                         cfg.training.train_steps)
        configure_schedule_hooks(self.tconfig, self.model, self.optimizer, cfg.parallel)
        self._add_grad_sync_fault_point()
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.forward_backward = get_forward_backward_func()
        # ---- restore ----------------------------------------------------------------
        self.ckpt = CheckpointManager(cfg.checkpoint,
                                      data_replicated=cfg.training.dp_invariant_data)
        self.state = self._restore()
        self._restored_step = self.state.step
        # ---- metrics ----------------------------------------------------------------
        self.log_rank = dist.get_rank() == dist.get_world_size() - 1  # last PP stage
        self.metrics = MetricLogger(cfg.logging, self.log_rank, self.config_dict,
                                    cfg.training.train_steps, run_id=self._tracking_run_id())
        self.flop_dims = FlopDims.from_model_config(cfg.model)
        self.peak = None if cfg.precision.fp8 else peak_flops_per_device(cfg.logging.peak_tflops)
        self.summary = RunSummary(checkpoint=self.resumed_from,
                                  final_loss=self.state.extra.get("final_loss", float("nan")))
        self._probe_batch: Optional[PackedBatch] = None
        self._bad_streak = 0
        self._loss_ema: Optional[float] = None
        self._window = Counter()
        self._window_start = time.perf_counter()
        self.totals = RunTotals(self.state.extra, cfg.model.vocab_size)
        self.held_out = self._build_held_out()
        self._log_startup_summary(config_path, overrides or [])
        self.watchdog = HangWatchdog(cfg.training.hang_timeout_mins, dist.get_rank())

    def _add_grad_sync_fault_point(self) -> None:
        """Fault point ``grad_sync:N`` (training/faults.py) where megatron's schedule
        finalizes the gradients (the data-parallel all-reduce), so a drill can kill one rank
        while its peers wait in that all-reduce. Only wired when a drill asks for it."""
        if "grad_sync" not in os.environ.get(FAULT_ENV, ""):
            return
        finalize = self.tconfig.finalize_model_grads_func

        def finalize_with_fault_point(*args, **kwargs):
            maybe_inject(f"grad_sync:{self.state.step}")
            return finalize(*args, **kwargs)

        self.tconfig.finalize_model_grads_func = finalize_with_fault_point

    # ------------------------------------------------------------------------ restore
    def _restore(self) -> TrainingState:
        """Resume the run in checkpoint.save_dir, else initialise from training.init_from."""
        c, t = self.cfg.checkpoint, self.cfg.training
        self.resumed_from: Optional[str] = None
        if c.save_dir:
            resumed = self.ckpt.resume(self.model, self.optimizer, self.scheduler,
                                       self.loader.state_dict(), self.config_dict)
            if resumed is not None:
                state, data_state, ckpt = resumed
                if data_state is not None:
                    self._restore_loader(data_state, state.step)
                self.resumed_from = str(ckpt)
                return state
        if t.init_from:
            self.ckpt.load(t.init_from, self.model, None, None, None, self.config_dict,
                           with_optimizer=False)
            logger.info("initialised model weights from %s (fresh optimizer)", t.init_from)
        return TrainingState()

    def _restore_loader(self, data_state: dict, step: int) -> None:
        """The loader continues from the checkpoint; with data.reshard_on_resume a changed
        shard set restarts its streams re-seeded from ``step``. A refusal (the shards
        changed, the switch is off) is one ``error:`` line naming the switch, on every rank."""
        reshard_step = step if self.cfg.data.reshard_on_resume else None
        agree_on_startup("restoring the data loader state", lambda: self.loader.load_state_dict(
            data_state, reshard_step=reshard_step))

    def _tracking_run_id(self) -> str:
        """W&B/MLflow run id: drawn by rank 0 at a fresh start, broadcast, and saved with
        every checkpoint (TrainingState.extra), so a resumed run continues the same run."""
        extra = self.state.extra
        if "tracking_run_id" not in extra:
            box = [new_run_id() if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            extra["tracking_run_id"] = box[0]
        return extra["tracking_run_id"]

    # ------------------------------------------------------------------------ loop
    def train(self) -> RunSummary:
        """Run until training.train_steps; saves at intervals and at the end."""
        t, c = self.cfg.training, self.cfg.checkpoint
        for chunk in self.model:
            chunk.train()
        while self.state.step < t.train_steps:
            self.watchdog.beat(self.state.step, f"running step {self.state.step + 1} (data, "
                               "forward/backward, optimizer)")
            self.state.step += 1
            result = self.train_step()
            self.watchdog.beat(self.state.step, "finishing it (interval checkpoint, stop "
                               "agreement)")
            self.summary.losses.append((self.state.step, result.loss, result.skipped))
            if not result.skipped:  # kept in the checkpoint: a relaunched finished run reports it
                self.summary.final_loss = self.state.extra["final_loss"] = result.loss
            if c.save_dir and c.save_interval and self.state.step % c.save_interval == 0:
                self.save()
            if self._validation_due():
                self.summary.val_loss = self.validate()["loss/val"]
            self.ckpt.poll_async()  # publish a finished async save now, not at the next save
            maybe_inject(f"after_step:{self.state.step}")
            if self.preemption.should_stop(self.device) and self.state.step < t.train_steps:
                self.summary.stopped_early = self.preemption.reason
                logger.warning("stopping after step %d: %s", self.state.step,
                               self.summary.stopped_early)
                break
        if self.summary.stopped_early:
            self._save_at_stop()
        elif self._final_save_needed():
            self.save()
        self.ckpt.finalize_pending(blocking=True)
        self._sync_totals()
        self.watchdog.close()   # evaluation follows: not a training step
        self.summary.label_counts = self.state.extra["label_counts"]
        self.summary.steps = self.state.step
        return self.summary

    def _final_save_needed(self) -> bool:
        """Save at the end unless the interval just saved this step or nothing was trained
        since the restored checkpoint (a relaunched finished run rewrites nothing)."""
        c = self.cfg.checkpoint
        if not c.save_dir or (self.resumed_from and self.state.step == self._restored_step):
            return False
        return not c.save_interval or self.state.step % c.save_interval != 0

    def _save_at_stop(self) -> None:
        """The stop checkpoint; a failure becomes one line and status 1 (never 75), so the
        scheduler does not requeue a job that cannot write its checkpoint (full disk)."""
        try:
            if self._final_save_needed():
                self.save()
            self.ckpt.finalize_pending(blocking=True)
        except Exception as exc:   # noqa: BLE001 - any failure: the stop checkpoint is missing
            last = self.resumed_from if self.summary.checkpoint is None else \
                self.summary.checkpoint
            raise StopCheckpointError(
                f"stopped after step {self.state.step} ({self.summary.stopped_early}) but its "
                f"checkpoint could not be written in {self.cfg.checkpoint.save_dir} "
                f"({type(exc).__name__}: {exc}); not requeued: free space or fix permissions "
                f"there, then rerun (it resumes from {last or 'the start'}).") from exc

    def save(self) -> None:
        """Checkpoint everything needed for an exact resume."""
        for chunk in self.model:  # the overlapped param all-gather must finish first
            if self.cfg.parallel.overlap_param_gather:
                chunk.start_param_sync(force_sync=True)
        self._sync_totals()  # run totals (consumed, skipped, label histogram) go in the checkpoint
        self.watchdog.beat(self.state.step, "saving a checkpoint")
        path = self.ckpt.save(self.model, self.optimizer, self.scheduler, self.state,
                              self.loader.state_dict(), self.config_dict)
        self.summary.checkpoint = str(path)
        self._evaluate_checkpoint(str(path))

    @property
    def eval_group_member(self) -> bool:
        """This rank is in the logging rank's data-parallel group (same TP and PP coordinates
        as the last rank), the ranks that share the checkpoint evaluators' work."""
        return self.topo.is_last_stage and self.topo.tp_rank == self.topo.tp - 1

    def _evaluate_checkpoint(self, path: str) -> None:
        """Run the checkpoint evaluators on the checkpoint just saved, spread over the logging
        rank's data-parallel group; the other ranks go on and wait for them in the next step's
        collectives."""
        if not self.checkpoint_evaluators:
            return
        self.ckpt.finalize_pending(blocking=True)  # the evaluators read the finished files
        if not self.eval_group_member:
            return
        start = time.perf_counter()
        group = ps.get_data_parallel_group()
        metrics: dict[str, float] = {}
        for evaluate in self.checkpoint_evaluators:
            metrics.update(evaluate(self.state.step, path, group))
        if not metrics or not self.log_rank:
            return
        metrics["time/eval(s)"] = time.perf_counter() - start
        logger.info("evaluation step %d | %s", self.state.step, " | ".join(
            f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        self.metrics.log(metrics, self.state.step, console=False)
        self.summary.eval_metrics = metrics

    def train_step(self) -> StepResult:
        """fetch micro-batches → forward/backward → finite check → optimizer/LR step → log."""
        step, t = self.state.step, self.cfg.training
        start = time.perf_counter()
        batches = [next(self.loader) for _ in range(self.n_micro)]
        if self._probe_batch is None:
            self._probe_batch = batches[0]  # fixed attention-sink probe for the whole run
        data_iter = [iter(batches) for _ in self.model] if len(self.model) > 1 else iter(batches)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        seq_len = batches[0].tokens.shape[1]
        reports = self.forward_backward(
            forward_step_func=partial(forward_step, device=self.device),
            data_iterator=data_iter, model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.n_micro, seq_length=seq_len,
            micro_batch_size=t.micro_batch_size, decoder_seq_length=seq_len, forward_only=False)
        # Host sync every step: the skip decision needs the global loss on every rank.
        loss, tokens = self._global_loss(reports)
        reason = self._bad_reason(loss)
        grad_norm = None
        if not reason:
            ok, grad_norm = optimizer_step(self.optimizer)  # False: a non-finite gradient
            if ok:
                self.scheduler.step(increment=1)
            else:
                reason = "non-finite gradients"
        self.state.consumed_rows += t.global_batch_size
        self._track(batches, loss, reason, time.perf_counter() - start)
        if reason:
            self._on_bad_step(step, loss, reason)
        else:
            self._bad_streak = 0
            self._loss_ema = loss if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * loss
        if reason or step % self.cfg.logging.log_interval == 0 or step == t.train_steps:
            self._log(step, loss, tokens, grad_norm, reason)  # a skipped step: one record
        sink_every = self.cfg.logging.attention_sink_interval
        if sink_every and (step % sink_every == 0 or step == 1):
            self.metrics.log(self.attention_sink(), step, console=False)
        return StepResult(loss, tokens, grad_norm, bool(reason), reason)

    # ------------------------------------------------------------------------ evaluation
    def _build_held_out(self):
        """This rank's fixed held-out micro-batches (None when evaluation.interval is 0)."""
        e, t = self.cfg.evaluation, self.cfg.training
        if not e.interval:
            return None
        from genlip_megatron.data.heldout import build_held_out_batches

        held = build_held_out_batches(self.cfg.data, micro_batch_size=t.micro_batch_size,
                                      microbatches_per_rank=self.n_micro, iters=e.iters,
                                      dp_rank=self.topo.dp_rank, dp_size=self.topo.dp)
        if not held.iterations:
            raise ValueError(f"data.eval_sources cannot fill one global batch of "
                             f"{t.global_batch_size} rows of {self.cfg.data.max_seq_len} "
                             "tokens; add held-out shards or set evaluation.interval to 0.")
        return held

    def _validation_due(self) -> bool:
        every, step = self.cfg.evaluation.interval, self.state.step
        return bool(every) and (step % every == 0 or step == self.cfg.training.train_steps)

    def _forward_only(self, batches: list[PackedBatch]) -> list:
        """megatron's schedule with forward_only=True over ``batches`` (no grad, eval mode:
        no dropout or DropPath); the loss reports exist on the last pipeline stage only."""
        seq_len = batches[0].tokens.shape[1]
        multi = len(self.model) > 1
        for chunk in self.model:
            chunk.eval()
        try:
            with torch.no_grad():
                return self.forward_backward(
                    forward_step_func=partial(forward_step, device=self.device),
                    data_iterator=[iter(batches) for _ in self.model] if multi
                    else iter(batches), model=self.model if multi else self.model[0],
                    num_microbatches=len(batches), seq_length=seq_len,
                    micro_batch_size=batches[0].tokens.shape[0], decoder_seq_length=seq_len,
                    forward_only=True)
        finally:
            for chunk in self.model:
                chunk.train()

    def validate(self) -> dict[str, float]:
        """Validation loss on the held-out micro-batches: global loss sum / global loss tokens
        over every iteration and data-parallel rank, exactly as the training loss (collective:
        every rank calls it). Logged as ``loss/val`` and returned."""
        start = time.perf_counter()
        reports = [r for batches in self.held_out.iterations
                   for r in self._forward_only(batches)]
        loss, tokens = self._global_loss(reports)  # host sync: evaluation steps only
        m = {"loss/val": loss, "tokens/val": float(tokens),
             "time/val(s)": time.perf_counter() - start}
        if self.log_rank:
            logger.info("validation step %d | loss/val %.4f | %d loss tokens, %d rows | %.1fs",
                        self.state.step, loss, tokens, self.held_out.rows_total,
                        m["time/val(s)"])
        self.metrics.log(m, self.state.step, console=False)
        return m

    def attention_sink(self) -> dict[str, float]:
        """Attention mass on each sample's first image token, per layer, on the probe batch."""
        probe, layers = self._probe_batch, self.cfg.model.num_layers
        with capture_attention_sink(self.model, probe.segment_ids, probe.image_mask,
                                    layers) as stats:
            self._forward_only([probe])
        stats = stats.to(self.device)
        dist.all_reduce(stats, group=ps.get_tensor_model_parallel_group())    # heads
        dist.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())  # layers
        per_layer = (stats[:, 0] / stats[:, 1].clamp(min=1)).tolist()
        out = {f"attention_sink/layer_{i + 1:02d}": v for i, v in enumerate(per_layer)}
        out["attention_sink/first_image_token_mass"] = sum(per_layer) / len(per_layer)
        return out

    # ------------------------------------------------------------------------ helpers
    def _global_loss(self, reports: list) -> tuple[float, int]:
        """Global (sum loss / sum tokens) over micro-batches and DP, known on every rank."""
        from megatron.core import parallel_state as ps

        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.topo.is_last_stage:
            for report in reports:
                total += report["lm loss"].to(total)
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        if self.topo.pp > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(total, src=last, group=ps.get_pipeline_model_parallel_group())
        loss_sum, tokens = total.tolist()
        return (loss_sum / tokens if tokens > 0 else float("nan")), int(tokens)

    def _bad_reason(self, loss: float) -> str:
        if not math.isfinite(loss):
            return "non-finite loss"
        factor = self.cfg.training.spike_factor
        if factor > 0 and self._loss_ema is not None and loss > factor * self._loss_ema:
            return f"loss spike ({loss:.4f} > {factor} × running mean {self._loss_ema:.4f})"
        return ""

    def _on_bad_step(self, step: int, loss: float, reason: str) -> None:
        self._bad_streak += 1
        self.totals.add_skip()
        logger.warning("step %d skipped: %s (%d consecutive)", step, reason, self._bad_streak)
        if self._bad_streak >= self.cfg.training.max_bad_steps:
            raise TrainingAborted(
                f"stopping at step {step}: {self._bad_streak} consecutive skipped steps (last: "
                f"{reason}); inspect the data around this step, lower optimizer.lr, or resume "
                "from the last checkpoint.")

    def _track(self, batches: list[PackedBatch], loss: float, reason: str, seconds: float):
        """Accumulate host-side counters (batches are still on the host: no device sync)."""
        for b in batches:
            head_tokens = b.num_loss_tokens  # the LM head runs only where a label exists
            self.totals.add_batch(int(b.image_lens.numel()), b.num_real_tokens,
                                  training_flops(self.flop_dims, b.image_lens.tolist(),
                                                 b.text_lens.tolist(), head_tokens=head_tokens),
                                  b.labels)
        self._window["seconds"] += seconds
        self._window["steps"] += 1

    def _sync_totals(self) -> None:
        """Reduce the run totals over data parallel (collective: every rank calls it)."""
        from megatron.core import parallel_state as ps

        self.totals.sync(ps.get_data_parallel_group(), self.device)

    def _log(self, step: int, loss: float, tokens: int, grad_norm: Optional[float],
             skip_reason: str = "") -> None:
        self._sync_totals()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # timing sync point, log steps only
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        w = self.totals.take_window()
        per_device = w["flops"] / (self.topo.tp * self.topo.pp) / self.topo.dp / elapsed
        per_step = elapsed / max(self._window["steps"], 1)
        m = {"loss/global_avg": loss, "lr": self.optimizer.param_groups[0]["lr"],
             "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
             "tokens/loss": float(tokens), "throughput/samples_per_s": w["samples"] / elapsed,
             "throughput/tps": w["tokens"] / elapsed,
             "throughput/tflops_per_device": per_device / 1e12,
             "time/step(s)": per_step,
             "time/eta(s)": per_step * (self.cfg.training.train_steps - step),
             **self.totals.metrics(), **memory_metrics()}
        if skip_reason:
            m["train/skipped_step"] = 1.0
        if self.peak:
            m["mfu(%)"] = 100.0 * per_device / self.peak
        for reason, count in self.loader.counters().items():
            m[f"data/{reason}"] = float(count)
        self.metrics.log(m, step, note=skip_reason)
        self._window = Counter()
        self._window_start = time.perf_counter()

    def _log_startup_summary(self, config_path: Optional[str], overrides: list[str]) -> None:
        """What a Megatron user reads first: config, overrides, size, layout, data, resume."""
        from megatron.core import parallel_state as ps

        local = sum(p.numel() for chunk in self.model for p in chunk.parameters()
                    if getattr(p, "tensor_model_parallel", False) or self.topo.tp_rank == 0)
        count = torch.tensor([local], dtype=torch.float64, device=self.device)
        dist.all_reduce(count, group=ps.get_model_parallel_group())  # TP shards + PP stages
        if not self.log_rank:
            return
        c, t, p = self.cfg, self.cfg.training, self.topo
        sources = "; ".join(str(s.paths or f"{s.path} (energon)") for s in c.data.sources) \
            or "none"
        resume = (f"resumed from {self.resumed_from} at step {self.state.step}"
                  if self.resumed_from else
                  f"fresh start (weights from {t.init_from})" if t.init_from else "fresh start")
        lines = [f"config {config_path or '-'}; overrides: {' '.join(overrides) or 'none'}",
                 f"model {c.model.variant}: {count.item() / 1e6:.2f}M parameters, "
                 f"{c.model.num_layers} layers, hidden {c.model.hidden_size}, "
                 f"{c.precision.params_dtype}, attention {self.tconfig.prefix_attention_backend}"
                 f" (model.attention_backend: {c.model.attention_backend}), loss "
                 f"{self.tconfig.loss_impl}",
                 f"layout tp={p.tp} pp={p.pp} vpp={c.parallel.vpp} dp={p.dp} sp={c.parallel.sp} "
                 f"distributed_optimizer={c.parallel.use_distributed_optimizer}; batch "
                 f"micro={t.micro_batch_size} global={t.global_batch_size} "
                 f"microbatches/rank={self.n_micro} dp_invariant_data={t.dp_invariant_data}",
                 f"data {sources} (max_seq_len {c.data.max_seq_len})",
                 f"{resume}; training to step {t.train_steps}; checkpoints "
                 f"{c.checkpoint.save_dir or 'off'}"]
        for line in lines:
            logger.info("start-up: %s", line)

    def close(self) -> None:
        """Flush logs, wait for pending checkpoint writes, stop loader workers."""
        self.watchdog.close()
        self.ckpt.finalize_pending(blocking=True)
        self.preemption.close()
        self.metrics.close()
        self.loader.close()
