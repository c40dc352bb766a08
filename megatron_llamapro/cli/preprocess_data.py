"""Tokenize JSONL into megatron-core IndexedDataset files (<prefix>_<key>_document.bin/.idx).

    python tools/preprocess_data.py --input a.jsonl b.jsonl.gz --json-key text \
        --tokenizer-type sentencepiece --tokenizer-model tokenizer.model \
        --output-prefix data/general --workers 4 --append-eod

Exit status: 0 on success, 2 on bad input or arguments (one `error: ...` line on stderr).
"""

from __future__ import annotations

import argparse

from megatron_llamapro.errors import entry_point, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSONL files (.gz accepted), read in the order given")
    parser.add_argument("--json-key", default="text", help="key holding the document text")
    parser.add_argument("--tokenizer-type", required=True, choices=["sentencepiece", "hf"])
    parser.add_argument("--tokenizer-model", required=True,
                        help="tokenizer.model (sentencepiece) or tokenizer.json / its directory (hf)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>_<json-key>_document.bin/.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--append-eod", action="store_true", help="end each document with EOS")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="count and skip malformed lines instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_llamapro.data.indexed import PreprocessConfig, preprocess

    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, json_key=args.json_key, workers=args.workers,
        append_eod=args.append_eod, skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite)
    stats = preprocess(config)
    print(stats.summary())
    return 0


if __name__ == "__main__":
    run(main)
