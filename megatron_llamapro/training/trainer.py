"""The training loop: load an expanded checkpoint, freeze by global layer number, train, evaluate,
checkpoint, and stop cleanly on preemption signals."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from megatron_llamapro.checkpoint.load import load_source_into_model
from megatron_llamapro.checkpoint.manifest import Manifest, tokenizer_dir
from megatron_llamapro.checkpoint.open import open_checkpoint, sniff_format
from megatron_llamapro.checkpoint.source import CheckpointError
from megatron_llamapro.model import ModelOptions, TrainablePlan, apply_trainable_plan, build_model
from megatron_llamapro.training import checkpointing as ckpt
from megatron_llamapro.training import signals
from megatron_llamapro.training.config import PREEMPTION_EXIT_CODE, ConfigError, TrainConfig, parse_layer_list
from megatron_llamapro.pipeline import run_schedule
from megatron_llamapro.training.optimizer import build_ddp_optimizer_scheduler
from megatron_llamapro.training.metrics import FlopsModel, MetricsLogger, default_peak_tflops


class _SignalFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes the step, saves and exits PREEMPTION_EXIT_CODE."""

    def __init__(self):
        self.flag = signals.install()

    @property
    def received(self) -> int | None:
        return self.flag.received

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if torch.cuda.is_available():
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _log(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


def check_fp8(config: TrainConfig) -> None:
    if config.fp8 is None:
        return
    from megatron_llamapro.model import te_available
    from megatron_llamapro.runtime.cpu_compat import cuda_usable

    if not cuda_usable():
        raise ConfigError(f"--fp8 {config.fp8}: needs a GPU (no CUDA device is usable here)")
    if not te_available():
        raise ConfigError(f"--fp8 {config.fp8}: needs Transformer Engine (pip install 'megatron-llamapro[gpu]')")


def check_inputs_exist(config: TrainConfig) -> None:
    from megatron_llamapro.data.blend import check_prefixes_exist, parse_data_path, parse_valid_data

    blend = parse_data_path(config.data_path)
    valid = parse_valid_data(config.valid_data or None) or {}
    check_prefixes_exist(blend.prefixes + list(valid.values()))
    if config.load and not Path(config.load).exists():
        raise ConfigError(f"--load {config.load}: no such checkpoint directory")


def preflight(config: TrainConfig) -> None:
    """Checks that need only the flags, the launcher's world size and the checkpoint's manifest,
    run before torch.distributed starts so a bad configuration costs nothing."""
    from megatron_llamapro.checkpoint.manifest import MANIFEST_NAME
    from megatron_llamapro.runtime.distributed import detect_launch_env

    world = detect_launch_env().world_size  # what init_distributed will use
    manifest = None
    resumable = bool(config.save) and ckpt.holds_checkpoints(Path(config.save)) \
        and (Path(config.save) / MANIFEST_NAME).is_file()
    if resumable:
        manifest = Manifest.read(Path(config.save))
    elif config.load:
        problem = ckpt.damaged_checkpoint(Path(config.load))
        if problem:
            raise CheckpointError(f"--load {config.load}: damaged checkpoint: {problem}")
        with open_checkpoint(Path(config.load)) as source:
            manifest = source.manifest
    if manifest is not None:
        try:
            manifest.arch.check_parallel(config.tp, config.pp, config.vpp)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        window = manifest.arch.sliding_window
        if window and config.seq_length > window:
            # Mistral's sliding window equals full causal attention up to the window; beyond it
            # megatron-core's local/TE layers here would attend further than the model was trained to.
            raise ConfigError(f"--seq-length {config.seq_length} exceeds the model's sliding_window {window} "
                              "(sliding-window attention is not implemented; train at most that long)")
        plan = trainable_plan(config, manifest, config.load or config.save)
        check_every_stage_trains(plan, manifest.arch.num_layers, config)
    config.validate(world)


def check_only(config: TrainConfig) -> str:
    """`--check`: every check that needs no process group (FP8 needs the GPU the job will have, so
    it is left to the job); returns the one-line summary of the plan."""
    from megatron_llamapro.runtime.distributed import detect_launch_env

    check_inputs_exist(config)
    preflight(config)
    world = detect_launch_env().world_size
    return (f"check: ok: world size {world} = TP {config.tp} x PP {config.pp} x DP "
            f"{config.data_parallel_size(world)}; {config.num_microbatches(world)} micro-batch(es) of "
            f"{config.micro_batch_size} per step per DP rank; global batch {config.global_batch_size}")


def check_every_stage_trains(plan: TrainablePlan, num_layers: int, config: TrainConfig) -> None:
    """megatron-core's distributed optimizer cannot checkpoint a pipeline stage that owns no
    trainable parameter; refuse such layouts up front when saving (an interleaved expansion planned
    for the same PP/VPP never produces one)."""
    from megatron_llamapro.checkpoint.layout import Layout, StagePlacement

    if plan.all or config.pp == 1 or not config.save:
        return
    placement = StagePlacement(num_layers, Layout(config.tp, config.pp, config.vpp))
    for stage in range(config.pp):
        layers = [l for chunk in range(config.vpp or 1) for l in placement.layers(stage, chunk)]
        owns = any(l in plan.layers for l in layers)
        owns = owns or (stage == 0 and plan.embeddings) or (stage == config.pp - 1 and plan.final_norm)
        if not owns:
            raise ConfigError(
                f"--pipeline-model-parallel-size {config.pp}: stage {stage} (layers {layers[0]}-{layers[-1]}) "
                f"has no trainable layer (trainable: {sorted(plan.layers)}), and a stage without one cannot be "
                "checkpointed; use a smaller PP/VPP or new blocks on every stage (interleaved placement)")


def trainable_plan(config: TrainConfig, manifest: Manifest, load_path: str) -> TrainablePlan:
    num_layers = manifest.arch.num_layers
    if config.train_all:
        return TrainablePlan(layers=frozenset(range(num_layers)), all=True)
    if config.trainable_layers:
        layers = parse_layer_list(config.trainable_layers, num_layers)
    elif manifest.trainable_layers:
        layers = manifest.trainable_layers
    else:
        raise ConfigError(f"--load {load_path}: the checkpoint has no expansion manifest; "
                          "pass --trainable-layers (or --train-all)")
    return TrainablePlan(layers=frozenset(layers), embeddings=config.train_embeddings,
                         final_norm=config.train_final_norm)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.signals = _SignalFlag()
        self.start_time = time.time()

    # ---- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_llamapro.runtime.distributed import ParallelSizes, init_distributed

        cfg = self.config
        check_fp8(cfg)
        check_inputs_exist(cfg)
        preflight(cfg)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("NCCL_ALGO", "Ring")
        self.env = init_distributed(ParallelSizes(cfg.tp, cfg.pp, cfg.vpp), seed=cfg.seed)
        world = torch.distributed.get_world_size()
        cfg.validate(world)
        self.dp = cfg.data_parallel_size(world)
        self.num_micro = cfg.num_microbatches(world)
        print(f"[rank {self.env.rank}] started: {self.env.source} launch, world {world}, "
              f"TP={cfg.tp} PP={cfg.pp} DP={self.dp}, host {os.uname().nodename}", flush=True)

        warnings_seen: list[str] = []

        def log_warning(msg: str) -> None:
            warnings_seen.append(msg)
            _log(msg)

        self.resume_iteration = ckpt.find_resume_iteration(Path(cfg.save), log=log_warning) if cfg.save else None
        if cfg.save and self.resume_iteration is None and ckpt.holds_checkpoints(Path(cfg.save)):
            # never silently start over (and later overwrite) in a directory with damaged checkpoints
            reason = warnings_seen[-1].removeprefix("warning: ") if warnings_seen else "none is complete"
            raise CheckpointError(f"--save {cfg.save}: no complete checkpoint to resume from ({reason})")
        self.load_path = cfg.load
        if self.resume_iteration is not None:
            self.manifest = Manifest.read(Path(cfg.save))
            if self.manifest is None:
                raise CheckpointError(f"{cfg.save}/llamapro.json: missing (cannot rebuild the model to resume)")
        else:
            if not cfg.load:
                raise ConfigError(f"--save {cfg.save} holds no checkpoint to resume and no --load was given")
            with open_checkpoint(Path(cfg.load)) as source:
                self.manifest = source.manifest
        arch = self.manifest.arch
        try:
            arch.check_parallel(cfg.tp, cfg.pp, cfg.vpp)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.plan = trainable_plan(cfg, self.manifest, cfg.load or cfg.save)
        self.padded_vocab = arch.padded_vocab_size(cfg.tp, self.manifest.make_vocab_size_divisible_by)

        overrides = {}
        if cfg.fp8:
            overrides.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
        if cfg.recompute_granularity:
            overrides.update(recompute_granularity=cfg.recompute_granularity)
            if cfg.recompute_granularity == "full":
                overrides.update(recompute_method="uniform", recompute_num_layers=1)
        if cfg.deterministic:
            overrides.update(deterministic_mode=True)
        self.chunks = build_model(arch, ModelOptions(
            params_dtype=cfg.precision, padded_vocab_size=self.padded_vocab,
            sequence_parallel=cfg.sequence_parallel, max_sequence_length=max(cfg.seq_length, arch.max_position_embeddings),
            config_overrides=tuple(overrides.items())))
        counts = apply_trainable_plan(self.chunks, self.plan)

        if self.resume_iteration is None:
            self._load_weights()
        self.tokenizer_src = (tokenizer_dir(Path(cfg.save)) if self.resume_iteration is not None
                              else self._source_tokenizer_dir())

        self.model, self.optimizer, self.scheduler = build_ddp_optimizer_scheduler(self.chunks, cfg)

        self.state = ckpt.TrainerState(base_checkpoint=str(Path(cfg.load).absolute()) if cfg.load else None)
        if self.resume_iteration is not None:
            self.state = ckpt.load_training_checkpoint(
                Path(cfg.save), self.resume_iteration, self.chunks, self.optimizer, self.scheduler,
                self._load_weights)
            _log(f"resuming from iteration {self.state.iteration} of {cfg.save} "
                 f"({self.state.consumed_samples} samples consumed)")

        totals = torch.tensor([counts["trainable"], counts["frozen"]], dtype=torch.float64)
        torch.distributed.all_reduce(totals)  # every rank counted its own shard (DP replicas too)
        totals /= self.dp
        self.trainable_params, self.frozen_params = int(totals[0]), int(totals[1])
        _log(f"trainable: {self.plan.describe()} = {self.trainable_params:,} parameters; "
             f"frozen: {self.frozen_params:,}")
        self._setup_data()
        self.flops = FlopsModel(arch, cfg.seq_length, self.padded_vocab,
                                tuple(sorted(self.plan.layers)), output_layer_trainable=False,
                                all_trainable=self.plan.all)
        self.peak_tflops = cfg.peak_tflops or default_peak_tflops(cfg.precision, bool(cfg.fp8))
        last_stage_dp0 = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_data_parallel_rank() == 0
        self.logger_rank = last_stage_dp0
        self.metrics = MetricsLogger(cfg.metrics_path(), cfg.tensorboard_dir, last_stage_dp0,
                                     cfg.train_iters, self.state.iteration)

    def _source_tokenizer_dir(self):
        with open_checkpoint(Path(self.config.load)) as source:
            return source.tokenizer_dir()

    def _load_weights(self, delta_dir: Path | None = None) -> None:
        """Weights of the --load checkpoint (with a trainable-only delta on top) into the model."""
        cfg = self.config
        if not cfg.load:
            raise ConfigError("a trainable-only checkpoint needs --load (its base checkpoint)")
        if sniff_format(Path(cfg.load)) == "torch_dist" and delta_dir is None:
            self._load_dist_weights(Path(cfg.load))
            return
        with open_checkpoint(Path(cfg.load)) as base:
            source = base if delta_dir is None else ckpt.DeltaSource(base, delta_dir)
            load_source_into_model(self.chunks, source, self.padded_vocab)

    def _load_dist_weights(self, path: Path) -> None:
        """torch_dist loads natively at any TP/PP."""
        from megatron.core import dist_checkpointing

        from megatron_llamapro.checkpoint.dist import model_sharded_state_dict
        from megatron_llamapro.checkpoint.tracker import iteration_dir

        it_dir = iteration_dir(path) if (path / "latest_checkpointed_iteration.txt").is_file() else path
        sharded = model_sharded_state_dict(self.chunks)
        try:
            with torch.no_grad():
                loaded = dist_checkpointing.load(sharded, str(it_dir))
        except Exception as exc:  # megatron raises several kinds for damaged checkpoints
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise CheckpointError(f"{it_dir}: cannot load torch_dist checkpoint ({type(exc).__name__}: {first})") from None
        if len(self.chunks) == 1:
            self.chunks[0].load_state_dict(loaded, strict=False)
        else:
            for i, chunk in enumerate(self.chunks):
                chunk.load_state_dict(loaded[f"model{i}"], strict=False)

    def _setup_data(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_llamapro.data.blend import MicroBatchIterator, build_datasets
        from megatron_llamapro.data.tokenizer import build_tokenizer
        from megatron_llamapro.checkpoint.manifest import detect_tokenizer_type

        cfg = self.config
        tok_dir = self.tokenizer_src
        if tok_dir is None:
            raise ConfigError(f"--load {cfg.load}: the checkpoint carries no tokenizer files")
        kind = detect_tokenizer_type(tok_dir)
        tokenizer = build_tokenizer(kind, str(tok_dir / "tokenizer.model") if kind == "sentencepiece" else str(tok_dir))
        eval_runs = (cfg.train_iters // cfg.eval_interval + 1) if cfg.eval_interval else 1
        train, valid = build_datasets(
            cfg.data_path, cfg.split, cfg.valid_data or None, cfg.seq_length, cfg.seed,
            train_samples=cfg.train_iters * cfg.global_batch_size,
            eval_samples=max(1, eval_runs * cfg.eval_iters * cfg.global_batch_size),
            tokenizer=tokenizer, cache_dir=cfg.data_cache_dir)
        self.train_dataset, self.valid_datasets = train, valid
        self.dp_rank = ps.get_data_parallel_rank()
        self.train_iter = MicroBatchIterator(train, cfg.micro_batch_size, self.dp_rank, self.dp,
                                             consumed_samples=self.state.consumed_samples)

    # ---- steps ---------------------------------------------------------------------------
    def _loss_fn(self, batch, output):
        """Mean token loss of the micro-batch; returns (loss for backward, reporting dict)."""
        loss_mask = batch["loss_mask"].float()
        losses = output.float()
        total = (losses * loss_mask).sum()
        count = loss_mask.sum()
        loss = total / count.clamp(min=1)
        return loss, {"loss_sum": total.detach().clone(), "tokens": count.detach().clone()}

    def _forward_backward(self, batches, forward_only: bool):
        cfg = self.config

        def loss_fn(batch, output):
            return self._loss_fn(batch, output)

        # No backward below the lowest trainable layer: nothing beneath it requires grad, so autograd
        # stops there by itself. A model chunk lying wholly below it (e.g. a virtual chunk of the
        # first stage) then returns an output without grad, on which the pipeline schedule still
        # calls backward: mark it as a leaf that requires grad, a no-op for autograd.
        return run_schedule(self.model, batches, forward_only, loss_fn, cfg.seq_length,
                            cfg.micro_batch_size, output_hook=None if forward_only else _require_grad)

    def _reduce_loss(self, results) -> float | None:
        """Mean loss over the global batch, on last-stage ranks (None elsewhere)."""
        from megatron.core import parallel_state as ps

        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        total = torch.zeros(2, dtype=torch.float64)
        for r in results:
            total[0] += float(r["loss_sum"])
            total[1] += float(r["tokens"])
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def train_step(self):
        batches = [next(self.train_iter) for _ in range(self.num_micro)]
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = self._forward_backward(batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.config.global_batch_size)
        return self._reduce_loss(results), grad_norm, ok

    def evaluate(self) -> dict[str, float]:
        from megatron_llamapro.data.blend import MicroBatchIterator

        cfg = self.config
        out = {}
        for chunk in self.model:
            chunk.eval()
        for name, dataset in self.valid_datasets.items():
            iterator = MicroBatchIterator(dataset, cfg.micro_batch_size, self.dp_rank, self.dp)
            sums = torch.zeros(2, dtype=torch.float64)
            for _ in range(cfg.eval_iters):
                if len(iterator) < self.num_micro:
                    break
                batches = [next(iterator) for _ in range(self.num_micro)]
                with torch.no_grad():
                    results = self._forward_backward(batches, forward_only=True)
                for r in results:
                    sums[0] += float(r["loss_sum"])
                    sums[1] += float(r["tokens"])
            from megatron.core import parallel_state as ps

            if ps.is_pipeline_last_stage(ignore_virtual=True):
                torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
                out[name] = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
        for chunk in self.model:
            chunk.train()
        return out

    # ---- loop ----------------------------------------------------------------------------
    def save(self, iteration: int) -> None:
        cfg = self.config
        self.state.iteration = iteration
        self.state.consumed_samples = self.train_iter.consumed_samples
        path = ckpt.save_checkpoint(Path(cfg.save), iteration, self.chunks, self.optimizer, self.scheduler,
                                    self.state, self.manifest, self.tokenizer_src, cfg.keep_last,
                                    cfg.save_trainable_only, cfg.save_format)
        _log(f"saved checkpoint {path}")

    def run(self) -> int:
        cfg = self.config
        iteration = self.state.iteration
        world = torch.distributed.get_world_size()
        tokens_per_step = cfg.global_batch_size * cfg.seq_length
        flops_per_step = self.flops.per_token()["total"] * tokens_per_step
        last_saved = iteration
        exit_code = 0
        if iteration == 0 and cfg.eval_interval and self.valid_datasets:
            self._log_eval(0)
        while iteration < cfg.train_iters:
            start = time.perf_counter()
            loss, grad_norm, ok = self.train_step()
            elapsed = time.perf_counter() - start
            iteration += 1
            self.metrics.advance()
            if iteration % cfg.log_interval == 0 and self.logger_rank:
                tflops = flops_per_step / elapsed / world / 1e12
                record = {
                    "iteration": iteration, "loss": loss, "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped": not ok,
                    "step_time_s": elapsed, "tokens_per_s": tokens_per_step / elapsed,
                    "tokens_per_s_per_gpu": tokens_per_step / elapsed / world,
                    "tflops_per_gpu": tflops,
                    "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                    "consumed_samples": self.train_iter.consumed_samples,
                    "peak_mem_gb": (torch.cuda.max_memory_allocated() / 1e9) if torch.cuda.is_available() else None,
                }
                self.metrics.log(record, (
                    f"iter {iteration}/{cfg.train_iters} loss {loss:.4f} lr {record['lr']:.3e} "
                    f"grad_norm {record['grad_norm'] or 0:.3f} {record['tokens_per_s_per_gpu']:.0f} tok/s/gpu "
                    f"{tflops:.1f} TFLOP/s/gpu" + (f" MFU {record['mfu']:.1%}" if record["mfu"] else "")))
            if cfg.eval_interval and iteration % cfg.eval_interval == 0 and self.valid_datasets:
                self._log_eval(iteration)
            stop = self.signals.any_rank()
            if cfg.exit_duration_in_mins is not None:
                over = torch.tensor([1 if (time.time() - self.start_time) / 60 > cfg.exit_duration_in_mins else 0])
                torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
                stop = stop or bool(over.item())
            if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
                self.save(iteration)
                last_saved = iteration
            if stop or (cfg.exit_interval and iteration % cfg.exit_interval == 0):
                if cfg.save and last_saved != iteration:
                    self.save(iteration)
                    last_saved = iteration
                reason = "signal" if self.signals.received or stop else "exit interval"
                _log(f"stopping at iteration {iteration} ({reason}); exit code {PREEMPTION_EXIT_CODE}")
                exit_code = PREEMPTION_EXIT_CODE
                break
        if exit_code == 0 and cfg.save and not cfg.no_save_on_exit and last_saved != iteration:
            self.save(iteration)
        self.metrics.close()
        return exit_code

    def _log_eval(self, iteration: int) -> None:
        results = self.evaluate()
        if self.logger_rank and results:
            record = {"iteration": iteration, **{f"valid_loss/{k}": v for k, v in results.items()}}
            self.metrics.log(record, f"eval iter {iteration}: " + ", ".join(
                f"{k} {v:.4f} (ppl {math.exp(min(v, 50)):.2f})" for k, v in results.items()))


def _require_grad(output: torch.Tensor) -> torch.Tensor:
    if not output.requires_grad:
        output.requires_grad_(True)
    return output
