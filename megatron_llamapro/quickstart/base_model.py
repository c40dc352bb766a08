"""Step 2's base model: a LLaMA of the size's shape, randomly initialised and saved as an HF
checkpoint, which the project's trainer then pretrains (`--train-all`) on the base mix."""

from __future__ import annotations

import shutil
from pathlib import Path

from megatron_llamapro.fsutil import atomic_output_dir
from megatron_llamapro.quickstart.sizes import Size


def base_mix(general: list[str], seed: int, domain_fraction: float) -> list[str]:
    """The base model's pretraining documents: general text with a little domain-like text, as
    LLaMA-2 saw some code and math before LLaMA Pro specialised it. The domain-like documents come
    from a seed the domain train/valid sets do not use."""
    from megatron_llamapro.data.synthetic import domain_corpus

    num_domain = int(round(domain_fraction * len(general) / (1 - domain_fraction)))
    return general + (domain_corpus(num_domain, seed=seed + 977) if num_domain > 0 else [])


def write_random_init(path: Path, size: Size, tokenizer_model: Path, seed: int) -> int:
    """A randomly initialised LLaMA (transformers' initialisation) with its tokenizer, as an HF
    checkpoint in ``path``; returns its number of parameters."""
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=size.hidden, intermediate_size=size.ffn,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=4 * size.seq_length,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), torch_dtype="float32")
    model = LlamaForCausalLM(config)
    with atomic_output_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copy(tokenizer_model, tmp / "tokenizer.model")
    return sum(p.numel() for p in model.parameters())
