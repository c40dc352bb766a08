"""Process start: torch.distributed and megatron-core parallel state from the launch environment.

Launchers understood, in order of precedence:
  torchrun        RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  MPI (mpi4py)    OMPI_COMM_WORLD_* / PMIX_RANK / PMI_RANK: `srun --mpi=pmix` or `mpirun`; ranks come
                  from MPI.COMM_WORLD, the rendezvous address is broadcast from rank 0
  SLURM (srun)    SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; MASTER_ADDR from the first allocated host
  single process  rank 0 of 1
Backend: nccl when a CUDA device is usable, gloo (with the CPU compatibility layer) otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch

from megatron_llamapro.errors import UserError
from megatron_llamapro.runtime import cpu_compat


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # 'torchrun' | 'mpi' | 'slurm' | 'single'


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout.split()
        return out[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # A plain single-host nodelist needs no scontrol.
        return nodelist.split(",")[0]


def _slurm_default_port() -> int:
    job_id = _int_env("SLURM_JOB_ID") or 0
    return 10000 + job_id % 50000


def _under_mpi() -> bool:
    return any(os.environ.get(k) for k in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"))


def _mpi_env() -> LaunchEnv:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            "launched under MPI (OMPI_COMM_WORLD_*/PMIX_RANK set) but mpi4py is missing: "
            "pip install 'megatron-llamapro[mpi]'"
        ) from exc
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    addr = os.environ.get("MASTER_ADDR")
    port = _int_env("MASTER_PORT")
    if addr is None or port is None:
        guess = (socket.gethostname(), _slurm_default_port() if "SLURM_JOB_ID" in os.environ else 29500)
        addr_b, port_b = comm.bcast(guess if rank == 0 else None, root=0)
        addr, port = addr or addr_b, port or port_b
    return LaunchEnv(rank, local_rank, world, addr, int(port), "mpi")


def detect_launch_env() -> LaunchEnv:
    """Ranks and rendezvous address from whichever launcher started this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return LaunchEnv(
            rank=int(os.environ["RANK"]),
            local_rank=_int_env("LOCAL_RANK") or 0,
            world_size=int(os.environ["WORLD_SIZE"]),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env("MASTER_PORT") or 29500,
            source="torchrun",
        )
    if _under_mpi():
        return _mpi_env()
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return LaunchEnv(
            rank=int(os.environ["SLURM_PROCID"]),
            local_rank=_int_env("SLURM_LOCALID") or 0,
            world_size=int(os.environ["SLURM_NTASKS"]),
            master_addr=os.environ.get("MASTER_ADDR") or _first_slurm_host(),
            master_port=_int_env("MASTER_PORT") or _slurm_default_port(),
            source="slurm",
        )
    return LaunchEnv(0, 0, 1, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                     _int_env("MASTER_PORT") or free_port(), "single")


@contextlib.contextmanager
def environment(**variables: str):
    """Set environment variables inside the block; restore (or remove) them afterwards."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None

    def data_parallel(self, world_size: int) -> int:
        if world_size % (self.tp * self.pp):
            raise UserError(
                f"world size {world_size} is not a multiple of TP x PP = {self.tp} x {self.pp}"
            )
        return world_size // (self.tp * self.pp)


def device() -> torch.device:
    if cpu_compat.is_applied() or not cpu_compat.cuda_usable():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(sizes: ParallelSizes, seed: int = 1234, timeout_minutes: int = 30) -> LaunchEnv:
    """Start torch.distributed and megatron-core's parallel state; returns the launch environment.

    On a machine without a usable GPU the CPU compatibility layer is applied first (gloo backend).
    """
    from megatron.core import parallel_state, tensor_parallel

    env = detect_launch_env()
    sizes.data_parallel(env.world_size)
    on_gpu = cpu_compat.cuda_usable()
    if on_gpu:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_compat.apply_cpu_compat()

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=sizes.tp,
            pipeline_model_parallel_size=sizes.pp,
            virtual_pipeline_model_parallel_size=sizes.vpp,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class single_process_megatron:
    """A world of one (TP=PP=1) for tools that need megatron-core outside a launched job.

    Does nothing if torch.distributed is already initialized by the caller.
    """

    def __enter__(self):
        self.owner = not torch.distributed.is_initialized()
        if self.owner:
            with environment(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(free_port())):
                init_distributed(ParallelSizes(1, 1))
        return self

    def __exit__(self, *exc):
        if self.owner:
            destroy_distributed()
