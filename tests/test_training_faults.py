"""A training checkpoint save that the disk refuses (full, read-only) on real tmpfs mounts, in both
save formats, on 1 and 2 ranks: every rank stops (none hangs in a collective), the partial
iteration folder is removed, the tracker and the previous checkpoint stay as they were, rank 0
prints one line naming --save and the cause, every rank exits 2, and a rerun once there is room
resumes from the previous checkpoint. A read-only --save is found before training starts (by the
run plan's check, which leaves nothing behind)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_llamapro.checkpoint.tracker import read_tracker
from megatron_llamapro.training import iteration_dirs as ckpt
from tests import training_lib as tl
from tests.lib import run_tool, tool_env
from tests.test_faults import error_lines, mount_tmpfs  # noqa: F401 - fixture
from tests.training_lib import assets  # noqa: F401 - session fixture

@pytest.fixture(scope="module")
def checkpoint_bytes(assets, tmp_path_factory):
    """checkpoint_bytes(fmt): what --save holds after a run's first checkpoint in this format (on a
    normal disk; measured once per module)."""
    sizes: dict[str, int] = {}

    def measure(fmt: str) -> int:
        if fmt not in sizes:
            save = tmp_path_factory.mktemp("measure") / fmt
            tl.train(tl.train_args(assets, save, 2, "--save-interval", "2", "--save-format", fmt), timeout=200)
            sizes[fmt] = tl.dir_bytes(save)
            shutil.rmtree(save)
        return sizes[fmt]

    return measure


def remount(point: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)


def leftovers(save: Path) -> list[str]:
    return sorted(p.name for p in save.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def _full_disk_then_resume(assets, tmp_path, mount_tmpfs, one: int, fmt: str, nproc: int) -> None:
    disk = mount_tmpfs(f"{int(one * 1.5) // 1024}k")  # the first checkpoint fits, the second does not
    save = disk / "ckpt"
    args = tl.train_args(assets, save, 4, "--save-interval", "2", "--save-format", fmt)
    launch = tl.Launch(args, nproc, tmp_path)
    result = launch.wait(200)
    assert result.codes == [2] * nproc, launch.text()
    assert error_lines(result.err[0]) == [
        f"error: --save {save}: no space left on device while writing iter_0000004 (the previous checkpoint "
        "iter_0000002 is intact; free space and rerun to resume)"], launch.text()
    for err in result.err[1:]:
        assert error_lines(err) == [], launch.text()
    assert "saved checkpoint" in result.out[0] and "iter_0000002" in result.out[0]
    assert not (save / "iter_0000004").exists() and leftovers(save) == [], sorted(save.iterdir())
    assert read_tracker(save) == 2 and ckpt.checkpoint_problem(save, 2) is None

    remount(disk, "64m")
    rerun = tl.train(args, nproc, timeout=200)
    assert "resuming from iteration 2 of" in rerun.out[0], rerun.out[0]
    assert read_tracker(save) == 4 and ckpt.checkpoint_problem(save, 4) is None
    assert ckpt.checkpoint_problem(save, 2) is None and leftovers(save) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_full_disk_during_a_save_one_rank(assets, tmp_path, mount_tmpfs, checkpoint_bytes, fmt):
    _full_disk_then_resume(assets, tmp_path, mount_tmpfs, checkpoint_bytes(fmt), fmt, 1)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_full_disk_during_a_save_two_ranks(assets, tmp_path, mount_tmpfs, checkpoint_bytes, fmt):
    _full_disk_then_resume(assets, tmp_path, mount_tmpfs, checkpoint_bytes(fmt), fmt, 2)


@pytest.mark.timeout(300)
def test_read_only_save_is_refused_before_training(assets, tmp_path, mount_tmpfs):
    disk = mount_tmpfs("1m", read_only=True)
    save = disk / "ckpt"
    args = tl.train_args(assets, save, 4, "--save-interval", "2")
    expected = [f"error: --save {save}: read-only file system; choose a writable directory"]
    result = tl.train(args, 1, timeout=120, expect=2)
    assert error_lines(result.err[0]) == expected and "started:" not in result.out[0], result.err[0]
    # the launcher checks once, for both ranks, and starts none
    proc = run_tool("pretrain_expand", "--nproc-per-node", "2", *args, env=tool_env({"PYTHONWARNINGS": "ignore"}),
                    timeout=120)
    assert proc.returncode == 2 and error_lines(proc.stderr) == expected, proc.stderr
    assert list(disk.iterdir()) == []


def test_a_missing_save_is_checked_and_left_absent(assets, tmp_path):
    save = tmp_path / "new" / "ckpt"
    proc = run_tool("megatron_llamapro.pretrain", *tl.train_args(assets, save, 4), "--check",
                    env=tool_env({"PYTHONWARNINGS": "ignore"}), timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("check: ok:"), proc.stderr
    assert list(tmp_path.iterdir()) == []  # the probe's folders are gone again


def test_a_save_that_is_a_file_is_refused(assets, tmp_path):
    save = tmp_path / "ckpt"
    save.write_text("not a folder\n")
    proc = run_tool("megatron_llamapro.pretrain", *tl.train_args(assets, save, 4), "--check",
                    env=tool_env({"PYTHONWARNINGS": "ignore"}), timeout=120)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        f"error: --save {save}: exists and is not a directory"], proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_disk_through_the_launcher_ends_in_rank_0s_line(assets, tmp_path, mount_tmpfs, checkpoint_bytes):
    disk = mount_tmpfs(f"{int(checkpoint_bytes('torch_dist') * 1.5) // 1024}k")
    save = disk / "ckpt"
    args = tl.train_args(assets, save, 4, "--save-interval", "2")
    proc = run_tool("pretrain_expand", "--nproc-per-node", "2", *args, env=tool_env({"PYTHONWARNINGS": "ignore"}),
                    timeout=300)
    message = (f"error: --save {save}: no space left on device while writing iter_0000004 (the previous "
               "checkpoint iter_0000002 is intact; free space and rerun to resume)")
    assert proc.returncode == 2, proc.stderr[-3000:]
    # rank 0's line as the launcher copies it to the console, then the launcher's summary naming it
    lines = error_lines(proc.stderr)
    assert [line for line in lines if not line.startswith("launch: ")] == [f"[rank0]:{message}"], lines
    summary = [line for line in lines if line.startswith("launch: ")]
    assert len(summary) == 1 and re.fullmatch(
        rf"launch: error: rank 0 exited with status 2: {re.escape(message)} \(its output: .*\)", summary[0]), lines
    assert read_tracker(save) == 2 and leftovers(save) == [] and not (save / "iter_0000004").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_disk_while_rank_0_copies_the_tokenizer_at_the_first_save(assets, tmp_path, mount_tmpfs):
    """Room for the metrics and the manifest, not for the tokenizer rank 0 copies beside them."""
    disk = mount_tmpfs("12k")
    save = disk / "ckpt"
    args = tl.train_args(assets, save, 2, "--save-interval", "2")
    launch = tl.Launch(args, 2, tmp_path)
    result = launch.wait(200)
    assert result.codes == [2, 2], launch.text()
    assert error_lines(result.err[0]) == [
        f"error: --save {save}: no space left on device while writing iter_0000002 (no checkpoint was saved "
        "yet; free space and rerun)"], launch.text()
    assert error_lines(result.err[1]) == [], launch.text()
    assert (save / "llamapro.json").is_file() and not (save / "tokenizer").exists(), sorted(save.iterdir())
    assert leftovers(save) == [], sorted(save.iterdir())
    assert not (save / "latest_checkpointed_iteration.txt").exists() and not (save / "iter_0000002").exists()

    remount(disk, "64m")
    rerun = tl.train(args, 2, timeout=200)
    assert "resuming" not in rerun.out[0] and read_tracker(save) == 2, rerun.out[0]
    assert ckpt.checkpoint_problem(save, 2) is None and (save / "tokenizer" / "tokenizer.model").is_file()


def test_the_cause_is_found_inside_torchs_checkpoint_exception(tmp_path):
    """torch.distributed.checkpoint reports each rank's write error inside one CheckpointException
    (a BaseException); the disk's errno is found there, on a disk with room to spare too."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_llamapro.fsutil import NO_PERMISSION, NO_SPACE, READ_ONLY, disk_problem

    def failed(code: int) -> CheckpointException:
        try:
            raise RuntimeError("Worker failure") from OSError(code, os.strerror(code), str(tmp_path / "0.distcp"))
        except RuntimeError as exc:
            return CheckpointException("write", {1: (exc, None)})

    assert [disk_problem(failed(code), tmp_path) for code in (errno.ENOSPC, errno.EROFS, errno.EACCES)] == \
        [NO_SPACE, READ_ONLY, NO_PERMISSION]
    assert disk_problem(CheckpointException("write", {0: (ValueError("a bug"), None)}), tmp_path) is None
