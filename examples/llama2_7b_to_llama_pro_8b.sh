#!/bin/bash
# LLaMA-2-7B -> LLaMA Pro 8.3B, the paper's recipe on a Slurm cluster (Wu et al., ACL 2024).
#
#   HF LLaMA-2-7B -> Megatron shards -> 32 -> 40 blocks (8 new interleaved identity blocks)
#   -> tokenize Proof-Pile-2 (AlgebraicStack, OpenWebMath, ArXiv) and The Stack (dedup) Python
#   -> train only the 8 new blocks (sbatch slurm/pretrain_expand.sh) -> export to Hugging Face.
#
# Run from the repository root, one stage at a time or all of them:
#   examples/llama2_7b_to_llama_pro_8b.sh convert      # CPU node, ~10 min, ~30 GB RAM
#   examples/llama2_7b_to_llama_pro_8b.sh expand       # CPU node, ~10 min, ~35 GB RAM
#   examples/llama2_7b_to_llama_pro_8b.sh preprocess   # CPU node(s), hours (see below)
#   examples/llama2_7b_to_llama_pro_8b.sh train        # submits the training job (2 x 8 GPUs)
#   examples/llama2_7b_to_llama_pro_8b.sh export       # CPU node, after training
#   examples/llama2_7b_to_llama_pro_8b.sh sft          # the second stage: LLaMA Pro-Instruct (see below)
#   examples/llama2_7b_to_llama_pro_8b.sh sft_export   # CPU node, after instruction tuning
#   examples/llama2_7b_to_llama_pro_8b.sh all          # convert expand preprocess train (export later)
# The CPU stages run here directly; wrap them in slurm/convert.sh / slurm/expand.sh (same tools) to run
# them as batch jobs. Every path below is a variable you can override from the environment.
#
# ---------------------------------------------------------------------------------------------------
# The paper's recipe (LLaMA Pro 8.3B) and how it maps onto this project
#   base            LLaMA-2-7B, 32 blocks, hidden 4096, FFN 11008, 32 heads (MHA), vocab 32000, 6.74B params
#   expansion       8 groups of 4 blocks; a copy of the last block of each group is inserted after it, its
#                   attention and FFN output projections zeroed (identity at the start): new blocks at
#                   0-based 4, 9, 14, 19, 24, 29, 34, 39 -> 40 blocks, 8.36B params, ~1.62B trainable
#                   (8 x 202M); embeddings, final norm, output layer and the 32 original blocks stay frozen
#   data            Proof-Pile-2 55B tokens (AlgebraicStack 11B, OpenWebMath 15B, ArXiv 29B), weight 1.0;
#                   The Stack dedup Python 22B tokens, weight 1.5
#   batch           global batch 1024 sequences x 4096 tokens (4.19M tokens per step)
#   optimizer       AdamW, lr 2e-4, cosine, 6% warmup, weight decay 0.1, grad clip 1.0, bf16
#   steps           15,900 (66.7B tokens)
#   compute         16 H800, ~7 days, ~2,830 GPU-hours (~6,500 tokens/s/GPU)
# Our measured H100 throughput for this configuration: to be measured (not available yet). Expect the
# order of the paper's: a step costs ~75% of a full-training step (forward + activation gradients
# everywhere above block 4, weight gradients only for the 8 new blocks).
#
# Data weights: megatron's --data-path weights are sampling probabilities per *dataset*, not per
# token. The paper's "weight 1.0 / 1.5" multiply each source's token count, so the blend below uses
# tokens x weight: AlgebraicStack 11 x 1.0, OpenWebMath 15 x 1.0, ArXiv 29 x 1.0, Python 22 x 1.5 = 33
# (88B weighted tokens; 15,900 steps consume 66.7B of them).
#
# Sizes and memory
#   HF checkpoint (fp16)             13.5 GB      Megatron torch_dist (bf16)        13.5 GB
#   expanded checkpoint (bf16)       16.7 GB      training checkpoint (weights + fp32 master weights and
#                                                 Adam moments of the 1.62B trainable params) ~36 GB;
#                                                 --save-trainable-only writes ~23 GB (new blocks + optimizer;
#                                                 fold it into the expanded checkpoint with
#                                                 tools/merge_delta.py before exporting)
#   tokenized data (uint16 ids, vocab 32000 < 65536): ~2 bytes/token -> Proof-Pile-2 ~110 GB, Python ~44 GB
#   GPU memory per rank (TP=2, PP=1, MBS=1, seq 4096, bf16, distributed optimizer over DP=8):
#     weights 8.4 GB + trainable fp32 master/Adam ~1.2 GB + activations; selective recompute keeps it well
#     under 80 GB. TP=1 fits an 80 GB GPU too with --recompute-granularity full (slower).
# ---------------------------------------------------------------------------------------------------

set -euo pipefail

PYTHON=${PYTHON:-python3}
HF_DIR=${HF_DIR:-/models/Llama-2-7b-hf}          # config.json, *.safetensors, tokenizer.model
CKPT=${CKPT:-ckpt}
BASE_MG=${BASE_MG:-$CKPT/llama2-7b-tp2}          # converted original
EXPANDED=${EXPANDED:-$CKPT/llama2-7b-expanded-40} # LOAD for training
SAVE=${SAVE:-$CKPT/llama-pro-8b}                 # training checkpoints (auto-resume)
EXPORT=${EXPORT:-$CKPT/llama-pro-8b-hf}          # final HF model
SFT_JSONL=${SFT_JSONL:-sft/*.jsonl}              # instruction data: messages / ShareGPT / Alpaca lines
SFT_SAVE=${SFT_SAVE:-$CKPT/llama-pro-8b-instruct}
SFT_EXPORT=${SFT_EXPORT:-$CKPT/llama-pro-8b-instruct-hf}
SFT_ITERS=${SFT_ITERS:-7800}                     # ~1M samples / GBS 128 = one pass; the start line gives
                                                 # the packed sequences per epoch: adjust to it
RAW=${RAW:-raw}                                  # downloaded jsonl files (see "preprocess")
DATA=${DATA:-data}                               # tokenized .bin/.idx
WORKERS=${WORKERS:-$(nproc)}
TP=${TP:-2}
PP=${PP:-1}
NODES=${NODES:-2}                                # 2 nodes x 8 GPUs = the paper's 16 GPUs

stage_convert() {
    # HF -> Megatron shards. torch_dist loads under any TP/PP, so this layout is not binding.
    "$PYTHON" tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --out "$BASE_MG" \
        --tp "$TP" --pp "$PP" --format torch_dist --dtype bf16 --verify
}

stage_expand() {
    # 32 -> 40 blocks. --dry-run first prints the plan (new layers 4, 9, ..., 39 and their sources).
    "$PYTHON" tools/expand_blocks.py --in "$BASE_MG" --dry-run --num-new-blocks 8
    "$PYTHON" tools/expand_blocks.py --in "$BASE_MG" --out "$EXPANDED" --num-new-blocks 8 \
        --placement interleaved --tp "$TP" --pp "$PP" --verify
}

stage_preprocess() {
    # Inputs, as jsonl (.jsonl or .jsonl.gz), one document per line:
    #   Proof-Pile-2 (EleutherAI/proof-pile-2 on the HF hub): algebraic-stack/, open-web-math/, arxiv/
    #     train/*.jsonl.zst, key "text". Decompress first (zstd -d), or recompress: zstd -dc f.zst | gzip > f.gz
    #   The Stack dedup, Python (bigcode/the-stack-dedup, data/python/*.parquet, key "content"): convert
    #     the parquet files to jsonl, e.g.
    #       python -c 'import sys, pyarrow.parquet as pq, json; [print(json.dumps({"text": t})) for f in
    #                  sys.argv[1:] for t in pq.read_table(f, columns=["content"]).column(0).to_pylist()]' \
    #         data/python/*.parquet | gzip > raw/stack_python/train.jsonl.gz
    #   Validation: the Proof-Pile-2 validation/ files (domain) and a held-out general-text sample you
    #     choose (e.g. a few thousand documents of a web corpus), to watch forgetting.
    # Time: the tokenizer runs ~0.5-1M tokens/s per worker; 77B tokens on 64 cores take roughly 1-2 h per
    # source, more when reading from network storage. Sources are independent: run them as separate jobs.
    mkdir -p "$DATA"
    local name
    for name in algebraic_stack open_web_math arxiv stack_python; do
        "$PYTHON" tools/preprocess_data.py --input "$RAW/$name"/train*.jsonl* --json-key text \
            --tokenizer-type sentencepiece --tokenizer-model "$HF_DIR/tokenizer.model" \
            --output-prefix "$DATA/$name" --append-eod --workers "$WORKERS"
    done
    "$PYTHON" tools/preprocess_data.py --input "$RAW"/proof_pile_valid/*.jsonl* --json-key text \
        --tokenizer-type sentencepiece --tokenizer-model "$HF_DIR/tokenizer.model" \
        --output-prefix "$DATA/domain_valid" --append-eod --workers "$WORKERS"
    "$PYTHON" tools/preprocess_data.py --input "$RAW"/general_valid/*.jsonl* --json-key text \
        --tokenizer-type sentencepiece --tokenizer-model "$HF_DIR/tokenizer.model" \
        --output-prefix "$DATA/general_valid" --append-eod --workers "$WORKERS"
}

stage_train() {
    # The paper's hyper-parameters. GBS 1024 = MBS 1 x DP 8 x 128 micro-batches per step (TP=2, 16 GPUs).
    # Only the 8 new blocks train: the expanded checkpoint's manifest names them (no --trainable-layers).
    # Restarts and requeues resume from $SAVE by themselves (see slurm/pretrain_expand.sh).
    mkdir -p logs
    LOAD="$EXPANDED" \
    SAVE="$SAVE" \
    DATA_PATH="11 $DATA/algebraic_stack_text_document 15 $DATA/open_web_math_text_document 29 $DATA/arxiv_text_document 33 $DATA/stack_python_text_document" \
    VALID_DATA="general=$DATA/general_valid_text_document domain=$DATA/domain_valid_text_document" \
    TP="$TP" PP="$PP" MBS=1 GBS=1024 SEQ_LEN=4096 TRAIN_ITERS=15900 LR=2e-4 \
    SAVE_INTERVAL=500 EVAL_INTERVAL=500 \
    EXTRA_ARGS="--bf16 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-fraction 0.06 --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --eval-iters 20 --recompute-granularity selective --data-cache-dir $DATA/cache --tensorboard-dir $SAVE/tensorboard --keep-last 3" \
    sbatch --nodes="$NODES" --ntasks-per-node=8 --gpus-per-node=8 --time=24:00:00 slurm/pretrain_expand.sh
    # The job requeues itself at the 24 h limit (SIGUSR1 -> checkpoint -> exit 75 -> scontrol requeue)
    # until 15,900 steps are done: ~7 requeues at the paper's speed. Metrics: $SAVE/metrics.jsonl.
}

stage_export() {
    # The latest checkpoint in $SAVE -> HF (40 layers, config and tokenizer included), checked against
    # the Megatron logits.
    "$PYTHON" tools/convert_megatron_to_hf.py --megatron-dir "$SAVE" --out "$EXPORT" --dtype bf16 --verify
}

stage_sft() {
    # The paper's second stage: every parameter of the post-pretrained model tuned on instruction data
    # (about 1M samples, GBS 128, lr 2e-5 cosine, 3% warm-up, seq 4096: the trainer's --sft defaults),
    # loss on the assistant's tokens only, samples packed per sequence. LLaMA-2's sentencepiece
    # tokenizer has no chat template of its own here: the [INST] format is used (the output says so).
    # shellcheck disable=SC2086
    "$PYTHON" tools/preprocess_data.py --chat --input $SFT_JSONL --tokenizer-model "$SAVE" \
        --output-prefix "$DATA/sft" --workers 32
    SFT=1 LOAD="$SAVE" SAVE="$SFT_SAVE" DATA_PATH="$DATA/sft_chat_document" \
    VALID_DATA="general=$DATA/general_valid_text_document domain=$DATA/domain_valid_text_document" \
    TP="$TP" PP="$PP" MBS=1 TRAIN_ITERS="$SFT_ITERS" SAVE_INTERVAL=500 EVAL_INTERVAL=250 \
    EXTRA_ARGS="--bf16 --eval-iters 20 --recompute-granularity selective --tensorboard-dir $SFT_SAVE/tensorboard --keep-last 2" \
    slurm/pretrain_expand.sh --submit --nodes="$NODES" --time=24:00:00
}

stage_sft_export() {
    "$PYTHON" tools/convert_megatron_to_hf.py --megatron-dir "$SFT_SAVE" --out "$SFT_EXPORT" --dtype bf16 --verify
}

main() {
    local stages=("$@")
    [ "${#stages[@]}" -gt 0 ] || { sed -n '2,18p' "$0"; exit 2; }
    [ "${stages[0]}" = all ] && stages=(convert expand preprocess train)
    local stage
    for stage in "${stages[@]}"; do
        case "$stage" in
            convert|expand|preprocess|train|export|sft|sft_export) echo "== $stage"; "stage_$stage" ;;
            *) echo "unknown stage '$stage' (convert expand preprocess train export sft sft_export all)" >&2
               exit 2 ;;
        esac
    done
}

main "$@"
