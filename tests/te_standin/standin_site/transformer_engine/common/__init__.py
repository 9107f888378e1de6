"""``transformer_engine.common`` stand-in: only the recipes."""

from transformer_engine.common import recipe  # noqa: F401
