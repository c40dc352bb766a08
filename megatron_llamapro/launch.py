"""Single-node launch of the trainer that checks once and reports once.

    python tools/pretrain_expand.py --nproc-per-node 2 --load ckpt/expanded --save runs/pro ...

Under plain torchrun every rank parses the flags, so one mistake is printed once per rank and then
buried under torchrun's ChildFailedError box, and a worker's exit status 75 ("saved, requeue me")
reaches the shell as 1. This launcher runs the trainer's `--check` once, in this process, for the
world size it will start (nothing is started on a bad flag or checkpoint), then starts the workers
with torch's own elastic launch API (torch.distributed.launcher), and ends with one line: the
workers' common exit status, or the first failed rank's exit status and its last error line.
The exit status is the workers': 0 done, 75 preempted after saving, 2 bad configuration, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from megatron_llamapro.errors import EXIT_FAILED, EXIT_PREEMPTED, entry_point, one_line
from megatron_llamapro.runtime.distributed import environment, free_port


def split_launcher_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own flags; everything else is the trainer's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=int)
    parser.add_argument("--master-port", dest="master_port", type=int, default=None)
    parser.add_argument("--log-dir", dest="log_dir", default=None,
                        help="keep each rank's stdout/stderr here (default: a temporary directory)")
    return parser.parse_known_args(argv)


def _check_once(trainer_argv: list[str], world_size: int) -> int:
    from megatron_llamapro import pretrain

    with environment(RANK="0", WORLD_SIZE=str(world_size)):
        return pretrain.main([*trainer_argv, "--check"])


_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")
_ERROR_LINE = re.compile(r"^(error: .*|[A-Za-z_.]*(Error|Exception|Interrupt)\b.*)$")


def last_error_line(log_file: Path) -> str | None:
    """The last `error: ...` or `SomeError: ...` line a worker wrote."""
    try:
        lines = Path(log_file).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = _RANK_PREFIX.sub("", line.strip())  # torch prefixes a rank's uncaught traceback
        if _ERROR_LINE.match(line):
            return line
    return None


def _rank_logs(log_dir: Path) -> dict[int, Path]:
    """rank -> its stderr file under the elastic agent's log directory (attempt_*/<rank>/stderr.log)."""
    logs = {}
    for path in Path(log_dir).rglob("stderr.log"):
        if path.parent.name.isdigit():
            logs[int(path.parent.name)] = path
    return logs


def launch(nproc_per_node: int, trainer_argv: list[str], master_port: int | None = None,
           log_dir: str | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logs_root = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="llamapro-launch-"))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id="llamapro", role="rank",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{master_port or free_port()}",
        rdzv_configs={"is_host": True}, max_restarts=0, start_method="spawn", monitor_interval=0.2,
        # tee: each rank's output reaches the console as usual and is kept for the summary line
        logs_specs=DefaultLogsSpecs(log_dir=str(logs_root), redirects=Std.NONE, tee=Std.ALL))
    command = [sys.executable, "-m", "megatron_llamapro.pretrain", *trainer_argv]
    if os.environ.get("LLAMAPRO_WARNINGS") != "1":  # the agent's own "failed (exitcode: N)": see our line
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        elastic_launch(config, entrypoint=command[0])(*command[1:])
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        # A rank exits 75 only after the collective save completed on every rank; the agent then
        # stops the others (negative: killed by a signal) before they exit 75 themselves.
        if EXIT_PREEMPTED in codes.values() and all(c == EXIT_PREEMPTED or c < 0 for c in codes.values()):
            _remove_temporary_logs(logs_root, log_dir)
            print(f"launch: every rank stopped after saving (exit {EXIT_PREEMPTED}: resubmit to resume)",
                  file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        # The first rank to fail is the cause; the agent then stops the others with SIGTERM.
        stopped = {-signal.SIGTERM, 128 + signal.SIGTERM}
        causes = {r: f for r, f in exc.failures.items() if f.exitcode not in stopped} or exc.failures
        rank = min(causes, key=lambda r: (causes[r].timestamp, r))
        logs = _rank_logs(logs_root)
        line = last_error_line(logs[rank]) if rank in logs else None
        code = codes[rank] if codes[rank] > 0 else 128 + (-codes[rank])
        if line is None:  # it stopped quietly: another rank reports the job's error (rank 0, after a failed save)
            reporters = [r for r in sorted(logs) if last_error_line(logs[r])]
            if reporters:
                rank, line = reporters[0], last_error_line(logs[reporters[0]])
        print(f"launch: error: rank {rank} exited with status {code}"
              + (f": {one_line(line)}" if line else "")
              + (f" (its output: {logs[rank]})" if rank in logs else ""), file=sys.stderr, flush=True)
        return code if code > 0 else EXIT_FAILED
    except SignalException as exc:
        signum = int(exc.sigval)
        print(f"launch: error: interrupted by {signal.Signals(signum).name}; the workers were stopped",
              file=sys.stderr, flush=True)
        return 128 + signum
    _remove_temporary_logs(logs_root, log_dir)
    return 0


def _remove_temporary_logs(logs_root: Path, log_dir: str | None) -> None:
    if log_dir is None:
        shutil.rmtree(logs_root, ignore_errors=True)


@entry_point(prog="launch")
def main(argv: list[str] | None = None) -> int:
    ours, trainer_argv = split_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if ours.nproc_per_node is None:
        # no launcher flags: this process is one rank (plain torchrun, srun, a single process)
        from megatron_llamapro import pretrain

        return pretrain.main(trainer_argv)
    if ours.nproc_per_node < 1:
        print(f"launch: error: --nproc-per-node {ours.nproc_per_node}: must be >= 1", file=sys.stderr)
        return 2
    code = _check_once(trainer_argv, ours.nproc_per_node)
    if code != 0:
        return code
    return launch(ours.nproc_per_node, trainer_argv, ours.master_port, ours.log_dir)


if __name__ == "__main__":  # guarded: torch_dist saving spawns helpers that re-import __main__
    from megatron_llamapro.errors import run

    run(main)
