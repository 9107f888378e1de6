"""Training-side config sections: optimizer, LR schedule, loop, checkpoints, logging."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal, Optional

from genlip_megatron.config.loader import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW as in the reference recipe (VeOmni build_optimizer defaults)."""

    lr: float = 1e-3
    """Peak learning rate (stage 1: 1e-3, stage 2: 1e-4)."""
    min_lr: float = 1e-6
    """Floor of the cosine decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay; the reference decays every parameter."""
    decay_norm_and_bias: bool = True
    """Apply weight decay to LayerNorm, biases and LayerScale too (reference: yes)."""
    adam_beta1: float = 0.9
    """Adam β1."""
    adam_beta2: float = 0.95
    """Adam β2."""
    adam_eps: float = 1e-8
    """Adam ε."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def validate(self) -> "OptimizerConfig":
        """Signs and order of the learning rates and decay; raises ConfigError."""
        _require(self.lr > 0, f"optimizer.lr ({self.lr}) must be > 0, e.g. 1e-3.")
        _require(self.min_lr >= 0, f"optimizer.min_lr ({self.min_lr}) must be ≥ 0.")
        _require(self.min_lr <= self.lr, f"optimizer.min_lr ({self.min_lr}) must not exceed "
                 f"optimizer.lr ({self.lr}); lower min_lr (the floor of the decay).")
        _require(self.weight_decay >= 0, f"optimizer.weight_decay ({self.weight_decay}) must be "
                 "≥ 0 (0 disables it).")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
                 f"optimizer.adam_beta1/adam_beta2 ({self.adam_beta1}, {self.adam_beta2}) must "
                 "be in [0, 1).")
        _require(self.adam_eps > 0, f"optimizer.adam_eps ({self.adam_eps}) must be > 0.")
        _require(self.clip_grad >= 0, f"optimizer.clip_grad ({self.clip_grad}) must be ≥ 0 "
                 "(0 disables clipping).")
        return self


@dataclass(kw_only=True)
class SchedulerConfig:
    """Linear warmup then cosine decay (megatron OptimizerParamScheduler)."""

    warmup_fraction: float = 0.007
    """Warmup steps as a fraction of training.train_steps (used when warmup_steps is None)."""
    warmup_steps: Optional[int] = None
    """Explicit warmup steps; overrides warmup_fraction."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """LR decay after warmup."""

    def validate(self) -> "SchedulerConfig":
        """Warmup within range; raises ConfigError."""
        _require(0 <= self.warmup_fraction <= 1, f"scheduler.warmup_fraction "
                 f"({self.warmup_fraction}) must be in [0, 1].")
        _require(self.warmup_steps is None or self.warmup_steps >= 0,
                 f"scheduler.warmup_steps ({self.warmup_steps}) must be ≥ 0 or null.")
        return self


@dataclass(kw_only=True)
class TrainingConfig:
    """The training loop."""

    train_steps: int = 100
    """Optimizer steps to run."""
    micro_batch_size: int = 1
    """Packed rows per micro-batch per data-parallel rank."""
    global_batch_size: int = 1
    """Packed rows per optimizer step over all data-parallel ranks."""
    seed: int = 1234
    """Seed for init, DropPath and the data order."""
    init_from: Optional[str] = None
    """Checkpoint to initialise model weights from (stage 2 from stage 1); optimizer is fresh."""
    max_bad_steps: int = 3
    """Stop after this many consecutive skipped (non-finite or spiking) steps."""
    spike_factor: float = 0.0
    """Skip a step whose loss exceeds this × the running mean (0 disables spike detection)."""
    dp_invariant_data: bool = False
    """Every data-parallel rank reads the global sample stream and keeps its slice, so the
    global batches do not depend on the DP size (parallel-equivalence tests, exact resume under
    a new DP size); costs DP× decoding."""
    exit_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"]] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank stop after the current step, save a checkpoint and exit
    with status 75 (Slurm sends SIGTERM on preemption/scancel, `--signal=USR1@T` before the
    time limit); [] keeps Python's default handling."""
    exit_duration_mins: Optional[float] = None
    """Stop the same way once the process has run this many minutes (wall clock, from process
    start); set it a few checkpoint-durations below the job's time limit. None disables."""
    hang_timeout_mins: Optional[float] = None
    """When a rank makes no step progress for this many minutes (stuck in a collective, a hung
    read, a stopped loader worker), every rank dumps its Python stacks to the log and exits
    with status 76 (training/watchdog.py); must exceed the slowest step and checkpoint save.
    None disables."""

    def validate(self) -> "TrainingConfig":
        """Counts and sizes of the loop; raises ConfigError."""
        _require(self.train_steps >= 0, f"training.train_steps ({self.train_steps}) must be "
                 "≥ 0.")
        _require(self.micro_batch_size >= 1, f"training.micro_batch_size "
                 f"({self.micro_batch_size}) must be ≥ 1.")
        _require(self.global_batch_size >= 1, f"training.global_batch_size "
                 f"({self.global_batch_size}) must be ≥ 1.")
        _require(self.max_bad_steps >= 1, f"training.max_bad_steps ({self.max_bad_steps}) must "
                 "be ≥ 1.")
        _require(self.spike_factor == 0 or self.spike_factor > 1, f"training.spike_factor "
                 f"({self.spike_factor}) must be 0 (off) or > 1.")
        _require(self.hang_timeout_mins is None or self.hang_timeout_mins > 0,
                 f"training.hang_timeout_mins ({self.hang_timeout_mins}) must be > 0 or null "
                 "(off); make it longer than the slowest step and checkpoint save.")
        _require(self.exit_duration_mins is None or self.exit_duration_mins > 0,
                 f"training.exit_duration_mins ({self.exit_duration_mins}) must be > 0 or null "
                 "(≤ 0 would stop every requeued job after one step); set it a few checkpoint "
                 "durations below the job's time limit.")
        return self


@dataclass(kw_only=True)
class CheckpointConfig:
    """megatron.core.dist_checkpointing checkpoints."""

    save_dir: Optional[str] = None
    """Directory for iter_XXXXXXX checkpoints and the `latest` pointer; None disables saving."""
    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    resume: bool = True
    """Resume from save_dir/latest (or the newest finished checkpoint when the pointer is
    missing or damaged) when save_dir holds finished checkpoints."""
    overwrite: bool = False
    """Allow a fresh start (resume: false) over finished checkpoints in save_dir, removing them;
    without it such a start is refused."""
    fallback_to_previous: bool = False
    """When the checkpoint to resume is damaged, resume from the previous finished one (logged)
    instead of stopping with a message naming the damaged file."""

    def validate(self) -> "CheckpointConfig":
        """Intervals and counts; raises ConfigError."""
        _require(self.save_interval >= 0, f"checkpoint.save_interval ({self.save_interval}) "
                 "must be ≥ 0 (0: save only at the end).")
        _require(self.keep_last >= 0, f"checkpoint.keep_last ({self.keep_last}) must be ≥ 0 "
                 "(0 keeps every checkpoint).")
        return self
    async_save: bool = False
    """Asynchronous save (GPU only)."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Console, TensorBoard and Weights & Biases logging."""

    log_interval: int = 10
    """Log every N steps."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard event directory; None disables."""
    wandb_project: Optional[str] = None
    """Weights & Biases project; None disables (docs/tracking.md)."""
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None
    """W&B mode; offline writes the run under wandb_dir with no network (``wandb sync`` it
    later). None: W&B's default (the WANDB_MODE variable, else online)."""
    wandb_flush_interval_s: float = 2.0
    """Seconds between W&B's writes of its run file; a killed run loses at most this much
    of its W&B history (W&B's own default is 15 s)."""
    wandb_dir: Optional[str] = None
    """Directory for W&B's files (``<dir>/wandb/``); None: W&B's default (the working dir)."""
    mlflow_tracking_uri: Optional[str] = None
    """MLflow tracking URI: a file store (``file:///abs/path/mlruns``) or a tracking server
    (``http://host:5000``); None disables."""
    mlflow_experiment: str = "genlip"
    """MLflow experiment the run is logged under (created when missing)."""
    run_name: Optional[str] = None
    """Display name of the run in W&B and MLflow (None: the tracker picks one)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the run in W&B and MLflow (and TensorBoard's text tab)."""
    jsonl_path: Optional[str] = None
    """Append every logged metric dict to this JSON-lines file; None disables."""
    attention_sink_interval: int = 0
    """Measure the attention-sink metric on a probe batch every N steps (0 disables)."""
    peak_tflops: Optional[float] = None
    """Per-device peak TFLOP/s for MFU; None: detect the GPU (no MFU on CPU or under FP8)."""

    def validate(self) -> "LoggingConfig":
        """Intervals; raises ConfigError."""
        _require(self.log_interval >= 1, f"logging.log_interval ({self.log_interval}) must be "
                 "≥ 1.")
        _require(self.attention_sink_interval >= 0, f"logging.attention_sink_interval "
                 f"({self.attention_sink_interval}) must be ≥ 0 (0 disables it).")
        for key, module in (("wandb_project", "wandb"), ("mlflow_tracking_uri", "mlflow")):
            # checked on every rank before anything starts (only the logging rank imports it)
            _require(not getattr(self, key) or importlib.util.find_spec(module) is not None,
                     f"logging.{key} is set but {module} is not installed; `pip install "
                     f"{module}` or unset logging.{key}.")
        return self


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation on data.eval_sources: validation loss in the loop, greedy captions at
    the end."""

    interval: int = 0
    """Validation loss every N optimizer steps, and after the last step (0 disables); the
    held-out rows are the same at every evaluation (data/heldout.py)."""
    iters: int = 10
    """Global batches (training.global_batch_size rows each) per validation-loss evaluation,
    as Megatron's eval_iters; fewer when the held-out set is smaller (logged)."""

    caption_accuracy: bool = False
    """At the end of training, greedy-caption the held-out images and report the exact-match
    rate (lower-cased, whitespace and periods collapsed)."""
    max_samples: int = 200
    """Held-out images to caption."""
    max_new_tokens: int = 48
    """Generation budget per caption."""
    batch_size: int = 16
    """Images decoded together."""
    suite: bool = False
    """Run the evaluator suite (caption loss/perplexity, greedy exact match, CIDEr-D; on the
    demo also zero-shot) on saved checkpoints: every suite_interval steps and the last one, on
    the logging rank (docs/evaluation.md); the same numbers as tools/evaluate.py."""
    suite_interval: int = 0
    """Evaluate the checkpoints saved at multiples of this step (0: only the final one); a
    step without a save is not evaluated."""
    probe_train_samples: int = 0
    """Suite: train split of the attentive and segmentation probes, the first N samples of
    data.sources (file order) with a class label (cls) / mask (seg.png); the held-out samples
    are the test split (0: no probes)."""
    sink_samples: int = 0
    """Suite: held-out samples whose attention-sink mass per layer is measured (sink/*; 0: off)."""
    gallery_images: int = 0
    """Suite: the first N held-out images with their generated captions and patch-readout
    pictures, as TensorBoard images and one HTML page per evaluation (0: off)."""

    def validate(self) -> "EvalConfig":
        """Intervals and counts; raises ConfigError."""
        _require(self.interval >= 0, f"evaluation.interval ({self.interval}) must be ≥ 0 (0 "
                 "disables the validation loss).")
        _require(self.iters >= 1, f"evaluation.iters ({self.iters}) must be ≥ 1.")
        _require(self.suite_interval >= 0, f"evaluation.suite_interval ({self.suite_interval})"
                 " must be ≥ 0 (0: the final checkpoint only).")
        for key in ("probe_train_samples", "sink_samples", "gallery_images"):
            _require(getattr(self, key) >= 0, f"evaluation.{key} ({getattr(self, key)}) must be "
                     "≥ 0 (0 turns it off).")
        return self


@dataclass(kw_only=True)
class DemoConfig:
    """Self-contained CPU demo: synthetic data generated on first use, a summary line at the end."""

    data_dir: str = "data/demo"
    """Where the synthetic shards and tokenizer are written (generated only if missing)."""
    num_train: int = 4000
    """Synthetic training samples."""
    num_eval: int = 200
    """Held-out synthetic samples."""
    seed: int = 0
    """Generator seed."""
    vocab_size: int = 512
    """Size of the tiny BPE trained on the synthetic captions (≤ model.vocab_size)."""
    p_two: float = 0.3
    """Probability that an image holds a second shape."""
    p_word: float = 0.1
    """Probability that an image carries a rendered word."""
    min_side: int = 64
    """Smallest long side of the generated images (pixels; the fixed policy resizes them)."""
    max_side: int = 192
    """Largest long side of the generated images."""
