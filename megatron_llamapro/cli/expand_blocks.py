"""Add LLaMA Pro identity blocks to a checkpoint (HF, legacy Megatron or torch_dist).

    python tools/expand_blocks.py --in ckpt/llama2-7b-tp1-pp4 --out ckpt/llama-pro-tp1-pp4 \
        --num-new-blocks 8 [--placement interleaved|top|bottom | --new-block-positions 4,9,...] \
        [--tp T --pp P --vpp V] [--format torch|torch_dist|hf] [--dtype bf16] \
        [--dry-run] [--verify] [--workers N] [--overwrite]

Each new block is a copy of the original layer below it with its attention and MLP output
projections zeroed, so the expanded model computes exactly what the original did. Placements
(see megatron_llamapro/expansion/plan.py): interleaved (default, the paper: P groups, a copy after
each group's last layer), top (P copies of the last layer after it), bottom (P copies of layer 0
before it), or explicit 0-based positions in the expanded model.

The output keeps the input's kind and layout unless --format / --tp / --pp / --vpp say otherwise;
the plan must balance over the target pipeline layout (every stage/chunk the same number of layers,
and for interleaved the same number of new blocks), else it is refused with the sizes that work.
--dry-run prints the plan per stage/chunk and writes nothing. --verify runs the original and the
expanded model (fp32, one process) on sample tokens: their logits must be bit-identical.
Exit status: 0 on success, 1 when --verify finds a difference, 2 on bad input (one `error:` line).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from megatron_llamapro import cli
from megatron_llamapro.errors import entry_point, run
from megatron_llamapro.expansion.plan import PLACEMENTS, parse_positions, plan_expansion, untrained_stage_warning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in", dest="src", required=True, type=Path,
                        help="input checkpoint: HF directory, legacy Megatron or torch_dist")
    parser.add_argument("--out", type=Path, help="output directory (not needed with --dry-run)")
    parser.add_argument("--num-new-blocks", type=cli.positive_int, default=None,
                        help="number of blocks to add (P)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--placement", choices=PLACEMENTS, default=None,
                       help="where the new blocks go (default: interleaved)")
    where.add_argument("--new-block-positions", default=None,
                       help="comma-separated 0-based indices of the new blocks in the expanded model")
    parser.add_argument("--tp", type=cli.positive_int, default=None, help="target tensor-parallel size")
    parser.add_argument("--pp", type=cli.positive_int, default=None, help="target pipeline-parallel size")
    parser.add_argument("--vpp", type=cli.positive_int, default=None,
                        help="target virtual pipeline chunks per stage")
    parser.add_argument("--format", choices=["torch", "torch_dist", "hf"], default=None,
                        help="output format (default: the input's)")
    parser.add_argument("--dtype", type=cli.dtype_arg, default=None,
                        help="bf16 | fp16 | fp32 (default: keep the input's)")
    parser.add_argument("--tokenizer-model", type=Path, default=None,
                        help="tokenizer for a checkpoint that carries none (one written by Megatron-LM): "
                             "the directory holding tokenizer.model or tokenizer.json, or that file; "
                             "also gives such a checkpoint its real vocabulary size")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--verify", action="store_true",
                        help="check the expanded model's logits equal the original's exactly")
    parser.add_argument("--workers", type=cli.positive_int, default=1,
                        help="processes writing shard files in parallel (torch format)")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="copy NaN/Inf weights instead of refusing them by name")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.out is None and not args.dry_run:
        parser.error("--out is required (or pass --dry-run)")
    if args.num_new_blocks is None and args.new_block_positions is None:
        parser.error("give --num-new-blocks (with --placement) or --new-block-positions")
    return args


def target_layout(args: argparse.Namespace, manifest, fmt: str):
    """The layout to balance and write: the input's unless flags say otherwise (HF output: only
    what the flags say, since an HF checkpoint has no layout)."""
    from megatron_llamapro.checkpoint.layout import Layout

    base = manifest.layout if fmt != "hf" else Layout()
    tp = args.tp or base.tp
    pp = args.pp or base.pp
    vpp = args.vpp if args.vpp is not None else (base.vpp if args.pp is None else None)
    return Layout(tp, pp, None if vpp == 1 else vpp)


def shard_report(files: dict[str, list[str]]) -> list[str]:
    """One line per legacy output file: which input files were read to write it."""
    lines = []
    local = True
    for out_file, opened in sorted(files.items()):
        out_rank = Path(out_file).parent.name
        in_ranks = [Path(f).parent.name for f in opened]
        local &= in_ranks == [out_rank]
        lines.append(f"  {out_rank} <- {', '.join(in_ranks) or '(no input file)'}")
    head = ("input shards read: each output shard from its matching input shard alone" if local
            else "input shards read (restaged):")
    return [head] + lines


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.expansion.apply import (
        ExpandedSource,
        compare_logits,
        expand_checkpoint,
        expanded_manifest,
    )

    src = args.src.resolve()
    if args.out is not None:
        cli.require_distinct(src, args.out, "--in")
    positions = parse_positions(args.new_block_positions) if args.new_block_positions is not None else None
    with open_checkpoint(src, tokenizer=args.tokenizer_model) as source:
        manifest = source.manifest
        cli.note_unused_tokenizer(args.tokenizer_model, source)
    fmt = args.format or manifest.format
    layout = target_layout(args, manifest, fmt)
    plan = plan_expansion(manifest.arch.num_layers, args.num_new_blocks, args.placement or "interleaved",
                          positions, pp=layout.pp, vpp=layout.vpp)
    new_manifest = expanded_manifest(manifest, plan)
    new_manifest.arch.check_parallel(layout.tp, layout.pp, layout.vpp)
    sources = ", ".join(f"{i} (copy of {s})" for i, s in plan.sources.items())
    warning = untrained_stage_warning(plan, layout.pp, layout.vpp)
    if warning:
        print(warning, flush=True)

    if args.dry_run:
        print(f"input: {src} ({manifest.format} {manifest.layout.describe()}, {manifest.arch.num_layers} layers"
              + (f", {len(manifest.expansions)} earlier expansion(s)" if manifest.expansions else "") + ")")
        print(f"output (dry run, nothing written): {fmt} "
              f"{layout.describe() if fmt == 'torch' else 'layout-free'}")
        print(plan.describe(layout.pp, layout.vpp))
        print(f"trainable layers after expansion: {new_manifest.trainable_layers}")
        if args.verify:
            with open_checkpoint(src, tokenizer=args.tokenizer_model) as original, \
                    ExpandedSource(open_checkpoint(src, tokenizer=args.tokenizer_model), plan) as expanded:
                equal, diff = compare_logits(original, expanded)
            _report_verify(equal, diff)
        return 0

    timer = cli.Timer()
    if args.tokenizer_model is None:
        summary = expand_checkpoint(src, args.out, plan, fmt=fmt, layout=layout, dtype=args.dtype,
                                    overwrite=args.overwrite, workers=args.workers,
                                    allow_non_finite=args.allow_non_finite)
    else:  # expand_checkpoint opens its input without a tokenizer: the same steps, with one
        from megatron_llamapro.checkpoint.convert import write_checkpoint
        from megatron_llamapro.expansion.plan import check_balance

        check_balance(plan, layout.pp, layout.vpp)
        summary = write_checkpoint(
            functools.partial(open_expanded_with_tokenizer, str(src), plan, str(args.tokenizer_model)),
            args.out, fmt, layout, dtype=args.dtype, overwrite=args.overwrite, workers=args.workers,
            allow_non_finite=args.allow_non_finite)
    seconds = timer.seconds
    written = summary["manifest"]
    where = summary["layout"] if written.format == "torch" else "layout-free"
    print(f"expanded {src} ({manifest.format}, {plan.original_num_layers} layers) -> {args.out} "
          f"({written.format} {where} {written.dtype}, {plan.num_layers} layers)")
    print(f"new blocks ({plan.placement}): {sources}")
    print(f"trainable layers: {written.trainable_layers}")
    if summary.get("files"):
        print("\n".join(shard_report(summary["files"])))
    print(cli.summary_line(args.out, seconds, "wrote"))
    if args.verify:
        round_to = written.dtype if written.dtype != manifest.dtype else None
        with open_checkpoint(src, tokenizer=args.tokenizer_model) as original, open_checkpoint(args.out) as expanded:
            equal, diff = compare_logits(original, expanded, round_to=round_to)
        _report_verify(equal, diff)
    return 0


def open_expanded_with_tokenizer(path: str, plan, tokenizer: str):
    """expansion.apply.open_expanded with --tokenizer-model (module level: picklable for --workers)."""
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.expansion.apply import ExpandedSource

    return ExpandedSource(open_checkpoint(Path(path), tokenizer=tokenizer), plan)


def _report_verify(equal: bool, diff: float) -> None:
    if not equal:
        raise cli.VerifyError(f"verify: expanded model's logits differ from the original's "
                              f"(max |diff| = {diff:.3e}; they must be identical)")
    print(f"verify: logits of the expanded model equal the original's exactly (max |diff| = {diff})")


if __name__ == "__main__":
    run(main)
