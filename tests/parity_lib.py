"""Rank functions for multi-process parity tests (importable by spawned ranks)."""

from __future__ import annotations

import contextlib

import torch

from megatron_llamapro.expansion.apply import sample_tokens


@contextlib.contextmanager
def loaded_model(ckpt_dir: str, tp: int, pp: int, vpp: int | None = None):
    """(source, model chunks) of a checkpoint loaded at the given layout; parallel state initialized
    here and left for the caller to destroy."""
    from megatron_llamapro.checkpoint.load import load_source_into_model
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.runtime.distributed import ParallelSizes, init_distributed

    init_distributed(ParallelSizes(tp, pp, vpp))
    with open_checkpoint(ckpt_dir) as source:
        padded = source.arch.padded_vocab_size(tp)
        chunks = build_model(source.arch, ModelOptions(padded_vocab_size=padded))
        load_source_into_model(chunks, source, padded)
        yield source, chunks


def sample_logits(chunks: list[torch.nn.Module], vocab_size: int, seed: int = 0) -> torch.Tensor | None:
    """Logits over the unpadded vocabulary on sample_tokens (None off the last pipeline stage)."""
    from megatron_llamapro.pipeline import forward_only_logits

    logits = forward_only_logits(chunks, sample_tokens(vocab_size, seed=seed))
    return None if logits is None else logits[..., :vocab_size].clone()


def megatron_logits(ckpt_dir: str, tp: int, pp: int, vpp: int | None = None, seed: int = 0):
    """Full-vocab logits of the checkpoint's model at the given layout (gathered on the last stage)."""
    with loaded_model(ckpt_dir, tp, pp, vpp) as (source, chunks):
        return sample_logits(chunks, source.arch.vocab_size, seed)


def megatron_mean_loss(ckpt_dir: str, tp: int = 1, seed: int = 0) -> float:
    """Mean next-token loss of the checkpoint's Megatron model on sample tokens (padded vocab)."""
    from megatron_llamapro.pipeline import position_ids_for

    with loaded_model(ckpt_dir, tp, 1) as (source, chunks):
        assert source.arch.padded_vocab_size(tp) > source.arch.vocab_size
        tokens = sample_tokens(source.arch.vocab_size, seq=17, seed=seed)
        with torch.no_grad():
            losses = chunks[0](tokens[:, :-1], position_ids_for(tokens[:, :-1]), None, labels=tokens[:, 1:])
    return float(losses.float().mean())
