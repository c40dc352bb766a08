"""tools/pretrain_expand.py --nproc-per-node N: flags and checkpoint checked once before any worker
starts, workers started with torch's elastic launch API, one closing line and the workers' exit
status (75 stays 75, unlike torchrun's 1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests import training_lib as tl
from tests.lib import run_tool
from tests.training_lib import assets  # noqa: F401 - session fixture


def launch(args: list[str], nproc: int = 2, timeout: float = 240, cwd: Path = tl.REPO):
    return run_tool("pretrain_expand", "--nproc-per-node", nproc, *args, cwd=cwd, timeout=timeout)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_bad_flag_is_reported_once_and_no_worker_starts(assets, tmp_path):
    args = tl.train_args(assets, tmp_path / "save", 2, "--tensor-model-parallel-size", "3")
    proc = launch(args)
    assert proc.returncode == 2, proc.stderr
    assert lines(proc.stderr) == ["error: --tp 3 does not divide num_attention_heads 4"], proc.stderr
    assert "started" not in proc.stdout and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "save").exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_to_the_end_and_a_preempted_run_keep_their_exit_status(assets, tmp_path):
    save = tmp_path / "save"
    proc = launch(tl.train_args(assets, save, 4, "--exit-interval", "2"))
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [line for line in lines(proc.stderr) if line.startswith("launch: ")] == [
        "launch: every rank stopped after saving (exit 75: resubmit to resume)"]
    assert lines(proc.stdout)[0].startswith("check: ok: world size 2 = TP 1 x PP 1 x DP 2")
    # one start line for the run, not one per rank interleaved on the console
    # (the launcher prefixes each rank's console lines with [rankN]:)
    assert [line for line in lines(proc.stdout) if "started: " in line] == [
        "[rank0]:started: torchrun launch, world 2, TP=1 PP=1 DP=2, 1 host: " + f"{os.uname().nodename} (ranks 0-1)"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    done = launch(tl.train_args(assets, save, 4))  # resumes at 2, finishes at 4
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_damaged_checkpoint_is_caught_by_the_check_before_any_worker(assets, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(assets.expanded, damaged)
    shard = next(damaged.rglob("model_optim_rng.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    proc = launch(tl.train_args(assets, tmp_path / "save", 2, load=damaged))
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = lines(proc.stderr)
    size = shard.stat().st_size
    assert err == [f"error: damaged checkpoint: {shard}: truncated ({size} of "
                   f"{(assets.expanded / shard.relative_to(damaged)).stat().st_size} bytes)"], err
    assert "started" not in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_failure_ends_in_one_line_naming_the_rank_and_its_error(assets, tmp_path):
    # well-formed files (the check passes) holding token ids beyond the vocabulary: the ranks fail
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    data = tmp_path / "data"
    data.mkdir()
    builder = IndexedDatasetBuilder(str(data / "domain.bin"), dtype=numpy.int32)
    for _ in range(64):
        builder.add_item(torch.full((40,), 100_000, dtype=torch.int32))
        builder.end_document()
    builder.finalize(str(data / "domain.idx"))
    args = [str(data / "domain") if a == assets.domain else a for a in tl.train_args(assets, tmp_path / "save", 2)]
    proc = launch(args)
    assert proc.returncode not in (0, 75), proc.stderr[-3000:]
    # the ranks' own output is copied to the console by the launcher's threads: its summary line may
    # come before the last of it
    summary = [line for line in lines(proc.stderr) if line.startswith("launch: ")]
    assert len(summary) == 1, proc.stderr[-3000:]
    assert summary[0].startswith("launch: error: rank ") and f"exited with status {proc.returncode}: " in summary[0]
    assert "(its output: " in summary[0] and "ChildFailedError" not in proc.stderr, summary
