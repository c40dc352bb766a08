"""Training state as torch_dist (megatron-core dist_checkpointing): model, distributed optimizer,
LR scheduler and RNG, loadable at any TP/PP/DP; with a trainable-only delta, the model part is
the delta's files (checkpoint/delta.py) instead."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from megatron_llamapro.checkpoint.delta import write_delta_file
from megatron_llamapro.checkpoint.dist import model_sharded_state_dict
from megatron_llamapro.checkpoint.layout import chunk_key
from megatron_llamapro.checkpoint.manifest import Manifest
from megatron_llamapro.checkpoint.source import CheckpointError
from megatron_llamapro.training import rng_state, signals
from megatron_llamapro.training.optimizer_state import (
    OPTIM_SHARDING,
    copy_step_into_param_state,
    prime_optimizer_state,
)
from megatron_llamapro.training.parallel import unwrap


def save_dist(it_dir: Path, chunks, optimizer, scheduler, manifest: Manifest, trainable_only: bool) -> None:
    """Collective: every rank writes its shards into it_dir."""
    from megatron.core import dist_checkpointing

    model_sd = model_sharded_state_dict(chunks)
    sharded = {"optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIM_SHARDING),
               "opt_param_scheduler": scheduler.state_dict(), "rng_state": rng_state.sharded()}
    if trainable_only:
        write_delta_file(it_dir, chunks, manifest)
    else:
        sharded["model"] = model_sd
    with signals.deferred(), _writer_errors_unlogged():
        dist_checkpointing.save(sharded, str(it_dir), validate_access_integrity=not trainable_only)


@contextlib.contextmanager
def _writer_errors_unlogged():
    """megatron-core logs a failed shard write ("Local process 0 encountered an error") before
    raising it; the raised error is reported once, by the checkpointer."""
    logger = logging.getLogger("megatron.core.dist_checkpointing")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _load(sharded: dict, it_dir: Path, what: str) -> dict:
    from megatron.core import dist_checkpointing

    try:
        with torch.no_grad():
            return dist_checkpointing.load(sharded, str(it_dir))
    except Exception as exc:  # megatron raises several kinds for damaged checkpoints
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{it_dir}: cannot load {what} ({type(exc).__name__}: {first})") from None


def _load_model_state(chunks, model_state: dict) -> None:
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(model_state, strict=False)
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(model_state[chunk_key(i, len(chunks))], strict=False)


def load_dist_weights(chunks, it_dir: Path) -> None:
    """Model weights of a torch_dist checkpoint folder, natively at the current TP/PP."""
    _load_model_state(chunks, _load(model_sharded_state_dict(chunks), it_dir, "torch_dist checkpoint"))


def load_dist(it_dir: Path, chunks, optimizer, scheduler, with_model: bool) -> None:
    """Collective: optimizer, scheduler and RNG (and the model unless its weights came from a delta)."""
    from megatron.core import dist_checkpointing

    model_sd = model_sharded_state_dict(chunks)
    prime_optimizer_state(optimizer)
    sharded = {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_SHARDING),
               "rng_state": rng_state.sharded()}
    if with_model:
        sharded["model"] = model_sd
    loaded = _load(sharded, it_dir, "checkpoint")
    if with_model:
        _load_model_state(chunks, loaded["model"])
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    copy_step_into_param_state(optimizer)
    common = dist_checkpointing.load_common_state_dict(str(it_dir))
    scheduler.load_state_dict(common["opt_param_scheduler"])
    rng_state.restore(loaded["rng_state"])
