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
# Signals: a USR1 or TERM sent to this script stops the run cleanly: the script sends
# GENLIP_STOP_SIGNAL (default USR1, keep it in training.exit_signals) to every worker itself,
# because torchrun starts each worker with start_new_session=True (own session and process
# group), so a signal to torchrun's process group never reaches them, and torchrun's own
# forwarding (TORCHELASTIC_SIGNALS_TO_HANDLE) SIGKILLs the workers 30 s after it, which can be
# shorter than a large checkpoint write. Only the workers (torchrun's children) are signalled,
# not their process groups: loader workers must not get it. The signal is sent again every
# GENLIP_STOP_RESEND_S seconds (default 5) until torchrun exits, which covers workers still
# starting up (USR1 is ignored until the trainer installs its handler) and restarted ones.
# The workers checkpoint at the next step boundary and exit 75; torchrun reports every failed
# worker as 1, so each worker records its status in GENLIP_EXIT_STATUS_DIR and this script
# exits 75 when every local worker exited 75 (a checkpoint was written: stop signal or
# training.exit_duration_mins), 2 when a worker reported a configuration error, 76 when one
# hit the hang watchdog (training.hang_timeout_mins), else torchrun's status (docs/faults.md).
set -uo pipefail

NNODES=${GENLIP_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
NODE_RANK=${GENLIP_NODE_RANK:-${SLURM_NODEID:-0}}
NPROC=${GENLIP_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
STOP_SIG=${GENLIP_STOP_SIGNAL:-USR1}
RESEND_S=${GENLIP_STOP_RESEND_S:-5}
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

GENLIP_EXIT_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/genlip-status.XXXXXX") || exit 1
export GENLIP_EXIT_STATUS_DIR
trap 'rm -rf "$GENLIP_EXIT_STATUS_DIR"' EXIT

workers() {   # torchrun's children: the ranks of this node (each leads its own session)
    pgrep -P "$CHILD" 2>/dev/null || ps -o pid= --ppid "$CHILD" 2>/dev/null
}
STOPPING=""
signal_workers() {
    local pids
    pids=$(workers | tr '\n' ' ')
    [ -n "${pids// /}" ] && kill -s "$STOP_SIG" $pids 2>/dev/null
    echo "genlip: node $NODE_RANK: SIG$STOP_SIG to workers ${pids:-(none yet)}"
}
stop() {
    [ -z "$STOPPING" ] && echo "genlip: node $NODE_RANK: got SIG$1; the workers checkpoint" \
        "at the next step and stop"
    STOPPING=$1
    signal_workers
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
# setsid: torchrun in its own session, away from this script's terminal/process group; with
# USR1 ignored (inherited by the workers until their handler is installed), a stray USR1 to
# the whole group cannot kill torchrun.
(trap '' USR1; exec setsid "$PY" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" \
    pretrain_genlip.py "$@") &
CHILD=$!
while kill -0 "$CHILD" 2>/dev/null; do
    if [ -n "$STOPPING" ]; then   # re-send until torchrun is gone (late or restarted workers)
        sleep "$RESEND_S" & wait $!
        kill -0 "$CHILD" 2>/dev/null && signal_workers >/dev/null
    else
        wait "$CHILD"   # returns early when a trap ran
    fi
done
wait "$CHILD"; rc=$?

# torchrun exits 1 whatever its workers returned: use the statuses they recorded.
if [ "$rc" -ne 0 ]; then
    n=0; n75=0; n2=0; n76=0
    for f in "$GENLIP_EXIT_STATUS_DIR"/rank*; do
        [ -f "$f" ] || continue
        s=$(cat "$f"); n=$((n + 1))
        [ "$s" = 75 ] && n75=$((n75 + 1))
        [ "$s" = 2 ] && n2=$((n2 + 1))
        [ "$s" = 76 ] && n76=$((n76 + 1))
    done
    if [ "$n75" -eq "$NPROC" ] && [ "$n" -eq "$NPROC" ]; then
        rc=75   # every local worker wrote its part of the stop checkpoint
    elif [ "$n2" -gt 0 ]; then
        rc=2    # configuration error (printed once by rank 0)
    elif [ "$n76" -gt 0 ]; then
        rc=76   # hang watchdog (training.hang_timeout_mins): stacks are in the log
    elif [ -n "$STOPPING" ]; then
        echo "genlip: node $NODE_RANK: stop requested (SIG$STOPPING) but only $n75 of $NPROC" \
             "workers exited 75 (torchrun status $rc): no checkpoint to resume from here" >&2
    fi
fi
exit "$rc"
