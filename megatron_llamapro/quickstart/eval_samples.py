"""The samples the trainer evaluated, rebuilt with the trainer's data code so that transformers can
score the same tokens."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from megatron_llamapro.training.config import TrainConfig, load_config


def trainer_sample_counts(config: TrainConfig) -> tuple[int, int]:
    """(train samples, eval samples) the trainer asks its datasets for.

    A copy of the formula in `Trainer._setup_data` (megatron_llamapro/training/trainer.py): the
    validation sets' sample order depends on the count asked for, so it must match exactly.
    """
    eval_runs = (config.train_iters // config.eval_interval + 1) if config.eval_interval else 1
    return (config.train_iters * config.global_batch_size,
            max(1, eval_runs * config.eval_iters * config.global_batch_size))


@contextlib.contextmanager
def _working_directory(path: Path):
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def trainer_eval_samples(run_dir: Path, pretrain_args: list[str], tokenizer_model: str) -> dict:
    """{validation set: batch of tokens, labels, loss_mask}: the samples one evaluation of the
    `python -m megatron_llamapro.pretrain PRETRAIN_ARGS` run in ``run_dir`` used (data-parallel size 1)."""
    import torch

    from megatron_llamapro.data.blend import build_datasets
    from megatron_llamapro.data.tokenizer import build_tokenizer

    config = load_config(pretrain_args)
    train_samples, eval_samples = trainer_sample_counts(config)
    with _working_directory(run_dir):  # the trainer ran there, with these relative paths
        _, valid = build_datasets(
            config.data_path, config.split, config.valid_data or None, config.seq_length, config.seed,
            train_samples=train_samples, eval_samples=eval_samples,
            tokenizer=build_tokenizer("sentencepiece", tokenizer_model), cache_dir=config.data_cache_dir)
    batches = {}
    for name, dataset in valid.items():
        # Trainer.evaluate at data-parallel size 1: eval_iters global batches, in order from sample 0
        n = min(len(dataset), config.eval_iters * config.global_batch_size)
        n = n // config.global_batch_size * config.global_batch_size
        items = [dataset[i] for i in range(n)]
        batches[name] = {k: torch.stack([torch.as_tensor(it[k]) for it in items])
                         for k in ("tokens", "labels", "loss_mask")}
    return batches
