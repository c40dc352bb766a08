"""Tokenize JSONL into megatron-core IndexedDataset files (<prefix>_<key>_document.bin/.idx).

    python tools/preprocess_data.py --input a.jsonl b.jsonl.gz --json-key text \
        --tokenizer-type sentencepiece --tokenizer-model tokenizer.model \
        --output-prefix data/general --workers 4 --append-eod

Chat samples for instruction tuning (--chat): one sample per line as `messages` (system/user/assistant),
ShareGPT `conversations` or Alpaca instruction/input/output, written with the tokenizer's chat
template and a target mask (1 on assistant tokens only) to <prefix>_chat_document*:

    python tools/preprocess_data.py --chat --input sft.jsonl --tokenizer-model CKPT_DIR \
        --output-prefix data/sft --workers 8

--tokenizer-model may also be a checkpoint directory (HF, or Megatron with the tokenizer it carries);
--tokenizer-type may then be left out (tokenizer.model -> sentencepiece, else tokenizer.json -> hf).

Exit status: 0 on success, 2 on bad input or arguments (one `error: ...` line on stderr).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_llamapro.errors import UserError, entry_point, run

TOKENIZER_FILE_NAMES = ("tokenizer.model", "tokenizer.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSONL files (.gz accepted), read in the order given")
    parser.add_argument("--json-key", default="text", help="key holding the document text")
    parser.add_argument("--tokenizer-type", choices=["sentencepiece", "hf", "huggingface"],
                        help="hf and huggingface are the same (tokenizer.json); default: from the "
                             "directory --tokenizer-model names")
    parser.add_argument("--tokenizer-model", required=True,
                        help="tokenizer.model (sentencepiece), tokenizer.json / its directory (hf), or a "
                             "checkpoint directory carrying either")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>_<json-key>_document.bin/.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--append-eod", action="store_true", help="end each document with EOS")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="count and skip malformed lines instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--chat", action="store_true",
                        help="lines are chat samples (messages / ShareGPT conversations / Alpaca): writes "
                             "<prefix>_chat_document with a target mask for --sft training")
    parser.add_argument("--chat-template", choices=["auto", "hf", "llama2"], default="auto",
                        help="with --chat: hf = the tokenizer's chat_template, llama2 = LLaMA-2's [INST] format; "
                             "auto (default): hf when a Hugging Face tokenizer has one, llama2 for sentencepiece")
    return parser.parse_args(argv)


def resolve_tokenizer(tokenizer_type: str | None, tokenizer_model: str) -> tuple[str, str]:
    """(type, model path) for the tokenizer flags; a checkpoint directory stands for its tokenizer."""
    from megatron_llamapro.checkpoint.manifest import tokenizer_dir
    from megatron_llamapro.data.tokenizer import TYPE_ALIASES, tokenizer_in_directory

    path = Path(tokenizer_model)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILE_NAMES):
        carried = tokenizer_dir(path)
        if carried is None:
            raise UserError(f"--tokenizer-model {path}: no {' or '.join(TOKENIZER_FILE_NAMES)} in it, and "
                            "not a Megatron checkpoint carrying a tokenizer")
        path = carried
    if tokenizer_type is None:
        if not path.is_dir():
            raise UserError(f"--tokenizer-model {path}: a file needs --tokenizer-type (sentencepiece or hf)")
        kind, found = tokenizer_in_directory(path)
        return kind, str(found)
    tokenizer_type = TYPE_ALIASES.get(tokenizer_type, tokenizer_type)
    if tokenizer_type == "sentencepiece" and path.is_dir():
        path = path / "tokenizer.model"
    return tokenizer_type, str(path)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_llamapro.data.indexed import PreprocessConfig, preprocess

    tokenizer_type, tokenizer_model = resolve_tokenizer(args.tokenizer_type, args.tokenizer_model)
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model, json_key=args.json_key, workers=args.workers,
        append_eod=args.append_eod, skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite,
        chat=args.chat, chat_template=args.chat_template)
    stats = preprocess(config)
    print(stats.summary())
    return 0


if __name__ == "__main__":
    run(main)
