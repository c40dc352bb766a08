"""One training step (and the forward-only pass evaluation uses), shared by the trainer and the
benchmark, and the model options both build with."""

from __future__ import annotations

import torch

from megatron_llamapro.arch import LlamaArch
from megatron_llamapro.model import ModelOptions
from megatron_llamapro.pipeline import run_schedule
from megatron_llamapro.training.parallel import all_reduce


def training_model_options(arch: LlamaArch, padded_vocab_size: int, precision: str, seq_length: int,
                           sequence_parallel: bool = False, fp8: str | None = None,
                           fp8_recipe: str = "delayed", recompute_granularity: str | None = None,
                           deterministic: bool = False, sft: bool = False) -> ModelOptions:
    overrides = {}
    if sft:
        # the loss is the mean over the global batch's target tokens (finalize_model_grads divides
        # by their count), and packed batches carry their own mask, which the fused causal softmax
        # kernel would ignore
        overrides.update(calculate_per_token_loss=True, masked_softmax_fusion=False)
    if fp8:
        overrides.update(fp8=fp8, fp8_recipe=fp8_recipe)
    if recompute_granularity:
        overrides.update(recompute_granularity=recompute_granularity)
        if recompute_granularity == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    if deterministic:
        overrides.update(deterministic_mode=True)
    return ModelOptions(params_dtype=precision, padded_vocab_size=padded_vocab_size,
                        sequence_parallel=sequence_parallel,
                        max_sequence_length=max(seq_length, arch.max_position_embeddings),
                        config_overrides=tuple(overrides.items()))


def _loss_sums(batch, output):
    losses = output.float()
    loss_mask = batch["loss_mask"].float().reshape(losses.shape)  # packed (thd) output is one row
    return (losses * loss_mask).sum(), loss_mask.sum()


def _masked_mean_loss(batch, output):
    """Mean token loss of the micro-batch; returns (loss for backward, reporting dict)."""
    total, count = _loss_sums(batch, output)
    loss = total / count.clamp(min=1)
    return loss, {"loss_sum": total.detach().clone(), "tokens": count.detach().clone()}


def _token_sum_loss(batch, output):
    """Summed token loss and its token count: megatron-core divides the gradients by the global
    batch's count (calculate_per_token_loss), so every target token weighs the same however the
    tokens fall into micro-batches and data-parallel ranks."""
    total, count = _loss_sums(batch, output)
    return total, count.detach().to(torch.int), {"loss_sum": total.detach().clone(), "tokens": count.detach().clone()}


def _require_grad(output: torch.Tensor) -> torch.Tensor:
    if not output.requires_grad:
        output.requires_grad_(True)
    return output


def add_loss_sums(total: torch.Tensor, results) -> torch.Tensor:
    """Add this rank's micro-batch results into total = [loss sum, token count] (float64)."""
    for r in results:
        total[0] += float(r["loss_sum"])
        total[1] += float(r["tokens"])
    return total


def sum_over_data_parallel(sums: torch.Tensor) -> torch.Tensor:
    """[loss sum, token count] summed over the data-parallel ranks (collective over them)."""
    from megatron.core import parallel_state as ps

    return all_reduce(sums, group=ps.get_data_parallel_group())


def mean_over_data_parallel(sums: torch.Tensor) -> float:
    """Token-weighted mean loss over the data-parallel ranks (collective over them)."""
    sums = sum_over_data_parallel(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


class TrainStep:
    """zero grads -> forward/backward over the micro-batches (pipeline schedule) -> optimizer and
    LR-scheduler step; returns (mean loss over the global batch on last-stage ranks, else None,
    grad norm, whether the optimizer stepped)."""

    def __init__(self, model, optimizer, scheduler, seq_length: int, micro_batch_size: int,
                 samples_per_step: int, per_token_loss: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.samples_per_step = samples_per_step
        self.loss_fn = _token_sum_loss if per_token_loss else _masked_mean_loss
        self.last_loss_tokens: int | None = None

    def __call__(self, batches: list[dict]):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = self.forward_backward(batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.samples_per_step)
        return self._reduce_loss(results), grad_norm, ok

    def forward_backward(self, batches: list[dict], forward_only: bool):
        # No backward below the lowest trainable layer: nothing beneath it requires grad, so autograd
        # stops there by itself. A model chunk lying wholly below it (e.g. a virtual chunk of the
        # first stage) then returns an output without grad, on which the pipeline schedule still
        # calls backward: mark it as a leaf that requires grad, a no-op for autograd.
        return run_schedule(self.model, batches, forward_only, self.loss_fn, self.seq_length,
                            self.micro_batch_size, output_hook=None if forward_only else _require_grad)

    def _reduce_loss(self, results) -> float | None:
        from megatron.core import parallel_state as ps

        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        sums = sum_over_data_parallel(add_loss_sums(torch.zeros(2, dtype=torch.float64), results))
        self.last_loss_tokens = int(sums[1])  # the tokens the loss was taken over (SFT: answer tokens)
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
