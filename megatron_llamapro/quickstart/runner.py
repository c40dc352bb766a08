"""Runs the quickstart's steps: the package's entry points as subprocesses in the output directory
(each with its own log, timing and the command line a user would type), and in-process steps timed
the same way."""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import site
import subprocess
import sys
import time
from pathlib import Path

from megatron_llamapro.errors import UserError


class StepFailed(UserError):
    pass


def log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def module_command(module: str, *args) -> list[str]:
    """`python -m MODULE ARGS...` with this interpreter: the installed package's entry point."""
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def shown_command(cmd: list[str]) -> str:
    """The command line as a user types it in the output directory (`python` for this interpreter)."""
    return shlex.join(["python" if c == sys.executable else str(c) for c in cmd])


def child_pythonpath(current: str | None) -> str | None:
    """PYTHONPATH for the steps: they run in the output directory and must import the same
    megatron_llamapro as this process, also when it came from the working directory of a source
    checkout (`python -m megatron_llamapro.quickstart` there). An installed package needs nothing."""
    import megatron_llamapro

    root = str(Path(megatron_llamapro.__file__).resolve().parent.parent)
    site_dirs = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    parts = current.split(os.pathsep) if current else []
    if root in site_dirs or root in parts:
        return current
    return os.pathsep.join([root, *parts])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class StepRunner:
    """Runs steps in ``out``; keeps their timings and command lines for the report."""

    def __init__(self, out: Path):
        self.out = out
        self.logs = out / "logs"
        self.timings: list[dict] = []
        self.commands: list[str] = []

    @contextlib.contextmanager
    def timed(self, name: str):
        """An in-process step."""
        start, cpu = time.time(), time.process_time()
        log(f"== {name}")
        yield
        seconds = time.time() - start
        self.timings.append({"step": name, "seconds": round(seconds, 2),
                             "cpu_seconds": round(time.process_time() - cpu, 2)})
        log(f"   {name}: {seconds:.1f} s")

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        """One entry point as a subprocess; its output goes to OUT/logs/<name>.log (tail shown on failure)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        shown = shown_command(cmd)
        self.commands.append(shown)
        log(f"$ {shown}")
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.setdefault("OMP_NUM_THREADS", "1")
        pythonpath = child_pythonpath(full_env.get("PYTHONPATH"))
        if pythonpath:
            full_env["PYTHONPATH"] = pythonpath
        full_env.update(env or {})
        start, cpu = time.time(), _children_cpu()
        with open(log_path, "w") as log_file:
            proc = subprocess.run(cmd, cwd=self.out, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
        seconds = time.time() - start
        self.timings.append({"step": name, "seconds": round(seconds, 2),
                             "cpu_seconds": round(_children_cpu() - cpu, 2), "command": shown})
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            raise StepFailed(f"step {name!r} failed with exit code {proc.returncode} after {seconds:.1f} s; "
                             f"last lines of {log_path}:\n{tail}")
        log(f"   {name}: {seconds:.1f} s (log: {log_path.relative_to(self.out)})")
