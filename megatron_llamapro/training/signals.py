"""Preemption signals: SIGTERM and SIGUSR1 set a flag the training loop checks after each step.

Installed first thing in `pretrain.main` (before the slow imports), so a signal that arrives while
the job starts is not fatal. Checkpoint writes run with the signals blocked: megatron-core's
torch_dist writer starts helper processes that inherit the signal mask, and Slurm signals every
process of the job step, so an unblocked helper would die mid-save.
"""

from __future__ import annotations

import contextlib
import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.received: int | None = None

    def _handle(self, signum, frame):
        self.received = signum


_FLAG: PreemptionFlag | None = None


def install() -> PreemptionFlag:
    """Install the handlers once per process; later calls return the same flag."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, _FLAG._handle)
    return _FLAG


@contextlib.contextmanager
def deferred():
    """Block the preemption signals (in this thread and in children it starts) inside the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
