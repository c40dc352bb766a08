"""Damaged files in every checkpoint format: recorded checksums and sizes, the reader naming the file
(one `error:` line, exit 2), the trainer falling back to the previous complete checkpoint with a
warning naming the file; a missing shard folder and a num_layers disagreement named; NaN weights
refused by name unless --allow-non-finite."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_llamapro.checkpoint import integrity
from megatron_llamapro.checkpoint.tracker import iteration_name
from megatron_llamapro.training import iteration_dirs
from tests import training_lib as tl
from tests.training_lib import assets, reference  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def cli_main(name: str, argv: list, capsys) -> tuple[int, list[str]]:
    """(exit code, non-empty stderr lines) of megatron_llamapro.cli.NAME.main(argv) in this process."""
    import importlib

    capsys.readouterr()
    try:
        code = importlib.import_module(f"megatron_llamapro.cli.{name}").main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line(code: int, lines: list[str], *named: str) -> None:
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for text in named:
        assert text in lines[0], (text, lines[0])


def run_tool(name: str, *argv, timeout: float = 240) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, argv)], cwd=REPO,
                          env=tl.child_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


# ---- the records themselves ---------------------------------------------------------------------

def test_checksums_catch_zeroed_and_truncated_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    record = integrity.record_checksums(tmp_path)
    assert set(record["files"]) == {"a.bin", "sub/b.bin"}
    assert integrity.folder_problem(tmp_path) is None
    zero(tmp_path / "sub" / "b.bin")
    assert integrity.folder_problem(tmp_path, content=False) is None  # same size: only the checksum sees it
    problem = integrity.folder_problem(tmp_path)
    assert problem.startswith(f"{tmp_path / 'sub' / 'b.bin'}: content damaged"), problem
    truncate(tmp_path / "a.bin")
    assert integrity.folder_problem(tmp_path, content=False) == f"{tmp_path / 'a.bin'}: truncated (500 of 1000 bytes)"


def test_crc32_throughput(tmp_path):
    import time

    path = tmp_path / "big.bin"
    path.write_bytes(torch.randint(0, 255, (64 * 1024**2,), dtype=torch.uint8).numpy().tobytes())
    start = time.perf_counter()
    integrity.file_crc32(path)
    rate = path.stat().st_size / (time.perf_counter() - start) / 1e9
    print(f"crc32: {rate:.2f} GB/s")
    assert rate > 0.1  # a few seconds per GB at most, even on a loaded 2-core machine


# ---- converted checkpoints (HF, legacy torch) ------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tiny_hf_dirs, tmp_path_factory) -> Path:
    """The tiny HF model as a legacy TP1 PP2 checkpoint."""
    from megatron_llamapro.cli import convert_hf_to_megatron

    out = tmp_path_factory.mktemp("integrity") / "tp1pp2"
    assert convert_hf_to_megatron.main(["--hf-dir", str(tiny_hf_dirs["mha"]), "--out", str(out),
                                        "--tp", "1", "--pp", "2"]) == 0
    return out


def _stage_file(root: Path, stage: int) -> Path:
    return root / "release" / f"mp_rank_00_{stage:03d}" / "model_optim_rng.pt"


def test_converted_legacy_records_checksums(converted):
    record = json.loads((converted / "release" / integrity.CHECKSUM_FILE).read_text())
    assert set(record["files"]) == {"mp_rank_00_000/model_optim_rng.pt", "mp_rank_00_001/model_optim_rng.pt"}
    assert integrity.folder_problem(converted / "release") is None


@pytest.mark.parametrize("damage", [zero, truncate])
def test_damaged_legacy_file_named(converted, tmp_path, capsys, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted, ckpt)
    damage(_stage_file(ckpt, 1))
    code, lines = cli_main("reshard", ["--in", ckpt, "--out", tmp_path / "out", "--tp", "1", "--pp", "1"], capsys)
    assert_one_line(code, lines, str(_stage_file(ckpt, 1)),
                    "content damaged" if damage is zero else "truncated")
    assert not (tmp_path / "out").exists()


def test_missing_shard_folder_named(converted, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted, ckpt)
    shutil.rmtree(ckpt / "release" / "mp_rank_00_001")
    code, lines = cli_main("reshard", ["--in", ckpt, "--out", tmp_path / "out"], capsys)
    assert_one_line(code, lines, str(_stage_file(ckpt, 1)), "missing shard")


def test_num_layers_disagreement_named(converted, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted, ckpt)
    manifest = json.loads((ckpt / "llamapro.json").read_text())
    manifest["arch"]["num_layers"] = 6
    (ckpt / "llamapro.json").write_text(json.dumps(manifest))
    code, lines = cli_main("convert_megatron_to_hf", ["--megatron-dir", ckpt, "--out", tmp_path / "hf"], capsys)
    assert_one_line(code, lines, "args.num_layers is 4", "num_layers 6", "llamapro.json")


@pytest.mark.parametrize("damage", [zero, truncate])
def test_damaged_safetensors_named(tiny_hf_dirs, tmp_path, capsys, damage):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dirs["mha"], hf)
    damage(hf / "model.safetensors")
    code, lines = cli_main("convert_hf_to_megatron", ["--hf-dir", hf, "--out", tmp_path / "out"], capsys)
    assert_one_line(code, lines, str(hf / "model.safetensors"))


def _hf_with_non_finite(src: Path, dst: Path) -> str:
    from megatron_llamapro.checkpoint.hf import SafetensorsFile, write_safetensors

    shutil.copytree(src, dst)
    file = SafetensorsFile(dst / "model.safetensors")
    tensors = {name: file.get(name).clone() for name in file.keys()}
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][0, 0] = float("nan")
    tensors[name][1, 1] = float("inf")
    write_safetensors(dst / "model.safetensors", tensors)
    return name


def test_non_finite_weights_refused_by_name_unless_allowed(tiny_hf_dirs, tmp_path, capsys):
    hf = tmp_path / "hf"
    _hf_with_non_finite(tiny_hf_dirs["mha"], hf)
    code, lines = cli_main("convert_hf_to_megatron", ["--hf-dir", hf, "--out", tmp_path / "out"], capsys)
    # the canonical (Megatron) name of down_proj in layer 1, and how many values are bad
    assert_one_line(code, lines, "decoder.layers.1.mlp.linear_fc2.weight", "2 non-finite", "--allow-non-finite")
    assert not (tmp_path / "out").exists()
    code, _ = cli_main("convert_hf_to_megatron", ["--hf-dir", hf, "--out", tmp_path / "out",
                                                  "--allow-non-finite"], capsys)
    assert code == 0
    # and every later step refuses it again unless allowed: export, reshard, expand
    code, lines = cli_main("convert_megatron_to_hf", ["--megatron-dir", tmp_path / "out", "--out", tmp_path / "back"],
                           capsys)
    assert_one_line(code, lines, "decoder.layers.1.mlp.linear_fc2.weight")
    code, lines = cli_main("reshard", ["--in", tmp_path / "out", "--out", tmp_path / "re", "--pp", "2"], capsys)
    assert_one_line(code, lines, "decoder.layers.1.mlp.linear_fc2.weight")
    code, lines = cli_main("expand_blocks", ["--in", tmp_path / "out", "--out", tmp_path / "exp",
                                             "--num-new-blocks", "2"], capsys)
    assert_one_line(code, lines, "decoder.layers.1.mlp.linear_fc2.weight")
    code, _ = cli_main("convert_megatron_to_hf", ["--megatron-dir", tmp_path / "out", "--out", tmp_path / "back",
                                                  "--allow-non-finite"], capsys)
    assert code == 0


# ---- torch_dist: converted (subprocesses: megatron-core never initializes in the pytest process) ----

@pytest.mark.timeout(400)
def test_damaged_torch_dist_named_and_non_finite_refused(tiny_hf_dirs, tmp_path):
    ckpt = tmp_path / "dist"
    nan_hf = tmp_path / "nan_hf"
    _hf_with_non_finite(tiny_hf_dirs["mha"], nan_hf)
    code, lines = run_tool("convert_hf_to_megatron", "--hf-dir", tiny_hf_dirs["mha"], "--out", ckpt,
                           "--format", "torch_dist")
    assert code == 0, lines
    assert integrity.folder_problem(ckpt / "release") is None
    assert any(n.endswith(".distcp") for n in json.loads((ckpt / "release" / integrity.CHECKSUM_FILE).read_text())["files"])
    zeroed, truncated = tmp_path / "zeroed", tmp_path / "truncated"
    for copy, damage in ((zeroed, zero), (truncated, truncate)):
        shutil.copytree(ckpt, copy)
        damage(next((copy / "release").glob("*.distcp")))
    code, lines = run_tool("convert_hf_to_megatron", "--hf-dir", nan_hf, "--out", tmp_path / "nan_dist",
                           "--format", "torch_dist")
    assert_one_line(code, lines, "decoder.layers.1.mlp.linear_fc2.weight")
    for copy, what in ((zeroed, "content damaged"), (truncated, "truncated")):
        code, lines = run_tool("convert_megatron_to_hf", "--megatron-dir", copy, "--out", tmp_path / "hf_out")
        assert_one_line(code, lines, str(next((copy / "release").glob("*.distcp"))), what)
    assert not (tmp_path / "hf_out").exists()


# ---- training saves -----------------------------------------------------------------------------

def _largest(it_dir: Path, pattern: str) -> Path:
    return max(it_dir.rglob(pattern), key=lambda p: p.stat().st_size)


def test_training_save_records_checksums_and_zeroed_file_falls_back(reference, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(reference, root)
    newest = root / iteration_name(40)
    assert (newest / integrity.CHECKSUM_FILE).is_file()
    target = _largest(newest, "*.distcp")
    zero(target)  # right size, wrong content: sizes alone cannot see it
    messages = []
    assert iteration_dirs.find_resume_iteration(root, log=messages.append) == 30
    assert any(str(target) in m and m.startswith("warning: ") and "content damaged" in m for m in messages), messages
    # export from the --save names the file (the tracker names the damaged iteration)
    code, lines = cli_main("convert_megatron_to_hf", ["--megatron-dir", root, "--out", tmp_path / "hf"], capsys)
    assert_one_line(code, lines, str(target), "content damaged")
    truncate(target)
    code, lines = cli_main("convert_megatron_to_hf", ["--megatron-dir", root, "--out", tmp_path / "hf"], capsys)
    assert_one_line(code, lines, str(target), "truncated")
    assert not (tmp_path / "hf").exists()


@pytest.mark.timeout(400)
def test_legacy_training_save_zeroed_resume_falls_back(assets, tmp_path):  # noqa: F811
    save = tmp_path / "legacy"
    tl.train(tl.train_args(assets, save, 2, "--save-interval", "1", "--save-format", "torch"), timeout=200)
    target = _largest(save / iteration_name(2), "model_optim_rng.pt")
    zero(target)
    result = tl.train(tl.train_args(assets, save, 3, "--save-format", "torch"), timeout=200)
    out = result.out[0]
    assert "resuming from iteration 1" in out, out
    assert any("warning" in line and str(target) in line for line in out.splitlines()), out
    assert iteration_dirs.find_resume_iteration(save, log=lambda m: None) == 3
