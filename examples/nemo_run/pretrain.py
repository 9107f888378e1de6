"""Launch GenLIP pretraining with NeMo-Run on a Slurm cluster (or locally).

    pip install nemo_run
    python examples/nemo_run/pretrain.py --config examples/configs/<config>.yaml \
        --nodes 4 --account ACC --partition PART --host login.cluster --user me \
        --container nvcr.io/nvidia/pytorch:25.09-py3

`--local` runs the same script with torchrun on this machine instead (no Slurm).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--account")
    parser.add_argument("--partition")
    parser.add_argument("--host", help="Slurm login host (SSH tunnel)")
    parser.add_argument("--user")
    parser.add_argument("--job-dir", default="~/nemo-run/genlip")
    parser.add_argument("--container", default=None)
    parser.add_argument("--time", default="72:00:00")
    parser.add_argument("--local", action="store_true")
    args = parser.parse_args()

    import nemo_run as run  # optional dependency, imported only here

    script_args = ["--config", args.config] + (["--set", *args.set] if args.set else [])
    task = run.Script(path="pretrain_genlip.py", args=script_args, entrypoint="python")
    if args.local:
        executor = run.LocalExecutor(ntasks_per_node=args.gpus_per_node, launcher="torchrun")
    else:
        executor = run.SlurmExecutor(
            account=args.account, partition=args.partition, nodes=args.nodes,
            ntasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
            container_image=args.container, time=args.time, launcher="torchrun",
            tunnel=run.SSHTunnel(host=args.host, user=args.user, job_dir=args.job_dir),
            packager=run.GitArchivePackager(),
            env_vars={"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    with run.Experiment("genlip-pretrain") as exp:
        exp.add(task, executor=executor, name="pretrain")
        exp.run(detach=not args.local)


if __name__ == "__main__":
    main()
