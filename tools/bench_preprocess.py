"""Preprocessing throughput on a generated corpus with a sentencepiece tokenizer.

    python tools/bench_preprocess.py [--docs 20000] [--vocab 4000] [--workers 1 2] [--chat]

Writes a synthetic JSONL corpus (half general prose, half domain text), trains a LLaMA-like
sentencepiece model on it, then preprocesses it once per worker count and prints tokens/s.
With --chat the corpus is as many chat samples (`messages`), preprocessed with --chat twice: with
the sentencepiece tokenizer (LLaMA-2 [INST] format) and with a byte-level BPE tokenizer carrying a
chat_template (rendered by transformers), so the two template paths are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llamapro.errors import entry_point, run  # noqa: E402

CHATML = ("{% for m in messages %}<|begin_of_text|>{{ m['role'] }}\n{{ m['content'] }}<|end_of_text|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|begin_of_text|>assistant\n{% endif %}")


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20000, help="documents of each corpus")
    parser.add_argument("--vocab", type=int, default=1500,
                        help="the synthetic corpora support about 1590 pieces at most")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per setting")
    parser.add_argument("--chat", action="store_true", help="chat samples through --chat (both templates)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron_llamapro.data import synthetic
    from megatron_llamapro.data.indexed import PreprocessConfig, preprocess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = (synthetic.general_corpus(args.docs, seed=0)
                 + synthetic.domain_corpus(args.docs, seed=0))
        model = synthetic.train_sentencepiece(texts[::10], args.vocab, tmp)
        if args.chat:
            records = synthetic.chat_samples(2 * args.docs)
            corpus = synthetic.write_records(records, tmp / "chat.jsonl")
            bpe = synthetic.train_hf_bpe(texts[::10], args.vocab, tmp / "bpe")
            config = json.loads((bpe / "tokenizer_config.json").read_text())
            config["chat_template"] = CHATML
            (bpe / "tokenizer_config.json").write_text(json.dumps(config))
            runs = [("sentencepiece, llama-2 [INST]", "sentencepiece", model), ("hf BPE, chat_template", "hf", bpe)]
        else:
            corpus = synthetic.write_jsonl(texts, tmp / "corpus.jsonl")
            runs = [("sentencepiece", "sentencepiece", model)]
        size_mb = corpus.stat().st_size / 1e6
        print(f"corpus: {2 * args.docs} {'chat samples' if args.chat else 'docs'}, {size_mb:.1f} MB; vocab {args.vocab}")
        for label, kind, tokenizer in runs:
            for workers in args.workers:
                best = None
                for repeat in range(args.repeats):
                    stats = preprocess(PreprocessConfig(
                        [corpus], tmp / f"out{kind}{workers}_{repeat}", kind, tokenizer,
                        workers=workers, append_eod=not args.chat, progress=False, chat=args.chat))
                    if best is None or stats.seconds < best.seconds:
                        best = stats
                print(f"{label}, workers={workers}: {best.tokens} tokens in {best.seconds:.2f} s = "
                      f"{best.tokens_per_second:,.0f} tokens/s, {size_mb / best.seconds:.1f} MB/s, "
                      f"{best.documents / best.seconds:,.0f} {'samples' if args.chat else 'docs'}/s")
    return 0


if __name__ == "__main__":
    run(main)
