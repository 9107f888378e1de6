"""Version scopes of the compat groups: every group states its releases and is skipped outside."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from genlip_megatron import compat
from genlip_megatron.compat import GROUPS, SCOPES, apply_cpu_compat, compat_report, \
    cpu_compat_disabled
from genlip_megatron.compat.versions import TESTED, Scope, _release, megatron_version, \
    torch_version

CUDA_ERRORS = (AssertionError, RuntimeError, TypeError)


def test_every_group_states_its_scope():
    missing = set(GROUPS) - set(SCOPES)
    assert not missing, f"add a Scope to compat.SCOPES for {missing}"
    for name, scope in SCOPES.items():
        assert scope.megatron.startswith(">="), name
        assert scope.checked, name


def test_versions_come_from_the_installed_packages():
    import megatron.core

    assert megatron_version() == _release(megatron.core.__version__)
    assert torch_version() == Version(Version(torch.__version__).base_version)
    assert _release("2.10.0+cu128") == Version("2.10.0") == _release("2.10.0rc1")


@pytest.mark.parametrize("megatron,torch_release,expect", [
    ("0.16.1", "2.13.0", None),
    ("0.19.2", "2.10.0", None),
    ("0.15.3", "2.13.0", "megatron-core 0.15.3 is outside >=0.16.1,<0.20"),
    ("0.20.0", "2.13.0", "megatron-core 0.20.0 is outside >=0.16.1,<0.20"),
    ("0.19.2", "2.1.0", "torch 2.1.0 is outside >=2.2"),
])
def test_scope_skip_reason(megatron, torch_release, expect):
    scope = Scope(megatron=">=0.16.1,<0.20", torch=">=2.2", checked="test")
    assert scope.skip_reason(Version(megatron), Version(torch_release)) == expect


def test_group_outside_its_scope_is_skipped_and_reported(gloo_world, monkeypatch):
    """A group whose bug upstream fixed (scope bounded below the installed release) stays off."""
    with cpu_compat_disabled("sync"):
        monkeypatch.setitem(SCOPES, "sync", Scope(megatron="<0.1", checked="test"))
        apply_cpu_compat()
        with pytest.raises(CUDA_ERRORS):
            torch.cuda.synchronize()                  # still the real CUDA call: not patched
        assert compat_report()["sync"] == (f"skipped: megatron-core {megatron_version()} is "
                                           f"outside <0.1")
        monkeypatch.undo()
    apply_cpu_compat()
    assert compat_report()["sync"] == "applied"
    torch.cuda.synchronize()                          # the CPU no-op again


def test_triton_stub_only_where_megatron_imports_triton(gloo_world):
    """0.16.1: out of scope. 0.19+: applied iff triton is missing (CUDA torch wheels ship it)."""
    apply_cpu_compat()
    state = compat_report()["triton_stub"]
    if megatron_version() < Version("0.19"):
        assert state.startswith("skipped: megatron-core")
    elif importlib.util.find_spec("triton") is None:
        assert state == "applied"
    else:
        assert state == "not needed"
    assert all(compat_report()[name] == "applied" for name in GROUPS
               if name != "triton_stub"), compat_report()
    assert compat._SKIPPED.keys() <= {"triton_stub"}


def _pins(path) -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return {ln.split("==")[0].lower(): ln.split("==")[1] for ln in lines if "==" in ln}


def test_tested_versions_match_the_ci_pins():
    """compat.versions.TESTED (what docs/versions.md and scopes claim) is what the lanes install."""
    root = Path(__file__).resolve().parents[3]
    for lane, pin_file in (("main", root / "requirements/ci.txt"),
                           ("newest-stack", root / ".ci/newest_stack/requirements.lock")):
        pins = _pins(pin_file)
        assert pins["torch"] == TESTED[lane]["torch"], lane
        assert pins["megatron-core"] == TESTED[lane]["megatron-core"], lane
