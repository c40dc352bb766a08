"""Allocation preflight: does the job's task count fit the parallel layout and the batch sizes?

Run by slurm/pretrain_expand.sh before `srun` (and by its `--check` on the login node), so a wrong
allocation fails in a second with one line instead of after every rank has loaded the model.
Standard library only (no torch import).

    python -m megatron_llamapro.runtime.preflight --world-size 16 --tp 2 --pp 2 \
        --global-batch-size 1024 --micro-batch-size 1 [--tasks-per-node 8 --gpus-per-node 8]
prints `preflight: ok: ...` and exits 0, or `preflight: error: ...` and exits 2.
"""

from __future__ import annotations

import argparse

from megatron_llamapro.errors import UserError, entry_point, run


class PreflightError(UserError):
    """One-line explanation of why the allocation cannot run the requested layout."""


def check_allocation(world_size: int, tp: int, pp: int, global_batch_size: int, micro_batch_size: int,
                     *, tasks_per_node: int | None = None, gpus_per_node: int | None = None) -> int:
    """Return the data-parallel size for `world_size` tasks split into TP x PP model replicas.

    Rules: world_size must be a multiple of TP x PP (DP = world_size / (TP x PP)), and the global
    batch must be a multiple of DP x MBS (each step accumulates GBS / (DP x MBS) micro-batches).
    When both per-node counts are given and the nodes have GPUs, a node needs a GPU per task (the
    job script runs one task per GPU; two ranks on one GPU fail in NCCL).
    """
    for name, value in (("world size", world_size), ("TP", tp), ("PP", pp),
                        ("global batch size", global_batch_size), ("micro batch size", micro_batch_size)):
        if value < 1:
            raise PreflightError(f"{name} must be a positive integer, got {value}")
    if tasks_per_node is not None and gpus_per_node and tasks_per_node > gpus_per_node:
        raise PreflightError(
            f"{tasks_per_node} tasks per node but {gpus_per_node} GPU(s) per node: each task needs a GPU of "
            "its own (make --ntasks-per-node at most --gpus-per-node, or --gpus-per-node=0 for CPU tasks)")
    if world_size % (tp * pp):
        raise PreflightError(
            f"allocation of {world_size} tasks (nodes x tasks-per-node) is not a multiple of "
            f"TP x PP = {tp} x {pp} = {tp * pp}")
    dp = world_size // (tp * pp)
    if global_batch_size % (dp * micro_batch_size):
        raise PreflightError(
            f"global batch size {global_batch_size} is not a multiple of DP x MBS = {dp} x {micro_batch_size} "
            f"= {dp * micro_batch_size} (DP = {world_size} tasks / (TP x PP = {tp} x {pp}))")
    return dp


@entry_point(prog="preflight")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, required=True, help="tasks in the allocation")
    parser.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    parser.add_argument("--global-batch-size", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, required=True)
    parser.add_argument("--tasks-per-node", type=int, help="tasks on each node (with --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs on each node; 0: CPU tasks")
    args = parser.parse_args(argv)
    dp = check_allocation(args.world_size, args.tp, args.pp, args.global_batch_size, args.micro_batch_size,
                          tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node)
    accum = args.global_batch_size // (dp * args.micro_batch_size)
    print(f"preflight: ok: {args.world_size} tasks = TP {args.tp} x PP {args.pp} x DP {dp}; "
          f"{accum} micro-batch(es) of {args.micro_batch_size} per step per DP rank", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
