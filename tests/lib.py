"""Helpers many test files share: the project's tools run as subprocesses or in this process, the
environment they run in, and the trainer's metrics file read back."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
PYTHON = sys.executable

_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


# ---- environments ---------------------------------------------------------------------------------

def tool_env(extra: dict | None = None) -> dict:
    """The environment a tool subprocess gets: this checkout first on PYTHONPATH, one OpenMP thread
    unless set, and none of the launcher variables the calling process may carry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in _LAUNCHER_VARIABLES:
        env.pop(key, None)
    env.update(extra or {})
    return env


def child_env(extra: dict | None = None) -> dict:
    """tool_env with Python warnings silenced (training runs, whose logs the tests read)."""
    return tool_env({"PYTHONWARNINGS": "ignore", **(extra or {})})


# ---- running the tools ----------------------------------------------------------------------------

def tool_command(tool: str, args) -> list[str]:
    """`python tools/<tool>.py ARGS`, or `python -m <tool> ARGS` when `tool` is a dotted module name."""
    entry = ["-m", tool] if "." in tool else [str(TOOLS / f"{tool}.py")]
    return [PYTHON, *entry, *map(str, args)]


def run_tool(tool: str, *args, env: dict | None = None, cwd: Path = REPO, timeout: float = 240,
             check: bool = False) -> subprocess.CompletedProcess:
    """Run a tool to completion (see tool_command); `check` fails on a non-zero exit with its output."""
    proc = subprocess.run(tool_command(tool, args), cwd=cwd, env=tool_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def start_tool(tool: str, *args, env: dict | None = None, cwd: Path = REPO, **popen_kwargs) -> subprocess.Popen:
    """Start a tool (see tool_command) with its output piped unless `popen_kwargs` say otherwise."""
    popen_kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen_kwargs}
    return subprocess.Popen(tool_command(tool, args), cwd=cwd, env=tool_env() if env is None else env,
                            text=True, **popen_kwargs)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a started tool."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def load_tool(name: str):
    """tools/<name>.py imported as a module (its `main(argv)` then runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"llamapro_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool_inprocess(name: str, argv: list, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of tools/<name>.py's main(argv) run in this process."""
    capsys.readouterr()
    code = load_tool(name).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the trainer's metrics file (one JSON object per line) -----------------------------------------

def metrics_records(path: Path) -> list[dict]:
    """Every record of a metrics file, in the order written; `path` may be a save directory (its
    metrics.jsonl). A last line without its newline is still being written and is left out."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def training_iterations(path: Path) -> list[int]:
    """Iteration of every training-step record (validation records left out), repeats kept."""
    return [int(rec["iteration"]) for rec in metrics_records(path) if "loss" in rec]


def losses(path: Path) -> dict[int, float]:
    """iteration -> training loss (a resumed run's records replace the lost ones)."""
    return {int(rec["iteration"]): float(rec["loss"]) for rec in metrics_records(path)
            if rec.get("loss") is not None}


def last_logged_iteration(path: Path) -> int:
    """The highest iteration with a training loss so far (0 before the file exists)."""
    try:
        return max(losses(path), default=0)
    except FileNotFoundError:
        return 0
