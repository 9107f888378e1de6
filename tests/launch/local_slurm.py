"""A throw-away single-host Slurm cluster on loopback for tests (Debian packages, root).

Recipe (measured on the CI machine): slurmctld + slurmd with proctrack/linuxproc (or
proctrack/pgid, see LocalSlurm)
and task/none (no cgroups, no systemd), auth/none (no munged to run), a fresh state directory
and free ports per cluster. Every daemon is stopped by the PID it wrote. A requeued job may
start again only after the job credential expired (cred_expire, default 120 s) and is then
placed by the next periodic scheduler pass (default every 60 s), so the cluster uses 10 s and
1 s.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable_reason() -> Optional[str]:
    """Why a local Slurm cannot be started here (None: it can, installing it if needed)."""
    if os.geteuid() != 0:
        return "needs root to install and run slurmctld/slurmd"
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch"):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get is not available"
    return None


def install(timeout: int = 300) -> Optional[str]:
    """apt-get install the Slurm daemons when missing; returns a skip reason on failure."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            return f"'{' '.join(cmd)}' failed: {(proc.stderr or proc.stdout)[-300:]}"
    return None


class LocalSlurm:
    """slurmctld + slurmd for this host, one partition, state under ``state_dir``."""

    def __init__(self, state_dir: Path, proctrack: str = "linuxproc"):
        """``proctrack``: ``linuxproc`` signals every descendant of a step; ``pgid`` only the
        step's process group, so a process in its own session (torchrun's workers) is reached
        only by what the scripts do themselves, as on a cluster whose proctrack does not
        signal such descendants (proctrack/cgroup needs a cgroup mount this host may lack)."""
        self.dir = Path(state_dir)
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "slurm.conf"
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(f"""ClusterName=ci
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={self.dir}/state
SlurmdSpoolDir={self.dir}/spool
SlurmctldPidFile={self.dir}/slurmctld.pid
SlurmdPidFile={self.dir}/slurmd.pid
SlurmctldLogFile={self.dir}/log/slurmctld.log
SlurmdLogFile={self.dir}/log/slurmd.log
ProctrackType=proctrack/{proctrack}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[int] = []

    def start(self, timeout: float = 60) -> None:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], env=self.env, check=True, timeout=60)
            self.pids.append(int(self._wait_file(self.dir / f"{daemon}.pid").read_text()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.split()
            if out and out[0] == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"node never became idle; slurmd.log:\n{self.log('slurmd')}")

    def _wait_file(self, path: Path, timeout: float = 30) -> Path:
        deadline = time.monotonic() + timeout
        while not (path.is_file() and path.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} not written; logs:\n{self.log('slurmctld')}")
            time.sleep(0.05)
        return path

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                              check=check, timeout=kw.pop("timeout", 60), **kw)

    def job(self, job_id: str) -> dict:
        """Fields of ``scontrol show job -o`` (JobState, ExitCode, Restarts, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until=None) -> dict:
        """Poll (sbatch --wait sleeps up to 10 s) until the job ends or ``until(info)``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if (until and until(info)) or (not until and info.get("JobState") not in ACTIVE):
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {self.job(job_id)} after {timeout} s")

    def log(self, daemon: str) -> str:
        path = self.dir / "log" / f"{daemon}.log"
        return path.read_text()[-4000:] if path.is_file() else "(no log)"

    def stop(self) -> None:
        """SIGTERM each daemon by PID and wait for it (slurmctld saves state: ~2 s)."""
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        self.pids = []
