"""Frozen-block training on megatron-core (CPU, gloo, tiny expanded model).

What is checked: frozen parameters come out bit-identical and the new blocks change; optimizer
state and gradient buffers exist only for trainable parameters; backward never reaches the layers
below the lowest new block; the loss falls on the domain corpus; TP=2, PP=2, PP=2 x VPP=2 and DP=2
reproduce the single-process losses; bad configurations fail before any work with one line on
stderr and exit code 2; YAML configs mirror the flags and flags win.
"""

from __future__ import annotations


import pytest

from megatron_llamapro.runtime.multiproc import run_distributed
from tests import training_lib as tl
from tests.lib import run_tool
from tests.training_lib import assets, reference  # noqa: F401 - session fixtures


@pytest.mark.timeout(400)  # the session fixtures (build + reference run) may start here
def test_loss_falls_on_domain_corpus(reference):
    losses = tl.losses(reference / "metrics.jsonl")
    assert sorted(losses) == list(range(1, tl.REF_ITERS + 1))
    first = sum(losses[i] for i in (1, 2, 3)) / 3
    last = sum(losses[i] for i in range(tl.REF_ITERS - 2, tl.REF_ITERS + 1)) / 3
    assert last < first - 0.15, (first, last)


@pytest.mark.timeout(300)
def test_frozen_parameters_bit_identical_new_blocks_change(assets, reference):
    # The trainer's --save root (llamapro.json at the root, iter_N/ with model + optimizer) opens
    # as a checkpoint like any other (DistSource reads only the model keys).
    diffs = run_distributed(tl.compare_checkpoints, 1, str(assets.expanded), str(reference), timeout=240)[0]
    trained_prefixes = tuple(f"decoder.layers.{i}." for i in tl.NEW_LAYERS)
    changed_frozen = {n: d for n, d in diffs.items() if not n.startswith(trained_prefixes) and d != 0.0}
    assert not changed_frozen, changed_frozen
    new_block_tensors = {n: d for n, d in diffs.items() if n.startswith(trained_prefixes)}
    assert len(new_block_tensors) == 2 * 6
    unchanged = [n for n, d in new_block_tensors.items() if d == 0.0]
    assert not unchanged, unchanged


@pytest.mark.timeout(300)
def test_optimizer_state_and_backward_only_for_trainable(assets, tmp_path):
    probe = run_distributed(tl.trainer_probe, 1,
                            tl.train_args(assets, None, 5, "--metrics-file", str(tmp_path / "m.jsonl")),
                            timeout=240)[0]
    assert probe["plan"] == tl.NEW_LAYERS
    trainable = probe["trainable_numel"]
    assert 0 < trainable < probe["frozen_numel"]
    # Adam moments and DDP gradient buffers hold exactly the trainable elements (DP=1).
    assert probe["state_numel"] == {"exp_avg": trainable, "exp_avg_sq": trainable}, probe
    assert probe["state_params"] == 12  # 6 tensors per new block (local spec)
    assert probe["grad_buffer_numel"] == trainable
    assert probe["ok"] and probe["frozen_changed"] == []
    # Backward stops at the lowest new block: layers below it produce outputs that need no
    # gradient and the gradient hooks fire only at or above it.
    lowest = min(tl.NEW_LAYERS)
    assert probe["seen_forward"] == list(range(tl.NUM_LAYERS))
    assert {i for i, req in probe["output_requires_grad"].items() if req} == set(range(lowest, tl.NUM_LAYERS))
    assert probe["backward_reached"] == list(range(lowest, tl.NUM_LAYERS))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"], ["--pp", "2", "--vpp", "2"], []],
                         ids=["tp2", "pp2", "pp2_vpp2", "dp2"])
def test_parallel_layouts_match_single_process(assets, reference, tmp_path, layout):
    metrics = tmp_path / "metrics.jsonl"
    args = tl.train_args(assets, None, tl.REF_ITERS, "--exit-interval", "3", "--metrics-file", str(metrics), *layout)
    tl.train(args, nproc=2, timeout=200, expect=75)  # --exit-interval stops with the preemption code
    got = tl.losses(metrics)
    want = tl.losses(reference / "metrics.jsonl")
    assert sorted(got) == [1, 2, 3]
    for it in got:
        assert abs(got[it] - want[it]) <= 1e-5, (it, got[it], want[it])


def _bad_runs(assets, tmp_path) -> dict[str, tuple[list[str], str]]:
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("global_batch_size: 5\nmicro-batch-size: 2\n")
    base = tl.train_args(assets, tmp_path / "never", 3)
    return {
        "tp_heads": (base + ["--tp", "3"], "does not divide num_attention_heads"),
        "global_batch": (base + ["--global-batch-size", "6", "--micro-batch-size", "4"],
                         "--global-batch-size 6 is not divisible"),
        "no_manifest": (tl.train_args(assets, tmp_path / "never", 3, load=assets.base), "--trainable-layers"),
        "fp8": (base + ["--fp8", "hybrid"], "--fp8"),
        "data_path": (base + ["--data-path", str(tmp_path / "missing_prefix")], "missing_prefix"),
        "valid_data": (base + ["--valid-data", f"general={tmp_path / 'nope'}"], "nope"),
        "load_missing": (tl.train_args(assets, tmp_path / "never", 3, load=tmp_path / "no_ckpt"), "no_ckpt"),
        "stage_without_trainable": (base + ["--pp", "2", "--trainable-layers", "7"], "stage 0"),
        "save_format_torch_delta": (base + ["--save-format", "torch", "--save-trainable-only"],
                                    "--save-trainable-only"),
        "yaml": (base + ["--config", str(yaml_file), "--global-batch-size", "5"], "--global-batch-size 5"),
    }


def _check_one_line(name, code, out, err, expected):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, code, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    assert expected in lines[0], (name, lines[0])
    assert "started" not in out, (name, out)  # failed before torch.distributed started


@pytest.mark.timeout(300)
def test_bad_configuration_fails_fast_with_one_line(assets, tmp_path):
    runs = _bad_runs(assets, tmp_path)
    # every case through main() in one spawned process (a process start costs ~5 s) ...
    results = run_distributed(tl.run_main_captured, 1, {n: a for n, (a, _) in runs.items()}, timeout=200)[0]
    for name, (code, out, err) in results.items():
        _check_one_line(name, code, out, err, runs[name][1])
    # ... and one through a real command line (tools/pretrain_expand.py, the alias of
    # `python -m megatron_llamapro.pretrain`): nothing else reaches stderr, no import-time warnings
    args, expected = runs["tp_heads"]
    proc = run_tool("pretrain_expand", *args, timeout=200)
    _check_one_line("tp_heads (CLI)", proc.returncode, proc.stdout, proc.stderr, expected)
    assert not (tmp_path / "never").exists()


@pytest.mark.timeout(300)
def test_check_prints_the_resolved_plan_without_starting_distributed(assets, reference, tmp_path):
    # What a Slurm script runs at submit time: the world size comes from the launcher's variables,
    # and no peer ever joins, so starting torch.distributed would hang until the timeout.
    from megatron_llamapro.runtime.multiproc import free_port

    env = tl.child_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})

    def check(args):
        return run_tool("megatron_llamapro.pretrain", *args, "--check", env=env, timeout=120)

    fresh = check(tl.train_args(assets, tmp_path / "run", 3))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.splitlines() == [
        "check: ok: world size 2 = TP 1 x PP 1 x DP 2; 1 micro-batch(es) of 2 per step per DP rank; "
        f"global batch 4; starts from --load {assets.expanded} (torch); trains layers {tl.NEW_LAYERS}"], fresh.stdout
    assert not (tmp_path / "run").exists()

    resumed = check(tl.train_args(assets, reference, tl.REF_ITERS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.splitlines()[-1].endswith(
        f"resumes iteration {tl.REF_ITERS} of --save {reference}; trains layers {tl.NEW_LAYERS}"), resumed.stdout

    # a global batch of 4 cannot be split into micro-batches of 4 over the 2 data-parallel ranks
    bad = check(tl.train_args(assets, tmp_path / "run", 3, "--micro-batch-size", "4"))
    _check_one_line("check", bad.returncode, bad.stdout, bad.stderr,
                    "--global-batch-size 4 is not divisible by --micro-batch-size x data-parallel size = 4 x 2")
    assert bad.stdout == ""


def test_yaml_config_mirrors_flags_and_flags_win(tmp_path):
    from megatron_llamapro.training.config import ConfigError, load_config

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("micro_batch_size: 4\nglobal-batch-size: 64\ntp: 2\nlr: 0.0003\n"
                        "data_path: 0.7 a 0.3 b\nvalid_data: [general=g, domain=d]\n"
                        "precision: fp32\nsave_trainable_only: true\n")
    cfg = load_config(["--config", str(cfg_file), "--lr", "1e-4", "--pp", "2"])
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.tp, cfg.pp) == (4, 64, 2, 2)
    assert cfg.lr == 1e-4  # the flag wins over the YAML value
    assert cfg.data_path == ["0.7", "a", "0.3", "b"] and cfg.valid_data == ["general=g", "domain=d"]
    assert cfg.precision == "fp32" and cfg.save_trainable_only
    assert load_config(["--config", str(cfg_file), "--bf16"]).precision == "bf16"
    assert load_config(["--config", str(cfg_file), "--micro-batch-size", "8"]).micro_batch_size == 8
    cfg_file.write_text("micro_batch_sise: 4\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(["--config", str(cfg_file)])
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", str(tmp_path / "absent.yaml")])
