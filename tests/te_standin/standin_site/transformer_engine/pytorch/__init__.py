"""``transformer_engine.pytorch`` stand-in (see the package docstring of ``transformer_engine``)."""

from transformer_engine.pytorch import distributed, fp8, module, ops, quantization, router, \
    tensor, utils  # noqa: F401
from transformer_engine.pytorch.attention import DotProductAttention  # noqa: F401
from transformer_engine.pytorch.distributed import CudaRNGStatesTracker, checkpoint  # noqa: F401
from transformer_engine.pytorch.module import GroupedLinear, LayerNorm, LayerNormLinear, \
    Linear, RMSNorm  # noqa: F401
from transformer_engine.pytorch.quantization import autocast, fp8_autocast, fp8_model_init, \
    get_default_recipe, is_fp8_available, quantized_model_init  # noqa: F401
from transformer_engine.pytorch.utils import get_cudnn_version, \
    get_device_compute_capability  # noqa: F401
