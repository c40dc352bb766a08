#!/bin/bash
# Convert a Hugging Face LLaMA-family checkpoint to Megatron shards (one CPU node, no GPUs).
#
#   mkdir -p logs
#   HF_DIR=/models/Llama-2-7b-hf OUT=ckpt/llama2-7b-tp1 sbatch slurm/convert.sh [extra converter args...]
#
# Submit from the repository root. #SBATCH lines are defaults; sbatch's command line overrides them.
# Environment variables (HF_DIR and OUT are required):
#   HF_DIR           HF checkpoint directory (config.json, *.safetensors, tokenizer files)
#   OUT              output checkpoint directory
#   TP PP VPP        target tensor / pipeline / virtual-pipeline sizes (1, 1, empty = none)
#   FORMAT           torch_dist (default: loads under any TP/PP) or torch (legacy per-rank files)
#   VERIFY           1 = compare logits of the converted checkpoint with the HF model (--verify)
#   PYTHON           interpreter that has megatron_llamapro installed (python3)
#   CONTAINER_IMAGE  pyxis/enroot image to run the converter in (srun --container-image)
#   CONTAINER_MOUNTS pyxis --container-mounts (default: the repository at the same path)
#   EXTRA_ARGS       more converter arguments (word-split); arguments after the script come last
#
#SBATCH --job-name=llamapro-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=4:00:00
#SBATCH --output=logs/%x-%j.out

set -uo pipefail
die() { echo "[convert.sh] error: $*" >&2; exit 2; }

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || die "cannot cd to REPO_DIR=$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

HF_DIR=${HF_DIR:-}
OUT=${OUT:-}
TP=${TP:-1}
PP=${PP:-1}
VPP=${VPP:-}
FORMAT=${FORMAT:-torch_dist}
VERIFY=${VERIFY:-0}
PYTHON=${PYTHON:-python3}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}
EXTRA_ARGS=${EXTRA_ARGS:-}
[ -n "$HF_DIR" ] || die "HF_DIR (the Hugging Face checkpoint) is not set"
[ -n "$OUT" ] || die "OUT (the output directory) is not set"

# Tensor copies and (de)serialization use every CPU of the allocation.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

read -r -a EXTRA <<< "$EXTRA_ARGS"
CMD=("$PYTHON" tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --out "$OUT" --tp "$TP" --pp "$PP")
[ -n "$VPP" ] && CMD+=(--vpp "$VPP")
CMD+=(--format "$FORMAT")
[ "$VERIFY" = 1 ] && CMD+=(--verify)
CMD+=("${EXTRA[@]}" "$@")

if [ -n "$CONTAINER_IMAGE" ]; then
    CMD=(srun --ntasks=1 --container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_DIR"
         ${CONTAINER_MOUNTS:+--container-mounts="$CONTAINER_MOUNTS"} "${CMD[@]}")
fi
echo "[convert.sh $(date '+%F %T')] job ${SLURM_JOB_ID:-none}: ${CMD[*]}"
"${CMD[@]}"
rc=$?
echo "[convert.sh $(date '+%F %T')] exit code $rc"
exit "$rc"
