"""Run megatron-core 0.16.1 on a CPU-only torch (gloo), for tests and the CPU quickstart.

megatron-core assumes CUDA in about 25 places: `torch.cuda.current_device()` as a device,
literal `device="cuda"` in tensor factories, `.cuda()` / `.to("cuda")`, `Tensor.type()` string checks
against `torch.cuda.*Tensor`, and the CUDA RNG tracker. This module bridges those process-wide by
redirecting "cuda" to the CPU. It must never run where a GPU is usable: `apply_cpu_compat()` refuses
to, and `should_apply()` is the single decision used by the runtime.

Nothing here changes numerics: every redirected call does what it would have done, on the CPU.
"""

from __future__ import annotations

import functools
import threading

import torch

_applied = False
_lock = threading.Lock()

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "eye", "linspace",
)

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def cuda_usable() -> bool:
    """True when torch can use at least one CUDA device."""
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except (AssertionError, RuntimeError):
        return False


def should_apply(force_cpu: bool = False) -> bool:
    """The one decision: bridge megatron-core to the CPU only when no CUDA device is usable.

    `force_cpu` lets a caller ask for CPU even on a GPU machine; that is refused too, because the
    patches are process-wide and would silently move GPU code to the CPU.
    """
    if cuda_usable():
        if force_cpu:
            raise RuntimeError(
                "cpu_compat: refusing to patch torch.cuda on a machine with a usable GPU "
                "(the patches are process-wide); hide the GPUs with CUDA_VISIBLE_DEVICES= instead"
            )
        return False
    return True


def is_applied() -> bool:
    return _applied


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # An int device index means a CUDA ordinal in torch's API.
    return isinstance(device, int) and not isinstance(device, bool)


def _to_cpu_device(device):
    return torch.device("cpu") if _is_cuda(device) else device


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    wrapper.__llamapro_wrapped__ = fn
    return wrapper


def _patched_tensor_to(original):
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = (torch.device("cpu"),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return original(self, *args, **kwargs)

    return to


def _patched_tensor_type(original):
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            dtype = args[0] if args else kwargs.get("dtype")
            if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
                return original(self, dtype.replace("torch.cuda.", "torch."), *args[1:])
            return original(self, *args, **kwargs)
        name = original(self)
        # megatron-core's optimizers assert parameters are CUDA tensors by type name.
        return _CUDA_TYPE_NAMES.get(name, name)

    return type_


class _CpuGeneratorState:
    """torch.cuda RNG API served by the CPU default generator."""

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device=None):
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which must stay a no-op.
        torch.default_generator.manual_seed(int(seed))


def apply_cpu_compat(force: bool = False) -> None:
    """Bridge megatron-core's CUDA assumptions to the CPU. Idempotent.

    Raises when a CUDA device is usable (unless force=True, meant only for unit tests that check
    the decision on GPU machines never reaches here).
    """
    global _applied
    with _lock:
        if _applied:
            return
        if cuda_usable() and not force:
            raise RuntimeError("cpu_compat: a CUDA device is usable; megatron-core runs natively on it")

        # torch caches its set of factory functions for `with torch.device(...)` on first use; fill
        # it with the originals first, or device contexts (transformers' meta-device init) break.
        import torch.utils._device

        torch.utils._device._device_constructors()
        for name in _FACTORIES:
            setattr(torch, name, _wrap_factory(getattr(torch, name)))
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.Tensor.to = _patched_tensor_to(torch.Tensor.to)
        torch.Tensor.type = _patched_tensor_type(torch.Tensor.type)

        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.get_rng_state = _CpuGeneratorState.get_rng_state
        torch.cuda.set_rng_state = _CpuGeneratorState.set_rng_state
        torch.cuda.manual_seed = _CpuGeneratorState.manual_seed
        torch.cuda.random.get_rng_state = _CpuGeneratorState.get_rng_state

        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._get_cuda_rng_state = (
            lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
        )
        mcore_random._set_cuda_rng_state = (
            lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
        )
        _applied = True
