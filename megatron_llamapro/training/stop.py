"""When the training loop stops early: a preemption signal (SIGTERM / SIGUSR1) on any rank, the
--exit-duration-in-mins time limit, or every --exit-interval steps. The loop then saves and exits
with PREEMPTION_EXIT_CODE."""

from __future__ import annotations

import time

import torch

from megatron_llamapro.training import signals
from megatron_llamapro.training.parallel import all_reduce


def _any_rank(flag: bool) -> bool:
    """Collective: whether `flag` is set on any rank."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    return bool(all_reduce(value, op=torch.distributed.ReduceOp.MAX).item())


class StopPolicy:
    def __init__(self, exit_interval: int | None, exit_duration_in_mins: float | None, start_time: float):
        self.flag = signals.install()
        self.exit_interval = exit_interval
        self.exit_duration_in_mins = exit_duration_in_mins
        self.start_time = start_time

    def reason(self, step: int) -> str | None:
        """Collective, after every step: None to go on, else why to stop ('signal' for a signal or
        the time limit, 'exit interval')."""
        stop = _any_rank(self.flag.received is not None)
        if self.exit_duration_in_mins is not None:
            stop = _any_rank((time.time() - self.start_time) / 60 > self.exit_duration_in_mins) or stop
        if stop:
            return "signal"
        if self.exit_interval and step % self.exit_interval == 0:
            return "exit interval"
        return None
