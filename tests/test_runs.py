"""Issues 15 and 20, the trainer's part: runs an operator can trust.

SIGTERM saves only when the last measured save fits in the grace time, else exits 75 at once and
the run resumes from the last periodic checkpoint with no iteration recorded twice; Ctrl-C stops
within a step with one line and exit 130, no traceback, nothing left running; after kill -9 of the
trainer no checkpoint writer helper survives.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from megatron_llamapro.checkpoint.tracker import read_tracker
from megatron_llamapro.training import iteration_dirs as ckpt
from megatron_llamapro.training.config import PREEMPTION_EXIT_CODE
from megatron_llamapro.training.metrics import drop_records_after
from megatron_llamapro.training.stop import SLURM_DEFAULT_KILL_WAIT, resolve_grace, save_on_sigterm
from tests import training_lib as tl
from tests.training_lib import assets  # noqa: F401 - session fixture


# ---- decisions (no processes) -------------------------------------------------------------------

def test_sigterm_saves_only_when_the_last_save_fits_in_the_grace_left():
    assert save_on_sigterm(None, 100.0, 50.0, True) == (True, "no grace limit")
    assert save_on_sigterm(5.0, 0.5, 1.0, True) == (True, "the last save took 1.0s, 4.5s of the 5s grace left")
    assert save_on_sigterm(5.0, 2.0, 1.5, True) == (False, "the last save took 1.5s, 3.0s of the 5s grace left")
    assert save_on_sigterm(5.0, 1.0, None, False) == (True, "no earlier checkpoint to fall back to")
    assert save_on_sigterm(5.0, 1.0, None, True)[0] is False


def test_grace_comes_from_the_flag_then_slurm_killwait(monkeypatch):
    import subprocess

    logged = []
    assert resolve_grace(7.0, logged.append, environ={}) == (7.0, "--preempt-grace-secs")
    assert resolve_grace(0.0, logged.append, environ={"SLURM_JOB_ID": "1"}) == (None, "--preempt-grace-secs")
    assert resolve_grace(None, logged.append, environ={}) == (None, "not a Slurm job")

    class Done:
        stdout = "AuthType                = auth/none\nKillWait                = 5 sec\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    assert resolve_grace(None, logged.append, environ={"SLURM_JOB_ID": "1"}) == (5.0, "Slurm's KillWait")

    def refused(*a, **k):
        raise OSError("scontrol: not allowed")

    monkeypatch.setattr(subprocess, "run", refused)
    assert resolve_grace(None, logged.append, environ={"SLURM_JOB_ID": "1"}) == \
        (SLURM_DEFAULT_KILL_WAIT, "Slurm's default KillWait")
    assert logged == ["warning: cannot read Slurm's KillWait (scontrol show config); assuming 30s between "
                      "SIGTERM and SIGKILL (set --preempt-grace-secs)"]


def test_metrics_after_the_resumed_iteration_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"iteration": 0, "valid_loss/x": 1.0}] + [{"iteration": i, "loss": 1.0} for i in range(1, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 8, "lo')
    assert drop_records_after(path, 5) == 3
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
    assert drop_records_after(path, 5) == 0
    assert drop_records_after(path, 0) == 6 and path.read_text() == ""  # a fresh start logs all again


# ---- whole runs ---------------------------------------------------------------------------------

def _train_iterations(metrics: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()
            if "loss" in json.loads(line)]


def _tracked(save: Path) -> int:
    return read_tracker(save) if (save / "latest_checkpointed_iteration.txt").is_file() else 0


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(300)
def test_sigterm_without_time_to_save_exits_75_at_once_and_resume_has_no_duplicates(assets, tmp_path):
    save = tmp_path / "run"
    args = tl.train_args(assets, save, 30, "--save-interval", "4", "--preempt-grace-secs", "0.01",
                         "--log-interval", "1")
    launch = tl.Launch(args, 1, tmp_path)
    tl.wait_for(lambda: tl.last_logged_iteration(save / "metrics.jsonl") >= 6, 200, "iteration 6", launch)
    os.kill(launch.procs[0].pid, signal.SIGTERM)
    result = launch.wait(120)
    assert result.code == PREEMPTION_EXIT_CODE, launch.text()
    kept = read_tracker(save)
    last = tl.last_logged_iteration(save / "metrics.jsonl")
    assert kept % 4 == 0 and kept < last, launch.text()
    assert ckpt.checkpoint_problem(save, kept) is None
    line = [x for x in result.out[0].splitlines() if x.startswith("stopping at")]
    assert re.fullmatch(rf"stopping at iteration {last} \(SIGTERM\): not saved \(the last save took "
                        rf"[0-9.]+s, -?[0-9.]+s of the 0.01s grace left\); resumes from iteration {kept} in "
                        rf"{re.escape(str(save))}; exit code 75", line[0] if line else ""), result.out[0]
    assert re.search(r"^saved checkpoint .*iter_0000004 in [0-9.]+s$", result.out[0], re.MULTILINE)
    assert _group_gone(launch.procs[0].pid, 10), "a checkpoint writer helper outlived the trainer's exit at once"

    result = tl.train(tl.train_args(assets, save, 12, "--save-interval", "4"), timeout=200)
    assert f"dropped {last - kept} record(s) of iterations after {kept}" in result.out[0], result.out[0]
    assert _train_iterations(save / "metrics.jsonl") == list(range(1, 13))


@pytest.mark.timeout(300)
def test_ctrl_c_on_two_ranks_stops_within_a_step_exits_130_and_leaves_nothing(assets, tmp_path):
    save = tmp_path / "run"
    args = tl.train_args(assets, save, 200, "--save-interval", "3")
    launch = tl.Launch(args, 2, tmp_path)
    tl.wait_for(lambda: _tracked(save) >= 3, 200, "a checkpoint", launch)
    for proc in launch.procs:  # what a terminal does: SIGINT to the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
    result = launch.wait(120)
    assert result.codes == [130, 130], launch.text()
    kept = read_tracker(save)
    assert ckpt.checkpoint_problem(save, kept) is None
    lines = [x for x in result.out[0].splitlines() if x.startswith("stopping at")]
    assert len(lines) == 1 and re.fullmatch(
        rf"stopping at iteration \d+ \(SIGINT\): not saved \(Ctrl-C\); resumes from iteration {kept} in "
        rf"{re.escape(str(save))}; exit code 130", lines[0]), result.out[0]
    assert all("Traceback" not in err and "KeyboardInterrupt" not in err for err in result.err), launch.text()
    assert all(_group_gone(proc.pid, 10) for proc in launch.procs), "a helper process outlived its rank"
    assert not list(save.glob(".tmp_*"))


@pytest.mark.timeout(300)
def test_checkpoint_writer_helper_dies_with_a_killed_trainer(assets, tmp_path):
    save = tmp_path / "run"
    launch = tl.Launch(tl.train_args(assets, save, 200, "--save-interval", "2"), 1, tmp_path)
    tl.wait_for(lambda: _tracked(save) >= 2, 200, "a checkpoint", launch)
    trainer = launch.procs[0]
    os.kill(trainer.pid, signal.SIGKILL)  # the trainer only: its helpers must follow by themselves
    trainer.wait(30)
    assert _group_gone(trainer.pid, 15), "a checkpoint writer process outlived the killed trainer"


HELPER_SURVIVES_SIGTERM = """
import os, signal, time
from megatron_llamapro.training import signals
from megatron.core.dist_checkpointing.strategies import filesystem_async
if __name__ == "__main__":
    signals.start_checkpoint_writer_helper()
    children = [int(pid) for task in os.listdir("/proc/self/task")
                for pid in open(f"/proc/self/task/{task}/children").read().split()]
    for pid in children:  # what Slurm does: SIGTERM to every process of the step
        os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    filesystem_async._results_queue.put("written")
    print(len(children), filesystem_async._results_queue.get(), flush=True)
"""


@pytest.mark.timeout(120)
def test_checkpoint_writer_helper_outlives_the_sigterm_slurm_sends_every_process(tmp_path):
    """The save on SIGTERM needs the writer's Manager process, which Slurm signals too: it keeps the
    stop signals blocked (starting multiprocessing's resource tracker unblocks them in the caller)."""
    import subprocess
    import sys

    script = tmp_path / "helper.py"
    script.write_text(HELPER_SURVIVES_SIGTERM)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["2", "written"], r.stdout + r.stderr  # the resource tracker and the Manager


# ---- small ones ---------------------------------------------------------------------------------

def test_negative_numbers_in_scientific_form_are_values():
    from megatron_llamapro.training.config import ConfigError, load_config

    config = load_config(["--lr", "-1e-3", "--min-lr", "-2E-5", "--data-path", "x", "--load", "y"])
    assert (config.lr, config.min_lr) == (-1e-3, -2e-5)
    with pytest.raises(ConfigError, match=r"^--lr -0.001: must be >= 0$"):
        config.validate(1)


def test_first_save_from_an_hf_load_copies_only_the_tokenizer_files(tmp_path):
    from megatron_llamapro.checkpoint.manifest import tokenizer_files
    from megatron_llamapro.training.checkpointer import Checkpointer
    from megatron_llamapro.training.config import TrainConfig
    from tests.fixtures import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", num_layers=2)
    expected = sorted(tokenizer_files(hf))
    save = tmp_path / "save"

    class NoManifest:
        def replace(self, **_):
            return self

        def write(self, _):
            pass

    checkpointer = Checkpointer(TrainConfig(save=str(save)), NoManifest(), hf, [], None, None, None, print)
    with pytest.raises(Exception):  # no process group: the copy happens before the first barrier
        checkpointer._write(1)
    assert expected and sorted(p.name for p in (save / "tokenizer").iterdir()) == expected
    assert not any(p.suffix == ".safetensors" for p in (save / "tokenizer").iterdir())


def test_one_start_line_names_every_host_and_its_ranks():
    from megatron_llamapro.training.trainer import describe_hosts

    assert describe_hosts(["a"]) == "1 host: a (rank 0)"
    assert describe_hosts(["n1"] * 8 + ["n2"] * 8) == "2 hosts: n1 (ranks 0-7), n2 (ranks 8-15)"
    assert describe_hosts(["n1", "n2", "n1", "n2"]) == "2 hosts: n1 (ranks 0,2), n2 (ranks 1,3)"
