"""The run configuration: ``RunConfig`` composes every section; YAML loading and validation.

Each section is a ``@dataclass(kw_only=True)`` in its own module of this package (``model``,
``parallel``, ``precision``, ``data``, ``training``). ``load_config()`` maps YAML 1:1 onto the
tree and :meth:`RunConfig.validate` holds every cross-section rule in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from genlip_megatron.config.data import DataConfig
from genlip_megatron.config.loader import ConfigError, apply_override, from_dict, load_yaml, \
    parse_override_value, to_dict
from genlip_megatron.config.model import ModelConfig, decode_variant, validate_model
from genlip_megatron.config.parallel import ParallelConfig, validate_batch, validate_parallel
from genlip_megatron.config.precision import PrecisionConfig, validate_fp8_te_alignment, \
    validate_precision
from genlip_megatron.config.training import CheckpointConfig, DemoConfig, EvalConfig, \
    LoggingConfig, OptimizerConfig, SchedulerConfig, TrainingConfig

__all__ = ["RunConfig", "config_from_dict", "load_config", "read_yaml_tree"]


@dataclass(kw_only=True)
class RunConfig:
    """Everything a run needs; YAML maps 1:1 onto this tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    demo: Optional[DemoConfig] = None
    """Set only by the CPU demo config: generate synthetic data if missing, print DEMO line."""

    def validate(self, world_size: Optional[int] = None, has_cuda: Optional[bool] = None,
                 has_te: Optional[bool] = None) -> "RunConfig":
        """Refuse impossible combinations with the reason and the fix; returns self."""
        if has_cuda is None:
            import torch

            has_cuda = torch.cuda.is_available()
        if has_te is None:
            from genlip_megatron.compat.te import transformer_engine_available

            has_te = transformer_engine_available()
        validate_model(self.model)
        validate_parallel(self.model, self.parallel, world_size)
        validate_precision(self.model, self.parallel, self.precision, has_cuda, has_te)
        validate_fp8_te_alignment(self.model, self.parallel, self.precision, self.data.max_seq_len,
                                  self.training.micro_batch_size)
        _validate_backends(self.model, self.parallel, has_cuda, has_te)
        self.data.validate()
        _validate_data_vs_model(self)
        for section in (self.optimizer, self.scheduler, self.training, self.checkpoint,
                        self.logging):
            section.validate()
        validate_batch(self.training, self.parallel, world_size)
        return self

    def to_dict(self) -> dict:
        """Plain-dict form (saved with checkpoints and logs)."""
        return to_dict(self)


def _validate_backends(m: ModelConfig, p: ParallelConfig, has_cuda: bool, has_te: bool) -> None:
    # has_te means "TE usable here": CUDA with real TE, or the CPU CI stand-in.
    if m.transformer_impl == "te" and not has_te:
        raise ConfigError("model.transformer_impl is 'te' but transformer_engine/CUDA is not "
                          "usable here; install the 'gpu' extra on a GPU machine or use 'local'.")
    if m.attention_backend == "te" and m.transformer_impl != "te":
        raise ConfigError("model.attention_backend 'te' needs model.transformer_impl: te.")


def _validate_data_vs_model(c: "RunConfig") -> None:
    if c.data.image.patch_size != c.model.patch_size:
        raise ConfigError(f"data.image.patch_size ({c.data.image.patch_size}) differs from "
                          f"model.patch_size ({c.model.patch_size}); set them equal.")
    if c.parallel.sp and c.data.max_seq_len % c.parallel.tp:
        raise ConfigError(f"data.max_seq_len ({c.data.max_seq_len}) must be divisible by "
                          f"parallel.tp ({c.parallel.tp}) under sequence parallelism.")
    if c.evaluation.caption_accuracy and not c.data.eval_sources and c.demo is None:
        raise ConfigError("evaluation.caption_accuracy is true but data.eval_sources is empty; "
                          "list held-out shards or disable the evaluation.")


def _merge_model_section(raw: dict) -> dict:
    """Expand ``model.variant`` into the preset's fields; explicit keys override the preset."""
    section = dict(raw.get("model") or {})
    preset = to_dict(decode_variant(section.get("variant", "tiny")))
    preset.update(section)
    return {**raw, "model": preset}


def config_from_dict(raw: dict) -> RunConfig:
    """Build a RunConfig from a plain dict (YAML content), expanding the model variant."""
    return from_dict(RunConfig, _merge_model_section(raw or {}))


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving ``base: other.yaml`` (relative to the file) recursively.

    The file's own keys override the base's, section by section; lists are replaced whole.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    if path in _seen:
        raise ConfigError(f"config 'base' chain loops: {' -> '.join(map(str, _seen + (path,)))}")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where} is not valid YAML "
                          f"({getattr(exc, 'problem', None) or type(exc).__name__}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at top level.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(read_yaml_tree(path.parent / base, _seen + (path,)), raw)


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load YAML at ``path`` (with its ``base:`` chain), apply ``key.sub=value`` overrides.

    Validation against the run environment is separate (:meth:`RunConfig.validate`), so a
    config can be inspected on a machine that cannot run it.
    """
    raw = read_yaml_tree(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set '{item}' must look like section.key=value.")
        apply_override(raw, key.strip(), parse_override_value(value, key.strip()))
    return config_from_dict(raw)

