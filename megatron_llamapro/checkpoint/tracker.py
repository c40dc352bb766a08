"""Megatron-LM's checkpoint directory conventions: the tracker file and iteration folders."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_llamapro.checkpoint.source import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def read_tracker(root: Path) -> int | str:
    """'release' or the iteration number the tracker names."""
    path = Path(root) / TRACKER
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a Megatron checkpoint directory)")
    text = path.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected 'release' or an iteration number, found {text!r}") from None


def iteration_dir(root: Path, iteration: int | str | None = None) -> Path:
    root = Path(root)
    if iteration is None:
        iteration = read_tracker(root)
    return root / iteration_name(iteration)


def write_tracker(root: Path, iteration: int | str) -> None:
    """Atomically point the tracker at `iteration` (written last, after the checkpoint is complete)."""
    path = Path(root) / TRACKER
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, path)


def mp_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
