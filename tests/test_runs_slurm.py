"""Issue 15 on a real Slurm cluster (tests/test_slurm.py's, KillWait 5 s): scancel during training."""

from __future__ import annotations

import time

import pytest

from tests.test_slurm import (  # noqa: F401 - module fixtures
    CPU_JOB,
    PRETRAIN_SH,
    REPO,
    TRAINER_ARGS,
    _read,
    _tracker,
    _train_env,
    llamapro_inputs,
    slurm_cluster,
)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_slurm_scancel_saves_and_stays_cancelled(tmp_path, slurm_cluster, llamapro_inputs):
    """Plain `scancel JOB` (SIGTERM, as a requeue or the time limit): the trainer saves and exits 75,
    and the script sees the job is CANCELLED and does not requeue it."""
    save = tmp_path / "save"
    out = tmp_path / "job.out"
    env = _train_env(llamapro_inputs, save, TRAIN_ITERS="60", SAVE_INTERVAL="5", EVAL_INTERVAL="1000")
    job = slurm_cluster.sbatch(PRETRAIN_SH, TRAINER_ARGS, env=env, sbatch_args=[*CPU_JOB, f"--output={out}"],
                               cwd=REPO)
    deadline = time.monotonic() + 180
    while _tracker(save) is None:
        state = slurm_cluster.job_state(job)
        if state not in ("PENDING", "CONFIGURING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint before scancel (job {state}):\n{_read(out)[-6000:]}")
        time.sleep(0.1)
    slurm_cluster.cancel(job)
    state = slurm_cluster.wait(job, timeout=240)
    deadline = time.monotonic() + 60
    while "training step ended" not in _read(out) and time.monotonic() < deadline:
        time.sleep(0.2)  # the batch shell finishes its last lines after the job record says CANCELLED
    text = _read(out)
    assert state == "CANCELLED", text[-6000:]
    assert int(slurm_cluster.job_info(job).get("Restarts", "0")) == 0
    assert f"not requeueing: job {job} was cancelled (scancel)" in text, text[-6000:]
    assert int(_tracker(save)) < 60


