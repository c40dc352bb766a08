"""Stop signals: SIGTERM and SIGUSR1 (preemption) and, once the training loop runs, SIGINT
(Ctrl-C) set a flag the loop checks after each step.

Installed first thing in `pretrain.main` (before the slow imports), so a preemption signal that
arrives while the job starts is not fatal; Ctrl-C during start-up still interrupts at once.
Checkpoint writes run with the signals blocked: megatron-core's torch_dist writer starts helper
processes that inherit the signal mask, and Slurm (or a terminal's Ctrl-C) signals every process of
the job step, so an unblocked helper would die mid-save.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from typing import NoReturn

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFERRED_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)


class PreemptionFlag:
    """The first stop signal this process received, and when (time.monotonic())."""

    def __init__(self):
        self.received: int | None = None
        self.received_at: float | None = None

    def _handle(self, signum, frame):
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()


_FLAG: PreemptionFlag | None = None


def install() -> PreemptionFlag:
    """Install the preemption handlers once per process; later calls return the same flag."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, _FLAG._handle)
    return _FLAG


def catch_interrupt() -> None:
    """From now on Ctrl-C sets the flag (the loop stops after the step) instead of raising."""
    signal.signal(signal.SIGINT, install()._handle)


@contextlib.contextmanager
def deferred():
    """Block the stop signals (in this thread and in children it starts) inside the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_at_once(code: int) -> NoReturn:
    """Leave the process now with `code`, its output flushed, without atexit handlers and the
    interpreter's teardown (the checkpoint writer helper's shutdown, module and torch clean-up:
    seconds on a loaded node, while Slurm's SIGKILL follows a SIGTERM KillWait seconds later and
    the job script still has its last lines to write). Helpers die with the process
    (die_with_parent); files are closed by the caller."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process: get SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG), so a
    kill -9 of the trainer leaves no helper behind holding the console pipes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _checkpoint_writer_helper_init() -> None:
    """In the Manager process, before it serves: the stop signals blocked (Slurm signals every
    process of the step; the helper must outlive a SIGTERM until the save it serves is done), and
    SIGKILL when the trainer dies."""
    signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    die_with_parent()


def start_checkpoint_writer_helper() -> None:
    """megatron-core's torch_dist writer collects results through a spawned multiprocessing
    Manager that it starts lazily on the first save (dist_checkpointing/strategies/
    filesystem_async.py, `_get_write_results_queue`), a process that outlives a killed trainer.
    Start that Manager here instead, with the stop signals blocked as in a save and dying with
    its parent.

    The resource tracker is started first: starting it unblocks SIGINT and SIGTERM in the calling
    thread (multiprocessing/resource_tracker.py, bpo-33613), which inside `deferred()` would let the
    Manager start without them blocked and die on Slurm's SIGTERM before the save on SIGTERM used it."""
    import multiprocessing as mp
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from multiprocessing.managers import SyncManager

    if filesystem_async._results_queue is not None:
        return
    resource_tracker.ensure_running()
    manager = SyncManager(ctx=mp.get_context("spawn"))
    with deferred():
        manager.start(initializer=_checkpoint_writer_helper_init)
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
