#!/bin/bash
# One node's share of a multi-node run: torchrun with a static rendezvous on the head node.
# Used by pretrain_torchrun.sbatch (one srun task per node) and usable by hand on any hosts:
#
#   GENLIP_NNODES=2 GENLIP_NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29400 \
#       bash examples/slurm/torchrun_node.sh --config CONFIG [--set key=value ...]   # head
#   GENLIP_NNODES=2 GENLIP_NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29400 \
#       bash examples/slurm/torchrun_node.sh --config CONFIG [--set key=value ...]   # other
#
# Environment: GENLIP_NNODES (default SLURM_JOB_NUM_NODES, else 1), GENLIP_NODE_RANK (default
# SLURM_NODEID, else 0), GENLIP_NPROC_PER_NODE (default SLURM_GPUS_ON_NODE, else 1),
# MASTER_ADDR, MASTER_PORT (required when NNODES > 1), GENLIP_PYTHON (default python),
# OMP_NUM_THREADS (default: SLURM_CPUS_PER_TASK / processes per node).
#
# Signals: torchrun turns SIGTERM into SIGKILL of its workers after a short grace period and
# dies on SIGUSR1, so it runs in its own process group with USR1 ignored, and a USR1 or TERM
# sent to this script reaches the workers as USR1 (training.exit_signals): they checkpoint at
# the next step boundary and exit 75, which this script returns (torchrun itself reports 1).
set -uo pipefail

NNODES=${GENLIP_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
NODE_RANK=${GENLIP_NODE_RANK:-${SLURM_NODEID:-0}}
NPROC=${GENLIP_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
if [ "$NNODES" -gt 1 ] && { [ -z "${MASTER_ADDR:-}" ] || [ -z "${MASTER_PORT:-}" ]; }; then
    echo "error: MASTER_ADDR and MASTER_PORT must be set for a $NNODES-node run" >&2; exit 2
fi
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}
PY=${GENLIP_PYTHON:-python}

if [ "$NNODES" -gt 1 ] || [ -n "${MASTER_PORT:-}" ]; then
    rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "${MASTER_ADDR:-127.0.0.1}"
          --master-port "$MASTER_PORT")
else
    rdzv=(--standalone)   # one node, no port given: torchrun picks a free one
fi
echo "genlip: node $NODE_RANK/$NNODES: $NPROC processes, ${OMP_NUM_THREADS} threads each," \
     "rendezvous ${MASTER_ADDR:-local}:${MASTER_PORT:-free}"

STOPPING=""
stop() { STOPPING=1; kill -s USR1 -- "-$CHILD" 2>/dev/null || true; }
trap stop USR1 TERM
# setsid: own process group (signalled as a whole above); trap '' USR1: torchrun ignores it,
# the workers inherit the ignore and replace it with their own handler.
(trap '' USR1; exec setsid "$PY" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" \
    pretrain_genlip.py "$@") &
CHILD=$!
while :; do
    wait "$CHILD"; rc=$?
    kill -0 "$CHILD" 2>/dev/null || break
done
if [ -n "$STOPPING" ] && [ "$rc" -ne 0 ]; then
    rc=75   # the workers exited 75 after their checkpoint; torchrun reports any failure as 1
fi
exit "$rc"
