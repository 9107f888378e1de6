"""Fixtures of the conversion tests (gloo world of size 1, megatron parallel state)."""

from convert_testlib import gloo_world, mp_state  # noqa: F401
