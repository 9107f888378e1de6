"""CPU stand-ins for the CUDA calls that megatron-core's local (non-TE) path makes unconditionally.

On a CPU-only torch build every ``torch.cuda`` function below can only raise ("Torch not compiled
with CUDA enabled"); after these patches they address the CPU device, the CPU generator and a
no-op stream. ``torch.cuda.is_available()`` stays False, so code that asks (ours, TE guards) still
sees a CPU machine. Found by removing one group at a time (docs/design.md, CPU workarounds); each
group
has a unit test in tests/unit/compat/test_compat_cuda.py that shows the upstream
failure without it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch

from genlip_megatron.compat._patching import PatchSet, ScopedAttr, import_or_none, \
    rebind_function, resolve, wrap_callable

_CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# device
# ---------------------------------------------------------------------------------------------

def patch_current_device(patches: PatchSet) -> None:
    """``torch.cuda.current_device()`` → ``torch.device("cpu")``.

    Covers ``device=torch.cuda.current_device()`` in megatron-core, first hit in
    ``core/utils.py GlobalMemoryBuffer.get_tensor`` (DotProductAttention's score buffer), then in
    ``distributed/param_and_grad_buffer.py`` and ``optimizer/distrib_optimizer.py``.

    TODO(upstream): remove when megatron-core takes the device from its tensors/config instead of
    assuming CUDA (still present in 0.19.2).
    """
    patches.setattr(torch.cuda, "current_device", lambda: _CPU)


# ---------------------------------------------------------------------------------------------
# rng
# ---------------------------------------------------------------------------------------------

def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def patch_cuda_rng(patches: PatchSet) -> None:
    """The "CUDA" RNG of megatron's tracker becomes the CPU default generator.

    Covers ``tensor_parallel/random.py`` ``_get_cuda_rng_state``/``_set_cuda_rng_state``,
    ``CudaRNGStatesTracker.add`` and ``model_parallel_cuda_manual_seed`` (``torch.cuda.
    get_rng_state``/``manual_seed``), and the tracker ``fork()`` that DotProductAttention enters
    even with dropout 0. On CPU, dropout draws from the CPU generator, so forking *that* state is
    what keeps the tracker's semantics (per-TP-rank streams, recompute replays the same masks).

    TODO(upstream): remove when megatron-core's RNG tracker supports non-CUDA generators.
    """
    random = import_or_none("megatron.core.tensor_parallel.random")
    if random is not None:
        patches.setattr(random, "_get_cuda_rng_state", _cpu_get_rng_state)
        patches.setattr(random, "_set_cuda_rng_state", _cpu_set_rng_state)
    patches.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    patches.setattr(torch.cuda, "set_rng_state", lambda new_state, device="cuda":
                    torch.set_rng_state(new_state))
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (left alone): no recursion.
    patches.setattr(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
    # CudaRNGStatesTracker.fork() warns when the CPU generator moved inside the fork; here the
    # forked "CUDA" state IS the CPU generator, so every draw inside (DropPath, dropout) tripped
    # it: 16 false warnings per step. Drop exactly that message from megatron's logger.
    tracker_logger = logging.getLogger("megatron.core.tensor_parallel.random")
    patches.setattr(tracker_logger, "filters", [*tracker_logger.filters, _CpuForkWarningFilter()])


class _CpuForkWarningFilter(logging.Filter):
    """Rejects megatron's "CPU RNG state changed within GPU RNG context" (a false alarm on CPU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


# ---------------------------------------------------------------------------------------------
# sync and streams
# ---------------------------------------------------------------------------------------------

def patch_synchronize(patches: PatchSet) -> None:
    """``torch.cuda.synchronize()`` → no-op (CPU ops are synchronous).

    Covers ``pipeline_parallel/p2p_communication.py`` (after every p2p exchange) and
    ``dist_checkpointing/strategies/filesystem_async.py preload_tensors`` (every torch_dist save).

    TODO(upstream): remove when megatron-core guards synchronize() by device.
    """
    patches.setattr(torch.cuda, "synchronize", lambda device=None: None)


class CpuEvent:
    """Inert stand-in for ``torch.cuda.Event`` (CPU work is complete when it returns)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self.enable_timing = enable_timing

    def record(self, stream: Any = None) -> None:
        """No-op."""

    def wait(self, stream: Any = None) -> None:
        """No-op."""

    def query(self) -> bool:
        """Always complete."""
        return True

    def synchronize(self) -> None:
        """No-op."""

    def elapsed_time(self, end_event: "CpuEvent") -> float:
        """Always 0 ms (use host timers on CPU)."""
        return 0.0


class CpuStream:
    """Inert stand-in for ``torch.cuda.Stream`` (there is one in-order CPU "stream")."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, stream: Any) -> None:
        """No-op."""

    def wait_event(self, event: Any) -> None:
        """No-op."""

    def record_event(self, event: Any = None) -> CpuEvent:
        """Return a completed event."""
        return event if event is not None else CpuEvent()

    def query(self) -> bool:
        """Always idle."""
        return True

    def synchronize(self) -> None:
        """No-op."""


_DEFAULT_STREAM = CpuStream()


def patch_streams(patches: PatchSet) -> None:
    """``torch.cuda.Stream/Event/current_stream/default_stream/stream`` → inert CPU versions.

    Covers ``distributed/param_and_grad_buffer.py start_grad_sync`` (``torch.cuda.
    current_stream()``, megatron-core ≥ 0.17; 0.16.1 only touches streams with overlap enabled)
    and the ``torch.cuda.stream(...)`` contexts of the overlapped DDP/optimizer paths.

    TODO(upstream): remove when megatron-core's DDP uses device-generic streams.
    """
    patches.setattr(torch.cuda, "Stream", CpuStream)
    patches.setattr(torch.cuda, "Event", CpuEvent)
    patches.setattr(torch.cuda, "current_stream", lambda device=None: _DEFAULT_STREAM)
    patches.setattr(torch.cuda, "default_stream", lambda device=None: _DEFAULT_STREAM)
    patches.setattr(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())


# ---------------------------------------------------------------------------------------------
# literal device="cuda"
# ---------------------------------------------------------------------------------------------

# megatron modules that create tensors with a literal device="cuda" (0.16.1 … 0.19.2).
LITERAL_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",      # total_num_tokens = zeros(device="cuda")
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.optimizer.optimizer",              # found_inf, _scale_one, _dummy_overflow_buf
    "megatron.core.optimizer.clip_grads",             # total_norm, dummy_overflow_buf
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.layer_wise_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.transformer.utils",                # get_default_causal_mask
    "megatron.core.tensor_parallel.data",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
)
_FACTORIES = frozenset({
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
    "randint", "zeros_like", "ones_like", "empty_like", "full_like",
})


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory, *args, **kwargs):
    if _is_cuda(kwargs.get("device")):
        kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator
    return factory(*args, **kwargs)


class CpuDeviceTorch:
    """Stands in for the ``torch`` module inside one megatron module.

    Attribute access is forwarded to torch; tensor factories get ``device="cuda"`` rewritten to
    the CPU. Only the module whose global ``torch`` is replaced sees it.
    """

    def __init__(self, real_torch: Any) -> None:
        self._torch = real_torch
        self._wrapped: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._torch, name)
        if name in _FACTORIES:
            return self._wrapped.setdefault(name, functools.partial(_on_cpu, value))
        return value


def patch_cuda_literals(patches: PatchSet) -> None:
    """``device="cuda"`` literals and ``Tensor.cuda()`` → CPU, in the modules that have them.

    Covers e.g. ``pipeline_parallel/schedules.py`` (``total_num_tokens = torch.zeros([],
    device="cuda")`` in every schedule), ``optimizer/optimizer.py`` and ``clip_grads.py``
    (``torch.tensor(..., device='cuda')``), ``transformer/utils.py get_default_causal_mask``, and
    ``.cuda()`` in ``distrib_optimizer``/``exchange_utils`` load paths. Module-scoped (each listed
    module's ``torch`` global becomes :class:`CpuDeviceTorch`), so nothing outside megatron is
    affected; ``Tensor.cuda`` is global but can only raise on a CPU-only build.

    A ``TorchFunctionMode`` was rejected: it is not active inside ``autograd.Function.backward``
    (docs/design.md, CPU workarounds).

    TODO(upstream): remove when megatron-core stops hard-coding ``device="cuda"``.
    """
    proxy = CpuDeviceTorch(torch)
    for name in LITERAL_CUDA_MODULES:
        module = import_or_none(name)
        if module is not None and vars(module).get("torch") is torch:
            patches.setattr(module, "torch", proxy)
    patches.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


# ---------------------------------------------------------------------------------------------
# type strings
# ---------------------------------------------------------------------------------------------

_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_string(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False,
                      **kwargs: Any) -> Any:
    """``Tensor.type()`` that reports CPU tensors as ``torch.cuda.*Tensor`` (query form only)."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


# (module, qualname) of the megatron functions that compare param.type() with
# 'torch.cuda.FloatTensor' / 'torch.cuda.BFloat16Tensor' (0.16.1 … 0.19.2).
TYPE_STRING_FUNCTIONS = (
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
)


def patch_type_strings(patches: PatchSet) -> None:
    """Inside the listed optimizer functions only, CPU tensors report CUDA type strings.

    Covers ``optimizer/distrib_optimizer.py _build_model_and_main_param_groups`` ("TypeError:
    Wrapped parameters must be one of torch.cuda.FloatTensor, ... Received torch.FloatTensor")
    and ``optimizer/clip_grads.py clip_grad_by_total_norm_fp32`` (bare ``assert param.grad.type()
    == 'torch.cuda.FloatTensor'``). The lie is scoped: ``Tensor.type`` is swapped only while one
    of :data:`TYPE_STRING_FUNCTIONS` runs.

    TODO(upstream): remove when megatron-core checks ``param.dtype`` instead of type strings.
    """
    scope = ScopedAttr(torch.Tensor, "type", _cuda_type_string)
    for module, qualname in TYPE_STRING_FUNCTIONS:
        owner, attr, raw = resolve(module, qualname)
        if raw is None or getattr(getattr(raw, "__func__", raw), "__genlip_compat__", False):
            continue
        wrapped = wrap_callable(raw, scope.wrap)
        if "." in qualname:
            patches.setattr(owner, attr, wrapped)
        else:
            rebind_function(patches, module, qualname, wrapped)
