"""Validation: when it runs (`should_validate`) and the mean token loss on each named set."""

from __future__ import annotations

import torch

from megatron_llamapro.training.step import TrainStep, add_loss_sums, mean_over_data_parallel


def validation_coverage(datasets: dict, eval_iters: int, global_batch_size: int) -> list[str]:
    """The lines the trainer logs at start: a warning per set with fewer distinct samples than
    an evaluation reads (it reads the same first eval_iters x global_batch_size samples each
    time), then one line with how many distinct samples each evaluation covers per set."""
    from megatron_llamapro.data.blend import distinct_samples

    if not datasets:
        return []
    reads = eval_iters * global_batch_size
    flags = f"--eval-iters {eval_iters} x --global-batch-size {global_batch_size}"
    distinct = {name: distinct_samples(dataset) for name, dataset in datasets.items()}
    lines = [f"warning: validation set '{name}' has {count} distinct samples; an evaluation reads {reads} "
             f"({flags}): samples are repeated" for name, count in distinct.items() if count < reads]
    covered = ", ".join(f"'{name}' {min(count, reads)}" for name, count in distinct.items())
    lines.append(f"validation: each evaluation reads the same {reads} samples of each set ({flags}); "
                 f"distinct samples covered: {covered}")
    return lines


class Evaluator:
    def __init__(self, step: TrainStep, datasets: dict, interval: int | None, eval_iters: int,
                 micro_batch_size: int, num_microbatches: int, dp_rank: int, dp: int):
        self.step, self.datasets = step, datasets
        self.interval, self.eval_iters = interval, eval_iters
        self.micro_batch_size, self.num_microbatches = micro_batch_size, num_microbatches
        self.dp_rank, self.dp = dp_rank, dp

    def should_validate(self, step: int) -> bool:
        return bool(self.interval) and bool(self.datasets) and step % self.interval == 0

    def evaluate(self) -> dict[str, float]:
        """name -> mean token loss over up to eval_iters global batches (on last-stage ranks)."""
        from megatron.core import parallel_state as ps

        from megatron_llamapro.data.blend import MicroBatchIterator

        out = {}
        for chunk in self.step.model:
            chunk.eval()
        for name, dataset in self.datasets.items():
            iterator = MicroBatchIterator(dataset, self.micro_batch_size, self.dp_rank, self.dp)
            sums = torch.zeros(2, dtype=torch.float64)
            for _ in range(self.eval_iters):
                if len(iterator) < self.num_microbatches:
                    break
                batches = [next(iterator) for _ in range(self.num_microbatches)]
                with torch.no_grad():
                    add_loss_sums(sums, self.step.forward_backward(batches, forward_only=True))
            if ps.is_pipeline_last_stage(ignore_virtual=True):
                out[name] = mean_over_data_parallel(sums)
        for chunk in self.step.model:
            chunk.train()
        return out
