"""Compat tests: apply the compat layer before any test module imports megatron.

The gloo world and parallel-state fixtures are shared (tests/conftest.py)."""

from __future__ import annotations

from genlip_megatron.compat import apply_cpu_compat

# Before any test module imports megatron: on megatron-core >= 0.19 without triton the
# triton_stub group must precede the first import of megatron's pipeline code.
apply_cpu_compat()
