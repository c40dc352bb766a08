"""Fold a trainable-only training checkpoint (--save-trainable-only) into its base checkpoint.

    python tools/merge_delta.py --base ckpt/llama-pro --delta runs/pro [--iteration 1000] \
        --out ckpt/llama-pro-trained [--format torch|torch_dist|hf] [--tp T --pp P] [--overwrite]

The delta holds only the trained blocks (by canonical name, per TP rank); every other tensor
comes from --base, which must be the checkpoint the run was started from (its path is recorded in
the delta; a different path is accepted with a warning, a different model is refused). The
result is a complete checkpoint (model weights only, no optimizer) in the base's format unless
--format says otherwise; the output appears atomically.
Exit status: 0 on success, 2 on bad input (one `error: ...` line on stderr).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_llamapro import cli
from megatron_llamapro.errors import entry_point, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="the checkpoint the run started from")
    parser.add_argument("--delta", required=True, type=Path,
                        help="the run's --save directory (or one of its iter_N folders)")
    parser.add_argument("--iteration", type=cli.positive_int, default=None,
                        help="which saved iteration (default: the one the tracker names)")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--format", choices=["torch", "torch_dist", "hf"], default=None,
                        help="output format (default: the base's)")
    parser.add_argument("--tp", type=cli.positive_int, default=1, help="tensor-parallel size (torch format)")
    parser.add_argument("--pp", type=cli.positive_int, default=1, help="pipeline-parallel size (torch format)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_llamapro.checkpoint.delta import merge_delta, split_delta_path
    from megatron_llamapro.checkpoint.layout import Layout

    save_dir, iteration = split_delta_path(args.delta, args.iteration)
    cli.require_distinct(args.base, args.out, "--base")
    cli.require_distinct(save_dir, args.out, "--delta")
    timer = cli.Timer()
    summary = merge_delta(args.base, save_dir, iteration, args.out, args.format, Layout(args.tp, args.pp),
                          overwrite=args.overwrite)
    print(f"merged {summary['iteration_dir']} ({summary['trained_tensors']} trained tensors, iteration "
          f"{summary['iteration']}) into {args.base} -> {args.out} ({summary['format']}, {summary['layout']})")
    print(cli.summary_line(args.out, timer.seconds, "wrote"))
    return 0


if __name__ == "__main__":
    run(main)
