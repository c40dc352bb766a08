"""Issue 14 part 3: a Megatron-LM launch script's flags run here (mapped, checked or refused by name)."""

from __future__ import annotations

import json

import pytest

from megatron_llamapro.runtime.multiproc import run_distributed
from megatron_llamapro.training.config import ConfigError, load_config
from tests import training_lib as tl
from tests.training_lib import assets  # noqa: F401 (fixture)

BASE = ["--data-path", "prefix", "--load", "ckpt"]


def _cfg(*flags: str):
    return load_config(BASE + list(flags))


# ---- each mapping through load_config -------------------------------------------------------

def test_lr_decay_iters_makes_the_schedule_independent_of_train_iters():
    short, long = (_cfg("--lr-decay-iters", "100", "--lr-warmup-fraction", "0.1", "--train-iters", str(n))
                   for n in (10, 1000))
    assert short.decay_iters() == long.decay_iters() == 100
    assert short.warmup_iters() == long.warmup_iters() == 10
    assert _cfg("--train-iters", "50").decay_iters() == 50  # default unchanged: --train-iters
    from megatron_llamapro.training.optimizer import OptimizerSettings

    assert OptimizerSettings.from_train_config(short).decay_iters == 100
    with pytest.raises(ConfigError, match="--lr-warmup-iters 100 must be below --lr-decay-iters 100"):
        _cfg("--lr-decay-iters", "100", "--lr-warmup-iters", "100").validate(1)


def test_lr_warmup_iters_tokenizer_and_checkpoint_flags_map_to_ours():
    cfg = _cfg("--lr-warmup-iters", "7", "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "tok.model",
               "--ckpt-format", "torch", "--no-load-optim", "--finetune", "--use-checkpoint-args",
               "--exit-on-missing-checkpoint", "--no-load-rng", "--data-cache-path", "cache")
    assert (cfg.warmup_iters(), cfg.tokenizer_type, cfg.tokenizer_model) == (7, "Llama2Tokenizer", "tok.model")
    assert (cfg.save_format, cfg.no_load_optim, cfg.finetune, cfg.data_cache_dir) == ("torch", True, True, "cache")
    cfg.validate(1)
    with pytest.raises(ConfigError, match="--save-format/--ckpt-format torch_dcp: must be torch_dist or torch"):
        _cfg("--ckpt-format", "torch_dcp").validate(1)
    with pytest.raises(ConfigError, match="--tokenizer-type TikTokenizer: not supported by megatron-llamapro"):
        _cfg("--tokenizer-type", "TikTokenizer").validate(1)


def test_precision_fp8_recompute_and_transformer_impl_flags():
    assert _cfg("--bf16").precision == "bf16" and _cfg("--fp16").precision == "fp16"
    assert _cfg("--fp8-format", "hybrid").fp8 == "hybrid" and _cfg("--fp8-hybrid").fp8 == "hybrid"
    assert _cfg("--recompute-activations").recompute_granularity == "selective"
    assert _cfg("--recompute-granularity", "full", "--recompute-method", "uniform",
                "--recompute-num-layers", "1").recompute_granularity == "full"
    assert _cfg("--transformer-impl", "local").use_te() is False
    assert _cfg("--transformer-impl", "transformer_engine").use_te() is True
    assert _cfg().use_te() is None
    with pytest.raises(ConfigError, match="--transformer-impl inference: must be transformer_engine or local"):
        _cfg("--transformer-impl", "inference").validate(1)

    from megatron_llamapro.model import ModelOptions
    from megatron_llamapro.training.plan import megatron_launch_options

    opts = megatron_launch_options(_cfg("--transformer-impl", "local", "--no-masked-softmax-fusion"),
                                   ModelOptions(config_overrides=(("fp8", "hybrid"),)))
    assert opts.use_te is False
    assert opts.config_overrides == (("fp8", "hybrid"), ("masked_softmax_fusion", False))
    assert megatron_launch_options(_cfg(), ModelOptions()) == ModelOptions()


def test_overlap_flags_reach_the_ddp_config():
    cfg = _cfg("--overlap-grad-reduce", "--overlap-param-gather", "--use-distributed-optimizer")
    from megatron_llamapro.training.optimizer import OptimizerSettings

    settings = OptimizerSettings.from_train_config(cfg)
    assert (settings.overlap_grad_reduce, settings.overlap_param_gather) == (True, True)
    with pytest.raises(ConfigError, match="--overlap-param-gather needs the distributed optimizer"):
        _cfg("--overlap-param-gather", "--no-distributed-optimizer").validate(1)


def test_already_so_flags_accept_only_the_value_used_here():
    cfg = _cfg("--optimizer", "adam", "--attention-dropout", "0.0", "--hidden-dropout", "0", "--rotary-percent",
               "1.0", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
               "--disable-bias-linear", "--no-position-embedding", "--use-rotary-position-embeddings",
               "--attention-softmax-in-fp32", "--use-mcore-models")
    assert cfg.model_shape == {}
    for flags, line in [
        (["--optimizer", "sgd"], "--optimizer sgd: not supported by megatron-llamapro (only adam: the optimizer is Adam(W))"),
        (["--hidden-dropout", "0.1"], "--hidden-dropout 0.1: not supported by megatron-llamapro (only 0.0: training runs without dropout)"),
        (["--normalization", "LayerNorm"], "--normalization LayerNorm: not supported by megatron-llamapro (only RMSNorm: LLaMA models use RMSNorm)"),
        (["--use-flash-attn"], "--use-flash-attn: not supported by megatron-llamapro (flash-attn is not installed; "
                               "Transformer Engine's fused attention is used on GPUs)"),
        (["--train-samples", "1000"], "--train-samples: not supported by megatron-llamapro (the schedule counts iterations: use --train-iters)"),
    ]:
        with pytest.raises(ConfigError) as info:
            _cfg(*flags)
        assert str(info.value) == line


def test_shape_flags_collect_from_flags_and_yaml(tmp_path):
    cfg = _cfg("--num-layers", "8", "--hidden-size", "64", "--group-query-attention", "--num-query-groups", "4",
               "--untie-embeddings-and-output-weights", "--rotary-base", "10000", "--norm-epsilon", "1e-5")
    assert cfg.model_shape == {"num_layers": 8, "hidden_size": 64, "group_query_attention": True,
                               "num_query_groups": 4, "untie_embeddings_and_output_weights": True,
                               "rotary_base": 10000.0, "norm_epsilon": 1e-5}
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("num_layers: 6\nffn-hidden-size: 128\nlr: 0.001\n")
    cfg = _cfg("--config", str(yaml_file), "--num-layers", "8")
    assert cfg.model_shape == {"num_layers": 8, "ffn_hidden_size": 128} and cfg.lr == 0.001


def test_shape_flags_are_checked_against_the_checkpoint():
    from megatron_llamapro.arch import LlamaArch
    from megatron_llamapro.checkpoint.manifest import Manifest
    from megatron_llamapro.training.plan import check_model_shape

    arch = LlamaArch(num_layers=8, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_kv_heads=2,
                     vocab_size=500, max_position_embeddings=256)
    manifest = Manifest(arch=arch, padded_vocab_size=512)
    ok = ["--num-layers", "8", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
          "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
          "--max-position-embeddings", "256", "--seq-length", "256", "--untie-embeddings-and-output-weights",
          "--rotary-base", "10000", "--norm-epsilon", "1e-5", "--make-vocab-size-divisible-by", "128",
          "--vocab-size", "500"]
    check_model_shape(_cfg(*ok), manifest)
    for flags, line in [
        (["--num-layers", "6"], "--num-layers 6: disagrees with the checkpoint (num_layers = 8); "
                                "the model comes from the checkpoint: drop the flag or fix its value"),
        (["--group-query-attention", "--num-query-groups", "4"], "--num-query-groups 4: disagrees"),
        (["--group-query-attention"], "--group-query-attention: without --num-query-groups Megatron-LM uses "
                                      "1 query group; the checkpoint has 2 (add --num-query-groups 2)"),
        (["--rotary-base", "500000"], "--rotary-base 500000.0: disagrees with the checkpoint (rotary_base = 10000)"),
        (["--add-qkv-bias"], "--add-qkv-bias: disagrees with the checkpoint (add_qkv_bias = no)"),
        (["--max-position-embeddings", "256", "--seq-length", "512"],
         "--seq-length 512 exceeds --max-position-embeddings 256"),
    ]:
        with pytest.raises(ConfigError) as info:
            check_model_shape(_cfg(*flags), manifest)
        assert str(info.value).startswith(line), str(info.value)
    tied = Manifest(arch=LlamaArch(**{**arch.to_dict(), "tie_word_embeddings": True}), padded_vocab_size=512)
    with pytest.raises(ConfigError, match="--untie-embeddings-and-output-weights: disagrees with the checkpoint "
                                          r"\(untie_embeddings_and_output_weights = no\)"):
        check_model_shape(_cfg("--untie-embeddings-and-output-weights"), tied)


# ---- through the command line ------------------------------------------------------------------

def llama2_launch_line(assets, save, iters: int) -> list[str]:
    """docs/llama_mistral.md's "Llama-2 / Launch Megatron" flags plus the training flags of the
    LLaMA-2 example scripts, paths replaced with the test assets, sizes shrunk to the tiny model."""
    return [
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--seq-length", "32", "--max-position-embeddings", "256",
        "--num-layers", str(tl.NUM_LAYERS), "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--use-rotary-position-embeddings",
        "--normalization", "RMSNorm", "--no-position-embedding", "--position-embedding-type", "rope",
        "--rotary-percent", "1.0", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(assets.hf / "tokenizer.model"),
        "--load", str(assets.expanded), "--exit-on-missing-checkpoint", "--use-checkpoint-args",
        "--no-load-optim", "--no-load-rng", "--finetune",
        "--no-masked-softmax-fusion", "--attention-softmax-in-fp32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-decay-iters", "100",
        "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--clip-grad", "1.0", "--optimizer", "adam", "--seed", "1234",
        "--data-path", assets.domain, "--split", "99,1,0", "--data-cache-path", str(assets.root / "cache"),
        "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "1", "--log-throughput",
        "--save", str(save), "--save-interval", "1000", "--ckpt-format", "torch",
        "--use-distributed-optimizer", "--bf16",
    ]


@pytest.mark.timeout(300)
def test_llama2_launch_line_trains_two_steps(assets, tmp_path):  # noqa: F811
    save = tmp_path / "run"
    tl.train(llama2_launch_line(assets, save, 2), timeout=240)
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert sorted(tl.losses(save / "metrics.jsonl")) == [1, 2]
    lrs = [r["lr"] for r in records if r.get("loss") is not None]
    assert lrs[0] == pytest.approx(1e-3)  # warm-up of 1 iteration, then cosine over 100, not over 2
    assert 1e-3 > lrs[1] > 0.99e-3
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overlap_flags_train_like_without_them_on_two_ranks(assets, tmp_path):  # noqa: F811
    runs = {}
    for name, extra in {"plain": [], "overlap": ["--overlap-grad-reduce", "--overlap-param-gather"]}.items():
        metrics = tmp_path / f"{name}.jsonl"
        save = tmp_path / name
        tl.train(tl.train_args(assets, save, 3, "--metrics-file", str(metrics), "--save-format", "torch", *extra),
                 nproc=2, timeout=240)
        runs[name] = (tl.losses(metrics), save)
    (plain, plain_save), (overlap, overlap_save) = runs["plain"], runs["overlap"]
    assert sorted(overlap) == [1, 2, 3]
    for it in plain:
        assert abs(plain[it] - overlap[it]) <= 1e-5, (it, plain[it], overlap[it])
    # the saved weights are the gathered ones of the last step, not those of the step before
    diff = tl.compare_checkpoints(str(plain_save), str(overlap_save))
    assert max(diff.values()) <= 1e-6, diff


def test_disagreeing_shape_flag_and_unsupported_flag_give_one_line_exit_2(assets, tmp_path):  # noqa: F811
    base = tl.train_args(assets, tmp_path / "never", 2)
    runs = {"shape": base + ["--num-layers", "6"], "refused": base + ["--use-flash-attn"],
            "no_tokenizer_type": base + ["--tokenizer-type", "HuggingFaceTokenizer"]}
    results = run_distributed(tl.run_main_captured, 1, runs, timeout=200)[0]
    expected = {
        "shape": f"error: --num-layers 6: disagrees with the checkpoint (num_layers = {tl.NUM_LAYERS}); "
                 "the model comes from the checkpoint: drop the flag or fix its value",
        "refused": "error: --use-flash-attn: not supported by megatron-llamapro (flash-attn is not installed; "
                   "Transformer Engine's fused attention is used on GPUs)",
        "no_tokenizer_type": "error: --tokenizer-type HuggingFaceTokenizer: the tokenizer ",
    }
    for name, (code, out, err) in results.items():
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (name, code, err[-3000:])
        assert lines[0].startswith(expected[name]), (name, lines[0])
        assert "started" not in out, (name, out)
    assert not (tmp_path / "never").exists()
