"""Rank functions for multi-process parity tests (importable by spawned ranks)."""

from __future__ import annotations

import torch


def sample_tokens(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def megatron_logits(ckpt_dir: str, tp: int, pp: int, vpp: int | None = None, seed: int = 0):
    """Full-vocab logits of the checkpoint's model at the given layout (gathered on the last stage)."""

    from megatron_llamapro.checkpoint.load import load_source_into_model
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.runtime.distributed import ParallelSizes, init_distributed
    from megatron_llamapro.pipeline import forward_only_logits

    init_distributed(ParallelSizes(tp, pp, vpp))
    with open_checkpoint(ckpt_dir) as source:
        padded = source.arch.padded_vocab_size(tp)
        chunks = build_model(source.arch, ModelOptions(padded_vocab_size=padded))
        load_source_into_model(chunks, source, padded)
        tokens = sample_tokens(source.arch.vocab_size, seed=seed)
        logits = forward_only_logits(chunks, tokens)
    if logits is None:
        return None
    return logits[..., : source.arch.vocab_size].clone()


def megatron_mean_loss(ckpt_dir: str, tp: int = 1, seed: int = 0) -> float:
    """Mean next-token loss of the checkpoint's Megatron model on sample tokens (padded vocab)."""
    from megatron_llamapro.checkpoint.load import load_source_into_model
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.runtime.distributed import ParallelSizes, init_distributed
    from megatron_llamapro.pipeline import position_ids_for

    init_distributed(ParallelSizes(tp, 1))
    with open_checkpoint(ckpt_dir) as source:
        padded = source.arch.padded_vocab_size(tp)
        assert padded > source.arch.vocab_size
        model = build_model(source.arch, ModelOptions(padded_vocab_size=padded))[0]
        load_source_into_model([model], source, padded)
        tokens = sample_tokens(source.arch.vocab_size, seq=17, seed=seed)
        with torch.no_grad():
            losses = model(tokens[:, :-1], position_ids_for(tokens[:, :-1]), None, labels=tokens[:, 1:])
    return float(losses.float().mean())
