"""tools/gpu_acceptance.py --small on CPU (a smoke test of the GPU acceptance run) and the GPU
options' plumbing that a CPU can check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_gpu_acceptance_small_on_cpu_runs_the_cpu_checks_and_skips_te_checks(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_acceptance.py"), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_report.json").read_text())
    markdown = (out / "gpu_report.md").read_text()
    assert report["result"] == "passed" and report["environment"]["device"] == "cpu"
    checks = report["checks"]
    by_status: dict[str, list] = {}
    for c in checks:
        by_status.setdefault(c["status"], []).append(c)
    assert set(by_status) == {"passed", "skipped: no GPU"}, by_status.keys()
    # CPU parts of check 1 ran for real, with their numbers
    passed = {c["name"]: c["numbers"] for c in by_status["passed"] if c["check"] == "1"}
    assert sorted(c["check"] for c in by_status["passed"]) == ["1", "1", "1", "4"] and len(passed) == 3
    convert = next(v for k, v in passed.items() if k.startswith("convert"))
    assert 0 <= convert["relative_logit_diff"] < 1e-4 and convert["top1_agreement"] == 1.0
    expand = next(v for k, v in passed.items() if k.startswith("expansion"))
    assert expand["logits_bit_identical"] is True and expand["max_abs_diff"] == 0.0
    export = next(v for k, v in passed.items() if k.startswith("export"))
    assert export["relative_logit_diff"] < 1e-4
    # check 4's reference path (packed SFT sequences through the local spec's mask) runs on a CPU
    packed = next(c["numbers"] for c in by_status["passed"] if c["check"] == "4")
    assert packed["max_relative_diff"] <= 1e-5 and packed["te_attention"] is False
    assert max(packed["samples_per_sequence"]) > 1
    # every TE check is reported as skipped, never passed; checks 2 and 3 are TE-only
    skipped = by_status["skipped: no GPU"]
    assert {c["check"] for c in skipped} == {"1", "2", "3", "4"}
    assert all(not c["numbers"] for c in skipped)
    assert sum(c["check"] == "2" for c in skipped) == 3
    assert any("TE spec strict load" in c["name"] for c in skipped)
    for c in checks:
        assert f"| {c['check']} | {c['name']} | {c['status']} |" in markdown


def test_gpu_acceptance_report_counts_an_exception_as_a_failure(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gpu_acceptance
    finally:
        sys.path.remove(str(REPO / "tools"))

    report = gpu_acceptance.Report(tmp_path, budget_s=100)

    def broken():
        raise RuntimeError("kernel exploded")

    report.run("2", "broken", broken)
    report.run("3", "late", lambda: (True, {}), need_s=1e9)
    report.run("3", "fine", lambda: (True, {"tokens_per_s": 1234.5}))
    statuses = [c["status"] for c in report.checks]
    assert statuses == ["failed", "skipped: budget", "passed"]
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    assert data["result"] == "failed" and "kernel exploded" in data["checks"][0]["detail"]
    assert "kernel exploded" in (tmp_path / "gpu_report.md").read_text()


def test_optimizer_settings_carry_the_memory_options_and_reject_bad_combinations():
    from megatron_llamapro.errors import UserError
    from megatron_llamapro.training.config import ConfigError, TrainConfig
    from megatron_llamapro.training.optimizer import OptimizerSettings

    cfg = TrainConfig(data_path=["x"], load="ckpt", bf16_grad_buffer=True, use_precision_aware_optimizer=True,
                      adam_states_dtype="bf16")
    cfg.validate(1)
    settings = OptimizerSettings.from_train_config(cfg)
    assert settings.grad_reduce_in_fp32 is False
    import torch

    assert settings.adam_state_options() == {"use_precision_aware_optimizer": True,
                                             "exp_avg_dtype": torch.bfloat16, "exp_avg_sq_dtype": torch.bfloat16}
    assert OptimizerSettings(train_iters=1, samples_per_step=1).adam_state_options() == {}
    with pytest.raises(UserError, match="needs --use-precision-aware-optimizer"):
        OptimizerSettings(train_iters=1, samples_per_step=1, adam_states_dtype="bf16").adam_state_options()
    with pytest.raises(UserError, match="distributed optimizer"):
        OptimizerSettings(train_iters=1, samples_per_step=1, precision_aware_optimizer=True,
                          use_distributed_optimizer=False).adam_state_options()
    for bad, message in ((dict(adam_states_dtype="bf16"), "needs --use-precision-aware-optimizer"),
                         (dict(fp8_frozen_storage=True), "needs --fp8"),
                         (dict(attention_backend="magic"), "--attention-backend magic"),
                         (dict(use_precision_aware_optimizer=True, use_distributed_optimizer=False),
                          "distributed optimizer")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(data_path=["x"], load="ckpt", **bad).validate(1)


def test_fp8_frozen_storage_needs_the_te_spec_and_fp8():
    from types import SimpleNamespace

    from megatron_llamapro.errors import UserError
    from megatron_llamapro.model import fp8_storage_spec

    with pytest.raises(UserError, match="needs Transformer Engine"):
        fp8_storage_spec(None, frozenset({0}), use_te=False, config=SimpleNamespace(fp8="hybrid", fp8_param=False))
    with pytest.raises(UserError, match="needs --fp8"):
        fp8_storage_spec(None, frozenset({0}), use_te=True, config=SimpleNamespace(fp8=None, fp8_param=False))
