"""Train the new blocks of a LLaMA Pro expanded checkpoint: an alias of `python -m megatron_llamapro.pretrain`.

    torchrun --nproc-per-node 8 tools/pretrain_expand.py --load ckpt/llama-pro --save runs/pro ...

Every flag, the YAML config and the exit codes (0 done, 75 preempted after a checkpoint, 2 bad
configuration) are those of megatron_llamapro.pretrain; see `--help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llamapro.errors import run  # noqa: E402
from megatron_llamapro.pretrain import main  # noqa: E402

if __name__ == "__main__":  # guarded: torch_dist saving spawns helpers that re-import __main__
    run(main)
