"""Tiny random LLaMA checkpoints in HF format, built with transformers itself."""

from __future__ import annotations

from pathlib import Path

# hidden 64; a vocab that is not a multiple of 128; MHA/GQA x tied/untied.
TINY_VARIANTS = {
    "mha": dict(num_layers=4, num_heads=4, num_kv_heads=4, tie=False),
    "gqa": dict(num_layers=4, num_heads=4, num_kv_heads=2, tie=False),
    "mha_tied": dict(num_layers=4, num_heads=4, num_kv_heads=4, tie=True),
    "gqa_tied": dict(num_layers=4, num_heads=8, num_kv_heads=2, tie=True),
}
TINY_VOCAB = 300


def make_tiny_hf(out: Path, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 4,
                 tie: bool = False, hidden: int = 64, ffn: int = 128, vocab: int = TINY_VOCAB,
                 seed: int = 0, model_type: str = "llama", tokenizer_model: Path | None = None) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=vocab,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    if model_type == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    # Random init gives tiny norms' weights of exactly 1; perturb them so mapping errors show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, out / "tokenizer.model")
    return out
