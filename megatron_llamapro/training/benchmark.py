"""Training-step throughput of a LLaMA-Pro-shaped model with random weights.

Runs the trainer's own step (training/step.py: model options, freezing by global layer, DDP,
distributed optimizer, pipeline schedule, loss, LR schedule); only the data (random tokens) and the
weights (random) differ.
Defaults are LLaMA-Pro-8.3B: 40 layers of which 8 new at the interleaved positions, hidden 4096,
ffn 11008, 32 heads, vocab 32000, sequence 4096.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from megatron_llamapro.arch import LlamaArch
from megatron_llamapro.errors import entry_point
from megatron_llamapro.expansion.plan import plan_expansion
from megatron_llamapro.model import TrainablePlan, apply_trainable_plan, build_model
from megatron_llamapro.training.metrics import FlopsModel, Throughput, default_peak_tflops, peak_memory_gb
from megatron_llamapro.training.optimizer import OptimizerSettings, build_ddp_optimizer_scheduler
from megatron_llamapro.training.step import TrainStep, training_model_options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/benchmark_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original-layers", type=int, default=32)
    p.add_argument("--new-blocks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--fp8", choices=("hybrid", "e4m3"), default=None)
    p.add_argument("--fp8-recipe", choices=("delayed", "tensorwise"), default="delayed")
    p.add_argument("--recompute-granularity", choices=("selective", "full"), default=None)
    p.add_argument("--train-all", action="store_true", help="all layers trainable (instruct stage)")
    p.add_argument("--fp8-frozen-storage", action="store_true",
                   help="frozen layers' weights built FP8 by TE's quantized model init (with --fp8)")
    p.add_argument("--bf16-grad-buffer", action="store_true", help="DDP gradient buffer in bf16, not fp32")
    p.add_argument("--precision-aware-optimizer", action="store_true",
                   help="megatron-core's precision-aware optimizer (TE FusedAdam)")
    p.add_argument("--adam-states-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="Adam moments' dtype (bf16 needs --precision-aware-optimizer)")
    p.add_argument("--attention-backend", choices=("auto", "fused", "flash", "unfused", "local"), default=None,
                   help="megatron-core attention backend (default: its own choice)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compare-hf", action="store_true",
                   help="also time HF transformers (SDPA, same shape, same frozen layers) forward+backward")
    p.add_argument("--small", action="store_true", help="a CPU smoke-test shape (4+2 layers, hidden 64)")
    args = p.parse_args(argv)
    if args.small:
        args.original_layers, args.new_blocks, args.hidden, args.ffn = 4, 2, 64, 128
        args.heads, args.vocab, args.seq_length = 4, 512, 64
    return args


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_llamapro.runtime.distributed import ParallelSizes, init_distributed

    init_distributed(ParallelSizes(args.tp, args.pp))
    plan = plan_expansion(args.original_layers, args.new_blocks, "interleaved")
    arch = LlamaArch(num_layers=plan.num_layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                     num_attention_heads=args.heads, num_kv_heads=args.kv_heads or args.heads,
                     vocab_size=args.vocab, max_position_embeddings=args.seq_length)
    world = torch.distributed.get_world_size()
    dp = world // (args.tp * args.pp)
    gbs = args.micro_batch_size * args.num_microbatches * dp
    padded = arch.padded_vocab_size(args.tp)
    layers = frozenset(range(arch.num_layers)) if args.train_all else frozenset(plan.new_layers)
    options = training_model_options(
        arch, padded, args.precision, args.seq_length, fp8=args.fp8, fp8_recipe=args.fp8_recipe,
        recompute_granularity=args.recompute_granularity)
    frozen = frozenset(range(arch.num_layers)) - layers
    options = replace(options, attention_backend=args.attention_backend,
                      fp8_storage_layers=frozen if args.fp8_frozen_storage else frozenset())
    chunks = build_model(arch, options)
    apply_trainable_plan(chunks, TrainablePlan(layers=layers, all=args.train_all))
    model, optimizer, scheduler = build_ddp_optimizer_scheduler(chunks, OptimizerSettings(
        train_iters=args.warmup_steps + args.steps, samples_per_step=gbs, precision=args.precision,
        grad_reduce_in_fp32=not args.bf16_grad_buffer, precision_aware_optimizer=args.precision_aware_optimizer,
        adam_states_dtype=args.adam_states_dtype))
    train_step = TrainStep(model, optimizer, scheduler, args.seq_length, args.micro_batch_size, gbs)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)

    def batch():
        tokens = torch.randint(0, arch.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=gen)
        return {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
                "loss_mask": torch.ones(args.micro_batch_size, args.seq_length, device=device)}

    def step():
        train_step([batch() for _ in range(args.num_microbatches)])

    for _ in range(args.warmup_steps):
        step()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync()
    elapsed = (time.perf_counter() - start) / args.steps
    tokens = gbs * args.seq_length
    flops = FlopsModel(arch, args.seq_length, padded, tuple(sorted(layers)), all_trainable=args.train_all)
    speed = Throughput(tokens, flops.per_token()["total"] * tokens, world,
                       default_peak_tflops(args.precision, bool(args.fp8))).of_step(elapsed)
    result = {
        "shape": f"{arch.num_layers}L h{arch.hidden_size} ffn{arch.ffn_hidden_size} heads{arch.num_attention_heads} "
                 f"vocab{arch.vocab_size} seq{args.seq_length}",
        "trainable_layers": sorted(layers), "precision": args.precision, "fp8": args.fp8,
        "fp8_recipe": args.fp8_recipe if args.fp8 else None, "options": {
            "fp8_frozen_storage": args.fp8_frozen_storage, "bf16_grad_buffer": args.bf16_grad_buffer,
            "precision_aware_optimizer": args.precision_aware_optimizer,
            "adam_states_dtype": args.adam_states_dtype, "recompute_granularity": args.recompute_granularity,
            "attention_backend": args.attention_backend},
        "tp": args.tp, "pp": args.pp, "dp": dp, "micro_batch_size": args.micro_batch_size,
        "global_batch_size": gbs, "step_time_s": elapsed, "tokens_per_s_per_gpu": speed["tokens_per_s_per_gpu"],
        "tflops_per_gpu": speed["tflops_per_gpu"], "mfu": speed["mfu"], "peak_mem_gb": peak_memory_gb(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if args.compare_hf and ps.get_data_parallel_rank() == 0 and world == 1:
        result["hf_tokens_per_s"] = hf_baseline(arch, layers, args)
        result["speedup_vs_hf_fwd_bwd"] = result["tokens_per_s_per_gpu"] / result["hf_tokens_per_s"]
    return result


def hf_baseline(arch: LlamaArch, trainable: frozenset, args) -> float:
    """HF transformers forward+backward tokens/s with the same frozen layers (SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    config = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items()
                            if k not in ("architectures", "model_type", "torch_dtype")},
                         attn_implementation="sdpa")
    # built on the device in its dtype: an 8B model initialised on the CPU in fp32 takes minutes
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    for index in trainable:
        for param in model.model.layers[index].parameters():
            param.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)

    def step():
        tokens = torch.randint(0, arch.vocab_size, (args.micro_batch_size, args.seq_length), generator=gen).to(device)
        model(tokens, labels=tokens).loss.backward()

    for _ in range(args.warmup_steps):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync()
    return args.micro_batch_size * args.seq_length / ((time.perf_counter() - start) / args.steps)


@entry_point(prog="benchmark")
def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if torch.distributed.get_rank() == 0:
        print(f"shape {result['shape']}, trainable layers {result['trainable_layers']}")
        print(f"{result['precision']}{' + fp8 ' + result['fp8'] if result['fp8'] else ''} "
              f"TP={result['tp']} PP={result['pp']} DP={result['dp']} mbs={result['micro_batch_size']} "
              f"gbs={result['global_batch_size']} on {result['device']}")
        print(f"step time {result['step_time_s']:.3f} s | {result['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU | "
              f"{result['tflops_per_gpu']:.1f} TFLOP/s/GPU (frozen-aware)"
              + (f" | MFU {result['mfu']:.1%}" if result["mfu"] else "")
              + (f" | peak memory {result['peak_mem_gb']:.1f} GB" if result["peak_mem_gb"] else ""))
        if "hf_tokens_per_s" in result:
            print(f"HF transformers fwd+bwd: {result['hf_tokens_per_s']:,.0f} tokens/s; "
                  f"ours / HF = {result['speedup_vs_hf_fwd_bwd']:.2f}")
        print(json.dumps(result))
    from megatron_llamapro.runtime.distributed import destroy_distributed

    destroy_distributed()
    return 0
