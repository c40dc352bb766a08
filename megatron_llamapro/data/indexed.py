"""JSONL -> megatron-core IndexedDataset (``<prefix>_<key>_document.bin/.idx``).

Each JSON line is one document stored as one sequence, as Megatron-LM's
``tools/preprocess_data.py`` does without sentence splitting (an empty text becomes a document
with no sequences). Tokens are uint16 when the vocabulary is below 65500 ids, else int32
(megatron-core's ``DType.optimal_dtype``).

With ``chat`` each line is a chat sample (data/chat.py) written as a chat set
(data/chat_indexed.py: tokens, a target mask, a description) under ``<prefix>_chat_document``.

Input handling: ``.gz`` files are read transparently, whitespace-only lines are ignored, a line
that is not a JSON object holding a string under ``json_key`` raises ``BadInputError`` naming the
file and line (or is counted and skipped with ``skip_bad_lines``). Outputs are written under
temporary names in the output directory and renamed only once complete.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_llamapro.data import chat as chat_lines
from megatron_llamapro.data.chat_indexed import ChatDatasetWriter, ChatMeta, chat_prefix
from megatron_llamapro.data.tokenizer import Tokenizer, build_tokenizer
from megatron_llamapro.errors import UserError
from megatron_llamapro.fsutil import remove_stale_temporaries, temp_name, write_failure

LINES_PER_TASK = 256
PROGRESS_INTERVAL_S = 2.0


class BadInputError(UserError):
    """Unusable input or output paths; the message is a single line meant for the user."""


@dataclass
class PreprocessConfig:
    inputs: list[str | Path]
    output_prefix: str | Path
    tokenizer_type: str
    tokenizer_model: str | Path
    json_key: str = "text"
    workers: int = 1
    append_eod: bool = False
    skip_bad_lines: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal
    chat: bool = False  # chat samples -> a chat set (tokens + target mask)
    chat_template: str = "auto"  # auto | hf | llama2 (data/chat.py)

    def output_dataset_prefix(self) -> str:
        return chat_prefix(self.output_prefix) if self.chat else document_prefix(self.output_prefix, self.json_key)


@dataclass
class PreprocessStats:
    output_prefix: str
    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    target_tokens: int = 0  # chat: tokens trained on
    chat_template: str | None = None  # chat: the format used, in words

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.chat_template is not None:
            share = 100.0 * self.target_tokens / max(self.tokens, 1)
            return (f"{self.documents} chat samples, {self.tokens} tokens ({self.target_tokens} assistant tokens "
                    f"trained on, {share:.1f}%), chat template: {self.chat_template}, {self.bad_lines} bad lines "
                    f"skipped, {self.seconds:.2f} s, {self.tokens_per_second:.0f} tokens/s -> "
                    f"{self.output_prefix}.bin/.idx (+ _loss_mask, .chat.json)")
        empty = f", {self.empty_documents} empty" if self.empty_documents else ""
        return (f"{self.documents} docs{empty}, {self.tokens} tokens, {self.bad_lines} bad lines "
                f"skipped, {self.seconds:.2f} s, {self.tokens_per_second:.0f} tokens/s "
                f"-> {self.output_prefix}.bin/.idx")


def document_prefix(output_prefix: str | Path, json_key: str) -> str:
    """The IndexedDataset prefix written for ``json_key``: ``<output_prefix>_<key>_document``."""
    return f"{output_prefix}_{json_key}_document"


def token_dtype(vocab_size: int) -> type[numpy.number]:
    return DType.optimal_dtype(vocab_size)


# --- reading -------------------------------------------------------------------------------

@dataclass
class _Task:
    file_index: int
    first_line: int  # 1-based number of lines[0]
    lines: list[bytes]


def _open_input(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_tasks(paths: list[Path], byte_counter: list[int]) -> Iterator[_Task]:
    for file_index, path in enumerate(paths):
        try:
            with _open_input(path) as stream:
                batch: list[bytes] = []
                first = 1
                for number, line in enumerate(stream, start=1):
                    byte_counter[0] += len(line)
                    batch.append(line)
                    if len(batch) == LINES_PER_TASK:
                        yield _Task(file_index, first, batch)
                        batch, first = [], number + 1
                if batch:
                    yield _Task(file_index, first, batch)
        except (OSError, EOFError) as err:  # unreadable or corrupt gzip
            raise BadInputError(f"{path}: cannot read: {err}") from None


# --- encoding (runs in worker processes) ---------------------------------------------------

@dataclass
class _Encoded:
    file_index: int
    tokens: numpy.ndarray  # all documents of the task, concatenated
    lengths: list[int]  # tokens per document
    errors: list[tuple[int, str]]  # (line number, reason), in line order
    masks: numpy.ndarray | None = None  # chat: the target mask of `tokens`


_worker_state: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, json_key: str, append_eod: bool,
                 chat_format: str | None = None) -> None:
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    _worker_state.update(tokenizer=tokenizer, json_key=json_key, append_eod=append_eod,
                         dtype=token_dtype(tokenizer.vocab_size),
                         chat=None if chat_format is None
                         else chat_lines.build_chat_format(chat_format, tokenizer, tokenizer_model))


def _init_pool_worker(*args) -> None:
    # The parent handles Ctrl-C / SIGTERM (and terminates the pool): a worker that gets the
    # terminal's or Slurm's signal too dies quietly instead of printing a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _init_worker(*args)


def _extract_text(line: bytes, json_key: str) -> str:
    try:
        record = json.loads(line.decode("utf-8").rstrip("\r\n"))
    except UnicodeDecodeError as err:
        raise ValueError(f"malformed JSON: not valid UTF-8 (byte {err.start + 1})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if json_key not in record:
        raise ValueError(f"missing key {json_key!r}")
    text = record[json_key]
    if not isinstance(text, str):
        raise ValueError(f"key {json_key!r} is {type(text).__name__}, not a string")
    return text


def _encode_chat_task(task: _Task, chat_format) -> _Encoded:
    tokens, masks, lengths, errors = [], [], [], []
    for offset, line in enumerate(task.lines):
        if not line.strip():
            continue
        try:
            ids, mask = chat_format.encode(chat_lines.parse_chat_line(line))
        except UnicodeDecodeError as err:
            errors.append((task.first_line + offset, f"malformed JSON: not valid UTF-8 (byte {err.start + 1})"))
            continue
        except ValueError as err:
            errors.append((task.first_line + offset, str(err)))
            continue
        if not any(mask):
            errors.append((task.first_line + offset, "the assistant turns encode to no tokens"))
            continue
        tokens += ids
        masks += mask
        lengths.append(len(ids))
    return _Encoded(task.file_index, numpy.asarray(tokens, dtype=_worker_state["dtype"]), lengths, errors,
                    numpy.asarray(masks, dtype=numpy.uint8))


def _encode_task(task: _Task) -> _Encoded:
    if _worker_state["chat"] is not None:
        return _encode_chat_task(task, _worker_state["chat"])
    tokenizer: Tokenizer = _worker_state["tokenizer"]
    texts, errors = [], []
    for offset, line in enumerate(task.lines):
        if not line.strip():
            continue
        try:
            texts.append(_extract_text(line, _worker_state["json_key"]))
        except ValueError as err:
            errors.append((task.first_line + offset, str(err)))
    token_lists = tokenizer.tokenize_batch(texts)
    if _worker_state["append_eod"]:
        # as Megatron-LM: an empty document stays empty, no lone EOD
        token_lists = [ids + [tokenizer.eod] if ids else ids for ids in token_lists]
    lengths = [len(ids) for ids in token_lists]
    flat = [token for ids in token_lists for token in ids]
    return _Encoded(task.file_index, numpy.asarray(flat, dtype=_worker_state["dtype"]), lengths,
                    errors)


# --- writing -------------------------------------------------------------------------------

def _check_paths(config: PreprocessConfig) -> tuple[list[Path], str]:
    if not config.inputs:
        raise BadInputError("no input files given")
    inputs = [Path(p) for p in config.inputs]
    for path in inputs:
        if not path.is_file():
            raise BadInputError(f"input file not found: {path}")
    if config.workers < 1:
        raise BadInputError(f"workers must be >= 1, got {config.workers}")
    prefix = config.output_dataset_prefix()
    if not config.overwrite:
        for suffix in (".bin", ".idx"):
            if Path(prefix + suffix).exists():
                raise BadInputError(f"output exists: {prefix}{suffix} (use --overwrite to replace it)")
    if config.chat and config.append_eod:
        raise BadInputError("--append-eod: chat samples end with the template's end-of-turn tokens; drop the flag")
    return inputs, prefix


def _publish(tmp_prefix: str, prefix: str) -> None:
    # Drop the old index first: a crash between the renames leaves a .bin without .idx,
    # which megatron-core refuses to open, never a new .bin paired with a stale .idx.
    Path(prefix + ".idx").unlink(missing_ok=True)
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")


class _Progress:
    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.start = self.last = time.perf_counter()

    def update(self, stats: PreprocessStats, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < PROGRESS_INTERVAL_S):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        self.stream.write(f"\r{stats.documents} docs, {stats.documents / elapsed:.0f} docs/s, "
                          f"{stats.input_bytes / elapsed / 1e6:.2f} MB/s, "
                          f"{stats.tokens / elapsed:.0f} tokens/s")
        if force:
            self.stream.write("\n")
        self.stream.flush()


def _ordered_parallel(pool, tasks: Iterator[_Task], window: int) -> Iterator[_Encoded]:
    """Results in task order with at most ``window`` tasks in flight. (Pool.imap would read
    the whole input into its queue ahead of the workers.)"""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode_task, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _make_pool(config: PreprocessConfig, init_args: tuple):
    methods = multiprocessing.get_all_start_methods()
    # fork: workers start at once instead of re-importing torch and megatron-core
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return context.Pool(config.workers, initializer=_init_pool_worker, initargs=init_args)


class _TextSink:
    """Plain documents into one IndexedDataset."""

    def __init__(self, tmp_prefix: str, dtype) -> None:
        self.tmp_prefix = tmp_prefix
        self.builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)

    def add(self, encoded: _Encoded, stats: PreprocessStats) -> None:
        _add_documents(self.builder, encoded, stats)

    def publish(self, prefix: str) -> None:
        self.builder.finalize(self.tmp_prefix + ".idx")
        _publish(self.tmp_prefix, prefix)

    def discard(self) -> None:
        # the file is deleted next; closing flushes its buffer, which fails on a full disk
        with contextlib.suppress(OSError):
            self.builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(self.tmp_prefix + suffix).unlink(missing_ok=True)


class _ChatSink:
    """Chat samples into a chat set (tokens, target mask, description)."""

    def __init__(self, prefix: str, temp_tag: str, dtype, meta: ChatMeta) -> None:
        self.writer = ChatDatasetWriter(prefix, dtype, temp_tag)
        self.meta = meta

    def add(self, encoded: _Encoded, stats: PreprocessStats) -> None:
        start = 0
        for length in encoded.lengths:
            self.writer.add(encoded.tokens[start:start + length], encoded.masks[start:start + length])
            start += length
        stats.documents, stats.tokens = self.writer.samples, self.writer.tokens
        stats.target_tokens = self.writer.target_tokens

    def publish(self, prefix: str) -> None:
        self.writer.publish(self.meta)

    def discard(self) -> None:
        self.writer.discard()


def preprocess(config: PreprocessConfig) -> PreprocessStats:
    """Tokenize JSONL inputs into ``config.output_dataset_prefix()`` (.bin/.idx, and for chat sets
    the target mask and description)."""
    inputs, prefix = _check_paths(config)
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    chat_format = described = None
    if config.chat:
        chat_format = chat_lines.resolve_chat_format(config.chat_template, config.tokenizer_type,
                                                     config.tokenizer_model)
        # built here once so that a tokenizer without a usable template fails before any work
        described = chat_lines.build_chat_format(chat_format, tokenizer, config.tokenizer_model).description
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(Path(prefix))
    temp_tag = temp_name(Path(prefix)) + "partial"
    tmp_prefix = str(Path(prefix).parent / temp_tag)
    stats = PreprocessStats(output_prefix=prefix)
    progress = _Progress(sys.stderr.isatty() if config.progress is None else config.progress)
    byte_counter = [0]
    start = time.perf_counter()
    pool = sink = None
    init_args = (config.tokenizer_type, str(config.tokenizer_model), config.json_key, config.append_eod,
                 chat_format)
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        if chat_format is None:
            sink = _TextSink(tmp_prefix, dtype)
        else:
            stats.chat_template = described
            sink = _ChatSink(prefix, temp_tag, dtype, ChatMeta(
                tokenizer=f"{config.tokenizer_type} {config.tokenizer_model}", template=described,
                extra={"chat_format": chat_format, "inputs": [str(p) for p in inputs]}))
        tasks = _read_tasks(inputs, byte_counter)
        if config.workers == 1:
            _init_worker(*init_args)
            encoded_tasks = map(_encode_task, tasks)
        else:
            pool = _make_pool(config, init_args)
            encoded_tasks = _ordered_parallel(pool, tasks, window=4 * config.workers)
        for encoded in encoded_tasks:
            _account_errors(encoded, inputs, config, stats)
            sink.add(encoded, stats)
            stats.input_bytes = byte_counter[0]
            progress.update(stats)
        if stats.documents == 0 or stats.tokens == 0:
            what = ("chat samples" if config.chat else "documents") if stats.documents == 0 else "tokens"
            raise BadInputError(f"no {what} in input: {', '.join(map(str, inputs))}")
        sink.publish(prefix)
    except BaseException as exc:
        if pool is not None:
            pool.terminate()
        if sink is not None:
            sink.discard()
        failure = write_failure(exc, Path(prefix + ".bin"), "--output-prefix")
        if failure is not None:
            raise failure from exc
        raise
    if pool is not None:
        pool.close()
        pool.join()
    stats.seconds = time.perf_counter() - start
    progress.update(stats, force=True)
    return stats


def _account_errors(encoded: _Encoded, inputs: list[Path], config: PreprocessConfig,
                    stats: PreprocessStats) -> None:
    if encoded.errors and not config.skip_bad_lines:
        line, reason = encoded.errors[0]
        raise BadInputError(f"{inputs[encoded.file_index]}:{line}: {reason}")
    stats.bad_lines += len(encoded.errors)


def _add_documents(builder: IndexedDatasetBuilder, encoded: _Encoded, stats: PreprocessStats) -> None:
    start = 0
    for length in encoded.lengths:
        builder.add_document(encoded.tokens[start:start + length], [length] if length else [])
        start += length
        stats.empty_documents += length == 0
    stats.documents += len(encoded.lengths)
    stats.tokens += start
