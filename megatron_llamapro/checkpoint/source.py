"""A checkpoint seen as canonical tensors, whatever its format (the interface only: it knows no format;
`checkpoint/open.py` finds the reader for a directory).

Every reader answers `get(name, tp_rank, tp, padded_vocab)` with the TP shard of a canonical tensor
(see weight_map.py). Readers load lazily so a writer that asks stage by stage holds about one
stage in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_llamapro.arch import LlamaArch
from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.layout import shard_of, tied_source
from megatron_llamapro.checkpoint.manifest import Manifest
from megatron_llamapro.errors import UserError


# The tensor whose dtype tells a checkpoint's precision: a linear layer's (norms may be kept in fp32).
DTYPE_PROBE = "decoder.layers.0.self_attention.linear_qkv.weight"
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class CheckpointError(UserError):
    """Unreadable or inconsistent checkpoint; the message names the file and the problem."""


class TensorSource:
    manifest: Manifest
    path: Path

    @property
    def arch(self) -> LlamaArch:
        return self.manifest.arch

    def names(self) -> list[str]:
        return weight_map.canonical_names(self.arch)

    def full(self, name: str) -> torch.Tensor:
        """The whole canonical tensor (vocab tensors as stored, possibly padded)."""
        raise NotImplementedError

    def get(self, name: str, tp_rank: int = 0, tp: int = 1,
            padded_vocab: int | None = None) -> torch.Tensor:
        name = self.resolve(name)
        return shard_of(self.full(name), name, tp_rank, tp, padded_vocab)

    def weights_dtype(self) -> str:
        """The precision the weights are stored in (fp32 | bf16 | fp16): the dtype of a linear
        layer's stored tensor (one shard, as stored), else the manifest's."""
        tensor = self.get(DTYPE_PROBE, 0, self.manifest.layout.tp)
        return PRECISION_NAMES.get(tensor.dtype, self.manifest.dtype)

    def resolve(self, name: str) -> str:
        return tied_source(name, self.arch.tie_word_embeddings)

    def tokenizer_dir(self) -> Path | None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
