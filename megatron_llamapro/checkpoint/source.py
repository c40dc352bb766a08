"""A checkpoint seen as canonical tensors, whatever its format; and opening one by sniffing its kind.

Every reader answers `get(name, tp_rank, tp, padded_vocab)` with the TP shard of a canonical tensor
(see weight_map.py). Readers load lazily so a writer that asks stage by stage holds about one
stage in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_llamapro.arch import LlamaArch
from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.layout import shard_of
from megatron_llamapro.checkpoint.manifest import Manifest


class CheckpointError(ValueError):
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

    def resolve(self, name: str) -> str:
        # Tied embeddings: the output layer Megatron keeps on the last stage is the embedding.
        if name == "output_layer.weight" and self.arch.tie_word_embeddings:
            return "embedding.word_embeddings.weight"
        return name

    def tokenizer_dir(self) -> Path | None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sniff_format(path: Path) -> str:
    """'hf', 'torch' (legacy Megatron) or 'torch_dist' for a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / "config.json").is_file() and not (path / "latest_checkpointed_iteration.txt").exists():
        return "hf"
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        from megatron_llamapro.checkpoint.tracker import iteration_dir

        it_dir = iteration_dir(path)
        if (it_dir / "metadata.json").is_file():
            return "torch_dist"
        return "torch"
    if (path / "metadata.json").is_file():
        return "torch_dist"
    raise CheckpointError(
        f"{path}: neither an HF checkpoint (config.json) nor a Megatron checkpoint "
        "(latest_checkpointed_iteration.txt)")


def open_checkpoint(path: Path, **kwargs) -> TensorSource:
    kind = sniff_format(path)
    if kind == "hf":
        from megatron_llamapro.checkpoint.hf import HFSource

        return HFSource(path)
    if kind == "torch":
        from megatron_llamapro.checkpoint.legacy import LegacySource

        return LegacySource(path, **kwargs)
    from megatron_llamapro.checkpoint.dist import DistSource

    return DistSource(path)
