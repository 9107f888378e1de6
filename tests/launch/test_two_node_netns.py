"""Two "nodes" on real network addresses: two network namespaces joined by a veth pair.

Each namespace runs one training process through the project's per-node launcher
(examples/slurm/torchrun_node.sh: torchrun, static rendezvous on the head's address, node rank
from the environment). The 2-rank data-parallel run (training.dp_invariant_data: true) must
match the single-process golden loss curve. Skipped with the reason where namespaces cannot be
created (no root, no iproute2 and no apt, or a sandbox that forbids CLONE_NEWNET).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from local_slurm import _free_port
from training_helpers import ROOT, TINY_CONFIG, assert_losses_close, make_tiny_data, \
    read_golden, read_jsonl_losses, tiny_overrides


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _ensure_iproute2() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip"):
        return None
    if not shutil.which("apt-get"):
        return "iproute2 is missing and apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "iproute2"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode != 0:
            return f"could not install iproute2 ({' '.join(cmd)} failed)"
    return None


@pytest.fixture
def two_hosts():
    """(namespace, interface, address) for head and worker; torn down afterwards."""
    reason = _ensure_iproute2()
    if reason:
        pytest.skip(reason)
    tag = f"g11{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"  # inside our namespaces only
    hosts = [(f"{tag}n{i}", f"{tag}v{i}", f"{subnet}.{i + 1}") for i in range(2)]
    made = []
    try:
        for ns, _, _ in hosts:
            proc = _sh("ip", "netns", "add", ns)
            if proc.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {proc.stderr.strip()}")
            made.append(ns)
        (ns0, if0, _), (ns1, if1, _) = hosts
        steps = [("ip", "link", "add", if0, "type", "veth", "peer", "name", if1),
                 ("ip", "link", "set", if0, "netns", ns0), ("ip", "link", "set", if1, "netns", ns1)]
        for ns, ifname, addr in hosts:
            steps += [("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname),
                      ("ip", "-n", ns, "link", "set", ifname, "up"),
                      ("ip", "-n", ns, "link", "set", "lo", "up")]
        for cmd in steps:
            proc = _sh(*cmd)
            if proc.returncode != 0:
                pytest.skip(f"'{' '.join(cmd)}' failed: {proc.stderr.strip()}")
        ping = _sh("ip", "netns", "exec", ns0, sys.executable, "-c",
                   f"import socket; socket.create_connection(('{hosts[1][2]}', 9), 5)")
        assert "timed out" not in ping.stderr, "veth link does not pass traffic"
        yield hosts
    finally:
        for ns in made:
            _sh("ip", "netns", "del", ns)   # removes the veth pair with it


def test_two_namespace_torchrun_dp_matches_single_process(two_hosts, tmp_path):
    data = make_tiny_data(tmp_path / "data")
    head_addr = two_hosts[0][2]
    port = str(_free_port())  # nothing listens in a fresh namespace; any free port works
    sets = tiny_overrides(data, tmp_path / "run")
    procs = []
    try:
        for rank, (ns, ifname, _) in enumerate(two_hosts):
            env = {**os.environ, "GENLIP_NNODES": "2", "GENLIP_NODE_RANK": str(rank),
                   "GENLIP_NPROC_PER_NODE": "1", "MASTER_ADDR": head_addr, "MASTER_PORT": port,
                   "GLOO_SOCKET_IFNAME": ifname, "GENLIP_PYTHON": sys.executable,
                   "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            cmd = ["ip", "netns", "exec", ns, "bash", "examples/slurm/torchrun_node.sh",
                   "--config", str(TINY_CONFIG.relative_to(ROOT)), "--set", *sets]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=420)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
    assert f"rendezvous {head_addr}:{port}" in outs[1]
    # One process per namespace, one world of 2 (two standalone runs would also match golden).
    # (a standalone process would log as rank0 and read the whole batch itself)
    assert "rank1] INFO genlip_megatron.training.metrics: step      8/8" in outs[1], outs[1][-3000:]
    losses = read_jsonl_losses(tmp_path / "run" / "metrics.jsonl")
    assert_losses_close(losses, read_golden(), what="2 namespaces x 1 rank (DP=2)")
