"""The training loop: load an expanded checkpoint, freeze by global layer number, train, evaluate,
checkpoint, and stop cleanly on preemption signals.

What happens when is decided by the components: the run plan (plan.py) says what to build and
from where, `Evaluator.should_validate`, `MetricsLogger.should_log`, `StopPolicy.check` (with
`save_on_sigterm`) and `Checkpointer.save` decide evaluation, logging, early stops and saves; the
loop only runs steps.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch

from megatron_llamapro.checkpoint.delta import DeltaSource
from megatron_llamapro.checkpoint.dist import DistSource
from megatron_llamapro.checkpoint.load import load_source_into_model
from megatron_llamapro.checkpoint.source import TensorSource
from megatron_llamapro.model import apply_trainable_plan, build_model
from megatron_llamapro.training.checkpointer import Checkpointer
from megatron_llamapro.training.config import PREEMPTION_EXIT_CODE, TrainConfig
from megatron_llamapro.training.dist_state import load_dist_weights
from megatron_llamapro.training.evaluation import Evaluator, validation_coverage
from megatron_llamapro.training.metrics import FlopsModel, MetricsLogger, Throughput, default_peak_tflops
from megatron_llamapro.training.optimizer import (
    OptimizerSettings,
    build_ddp_optimizer_scheduler,
    finish_param_sync,
)
from megatron_llamapro.training.parallel import all_reduce, gather_objects
from megatron_llamapro.training import signals
from megatron_llamapro.training.plan import check_fp8, megatron_launch_options, resolve_run_plan
from megatron_llamapro.training.step import TrainStep, training_model_options
from megatron_llamapro.training.stop import Stop, StopPolicy, resolve_grace, save_on_sigterm


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.start_time = time.time()
        self.stop_policy = StopPolicy(config.exit_interval, config.exit_duration_in_mins, self.start_time)

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ---- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron_llamapro.runtime.distributed import detect_launch_env

        cfg = self.config
        check_fp8(cfg)
        launch = detect_launch_env()
        self.rank = launch.rank
        self.plan = resolve_run_plan(cfg, launch.world_size, log=self._log)
        try:
            self._build()
        finally:
            self.plan.close()

    def _build(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_llamapro.runtime.distributed import ParallelSizes, init_distributed

        cfg, plan = self.config, self.plan
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("NCCL_ALGO", "Ring")
        self.env = init_distributed(ParallelSizes(cfg.tp, cfg.pp, cfg.vpp), seed=cfg.seed)
        self.dp = plan.data_parallel_size
        self._log_start()

        arch = plan.manifest.arch
        options = training_model_options(
            arch, plan.padded_vocab_size, cfg.precision, cfg.seq_length, cfg.sequence_parallel,
            cfg.fp8, cfg.fp8_recipe, cfg.recompute_granularity, cfg.deterministic, sft=cfg.sft)
        options = megatron_launch_options(cfg, options)
        if cfg.attention_backend != "auto":
            options = dataclasses.replace(options, attention_backend=cfg.attention_backend)
        if cfg.fp8_frozen_storage:  # frozen layers cast to FP8 once, at build (TE's quantized init)
            options = dataclasses.replace(
                options, fp8_storage_layers=frozenset(range(arch.num_layers)) - plan.trainable.layers)
        self.chunks = build_model(arch, options)
        counts = apply_trainable_plan(self.chunks, plan.trainable)
        if plan.resume_iteration is None:
            self._load_weights(plan.load_source)

        self.model, self.optimizer, self.scheduler = build_ddp_optimizer_scheduler(
            self.chunks, OptimizerSettings.from_train_config(cfg))
        self.step = TrainStep(self.model, self.optimizer, self.scheduler, cfg.seq_length, cfg.micro_batch_size,
                              cfg.global_batch_size, per_token_loss=cfg.sft)
        if cfg.save and cfg.save_format == "torch_dist":
            signals.start_checkpoint_writer_helper()
        self.grace = self._resolve_grace()
        self.checkpointer = Checkpointer(
            cfg, plan.manifest, plan.tokenizer_dir, self.chunks, self.optimizer, self.scheduler,
            lambda it_dir: self._load_weights(DeltaSource(plan.load_source, it_dir)), self._log,
            before_write=lambda: finish_param_sync(self.model))
        self.state = self.checkpointer.state
        if plan.resume_iteration is not None:
            self.state = self.checkpointer.resume(plan.resume_iteration)
            self._log(f"resuming from iteration {self.state.iteration} of {cfg.save} "
                      f"({self.state.consumed_samples} samples consumed)")

        # every rank counted its own shard (DP replicas too)
        totals = all_reduce(torch.tensor([counts["trainable"], counts["frozen"]], dtype=torch.float64)) / self.dp
        self.trainable_params, self.frozen_params = int(totals[0]), int(totals[1])
        self._log(f"trainable: {plan.trainable.describe()} = {self.trainable_params:,} parameters; "
                  f"frozen: {self.frozen_params:,}")
        self._build_data()
        flops = FlopsModel(arch, cfg.seq_length, plan.padded_vocab_size, tuple(sorted(plan.trainable.layers)),
                           output_layer_trainable=False, all_trainable=plan.trainable.all)
        tokens_per_step = cfg.global_batch_size * cfg.seq_length
        self.throughput = Throughput(tokens_per_step, flops.per_token()["total"] * tokens_per_step, plan.world_size,
                                     cfg.peak_tflops or default_peak_tflops(cfg.precision, bool(cfg.fp8)))
        logs = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_data_parallel_rank() == 0
        self.metrics = MetricsLogger(cfg.metrics_path(), cfg.tensorboard_dir, logs, cfg.train_iters,
                                     self.state.iteration, cfg.log_interval)

    def _resolve_grace(self) -> float | None:
        """Seconds from SIGTERM to SIGKILL (None: no limit), read once on rank 0 for every rank."""
        grace, where = resolve_grace(self.config.preempt_grace_secs, self._log) if self.rank == 0 else (None, "")
        value = all_reduce(torch.tensor([-1.0 if grace is None or self.rank else grace], dtype=torch.float64),
                           op=torch.distributed.ReduceOp.MAX).item()
        if self.rank == 0 and grace is not None:
            self._log(f"preemption: on SIGTERM a checkpoint is saved only if it can finish within {grace:g}s ({where})")
        return None if value < 0 else value

    def _load_weights(self, source: TensorSource) -> None:
        """The weights to start from (a checkpoint, or a base with a trainable-only delta on top)."""
        if isinstance(source, DistSource):
            load_dist_weights(self.chunks, source.dir)  # natively, at any TP/PP
        else:
            load_source_into_model(self.chunks, source, self.plan.padded_vocab_size)

    def _build_data(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_llamapro.checkpoint.manifest import detect_tokenizer_type
        from megatron_llamapro.data.blend import MicroBatchIterator, build_datasets
        from megatron_llamapro.data.tokenizer import build_tokenizer

        cfg = self.config
        tok_dir = self.plan.tokenizer_dir
        kind = detect_tokenizer_type(tok_dir)
        tokenizer = build_tokenizer(kind, str(tok_dir / "tokenizer.model") if kind == "sentencepiece" else str(tok_dir))
        eval_runs = (cfg.train_iters // cfg.eval_interval + 1) if cfg.eval_interval else 1
        if cfg.sft:
            train, valid = self._build_sft_data(tokenizer)
        else:
            train, valid = build_datasets(
                cfg.data_path, cfg.split, cfg.valid_data or None, cfg.seq_length, cfg.seed,
                train_samples=cfg.train_iters * cfg.global_batch_size,
                eval_samples=max(1, eval_runs * cfg.eval_iters * cfg.global_batch_size),
                tokenizer=tokenizer, cache_dir=cfg.data_cache_dir)
        dp_rank = ps.get_data_parallel_rank()
        self.train_iter = MicroBatchIterator(train, cfg.micro_batch_size, dp_rank, self.dp,
                                             consumed_samples=self.state.consumed_samples)
        self.evaluator = Evaluator(self.step, valid, cfg.eval_interval, cfg.eval_iters, cfg.micro_batch_size,
                                   self.plan.num_microbatches, dp_rank, self.dp)
        if self.evaluator.interval:
            for line in validation_coverage(valid, cfg.eval_iters, cfg.global_batch_size):
                self._log(line)

    def _build_sft_data(self, tokenizer):
        from megatron_llamapro.data.sft import SFTSettings, build_sft_datasets

        cfg = self.config
        settings = SFTSettings(cfg.seq_length, cfg.sft_packing, cfg.sft_overlong, tokenizer.pad_id, cfg.seed)
        return build_sft_datasets(
            cfg.data_path, cfg.split, cfg.valid_data, settings,
            train_sequences=cfg.train_iters * cfg.global_batch_size,
            eval_sequences=max(1, cfg.eval_iters * cfg.global_batch_size), tokenizer=tokenizer,
            cache_dir=cfg.data_cache_dir, log=self._log)

    # ---- loop ----------------------------------------------------------------------------
    def train_step(self):
        """(mean loss on last-stage ranks else None, grad norm, whether the optimizer stepped)."""
        return self.step([next(self.train_iter) for _ in range(self.plan.num_microbatches)])

    def _log_start(self) -> None:
        """One line from rank 0 naming every host and its ranks (every rank's own line with
        --log-all-ranks): N ranks printing at once interleave on one console line."""
        cfg, host = self.config, os.uname().nodename
        where = f"{self.env.source} launch, world {self.plan.world_size}, TP={cfg.tp} PP={cfg.pp} DP={self.dp}"
        if cfg.log_all_ranks:
            print(f"[rank {self.env.rank}] started: {where}, host {host}", flush=True)
            return
        hosts = gather_objects(host)
        if self.env.rank == 0:
            print(f"started: {where}, {describe_hosts(hosts)}", flush=True)

    def run(self) -> int:
        cfg = self.config
        step = self.state.iteration
        signals.catch_interrupt()
        if step == 0 and self.evaluator.should_validate(0):
            self._validate(0)
        stop, saves, why = None, False, ""
        while step < cfg.train_iters and stop is None:
            start = time.perf_counter()
            loss, grad_norm, stepped = self.train_step()
            seconds = time.perf_counter() - start
            step += 1
            self.metrics.advance()
            if self.metrics.should_log(step):
                self.metrics.log_train_step(step, loss, self.scheduler.get_lr(self.optimizer.param_groups[0]),
                                            grad_norm, stepped, seconds, self.train_iter.consumed_samples,
                                            self.throughput,
                                            loss_tokens=self.step.last_loss_tokens if cfg.sft else None)
            if self.evaluator.should_validate(step):
                self._validate(step)
            stop = self.stop_policy.check(step)
            saves, why = self._saves_on(stop)
            self.checkpointer.save(step, self.train_iter.consumed_samples,
                                   last_step=step == cfg.train_iters and stop is None,
                                   stop_reason=stop.reason if saves else None)
        self.metrics.close()
        if stop is None:
            return 0
        code = 128 + signal.SIGINT if stop.interrupted else PREEMPTION_EXIT_CODE
        self._log(f"stopping at iteration {step} ({stop.reason}): {self._saved_words(saves, why)}; exit code {code}")
        return code

    def _saves_on(self, stop: Stop | None) -> tuple[bool, str]:
        """Collective: whether this stop saves a checkpoint, and why not in words."""
        if stop is None:
            return False, ""
        if stop.interrupted:
            return False, "Ctrl-C"
        if stop.reason != "SIGTERM":
            return True, ""
        last = all_reduce(torch.tensor([self.checkpointer.last_save_secs or -1.0], dtype=torch.float64),
                          op=torch.distributed.ReduceOp.MAX).item()
        return save_on_sigterm(self.grace, stop.signal_age, None if last < 0 else last,
                               self.checkpointer.has_checkpoint)

    def _saved_words(self, saved: bool, why: str) -> str:
        if self.config.save is None:
            return "no --save, nothing saved"
        if saved:
            return "checkpoint saved"
        last = self.checkpointer.last_saved
        kept = f"resumes from iteration {last} in {self.config.save}" if last else "no checkpoint saved yet"
        return f"not saved ({why}); {kept}"

    def _validate(self, step: int) -> None:
        self.metrics.log_validation(step, self.evaluator.evaluate())


def describe_hosts(hosts: list[str]) -> str:
    """'2 hosts: n1 (ranks 0-7), n2 (ranks 8-15)' from each rank's host name."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)

    def spans(values: list[int]) -> str:
        out, start = [], values[0]
        for prev, cur in zip(values, values[1:] + [None]):
            if cur != prev + 1:
                out.append(f"{start}" if start == prev else f"{start}-{prev}")
                start = cur
        return ",".join(out)

    parts = [f"{host} (rank{'s' if len(r) > 1 else ''} {spans(r)})" for host, r in ranks.items()]
    return f"{len(ranks)} host{'s' if len(ranks) > 1 else ''}: " + ", ".join(parts)
