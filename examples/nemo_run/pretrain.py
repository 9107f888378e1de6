"""Launch GenLIP pretraining with NeMo-Run: a Slurm cluster (default) or this machine (--local).

    pip install -r requirements/launch.txt          # nemo-run 0.11.1 (+ the leptonai it imports)
    python examples/nemo_run/pretrain.py --config examples/configs/<config>.yaml \\
        --account ACC --partition PART --nodes 4 --gpus-per-node 8 \\
        --host login.cluster --user me --container nvcr.io/nvidia/pytorch:25.09-py3 \\
        --mount /lustre:/lustre --dryrun             # prints the sbatch script, submits nothing
    python examples/nemo_run/pretrain.py --config CONFIG --local --nproc-per-node 2 \\
        --set training.train_steps=10               # torchrun on this machine

What reaches the cluster: NeMo-Run's git packager ships the COMMITTED tree of this checkout.
Run-relative files that git does not track (the tokenizer from tools/fetch_qwen3_tokenizer.py)
are shipped with it when they exist here; everything else a job reads or writes for longer
than the job (data shards, checkpoint.save_dir, logging dirs) must be an absolute path on
shared storage, mounted into the container with --mount. Bad arguments: one line
``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's genlip_megatron, for config validation

from genlip_megatron.config import ConfigError, load_config  # noqa: E402


class LaunchError(ValueError):
    """An argument or configuration problem, reported as one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config, relative to the checkout root")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, passed to pretrain_genlip.py verbatim")
    p.add_argument("--local", action="store_true", help="run here with torchrun, not on Slurm")
    p.add_argument("--dryrun", action="store_true", help="print the job script, launch nothing")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for a CPU partition")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="training processes per node (default: --gpus-per-node, at least 1)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--account", help="Slurm account (required for Slurm)")
    p.add_argument("--partition")
    p.add_argument("--time", default="04:00:00", help="Slurm time limit HH:MM:SS")
    p.add_argument("--host", help="login host to submit through (SSH); omit on the login node")
    p.add_argument("--user", help="SSH user for --host")
    p.add_argument("--job-dir", default=str(Path.home() / "nemo-run" / "genlip"),
                   help="where NeMo-Run keeps code and logs on the cluster (absolute; ~ and "
                        "$VARS expanded here)")
    p.add_argument("--container", default=None, help="container image (pyxis/enroot)")
    p.add_argument("--mount", action="append", default=[], metavar="SRC:DST",
                   help="container mount, repeatable (shared data and checkpoint storage)")
    p.add_argument("--name", default="genlip-pretrain", help="experiment name")
    return p.parse_args(argv)


def _git_tracked(path: str) -> bool:
    proc = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT,
                          capture_output=True, text=True)
    return proc.returncode == 0


def validate(args: argparse.Namespace) -> list[str]:
    """Check arguments and the config; returns run-relative untracked files to ship."""
    if args.nodes < 1:
        raise LaunchError(f"--nodes is {args.nodes}; it must be ≥ 1")
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node is {args.gpus_per_node}; use 0 for CPU nodes")
    if args.nproc_per_node is None:
        args.nproc_per_node = max(args.gpus_per_node, 1)
    if args.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node is {args.nproc_per_node}; it must be ≥ 1")
    if args.local and args.nodes != 1:
        raise LaunchError(f"--local runs on this machine only; drop --nodes {args.nodes}")
    config = Path(args.config)
    if config.is_absolute():
        raise LaunchError(f"--config {args.config} must be relative to the checkout root "
                          "(the cluster runs from a packaged copy)")
    if not (ROOT / config).is_file():
        raise LaunchError(f"--config {args.config} does not exist under {ROOT}")
    try:
        cfg = load_config(ROOT / config, args.set)
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None
    ship = []
    if not args.local:
        if not args.account:
            raise LaunchError("--account is required for Slurm (or use --local)")
        if args.user and not args.host:
            raise LaunchError("--user needs --host (the login node to submit through)")
        args.job_dir = os.path.expandvars(os.path.expanduser(args.job_dir))
        if not os.path.isabs(args.job_dir):
            raise LaunchError(f"--job-dir {args.job_dir} must be an absolute path on the "
                              "cluster (Slurm does not expand ~)")
        if not _git_tracked(args.config):
            raise LaunchError(f"--config {args.config} is not committed; NeMo-Run ships only "
                              "committed files (git add + commit it)")
        save_dir = cfg.checkpoint.save_dir
        if save_dir and not os.path.isabs(save_dir):
            raise LaunchError(f"checkpoint.save_dir '{save_dir}' is relative: it would land in "
                              "this job's code copy and a resubmitted job would not resume; "
                              "use an absolute path on shared storage")
        tok = cfg.data.text.tokenizer_path
        if tok and not os.path.isabs(tok) and not _git_tracked(tok):
            if not (ROOT / tok).is_file():
                raise LaunchError(f"data.text.tokenizer_path '{tok}' is neither committed nor "
                                  "present here; run tools/fetch_qwen3_tokenizer.py or point it "
                                  "to an absolute path on shared storage")
            ship.append(tok)
    return ship


def build_executor(args: argparse.Namespace, ship: list[str]):
    import nemo_run as run

    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    if args.local:  # torchrun is part of the task (see build_task)
        return run.LocalExecutor(ntasks_per_node=1, env_vars={**env, "PYTHONPATH": str(ROOT)})
    tunnel = run.SSHTunnel(host=args.host, user=args.user or os.environ.get("USER", ""),
                           job_dir=args.job_dir) if args.host else \
        run.LocalTunnel(job_dir=args.job_dir)
    packager = run.GitArchivePackager(  # committed tree + the untracked run-relative files
        ref="HEAD", include_pattern=[str(ROOT / f) for f in ship],
        include_pattern_relative_path=[str(ROOT)] * len(ship)) if ship else \
        run.GitArchivePackager(ref="HEAD")
    return run.SlurmExecutor(
        account=args.account, partition=args.partition, nodes=args.nodes,
        ntasks_per_node=args.nproc_per_node,
        gpus_per_node=args.gpus_per_node or None, cpus_per_task=args.cpus_per_task,
        time=args.time, container_image=args.container, container_mounts=list(args.mount),
        launcher="torchrun", tunnel=tunnel, packager=packager, env_vars=env)


def build_task(args: argparse.Namespace):
    """pretrain_genlip.py with the config and overrides as separate argv items.

    On Slurm, NeMo-Run's torchrun launcher writes the command into the sbatch script and
    shell-quotes every item. Locally there is no shell, so that quoting would reach
    pretrain_genlip.py literally: the local task runs ``python -m torch.distributed.run``
    itself (--standalone: a free rendezvous port) with the items unquoted.
    """
    import nemo_run as run

    if args.local:
        torchrun = ["--standalone", "--nproc-per-node", str(args.nproc_per_node),
                    str(ROOT / "pretrain_genlip.py")]
        script_args = torchrun + ["--config", str(ROOT / args.config)]
        return run.Script(path="torch.distributed.run", m=True, entrypoint=sys.executable,
                          args=script_args + (["--set", *args.set] if args.set else []))
    script_args = ["--config", args.config] + (["--set", *args.set] if args.set else [])
    return run.Script(path="pretrain_genlip.py", args=script_args, entrypoint="python")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        ship = validate(args)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import nemo_run as run
    except ImportError as exc:
        print(f"error: nemo-run is not importable ({exc}); pip install -r "
              "requirements/launch.txt", file=sys.stderr)
        return 2
    with run.Experiment(args.name, log_level="WARN") as exp:
        exp.add(build_task(args), executor=build_executor(args, ship), name="pretrain")
        if args.dryrun:  # print the job script plainly (NeMo-Run's log wraps and pads it)
            exp.dryrun(log=False)
            for job in exp.jobs:
                print(job._dryrun_info)
        else:
            exp.run(detach=not args.local, tail_logs=args.local)
    if args.local and not args.dryrun:  # a failed local run must not look like success
        states = [str(job.state) for job in exp.jobs]
        if any("SUCCEEDED" not in state for state in states):
            print(f"error: local run ended {states}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
