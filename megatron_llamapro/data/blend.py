"""Training data as Megatron users specify it, built on megatron-core's GPT datasets.

* ``--data-path PREFIX`` or ``--data-path W1 PREFIX1 W2 PREFIX2 ...`` (weights are normalized;
  several prefixes without weights are blended in proportion to their sizes, as in Megatron-LM).
* ``--split 969,30,1``: train/valid/test fractions of every prefix, by document.
* ``--valid-data NAME=PREFIX ...``: named validation sets, each its own GPTDataset. When given,
  they are the only validation sets and ``--split`` is not used: the whole blend is training data.
  Without them the blend's valid split is the single validation set named ``"valid"``. The test
  split is held out of train/valid but never built.

``MicroBatchIterator`` hands out micro-batches the way Megatron's ``MegatronPretrainingSampler``
does, so a trainer resumes exactly from a consumed-samples count.
"""

from __future__ import annotations

import copy
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset as _MegatronBlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_llamapro.data.tokenizer import Tokenizer
from megatron_llamapro.errors import UserError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
OPTIONAL_BATCH_KEYS = ("segment_ids",)  # packed samples (data/sft.py)


class DataSpecError(UserError):
    """A data specification that cannot be used; the message is one line."""


@dataclass(frozen=True)
class DataBlend:
    prefixes: list[str]
    weights: list[float] | None  # normalized; None: blend by dataset size

    def as_megatron(self) -> tuple[list[str], list[float] | None]:
        return list(self.prefixes), None if self.weights is None else list(self.weights)


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_data_path(data_path: Sequence[str]) -> DataBlend:
    """``[PREFIX]``, ``[W1, P1, W2, P2, ...]`` or ``[P1, P2, ...]`` -> DataBlend."""
    items = [str(item).strip() for item in data_path]
    if not items or not all(items):
        raise DataSpecError(f"--data-path needs at least one prefix, got {list(data_path)}")
    weights = [_parse_float(item) for item in items[0::2]] if len(items) % 2 == 0 else [None]
    if all(w is not None for w in weights):
        prefixes = items[1::2]
        if any(_parse_float(p) is not None for p in prefixes):
            raise DataSpecError(f"--data-path expects WEIGHT PREFIX pairs, got {items}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataSpecError(f"--data-path weights must be >= 0 with a positive sum, got {weights}")
        total = sum(weights)
        normalized = [w / total for w in weights]
        # one prefix: its weight carries no information
        return DataBlend(prefixes, normalized if len(prefixes) > 1 else None)
    if any(_parse_float(item) is not None for item in items):
        raise DataSpecError(f"--data-path mixes weights and prefixes ambiguously: {items}")
    return DataBlend(items, None)


def parse_valid_data(items: Sequence[str] | Mapping[str, str] | None) -> dict[str, str] | None:
    """``["NAME=PREFIX", ...]`` (or an already-built mapping) -> {name: prefix}."""
    if items is None:
        return None
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            name, sep, prefix = str(item).partition("=")
            if not sep or not name.strip() or not prefix.strip():
                raise DataSpecError(f"--valid-data expects NAME=PREFIX, got {item!r}")
            pairs.append((name.strip(), prefix.strip()))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise DataSpecError(f"--valid-data names must be unique, got {names}")
    if not pairs:
        raise DataSpecError("--valid-data needs at least one NAME=PREFIX")
    return dict(pairs)


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalized [train, valid, test] fractions."""
    try:
        fractions = parse_and_normalize_split(split)
    except (AssertionError, ValueError, ZeroDivisionError):
        fractions = None
    if fractions is None or not all(numpy.isfinite(fractions)):
        raise DataSpecError(f"--split expects up to three non-negative numbers like 969,30,1, "
                            f"got {split!r}")
    return fractions


def check_prefixes_exist(prefixes: Sequence[str]) -> None:
    """Each prefix names a readable .bin/.idx pair whose sizes agree (a truncated or mismatched
    pair would otherwise fail deep inside a rank, steps into training)."""
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise DataSpecError(f"dataset file not found: {prefix}{suffix}")
        check_indexed_pair(prefix)


_INDEX_MAGIC = b"MMIDIDX\x00\x00"


def check_indexed_pair(prefix: str) -> None:
    """The .idx header is megatron-core's, the .idx has the size its header promises, and the
    .bin holds exactly the tokens the index points at."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    with open(idx, "rb") as stream:
        header = stream.read(34)
        if len(header) < 34 or header[:9] != _INDEX_MAGIC:
            raise DataSpecError(f"{idx}: not a megatron-core IndexedDataset index")
        code = header[17]
        count, documents = struct.unpack("<QQ", header[18:34])
        try:
            token_bytes = DType.size(DType.dtype_from_code(code))
        except (KeyError, ValueError):
            raise DataSpecError(f"{idx}: unknown token dtype code {code}") from None
        expected_idx = 34 + count * 4 + count * 8 + documents * 8
        actual_idx = os.path.getsize(idx)
        if actual_idx < expected_idx:
            raise DataSpecError(f"{idx}: truncated ({actual_idx} of {expected_idx} bytes)")
        expected_bin = 0
        if count:
            stream.seek(34 + (count - 1) * 4)
            (last_length,) = struct.unpack("<i", stream.read(4))
            stream.seek(34 + count * 4 + (count - 1) * 8)
            (last_pointer,) = struct.unpack("<q", stream.read(8))
            expected_bin = last_pointer + last_length * token_bytes
    actual_bin = os.path.getsize(bin_)
    if actual_bin != expected_bin:
        state = "truncated" if actual_bin < expected_bin else "longer than its index describes"
        raise DataSpecError(f"{bin_}: {state} ({actual_bin} bytes, {idx} describes {expected_bin}); "
                            "re-run tools/preprocess_data.py")


_blended_logger = logging.getLogger(_MegatronBlendedDataset.__module__)


def _drop_no_cache_warning(record: logging.LogRecord) -> bool:
    return "path_to_cache is None" not in record.getMessage()


def check_splits_have_tokens(prefixes: Sequence[str],
                             split_matrix: Sequence[tuple[float, float] | None]) -> None:
    """megatron-core loops forever building a GPTDataset over a split without tokens; refuse
    such a split up front. Uses the builder's own rounding of split bookends to sequences."""
    for prefix in prefixes:
        indexed = IndexedDataset(prefix)
        lengths = numpy.array(indexed.sequence_lengths)  # a copy: the mmap closes with `indexed`
        del indexed
        for split, bookends in zip(Split, split_matrix):
            if bookends is None:
                continue
            begin, end = (int(round(b * float(len(lengths)))) for b in bookends)
            if int(lengths[begin:end].sum()) == 0:
                raise DataSpecError(
                    f"the {split.name} split ({bookends[0]:.4g}-{bookends[1]:.4g}) of {prefix} has "
                    f"no tokens ({len(lengths)} sequences in all); adjust --split or add data")


class BlendedDataset(_MegatronBlendedDataset):
    """megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() on an index-cache
    miss even when torch.distributed is not initialized. Single-process misses are built without
    the cache (megatron's own code path) and then saved in megatron's cache layout. The class
    keeps megatron's name so cache files and hashes match Megatron-LM's."""

    def _cache_base(self) -> Path:
        name = f"{self.unique_description_hash}-{type(self).__name__}-{self.split.name}"
        return Path(self.config.path_to_cache) / name

    def _build_indices(self):
        if torch.distributed.is_initialized() or not self.config.path_to_cache:
            return super()._build_indices()
        base = str(self._cache_base())
        files = [f"{base}-description.txt", f"{base}-dataset_index.npy",
                 f"{base}-dataset_sample_index.npy"]
        if all(map(os.path.isfile, files)):
            return super()._build_indices()  # a cache hit never reaches get_rank()
        config = self.config
        self.config = copy.copy(config)
        self.config.path_to_cache = None
        _blended_logger.addFilter(_drop_no_cache_warning)
        try:
            dataset_index, dataset_sample_index = super()._build_indices()
        finally:
            self.config = config
            _blended_logger.removeFilter(_drop_no_cache_warning)
        os.makedirs(config.path_to_cache, exist_ok=True)
        Path(files[0]).write_text(self.unique_description)
        numpy.save(files[1], dataset_index, allow_pickle=True)
        numpy.save(files[2], dataset_sample_index, allow_pickle=True)
        return dataset_index, dataset_sample_index


class _Builder(BlendedMegatronDatasetBuilder):
    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is _MegatronBlendedDataset:
            cls = BlendedDataset
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args)


def _gpt_config(seq_length: int, seed: int, tokenizer, cache_dir: str | None,
                **blend_args) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        path_to_cache=cache_dir,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking is the attention kernel's job
        **blend_args,
    )


def build_datasets(
    data_path: Sequence[str],
    split: str,
    valid_data: Sequence[str] | Mapping[str, str] | None,
    seq_length: int,
    seed: int,
    train_samples: int,
    eval_samples: int,
    tokenizer: Tokenizer,
    cache_dir: str | None = None,
) -> tuple[torch.utils.data.Dataset, dict[str, torch.utils.data.Dataset]]:
    """(train dataset, {validation name: dataset}) from a Megatron-style data specification.

    ``data_path``: the ``--data-path`` items (a single string is split on whitespace);
    ``valid_data``: ``["NAME=PREFIX", ...]`` or ``{name: prefix}``; ``split`` is ignored when
    ``valid_data`` is given. Call on every rank, with or without torch.distributed initialized:
    with it, rank 0 builds the index cache first and the other ranks load it (megatron-core's
    behaviour). ``cache_dir`` holds the indices (megatron's default otherwise:
    ``<prefix>/cache/GPTDataset_indices``, a directory named like the prefix).

    Samples are dicts with tokens, labels, loss_mask and position_ids (int64 / float, length
    ``seq_length``); samples of a weighted blend also carry ``dataset_id``. A weighted train blend
    has exactly ``train_samples`` samples; single datasets and validation sets are built in whole
    epochs, so they may be longer than asked: consume only the samples you need.
    """
    if isinstance(data_path, str):
        data_path = data_path.split()
    blend = parse_data_path(data_path)
    valid_sets = parse_valid_data(valid_data)
    check_prefixes_exist(blend.prefixes + list((valid_sets or {}).values()))
    if train_samples <= 0:
        raise DataSpecError(f"train_samples must be positive, got {train_samples}")
    if valid_sets is None:
        fractions = parse_split(split)
        if fractions[Split.train.value] <= 0:
            raise DataSpecError(f"--split {split!r} leaves nothing for training")
        config = _gpt_config(seq_length, seed, tokenizer, cache_dir, blend=blend.as_megatron(),
                             split=split)
        config.split_matrix[Split.test.value] = None  # held out, never used here
        check_splits_have_tokens(blend.prefixes, config.split_matrix)
        sizes = [train_samples, eval_samples, 0]
        train, valid, _ = _build(config, sizes, split)
        return train, ({} if valid is None else {"valid": valid})

    return _build_named(blend, valid_sets, seq_length, seed, train_samples, eval_samples, tokenizer, cache_dir)


def build_validation_sets(valid_sets: Mapping[str, str], seq_length: int, seed: int, eval_samples: int,
                          tokenizer: Tokenizer, cache_dir: str | None = None) -> dict[str, torch.utils.data.Dataset]:
    """{name: GPTDataset} for named text validation sets alone (no training blend): what --sft
    evaluates beside its chat sets, e.g. the pretraining corpora as a forgetting monitor."""
    if not valid_sets:
        return {}
    check_prefixes_exist(list(valid_sets.values()))
    return _build_named(None, dict(valid_sets), seq_length, seed, 0, eval_samples, tokenizer, cache_dir)[1]


def _build_named(blend: DataBlend | None, valid_sets: dict[str, str], seq_length: int, seed: int,
                 train_samples: int, eval_samples: int, tokenizer: Tokenizer, cache_dir: str | None):
    """(train dataset or None, {name: validation GPTDataset}): each named set its own dataset."""
    check_splits_have_tokens((blend.prefixes if blend else []) + list(valid_sets.values()), [(0.0, 1.0)])
    config = _gpt_config(
        seq_length, seed, tokenizer, cache_dir,
        blend_per_split=[blend.as_megatron() if blend else None, (list(valid_sets.values()), None), None],
        multiple_validation_sets=True,
    )
    train, valid, _ = _build(config, [train_samples, eval_samples, 0], split=None)
    valid_list = valid if isinstance(valid, list) else [valid]
    return train, dict(zip(valid_sets, valid_list))


def _build(config: GPTDatasetConfig, sizes: list[int | None], split: str | None):
    try:
        return _Builder(GPTDataset, sizes, lambda: True, config).build()
    except (AssertionError, IndexError, ValueError) as err:
        # megatron-core signals too little data with bare asserts deep in index building
        where = f" with --split {split}" if split else ""
        raise DataSpecError(f"cannot build datasets{where}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'too few documents?'}") from err


def distinct_samples(dataset) -> int:
    """How many different samples a dataset of build_datasets holds. A GPTDataset is built in
    whole epochs over its documents, so past one epoch's sequences (its tokens, less megatron's
    extra label token, cut into --seq-length samples) the same tokens come again; a blend holds
    at most the sum of its datasets'; anything else, its length."""
    if isinstance(dataset, GPTDataset):
        config = dataset.config
        tokens = int(numpy.sum(dataset.dataset.sequence_lengths[dataset.indices]))
        usable = max(0, tokens - int(config.add_extra_token_to_sequence))
        if dataset.index_split == Split.valid and not config.drop_last_partial_validation_sequence:
            count = -(-usable // config.sequence_length)
        else:
            count = usable // config.sequence_length
        return min(len(dataset), count)
    if isinstance(dataset, _MegatronBlendedDataset):
        return min(len(dataset), sum(distinct_samples(part) for part in dataset.datasets))
    return len(dataset)


class MicroBatchIterator:
    """Micro-batches for one data-parallel rank, as Megatron's MegatronPretrainingSampler.

    Samples are consumed in global order from ``consumed_samples``; each step takes the next
    ``micro_batch_size * dp_size`` samples and rank r gets slice ``[r*mbs, (r+1)*mbs)``. So the
    samples of a global batch do not depend on how it is split across ranks, and resuming from a
    checkpointed ``consumed_samples`` reproduces the uninterrupted stream. A final partial step is
    dropped. ``consumed_samples`` advances by ``micro_batch_size * dp_size`` per batch.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0) -> None:
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad micro_batch_size={micro_batch_size} dp_rank={dp_rank} "
                             f"dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __len__(self) -> int:
        """Micro-batches left."""
        step = self.micro_batch_size * self.dp_size
        return max(0, (len(self.dataset) - self.consumed_samples) // step)

    def sample_indices(self) -> range:
        """Dataset indices of this rank's next micro-batch."""
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def __next__(self) -> dict[str, torch.Tensor | None]:
        if len(self) == 0:
            raise StopIteration
        samples = [self.dataset[i] for i in self.sample_indices()]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        keys = BATCH_KEYS + tuple(key for key in OPTIONAL_BATCH_KEYS if key in samples[0])
        batch: dict[str, torch.Tensor | None] = {
            key: torch.stack([torch.as_tensor(sample[key]) for sample in samples])
            for key in keys
        }
        batch["attention_mask"] = None
        return batch
