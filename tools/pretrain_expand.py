#!/usr/bin/env python3
"""Train the new blocks of a LLaMA Pro expanded checkpoint.

    python tools/pretrain_expand.py --nproc-per-node 8 --load ckpt/llama-pro --save runs/pro ...
    torchrun --nproc-per-node 8 tools/pretrain_expand.py --load ckpt/llama-pro --save runs/pro ...

With --nproc-per-node N it is a single-node launcher (megatron_llamapro/launch.py): it checks the
flags and the checkpoint once for N ranks before starting any, starts them with torch's elastic
launch API, and ends with one line and the workers' exit status (75 after a preemption save stays
75). Without it, this process is one rank: plain torchrun, srun or a single process. Every other
flag, the YAML config and the exit codes are those of `python -m megatron_llamapro.pretrain --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llamapro.errors import run  # noqa: E402
from megatron_llamapro.launch import main  # noqa: E402

if __name__ == "__main__":  # guarded: torch_dist saving spawns helpers that re-import __main__
    run(main)
