"""Forward steps through megatron-core's pipeline schedules (1F1B, interleaved, no pipelining)."""

from __future__ import annotations

from functools import partial

import torch


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def model_config(chunks):
    from megatron.core.utils import get_model_config

    return get_model_config(chunks[0])


def run_schedule(chunks: list[torch.nn.Module], batches: list[dict], forward_only: bool,
                 loss_fn, seq_length: int, micro_batch_size: int, output_hook=None):
    """Run one global batch (a list of micro-batches) through the pipeline; returns per-microbatch
    results of `loss_fn` on the last stage (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        output = model(tokens, batch.get("position_ids", position_ids_for(tokens)), None,
                       labels=batch.get("labels"))
        if output_hook is not None:
            output = output_hook(output)
        return output, partial(loss_fn, batch)

    num_chunks = len(chunks)
    iterators = [iter(batches) for _ in range(num_chunks)] if num_chunks > 1 else iter(batches)
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks if num_chunks > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def forward_only_logits(chunks: list[torch.nn.Module], tokens: torch.Tensor,
                        micro_batch_size: int | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, padded_vocab] on last-stage ranks, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    mbs = micro_batch_size or (1 if len(chunks) > 1 else tokens.shape[0])
    # The interleaved schedule needs at least PP micro-batches.
    batches = [{"tokens": tokens[i:i + mbs]} for i in range(0, tokens.shape[0], mbs)]

    def keep_logits(batch, output):
        full = gather_from_tensor_model_parallel_region(output)
        return output.sum() * 0.0, {"logits": full.detach().clone()}

    with torch.no_grad():
        results = run_schedule(chunks, batches, True, keep_logits, tokens.shape[1], mbs)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([r["logits"] for r in results], dim=0)
