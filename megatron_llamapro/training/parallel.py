"""Where this process sits in the job, for code that runs on every rank."""

from __future__ import annotations

import torch



def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce(tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM, group=None) -> torch.Tensor:
    """torch.distributed.all_reduce on the backend's device (NCCL reduces CUDA tensors only); the
    result comes back on the CPU."""
    from megatron_llamapro.runtime.distributed import device

    on_device = tensor.to(device())
    torch.distributed.all_reduce(on_device, op=op, group=group)
    return on_device.cpu()


def any_rank_failed(failed: bool) -> bool:
    """Collective: whether this or any other rank failed (a flag all-reduced with MAX), so that
    every rank takes the same way out instead of some waiting forever in the next collective."""
    if not torch.distributed.is_initialized():
        return failed
    return bool(all_reduce(torch.tensor([int(failed)], dtype=torch.int32), op=torch.distributed.ReduceOp.MAX).item())


def gather_objects(value) -> list:
    """Collective: every rank's `value`, by rank (just this one's without a process group)."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def model_parallel_ranks() -> tuple[int, int, int]:
    """(tensor-parallel rank, pipeline stage, data-parallel rank) of this process."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True))


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model chunk inside its DDP wrapper."""
    return chunk.module if hasattr(chunk, "module") else chunk
