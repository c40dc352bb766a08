"""DDP wrapping, the (distributed) optimizer and the LR schedule for a built, frozen model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_llamapro.errors import UserError
from megatron_llamapro.training.config import TrainConfig


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam, gradient clipping and the LR schedule (defaults: the LLaMA Pro recipe)."""

    train_iters: int
    samples_per_step: int  # the global batch: the scheduler counts samples
    precision: str = "bf16"  # bf16 | fp16 | fp32
    use_distributed_optimizer: bool = True
    lr: float = 2e-4
    min_lr: float = 2e-5
    lr_decay_style: str = "cosine"
    warmup_iters: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    decay_iters: int | None = None  # the schedule's length (--lr-decay-iters); None: train_iters
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # memory options (issue 16): a bf16 gradient buffer; megatron-core's precision-aware optimizer
    # (TE FusedAdam) with Adam's moments kept in adam_states_dtype
    grad_reduce_in_fp32: bool = True
    precision_aware_optimizer: bool = False
    adam_states_dtype: str = "fp32"  # fp32 | bf16; bf16 needs precision_aware_optimizer

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> "OptimizerSettings":
        return cls(train_iters=cfg.train_iters, samples_per_step=cfg.global_batch_size, precision=cfg.precision,
                   use_distributed_optimizer=cfg.use_distributed_optimizer, lr=cfg.lr, min_lr=cfg.min_lr,
                   lr_decay_style=cfg.lr_decay_style, warmup_iters=cfg.warmup_iters(),
                   weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
                   adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad, decay_iters=cfg.decay_iters(),
                   overlap_grad_reduce=cfg.overlap_grad_reduce, overlap_param_gather=cfg.overlap_param_gather,
                   grad_reduce_in_fp32=not cfg.bf16_grad_buffer,
                   precision_aware_optimizer=cfg.use_precision_aware_optimizer,
                   adam_states_dtype=cfg.adam_states_dtype)

    def adam_state_options(self) -> dict:
        """OptimizerConfig fields for the precision-aware optimizer (empty when it is off)."""
        if self.adam_states_dtype not in ("fp32", "bf16"):
            raise UserError(f"--adam-states-dtype {self.adam_states_dtype}: must be fp32 or bf16")
        if not self.precision_aware_optimizer:
            if self.adam_states_dtype != "fp32":
                raise UserError("--adam-states-dtype bf16 needs --use-precision-aware-optimizer")
            return {}
        if not self.use_distributed_optimizer:
            raise UserError("--use-precision-aware-optimizer needs the distributed optimizer "
                            "(drop --no-distributed-optimizer)")
        dtype = torch.bfloat16 if self.adam_states_dtype == "bf16" else torch.float32
        return {"use_precision_aware_optimizer": True, "exp_avg_dtype": dtype, "exp_avg_sq_dtype": dtype}


def build_ddp_optimizer_scheduler(chunks: list[torch.nn.Module], settings: OptimizerSettings):
    """(DDP-wrapped chunks, optimizer, scheduler).

    Only parameters with requires_grad get grad buffers and optimizer state; with the distributed
    optimizer those are sharded over data-parallel ranks. Weight decay skips norms (1-D tensors).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s = settings
    if s.overlap_param_gather and not s.use_distributed_optimizer:
        raise ValueError("overlap_param_gather needs the distributed optimizer")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=s.grad_reduce_in_fp32, overlap_grad_reduce=s.overlap_grad_reduce,
        overlap_param_gather=s.overlap_param_gather, use_distributed_optimizer=s.use_distributed_optimizer)
    tconfig = chunks[0].config
    model = [DistributedDataParallel(tconfig, ddp_config, chunk) for chunk in chunks]
    opt_config = OptimizerConfig(
        optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay,
        adam_beta1=s.adam_beta1, adam_beta2=s.adam_beta2, adam_eps=s.adam_eps,
        clip_grad=s.clip_grad, bf16=s.precision == "bf16", fp16=s.precision == "fp16",
        params_dtype=tconfig.params_dtype, use_distributed_optimizer=s.use_distributed_optimizer,
        **s.adam_state_options())
    optimizer = get_megatron_optimizer(opt_config, model)
    # What Megatron-LM's training loop wires into the schedule: without finalize_model_grads the
    # data-parallel gradient reduction never runs (each DP rank would step on its own micro-batches'
    # gradients), and without grad_scale_func fp16 loss scaling is skipped.
    from megatron.core.distributed import finalize_model_grads

    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in model]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    samples = s.samples_per_step
    decay_iters = s.decay_iters if s.decay_iters is not None else s.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr,
        lr_warmup_steps=s.warmup_iters * samples,
        lr_decay_steps=decay_iters * samples, lr_decay_style=s.lr_decay_style,
        start_wd=s.weight_decay, end_wd=s.weight_decay, wd_incr_steps=s.train_iters * samples,
        wd_incr_style="constant")
    return model, optimizer, scheduler


def finish_param_sync(model: list[torch.nn.Module]) -> None:
    """With --overlap-param-gather the updated weights reach each rank only in the next forward
    pass (a pre-hook all-gathers them); bring them in now, before a checkpoint reads them."""
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()
