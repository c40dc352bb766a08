"""Rewrite a Megatron checkpoint at another TP/PP/VPP, format or dtype (weights unchanged).

    python tools/reshard.py --in ckpt/tp2-pp2 --out ckpt/tp1-pp1 --tp 1 --pp 1 \
        [--vpp V] [--format torch|torch_dist] [--dtype bf16] [--workers 4]

Reads legacy torch or torch_dist checkpoints (or an HF directory), keeps llamapro.json's model,
expansion history and tokenizer, and re-pads the vocabulary for the new TP. Atomic output.
Exit status: 0 on success, 2 on bad input (one `error: ...` line on stderr).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from megatron_llamapro import cli
from megatron_llamapro.errors import entry_point, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in", dest="src", required=True, type=Path, help="input checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--tp", type=cli.positive_int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=cli.positive_int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=cli.positive_int, default=None, help="virtual pipeline chunks per stage")
    parser.add_argument("--format", choices=["torch", "torch_dist"], default="torch")
    parser.add_argument("--dtype", type=cli.dtype_arg, default=None,
                        help="bf16 | fp16 | fp32 (default: keep the input's)")
    parser.add_argument("--make-vocab-size-divisible-by", type=cli.positive_int, default=None,
                        help="vocabulary padding multiple (default: keep the input's)")
    parser.add_argument("--workers", type=cli.positive_int, default=1,
                        help="processes writing shard files in parallel (torch format)")
    parser.add_argument("--tokenizer-model", type=Path, default=None,
                        help="tokenizer for a checkpoint that carries none (one written by Megatron-LM): "
                             "the directory holding tokenizer.model or tokenizer.json, or that file; "
                             "also gives such a checkpoint its real vocabulary size")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="copy NaN/Inf weights instead of refusing them by name")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.tune_malloc()
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.layout import Layout
    from megatron_llamapro.checkpoint.open import open_checkpoint

    cli.require_distinct(args.src, args.out, "--in")
    if args.vpp == 1:
        args.vpp = None
    layout = Layout(args.tp, args.pp, args.vpp)
    make_source = functools.partial(open_checkpoint, args.src.resolve(), tokenizer=args.tokenizer_model)
    with make_source() as source:
        cli.note_unused_tokenizer(args.tokenizer_model, source)
        before = f"{source.manifest.format} {source.manifest.layout.describe()} {source.manifest.dtype}"
    timer = cli.Timer()
    summary = write_checkpoint(make_source, args.out, args.format, layout, dtype=args.dtype,
                               divisible_by=args.make_vocab_size_divisible_by,
                               overwrite=args.overwrite, workers=args.workers,
                               allow_non_finite=args.allow_non_finite)
    seconds = timer.seconds
    manifest = summary["manifest"]
    print(f"resharded {args.src} ({before}) -> {args.out} ({manifest.format} {summary['layout']} "
          f"{manifest.dtype}, vocab padded to {manifest.padded_vocab_size})")
    print(cli.summary_line(args.out, seconds, "wrote"))
    return 0


if __name__ == "__main__":
    run(main)
