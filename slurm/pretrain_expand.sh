#!/bin/bash
# LLaMA Pro post-pretraining of an expanded checkpoint (only the new blocks train), multi-node,
# and with SFT=1 the paper's second stage, instruction tuning of the result (all parameters).
#
#   LOAD=ckpt/llama2-7b-expanded DATA_PATH="1.0 data/proofpile_text_document 1.5 data/stack_py_text_document" \
#   SAVE=ckpt/llamapro-run1 slurm/pretrain_expand.sh --submit [sbatch options...] [-- trainer arguments...]
#
#   SFT=1 LOAD=ckpt/llamapro-run1 DATA_PATH=data/sft_chat_document TRAIN_ITERS=7800 \
#   VALID_DATA="general=data/wiki_text_document" SAVE=ckpt/llamapro-instruct slurm/pretrain_expand.sh --submit
#
# Run it from the repository root (the job cds to $SLURM_SUBMIT_DIR), in one of three ways:
#   slurm/pretrain_expand.sh --check [sbatch options...] [-- trainer arguments...]
#       On the login node, no allocation: checks what the job would run with these sbatch options and
#       this environment before any queue wait: the task count (nodes x tasks-per-node) against
#       TP x PP, GPUs per node and the batch sizes, then the trainer's own `--check` with the flags
#       the job passes (LOAD, SAVE, DATA_PATH and VALID_DATA paths, the checkpoint, its layout and
#       expansion plan). Creates the directory of --output (logs/). Prints one line per problem and
#       exits 2, or prints one `check: ok: ...` line and exits 0. It runs $PYTHON on the login node.
#   slurm/pretrain_expand.sh --submit [sbatch options...] [-- trainer arguments...]
#       The same check, then `sbatch [sbatch options...] slurm/pretrain_expand.sh [trainer arguments...]`.
#   sbatch [sbatch options...] slurm/pretrain_expand.sh [trainer arguments...]
#       The job alone, unchecked. logs/ must exist: Slurm opens --output before the script runs, and
#       without its directory the job fails with no output at all.
# The check reads the allocation from --nodes/-N, --ntasks-per-node, --ntasks/-n, --gpus-per-node,
# --job-name/-J, --output/-o, --error/-e and --chdir/-D: on the command line, in SBATCH_JOB_NAME,
# SBATCH_OUTPUT, SBATCH_ERROR, SBATCH_GPUS_PER_NODE, else in the #SBATCH lines below (sbatch's order).
# Every #SBATCH line below is a default that sbatch's own command line overrides, e.g.
#   slurm/pretrain_expand.sh --submit --nodes=4 --time=2:00:00 --partition=big
#
# CPU-only clusters (no GPUs, e.g. the project's own tests): sbatch refuses the GPU defaults below
# ("Requested node configuration is not available" for --gpus-per-node=8; 8 tasks x 12 CPUs may not
# fit a node either). Override them; the trainer then runs on gloo by itself. One task per node here,
# --cpus-per-task = the CPUs each task's torch threads get (OMP_NUM_THREADS):
#   slurm/pretrain_expand.sh --submit --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1
#
# Environment variables (all optional except LOAD and DATA_PATH; sbatch passes your environment on,
# and --check reads the same ones):
#   SFT             empty or 0: post-pretraining of the new blocks; 1: instruction tuning (--sft): DATA_PATH
#                   names chat sets (tools/preprocess_data.py --chat output, PREFIX_chat_document), every
#                   parameter trains, the loss is on assistant tokens, and the defaults below marked
#                   [SFT] apply; TRAIN_ITERS must be given (the trainer logs the sequences per epoch)
#   LOAD            expanded Megatron checkpoint to start from (tools/expand_blocks.py --out; with SFT=1
#                   usually the post-pretraining SAVE)
#   DATA_PATH       training blend "W1 PREFIX1 W2 PREFIX2 ..." (or a single PREFIX); prefixes of
#                   tools/preprocess_data.py output (PREFIX.bin/.idx); no spaces inside paths; with SFT=1
#                   chat set prefixes without weights
#   VALID_DATA      validation sets "NAME=PREFIX NAME=PREFIX", e.g. "general=data/wiki domain=data/math";
#                   empty: no --valid-data
#   SAVE            checkpoint directory (default checkpoints/<job name>). A job restarted or
#                   requeued with the same SAVE resumes from the latest checkpoint there by itself.
#   TP PP VPP       tensor / pipeline / virtual-pipeline parallel sizes (1, 1, empty = no VPP)
#   MBS GBS         micro / global batch size in sequences (1, 1024) [SFT: 1, 128]
#   SEQ_LEN         sequence length (4096)
#   TRAIN_ITERS     total training iterations, counted from iteration 0 across restarts (15900) [SFT: required]
#   LR              peak learning rate (2e-4) [SFT: 2e-5; cosine to 0 with 3% warm-up, the trainer's --sft defaults]
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
# Arguments after the script name (after `--` with --check/--submit) are passed to the trainer last.
#
# Preemption / time limit (README, "Operating on Slurm", has what each Slurm setting does to a run): Slurm sends
# SIGUSR1 to this batch shell 300 s before the time limit (--signal=B:USR1@300), and
# `scancel -b -s USR1 JOB` does the same by hand. The trap below forwards it to the srun step (srun
# forwards it to every task); the trainer finishes its step, saves a checkpoint and exits 75
# ("checkpoint saved, please requeue"), and this script then runs `scontrol requeue $SLURM_JOB_ID`
# and exits 0. SIGTERM (scancel, the time limit itself, scontrol requeue, preemption) is forwarded
# the same way; the tasks get it from Slurm too, and SIGKILL KillWait seconds later. On SIGTERM the
# script reads at once, from the job's record, why Slurm ends the job, and says so before anything
# slow: a cancelled job (scancel) is not requeued, nor one Slurm requeues itself (scontrol requeue);
# at the time limit it is requeued as after SIGUSR1. Any other non-zero trainer exit code is returned.
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

MODE=job
case "${1:-}" in
    --check|--submit) MODE=${1#--}; shift ;;
esac

log() { echo "[pretrain_expand.sh $(date '+%F %T')] $*"; }
die() { echo "pretrain_expand.sh: error: $*" >&2; exit 2; }
# Problems found while reading the settings: all reported together, one line each.
PROBLEMS=()
problem() { PROBLEMS+=("$*"); }
exit_on_problems() {
    [ "${#PROBLEMS[@]}" -eq 0 ] && return
    printf 'pretrain_expand.sh: error: %s\n' "${PROBLEMS[@]}" >&2
    exit 2
}

# Signals are trapped from the first line of the job on: bash's default for SIGUSR1 is to die, and
# the preemption signal may come at any time (even at start, when less than 300 s are left).
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
    # SIGKILL follows a SIGTERM from Slurm KillWait seconds later, maybe before the trainer is done:
    # decide now whether this job may be requeued, and say so.
    [ "$1" = TERM ] && decide_ending
}
if [ "$MODE" = job ]; then
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT
fi

# Why Slurm ends this job, if it does, from its record: scancel, the time limit and `scontrol
# requeue` all send SIGTERM, and while the job's processes run, its state reads COMPLETING for each.
# Prints running (Slurm is not ending it: SIGUSR1, a signal alone), requeued (its restart count has
# gone up: Slurm requeues it itself, after scontrol requeue or a preemption in REQUEUE mode), timeout
# (Reason=TimeLimit) or cancelled (scancel, or Slurm ends it for any other reason: it stays ended).
job_ending() {
    local record= state=RUNNING reason= restarts=0
    [ -n "${SLURM_JOB_ID:-}" ] && record=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null)
    [[ $record =~ JobState=([A-Z_]+) ]] && state=${BASH_REMATCH[1]}
    [[ $record =~ \ Reason=([^ ]+) ]] && reason=${BASH_REMATCH[1]}
    [[ $record =~ \ Restarts=([0-9]+) ]] && restarts=${BASH_REMATCH[1]}
    if [ "$restarts" -gt "${SLURM_RESTART_COUNT:-0}" ]; then
        echo requeued
    elif [ "$state" = TIMEOUT ] || { [ "$state" = COMPLETING ] && [ "$reason" = TimeLimit ]; }; then
        echo timeout
    elif [ "$state" = COMPLETING ] || [ "$state" = CANCELLED ] || [ "$state" = PREEMPTED ]; then
        echo cancelled
    else
        echo running
    fi
}

# Whether this job may be requeued (ENDING, from job_ending), said in one line when not; read again
# until Slurm ends the job (a signal alone, `scancel -s TERM`, leaves it running).
ENDING=
decide_ending() {
    [ -n "$ENDING" ] && [ "$ENDING" != running ] && return
    ENDING=$(job_ending)
    case $ENDING in
        cancelled) log "not requeueing: job $SLURM_JOB_ID was cancelled (scancel); a job with the same SAVE" \
                       "resumes from the latest checkpoint in ${SAVE:-SAVE}" ;;
        requeued) log "not requeueing: job $SLURM_JOB_ID is already being requeued (scontrol requeue or" \
                      "preemption); it resumes from the latest checkpoint in ${SAVE:-SAVE}" ;;
    esac
}

requeue_and_exit() {
    decide_ending
    case $ENDING in cancelled|requeued) exit 0 ;; esac
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

require_integer() {   # NAME MIN: the variable NAME holds an integer >= MIN
    local value=${!1}
    [[ $value =~ ^[0-9]+$ ]] && [ "$value" -ge "$2" ] || problem "$1 must be an integer >= $2, got '$value'"
}

require_command() {   # NAME: the variable NAME names a command that exists here
    command -v -- "${!1}" >/dev/null || die "$1=${!1}: command not found"
}

# ---------------------------------------------------------------- the allocation sbatch will make
# (--check/--submit only) sbatch's precedence: command line over SBATCH_* environment variables
# over the #SBATCH lines of the script. Other options are sbatch's business and are skipped.
SB_NODES=1 SB_TASKS_PER_NODE=1 SB_NTASKS= SB_GPUS_PER_NODE= SB_JOB_NAME= SB_OUTPUT= SB_ERROR= SB_CHDIR=
set_sbatch_option() {   # NAME VALUE
    case $1 in
        nodes|N) SB_NODES=$2 ;;
        ntasks-per-node) SB_TASKS_PER_NODE=$2 ;;
        ntasks|n) SB_NTASKS=$2 ;;
        gpus-per-node) SB_GPUS_PER_NODE=${2##*:} ;;     # "h100:8" -> 8
        job-name|J) SB_JOB_NAME=$2 ;;
        output|o) SB_OUTPUT=$2 ;;
        error|e) SB_ERROR=$2 ;;
        chdir|D) SB_CHDIR=$2 ;;
    esac
}
read_sbatch_options() {   # WHERE OPTION...
    local where=$1 word
    shift
    while [ $# -gt 0 ]; do
        word=$1
        shift
        case $word in
            --*=*) word=${word#--}; set_sbatch_option "${word%%=*}" "${word#*=}" ;;
            --nodes|--ntasks-per-node|--ntasks|--gpus-per-node|--job-name|--output|--error|--chdir|-[NnJoeD])
                [ $# -gt 0 ] || { problem "$where: $word needs a value"; return; }
                word=${word#-}
                set_sbatch_option "${word#-}" "$1"
                shift ;;
            -[NnJoeD]?*) set_sbatch_option "${word:1:1}" "${word:2}" ;;
        esac
    done
}

# mkdir -p DIR, or a problem naming OPTION=PATTERN and the reason.
make_log_dir() {   # OPTION PATTERN
    local dir err base
    [ -n "$2" ] || return 0
    dir=$(dirname -- "$2")
    dir=${dir//\%x/$JOB_NAME}
    [[ $dir == *%u* ]] && dir=${dir//\%u/$(id -un)}
    case $dir in
        *%*) problem "--$1=$2: its directory has a per-job pattern; Slurm creates no directories, create it yourself"
             return ;;
    esac
    if [[ $dir != /* ]]; then
        base=${SB_CHDIR:-$INVOKE_DIR}
        [[ $base == /* ]] || base=$INVOKE_DIR/$base
        dir=$base/$dir
    fi
    err=$(mkdir -p -- "$dir" 2>&1) || problem "--$1=$2: cannot create the directory $dir: ${err##*: }"
}

# SAVE exists as a writable directory, or can be made in its nearest existing parent.
check_save_writable() {
    local dir=$SAVE
    [[ $dir == /* ]] || dir=$REPO_DIR/$dir
    while [ ! -e "$dir" ]; do dir=$(dirname -- "$dir"); done
    [ -d "$dir" ] && [ -w "$dir" ] || problem "SAVE=$SAVE: $dir is not a writable directory"
}

INVOKE_DIR=$PWD
if [ "$MODE" = job ]; then
    JOB_NAME=${SLURM_JOB_NAME:-llamapro}
else
    SCRIPT_PATH=$(readlink -f -- "${BASH_SOURCE[0]}")
    SBATCH_ARGS=()
    TRAINER_ARGS=()
    while [ $# -gt 0 ]; do
        if [ "$1" = -- ]; then
            shift
            TRAINER_ARGS=("$@")
            break
        fi
        SBATCH_ARGS+=("$1")
        shift
    done
    # sbatch reads #SBATCH lines up to the first line that is neither a comment nor blank.
    while read -r line; do
        read -r -a words <<< "$line"
        read_sbatch_options "#SBATCH $line" "${words[@]}"
    done < <(awk '/^#SBATCH/ { sub(/^#SBATCH[ \t]*/, ""); print; next } /^[ \t]*(#|$)/ { next } { exit }' "$SCRIPT_PATH")
    [ -n "${SBATCH_JOB_NAME:-}" ] && SB_JOB_NAME=$SBATCH_JOB_NAME
    [ -n "${SBATCH_OUTPUT:-}" ] && SB_OUTPUT=$SBATCH_OUTPUT
    [ -n "${SBATCH_ERROR:-}" ] && SB_ERROR=$SBATCH_ERROR
    [ -n "${SBATCH_GPUS_PER_NODE:-}" ] && SB_GPUS_PER_NODE=${SBATCH_GPUS_PER_NODE##*:}
    read_sbatch_options "sbatch options" "${SBATCH_ARGS[@]}"
    JOB_NAME=${SB_JOB_NAME:-$(basename -- "$SCRIPT_PATH")}

    if [[ ! $SB_NODES =~ ^[0-9]+$ ]] || [ "$SB_NODES" -lt 1 ]; then
        problem "--nodes=$SB_NODES: the check needs one node count (a min-max range leaves the task count open)"
    fi
    if [ -n "$SB_NTASKS" ]; then
        [[ $SB_NTASKS =~ ^[0-9]+$ ]] && [ "$SB_NTASKS" -ge 1 ] || problem "--ntasks=$SB_NTASKS: must be a positive integer"
    elif [[ ! $SB_TASKS_PER_NODE =~ ^[0-9]+$ ]] || [ "$SB_TASKS_PER_NODE" -lt 1 ]; then
        problem "--ntasks-per-node=$SB_TASKS_PER_NODE: must be a positive integer"
    fi
    if [ -n "$SB_GPUS_PER_NODE" ] && [[ ! $SB_GPUS_PER_NODE =~ ^[0-9]+$ ]]; then
        problem "--gpus-per-node=$SB_GPUS_PER_NODE: must be a GPU count"
    fi
    if [ "$MODE" = submit ] && ! command -v sbatch >/dev/null; then
        problem "sbatch: command not found (--submit runs it; --check alone needs no Slurm)"
    fi
    make_log_dir output "$SB_OUTPUT"
    make_log_dir error "$SB_ERROR"
fi

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" 2>/dev/null || die "REPO_DIR=$REPO_DIR: cannot cd there (no such directory, or no access)"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = job ] && [ -z "${SLURM_JOB_ID:-}" ]; then
    die "SLURM_JOB_ID is not set: this is the job script; submit it with sbatch or" \
        "'slurm/pretrain_expand.sh --submit [sbatch options]' (checks the settings first), or run it inside an allocation"
fi

# ---------------------------------------------------------------- settings
SFT=${SFT:-}
case "$SFT" in ""|0) SFT= ;; 1) ;; *) problem "SFT must be empty, 0 or 1, got '$SFT'" ;; esac
LOAD=${LOAD:-}
DATA_PATH=${DATA_PATH:-}
VALID_DATA=${VALID_DATA:-}
SAVE=${SAVE:-checkpoints/$JOB_NAME}
TP=${TP:-1}
PP=${PP:-1}
VPP=${VPP:-}
MBS=${MBS:-1}
GBS=${GBS:-$([ -n "$SFT" ] && echo 128 || echo 1024)}
SEQ_LEN=${SEQ_LEN:-4096}
if [ -n "$SFT" ] && [ -z "${TRAIN_ITERS:-}" ]; then
    problem "TRAIN_ITERS is not set: with SFT=1 give the number of steps (about samples x epochs / GBS; packing" \
        "puts several samples in a sequence, and the trainer's --check/start lines say how many sequences an epoch has)"
fi
TRAIN_ITERS=${TRAIN_ITERS:-15900}
LR=${LR:-$([ -n "$SFT" ] && echo 2e-5 || echo 2e-4)}
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
# Standard library only, so the host interpreter does even when the tasks run in a container.
PREFLIGHT_PYTHON=${PREFLIGHT_PYTHON:-$([ -n "$CONTAINER_IMAGE" ] && echo python3 || echo "$PYTHON")}

[ -n "$LOAD" ] || problem "LOAD is not set: the expanded checkpoint to train (tools/expand_blocks.py --out)"
[ -n "$DATA_PATH" ] || problem "DATA_PATH is not set: the training blend \"W1 PREFIX1 W2 PREFIX2 ...\" or one PREFIX"
for name in TP PP MBS GBS SEQ_LEN TRAIN_ITERS; do require_integer "$name" 1; done
for name in SAVE_INTERVAL EVAL_INTERVAL MAX_REQUEUES TASK_EXIT_WAIT; do require_integer "$name" 0; done
[ -z "$VPP" ] || require_integer VPP 1
[[ $LR =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] || problem "LR must be a number, got '$LR'"
case "$FP8" in ""|hybrid|e4m3) ;; *) problem "FP8 must be empty, hybrid or e4m3, got '$FP8'" ;; esac
case "$LAUNCHER" in srun|mpi) ;; *) problem "LAUNCHER must be srun or mpi, got '$LAUNCHER'" ;; esac

# GPUs per node: explicit, else what the allocation got (SLURM_GPUS_PER_NODE may read "h100:8").
if [ -n "${GPUS_PER_NODE:-}" ]; then
    require_integer GPUS_PER_NODE 0
elif [ "$MODE" = job ]; then
    GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-0}
    GPUS_PER_NODE=${GPUS_PER_NODE##*:}
    [[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || GPUS_PER_NODE=0
else
    GPUS_PER_NODE=$SB_GPUS_PER_NODE
fi
[ "$MODE" = job ] || check_save_writable
exit_on_problems

# The trainer's command line, from the settings and the trainer arguments given.
build_train_cmd() {   # TRAINER_ARG...
    local data_args valid_args extra
    read -r -a data_args <<< "$DATA_PATH"
    read -r -a valid_args <<< "$VALID_DATA"
    read -r -a extra <<< "$EXTRA_ARGS"
    TRAIN_CMD=("$PYTHON" -m megatron_llamapro.pretrain
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
    [ -n "$SFT" ] && TRAIN_CMD+=(--sft)
    [ -n "$VPP" ] && TRAIN_CMD+=(--virtual-pipeline-model-parallel-size "$VPP")
    TRAIN_CMD+=(--micro-batch-size "$MBS" --global-batch-size "$GBS" --seq-length "$SEQ_LEN"
        --train-iters "$TRAIN_ITERS" --lr "$LR" --load "$LOAD" --save "$SAVE" --data-path "${data_args[@]}")
    [ "${#valid_args[@]}" -gt 0 ] && TRAIN_CMD+=(--valid-data "${valid_args[@]}")
    [ -n "$FP8" ] && TRAIN_CMD+=(--fp8 "$FP8")
    TRAIN_CMD+=(--save-interval "$SAVE_INTERVAL" --eval-interval "$EVAL_INTERVAL" "${extra[@]}" "$@")
}

# ---------------------------------------------------------------- --check / --submit (login node)
if [ "$MODE" != job ]; then
    require_command PREFLIGHT_PYTHON
    ALLOCATION_ARGS=()
    if [ -n "$SB_NTASKS" ]; then
        WORLD_SIZE_ALLOC=$SB_NTASKS
    else
        WORLD_SIZE_ALLOC=$((SB_NODES * SB_TASKS_PER_NODE))
        [ -n "$GPUS_PER_NODE" ] && ALLOCATION_ARGS=(--tasks-per-node "$SB_TASKS_PER_NODE" --gpus-per-node "$GPUS_PER_NODE")
    fi
    "$PREFLIGHT_PYTHON" -m megatron_llamapro.runtime.preflight --world-size "$WORLD_SIZE_ALLOC" \
        --tp "$TP" --pp "$PP" --global-batch-size "$GBS" --micro-batch-size "$MBS" "${ALLOCATION_ARGS[@]}" \
        >/dev/null || exit $?
    require_command PYTHON
    build_train_cmd "${TRAINER_ARGS[@]}"
    # Rank 0 of WORLD_SIZE_ALLOC: the trainer checks for the job's world size without starting it.
    RANK=0 LOCAL_RANK=0 WORLD_SIZE=$WORLD_SIZE_ALLOC "${TRAIN_CMD[@]}" --check || exit $?
    [ "$MODE" = submit ] || exit 0
    cd "$INVOKE_DIR" 2>/dev/null || die "cannot cd back to $INVOKE_DIR to submit from there"
    exec sbatch "${SBATCH_ARGS[@]}" "$SCRIPT_PATH" "${TRAINER_ARGS[@]}"
fi

# ---------------------------------------------------------------- environment for the tasks
if [ -z "${MASTER_ADDR:-}" ]; then
    [ -n "${SLURM_JOB_NODELIST:-}" ] ||
        die "SLURM_JOB_NODELIST is not set: cannot take MASTER_ADDR from the allocation's first host; set MASTER_ADDR"
    HOSTS_ERR=$(mktemp) || die "mktemp failed: cannot create a temporary file in ${TMPDIR:-/tmp}"
    HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>"$HOSTS_ERR")
    rc=$?
    HOSTS_ERR_LINE=$(head -n 1 "$HOSTS_ERR")
    rm -f "$HOSTS_ERR"
    if [ "$rc" -ne 0 ]; then
        die "MASTER_ADDR: 'scontrol show hostnames $SLURM_JOB_NODELIST' failed (exit $rc)${HOSTS_ERR_LINE:+: $HOSTS_ERR_LINE};" \
            "set MASTER_ADDR to the job's first host"
    fi
    MASTER_ADDR=${HOSTS%%$'\n'*}
    [ -n "$MASTER_ADDR" ] ||
        die "MASTER_ADDR is empty: 'scontrol show hostnames $SLURM_JOB_NODELIST' printed no host; set MASTER_ADDR to the job's first host"
fi
export MASTER_ADDR
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
require_command PREFLIGHT_PYTHON
"$PREFLIGHT_PYTHON" -m megatron_llamapro.runtime.preflight --world-size "$WORLD_SIZE_ALLOC" \
    --tp "$TP" --pp "$PP" --global-batch-size "$GBS" --micro-batch-size "$MBS"
rc=$?
[ "$rc" -eq 0 ] || exit "$rc"

# ---------------------------------------------------------------- launcher
build_train_cmd "$@"
command -v srun >/dev/null || die "srun: command not found (this script runs inside a Slurm job)"
SRUN=(srun --kill-on-bad-exit=0 --wait="$TASK_EXIT_WAIT" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
[ "$GPUS_PER_NODE" -gt 0 ] && SRUN+=(--gpus-per-node="$GPUS_PER_NODE")
if [ -n "$CONTAINER_IMAGE" ]; then
    SRUN+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_DIR")
    [ -n "$CONTAINER_MOUNTS" ] && SRUN+=(--container-mounts="$CONTAINER_MOUNTS")
else
    require_command PYTHON
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

MKDIR_ERR=$(mkdir -p -- "$SAVE" 2>&1) || die "SAVE=$SAVE: cannot create the directory: ${MKDIR_ERR##*: }"
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$MASTER_ADDR}:" \
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
    # The trainer's PREEMPTION exit code: "stopped early, please requeue" (its stop line says whether
    # it saved a checkpoint at the stop, else the run resumes from the one before).
    log "trainer stopped early and asked to be requeued (exit 75)"
    requeue_and_exit
fi
exit "$rc"
