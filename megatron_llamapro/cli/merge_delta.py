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
import functools
import json
import sys
from pathlib import Path

from megatron_llamapro import cli
from megatron_llamapro.errors import UserError, entry_point, run


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
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.layout import Layout
    from megatron_llamapro.checkpoint.manifest import Manifest
    from megatron_llamapro.checkpoint.open import sniff_format
    from megatron_llamapro.checkpoint.source import CheckpointError
    from megatron_llamapro.training.checkpointing import (
        STATE_FILE,
        delta_iteration_dir,
        open_delta_source,
    )

    delta = args.delta
    iteration = args.iteration
    if delta.name.startswith("iter_") and not (delta / "latest_checkpointed_iteration.txt").exists():
        if iteration is not None and int(delta.name[5:]) != iteration:
            raise UserError(f"--iteration {iteration} contradicts --delta {delta}")
        delta, iteration = delta.parent, int(delta.name[5:])
    for path in (args.base, delta):
        cli.require_distinct(path, args.out, "--base" if path == args.base else "--delta")
    it_dir = delta_iteration_dir(delta, iteration)
    record = json.loads((it_dir / STATE_FILE).read_text())
    recorded = record.get("base_checkpoint")
    if recorded and Path(recorded).resolve() != args.base.resolve():
        print(f"warning: {it_dir} was trained from {recorded}, merging into {args.base}", file=sys.stderr)
    delta_manifest = Manifest.read(delta)
    base_format = sniff_format(args.base)
    fmt = args.format or base_format
    make_source = functools.partial(open_delta_source, str(args.base.resolve()), str(it_dir.resolve()))
    with make_source() as source:
        if delta_manifest is not None and delta_manifest.arch != source.manifest.arch:
            raise CheckpointError(f"--base {args.base}: a different model from the one {delta} was trained "
                                  f"on ({delta_manifest.arch.num_layers} vs {source.arch.num_layers} layers ...)")
        trained = sorted(source.delta)
    layout = Layout(args.tp, args.pp) if fmt == "torch" else Layout()
    timer = cli.Timer()
    summary = write_checkpoint(make_source, args.out, fmt, layout, overwrite=args.overwrite)
    print(f"merged {it_dir} ({len(trained)} trained tensors, iteration {record['iteration']}) into "
          f"{args.base} -> {args.out} ({fmt}, {summary['layout']})")
    print(cli.summary_line(args.out, timer.seconds, "wrote"))
    return 0


if __name__ == "__main__":
    run(main)
