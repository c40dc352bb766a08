#!/usr/bin/env python3
"""GPU acceptance of the Transformer Engine path (issue 16), one process, reports under --out.

  1. a tiny HF checkpoint made here, converted (bf16), matches transformers' logits; on a GPU it
     loads strictly into the TE spec (`_extra_state` included) and matches within bf16 tolerance;
     expanded, the logits stay exactly the same; exported to HF, they match again.
  2. (TE) 30 steps training new blocks only in bf16, FP8 hybrid/delayed and FP8 hybrid/tensorwise:
     frozen weights bit-identical, no weight-gradient GEMMs for frozen layers, FP8 loss near bf16's.
  3. (TE) throughput of the LLaMA-Pro-8.3B shape through training/benchmark.py: BF16 and FP8, micro-
     batch 1 and 2, each memory/speed option on and off, the HF transformers baseline.
  4. instruction-tuning sequences (--sft): chat samples packed per sequence give each sample the loss
     it has alone. On a GPU through TE's packed "thd" attention (bf16); on a CPU (and as the
     reference path) through the local spec's block-diagonal mask (fp32).

Writes gpu_report.json and gpu_report.md (rewritten after every check, so a run stopped at its
limit still leaves what it measured). Each check is passed, failed or "skipped: <why>"; checks
that need TE say "skipped: no GPU" on a CPU machine. --budget-s skips what no longer fits.
Exit status: 0 when nothing failed, 1 otherwise.

GPU:  python tools/gpu_acceptance.py --out $OUT
CPU:  python tools/gpu_acceptance.py --small --out DIR   (smoke test: check 1 without TE)
"""
import argparse
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_llamapro.errors import entry_point, run  # noqa: E402

PASSED, FAILED = "passed", "failed"
BF16_LOGIT_TOLERANCE = 2e-2  # relative to max |logit|: bf16 GEMMs vs an fp32 reference
FP8_LOSS_TOLERANCE = 0.05  # relative difference of the final loss, FP8 vs bf16
TARGETS = {"bf16": 14_000, "fp8": 20_000}  # tokens/s, full step, one H100, seq 4096 (issue 16)
PAPER_SHAPE = ["--original-layers", "32", "--new-blocks", "8"]  # benchmark.py's defaults otherwise
SMALL_SHAPE = ["--original-layers", "4", "--new-blocks", "2", "--hidden", "512", "--ffn", "1536",
               "--heads", "8", "--vocab", "1024", "--seq-length", "512"]


class Report:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.start = out, budget_s, time.monotonic()
        self.environment: dict = {}
        self.checks: list[dict] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def add(self, check: str, name: str, status: str, numbers: dict | None = None, detail: str = "") -> dict:
        entry = {"check": check, "name": name, "status": status, "numbers": numbers or {}, "detail": detail,
                 "at_s": round(self.elapsed(), 1)}
        self.checks.append(entry)
        print(f"[{entry['at_s']:7.1f}s] check {check} {name}: {status} {json.dumps(entry['numbers'])}"
              + (f"\n{detail}" if status == FAILED and detail else ""), flush=True)
        self.write()
        return entry

    def run(self, check: str, name: str, fn, skip: str | None = None, need_s: float = 0.0):
        """fn() -> (passed?, numbers[, detail]); an exception is recorded as a failure with its traceback."""
        if skip:
            return self.add(check, name, skip)
        if self.left() < need_s:
            return self.add(check, name, "skipped: budget")
        try:
            ok, numbers, *detail = fn()
        except Exception:  # recorded in the report and the exit status, not swallowed
            return self.add(check, name, FAILED, detail=traceback.format_exc(limit=8))
        return self.add(check, name, PASSED if ok else FAILED, numbers, detail[0] if detail else "")

    @property
    def failed(self) -> bool:
        return any(c["status"] == FAILED for c in self.checks)

    def write(self) -> None:
        data = {"environment": self.environment, "elapsed_s": round(self.elapsed(), 1),
                "budget_s": self.budget_s, "result": FAILED if self.failed else PASSED, "checks": self.checks}
        _atomic_write(self.out / "gpu_report.json", json.dumps(data, indent=2, default=str))
        _atomic_write(self.out / "gpu_report.md", self.markdown(data))

    @staticmethod
    def markdown(data: dict) -> str:
        lines = ["# GPU acceptance report (issue 16)", ""]
        lines += [f"- {k}: {v}" for k, v in data["environment"].items()]
        lines += [f"- elapsed: {data['elapsed_s']} s of a {data['budget_s']} s budget",
                  f"- result: **{data['result']}**", "", "| check | name | status | numbers |", "|---|---|---|---|"]
        for c in data["checks"]:
            numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in c["numbers"].items())
            lines.append(f"| {c['check']} | {c['name']} | {c['status']} | {numbers} |")
        failures = [c for c in data["checks"] if c["status"] == FAILED and c["detail"]]
        for c in failures:
            lines += ["", f"## failed: {c['check']} {c['name']}", "```", c["detail"].rstrip(), "```"]
        return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def environment() -> dict:
    from megatron_llamapro.model import te_available

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "host": platform.node()}
    for module in ("megatron.core", "transformer_engine", "transformers"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            env[module] = getattr(mod, "__version__", "?")
        except (ImportError, OSError) as exc:
            env[module] = f"not importable ({type(exc).__name__})"
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    env["te_usable"] = torch.cuda.is_available() and te_available()
    return env


def te_skip_reason() -> str | None:
    from megatron_llamapro.model import te_available

    if not torch.cuda.is_available():
        return "skipped: no GPU"
    if not te_available():
        return "skipped: Transformer Engine not importable"
    return None


# ---- check 1: conversion, TE-spec strict load, expansion, export --------------------------------

def make_tiny_hf(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random norms are exactly 1: perturb them so a mapping error shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out


def te_logits_strict(checkpoint: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, list, list]:
    """bf16 TE-spec model, the legacy file loaded with load_state_dict(strict=False) so that missing and
    unexpected keys (`_extra_state` included) are counted, not raised; logits [b, s, vocab]."""
    from megatron_llamapro.checkpoint.legacy import FILE_NAME, load_checkpoint_file
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.pipeline import forward_only_logits

    with open_checkpoint(checkpoint) as source:
        arch, padded = source.arch, source.manifest.padded_vocab_size
    files = list(checkpoint.glob(f"*/mp_rank_00/{FILE_NAME}"))
    state = load_checkpoint_file(files[0], mmap=False)["model"]
    chunks = build_model(arch, ModelOptions(params_dtype="bf16", padded_vocab_size=padded, use_te=True))
    missing, unexpected = chunks[0].load_state_dict(state, strict=False)
    chunks[0].eval()
    logits = forward_only_logits(chunks, tokens.cuda())[..., : arch.vocab_size].float().cpu()
    return logits, list(missing), list(unexpected)


def check_1(report: Report, work: Path) -> None:
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.layout import Layout
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.checkpoint.verify import compare, hf_logits, sample_tokens
    from megatron_llamapro.expansion.apply import compare_logits, expand_checkpoint
    from megatron_llamapro.expansion.plan import plan_expansion

    hf, converted, expanded, exported = (work / n for n in ("hf", "converted", "expanded", "exported"))

    def convert():
        make_tiny_hf(hf)
        write_checkpoint(functools.partial(open_checkpoint, hf), converted, "torch", Layout(), dtype="bf16")
        with open_checkpoint(converted) as source:
            result = compare(hf, source, round_to="bf16")
        return result.ok, {"relative_logit_diff": result.relative_diff, "top1_agreement": result.top1_agreement}

    report.run("1", "convert HF -> Megatron (bf16), logits vs transformers (fp32)", convert)
    converted_ok = (converted / "latest_checkpointed_iteration.txt").exists()
    tokens = sample_tokens(300, seq=32)
    te_skip = te_skip_reason()

    def te_load(checkpoint: Path, reference_hf: Path):
        def measure():
            ours, missing, unexpected = te_logits_strict(checkpoint, tokens)
            reference = hf_logits(reference_hf, tokens, round_to="bf16")
            relative = float((ours - reference).abs().max() / reference.abs().max())
            numbers = {"missing_keys": len(missing), "unexpected_keys": len(unexpected),
                       "relative_logit_diff_bf16": relative}
            ok = not missing and not unexpected and relative <= BF16_LOGIT_TOLERANCE
            return ok, numbers, f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        return measure

    report.run("1", "TE spec strict load (incl. _extra_state), bf16 logits vs transformers",
               te_load(converted, hf), skip=te_skip or (None if converted_ok else "skipped: conversion failed"))

    plan = plan_expansion(4, 2, "interleaved")

    def expand():
        expand_checkpoint(converted, expanded, plan)
        with open_checkpoint(converted) as a, open_checkpoint(expanded) as b:
            exact, diff = compare_logits(a, b, seq=32)
        return exact, {"logits_bit_identical": exact, "max_abs_diff": diff, "new_layers": list(plan.new_layers)}

    report.run("1", "expansion 4 -> 6 layers keeps the logits exactly", expand,
               skip=None if converted_ok else "skipped: conversion failed")
    expanded_ok = (expanded / "latest_checkpointed_iteration.txt").exists()

    def te_expanded_exact():
        original, _, _ = te_logits_strict(converted, tokens)
        grown, missing, unexpected = te_logits_strict(expanded, tokens)
        exact = torch.equal(original, grown)
        return exact and not missing and not unexpected, {
            "logits_bit_identical": exact, "max_abs_diff": float((original - grown).abs().max()),
            "missing_keys": len(missing), "unexpected_keys": len(unexpected)}

    report.run("1", "TE spec: expanded model's bf16 logits equal the original's", te_expanded_exact,
               skip=te_skip or (None if expanded_ok else "skipped: expansion failed"))

    def export():
        write_checkpoint(functools.partial(open_checkpoint, expanded), exported, "hf", Layout())
        with open_checkpoint(expanded) as source:
            result = compare(exported, source)
        return result.ok, {"relative_logit_diff": result.relative_diff, "top1_agreement": result.top1_agreement}

    report.run("1", "export expanded -> HF, logits vs transformers", export,
               skip=None if expanded_ok else "skipped: expansion failed")
    if (exported / "config.json").exists():
        report.run("1", "TE spec: expanded checkpoint's bf16 logits vs its HF export",
                   te_load(expanded, exported), skip=te_skip)


# ---- check 2: training new blocks only under TE --------------------------------------------------

GEMM_MARKERS = ("gemm", "nvjet", "cutlass")


def count_gemm_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages()
               if e.device_type.name == "CUDA" and any(m in e.key.lower() for m in GEMM_MARKERS))


def train_new_blocks(fp8: str | None, recipe: str, steps: int = 30) -> dict:
    from megatron.core import tensor_parallel

    from megatron_llamapro.arch import LlamaArch
    from megatron_llamapro.expansion.plan import plan_expansion
    from megatron_llamapro.model import TrainablePlan, apply_trainable_plan, build_model, transformer_layers
    from megatron_llamapro.runtime.distributed import device
    from megatron_llamapro.training.optimizer import OptimizerSettings, build_ddp_optimizer_scheduler
    from megatron_llamapro.training.step import TrainStep, training_model_options

    plan = plan_expansion(6, 2, "interleaved")
    arch = LlamaArch(num_layers=plan.num_layers, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                     num_kv_heads=8, vocab_size=1024, max_position_embeddings=256)
    seq, mbs = 256, 4
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    chunks = build_model(arch, training_model_options(arch, 1024, "bf16", seq, fp8=fp8, fp8_recipe=recipe))
    trainable = frozenset(plan.new_layers)
    apply_trainable_plan(chunks, TrainablePlan(layers=trainable))
    frozen_before = {n: p.detach().clone() for n, p in chunks[0].named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in chunks[0].named_parameters() if p.requires_grad}
    model, optimizer, scheduler = build_ddp_optimizer_scheduler(chunks, OptimizerSettings(
        train_iters=steps + 1, samples_per_step=mbs, lr=1e-3, min_lr=1e-4))
    step = TrainStep(model, optimizer, scheduler, seq, mbs, mbs)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, arch.vocab_size, (mbs, seq + 1), generator=gen) for _ in range(4)]

    def batch(i):
        tokens = data[i % len(data)].to(device())
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq, device=device())}

    losses = [step([batch(i)])[0] for i in range(steps)]
    gemms = count_gemm_kernels(lambda: step([batch(steps)])) if torch.cuda.is_available() else None
    params = dict(chunks[0].named_parameters())
    frozen_identical = all(torch.equal(params[n], before) for n, before in frozen_before.items())
    trainable_moved = any(not torch.equal(params[n], before) for n, before in trainable_before.items())
    frozen_with_grad = sum(1 for n in frozen_before if params[n].grad is not None
                           or getattr(params[n], "main_grad", None) is not None)
    frozen_layers = [layer for index, layer in transformer_layers(chunks[0]) if index not in trainable]
    frozen_requiring_grad = sum(p.requires_grad for layer in frozen_layers for p in layer.parameters())
    # GEMMs per step: forward 4 per layer + logits; backward dgrad 4 per layer from the lowest trainable
    # one up + logits; wgrad 4 per trainable layer. Frozen layers above the lowest would add 4 each.
    lowest = min(trainable)
    with_backward = arch.num_layers - lowest
    expected = 4 * arch.num_layers + 1 + 4 * with_backward + 1 + 4 * len(trainable)
    frozen_above = with_backward - len(trainable)
    del model, optimizer, scheduler, step, chunks, params
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"losses": losses, "final_loss": sum(losses[-5:]) / len(losses[-5:]), "frozen_bit_identical": frozen_identical,
            "trainable_changed": trainable_moved, "frozen_params_with_grad": frozen_with_grad,
            "frozen_params_requiring_grad": frozen_requiring_grad, "gemm_kernels_per_step": gemms,
            "expected_gemms_without_frozen_wgrad": expected,
            "expected_gemms_with_frozen_wgrad": expected + 4 * frozen_above}


def check_2(report: Report) -> None:
    skip = te_skip_reason()
    results: dict = {}
    for label, fp8, recipe in (("bf16", None, "delayed"), ("fp8 hybrid delayed", "hybrid", "delayed"),
                               ("fp8 hybrid tensorwise", "hybrid", "tensorwise")):
        def train(fp8=fp8, recipe=recipe, label=label):
            r = train_new_blocks(fp8, recipe)
            results[label] = r
            numbers = {k: v for k, v in r.items() if k != "losses"}
            numbers["first_loss"] = r["losses"][0]
            ok = (r["frozen_bit_identical"] and r["trainable_changed"] and not r["frozen_params_with_grad"]
                  and not r["frozen_params_requiring_grad"]
                  and r["gemm_kernels_per_step"] < r["expected_gemms_with_frozen_wgrad"]
                  and r["final_loss"] < r["losses"][0])
            if fp8 and "bf16" in results:
                numbers["loss_vs_bf16"] = r["final_loss"] / results["bf16"]["final_loss"] - 1
                ok = ok and abs(numbers["loss_vs_bf16"]) <= FP8_LOSS_TOLERANCE
            return ok, numbers, "losses " + ", ".join(f"{x:.4f}" for x in r["losses"])

        report.run("2", f"30 steps new blocks only, {label}", train, skip=skip, need_s=30)


# ---- check 3: throughput -------------------------------------------------------------------------

def bench_configs() -> list[tuple[str, list[str]]]:
    fp8 = ["--fp8", "hybrid"]
    return [
        ("bf16 mbs1", []),
        ("fp8 hybrid delayed mbs1", fp8),
        ("bf16 mbs2", ["--micro-batch-size", "2"]),
        ("fp8 hybrid delayed mbs2", fp8 + ["--micro-batch-size", "2"]),
        ("fp8 mbs2 + FP8 frozen storage", fp8 + ["--micro-batch-size", "2", "--fp8-frozen-storage"]),
        ("fp8 mbs1 + FP8 frozen storage", fp8 + ["--fp8-frozen-storage"]),
        ("fp8 hybrid tensorwise mbs2", fp8 + ["--fp8-recipe", "tensorwise", "--micro-batch-size", "2"]),
        ("bf16 mbs1 + bf16 grad buffer", ["--bf16-grad-buffer"]),
        ("bf16 mbs1 + precision-aware optimizer, bf16 Adam states",
         ["--precision-aware-optimizer", "--adam-states-dtype", "bf16"]),
        ("bf16 mbs2 + selective recompute", ["--micro-batch-size", "2", "--recompute-granularity", "selective"]),
        ("fp8 mbs2 + all memory options", fp8 + ["--micro-batch-size", "2", "--fp8-frozen-storage",
                                                  "--bf16-grad-buffer", "--precision-aware-optimizer",
                                                  "--adam-states-dtype", "bf16"]),
    ]


def bench_numbers(result: dict) -> dict:
    keys = ("tokens_per_s_per_gpu", "step_time_s", "tflops_per_gpu", "mfu", "peak_mem_gb", "hf_tokens_per_s")
    return {k: result[k] for k in keys if k in result and result[k] is not None}


def run_benchmark(argv: list[str]) -> dict:
    from megatron_llamapro.training import benchmark

    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):  # set by the last build
        os.environ.pop(name, None)
    try:
        return benchmark.run(benchmark.parse_args(argv))
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def check_3(report: Report, small: bool, steps: int) -> None:
    skip = te_skip_reason()
    shape = SMALL_SHAPE if small else PAPER_SHAPE
    timing = ["--warmup-steps", "2", "--steps", str(steps)]
    best: dict = {}
    durations: list[float] = []  # of the configurations run so far: the next one needs their longest

    def need_s() -> float:
        return max(durations, default=40.0)

    for label, extra in bench_configs():
        def measure(extra=extra):
            start = time.monotonic()
            try:
                result = run_benchmark(shape + timing + extra)
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                return True, {"out_of_memory": True, "gpu_memory_gb": report.environment.get("gpu_memory_gb")}
            durations.append(time.monotonic() - start)
            kind = "fp8" if "--fp8" in extra else "bf16"
            best[kind] = max(best.get(kind, 0.0), result["tokens_per_s_per_gpu"])
            return True, bench_numbers(result)

        report.run("3", label, measure, skip=skip, need_s=need_s())

    def hf():
        from megatron_llamapro.training import benchmark

        args = benchmark.parse_args(shape + timing + ["--compare-hf"])
        from megatron_llamapro.arch import LlamaArch
        from megatron_llamapro.expansion.plan import plan_expansion

        plan = plan_expansion(args.original_layers, args.new_blocks, "interleaved")
        arch = LlamaArch(num_layers=plan.num_layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                         num_attention_heads=args.heads, num_kv_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=args.seq_length)
        torch.cuda.reset_peak_memory_stats()
        tokens_per_s = benchmark.hf_baseline(arch, frozenset(plan.new_layers), args)
        gc.collect()
        torch.cuda.empty_cache()
        return True, {"tokens_per_s": tokens_per_s, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}

    report.run("3", "HF transformers SDPA baseline mbs1 (fwd+bwd, same frozen layers)", hf, skip=skip,
               need_s=need_s())

    def unfused_attention():
        # its own process: megatron-core asserts the NVTE_* attention variables a first build set
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_train.py"), *shape, *timing,
                               "--attention-backend", "unfused"], capture_output=True, text=True,
                              timeout=max(30, report.left()))
        if proc.returncode != 0:
            return False, {"returncode": proc.returncode}, proc.stderr[-3000:]
        return True, bench_numbers(json.loads(proc.stdout.strip().splitlines()[-1]))

    report.run("3", "bf16 mbs1, fused attention off (unfused)", unfused_attention, skip=skip,
               need_s=need_s() + 30)
    if not skip and not small:
        for kind, target in TARGETS.items():
            if kind in best:
                report.add("3", f"target {kind} >= {target:,} tok/s (one H100, full step)",
                           PASSED if best[kind] >= target else FAILED, {"best_tokens_per_s": best[kind]})


# ---- check 4: packed instruction-tuning sequences ------------------------------------------------

PACKED_TOLERANCE = {"bf16": 2e-2, "fp32": 1e-5}  # max |packed - alone| per sample / max |alone|


def packed_vs_alone(work: Path, use_te: bool) -> tuple[bool, dict]:
    """Random chat samples written as a chat set, packed by data/sft.py; each sample's summed target
    loss from the packed sequences against the sample alone (plain causal attention)."""
    import dataclasses

    import numpy
    from megatron.core import tensor_parallel

    from megatron_llamapro.arch import LlamaArch
    from megatron_llamapro.data.chat_indexed import ChatDatasetWriter, ChatIndexedDataset, ChatMeta
    from megatron_llamapro.data.sft import ChatSamples, SFTDataset, SFTSettings
    from megatron_llamapro.model import build_model
    from megatron_llamapro.pipeline import packed_forward_inputs, uses_transformer_engine_attention
    from megatron_llamapro.runtime.distributed import device
    from megatron_llamapro.training.step import training_model_options

    precision = "bf16" if use_te else "fp32"
    arch = LlamaArch(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4, num_kv_heads=2,
                     vocab_size=512, max_position_embeddings=1024)
    seq = 256
    gen = torch.Generator().manual_seed(0)
    prefix = str(work / f"packed_{precision}_chat_document")
    with ChatDatasetWriter(prefix, numpy.int32, f".tmp_packed_{precision}") as writer:
        for n in (37, 90, 15, 120, 64, 200, 33, 48, 9, 150):
            tokens = torch.randint(3, arch.vocab_size, (n,), generator=gen).numpy()
            mask = (torch.rand(n, generator=gen) < 0.5).numpy().astype(numpy.uint8)
            mask[-1] = 1
            writer.add(tokens, mask)
        writer.publish(ChatMeta("random ids", "none"))
    chat = ChatIndexedDataset(prefix)
    every = [numpy.arange(len(chat))]
    packed = SFTDataset(ChatSamples([chat], every, SFTSettings(seq, "pack"), "packed"), None)
    alone = SFTDataset(ChatSamples([chat], every, SFTSettings(seq, "pad"), "alone"), None)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    options = dataclasses.replace(training_model_options(arch, 512, precision, seq, sft=True), use_te=use_te)
    model = build_model(arch, options)[0].eval()

    def target_losses(item: dict, packed_attention: bool):
        batch = {k: torch.as_tensor(v).unsqueeze(0).to(device()) for k, v in item.items()
                 if packed_attention or k != "segment_ids"}
        with torch.no_grad():
            losses = model(**packed_forward_inputs(model, batch)).float()
        return (losses.reshape(batch["loss_mask"].shape) * batch["loss_mask"])[0].cpu(), batch

    packed_sums = {}
    for index in range(len(packed)):
        per_token, batch = target_losses(packed[index], True)
        for segment, ref in enumerate(packed.refs(index)):
            packed_sums[int(ref)] = float(per_token[batch["segment_ids"][0].cpu() == segment].sum())
    alone_sums = [float(target_losses(alone[i], False)[0].sum()) for i in range(len(alone))]
    diff = max(abs(packed_sums[i] - alone_sums[i]) for i in range(len(alone_sums)))
    relative = diff / max(abs(x) for x in alone_sums)
    numbers = {"samples": len(alone_sums), "sequences": len(packed),
               "samples_per_sequence": [len(packed.refs(i)) for i in range(len(packed))],
               "te_attention": uses_transformer_engine_attention(model), "precision": precision,
               "max_relative_diff": relative}
    del model
    gc.collect()
    return relative <= PACKED_TOLERANCE[precision] and len(packed) < len(alone_sums), numbers


def check_4(report: Report, work: Path) -> None:
    skip = te_skip_reason()
    report.run("4", "packed SFT sequences, local spec block-diagonal mask (fp32): each sample's loss alone",
               lambda: packed_vs_alone(work, use_te=False), need_s=20)
    report.run("4", "packed SFT sequences, TE thd attention (bf16): each sample's loss alone",
               lambda: packed_vs_alone(work, use_te=True), skip=skip, need_s=20)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_acceptance.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_report.json / gpu_report.md")
    p.add_argument("--small", action="store_true", help="small shapes: a smoke test (CPU or GPU)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip checks that would end after this")
    p.add_argument("--bench-steps", type=int, default=6, help="timed steps per throughput configuration")
    return p.parse_args(argv)


@entry_point(prog="gpu_acceptance")
def main(argv=None) -> int:
    from megatron_llamapro.runtime.distributed import single_process_megatron

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, args.budget_s)
    report.environment = environment()
    report.write()
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance.") as work, single_process_megatron():
        check_1(report, Path(work))
        check_2(report)
        check_3(report, args.small, args.bench_steps)
        check_4(report, Path(work))
    report.write()
    print(f"report: {args.out / 'gpu_report.md'} ({'FAILED' if report.failed else 'passed'})")
    return 1 if report.failed else 0


if __name__ == "__main__":
    run(main)
