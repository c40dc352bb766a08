"""Faults an operator's environment throws at the tools: a full disk, a read-only target, SIGTERM /
SIGHUP / kill -9 in the middle of a write. Each gives one clear line and the right exit status,
leaves nothing partial in the target and keeps what was there before; a rerun after kill -9 cleans
up what the killed process left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import fixtures
from tests.lib import run_tool, start_tool


# ---- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(size, read_only=False) -> a fresh tmpfs mount point (unmounted afterwards)."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> Path:
    """About 1 MB of fp32 weights."""
    return fixtures.make_tiny_hf(tmp_path_factory.mktemp("faults") / "small")


@pytest.fixture(scope="module")
def larger_hf(tmp_path_factory) -> Path:
    """About 4 MB of fp32 weights: does not fit where `small_hf`'s conversion just fit."""
    return fixtures.make_tiny_hf(tmp_path_factory.mktemp("faults") / "larger", hidden=128, ffn=256)


@pytest.fixture(scope="module")
def slow_hf(tmp_path_factory) -> Path:
    """About 250 MB of fp32 weights: its conversion takes long enough to be signalled mid-write."""
    return fixtures.make_tiny_hf(tmp_path_factory.mktemp("faults") / "slow", num_layers=6, hidden=1024,
                                 ffn=2816, num_heads=8, num_kv_heads=8, vocab=8000)


# ---- full disk, read-only target ---------------------------------------------------------------

@pytest.mark.timeout(300)
def test_convert_on_a_full_disk_names_the_path_and_keeps_the_previous_output(small_hf, larger_hf,
                                                                             mount_tmpfs):
    disk = mount_tmpfs("3m")
    out = disk / "ckpt"
    first = run_tool("convert_hf_to_megatron", "--hf-dir", small_hf, "--out", out)
    assert first.returncode == 0, first.stderr
    before = tree(out)
    proc = run_tool("convert_hf_to_megatron", "--hf-dir", larger_hf, "--out", out, "--overwrite")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}: no space left on the device ("), lines
    assert "nothing was written, the previous contents are intact" in lines[0]
    assert tree(out) == before and temporaries(disk) == []


@pytest.mark.timeout(300)
def test_export_and_preprocess_on_a_full_disk(small_hf, tmp_path, mount_tmpfs):
    megatron = tmp_path / "megatron"
    assert run_tool("convert_hf_to_megatron", "--hf-dir", small_hf, "--out", megatron).returncode == 0
    disk = mount_tmpfs("256k")
    proc = run_tool("convert_megatron_to_hf", "--megatron-dir", megatron, "--out", disk / "hf")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --out {disk / 'hf'}: no space left on the device ("), lines
    assert list(disk.iterdir()) == []

    from megatron_llamapro.data import synthetic

    texts = synthetic.general_corpus(3000)
    sp = synthetic.train_sentencepiece(texts, 400, tmp_path / "sp")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    proc = run_tool("preprocess_data", "--input", jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                    sp, "--output-prefix", disk / "general", "--append-eod")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --output-prefix {disk / 'general_text_document.bin'}: no space left "
                               "on the device ("), lines
    assert list(disk.iterdir()) == []


@pytest.mark.timeout(300)
def test_read_only_target(small_hf, mount_tmpfs):
    disk = mount_tmpfs("1m", read_only=True)
    proc = run_tool("convert_hf_to_megatron", "--hf-dir", small_hf, "--out", disk / "ckpt")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f"error: --out {disk / 'ckpt'}: read-only file system; "
                                        "choose a writable directory"]


# ---- signals ----------------------------------------------------------------------------------

def _start_and_wait_for_temporary(args: list, parent: Path) -> subprocess.Popen:
    proc = start_tool("convert_hf_to_megatron", *args)
    deadline = time.monotonic() + 120
    while not temporaries(parent):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            raise AssertionError(f"the conversion ended (or never started writing): {proc.returncode}\n{err}")
        time.sleep(0.01)
    return proc


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_write_removes_the_temporary_and_says_so(slow_hf, tmp_path, sig):
    out = tmp_path / "ckpt"
    proc = _start_and_wait_for_temporary(["--hf-dir", slow_hf, "--out", out, "--tp", "2", "--pp", "2"], tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert error_lines(err)[-1] == f"error: interrupted by {signal.Signals(sig).name}; no output written", err
    assert "Traceback" not in err
    assert not out.exists() and temporaries(tmp_path) == []


@pytest.mark.timeout(600)
def test_kill_9_leftovers_are_removed_by_the_next_run(slow_hf, tmp_path):
    out = tmp_path / "ckpt"
    proc = _start_and_wait_for_temporary(["--hf-dir", slow_hf, "--out", out, "--tp", "2"], tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    left = temporaries(tmp_path)
    assert left, "kill -9 should have left the temporary folder behind"
    rerun = run_tool("convert_hf_to_megatron", "--hf-dir", slow_hf, "--out", out, "--tp", "2")
    assert rerun.returncode == 0, rerun.stderr
    notes = [line for line in rerun.stderr.splitlines() if line.startswith("note: removed ")]
    assert notes == [f"note: removed {tmp_path / left[0]} (left by process {proc.pid}, which is no longer "
                     "running)"], rerun.stderr
    assert temporaries(tmp_path) == [] and (out / "latest_checkpointed_iteration.txt").is_file()


def test_a_live_process_temporary_is_left_alone(tmp_path):
    """Two runs into the same --out at once: the second must not delete the first one's work."""
    from megatron_llamapro.fsutil import remove_stale_temporaries, temp_name

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / (temp_name(tmp_path / "out").replace(f"-{os.getpid()}-", f"-{sleeper.pid}-") + "x")
        live.mkdir()
        assert remove_stale_temporaries(tmp_path / "out", log=lambda m: None) == []
        assert live.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(tmp_path / "out", log=lambda m: None) == [live]
