#!/bin/bash
# LLaMA Pro block expansion of a Megatron checkpoint (one CPU node, no GPUs): insert identity copies
# of blocks (attention and FFN output projections zeroed), interleaved by default.
#
#   mkdir -p logs
#   IN=ckpt/llama2-7b-tp1 OUT=ckpt/llama2-7b-expanded NUM_NEW_BLOCKS=8 sbatch slurm/expand.sh
#
# Submit from the repository root. #SBATCH lines are defaults; sbatch's command line overrides them.
# Environment variables (IN and OUT are required):
#   IN               Megatron checkpoint to expand (slurm/convert.sh OUT)
#   OUT              expanded checkpoint directory (slurm/pretrain_expand.sh LOAD)
#   NUM_NEW_BLOCKS   blocks to add, P (8: LLaMA2-7B 32 -> 40 blocks)
#   PLACEMENT        where the new blocks go: interleaved (default), top or bottom
#   TP PP VPP FORMAT target layout / format of the output (empty: keep the input's)
#   VERIFY           1 = check that the expanded model's logits equal the original's (--verify)
#   WORKERS          worker processes (default: the CPUs of the task, $SLURM_CPUS_PER_TASK)
#   PYTHON           interpreter that has megatron_llamapro installed (python3)
#   CONTAINER_IMAGE  pyxis/enroot image to run the tool in (srun --container-image)
#   CONTAINER_MOUNTS pyxis --container-mounts (default: the repository at the same path)
#   EXTRA_ARGS       more tool arguments (word-split); arguments after the script come last
#
#SBATCH --job-name=llamapro-expand
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=4:00:00
#SBATCH --output=logs/%x-%j.out

set -uo pipefail
die() { echo "[expand.sh] error: $*" >&2; exit 2; }

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || die "cannot cd to REPO_DIR=$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

IN=${IN:-}
OUT=${OUT:-}
NUM_NEW_BLOCKS=${NUM_NEW_BLOCKS:-8}
PLACEMENT=${PLACEMENT:-interleaved}
TP=${TP:-}
PP=${PP:-}
VPP=${VPP:-}
FORMAT=${FORMAT:-}
VERIFY=${VERIFY:-0}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}
PYTHON=${PYTHON:-python3}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}
EXTRA_ARGS=${EXTRA_ARGS:-}
[ -n "$IN" ] || die "IN (the checkpoint to expand) is not set"
[ -n "$OUT" ] || die "OUT (the output directory) is not set"

# Each worker processes its own shards: keep their thread pools from oversubscribing the node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

read -r -a EXTRA <<< "$EXTRA_ARGS"
CMD=("$PYTHON" tools/expand_blocks.py --in "$IN" --out "$OUT" --num-new-blocks "$NUM_NEW_BLOCKS")
[ -n "$PLACEMENT" ] && CMD+=(--placement "$PLACEMENT")
[ -n "$TP" ] && CMD+=(--tp "$TP")
[ -n "$PP" ] && CMD+=(--pp "$PP")
[ -n "$VPP" ] && CMD+=(--vpp "$VPP")
[ -n "$FORMAT" ] && CMD+=(--format "$FORMAT")
[ "$VERIFY" = 1 ] && CMD+=(--verify)
CMD+=(--workers "$WORKERS" "${EXTRA[@]}" "$@")

if [ -n "$CONTAINER_IMAGE" ]; then
    CMD=(srun --ntasks=1 --container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_DIR"
         ${CONTAINER_MOUNTS:+--container-mounts="$CONTAINER_MOUNTS"} "${CMD[@]}")
fi
echo "[expand.sh $(date '+%F %T')] job ${SLURM_JOB_ID:-none}: ${CMD[*]}"
"${CMD[@]}"
rc=$?
echo "[expand.sh $(date '+%F %T')] exit code $rc"
exit "$rc"
