"""Megatron-LM's checkpoint directory conventions: the tracker file and iteration folders."""

from __future__ import annotations

import re
from pathlib import Path

from megatron_llamapro.checkpoint.source import CheckpointError
from megatron_llamapro.fsutil import write_text_atomic

TRACKER = "latest_checkpointed_iteration.txt"

_ITERATION_RE = re.compile(r"^iter_(\d+)$")
_MP_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def iteration_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def parse_iteration_dir(name: str) -> int | str | None:
    """The iteration an iteration folder's name stands for: N for iter_N, "release", or None for
    any other name (iteration_name's inverse)."""
    if name == "release":
        return "release"
    match = _ITERATION_RE.match(name)
    return int(match.group(1)) if match else None


def iteration_dirs(root: Path) -> list[tuple[int, Path]]:
    """(iteration, folder) for each iter_N folder under `root`, oldest first ("release" is not one)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        iteration = parse_iteration_dir(entry.name)
        if isinstance(iteration, int) and entry.is_dir():
            found.append((iteration, entry))
    return sorted(found)


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
    write_text_atomic(Path(root) / TRACKER, f"{iteration}\n")


def mp_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def parse_mp_rank_dir(name: str) -> tuple[int, int] | None:
    """(tp_rank, pp_rank) of an mp_rank_XX[_YYY] name (mp_rank_dir's inverse), None for other names."""
    match = _MP_RANK_RE.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None
