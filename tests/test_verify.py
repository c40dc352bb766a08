"""--verify is scale-aware: healthy conversions pass at every shape, real layout bugs fail."""

from __future__ import annotations

import pytest

from tests.lib import run_tool


@pytest.mark.timeout(600)
def test_layout_bugs_fail_verify_and_a_healthy_conversion_passes():
    proc = run_tool("verify_sensitivity", "--shape", "small", timeout=590)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = {line.split(":", 1)[0].strip(): line for line in proc.stdout.splitlines() if "verify:" in line}
    assert set(lines) == {"none", "q<->k head", "q head 0<->1", "gate<->up"}, proc.stdout
    assert lines["none"].endswith(": OK")
    assert all(lines[bug].endswith(": FAILED") for bug in ("q<->k head", "q head 0<->1", "gate<->up"))


def test_verify_result_is_relative_to_the_logit_scale():
    from megatron_llamapro.checkpoint.verify import VerifyResult

    large = VerifyResult(2e-4, 40.0, 1e-4, (2, 32), 32000, 1.0)   # a 7B-like model, healthy
    tiny = VerifyResult(2e-4, 0.6, 1e-4, (2, 32), 300, 1.0)       # the same absolute gap on a tiny one
    assert large.ok and not tiny.ok
    assert "5.00e-06 of max |logit| 40" in large.describe() and large.describe().endswith(": OK")
    nan = VerifyResult(float("inf"), 1.0, 1e-4, (2, 32), 300, 0.0)
    assert not nan.ok and nan.describe().endswith(": FAILED")
