"""Run a function on N local gloo processes with a hard timeout; used by tests and CPU tools.

Each rank gets torchrun-style environment variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT), a
private TMPDIR under the scratch directory, and returns its result to the caller. When one rank
fails, the others (likely blocked in a collective) are killed and the failing rank's traceback is
raised; when the deadline passes, every rank is killed and the ranks still running are named.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from megatron_llamapro.runtime.distributed import free_port


class RankFailure(RuntimeError):
    pass


def _child(module: str, qualname: str, rank: int, world: int, port: int, tmpdir: str,
           sys_path: list[str], extra_env: dict, args: tuple, kwargs: dict, results) -> None:
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TMPDIR": tmpdir, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    })
    os.environ.update(extra_env)
    tempfile.tempdir = tmpdir
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    try:
        fn = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        value = fn(*args, **kwargs)
        # Plain pickle bytes: torch's queue reducers would share memory with a process about to exit.
        try:
            payload = pickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as the rank's failure
            raise RankFailure(f"rank {rank} returned an unpicklable result: {exc}") from exc
        results.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - any failure, including SystemExit, goes to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit; the result is already reported
            pass


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300,
                    scratch: str | os.PathLike | None = None, env: dict | None = None,
                    **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` spawned processes; returns results by rank."""
    module, qualname = fn.__module__, fn.__qualname__
    if module == "__main__":
        raise ValueError("run_distributed needs a function importable by module name, not __main__")
    scratch_dir = Path(scratch or tempfile.mkdtemp(prefix="llamapro-mp-"))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = []
    for rank in range(world_size):
        tmpdir = scratch_dir / f"tmp-rank{rank}"
        tmpdir.mkdir(parents=True, exist_ok=True)
        proc = ctx.Process(
            target=_child,
            args=(module, qualname, rank, world_size, port, str(tmpdir), list(sys.path),
                  dict(env or {}), args, kwargs, results),
            daemon=True,
        )
        proc.start()
        procs.append(proc)

    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pending = sorted(set(range(world_size)) - set(outputs))
                raise RankFailure(f"timeout after {timeout:.0f}s; ranks still running: {pending}")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in outputs and p.exitcode is not None]
                if dead:
                    # Give a dying rank's queued message a moment to arrive.
                    try:
                        rank, ok, value = results.get(timeout=2.0)
                    except queue.Empty:
                        raise RankFailure(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                            "without reporting (killed or crashed in native code)") from None
                else:
                    continue
            if not ok:
                raise RankFailure(f"rank {rank} failed:\n{value}")
            outputs[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=10)
    return [outputs[r] for r in range(world_size)]
