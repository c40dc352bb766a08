"""Workarounds for resuming megatron-core's (distributed) optimizer with frozen layers.

Seen on megatron-core 0.16.1 (see docs/PLATFORM.md): the Adam state must exist before the
distributed optimizer builds its load plan, and the restored step lives in the param groups while
torch's Adam reads it from each parameter's state.
"""

from __future__ import annotations

import torch

# the only distributed-optimizer checkpoint format that resumes with frozen layers
OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def _torch_optimizers(optimizer):
    """The torch optimizers inside a (chained) megatron optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield inner


def prime_optimizer_state(optimizer) -> None:
    """Adam state tensors must exist before the distributed optimizer builds its load plan."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                st = inner.state[param]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(param.data, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(param.data, dtype=torch.float32)
                    st["step"] = torch.zeros((), dtype=torch.float32)


def drop_param_steps(optimizer) -> None:
    """distrib_optim.pt holds param, exp_avg and exp_avg_sq; torch's Adam also keeps a per-parameter
    step, which megatron would try to fill from the file: drop it before loading and restore it
    from the param groups afterwards (copy_step_into_param_state)."""
    for inner in _torch_optimizers(optimizer):
        for param_state in inner.state.values():
            param_state.pop("step", None)


def copy_step_into_param_state(optimizer) -> None:
    """The restored step lives in the param group; Adam reads it per parameter state."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            step = group.get("step")
            if step is None:
                continue
            for param in group["params"]:
                if param in inner.state:
                    inner.state[param]["step"] = torch.tensor(float(step), dtype=torch.float32)
