"""The foundation under everything else.

CPU compatibility decision, launcher detection (torchrun / SLURM / single process), the
multi-process harness (results by rank, fast failure, timeouts), the architecture model
(LLaMA-2 / LLaMA-3 / Mistral configs, vocab padding, refusals) and the base parity: the same
weights give the same loss at TP=1, TP=2 and PP=2 (1F1B, 4 micro-batches).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
import torch

from megatron_llamapro.arch import ArchError, LlamaArch
from megatron_llamapro.checkpoint.layout import Layout


# ---- CPU compatibility decision ----------------------------------------------------------------

def test_cpu_compat_decision_on_this_machine():
    from megatron_llamapro.runtime import cpu_compat

    usable = cpu_compat.cuda_usable()
    assert cpu_compat.should_apply() is (not usable)
    if not usable:
        assert cpu_compat.should_apply(force_cpu=True) is True


def test_cpu_compat_refuses_when_gpu_usable(monkeypatch):
    from megatron_llamapro.runtime import cpu_compat

    monkeypatch.setattr(cpu_compat, "cuda_usable", lambda: True)
    monkeypatch.setattr(cpu_compat, "_applied", False)
    assert cpu_compat.should_apply() is False
    with pytest.raises(RuntimeError, match="usable GPU"):
        cpu_compat.should_apply(force_cpu=True)
    zeros, to, current = torch.zeros, torch.Tensor.to, torch.cuda.current_device
    with pytest.raises(RuntimeError, match="CUDA device is usable"):
        cpu_compat.apply_cpu_compat()
    # nothing was patched by the refused call
    assert torch.zeros is zeros and torch.Tensor.to is to and torch.cuda.current_device is current
    assert cpu_compat.is_applied() is False


# ---- launcher detection --------------------------------------------------------------------------

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE",
               "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
               "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID")


@pytest.fixture
def clean_launch_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_detect_torchrun(clean_launch_env):
    from megatron_llamapro.runtime.distributed import LaunchEnv, detect_launch_env

    env = clean_launch_env
    for k, v in dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="8", MASTER_ADDR="node0", MASTER_PORT="29600").items():
        env.setenv(k, v)
    assert detect_launch_env() == LaunchEnv(3, 1, 8, "node0", 29600, "torchrun")
    # torchrun's variables win over SLURM's when a torchrun runs inside an allocation
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "1")
    assert detect_launch_env().source == "torchrun"


def test_detect_slurm(clean_launch_env):
    from megatron_llamapro.runtime.distributed import LaunchEnv, detect_launch_env

    env = clean_launch_env
    for k, v in dict(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="8", SLURM_JOB_NODELIST="localhost",
                     SLURM_JOB_ID="123456").items():
        env.setenv(k, v)
    assert detect_launch_env() == LaunchEnv(5, 1, 8, "localhost", 10000 + 123456 % 50000, "slurm")
    env.setenv("MASTER_PORT", "23456")
    env.setenv("MASTER_ADDR", "10.0.0.7")
    assert detect_launch_env() == LaunchEnv(5, 1, 8, "10.0.0.7", 23456, "slurm")


def test_detect_single_process(clean_launch_env):
    from megatron_llamapro.runtime.distributed import detect_launch_env

    env = detect_launch_env()
    assert (env.rank, env.local_rank, env.world_size, env.source) == (0, 0, 1, "single")
    assert env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536


# ---- multi-process harness -------------------------------------------------------------------------

def _rank_fails_fast():
    if int(os.environ["RANK"]) == 1:
        raise ValueError("boom from rank 1")
    time.sleep(120)


def _rank_hangs_in_collective():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if int(os.environ["RANK"]) == 0:
        dist.barrier()  # rank 1 never arrives
    else:
        time.sleep(3600)


def test_harness_failing_rank_raises_quickly(scratch):
    from megatron_llamapro.runtime.multiproc import RankFailure, run_distributed

    before = set(multiprocessing.active_children())
    start = time.monotonic()
    with pytest.raises(RankFailure) as exc:
        run_distributed(_rank_fails_fast, 2, timeout=100, scratch=scratch / "fail")
    elapsed = time.monotonic() - start
    text = str(exc.value)
    assert "rank 1 failed" in text and "ValueError: boom from rank 1" in text and "Traceback" in text
    assert elapsed < 60, f"waited {elapsed:.0f}s for a rank that had already failed"
    assert set(multiprocessing.active_children()) <= before  # the ranks were killed and reaped


def test_harness_timeout_names_pending_ranks(scratch):
    from megatron_llamapro.runtime.multiproc import RankFailure, run_distributed

    before = set(multiprocessing.active_children())
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"timeout after 15s; ranks still running: \[0, 1\]"):
        run_distributed(_rank_hangs_in_collective, 2, timeout=15, scratch=scratch / "hang")
    assert time.monotonic() - start < 45
    assert set(multiprocessing.active_children()) <= before  # the ranks were killed and reaped


# ---- architecture ------------------------------------------------------------------------------------

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-05,
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": None, "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1,
    "attention_bias": False, "use_cache": True, "transformers_version": "4.31.0.dev0",
}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-05,
    "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "head_dim": 128,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 32768, "rms_norm_eps": 1e-05,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu",
}


def test_arch_llama2():
    arch = LlamaArch.from_hf_config(LLAMA2_7B)
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size) == (32, 4096, 11008)
    assert arch.head_dim == 128 and not arch.gqa and arch.query_groups == 32
    assert arch.rope_theta == 10000.0 and arch.rope_scaling is None and arch.rope_scaling_factor is None
    assert arch.num_parameters()["total"] == 6_738_415_616  # LLaMA-2-7B's published count
    assert arch.extra_hf == {"pretraining_tp": 1}
    assert LlamaArch.from_hf_config(arch.to_hf_config("float16")) == arch
    assert arch.to_hf_config()["pretraining_tp"] == 1  # uninterpreted keys written back
    arch.check_parallel(8, 4, 2)  # 32 layers = 4 stages x 2 chunks x 4


def test_arch_llama3_gqa_and_rope_scaling():
    arch = LlamaArch.from_hf_config(LLAMA3_8B)
    assert arch.gqa and arch.num_kv_heads == 8 and arch.heads_per_group == 4
    assert arch.rope_theta == 500000.0 and arch.rope_scaling_factor == 8.0
    assert arch.eos_token_id == [128001, 128008, 128009]
    assert arch.num_parameters()["total"] == 8_030_261_248  # Llama-3-8B's published count
    arch.check_parallel(8)
    with pytest.raises(ArchError, match="--tp 16 does not divide num_key_value_heads 8"):
        arch.check_parallel(16)
    # transformers >= 5 writes the same settings as rope_parameters
    v5 = {k: v for k, v in LLAMA3_8B.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(LLAMA3_8B["rope_scaling"], rope_theta=500000.0)
    assert LlamaArch.from_hf_config(v5) == arch
    config = arch.transformer_config(tp=1)
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (8, 128, 14336)
    assert config.gated_linear_unit and config.normalization == "RMSNorm" and not config.add_bias_linear
    assert LlamaArch.from_hf_config(arch.to_hf_config()) == arch


def test_megatron_fields_feed_transformer_config_and_megatron_lm_args():
    """One table maps the architecture to TransformerConfig fields and Megatron-LM args fields."""
    from megatron_llamapro.arch import MEGATRON_FIELDS
    from megatron_llamapro.checkpoint.legacy import megatron_args
    from megatron_llamapro.checkpoint.manifest import Manifest

    arch = LlamaArch.from_hf_config(dict(LLAMA3_8B, num_hidden_layers=8, tie_word_embeddings=True))
    config_fields, args_fields = arch.megatron_fields("config"), arch.megatron_fields("args")
    assert set(config_fields) == {row.config for row in MEGATRON_FIELDS if row.config}
    assert set(args_fields) == {row.args for row in MEGATRON_FIELDS if row.args}
    config = arch.transformer_config(tp=2, pp=2)
    for field, value in config_fields.items():
        assert getattr(config, field) == value, field
    assert (config.layernorm_epsilon, config.num_query_groups, config.init_method_std) == (1e-5, 8, 0.02)
    args = megatron_args(Manifest(arch=arch, padded_vocab_size=128256, layout=Layout(2, 2, 2), dtype="bf16"))
    for field, value in args_fields.items():
        assert getattr(args, field) == value, field
    assert args.norm_epsilon == 1e-5 and args.swiglu and args.group_query_attention
    assert args.use_rope_scaling and args.rotary_base == 500000 and not args.untie_embeddings_and_output_weights
    assert args.num_layers_per_virtual_pipeline_stage == 2 and args.virtual_pipeline_model_parallel_size == 2
    assert args.bf16 and not args.fp16 and args.padded_vocab_size == 128256


def test_arch_mistral():
    arch = LlamaArch.from_hf_config(MISTRAL_7B)
    assert arch.model_type == "mistral" and arch.gqa and arch.rope_theta == 1e6
    config = arch.to_hf_config()
    assert config["architectures"] == ["MistralForCausalLM"] and "sliding_window" in config
    assert LlamaArch.from_hf_config(config) == arch


def test_padded_vocab_rule():
    arch = LlamaArch.from_hf_config(dict(LLAMA2_7B, vocab_size=300))
    # Megatron-LM: pad to a multiple of make_vocab_size_divisible_by * TP
    assert [arch.padded_vocab_size(tp) for tp in (1, 2, 4)] == [384, 512, 512]
    assert arch.padded_vocab_size(1, divisible_by=64) == 320
    assert arch.padded_vocab_size(3, divisible_by=1) == 300
    llama2 = LlamaArch.from_hf_config(LLAMA2_7B)
    assert llama2.padded_vocab_size(2) == 32000 and llama2.padded_vocab_size(8) == 32768
    llama3 = LlamaArch.from_hf_config(LLAMA3_8B)
    assert llama3.padded_vocab_size(1) == 128256 and llama3.padded_vocab_size(8) == 129024


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not a LLaMA-family decoder"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"num_key_value_heads": 5}, "must be a multiple of num_key_value_heads"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' is not supported"),
    ({"rope_scaling": dict(LLAMA3_8B["rope_scaling"], low_freq_factor=2.0)}, "low_freq_factor=2.0"),
    ({"hidden_size": None}, "missing required keys hidden_size"),
])
def test_arch_refusals(change, message):
    config = {k: v for k, v in {**LLAMA2_7B, **change}.items() if v is not None or k not in change}
    with pytest.raises(ArchError, match=message.replace("(", r"\(").replace("[", r"\[")) as exc:
        LlamaArch.from_hf_config(config)
    assert "\n" not in str(exc.value)


def test_arch_parallel_refusals(tmp_path):
    arch = LlamaArch.from_hf_config(dict(LLAMA2_7B, num_hidden_layers=6))
    with pytest.raises(ArchError, match="--tp 3 does not divide num_attention_heads 32"):
        arch.check_parallel(3)
    with pytest.raises(ArchError, match="--pp 4 does not divide num_hidden_layers 6"):
        arch.check_parallel(1, 4)
    with pytest.raises(ArchError, match=r"PP x VPP = 2 x 2 does not divide num_hidden_layers 6"):
        arch.check_parallel(1, 2, 2)
    with pytest.raises(ArchError, match="--vpp 2 needs --pp of at least 2"):
        arch.check_parallel(1, 1, 2)
    with pytest.raises(ArchError, match="does not divide intermediate_size 11000"):
        LlamaArch.from_hf_config(dict(LLAMA2_7B, intermediate_size=11000)).check_parallel(16)
    with pytest.raises(ArchError, match="config.json: missing"):
        LlamaArch.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArchError, match="not valid JSON"):
        LlamaArch.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert LlamaArch.from_hf_dir(tmp_path).num_kv_heads == 8


# ---- base parity: same loss at TP=1, TP=2, PP=2 ---------------------------------------------------

PARITY_PADDED_VOCAB = 512  # one padding for every layout so the softmax sees the same logits
PARITY_MICROBATCHES = 4


def _losses(hf_dir: str) -> list[float]:
    """Per-micro-batch losses of one 1F1B step (forward + backward) under the current parallel state."""
    from megatron_llamapro.checkpoint.load import load_source_into_model
    from megatron_llamapro.checkpoint.hf import HFSource
    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.pipeline import run_schedule
    from megatron_llamapro.expansion.apply import sample_tokens

    source = HFSource(hf_dir)
    chunks = build_model(source.arch, ModelOptions(padded_vocab_size=PARITY_PADDED_VOCAB))
    load_source_into_model(chunks, source, PARITY_PADDED_VOCAB)
    tokens = sample_tokens(source.arch.vocab_size, batch=PARITY_MICROBATCHES, seq=17, seed=7)
    batches = [{"tokens": tokens[i:i + 1, :-1], "labels": tokens[i:i + 1, 1:]}
               for i in range(PARITY_MICROBATCHES)]

    def loss_fn(batch, per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}

    results = run_schedule(chunks, batches, forward_only=False, loss_fn=loss_fn, seq_length=16,
                           micro_batch_size=1)
    return [float(r["loss"]) for r in results]


def _rank_losses(hf_dir: str) -> dict:
    """TP=2 then PP=2 in the same two processes (one process group, two model-parallel states)."""
    from megatron.core import parallel_state

    from megatron_llamapro.runtime.distributed import ParallelSizes, init_distributed

    out = {"rank": int(os.environ["RANK"])}
    for label, sizes in (("tp2", ParallelSizes(2, 1)), ("pp2", ParallelSizes(1, 2))):
        init_distributed(sizes)
        out[label + "_layout"] = Layout.from_parallel_state()
        out[label] = _losses(hf_dir)
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loss_parity_tp1_tp2_pp2(tiny_hf_dirs, scratch):
    from megatron_llamapro.model import use_transformer_engine
    from megatron_llamapro.runtime import cpu_compat
    from megatron_llamapro.runtime.distributed import single_process_megatron
    from megatron_llamapro.runtime.multiproc import run_distributed

    hf_dir = str(tiny_hf_dirs["gqa"])
    with single_process_megatron():
        assert Layout.from_parallel_state() == Layout()
        reference = _losses(hf_dir)
        assert cpu_compat.is_applied() is (not cpu_compat.cuda_usable())
        assert not use_transformer_engine() or cpu_compat.cuda_usable()
    assert len(reference) == PARITY_MICROBATCHES and all(3.0 < x < 9.0 for x in reference)
    ranks = run_distributed(_rank_losses, 2, hf_dir, timeout=240, scratch=scratch / "loss")
    assert [r["rank"] for r in ranks] == [0, 1]  # results come back by rank
    assert all((r["tp2_layout"], r["pp2_layout"]) == (Layout(2, 1), Layout(1, 2)) for r in ranks)
    assert ranks[0]["pp2"] == []  # only the last pipeline stage computes the loss
    for got in (ranks[0]["tp2"], ranks[1]["tp2"], ranks[1]["pp2"]):
        assert len(got) == PARITY_MICROBATCHES
        diff = max(abs(a - b) for a, b in zip(got, reference))
        assert diff < 1e-6, f"loss differs by {diff}: {got} vs {reference}"


def test_cpu_compat_keeps_torch_device_contexts_working():
    """transformers builds models under `with torch.device("meta")`; the bridge must not break it."""
    code = (
        "import torch\n"
        "from megatron_llamapro.runtime.cpu_compat import apply_cpu_compat\n"
        "apply_cpu_compat()\n"
        "with torch.device('meta'):\n"
        "    assert torch.empty(2).device.type == 'meta'\n"
        "assert torch.zeros(2, device='cuda').device.type == 'cpu'\n"
        "print('ok')\n"
    )
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_megatron_loss_equals_hf_loss_despite_vocab_padding(tiny_hf_dirs, scratch):
    """Padding rows of the vocabulary get -inf logits, so the loss is the real vocabulary's."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_llamapro.runtime.multiproc import run_distributed
    from megatron_llamapro.expansion.apply import sample_tokens
    from tests.parity_lib import megatron_mean_loss

    hf_dir = tiny_hf_dirs["gqa"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = sample_tokens(hf.config.vocab_size, seq=17)
    with torch.no_grad():
        reference = float(hf(tokens, labels=tokens).loss)
    ours = run_distributed(megatron_mean_loss, 2, str(hf_dir), 2, timeout=240, scratch=scratch / "loss")
    assert abs(ours[0] - reference) < 1e-5, (ours, reference)
