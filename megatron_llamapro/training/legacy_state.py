"""Training state in Megatron-LM's legacy layout (--save-format torch):
iter_N/mp_rank_XX[_YYY]/model_optim_rng.pt per model-parallel rank (TE-spec keys, as
checkpoint/legacy.py writes) plus the distributed optimizer's state gathered on data-parallel rank 0
into distrib_optim.pt. Resumable at the same TP/PP (any DP)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.layout import Layout, chunk_key
from megatron_llamapro.checkpoint.manifest import Manifest
from megatron_llamapro.checkpoint.source import CheckpointError
from megatron_llamapro.checkpoint.tracker import mp_rank_dir
from megatron_llamapro.training import rng_state, signals
from megatron_llamapro.training.optimizer_state import copy_step_into_param_state, drop_param_steps
from megatron_llamapro.training.parallel import barrier, model_parallel_ranks, unwrap

LEGACY_OPTIM_FILE = "distrib_optim.pt"


def _rank_dir(it_dir: Path) -> Path:
    tp, pp, _ = model_parallel_ranks()
    return Path(it_dir) / mp_rank_dir(tp, pp, Layout.from_parallel_state().pp)


def save_legacy(it_dir: Path, iteration: int, chunks, optimizer, scheduler, manifest: Manifest) -> None:
    """Collective over data-parallel ranks; data-parallel rank 0 writes its model-parallel rank's file."""
    with signals.deferred():
        _write_rank_files(it_dir, iteration, chunks, optimizer, scheduler, manifest)


def _write_rank_files(it_dir: Path, iteration: int, chunks, optimizer, scheduler, manifest: Manifest) -> None:
    from megatron_llamapro.checkpoint.legacy import CHECKPOINT_VERSION, FILE_NAME, megatron_args, te_state_dict_entries

    _, _, dp = model_parallel_ranks()
    rank_dir = _rank_dir(it_dir)
    if dp == 0:
        rank_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if hasattr(optimizer, "save_parameter_state"):
        optimizer.save_parameter_state(str(rank_dir / LEGACY_OPTIM_FILE))  # collective over DP
    if dp != 0:
        return
    payload = {}
    for i, chunk in enumerate(chunks):
        state = {weight_map.te_spec_name(k): v for k, v in unwrap(chunk).state_dict().items()}
        for key in te_state_dict_entries(list(state)):
            state.setdefault(key, None)
        payload[chunk_key(i, None if len(chunks) == 1 else len(chunks))] = state
    layout = Layout.from_parallel_state()
    payload.update({
        "optimizer": optimizer.state_dict(), "opt_param_scheduler": scheduler.state_dict(),
        "rng_state": rng_state.capture(),
        "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
        "args": megatron_args(manifest.replace(layout=layout, format="torch"), iteration),
    })
    torch.save(payload, rank_dir / FILE_NAME)


def load_legacy(it_dir: Path, chunks, optimizer, scheduler) -> None:
    from megatron_llamapro.checkpoint.legacy import FILE_NAME, copy_stored_tensors

    rank_file = _rank_dir(it_dir) / FILE_NAME
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing (legacy training checkpoints resume only at the TP/PP "
                              "they were saved with; save torch_dist to change the layout)")
    try:
        payload = torch.load(rank_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # damaged zip archives raise several kinds
        raise CheckpointError(f"{rank_file}: unreadable checkpoint file ({type(exc).__name__})") from None
    args, layout = payload["args"], Layout.from_parallel_state()
    saved = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
             args.virtual_pipeline_model_parallel_size)
    if saved != (layout.tp, layout.pp, layout.vpp):
        raise CheckpointError(f"{rank_file}: saved with TP={saved[0]} PP={saved[1]} VPP={saved[2]}, resuming with "
                              f"{layout.describe()}; legacy training checkpoints resume only at the same layout")
    for i, chunk in enumerate(chunks):
        state = payload[chunk_key(i, None if len(chunks) == 1 else len(chunks))]
        copy_stored_tensors(unwrap(chunk), state.items(), str(rank_file))
    with torch.no_grad():
        optimizer.load_state_dict(payload["optimizer"])
        if hasattr(optimizer, "load_parameter_state"):
            drop_param_steps(optimizer)
            optimizer.load_parameter_state(str(rank_file.parent / LEGACY_OPTIM_FILE))
    copy_step_into_param_state(optimizer)
    scheduler.load_state_dict(payload["opt_param_scheduler"])
    rng_state.restore(payload["rng_state"])
