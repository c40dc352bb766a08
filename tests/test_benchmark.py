"""tools/benchmark_train.py on CPU: the smoke shape runs through the pretraining code path."""

from __future__ import annotations

import json
import pytest

from tests.lib import run_tool


@pytest.mark.timeout(300)
def test_benchmark_train_small_cpu_reports_throughput_and_hf_ratio(tmp_path):
    proc = run_tool("benchmark_train", "--small", "--precision", "fp32", "--warmup-steps", "1", "--steps", "2",
                    "--compare-hf", timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["trainable_layers"] == [2, 5]  # 4 + 2 interleaved: the copies sit after layers 1 and 3
    assert result["tokens_per_s_per_gpu"] > 0 and result["step_time_s"] > 0
    assert result["tflops_per_gpu"] > 0
    assert result["hf_tokens_per_s"] > 0 and result["speedup_vs_hf_fwd_bwd"] > 0
    assert "tokens/s/GPU" in proc.stdout


@pytest.mark.timeout(200)
def test_benchmark_runs_the_trainers_step_with_full_recompute(tmp_path):
    # The trainer's model options (full recompute needs a recompute method) and step, not a copy.
    proc = run_tool("benchmark_train", "--small", "--precision", "fp32", "--recompute-granularity", "full",
                    "--steps", "2", timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["trainable_layers"] == [2, 5] and result["step_time_s"] > 0


def test_flops_model_counts_frozen_training_less_than_full():
    from megatron_llamapro.arch import LlamaArch
    from megatron_llamapro.training.metrics import FlopsModel

    arch = LlamaArch(num_layers=40, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                     num_kv_heads=32, vocab_size=32000)
    new = (4, 9, 14, 19, 24, 29, 34, 39)
    frozen = FlopsModel(arch, 4096, 32000, new).per_token()
    full = FlopsModel(arch, 4096, 32000, new, all_trainable=True).per_token()
    n_layer = 4096 * 128 * 96 + 32 * 128 * 4096 + 3 * 4096 * 11008
    assert frozen["forward"] == full["forward"]
    assert frozen["weight_grad"] == 2 * n_layer * 8
    assert full["weight_grad"] == 2 * n_layer * 40 + 2 * 4096 * 32000
    # activation gradients only from layer 4 upwards: 36 of 40 layers
    assert frozen["activation_grad"] == 36 * (2 * n_layer + 8 * 4096 * 32 * 128) + 2 * 4096 * 32000
    assert frozen["total"] < full["total"]
