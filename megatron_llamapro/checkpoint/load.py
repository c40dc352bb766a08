"""A checkpoint source into model chunks built under the current parallel state (conversion to
torch_dist, verification, expansion checks and training resume all load this way)."""

from __future__ import annotations

import torch

from megatron_llamapro.checkpoint.integrity import check_finite as refuse_non_finite
from megatron_llamapro.checkpoint.layout import Layout, StagePlacement
from megatron_llamapro.checkpoint.legacy import copy_stored_tensors
from megatron_llamapro.checkpoint.source import TensorSource


def load_source_into_model(chunks: list[torch.nn.Module], source: TensorSource,
                           padded_vocab_size: int, check_finite: bool = False) -> None:
    """Fill model chunks built under the current parallel state from a checkpoint source (with
    `check_finite`, a NaN/Inf tensor is refused by name)."""
    from megatron.core import parallel_state

    arch = source.arch
    layout = Layout.from_parallel_state()
    placement = StagePlacement(arch.num_layers, layout)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    for chunk_index, chunk in enumerate(chunks):
        names = placement.canonical_names(stage, chunk_index, arch.tie_word_embeddings, arch)
        # a generator: each tensor is fetched, copied into the model and dropped before the next
        items = ((placement.local_name(n), _fetch(source, n, tp_rank, layout.tp, padded_vocab_size, check_finite))
                 for n in names)
        copy_stored_tensors(chunk, items, f"{source.path} into stage {stage} chunk {chunk_index}")


def _fetch(source: TensorSource, name: str, tp_rank: int, tp: int, padded_vocab_size: int,
           check_finite: bool) -> torch.Tensor:
    tensor = source.get(name, tp_rank, tp, padded_vocab_size)
    if check_finite:
        refuse_non_finite(name, tensor, str(source.path))
    return tensor
