"""Throughput and model-FLOPs accounting for frozen-block training; JSONL/tensorboard logging.

FLOPs per token, counting a multiply-add as 2 and attention without causal savings (the
Megatron-LM convention, so MFU figures compare with theirs):
  forward           2 * N_layer * L  +  4 * s * a * d * L  +  2 * h * V
  activation grads  for every layer at or above the lowest trainable one:
                    2 * N_layer + 8 * s * a * d   (the logits layer: 2 * h * V)
  weight grads      2 * (trainable matmul parameters)   (output layer included if trainable)
where N_layer = matmul parameters of one block, s = sequence length, a = heads, d = head dim,
h = hidden, V = padded vocab. Embedding lookups and norms are not counted. With every layer
trainable this is the usual 6N + attention.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_llamapro.arch import LlamaArch

# Dense peak TFLOP/s per GPU, used for MFU when --peak-tflops is not given.
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp8": 1979.0}, "H200": {"bf16": 989.0, "fp8": 1979.0},
               "A100": {"bf16": 312.0, "fp8": 312.0}}


@dataclass(frozen=True)
class FlopsModel:
    arch: LlamaArch
    seq_length: int
    padded_vocab: int
    trainable_layers: tuple[int, ...]
    output_layer_trainable: bool = False
    all_trainable: bool = False

    def _layer_matmul_params(self) -> int:
        a = self.arch
        return (a.hidden_size * a.head_dim * (a.num_attention_heads + 2 * a.num_kv_heads)
                + a.num_attention_heads * a.head_dim * a.hidden_size + 3 * a.hidden_size * a.ffn_hidden_size)

    def per_token(self) -> dict[str, float]:
        a = self.arch
        n_layer = self._layer_matmul_params()
        attn_fwd = 4 * self.seq_length * a.num_attention_heads * a.head_dim
        logits = 2 * a.hidden_size * self.padded_vocab
        forward = a.num_layers * (2 * n_layer + attn_fwd) + logits
        if self.all_trainable:
            lowest, trainable = 0, list(range(a.num_layers))
        elif self.trainable_layers:
            lowest, trainable = min(self.trainable_layers), list(self.trainable_layers)
        else:
            lowest, trainable = a.num_layers, []
        layers_with_backward = a.num_layers - lowest
        act_grad = layers_with_backward * (2 * n_layer + 2 * attn_fwd)
        if layers_with_backward or self.output_layer_trainable or self.all_trainable:
            act_grad += logits
        weight_grad = 2 * n_layer * len(trainable)
        if self.output_layer_trainable or self.all_trainable:
            weight_grad += logits
        return {"forward": forward, "activation_grad": act_grad, "weight_grad": weight_grad,
                "total": forward + act_grad + weight_grad}


def default_peak_tflops(precision: str, fp8: bool) -> float | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except (RuntimeError, AssertionError):
        return None
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks["fp8" if fp8 else "bf16"]
    return None


@dataclass(frozen=True)
class Throughput:
    """Per-step throughput figures from a step's wall time."""

    tokens_per_step: int
    flops_per_step: float
    world_size: int
    peak_tflops: float | None

    def of_step(self, seconds: float) -> dict:
        tflops = self.flops_per_step / seconds / self.world_size / 1e12
        return {"step_time_s": seconds, "tokens_per_s": self.tokens_per_step / seconds,
                "tokens_per_s_per_gpu": self.tokens_per_step / seconds / self.world_size,
                "tflops_per_gpu": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else None}


def peak_memory_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def drop_records_after(jsonl: Path, start_iter: int) -> int:
    """Rewrite `jsonl` (atomically) without the records a run starting at `start_iter` logs again:
    iterations after it (all of them when starting from 0, whose evaluation runs again); returns
    how many were dropped. Lines that are not JSON records (a torn last line) are dropped too."""
    if not jsonl.is_file():
        return 0
    kept, dropped = [], 0
    for line in jsonl.read_text().splitlines():
        try:
            iteration = json.loads(line).get("iteration", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += bool(line.strip())
            continue
        if start_iter and iteration <= start_iter:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = jsonl.with_name(f".{jsonl.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, jsonl)
    return dropped


class MetricsLogger:
    """Rank 0's concise console line, a JSONL file (one object per logged step), tensorboard.
    `enabled` on the one rank that logs (it holds the loss: last pipeline stage, TP and DP rank 0);
    training steps are logged every `log_interval` steps. A run that starts at `start_iter` (a
    resume, or 0) first drops the records of later iterations a stopped run left behind, in the
    JSONL file and in tensorboard (purge_step), so no iteration is recorded twice."""

    def __init__(self, jsonl: Path | None, tensorboard_dir: str | None, enabled: bool, total_iters: int,
                 start_iter: int, log_interval: int = 1):
        self.enabled = enabled
        self.total_iters = total_iters
        self.log_interval = log_interval
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            dropped = drop_records_after(jsonl, start_iter)
            if dropped:
                print(f"{jsonl}: dropped {dropped} record(s) of iterations after {start_iter} "
                      "(logged by a run that stopped before its next checkpoint)", flush=True)
            self.file = open(jsonl, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides every event at or after that step in the files already there
            self.tb = SummaryWriter(tensorboard_dir, purge_step=start_iter + 1 if start_iter else 0)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", leave=False)

    def log(self, record: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("iteration", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "time"):
                    self.tb.add_scalar(key, value, step)
        if console:
            if self.bar is not None:
                self.bar.write(console)
            else:
                print(console, flush=True)

    def should_log(self, step: int) -> bool:
        return self.enabled and step % self.log_interval == 0

    def log_train_step(self, step: int, loss: float, lr: float, grad_norm, stepped: bool, seconds: float,
                       consumed_samples: int, throughput: Throughput, loss_tokens: int | None = None) -> None:
        """`loss_tokens`: the global batch's tokens the loss was taken over, when not all of them
        (instruction tuning: the answer tokens)."""
        speed = throughput.of_step(seconds)
        record = {"iteration": step, "loss": loss, "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped": not stepped,
                  **speed, "consumed_samples": consumed_samples, "peak_mem_gb": peak_memory_gb()}
        if loss_tokens is not None:
            record["loss_tokens"] = loss_tokens
        self.log(record, (
            f"iter {step}/{self.total_iters} loss {loss:.4f}"
            + (f" ({loss_tokens} answer tokens)" if loss_tokens is not None else "") + f" lr {lr:.3e} "
            f"grad_norm {record['grad_norm'] or 0:.3f} {speed['tokens_per_s_per_gpu']:.0f} tok/s/gpu "
            f"{speed['tflops_per_gpu']:.1f} TFLOP/s/gpu" + (f" MFU {speed['mfu']:.1%}" if speed["mfu"] else "")))

    def log_validation(self, step: int, losses: dict[str, float]) -> None:
        if not losses:
            return
        record = {"iteration": step, **{f"valid_loss/{k}": v for k, v in losses.items()}}
        self.log(record, f"eval iter {step}: " + ", ".join(
            f"{k} {v:.4f} (ppl {math.exp(min(v, 50)):.2f})" for k, v in losses.items()))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
