"""The iteration folders under --save: the record that marks one complete, finding the newest
complete one to resume from (past damaged ones), and pruning old ones.

    latest_checkpointed_iteration.txt   written last, atomically, after the checkpoint is complete
    iter_0000100/                       one checkpoint (training/checkpointer.py writes it); its
                                        trainer_state.json (iteration, consumed samples = data
                                        position, format, every file's size) is written last,
                                        after checksums.json (each file's CRC-32)
    llamapro.json, tokenizer/           the model description, copied from the loaded checkpoint
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from megatron_llamapro.checkpoint.integrity import STATE_FILE, folder_problem
from megatron_llamapro.checkpoint.source import CheckpointError
from megatron_llamapro.checkpoint.tracker import (TRACKER, iteration_dirs, iteration_name, parse_iteration_dir,
                                                  read_tracker)


def write_state_record(it_dir: Path, fields: dict) -> None:
    """The record that marks it_dir complete: `fields`, then the size of every other file in it."""
    it_dir = Path(it_dir)
    files = {str(p.relative_to(it_dir)): p.stat().st_size
             for p in sorted(it_dir.rglob("*")) if p.is_file() and p.name != STATE_FILE}
    record = fields | {"files": files, "saved_at": time.time()}
    (it_dir / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_state_record(save_dir: Path, iteration: int) -> dict:
    return json.loads((Path(save_dir) / iteration_name(iteration) / STATE_FILE).read_text())


def complete_iterations(save_dir: Path) -> list[int]:
    """Iterations with a finished checkpoint folder (newest last)."""
    return [iteration for iteration, entry in iteration_dirs(save_dir) if (entry / STATE_FILE).is_file()]


def checkpoint_problem(save_dir: Path, iteration: int) -> str | None:
    """None if the iter folder is complete and its files are as saved (sizes and checksums), else a
    one-line reason naming the file."""
    it_dir = Path(save_dir) / iteration_name(iteration)
    state_file = it_dir / STATE_FILE
    if not state_file.is_file():
        return f"{state_file}: missing (incomplete checkpoint)"
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return f"{state_file}: not valid JSON"
    if state.get("format", "torch_dist") == "torch_dist" and not (it_dir / "metadata.json").is_file():
        return f"{it_dir / 'metadata.json'}: missing (incomplete torch_dist checkpoint)"
    return folder_problem(it_dir)


def find_resume_iteration(save_dir: Path, log=print) -> int | None:
    """The newest complete checkpoint in save_dir; falls back past damaged ones with a warning."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    candidates = complete_iterations(save_dir)
    tracked = None
    if (save_dir / TRACKER).is_file():
        try:
            tracked = read_tracker(save_dir)
        except ValueError as exc:
            log(f"warning: {exc}; looking for the newest complete checkpoint instead")
        if isinstance(tracked, int) and tracked not in candidates:
            it_dir = save_dir / iteration_name(tracked)
            why = checkpoint_problem(save_dir, tracked) if it_dir.is_dir() else f"{it_dir}: missing"
            log(f"warning: {save_dir / TRACKER} names iteration {tracked}, but {why}")
    found = None
    for iteration in sorted(candidates, reverse=True):
        if isinstance(tracked, int) and iteration > tracked:
            continue  # finished after the tracker was last written: not known complete on all ranks
        problem = checkpoint_problem(save_dir, iteration)
        if problem is None:
            found = iteration
            break
        log(f"warning: skipping damaged checkpoint: {problem}")
    # iteration folders without a state record (damaged by hand, or copied partially) newer than
    # the one chosen: say so rather than skip them silently
    for iteration, entry in iteration_dirs(save_dir):
        if iteration not in candidates and (found is None or iteration > found) \
                and iteration != tracked:
            log(f"warning: skipping damaged checkpoint: {entry / STATE_FILE}: missing (incomplete checkpoint)")
    if found is not None and isinstance(tracked, int) and found != tracked:
        log(f"warning: resuming from iteration {found}, not the tracked {tracked}")
    return found


def holds_checkpoints(save_dir: Path) -> bool:
    """A tracker naming an iteration, or iter_N folders: something a training run saved (complete
    or not). A 'release' tracker (--save pointing at the converted/expanded checkpoint itself, as
    Megatron-LM users do with --load == --save) is not a training checkpoint."""
    save_dir = Path(save_dir)
    if any(p.is_dir() for p in save_dir.glob("iter_*")):
        return True
    if not (save_dir / TRACKER).is_file():
        return False
    try:
        return isinstance(read_tracker(save_dir), int)
    except CheckpointError:
        return True  # a garbled tracker: something was saved here


def damaged_checkpoint(path: Path) -> str | None:
    """For a checkpoint this trainer saved (a --save root or one of its iter_N folders), the
    one-line problem of the folder the tracker names (see checkpoint_problem); None otherwise."""
    path = Path(path)
    if (path / TRACKER).is_file():
        try:
            tracked = read_tracker(path)
        except ValueError as exc:
            return str(exc)
        if tracked == "release":
            return None
        it_dir = path / iteration_name(tracked)
        if not it_dir.is_dir():
            return f"{it_dir}: missing (named by {path / TRACKER})"
        root, iteration = path, tracked
    elif isinstance(parse_iteration_dir(path.name), int) and path.is_dir():
        root, iteration = path.parent, parse_iteration_dir(path.name)
    else:
        return None
    if not (root / iteration_name(iteration) / STATE_FILE).is_file():
        return None  # not a training checkpoint: megatron's own loader reports what it finds
    return checkpoint_problem(root, iteration)


def prune_checkpoints(save_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` complete checkpoints; never the one the tracker names."""
    save_dir = Path(save_dir)
    its = complete_iterations(save_dir)
    try:
        tracked = read_tracker(save_dir)
    except (FileNotFoundError, ValueError):
        tracked = None
    if isinstance(tracked, int):
        # folders newer than the tracker are left over from a run that fell back past them: they
        # are neither counted nor removed (the resumed run overwrites them as it gets there)
        its = [it for it in its if it <= tracked]
    removed = []
    for iteration in its[:-keep_last] if keep_last < len(its) else []:
        if iteration == tracked:
            continue
        path = save_dir / iteration_name(iteration)
        shutil.rmtree(path)
        removed.append(path)
    return removed
