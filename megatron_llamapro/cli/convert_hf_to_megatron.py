"""Convert a Hugging Face LLaMA/Mistral checkpoint into a Megatron checkpoint at a given TP/PP.

    python tools/convert_hf_to_megatron.py --hf-dir llama-2-7b-hf --out ckpt/llama2-7b-tp2-pp2 \
        --tp 2 --pp 2 [--vpp 2] [--format torch|torch_dist] [--dtype bf16] [--workers 4] [--verify]

Writes Megatron-LM's layout (latest_checkpointed_iteration.txt, release/mp_rank_XX[_YYY]/...),
llamapro.json (architecture, vocab padding, layout) and the tokenizer files under tokenizer/.
The output appears atomically: on any error nothing is left at --out.
Exit status: 0 on success, 2 on bad input (one `error: ...` line on stderr), 1 if --verify fails.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from megatron_llamapro import cli
from megatron_llamapro.checkpoint.verify import DEFAULT_TOLERANCE
from megatron_llamapro.errors import entry_point, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, type=Path, help="HF checkpoint directory (config.json + weights)")
    parser.add_argument("--out", required=True, type=Path, help="output Megatron checkpoint directory")
    parser.add_argument("--tp", type=cli.positive_int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=cli.positive_int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=cli.positive_int, default=None,
                        help="virtual pipeline chunks per stage (interleaved schedule)")
    parser.add_argument("--format", choices=["torch", "torch_dist"], default="torch",
                        help="torch: legacy per-rank files (default); torch_dist: megatron-core "
                             "dist_checkpointing (loads under any TP/PP)")
    parser.add_argument("--dtype", type=cli.dtype_arg, default=None,
                        help="bf16 | fp16 | fp32 (default: the HF config's torch_dtype)")
    parser.add_argument("--make-vocab-size-divisible-by", type=cli.positive_int, default=128,
                        help="pad the vocabulary to a multiple of this times TP (Megatron-LM's rule)")
    parser.add_argument("--workers", type=cli.positive_int, default=1,
                        help="processes writing shard files in parallel (torch format)")
    parser.add_argument("--tokenizer-model", type=Path, default=None,
                        help="tokenizer for a checkpoint that carries none (one written by Megatron-LM): "
                             "the directory holding tokenizer.model or tokenizer.json, or that file; "
                             "also gives such a checkpoint its real vocabulary size")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="copy NaN/Inf weights instead of refusing them by name")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--verify", action="store_true",
                        help="compare HF and Megatron logits in fp32 after converting")
    parser.add_argument("--verify-tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="max |logit difference| --verify accepts, relative to the largest |logit| "
                             f"of the reference (default {DEFAULT_TOLERANCE:.0e})")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.tune_malloc()
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.hf import HFSource
    from megatron_llamapro.checkpoint.layout import Layout
    from megatron_llamapro.checkpoint.manifest import resolve_tokenizer

    if args.vpp == 1:
        args.vpp = None
    layout = Layout(args.tp, args.pp, args.vpp)
    if args.format == "torch_dist" and (args.tp, args.pp, args.vpp) != (1, 1, None):
        # torch_dist is layout-free; the sizes are still checked so a bad request fails early.
        print(f"note: torch_dist checkpoints load under any TP/PP; {layout.describe()} is only checked")
    tokenizer = resolve_tokenizer(args.tokenizer_model) if args.tokenizer_model is not None else None
    make_source = functools.partial(HFSource, args.hf_dir.resolve(), tokenizer=tokenizer)
    with make_source() as source:
        cli.note_unused_tokenizer(args.tokenizer_model, source)
    timer = cli.Timer()
    summary = write_checkpoint(
        make_source, args.out, args.format, layout,
        dtype=args.dtype, divisible_by=args.make_vocab_size_divisible_by,
        overwrite=args.overwrite, workers=args.workers, allow_non_finite=args.allow_non_finite)
    seconds = timer.seconds
    manifest = summary["manifest"]
    print(f"converted {args.hf_dir} -> {args.out}: format {manifest.format}, {summary['layout']}, "
          f"dtype {manifest.dtype}, vocab {manifest.arch.vocab_size} padded to {manifest.padded_vocab_size}")
    if args.verify:
        from megatron_llamapro.checkpoint.verify import verify_written

        print(verify_written(args.hf_dir, args.out, args.out, args.verify_tolerance, manifest.dtype))
    print(cli.summary_line(args.out, seconds, "wrote"))
    return 0


if __name__ == "__main__":
    run(main)
