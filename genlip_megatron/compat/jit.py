"""Skip megatron's ``@jit_fuser`` (``torch.compile``) on CPU, and stub a triton-only module.

``megatron.core.jit.jit_fuser`` is ``torch.compile`` on torch ≥ 2.2. On CPU the only fused
function on GenLIP's path is ``Attention._apply_output_gate`` (gated attention); compiling it
costs about 2.2 s of inductor time per process and input shape for an elementwise
``x * sigmoid(gate)`` (docs/design.md, CPU workarounds). The other jit-fused
functions (bias-SwiGLU, bias-dropout-add, ...) are only used with fusion flags that
``build_transformer_config`` turns off on CPU.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

from genlip_megatron.compat._patching import PatchSet, import_or_none, resolve

# (module, qualname) of jit-fused functions that the CPU path calls.
JIT_FUSED_FUNCTIONS = (
    ("megatron.core.transformer.attention", "Attention._apply_output_gate"),
)


def _uncompiled(fn):
    """The Python function under a ``torch.compile`` wrapper (``fn`` itself when not compiled)."""
    return getattr(fn, "_torchdynamo_orig_callable", None) or getattr(fn, "__wrapped__", None) \
        or fn


def disable_jit_fuser(patches: PatchSet) -> None:
    """Make ``jit_fuser`` a no-op for modules imported later and unwrap the ones already bound.

    Covers ``core/jit.py jit_fuser`` and ``transformer/attention.py Attention._apply_output_gate``.

    TODO(upstream): remove if megatron-core stops compiling elementwise helpers on CPU.
    """
    jit = import_or_none("megatron.core.jit")
    if jit is not None and hasattr(jit, "noop_decorator"):
        patches.setattr(jit, "jit_fuser", jit.noop_decorator)
    for module, qualname in JIT_FUSED_FUNCTIONS:
        owner, attr, raw = resolve(module, qualname)
        if raw is not None and _uncompiled(raw) is not raw:
            patches.setattr(owner, attr, _uncompiled(raw))


def stub_triton_paged_stash(patches: PatchSet) -> None:
    """Register a stub for ``megatron.core.transformer.moe.ops.paged_stash`` when triton is absent.

    megatron-core ≥ 0.19 imports that triton kernel module unconditionally from
    ``pipeline_parallel/schedules.py`` (via ``transformer/moe/paged_stash.py``), so ``import
    megatron.core.pipeline_parallel`` fails with ``No module named 'triton'`` on CPU-only torch
    wheels, which do not ship triton. MoE paged stash is unused by GenLIP; the stub's kernels
    raise if called. Must run before megatron's pipeline code is imported.

    TODO(upstream): remove when megatron-core guards ``import triton`` there.
    """
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    # find_spec of megatron.core imports only the namespace package "megatron", not megatron.core
    # (whose import is what fails without triton).
    core = importlib.util.find_spec("megatron.core")
    if core is None or not any(Path(p, "transformer/moe/ops/paged_stash.py").is_file()
                               for p in core.submodule_search_locations or ()):
        return  # megatron-core < 0.19: nothing imports triton on the training path

    def _unavailable(*args, **kwargs):
        raise RuntimeError("MoE paged stash needs triton (a CUDA build of torch); GenLIP does "
                           "not use it.")

    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    patches.setattr(_SysModules(), name, stub, create=True)


class _SysModules:
    """Attribute view of ``sys.modules`` so a registered stub is revertible like other patches."""

    def __getattr__(self, name):  # only called for missing attributes
        try:
            return sys.modules[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        sys.modules[name] = value

    def __delattr__(self, name):
        sys.modules.pop(name, None)
