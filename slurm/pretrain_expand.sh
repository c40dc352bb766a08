#!/bin/bash
# LLaMA Pro post-pretraining of an expanded checkpoint (only the new blocks train), multi-node.
#
#   mkdir -p logs
#   LOAD=ckpt/llama2-7b-expanded DATA_PATH="1.0 data/proofpile_text_document 1.5 data/stack_py_text_document" \
#   SAVE=ckpt/llamapro-run1 sbatch slurm/pretrain_expand.sh [extra trainer arguments...]
#
# Submit from the repository root (the job cds to $SLURM_SUBMIT_DIR). Every #SBATCH line below is a
# default that sbatch's own command line overrides, e.g.
#   sbatch --nodes=4 --time=2:00:00 --partition=big slurm/pretrain_expand.sh
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=2 slurm/pretrain_expand.sh  # CPU/gloo
# logs/ must exist before submitting (Slurm opens --output before the script runs).
#
# Environment variables (all optional except LOAD and DATA_PATH; sbatch passes your environment on):
#   LOAD            expanded Megatron checkpoint to start from (tools/expand_blocks.py --out)
#   DATA_PATH       training blend "W1 PREFIX1 W2 PREFIX2 ..." (or a single PREFIX); prefixes of
#                   tools/preprocess_data.py output (PREFIX.bin/.idx); no spaces inside paths
#   VALID_DATA      validation sets "NAME=PREFIX NAME=PREFIX", e.g. "general=data/wiki domain=data/math";
#                   empty: no --valid-data
#   SAVE            checkpoint directory (default checkpoints/$SLURM_JOB_NAME). A job restarted or
#                   requeued with the same SAVE resumes from the latest checkpoint there by itself.
#   TP PP VPP       tensor / pipeline / virtual-pipeline parallel sizes (1, 1, empty = no VPP)
#   MBS GBS         micro / global batch size in sequences (1, 1024)
#   SEQ_LEN         sequence length (4096)
#   TRAIN_ITERS     total training iterations, counted from iteration 0 across restarts (15900)
#   LR              peak learning rate (2e-4)
#   FP8             empty (bf16), hybrid or e4m3 (needs Transformer Engine and Hopper GPUs)
#   SAVE_INTERVAL   iterations between checkpoints (500)
#   EVAL_INTERVAL   iterations between evaluations (500)
#   PYTHON          interpreter that has megatron_llamapro installed (python3)
#   CONTAINER_IMAGE pyxis/enroot image; when set, every task runs in it (srun --container-image)
#   CONTAINER_MOUNTS  pyxis --container-mounts (default: the repository at the same path)
#   EXTRA_ARGS      more trainer arguments appended after the ones above (word-split)
#   LAUNCHER        srun (default: one task per GPU, RANK/LOCAL_RANK/WORLD_SIZE from SLURM_*) or
#                   mpi (srun --mpi=$SRUN_MPI, default pmix; ranks come from MPI via mpi4py)
#   GPUS_PER_NODE   GPUs per node for the srun step (default: from the allocation, else 0);
#                   0 = CPU tasks (the trainer then uses gloo by itself)
#   MASTER_ADDR     rendezvous host (default: first host of the allocation)
#   MASTER_PORT     rendezvous port (default: 10000 + SLURM_JOB_ID % 50000)
#   MAX_REQUEUES    stop requeueing after this many restarts (50)
#   TASK_EXIT_WAIT  seconds srun lets the other tasks run after the first one ended (600); ends
#                   ranks stuck in a collective after another rank crashed
#   REPO_DIR        repository root the job runs in (default: the submit directory)
#   PREFLIGHT_PYTHON  interpreter for the allocation check (default $PYTHON; python3 on the host
#                   when CONTAINER_IMAGE is set: the check needs only the standard library)
# Arguments after the script name are passed to the trainer after everything else.
#
# Preemption / time limit: Slurm sends SIGUSR1 to this batch shell 300 s before the time limit
# (--signal=B:USR1@300) or when an admin/scheduler preempts (`scancel -b -s USR1 JOB`). The trap
# below forwards it to the srun step (srun forwards it to every task); the trainer saves a checkpoint
# and exits 75 ("checkpoint saved, please requeue"), and this script then runs
# `scontrol requeue $SLURM_JOB_ID` and exits 0. Any other non-zero trainer exit code is returned.
#
#SBATCH --job-name=llamapro
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail

log() { echo "[pretrain_expand.sh $(date '+%F %T')] $*"; }
die() { echo "[pretrain_expand.sh] error: $*" >&2; exit 2; }

# Signals are trapped from the first line on: bash's default for SIGUSR1 is to die, and the
# preemption signal may come at any time (even at start, when less than 300 s are left).
SRUN_PID=
PENDING_SIGNAL=
on_signal() {
    if [ -n "$SRUN_PID" ]; then
        log "received SIG$1: forwarding it to the training step (srun pid $SRUN_PID)"
        kill -s "$1" "$SRUN_PID" 2>/dev/null || true
    else
        log "received SIG$1 before the training step started"
        PENDING_SIGNAL=$1
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

requeue_and_exit() {
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
        log "not requeueing: already requeued ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=$MAX_REQUEUES)"
        exit 75
    fi
    log "requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint in $SAVE"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "scontrol requeue failed: resubmit the job with the same SAVE to resume"
    exit 75
}

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || die "cannot cd to REPO_DIR=$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

: "${SLURM_JOB_ID:?run this script with sbatch (or inside an allocation)}"

# ---------------------------------------------------------------- settings
LOAD=${LOAD:-}
DATA_PATH=${DATA_PATH:-}
VALID_DATA=${VALID_DATA:-}
SAVE=${SAVE:-checkpoints/${SLURM_JOB_NAME:-llamapro}}
TP=${TP:-1}
PP=${PP:-1}
VPP=${VPP:-}
MBS=${MBS:-1}
GBS=${GBS:-1024}
SEQ_LEN=${SEQ_LEN:-4096}
TRAIN_ITERS=${TRAIN_ITERS:-15900}
LR=${LR:-2e-4}
FP8=${FP8:-}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
EVAL_INTERVAL=${EVAL_INTERVAL:-500}
PYTHON=${PYTHON:-python3}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}
EXTRA_ARGS=${EXTRA_ARGS:-}
LAUNCHER=${LAUNCHER:-srun}
SRUN_MPI=${SRUN_MPI:-pmix}
MAX_REQUEUES=${MAX_REQUEUES:-50}
TASK_EXIT_WAIT=${TASK_EXIT_WAIT:-600}

[ -n "$LOAD" ] || die "LOAD (the expanded checkpoint) is not set"
[ -n "$DATA_PATH" ] || die "DATA_PATH (the training blend) is not set"
case "$LAUNCHER" in srun|mpi) ;; *) die "LAUNCHER must be srun or mpi, got '$LAUNCHER'";; esac

# GPUs per node: explicit, else what the allocation got (SLURM_GPUS_PER_NODE may read "h100:8").
if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-0}
    GPUS_PER_NODE=${GPUS_PER_NODE##*:}
fi
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || GPUS_PER_NODE=0

# ---------------------------------------------------------------- environment for the tasks
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 50000))}
# Megatron needs one CUDA work queue per device so TP/SP communication kernels are issued in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Turn a hung or failed NCCL collective into an error instead of a silent hang (old and new names).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# CPU threads per rank (torch intra-op, data loading): the CPUs Slurm gave each task.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- preflight (no model loading)
if [ -n "${SLURM_NTASKS:-}" ]; then
    WORLD_SIZE_ALLOC=$SLURM_NTASKS
else
    TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
    TASKS_PER_NODE=${TASKS_PER_NODE%%\(*}     # "8(x2)" -> 8
    WORLD_SIZE_ALLOC=$(( ${SLURM_NNODES:-1} * TASKS_PER_NODE ))
fi
# Standard library only, so the host interpreter does even when the tasks run in a container.
PREFLIGHT_PYTHON=${PREFLIGHT_PYTHON:-$([ -n "$CONTAINER_IMAGE" ] && echo python3 || echo "$PYTHON")}
"$PREFLIGHT_PYTHON" -m megatron_llamapro.runtime.preflight --world-size "$WORLD_SIZE_ALLOC" \
    --tp "$TP" --pp "$PP" --global-batch-size "$GBS" --micro-batch-size "$MBS"
rc=$?
[ "$rc" -eq 0 ] || exit "$rc"

# ---------------------------------------------------------------- trainer command line
read -r -a DATA_ARGS <<< "$DATA_PATH"
read -r -a VALID_ARGS <<< "$VALID_DATA"
read -r -a EXTRA <<< "$EXTRA_ARGS"
TRAIN_CMD=("$PYTHON" -m megatron_llamapro.pretrain
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
[ -n "$VPP" ] && TRAIN_CMD+=(--virtual-pipeline-model-parallel-size "$VPP")
TRAIN_CMD+=(--micro-batch-size "$MBS" --global-batch-size "$GBS" --seq-length "$SEQ_LEN"
    --train-iters "$TRAIN_ITERS" --lr "$LR" --load "$LOAD" --save "$SAVE" --data-path "${DATA_ARGS[@]}")
[ "${#VALID_ARGS[@]}" -gt 0 ] && TRAIN_CMD+=(--valid-data "${VALID_ARGS[@]}")
[ -n "$FP8" ] && TRAIN_CMD+=(--fp8 "$FP8")
TRAIN_CMD+=(--save-interval "$SAVE_INTERVAL" --eval-interval "$EVAL_INTERVAL" "${EXTRA[@]}" "$@")

# ---------------------------------------------------------------- launcher
SRUN=(srun --kill-on-bad-exit=0 --wait="$TASK_EXIT_WAIT" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
[ "$GPUS_PER_NODE" -gt 0 ] && SRUN+=(--gpus-per-node="$GPUS_PER_NODE")
if [ -n "$CONTAINER_IMAGE" ]; then
    SRUN+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_DIR")
    [ -n "$CONTAINER_MOUNTS" ] && SRUN+=(--container-mounts="$CONTAINER_MOUNTS")
fi
if [ "$LAUNCHER" = mpi ]; then
    # Ranks come from MPI (mpi4py) in every task; do not set RANK/WORLD_SIZE here.
    LAUNCH=("${SRUN[@]}" --mpi="$SRUN_MPI" "${TRAIN_CMD[@]}")
else
    # One task per GPU; torch.distributed's env:// variables from Slurm's per-task ones.
    LAUNCH=("${SRUN[@]}" bash -c \
        'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \
        llamapro-task "${TRAIN_CMD[@]}")
fi

mkdir -p "$SAVE" 2>/dev/null || true
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "$WORLD_SIZE_ALLOC tasks, $GPUS_PER_NODE GPU(s)/node, master $MASTER_ADDR:$MASTER_PORT, launcher $LAUNCHER"
log "trainer: ${TRAIN_CMD[*]}"

# Preempted before anything ran: nothing to save, just come back later (or stop when cancelled).
case "$PENDING_SIGNAL" in
    USR1) requeue_and_exit ;;
    TERM) exit 143 ;;
    INT) exit 130 ;;
esac

# srun runs in the background so this shell can take signals while it waits; `wait` returns early
# when a trapped signal arrives (on_signal forwards it to srun, which forwards it to every task),
# hence the loop.
"${LAUNCH[@]}" &
SRUN_PID=$!
[ -n "$PENDING_SIGNAL" ] && on_signal "$PENDING_SIGNAL"

rc=0
while :; do
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
# If the last wait was cut short by a signal just as srun ended, its saved status is still there.
wait "$SRUN_PID" 2>/dev/null
rc2=$?
[ "$rc2" -ne 127 ] && rc=$rc2
log "training step ended with exit code $rc"

if [ "$rc" -eq 75 ]; then
    # The trainer's PREEMPTION exit code: "checkpoint saved, please requeue".
    log "trainer saved a checkpoint and asked to be requeued (exit 75)"
    requeue_and_exit
fi
exit "$rc"
