"""Validation: when it runs (`should_validate`) and the mean token loss on each named set."""

from __future__ import annotations

import torch

from megatron_llamapro.training.step import TrainStep, add_loss_sums, mean_over_data_parallel


class WholeBatches:
    """A validation set stretched to whole global batches: the positions past its end are copies of
    its first sample with an all-zero loss mask, so they add no token to the mean. A set smaller than
    one global batch is then still evaluated, exactly, on every distinct sample it has."""

    def __init__(self, dataset, global_batch: int) -> None:
        self.dataset = dataset
        self.length = -(-len(dataset) // global_batch) * global_batch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if index < len(self.dataset):
            return self.dataset[index]
        filler = dict(self.dataset[0])
        filler["loss_mask"] = filler["loss_mask"] * 0
        return filler


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
    # a set built once, in whole (instruction-tuning chat sets), is read up to its end, never repeated
    lines = [f"warning: validation set '{name}' has {count} distinct samples; an evaluation reads {reads} "
             f"({flags}): samples are repeated" for name, count in distinct.items()
             if count < reads and getattr(datasets[name], "repeats_samples", True)]
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
            whole = WholeBatches(dataset, self.micro_batch_size * self.dp * self.num_microbatches)
            iterator = MicroBatchIterator(whole, self.micro_batch_size, self.dp_rank, self.dp)
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
