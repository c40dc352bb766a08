"""Tensor-parallel split/merge and pipeline (virtual) stage placement.

All TP/PP index arithmetic lives here. Pipeline placement follows megatron-core's default: with
PP stages and V virtual chunks, chunk k of stage s holds global layers
    k * (L / V) + s * c  ...  + c - 1,     c = L / (PP * V).
The embedding lives on (stage 0, chunk 0); final norm and output layer on (last stage, last chunk).
With tied embeddings and PP > 1 the last stage stores the copy of the embedding Megatron expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from megatron_llamapro.checkpoint.weight_map import Split, layer_of, split_rule, with_layer
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

    def describe(self) -> str:
        return f"TP={self.tp} PP={self.pp}" + (f" VPP={self.vpp}" if self.vpp else "")

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp}

    @classmethod
    def from_dict(cls, data: dict) -> "Layout":
        return cls(tp=int(data["tp"]), pp=int(data["pp"]), vpp=data.get("vpp"))


@dataclass(frozen=True)
class StagePlacement:
    """Which global layers each (stage, chunk) holds for a model of `num_layers` layers."""

    num_layers: int
    layout: Layout

    @cached_property
    def layers_per_chunk(self) -> int:
        chunks = self.layout.pp * self.layout.chunks_per_stage
        if self.num_layers % chunks:
            raise LayoutError(f"{self.layout.describe()} does not divide {self.num_layers} layers")
        return self.num_layers // chunks

    def layers(self, stage: int, chunk: int = 0) -> list[int]:
        c = self.layers_per_chunk
        start = chunk * (self.num_layers // self.layout.chunks_per_stage) + stage * c
        return list(range(start, start + c))

    def locate(self, layer: int) -> tuple[int, int, int]:
        """(stage, chunk, local index) of a global layer."""
        per_virtual = self.num_layers // self.layout.chunks_per_stage
        chunk, rest = divmod(layer, per_virtual)
        stage, local = divmod(rest, self.layers_per_chunk)
        return stage, chunk, local

    def is_first(self, stage: int, chunk: int) -> bool:
        return stage == 0 and chunk == 0

    def is_last(self, stage: int, chunk: int) -> bool:
        return stage == self.layout.pp - 1 and chunk == self.layout.chunks_per_stage - 1

    def units(self) -> list[tuple[int, int]]:
        return [(s, k) for s in range(self.layout.pp) for k in range(self.layout.chunks_per_stage)]

    def canonical_names(self, stage: int, chunk: int, layer_names: list[str], tied: bool) -> list[str]:
        """Canonical names stored in (stage, chunk): its layers, plus embedding / norm / output."""
        names = []
        if self.is_first(stage, chunk):
            names.append("embedding.word_embeddings.weight")
        for layer in self.layers(stage, chunk):
            names += [name.format(L=layer) for name in layer_names]
        if self.is_last(stage, chunk):
            names.append("decoder.final_layernorm.weight")
            if not tied or self.layout.pp > 1:
                names.append("output_layer.weight")
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

