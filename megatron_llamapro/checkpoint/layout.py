"""Tensor-parallel split/merge and pipeline (virtual) stage placement.

All TP/PP index arithmetic lives here. Pipeline placement follows megatron-core's default: with
PP stages and V virtual chunks, chunk k of stage s holds global layers
    k * (L / V) + s * c  ...  + c - 1,     c = L / (PP * V).
The embedding lives on (stage 0, chunk 0); final norm and output layer on (last stage, last chunk).
With tied embeddings and PP > 1 the last stage stores the copy of the embedding Megatron expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from megatron_llamapro.checkpoint.weight_map import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT_LAYER,
    Split,
    layer_names,
    layer_of,
    split_rule,
    with_layer,
)
from megatron_llamapro.errors import UserError


class LayoutError(UserError):
    """A parallel layout that does not fit the model (layers per stage, TP divisibility)."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None

    @property
    def chunks_per_stage(self) -> int:
        return self.vpp or 1

    @property
    def num_chunks(self) -> int:
        """Pipeline chunks over all stages (PP x VPP)."""
        return self.pp * self.chunks_per_stage

    def divides(self, num_layers: int) -> bool:
        """Whether every pipeline chunk can hold the same number of the `num_layers` layers."""
        return num_layers % self.num_chunks == 0

    def describe(self) -> str:
        return f"TP={self.tp} PP={self.pp}" + (f" VPP={self.vpp}" if self.vpp else "")

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp}

    @classmethod
    def from_dict(cls, data: dict) -> "Layout":
        return cls(tp=int(data["tp"]), pp=int(data["pp"]), vpp=data.get("vpp"))

    @classmethod
    def from_parallel_state(cls) -> "Layout":
        """The layout of megatron-core's initialized parallel state."""
        from megatron.core import parallel_state

        return cls(parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size(),
                   parallel_state.get_virtual_pipeline_model_parallel_world_size())


def chunk_key(chunk: int, vpp: int | None) -> str:
    """Key of a stage's model chunk in a Megatron-LM checkpoint file (and in a sharded state dict of
    several chunks): "model" without virtual pipelining (vpp None), else "model0", "model1", ..."""
    return "model" if vpp is None else f"model{chunk}"


def vpp_of_chunk_keys(keys) -> int | None:
    """The vpp that wrote a checkpoint file with these top-level keys (chunk_key's inverse)."""
    return sum(1 for key in keys if re.fullmatch(r"model\d+", key)) or None


def real_vocab_rows(vocab_size: int, tp_rank: int, rows_per_rank: int) -> int:
    """How many of a TP rank's vocabulary rows are real tokens (the rest is padding)."""
    return max(0, min(rows_per_rank, vocab_size - tp_rank * rows_per_rank))


def tied_source(name: str, tied: bool) -> str:
    """The canonical tensor a name's values come from: with tied embeddings the output layer Megatron
    keeps on the last stage is the embedding."""
    return EMBEDDING if tied and name == OUTPUT_LAYER else name


@dataclass(frozen=True)
class StagePlacement:
    """Which global layers, and which of embedding / final norm / output layer, each (stage, chunk)
    holds for a model of `num_layers` layers."""

    num_layers: int
    layout: Layout

    @cached_property
    def layers_per_chunk(self) -> int:
        if not self.layout.divides(self.num_layers):
            raise LayoutError(f"{self.layout.describe()} does not divide {self.num_layers} layers")
        return self.num_layers // self.layout.num_chunks

    def layers(self, stage: int, chunk: int = 0) -> list[int]:
        c = self.layers_per_chunk
        start = chunk * (self.num_layers // self.layout.chunks_per_stage) + stage * c
        return list(range(start, start + c))

    def stage_layers(self, stage: int) -> list[int]:
        """Every global layer of a pipeline stage, over all its virtual chunks."""
        return [layer for chunk in range(self.layout.chunks_per_stage) for layer in self.layers(stage, chunk)]

    def stages_without(self, layers) -> list[int]:
        """Pipeline stages that hold none of `layers` (global indices)."""
        wanted = set(layers)
        return [s for s in range(self.layout.pp) if not wanted.intersection(self.stage_layers(s))]

    def locate(self, layer: int) -> tuple[int, int, int]:
        """(stage, chunk, local index) of a global layer."""
        per_virtual = self.num_layers // self.layout.chunks_per_stage
        chunk, rest = divmod(layer, per_virtual)
        stage, local = divmod(rest, self.layers_per_chunk)
        return stage, chunk, local

    def units(self) -> list[tuple[int, int]]:
        return [(s, k) for s in range(self.layout.pp) for k in range(self.layout.chunks_per_stage)]

    def unit_of(self, name: str) -> tuple[int, int]:
        """(stage, chunk) that stores a canonical tensor: a layer's where the layer is placed, the
        embedding in the first chunk, final norm and output layer (its own or the tied copy) in the last."""
        layer = layer_of(name)
        if layer is not None:
            return self.locate(layer)[:2]
        if name == EMBEDDING:
            return 0, 0
        return self.layout.pp - 1, self.layout.chunks_per_stage - 1

    def is_first(self, stage: int, chunk: int) -> bool:
        """Whether (stage, chunk) holds the embedding (megatron-core's pre_process)."""
        return (stage, chunk) == self.unit_of(EMBEDDING)

    def is_last(self, stage: int, chunk: int) -> bool:
        """Whether (stage, chunk) holds final norm and output layer (megatron-core's post_process)."""
        return (stage, chunk) == self.unit_of(FINAL_NORM)

    def stores_output_layer(self, tied: bool) -> bool:
        """Whether the last chunk stores output_layer.weight: always untied; tied only where the
        embedding lives in another chunk (PP > 1), as the copy of it megatron-core keeps there."""
        return not tied or self.unit_of(OUTPUT_LAYER) != self.unit_of(EMBEDDING)

    def canonical_names(self, stage: int, chunk: int, tied: bool, arch=None) -> list[str]:
        """Canonical names stored in (stage, chunk): its layers, plus embedding / norm / output.
        `arch` (a LlamaArch) decides the per-layer tensors; None means the plain LLaMA set."""
        names = []
        if self.is_first(stage, chunk):
            names.append(EMBEDDING)
        for layer in self.layers(stage, chunk):
            names += layer_names(layer, arch)
        if self.is_last(stage, chunk):
            names.append(FINAL_NORM)
            if self.stores_output_layer(tied):
                names.append(OUTPUT_LAYER)
        return names

    def local_name(self, canonical: str) -> str:
        layer = layer_of(canonical)
        if layer is None:
            return canonical
        return with_layer(canonical, self.locate(layer)[2])

    def global_name(self, local: str, stage: int, chunk: int) -> str:
        layer = layer_of(local)
        if layer is None:
            return local
        return with_layer(local, self.layers(stage, chunk)[layer])


def resize_vocab(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad with zero rows or trim to `rows` (padding rows are never looked up)."""
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows].contiguous()
    pad = torch.zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


def split_tp(tensor: torch.Tensor, rule: Split, tp: int) -> list[torch.Tensor]:
    if tp == 1 or rule is Split.REPLICATED:
        return [tensor] * tp
    if rule in (Split.COLUMN, Split.VOCAB):
        if tensor.shape[0] % tp:
            raise LayoutError(f"dim 0 of size {tensor.shape[0]} does not split into {tp} ranks")
        return [t.contiguous() for t in torch.chunk(tensor, tp, dim=0)]
    if rule is Split.ROW:
        if tensor.shape[1] % tp:
            raise LayoutError(f"dim 1 of size {tensor.shape[1]} does not split into {tp} ranks")
        return [t.contiguous() for t in torch.chunk(tensor, tp, dim=1)]
    if rule is Split.GATED:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(torch.chunk(gate, tp, 0), torch.chunk(up, tp, 0))]
    raise ValueError(f"unknown split rule {rule}")


def merge_tp(shards: list[torch.Tensor], rule: Split) -> torch.Tensor:
    if len(shards) == 1 or rule is Split.REPLICATED:
        return shards[0]
    if rule in (Split.COLUMN, Split.VOCAB):
        return torch.cat(shards, dim=0)
    if rule is Split.ROW:
        return torch.cat(shards, dim=1)
    if rule is Split.GATED:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown split rule {rule}")


def shard_of(tensor: torch.Tensor, canonical: str, tp_rank: int, tp: int,
             padded_vocab: int | None = None) -> torch.Tensor:
    """The TP shard of a canonical full tensor (vocab tensors padded to `padded_vocab` first)."""
    rule = split_rule(canonical)
    if rule is Split.VOCAB and padded_vocab is not None:
        tensor = resize_vocab(tensor, padded_vocab)
    if tp == 1:
        return tensor
    return split_tp(tensor, rule, tp)[tp_rank]

