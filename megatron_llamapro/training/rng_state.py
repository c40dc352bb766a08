"""Random-number state saved with training checkpoints, so a resumed run draws what it would have."""

from __future__ import annotations

import torch

from megatron_llamapro.training.parallel import model_parallel_ranks


def capture() -> dict:
    """torch's CPU generator and megatron-core's tracked (model-parallel) generators."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def sharded() -> object:
    """This rank's RNG state (CUDA's too when present) as a torch_dist object, one per TP x PP rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    tp, pp, dp = model_parallel_ranks()
    state = capture()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state,
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (pp, tp), replica_id=dp)


def restore(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
