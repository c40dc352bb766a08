#!/bin/bash
# Qwen2.5-7B -> Qwen2.5 Pro, 28 -> 36 blocks (+8 identity blocks): the recipe of
# examples/llama2_7b_to_llama_pro_8b.sh with what differs for Qwen2 / Qwen2.5.
#
#   examples/qwen2_5_7b_to_pro.sh convert | expand | preprocess | train | export | all
#
# What differs from LLaMA-2-7B
#   architecture   28 blocks, hidden 3584, FFN 18944, 28 query heads and 4 key/value heads (GQA), rope theta
#                  1e6, vocab 152064, untied embeddings (the 0.5B-3B sizes tie them; read from config.json),
#                  bias on q/k/v only (megatron-core add_qkv_bias; the bias is split per query group with the
#                  fused QKV weight), none on o_proj or the MLP
#   expansion      28 blocks do not split into 8 equal groups: the planner spreads the 8 new blocks as evenly
#                  as it can (see --dry-run); each new block copies its source block's q/k/v weights and biases
#                  and has o_proj and down_proj zeroed, so the expanded model's logits equal the original's
#   sliding window Qwen2.5's config has use_sliding_window false: full attention everywhere, nothing refused;
#                  a config that turns it on is trained only up to the window (--seq-length <= sliding_window)
#   tokenizer      tokenizer.json (byte-level BPE), no BOS; --tokenizer-type huggingface --tokenizer-model
#                  $HF_DIR (or the Megatron checkpoint, which carries it); documents end with <|endoftext|>
#                  (151643) through --append-eod; ids need 4 bytes per token (vocab > 65536)
#   sizes          7.62B params; each new block ~233M (attention 29M, FFN 204M) -> ~1.86B trainable, ~9.48B
#                  after expansion; embeddings + output layer 1.09B (frozen)
#   TP             28 heads and 4 kv heads: TP 1, 2 or 4 (not 8)
#
# Hyper-parameters are the paper's (lr 2e-4 cosine to 2e-5, 6% warmup, wd 0.1, clip 1.0, bf16, GBS 1024 x
# 4096, 15,900 steps); nobody has published LLaMA Pro results on Qwen2.5, so treat them as a starting point.

set -euo pipefail

PYTHON=${PYTHON:-python3}
HF_DIR=${HF_DIR:-/models/Qwen2.5-7B}             # config.json, *.safetensors, tokenizer.json
CKPT=${CKPT:-ckpt}
BASE_MG=${BASE_MG:-$CKPT/qwen2.5-7b-tp2}
EXPANDED=${EXPANDED:-$CKPT/qwen2.5-7b-expanded-36}
SAVE=${SAVE:-$CKPT/qwen2.5-pro}
EXPORT=${EXPORT:-$CKPT/qwen2.5-pro-hf}
RAW=${RAW:-raw}
DATA=${DATA:-data-qwen2.5}                       # its own token ids: do not mix with LLaMA data
WORKERS=${WORKERS:-$(nproc)}
TP=${TP:-2}
PP=${PP:-1}
NODES=${NODES:-2}
SEQ_LEN=${SEQ_LEN:-4096}
GBS=${GBS:-$(( 1024 * 4096 / SEQ_LEN ))}

stage_convert() {
    "$PYTHON" tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --out "$BASE_MG" \
        --tp "$TP" --pp "$PP" --format torch_dist --dtype bf16 --verify
}

stage_expand() {
    # 8 new blocks spread over 28 (print the placement first with --dry-run); q/k/v biases copied.
    "$PYTHON" tools/expand_blocks.py --in "$BASE_MG" --out "$EXPANDED" --num-new-blocks 8 \
        --placement interleaved --tp "$TP" --pp "$PP" --verify
}

stage_preprocess() {
    # Same jsonl inputs as the LLaMA-2 example (see its stage_preprocess); 4 bytes per token here.
    mkdir -p "$DATA"
    local name
    for name in algebraic_stack open_web_math arxiv stack_python; do
        "$PYTHON" tools/preprocess_data.py --input "$RAW/$name"/train*.jsonl* --json-key text \
            --tokenizer-type huggingface --tokenizer-model "$HF_DIR" \
            --output-prefix "$DATA/$name" --append-eod --workers "$WORKERS"
    done
    "$PYTHON" tools/preprocess_data.py --input "$RAW"/proof_pile_valid/*.jsonl* --json-key text \
        --tokenizer-type huggingface --tokenizer-model "$HF_DIR" \
        --output-prefix "$DATA/domain_valid" --append-eod --workers "$WORKERS"
    "$PYTHON" tools/preprocess_data.py --input "$RAW"/general_valid/*.jsonl* --json-key text \
        --tokenizer-type huggingface --tokenizer-model "$HF_DIR" \
        --output-prefix "$DATA/general_valid" --append-eod --workers "$WORKERS"
}

stage_train() {
    # Weights: tokens x the paper's weight (1.0 Proof-Pile-2 sources, 1.5 Python), in LLaMA-2 token counts;
    # the proportions are what matters.
    mkdir -p logs
    LOAD="$EXPANDED" \
    SAVE="$SAVE" \
    DATA_PATH="11 $DATA/algebraic_stack_text_document 15 $DATA/open_web_math_text_document 29 $DATA/arxiv_text_document 33 $DATA/stack_python_text_document" \
    VALID_DATA="general=$DATA/general_valid_text_document domain=$DATA/domain_valid_text_document" \
    TP="$TP" PP="$PP" MBS=1 GBS="$GBS" SEQ_LEN="$SEQ_LEN" TRAIN_ITERS=15900 LR=2e-4 \
    SAVE_INTERVAL=500 EVAL_INTERVAL=500 \
    EXTRA_ARGS="--bf16 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-fraction 0.06 --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --eval-iters 20 --recompute-granularity selective --data-cache-dir $DATA/cache --tensorboard-dir $SAVE/tensorboard --keep-last 3" \
    sbatch --nodes="$NODES" --ntasks-per-node=8 --gpus-per-node=8 --time=24:00:00 slurm/pretrain_expand.sh
}

stage_export() {
    # 36-layer Qwen2ForCausalLM config (q/k/v biases, rope theta 1e6, window settings kept) + tokenizer.
    "$PYTHON" tools/convert_megatron_to_hf.py --megatron-dir "$SAVE" --out "$EXPORT" --dtype bf16 --verify
}

main() {
    local stages=("$@")
    [ "${#stages[@]}" -gt 0 ] || { sed -n '2,6p' "$0"; exit 2; }
    [ "${stages[0]}" = all ] && stages=(convert expand preprocess train)
    local stage
    for stage in "${stages[@]}"; do
        case "$stage" in
            convert|expand|preprocess|train|export) echo "== $stage"; "stage_$stage" ;;
            *) echo "unknown stage '$stage' (convert expand preprocess train export all)" >&2; exit 2 ;;
        esac
    done
}

main "$@"
