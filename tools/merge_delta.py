#!/usr/bin/env python3
"""Fold a trainable-only training checkpoint (--save-trainable-only) into its base checkpoint.

A thin launcher for `python -m megatron_llamapro.cli.merge_delta` (same flags; see --help).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llamapro.cli.merge_delta import main  # noqa: E402,F401 (tests load main from here)
from megatron_llamapro.errors import run  # noqa: E402

if __name__ == "__main__":  # guarded: torch_dist saving spawns helpers that re-import __main__
    run(main)
