"""Training checkpoints that survive preemption: when to save, writing one atomically, resuming.

Under --save (see iteration_dirs.py for the folder layout) each checkpoint is one of
    torch_dist (default)    model + distributed optimizer + scheduler + RNG, loadable at any
                            TP/PP/DP (dist_state.py)
    torch                   Megatron-LM's mp_rank_XX[_YYY]/{model_optim_rng.pt, distrib_optim.pt},
                            resumable at the same TP/PP, any DP (legacy_state.py)
    trainable-only delta    --save-trainable-only: the trained parameters by canonical name plus
                            the optimizer state (torch_dist); needs its base checkpoint (--load) to
                            resume, tools/merge_delta.py folds it into that (checkpoint/delta.py)
Each is written into `.tmp_iter_XXXXXXX` and renamed when every rank has finished; the tracker
is written after the rename and old checkpoints are pruned (--keep-last) after that.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_llamapro.checkpoint.integrity import record_checksums
from megatron_llamapro.checkpoint.manifest import MANIFEST_NAME, TOKENIZER_DIR, Manifest, copy_tokenizer_files
from megatron_llamapro.checkpoint.tracker import iteration_name, write_tracker
from megatron_llamapro.training.config import TrainConfig
from megatron_llamapro.training.dist_state import load_dist, save_dist
from megatron_llamapro.training.iteration_dirs import prune_checkpoints, read_state_record, write_state_record
from megatron_llamapro.training.legacy_state import load_legacy, save_legacy
from megatron_llamapro.training.parallel import barrier, rank


@dataclass
class TrainerState:
    """What a checkpoint records besides tensors: the step and the data position."""

    iteration: int = 0
    consumed_samples: int = 0
    trainable_only: bool = False
    base_checkpoint: str | None = None


class Checkpointer:
    """Owns --save: `save(step, ...)` after every step decides whether this step is saved (every
    --save-interval steps, when stopping early, after the last step unless --no-save-on-exit),
    `resume(iteration)` restores one. `load_delta_weights(iteration_dir)` fills the model from
    the base checkpoint with a trainable-only delta on top."""

    def __init__(self, config: TrainConfig, manifest: Manifest, tokenizer_src: Path | None, chunks, optimizer, scheduler,
                 load_delta_weights: Callable[[Path], None], log: Callable[[str], None],
                 before_write: Callable[[], None] = lambda: None):
        self.save_dir = Path(config.save) if config.save else None
        self.interval = config.save_interval
        self.save_on_exit = not config.no_save_on_exit
        self.fmt = config.save_format
        self.trainable_only = config.save_trainable_only
        self.keep_last = config.keep_last
        self.manifest, self.tokenizer_src = manifest, tokenizer_src
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.load_delta_weights = load_delta_weights
        self.log = log
        self.before_write = before_write  # e.g. finish an overlapped parameter all-gather
        self.state = TrainerState(base_checkpoint=str(Path(config.load).absolute()) if config.load else None)
        self.last_saved = 0
        self.last_save_secs: float | None = None  # wall time of this run's latest save, on this rank

    def resume(self, iteration: int) -> TrainerState:
        """Restore model (or base + delta), optimizer, scheduler and RNG from save_dir/iter_N."""
        it_dir = self.save_dir / iteration_name(iteration)
        record = read_state_record(self.save_dir, iteration)
        self.state = TrainerState(iteration=int(record["iteration"]), consumed_samples=int(record["consumed_samples"]),
                                  trainable_only=bool(record.get("trainable_only")),
                                  base_checkpoint=record.get("base_checkpoint"))
        if record.get("format", "torch_dist") == "torch":
            load_legacy(it_dir, self.chunks, self.optimizer, self.scheduler)
        else:
            if self.state.trainable_only:
                self.load_delta_weights(it_dir)
            load_dist(it_dir, self.chunks, self.optimizer, self.scheduler, with_model=not self.state.trainable_only)
        self.last_saved = self.state.iteration
        return self.state

    @property
    def has_checkpoint(self) -> bool:
        """Whether --save holds a complete checkpoint of this run (saved or resumed)."""
        return self.last_saved > 0

    def save(self, step: int, consumed_samples: int, last_step: bool = False, stop_reason: str | None = None):
        """Collective, after every step; returns the checkpoint folder when this step was saved.
        Each save's duration is logged and kept (`last_save_secs`) to tell whether a save still
        fits in a preemption's grace time."""
        if self.save_dir is None or step == self.last_saved:
            return None
        due = (self.interval and step % self.interval == 0) or stop_reason is not None \
            or (last_step and self.save_on_exit)
        if not due:
            return None
        self.state.iteration, self.state.consumed_samples = step, consumed_samples
        start = time.perf_counter()
        path = self._write(step)
        self.last_save_secs = time.perf_counter() - start
        self.last_saved = step
        self.log(f"saved checkpoint {path} in {self.last_save_secs:.1f}s")
        return path

    def _write(self, iteration: int) -> Path:
        self.before_write()
        save_dir = self.save_dir
        final = save_dir / iteration_name(iteration)
        tmp = save_dir / f".tmp_{iteration_name(iteration)}"
        if rank() == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            if not (save_dir / MANIFEST_NAME).is_file():
                self.manifest.replace(format="torch_dist").write(save_dir)
            if self.tokenizer_src is not None and not (save_dir / TOKENIZER_DIR).exists():
                # only the tokenizer's files: --load may be an HF folder holding the weights too
                staged = save_dir / f".tmp_{TOKENIZER_DIR}"
                shutil.rmtree(staged, ignore_errors=True)
                copy_tokenizer_files(self.tokenizer_src, staged)
                os.replace(staged, save_dir / TOKENIZER_DIR)
        barrier()
        if self.fmt == "torch":
            save_legacy(tmp, iteration, self.chunks, self.optimizer, self.scheduler, self.manifest)
        else:
            save_dist(tmp, self.chunks, self.optimizer, self.scheduler, self.manifest, self.trainable_only)
        barrier()
        if rank() == 0:
            record_checksums(tmp)
            write_state_record(tmp, {"iteration": iteration, "consumed_samples": self.state.consumed_samples,
                                     "trainable_only": self.trainable_only,
                                     "base_checkpoint": self.state.base_checkpoint, "format": self.fmt})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_tracker(save_dir, iteration)
            if self.keep_last:
                prune_checkpoints(save_dir, self.keep_last)
        barrier()
        return final
