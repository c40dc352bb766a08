"""Export a Megatron checkpoint (legacy torch or torch_dist, any TP/PP) to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/llama2-7b-tp2-pp2 --out llama2-7b-hf \
        [--dtype bf16] [--max-shard-size 5GB] [--verify]

Writes config.json, model.safetensors (or model-0000N-of-0000M.safetensors + index above
--max-shard-size), generation_config.json, the tokenizer files kept with the checkpoint, and
llamapro_expansion.json for expanded models. The output appears atomically.
Exit status: 0 on success, 2 on bad input (one `error: ...` line on stderr), 1 if --verify fails.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from megatron_llamapro import cli
from megatron_llamapro.checkpoint.verify import DEFAULT_TOLERANCE
from megatron_llamapro.errors import UserError, entry_point, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-dir", required=True, type=Path,
                        help="Megatron checkpoint root (with latest_checkpointed_iteration.txt)")
    parser.add_argument("--out", required=True, type=Path, help="output HF directory")
    parser.add_argument("--dtype", type=cli.dtype_arg, default=None,
                        help="bf16 | fp16 | fp32 (default: the checkpoint's dtype)")
    parser.add_argument("--max-shard-size", type=cli.size_arg, default=cli.parse_size("5GB"),
                        help="largest safetensors file before sharding (default 5GB; KB/MB/GB are "
                             "decimal, KiB/MiB/GiB binary)")
    parser.add_argument("--tokenizer-model", type=Path, default=None,
                        help="tokenizer for a checkpoint that carries none (one written by Megatron-LM): "
                             "the directory holding tokenizer.model or tokenizer.json, or that file; "
                             "also gives such a checkpoint its real vocabulary size")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="copy NaN/Inf weights instead of refusing them by name")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--verify", action="store_true",
                        help="compare the exported HF model's logits with the Megatron checkpoint's")
    parser.add_argument("--verify-tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="max |logit difference| --verify accepts, relative to the largest |logit| "
                             f"of the reference (default {DEFAULT_TOLERANCE:.0e})")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.tune_malloc()
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.layout import Layout
    from megatron_llamapro.checkpoint.open import open_checkpoint, sniff_format

    cli.require_distinct(args.megatron_dir, args.out, "--megatron-dir")
    if sniff_format(args.megatron_dir) == "hf":
        raise UserError(f"--megatron-dir {args.megatron_dir}: is an HF checkpoint, not a Megatron one")
    make_source = functools.partial(open_checkpoint, args.megatron_dir.resolve(), tokenizer=args.tokenizer_model)
    with make_source() as source:
        cli.note_unused_tokenizer(args.tokenizer_model, source)
    timer = cli.Timer()
    summary = write_checkpoint(
        make_source, args.out, "hf", Layout(),
        dtype=args.dtype, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
        allow_non_finite=args.allow_non_finite)
    seconds = timer.seconds
    manifest = summary["manifest"]
    shards = sorted(p.name for p in args.out.glob("*.safetensors"))
    print(f"exported {args.megatron_dir} -> {args.out}: dtype {manifest.dtype}, "
          f"{len(shards)} safetensors file(s), vocab {manifest.arch.vocab_size}")
    if args.verify:
        from megatron_llamapro.checkpoint.verify import verify_written

        print(verify_written(args.out, args.megatron_dir, args.out, args.verify_tolerance, manifest.dtype,
                             tokenizer=args.tokenizer_model))
    print(cli.summary_line(args.out, seconds, "wrote"))
    return 0


if __name__ == "__main__":
    run(main)
