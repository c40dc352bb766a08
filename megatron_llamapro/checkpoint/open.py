"""Which reader serves a checkpoint directory: the one module that knows every format."""

from __future__ import annotations

from pathlib import Path

from megatron_llamapro.checkpoint.dist import DistSource
from megatron_llamapro.checkpoint.hf import HFSource
from megatron_llamapro.checkpoint.legacy import LegacySource
from megatron_llamapro.checkpoint.manifest import resolve_tokenizer
from megatron_llamapro.checkpoint.source import CheckpointError, TensorSource
from megatron_llamapro.checkpoint.tracker import TRACKER, iteration_dir


def sniff_format(path: Path) -> str:
    """'hf', 'torch' (legacy Megatron) or 'torch_dist' for a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / "config.json").is_file() and not (path / TRACKER).exists():
        return "hf"
    tracker = path / TRACKER
    if tracker.is_file():
        it_dir = iteration_dir(path)
        if (it_dir / "metadata.json").is_file():
            return "torch_dist"
        return "torch"
    if (path / "metadata.json").is_file():
        return "torch_dist"
    raise CheckpointError(
        f"{path}: neither an HF checkpoint (config.json) nor a Megatron checkpoint "
        "(latest_checkpointed_iteration.txt)")


def open_checkpoint(path: Path, tokenizer: Path | str | None = None, **kwargs) -> TensorSource:
    """The reader for `path`. `tokenizer` (a --tokenizer-model flag: a directory or its
    tokenizer.model / tokenizer.json) serves a checkpoint that carries no tokenizer of its own,
    such as one written by Megatron-LM; it also gives such a checkpoint its real vocabulary size."""
    kind = sniff_format(path)
    tok_dir = resolve_tokenizer(Path(tokenizer)) if tokenizer is not None else None
    if kind == "hf":
        return HFSource(path, tokenizer=tok_dir)
    if kind == "torch":
        return LegacySource(path, tokenizer=tok_dir, **kwargs)
    return DistSource(path, tokenizer=tok_dir)
