"""The bottom floor of the package: the YAML loader and every configuration section.

One module per section, each a ``@dataclass(kw_only=True)`` with a docstring under every field:
``model`` (presets, ``decode_variant``), ``parallel``, ``precision`` (FP8 rules), ``data``,
``training`` (optimizer, schedule, loop, checkpoints, logging, evaluation), and ``run_config``
(``RunConfig`` composing them, ``load_config``, cross-section validation). ``loader`` maps YAML
onto dataclasses. Nothing here imports any other part of ``genlip_megatron`` except ``compat``
(docs/design.md, "Package layers"; enforced by the import-linter contracts in
``.importlinter``).
"""

from genlip_megatron.config.data import DEFAULT_PROMPT, DataConfig, ImageConfig, PackingConfig, \
    ReaderConfig, SourceConfig, TextConfig
from genlip_megatron.config.loader import ConfigError, from_dict, to_dict
from genlip_megatron.config.model import QWEN3_VOCAB, VARIANTS, ModelConfig, decode_variant
from genlip_megatron.config.parallel import ParallelConfig, RecomputeConfig, microbatch_count
from genlip_megatron.config.precision import Fp8Config, PrecisionConfig, fp8_alignment
from genlip_megatron.config.run_config import RunConfig, config_from_dict, load_config, \
    read_yaml_tree
from genlip_megatron.config.training import CheckpointConfig, DemoConfig, EvalConfig, \
    LoggingConfig, OptimizerConfig, SchedulerConfig, TrainingConfig

__all__ = [
    "CheckpointConfig", "ConfigError", "DEFAULT_PROMPT", "DataConfig", "DemoConfig", "EvalConfig",
    "Fp8Config", "ImageConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
    "PackingConfig", "ParallelConfig", "PrecisionConfig", "QWEN3_VOCAB", "ReaderConfig",
    "RecomputeConfig", "RunConfig", "SchedulerConfig", "SourceConfig", "TextConfig",
    "TrainingConfig", "VARIANTS", "config_from_dict", "decode_variant", "fp8_alignment",
    "from_dict", "load_config", "microbatch_count", "read_yaml_tree", "to_dict",
]
