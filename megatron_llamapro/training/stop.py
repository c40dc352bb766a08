"""When the training loop stops early: a stop signal on any rank (SIGTERM / SIGUSR1: preemption,
SIGINT: Ctrl-C), the --exit-duration-in-mins time limit, or every --exit-interval steps; and
whether a SIGTERM leaves time to save.

SIGTERM is followed by SIGKILL after a grace time (Slurm's KillWait, 30 s by default; scancel, the
time limit and `scontrol requeue` all send it). The loop saves on SIGTERM only when the last
measured save fits in what is left of the grace time; else it exits at once and the run resumes
from the last periodic checkpoint. SIGUSR1 (`--signal=B:USR1@N`: N seconds before the time limit)
and the time limit itself always save; Ctrl-C never does (the last complete checkpoint stays).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_llamapro.training import signals
from megatron_llamapro.training.parallel import all_reduce

SLURM_DEFAULT_KILL_WAIT = 30.0  # seconds: Slurm's KillWait when slurm.conf does not set it
SAVE_TIME_SAFETY = 1.5  # a save on SIGTERM needs this times the last measured save duration ...
SAVE_TIME_MARGIN = 1.0  # ... plus this many seconds (exit, and the job script's last lines)


def _any_rank(flag: bool) -> bool:
    """Collective: whether `flag` is set on any rank."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    return bool(all_reduce(value, op=torch.distributed.ReduceOp.MAX).item())


def _max_over_ranks(value: float) -> float:
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), op=torch.distributed.ReduceOp.MAX).item())


@dataclass(frozen=True)
class Stop:
    reason: str  # 'SIGTERM', 'SIGUSR1', 'SIGINT', 'time limit' or 'exit interval'
    signal_age: float = 0.0  # seconds since the (earliest) signal, on the rank that got it first

    @property
    def interrupted(self) -> bool:
        return self.reason == "SIGINT"


class StopPolicy:
    def __init__(self, exit_interval: int | None, exit_duration_in_mins: float | None, start_time: float):
        self.flag = signals.install()
        self.exit_interval = exit_interval
        self.exit_duration_in_mins = exit_duration_in_mins
        self.start_time = start_time

    def check(self, step: int) -> Stop | None:
        """Collective, after every step: None to go on, else why to stop. Each rank keeps the first
        signal it got; across ranks SIGTERM wins over SIGUSR1, which wins over SIGINT."""
        signum = int(_max_over_ranks(self.flag.received or 0))
        if signum:
            age = time.monotonic() - self.flag.received_at if self.flag.received is not None else 0.0
            return Stop(signal.Signals(signum).name, _max_over_ranks(age))
        if self.exit_duration_in_mins is not None and \
                _any_rank((time.time() - self.start_time) / 60 > self.exit_duration_in_mins):
            return Stop("time limit")
        if self.exit_interval and step % self.exit_interval == 0:
            return Stop("exit interval")
        return None


def save_on_sigterm(grace: float | None, signal_age: float, last_save_secs: float | None,
                    has_checkpoint: bool) -> tuple[bool, str]:
    """(whether to save, why in words) for a SIGTERM `signal_age` seconds ago."""
    if grace is None:
        return True, "no grace limit"
    left = grace - signal_age
    if last_save_secs is None:
        if has_checkpoint:
            return False, f"no save measured yet in this run, {left:.1f}s of the {grace:g}s grace left"
        return True, "no earlier checkpoint to fall back to"
    need = last_save_secs * SAVE_TIME_SAFETY + SAVE_TIME_MARGIN
    words = f"the last save took {last_save_secs:.1f}s, {left:.1f}s of the {grace:g}s grace left"
    return need <= left, words


def resolve_grace(configured: float | None, log: Callable[[str], None],
                  environ=os.environ) -> tuple[float | None, str]:
    """(seconds between SIGTERM and SIGKILL or None for no limit, where that figure comes from).
    --preempt-grace-secs wins; in a Slurm job, KillWait from `scontrol show config`; outside
    Slurm there is no SIGKILL to race (kill sends none)."""
    if configured is not None:
        return (configured if configured > 0 else None), "--preempt-grace-secs"
    if not environ.get("SLURM_JOB_ID"):
        return None, "not a Slurm job"
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    match = re.search(r"^KillWait\s*=\s*(\d+)", out, flags=re.MULTILINE)
    if match:
        return float(match.group(1)), "Slurm's KillWait"
    log(f"warning: cannot read Slurm's KillWait (scontrol show config); assuming {SLURM_DEFAULT_KILL_WAIT:g}s "
        "between SIGTERM and SIGKILL (set --preempt-grace-secs)")
    return SLURM_DEFAULT_KILL_WAIT, "Slurm's default KillWait"
