"""Requeue and preemption on a real Slurm cluster (tests/test_slurm.py's, KillWait 5 s): `scancel JOB`
and `scontrol requeue JOB` during a 2-node training job (SIGTERM to the tasks and the batch shell,
SIGKILL 5 s later). SIGUSR1 (--signal=B:USR1@N) is tests/test_slurm.py's test_slurm_preemption_requeue."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.lib import training_iterations
from tests.test_slurm import (  # noqa: F401 - module fixtures
    CPU_JOB,
    PREEMPTION_EXIT_CODE,
    PRETRAIN_SH,
    REPO,
    TRAINER_ARGS,
    _read,
    _tracker,
    _train_env,
    llamapro_inputs,
    slurm_cluster,
)

ITERS = 60


def _job_processes(job: int) -> list[str]:
    """'PID cmdline' of every python process here whose environment has SLURM_JOB_ID=job (the
    trainer ranks and the checkpoint writer's helper inherit it)."""
    found = []
    marker = f"SLURM_JOB_ID={job}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if marker in environ and "python" in cmdline:
            found.append(f"{d.name} {cmdline}")
    return found


def _start_and_wait_for_checkpoint(cluster, inputs, save: Path, out: Path, extra_args: str = "") -> int:
    """Submit a 60-iteration job (checkpoints every 5) and return once its first checkpoint is there."""
    env = _train_env(inputs, save, TRAIN_ITERS=str(ITERS), SAVE_INTERVAL="5", EVAL_INTERVAL="1000",
                     EXTRA_ARGS=extra_args)
    job = cluster.sbatch(PRETRAIN_SH, TRAINER_ARGS, env=env, sbatch_args=[*CPU_JOB, f"--output={out}"], cwd=REPO)
    deadline = time.monotonic() + 180
    while _tracker(save) is None:
        state = cluster.job_state(job)
        if state not in ("PENDING", "CONFIGURING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint before the signal (job {state}):\n{_read(out)[-6000:]}")
        time.sleep(0.1)
    return job


def _assert_stopped_on_sigterm(text: str, tracked: int) -> None:
    """The trainer said how it stopped before SIGKILL: saved at iteration N, or not saved and N
    resumes from the last periodic checkpoint; no traceback (a helper killed mid-save)."""
    assert "Traceback" not in text, text[-6000:]
    match = re.search(r"^stopping at iteration (\d+) \(SIGTERM\): (checkpoint saved|not saved \(.*\); "
                      r"resumes from iteration (\d+) in .*); exit code 75$", text, re.MULTILINE)
    assert match, text[-6000:]
    assert tracked == int(match.group(1) if match.group(2) == "checkpoint saved" else match.group(3)), text[-6000:]


def _assert_no_processes_left(job: int, out: Path) -> None:
    deadline = time.monotonic() + 20       # slurmstepd has ended the job's processes by now; a margin
    while (left := _job_processes(job)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of job {job} left:\n" + "\n".join(left) + "\n" + _read(out)[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("extra_args", ["", "--preempt-grace-secs 0.01"], ids=["saves-if-it-fits", "no-time-to-save"])
def test_slurm_scancel_stays_cancelled_and_resumes(tmp_path, slurm_cluster, llamapro_inputs, extra_args):
    """Plain `scancel JOB` (SIGTERM to the tasks and the batch shell, SIGKILL KillWait later): no
    hang, the job ends CANCELLED and is not requeued, the script says so before SIGKILL, the last
    complete checkpoint is intact, nothing of the job is left running; a rerun resumes from that
    checkpoint and finishes with every iteration recorded once. With a grace too short for any save
    the trainer exits at once without saving, and the rerun resumes from the last periodic one."""
    save, out, out2 = tmp_path / "save", tmp_path / "job.out", tmp_path / "rerun.out"
    job = _start_and_wait_for_checkpoint(slurm_cluster, llamapro_inputs, save, out, extra_args)
    t0 = time.monotonic()
    slurm_cluster.cancel(job)
    state = slurm_cluster.wait(job, timeout=120, poll=0.2)       # CANCELLED once its processes are gone
    ended = time.monotonic() - t0
    text = _read(out)
    assert state == "CANCELLED", text[-6000:]
    assert ended < 60, f"the job took {ended:.1f}s to end after scancel:\n{text[-6000:]}"
    assert int(slurm_cluster.job_info(job).get("Restarts", "0")) == 0
    assert f"not requeueing: job {job} was cancelled (scancel)" in text, text[-6000:]
    assert "requeueing job" not in text, text[-6000:]
    _assert_no_processes_left(job, out)

    stopped_at = int(_tracker(save))
    assert 5 <= stopped_at < ITERS and (save / f"iter_{stopped_at:07d}").is_dir(), text[-6000:]
    _assert_stopped_on_sigterm(text, stopped_at)
    if extra_args:
        assert stopped_at % 5 == 0 and "): not saved (the last save took" in text, text[-6000:]
    env = _train_env(llamapro_inputs, save, TRAIN_ITERS=str(ITERS), SAVE_INTERVAL="5", EVAL_INTERVAL="1000")
    job2 = slurm_cluster.sbatch(PRETRAIN_SH, TRAINER_ARGS, env=env, sbatch_args=[*CPU_JOB, f"--output={out2}"],
                                cwd=REPO)
    state = slurm_cluster.wait(job2, timeout=240)
    text2 = _read(out2)
    assert state == "COMPLETED", text2[-6000:]
    assert f"resuming from iteration {stopped_at} of {save}" in text2, text2[-6000:]
    assert _tracker(save) == str(ITERS)
    done = training_iterations(save / "metrics.jsonl")
    assert sorted(done) == list(range(1, ITERS + 1)), done
    print(f"scancel ({extra_args or 'KillWait grace'}): job ended {ended:.1f}s after scancel; "
          f"checkpoint at {stopped_at}")


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_slurm_scontrol_requeue_resumes_once(tmp_path, slurm_cluster, llamapro_inputs):
    """`scontrol requeue JOB` (Slurm itself requeues; SIGTERM as with scancel): the job is requeued
    once, the script does not requeue it a second time, and the restart resumes from the last
    complete checkpoint and finishes with every iteration recorded once."""
    save, out = tmp_path / "save", tmp_path / "job.out"
    job = _start_and_wait_for_checkpoint(slurm_cluster, llamapro_inputs, save, out)
    t0 = time.monotonic()
    slurm_cluster.run(["scontrol", "requeue", str(job)], check=True)
    state = slurm_cluster.wait(job, timeout=300)
    ended = time.monotonic() - t0
    text = _read(out)
    info = slurm_cluster.job_info(job)
    assert state == "COMPLETED", text[-6000:]
    assert int(info.get("Restarts", "0")) == 1, info
    assert "(restart 1)" in text and "resuming from iteration" in text, text[-6000:]
    assert f"not requeueing: job {job} is already being requeued (scontrol requeue or preemption)" in text, text[-6000:]
    first_run = text[:text.index("(restart 1)")]
    _assert_stopped_on_sigterm(first_run, int(re.search(r"resuming from iteration (\d+) ", text).group(1)))
    assert _tracker(save) == str(ITERS)
    done = training_iterations(save / "metrics.jsonl")
    assert sorted(done) == list(range(1, ITERS + 1)), done
    _assert_no_processes_left(job, out)
    print(f"scontrol requeue: job completed {ended:.1f}s after the requeue")
