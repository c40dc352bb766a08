"""Forward steps through megatron-core's pipeline schedules (1F1B, interleaved, no pipelining).

A batch with ``segment_ids`` holds packed samples (data/sft.py): attention must stay inside each
segment and RoPE positions restart with it. With Transformer Engine's attention this is TE's packed
("thd") format: the micro-batch is laid out as one sequence with cumulative segment lengths, and TE
applies RoPE and attention per segment. With megatron-core's local attention (CPU, or
--transformer-impl local) the micro-batch keeps its shape and gets an explicit block-diagonal causal
mask, and RoPE reads the batch's position ids.
"""

from __future__ import annotations

from functools import partial

import torch


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is masked (megatron-core's convention): a position
    attends to earlier positions of its own segment only."""
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    return ~(same & causal).unsqueeze(1)


def packed_seq_params_for(segment_ids: torch.Tensor):
    """TE's thd description of a micro-batch laid out as one sequence: a segment per sample and
    per padding run, segments of different rows kept apart."""
    from megatron.core.packed_seq_params import PackedSeqParams

    rows, seq = segment_ids.shape
    flat = segment_ids + torch.arange(rows, device=segment_ids.device).unsqueeze(1) * (int(segment_ids.max()) + 1)
    flat = flat.reshape(-1)
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool, device=flat.device),
                                      flat[1:] != flat[:-1]])).reshape(-1)
    cu_seqlens = torch.cat([starts, torch.tensor([rows * seq], device=flat.device)]).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def uses_transformer_engine_attention(chunk: torch.nn.Module) -> bool:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for module in chunk.modules():
        if hasattr(module, "core_attention"):
            return not isinstance(module.core_attention, DotProductAttention)
    return False


def _rope(chunk):
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(chunk, "rotary_pos_emb", allow_none=True)


def _positioned_rope_forward(rope, original):
    """RoPE frequencies gathered at the batch's position ids ([s, b, 1, d]) while `rope.positions`
    is set (a packed batch on local attention), megatron-core's [s, 1, 1, d] otherwise."""

    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        positions = getattr(rope, "llamapro_positions", None)
        if positions is None:
            return original(max_seq_len, offset, packed_seq, cp_group)
        table = original(int(positions.max()) + 1, 0, packed_seq, cp_group)
        return table[positions.t()].squeeze(2)

    return forward


def set_rope_positions(chunk, position_ids: torch.Tensor | None) -> None:
    rope = _rope(chunk)
    if rope is None or (position_ids is None and not getattr(rope, "llamapro_positioned", False)):
        return
    if not getattr(rope, "llamapro_positioned", False):
        rope.forward = _positioned_rope_forward(rope, rope.forward)
        rope.llamapro_positioned = True
    rope.llamapro_positions = position_ids


def packed_forward_inputs(chunk, batch: dict) -> dict:
    """The model's inputs for a batch: tokens, position ids, attention mask, labels and, for packed
    samples on TE attention, the thd packing (the batch then flattened to one row)."""
    tokens = batch["tokens"]
    segments = batch.get("segment_ids")
    position_ids = batch.get("position_ids", position_ids_for(tokens))
    local_packed = segments is not None and not uses_transformer_engine_attention(chunk)
    set_rope_positions(chunk, position_ids if local_packed else None)
    if segments is None:
        return {"input_ids": tokens, "position_ids": position_ids, "attention_mask": None,
                "labels": batch.get("labels")}
    if not local_packed:
        return {"input_ids": tokens.reshape(1, -1), "position_ids": position_ids.reshape(1, -1),
                "attention_mask": None, "labels": batch["labels"].reshape(1, -1),
                "packed_seq_params": packed_seq_params_for(segments)}
    return {"input_ids": tokens, "position_ids": position_ids, "attention_mask": block_causal_mask(segments),
            "labels": batch["labels"]}


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
        output = model(**packed_forward_inputs(model, batch))
        if output_hook is not None:
            output = output_hook(output)
        return output, partial(loss_fn, batch)

    num_chunks = len(chunks)
    iterators = [iter(batches) for _ in range(num_chunks)] if num_chunks > 1 else iter(batches)
    if batches and "segment_ids" in batches[0] and uses_transformer_engine_attention(chunks[0]):
        # thd: each micro-batch travels between pipeline stages as one row
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
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
