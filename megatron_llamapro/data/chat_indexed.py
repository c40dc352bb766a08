"""The on-disk form of a tokenized chat set: what `preprocess_data.py --chat` writes and `--sft`
training reads.

For an output prefix P (the `--data-path` item names ``P_chat_document``):

- ``P_chat_document.bin/.idx``: megatron-core IndexedDataset of token ids, one sequence (and one
  document) per chat sample, dtype as plain text (`indexed.token_dtype`);
- ``P_chat_document_loss_mask.bin/.idx``: the same lengths, uint8: 1 on every token the model is
  trained to predict (assistant content and its end-of-turn tokens), 0 elsewhere;
- ``P_chat_document.chat.json``: what made it (tokenizer, template, counts). Its presence marks a
  prefix as a chat set.

The three are written under temporary names and published with the token index renamed last, so a
reader never finds a complete token set beside a stale or missing mask.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_llamapro.errors import UserError

CHAT_KEY = "chat"
MASK_SUFFIX = "_loss_mask"
META_SUFFIX = ".chat.json"
FORMAT_NAME = "megatron-llamapro chat"
FORMAT_VERSION = 1


class ChatDataError(UserError):
    """A chat set on disk that is missing a part or whose parts disagree."""


def chat_prefix(output_prefix: str | Path) -> str:
    """The token dataset prefix written for ``output_prefix``: ``<output_prefix>_chat_document``."""
    return f"{output_prefix}_{CHAT_KEY}_document"


def mask_prefix(prefix: str) -> str:
    return prefix + MASK_SUFFIX


def meta_path(prefix: str) -> Path:
    return Path(prefix + META_SUFFIX)


def is_chat_prefix(prefix: str) -> bool:
    return meta_path(prefix).is_file()


def chat_files(prefix: str) -> list[Path]:
    return [Path(prefix + ".bin"), Path(prefix + ".idx"), Path(mask_prefix(prefix) + ".bin"),
            Path(mask_prefix(prefix) + ".idx"), meta_path(prefix)]


@dataclass
class ChatMeta:
    tokenizer: str  # what the tokenizer was: "hf <dir>" or "sentencepiece <file>"
    template: str  # "hf chat_template" or "llama-2 [INST]"
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0  # tokens with mask 1
    extra: dict = field(default_factory=dict)  # anything else the writer wants recorded

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": self.tokenizer,
                "template": self.template, "samples": self.samples, "tokens": self.tokens,
                "target_tokens": self.target_tokens, **self.extra}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "ChatMeta":
        if data.get("format") != FORMAT_NAME:
            raise ChatDataError(f"{where}: not a {FORMAT_NAME} description (format {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ChatDataError(f"{where}: version {data.get('version')!r}; this release reads version "
                                f"{FORMAT_VERSION} (re-run tools/preprocess_data.py --chat)")
        known = {"format", "version", "tokenizer", "template", "samples", "tokens", "target_tokens"}
        try:
            return cls(str(data["tokenizer"]), str(data["template"]), int(data["samples"]),
                       int(data["tokens"]), int(data["target_tokens"]),
                       {k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError) as err:
            raise ChatDataError(f"{where}: malformed ({type(err).__name__}: {err})") from None


class ChatDatasetWriter:
    """Writes one chat set. Use as a context manager: on an exception nothing is published and the
    temporary files are removed; `publish(meta)` inside the block makes the set appear at once."""

    def __init__(self, prefix: str, token_dtype, temp_tag: str) -> None:
        self.prefix = prefix
        self._tmp = str(Path(prefix).parent / temp_tag)
        self._tokens = IndexedDatasetBuilder(self._tmp + ".bin", dtype=token_dtype)
        self._mask = IndexedDatasetBuilder(mask_prefix(self._tmp) + ".bin", dtype=numpy.uint8)
        self.samples = self.tokens = self.target_tokens = 0
        self._published = False

    def add(self, tokens, mask) -> None:
        tokens = numpy.asarray(tokens)
        mask = numpy.asarray(mask, dtype=numpy.uint8)
        if tokens.shape != mask.shape or tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError(f"a chat sample needs equal, non-empty 1-d tokens and mask "
                             f"(got {tokens.shape} and {mask.shape})")
        self._tokens.add_document(tokens, [len(tokens)])
        self._mask.add_document(mask, [len(mask)])
        self.samples += 1
        self.tokens += len(tokens)
        self.target_tokens += int(mask.sum())

    def publish(self, meta: ChatMeta) -> None:
        meta.samples, meta.tokens, meta.target_tokens = self.samples, self.tokens, self.target_tokens
        self._tokens.finalize(self._tmp + ".idx")
        self._mask.finalize(mask_prefix(self._tmp) + ".idx")
        Path(self._tmp + META_SUFFIX).write_text(json.dumps(meta.to_json(), indent=1) + "\n")
        # the token index goes last: until it appears the set does not exist for a reader
        Path(self.prefix + ".idx").unlink(missing_ok=True)
        for part in (mask_prefix(""), ""):
            os.replace(self._tmp + part + ".bin", self.prefix + part + ".bin")
            if part:
                os.replace(self._tmp + part + ".idx", self.prefix + part + ".idx")
        os.replace(self._tmp + META_SUFFIX, self.prefix + META_SUFFIX)
        os.replace(self._tmp + ".idx", self.prefix + ".idx")
        self._published = True

    def __enter__(self) -> "ChatDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def discard(self) -> None:
        """Remove the temporary files, unless the set was published."""
        if self._published:
            return
        for builder in (self._tokens, self._mask):
            with contextlib.suppress(OSError):  # flushing fails on a full disk; the file goes next
                builder.data_file.close()
        for part in ("", MASK_SUFFIX):
            for suffix in (".bin", ".idx"):
                Path(self._tmp + part + suffix).unlink(missing_ok=True)
        Path(self._tmp + META_SUFFIX).unlink(missing_ok=True)


class ChatIndexedDataset:
    """Read side: sample i as (token ids int64, target mask bool), both of the sample's length."""

    def __init__(self, prefix: str) -> None:
        from megatron_llamapro.data.blend import check_indexed_pair

        for path in chat_files(prefix):
            if not path.is_file():
                raise ChatDataError(f"chat set {prefix}: missing {path} (re-run tools/preprocess_data.py --chat)")
        where = meta_path(prefix)
        try:
            self.meta = ChatMeta.from_json(json.loads(where.read_text(encoding="utf-8")), where)
        except ValueError as err:
            if isinstance(err, UserError):
                raise
            raise ChatDataError(f"{where}: not JSON ({err})") from None
        check_indexed_pair(prefix)
        check_indexed_pair(mask_prefix(prefix))
        self.prefix = prefix
        self._tokens = IndexedDataset(prefix, mmap=True)
        self._mask = IndexedDataset(mask_prefix(prefix), mmap=True)
        if not numpy.array_equal(self._tokens.sequence_lengths, self._mask.sequence_lengths):
            raise ChatDataError(f"{mask_prefix(prefix)}.idx: sample lengths differ from {prefix}.idx "
                                "(re-run tools/preprocess_data.py --chat)")
        if len(self._tokens) != self.meta.samples:
            raise ChatDataError(f"{where}: records {self.meta.samples} samples, {prefix}.idx holds "
                                f"{len(self._tokens)}")

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def lengths(self) -> numpy.ndarray:
        return self._tokens.sequence_lengths

    def __getitem__(self, index: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        return (numpy.asarray(self._tokens[index], dtype=numpy.int64),
                numpy.asarray(self._mask[index]).astype(bool))
