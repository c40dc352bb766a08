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

A save that fails on any rank (a full disk, a read-only or forbidden --save, in the tensors or in
the files rank 0 writes beside them) is seen by every rank: after each part of the save every
rank says whether it failed (one all-reduced flag), so none is left waiting in a collective. Rank 0
then removes the partial folder, the tracker and the previous checkpoint stay as they were, and the
run ends with one `error:` line from rank 0 naming --save and the cause (exit status 2; the other
ranks exit 2 quietly). A failure that is not the disk's keeps its traceback on the rank it hit.
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
from megatron_llamapro.checkpoint.tracker import TRACKER, iteration_name, read_tracker, write_tracker
from megatron_llamapro.errors import UserError, one_line
from megatron_llamapro.fsutil import NO_PERMISSION, NO_SPACE, READ_ONLY, disk_problem
from megatron_llamapro.training.config import TrainConfig
from megatron_llamapro.training.dist_state import load_dist, save_dist
from megatron_llamapro.training.iteration_dirs import prune_checkpoints, read_state_record, write_state_record
from megatron_llamapro.training.legacy_state import load_legacy, save_legacy
from megatron_llamapro.training.parallel import any_rank_failed, barrier, gather_objects, rank

# what to do about each disk problem, after "... is intact; "
_REMEDY = {NO_SPACE: "free space", READ_ONLY: "make it writable", NO_PERMISSION: "fix its permissions"}


class SaveError(UserError):
    """A checkpoint save that failed on some rank: rank 0 prints it, the other ranks exit quietly."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


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

        def prepare():
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

        def write():
            if self.fmt == "torch":
                save_legacy(tmp, iteration, self.chunks, self.optimizer, self.scheduler, self.manifest)
            else:
                save_dist(tmp, self.chunks, self.optimizer, self.scheduler, self.manifest, self.trainable_only)

        def finish():
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

        self._agreed(iteration, prepare if rank() == 0 else None)
        self._agreed(iteration, write)
        self._agreed(iteration, finish if rank() == 0 else None)
        return final

    def _agreed(self, iteration: int, part: Callable[[], None] | None) -> None:
        """Collective: run this rank's part of a save (None: nothing to do), then agree with every
        rank on whether all succeeded; if any failed, clean up and raise on every rank."""
        failure = None
        try:
            if part is not None:
                part()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
            failure = exc
        if any_rank_failed(failure is not None):
            self._failed(iteration, failure)

    def _failed(self, iteration: int, failure: BaseException | None):
        """Every rank: remove the partial checkpoint (rank 0), then raise one SaveError, printed by
        rank 0 only; a failure that is not the disk's is re-raised on its rank (traceback)."""
        save_dir = self.save_dir
        problem = disk_problem(failure, save_dir) if failure is not None else None  # before removing
        detail = problem or (one_line(f"{type(failure).__name__}: {failure}") if failure is not None else None)
        outcomes = gather_objects((problem, detail))
        if rank() == 0:
            self._remove_partial(iteration)
        barrier()  # no rank exits (and gets the others stopped by a launcher) before that
        if failure is not None and problem is None:
            raise failure
        previous = self._tracked()
        kept = (f"the previous checkpoint {iteration_name(previous)} is intact" if previous is not None
                else "no checkpoint was saved yet")
        where = f"--save {save_dir}"
        disk = [(r, p) for r, (p, _) in enumerate(outcomes) if p is not None]
        if disk:
            cause = disk[0][1]
            message = (f"{where}: {cause} while writing {iteration_name(iteration)} ({kept}; "
                       f"{_REMEDY[cause]} and rerun{' to resume' if previous is not None else ''})")
        else:
            failed = [(r, d) for r, (_, d) in enumerate(outcomes) if d is not None]
            r, d = failed[0] if failed else (None, "unknown error")
            message = (f"{where}: rank {r} failed while writing {iteration_name(iteration)} ({d}; see its "
                       f"output); {kept}")
        raise SaveError(message, quiet=rank() != 0) from failure

    def _remove_partial(self, iteration: int) -> None:
        """Rank 0: what a failed save of `iteration` left under --save."""
        save_dir = self.save_dir
        shutil.rmtree(save_dir / f".tmp_{iteration_name(iteration)}", ignore_errors=True)
        shutil.rmtree(save_dir / f".tmp_{TOKENIZER_DIR}", ignore_errors=True)
        if self._tracked() != iteration:  # renamed into place, but the tracker was not written
            shutil.rmtree(save_dir / iteration_name(iteration), ignore_errors=True)

    def _tracked(self) -> int | None:
        """The iteration the tracker names (None: none, or unreadable)."""
        try:
            tracked = read_tracker(self.save_dir) if (self.save_dir / TRACKER).is_file() else None
        except (OSError, ValueError):
            return None
        return tracked if isinstance(tracked, int) else None
