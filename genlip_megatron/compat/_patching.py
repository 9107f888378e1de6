"""Bookkeeping for the compat patches: recorded, revertible attribute patches and scoped shims.

Every workaround group owns one :class:`PatchSet`. Patches are plain ``setattr`` on upstream
modules/classes, recorded so that a test can revert one group, show the upstream failure, and
re-apply it. Nothing here knows about CUDA; the groups live in the sibling modules.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from typing import Any, Callable, Iterator, Optional

_MISSING = object()


class PatchSet:
    """The attribute patches of one workaround group (revertible, for tests)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._saved: list[tuple[Any, str, Any]] = []

    @property
    def applied(self) -> bool:
        """True when at least one patch of this group is in place."""
        return bool(self._saved)

    def setattr(self, owner: Any, attr: str, value: Any, *, create: bool = False) -> bool:
        """Set ``owner.attr = value`` and remember the old value.

        Args:
            owner: module, class or object to patch.
            attr: attribute name; when absent (other megatron-core version) nothing happens
                unless ``create`` is set.
            value: the replacement.
            create: also create a missing attribute.

        Returns:
            True when the attribute was patched.
        """
        if not hasattr(owner, attr) and not create:
            return False
        # The raw __dict__ entry keeps classmethod/staticmethod wrappers; an inherited attribute
        # is recorded as missing so that revert() deletes the override and inheritance resumes.
        old = vars(owner).get(attr, _MISSING) if hasattr(owner, "__dict__") else \
            getattr(owner, attr, _MISSING)
        self._saved.append((owner, attr, old))
        setattr(owner, attr, value)
        return True

    def revert(self) -> None:
        """Undo every patch of this group, newest first."""
        for owner, attr, old in reversed(self._saved):
            if old is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        self._saved.clear()


def import_or_none(name: str) -> Optional[types.ModuleType]:
    """Import module ``name``; None when this megatron-core version does not have it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def resolve(module: str, qualname: str) -> tuple[Any, str, Any]:
    """``(owner, attribute, raw value)`` for ``module:qualname`` or None parts when missing.

    ``qualname`` may be ``func`` or ``Class.method``; the raw value is taken from the owner's
    ``__dict__`` so classmethod/staticmethod wrappers are preserved.
    """
    owner: Any = import_or_none(module)
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part, None) if owner is not None else None
    if owner is None:
        return None, parts[-1], None
    raw = vars(owner).get(parts[-1]) if hasattr(owner, "__dict__") else None
    return owner, parts[-1], raw


def wrap_callable(raw: Any, make_wrapper: Callable[[Callable], Callable]) -> Any:
    """Apply ``make_wrapper`` to a function, keeping a classmethod/staticmethod wrapper."""
    if isinstance(raw, classmethod):
        return classmethod(make_wrapper(raw.__func__))
    if isinstance(raw, staticmethod):
        return staticmethod(make_wrapper(raw.__func__))
    return make_wrapper(raw)


def rebind_function(patches: PatchSet, module: str, name: str, new: Callable) -> bool:
    """Replace module-level function ``module.name`` and every ``from module import name`` copy.

    megatron modules import helpers by name (``from .clip_grads import
    clip_grad_by_total_norm_fp32``), so patching only the defining module would miss callers.
    """
    owner, attr, raw = resolve(module, name)
    if raw is None:
        return False
    for mod_name, mod in list(sys.modules.items()):
        if mod is not None and mod_name.startswith("megatron") and vars(mod).get(attr) is raw:
            patches.setattr(mod, attr, new)
    return True


class ScopedAttr:
    """Re-entrant context manager that swaps ``owner.attr`` for ``value`` while active."""

    def __init__(self, owner: Any, attr: str, value: Any) -> None:
        self.owner, self.attr, self.value = owner, attr, value
        self._depth = 0
        self._old: Any = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Swap in the value (outermost entry only) and restore it on exit."""
        if self._depth == 0:
            self._old = getattr(self.owner, self.attr)
            setattr(self.owner, self.attr, self.value)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                setattr(self.owner, self.attr, self._old)

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` running with the swapped attribute."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.active():
                return fn(*args, **kwargs)

        wrapper.__genlip_compat__ = True  # type: ignore[attr-defined]
        return wrapper
