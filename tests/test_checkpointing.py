"""Training checkpoints survive preemption.

SIGTERM -> checkpoint + exit 75 -> the resumed run reproduces the uninterrupted losses; kill -9 of
one of two ranks -> resume from the last checkpoint, no other step lost; --keep-last never removes
the tracked checkpoint; damaged checkpoints are skipped on auto-resume with a warning naming the
file and refused with that file's name when loaded directly; resuming at another data-parallel
size; trainable-only delta checkpoints and tools/merge_delta.py (merged == full save, bit for bit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from megatron_llamapro.checkpoint import delta
from megatron_llamapro.checkpoint.tracker import iteration_name, read_tracker, write_tracker
from megatron_llamapro.runtime.multiproc import run_distributed
from megatron_llamapro.training import iteration_dirs as ckpt
from megatron_llamapro.training.config import PREEMPTION_EXIT_CODE
from tests import training_lib as tl
from tests.lib import run_tool
from tests.training_lib import assets, reference  # noqa: F401 - session fixtures


def _iters(save: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in save.glob("iter_*") if p.is_dir())


def _assert_losses_match_reference(save_or_metrics: Path, reference: Path, iterations, tol: float = 0.0) -> None:
    """Losses logged under save equal the reference run's: bit for bit (tol 0), or within tol
    where the data-parallel size differs (DP=2 averages gradients in another order: ~1e-7)."""
    got, want = tl.losses(save_or_metrics), tl.losses(reference)
    missing = [i for i in iterations if i not in got]
    assert not missing, f"iterations never logged: {missing}"
    diff = {i: (got[i], want[i]) for i in iterations if abs(got[i] - want[i]) > tol}
    assert not diff, diff


def _copy_checkpoint(src_root: Path, iteration: int, dst_root: Path) -> Path:
    """dst_root holding only src_root's iter_N (+ manifest, tokenizer), tracker at N."""
    dst_root.mkdir(parents=True)
    for name in ("llamapro.json", "tokenizer"):
        src = src_root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst_root / name)
    shutil.copytree(src_root / iteration_name(iteration), dst_root / iteration_name(iteration))
    write_tracker(dst_root, iteration)
    return dst_root


# ---- preemption ---------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_sigterm_checkpoints_exits_75_and_resume_is_identical(assets, reference, tmp_path):
    save = tmp_path / "run"
    args = tl.train_args(assets, save, tl.REF_ITERS, "--save-interval", "10", "--keep-last", "2")
    launch = tl.Launch(args, 1, tmp_path)
    tl.wait_for(lambda: tl.last_logged_iteration(save / "metrics.jsonl") >= 13, 200, "iteration 13", launch)
    os.kill(launch.procs[0].pid, signal.SIGTERM)
    result = launch.wait(120)
    assert result.code == PREEMPTION_EXIT_CODE, launch.text()
    stopped = read_tracker(save)
    assert stopped == tl.last_logged_iteration(save / "metrics.jsonl") and stopped > 13
    assert ckpt.checkpoint_problem(save, stopped) is None
    assert f"stopping at iteration {stopped}" in result.out[0]
    assert len(_iters(save)) <= 2 and stopped in _iters(save)  # --keep-last 2

    result = tl.train(args, timeout=200)
    assert f"resuming from iteration {stopped}" in result.out[0]
    _assert_losses_match_reference(save, reference, range(1, tl.REF_ITERS + 1))
    assert read_tracker(save) == tl.REF_ITERS and _iters(save) == [30, 40]


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_kill9_one_rank_then_resume_loses_no_checkpointed_step(assets, reference, tmp_path):
    save = tmp_path / "run"
    args = tl.train_args(assets, save, tl.REF_ITERS, "--save-interval", "10")  # DP=2
    launch = tl.Launch(args, 2, tmp_path)
    tl.wait_for(lambda: (save / iteration_name(10) / ckpt.STATE_FILE).is_file()
                and tl.last_logged_iteration(save / "metrics.jsonl") >= 15, 240, "iteration 15", launch)
    launch.kill(rank=1)  # SIGKILL to rank 1's process group
    try:  # rank 0 is left in a collective: gloo may notice the lost peer, else kill it too
        launch.procs[0].wait(timeout=15)
    except subprocess.TimeoutExpired:
        launch.kill()
    launch.wait(60)
    last = read_tracker(save)
    assert last >= 10 and ckpt.checkpoint_problem(save, last) is None
    before = tl.losses(save / "metrics.jsonl")
    redone = [i for i in before if i > last]  # usually 11..15 (empty only if killed right after a save)

    result = tl.train(args, nproc=2, timeout=240)
    assert f"resuming from iteration {last}" in result.out[0]
    after = tl.losses(save / "metrics.jsonl")
    assert sorted(after) == list(range(1, tl.REF_ITERS + 1))
    # the steps recomputed after the checkpoint are bit-identical to the ones the killed run logged
    assert {i: after[i] for i in redone} == {i: before[i] for i in redone}
    # and the whole run is the single-process one up to DP=2 rounding
    _assert_losses_match_reference(save, reference, range(1, tl.REF_ITERS + 1), tol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_resume_at_a_different_data_parallel_size(assets, reference, tmp_path):
    # 1 -> 2: the single-process reference's iteration 30, continued on two data-parallel ranks
    up = _copy_checkpoint(reference, 30, tmp_path / "dp1to2")
    args = tl.train_args(assets, up, tl.REF_ITERS, "--save-interval", "5")
    result = tl.train(args, nproc=2, timeout=240)
    assert "resuming from iteration 30" in result.out[0]
    _assert_losses_match_reference(up, reference, range(31, tl.REF_ITERS + 1), tol=1e-5)
    assert _iters(up) == [30, 35, 40]
    # 2 -> 1: the DP=2 checkpoint of iteration 35, continued in one process
    down = _copy_checkpoint(up, 35, tmp_path / "dp2to1")
    result = tl.train(tl.train_args(assets, down, tl.REF_ITERS), timeout=200)
    assert "resuming from iteration 35" in result.out[0]
    _assert_losses_match_reference(down, reference, range(36, tl.REF_ITERS + 1), tol=1e-5)


# ---- checkpoint directory bookkeeping -------------------------------------------------------------

def _fake_checkpoint(save: Path, iteration: int) -> None:
    it_dir = save / iteration_name(iteration)
    it_dir.mkdir(parents=True)
    (it_dir / "metadata.json").write_text("{}")
    (it_dir / "__0_0.distcp").write_bytes(b"x" * 10)
    files = {"metadata.json": 2, "__0_0.distcp": 10}
    (it_dir / ckpt.STATE_FILE).write_text(json.dumps({"iteration": iteration, "consumed_samples": 0,
                                                       "files": files}))


def test_keep_last_never_removes_the_tracked_checkpoint(tmp_path):
    save = tmp_path / "run"
    for it in (10, 20, 30, 40):
        _fake_checkpoint(save, it)
    write_tracker(save, 40)
    ckpt.prune_checkpoints(save, 2)
    assert _iters(save) == [30, 40]
    # a run that fell back to 20 (30, 40 damaged) and saved 25: the tracker names 25
    for it in (10, 20):
        _fake_checkpoint(save, it)
    _fake_checkpoint(save, 25)
    write_tracker(save, 25)
    ckpt.prune_checkpoints(save, 1)
    assert 25 in _iters(save)
    assert _iters(save) == [25, 30, 40]  # leftovers newer than the tracker are neither counted nor removed


def _damaged_copy(reference: Path, dst: Path, how: str) -> tuple[Path, str]:
    """A copy of the reference run with its newest checkpoint damaged; returns (root, file named)."""
    shutil.copytree(reference, dst)
    newest = dst / iteration_name(40)
    target = max((p for p in newest.glob("*.distcp")), key=lambda p: p.stat().st_size)
    if how == "truncated":
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
    elif how == "missing":
        target.unlink()
    elif how == "no_state":
        target = newest / ckpt.STATE_FILE
        target.unlink()
    elif how == "tracker_ahead":
        write_tracker(dst, 50)
        target = dst / iteration_name(50)
    return dst, str(target.name)


@pytest.mark.parametrize("how", ["truncated", "missing", "no_state", "tracker_ahead"])
def test_auto_resume_falls_back_past_damaged_checkpoint(reference, tmp_path, how):
    root, named = _damaged_copy(reference, tmp_path / "run", how)
    messages = []
    found = ckpt.find_resume_iteration(root, log=messages.append)
    assert found == (40 if how == "tracker_ahead" else 30), messages
    assert messages and all(m.startswith("warning: ") for m in messages)
    assert any(named in m for m in messages), (named, messages)


@pytest.mark.timeout(300)
def test_damaged_checkpoint_end_to_end(assets, reference, tmp_path):
    # auto-resume falls back to iteration 30 and recomputes 31..40 identically
    root, named = _damaged_copy(reference, tmp_path / "run", "truncated")
    (root / "metrics.jsonl").unlink()
    result = tl.train(tl.train_args(assets, root, tl.REF_ITERS), timeout=200)
    assert "resuming from iteration 30" in result.out[0]
    assert any(named in line and "warning" in line for line in result.out[0].splitlines()), result.out[0]
    _assert_losses_match_reference(root, reference, range(31, tl.REF_ITERS + 1))

    # loading a damaged checkpoint directly, or a --save with nothing usable: one line naming the file
    direct, named_direct = _damaged_copy(reference, tmp_path / "direct", "missing")
    only = _copy_checkpoint(reference, 40, tmp_path / "only")
    only_file = next((only / iteration_name(40)).glob("*.distcp"))
    only_file.write_bytes(only_file.read_bytes()[:100])
    runs = {"load": tl.train_args(assets, tmp_path / "fresh", 3, load=direct),
            "save": tl.train_args(assets, only, 3)}
    results = run_distributed(tl.run_main_captured, 1, runs, timeout=200)[0]
    for name, expected in (("load", named_direct), ("save", only_file.name)):
        code, out, err = results[name]
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, code, err)
        assert expected in lines[0], (name, lines[0])
    assert not (tmp_path / "fresh").exists()


# ---- trainable-only deltas ------------------------------------------------------------------------

@pytest.mark.timeout(420)
def test_trainable_only_delta_resume_size_and_merge(assets, reference, tmp_path):
    save = tmp_path / "delta"
    args = tl.train_args(assets, save, tl.REF_ITERS, "--save-interval", "20", "--save-trainable-only")
    tl.train(args + ["--exit-interval", "20"], timeout=200, expect=PREEMPTION_EXIT_CODE)
    result = tl.train(args, timeout=200)  # resumes from the delta (base + trained blocks + optimizer)
    assert "resuming from iteration 20" in result.out[0]
    _assert_losses_match_reference(save, reference, range(1, tl.REF_ITERS + 1))

    delta_bytes = tl.dir_bytes(save / iteration_name(40))
    full_bytes = tl.dir_bytes(reference / iteration_name(40))
    delta_model = tl.dir_bytes(save / iteration_name(40) / delta.DELTA_DIR)
    print(f"\ncheckpoint sizes: full {full_bytes} B, trainable-only {delta_bytes} B "
          f"({delta_bytes / full_bytes:.0%}; delta weights {delta_model} B)")
    assert delta_bytes < 0.6 * full_bytes
    with pytest.raises(Exception, match="full checkpoint"):
        delta.delta_iteration_dir(reference)

    merged = tmp_path / "merged"
    proc = run_tool("merge_delta", "--base", assets.expanded, "--delta", save, "--out", merged,
                    "--format", "torch_dist", cwd=tmp_path, env=tl.child_env(), timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged" in proc.stdout
    diffs = run_distributed(tl.compare_checkpoints, 1, str(merged), str(reference), timeout=200)[0]
    assert diffs
    assert {n: d for n, d in diffs.items() if d != 0.0} == {}


def test_release_checkpoint_as_save_dir_is_not_a_training_checkpoint(assets, tmp_path):
    # Megatron-LM habit: --load X --save X with X the expanded ('release') checkpoint. The first run
    # must start from it (not refuse it as "no complete checkpoint"), later runs resume.
    same = tmp_path / "same"
    shutil.copytree(assets.expanded, same)
    assert read_tracker(same) == "release"
    assert not ckpt.holds_checkpoints(same) and ckpt.find_resume_iteration(same, log=lambda m: None) is None
    _fake_checkpoint(same, 5)
    write_tracker(same, 5)
    assert ckpt.holds_checkpoints(same) and ckpt.find_resume_iteration(same, log=lambda m: None) == 5


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_legacy_format_training_checkpoints_resume_exactly_and_export(assets, reference, tmp_path):
    """--save-format torch: Megatron-LM's iter_N/mp_rank_XX[_YYY]/{model_optim_rng.pt, distrib_optim.pt};
    written on two data-parallel ranks, resumed in one process, exported to HF."""
    save = tmp_path / "legacy"
    args = tl.train_args(assets, save, 20, "--save-interval", "10", "--save-format", "torch")
    tl.train(args, nproc=2, timeout=240)
    rank_dir = save / iteration_name(20) / "mp_rank_00"
    assert {p.name for p in rank_dir.iterdir()} == {"model_optim_rng.pt", "distrib_optim.pt"}
    assert not (save / iteration_name(20) / "metadata.json").exists()
    _assert_losses_match_reference(save, reference, range(1, 21), tol=1e-5)
    # continue in one process from the DP=2 legacy checkpoint: the reference's losses
    result = tl.train(tl.train_args(assets, save, tl.REF_ITERS, "--save-format", "torch"), timeout=240)
    assert "resuming from iteration 20" in result.out[0]
    _assert_losses_match_reference(save, reference, range(21, tl.REF_ITERS + 1), tol=1e-5)
    # the legacy training save is a checkpoint every tool reads (here: HF export)
    out = tmp_path / "hf"
    proc = run_tool("convert_megatron_to_hf", "--megatron-dir", save, "--out", out, env=tl.child_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
