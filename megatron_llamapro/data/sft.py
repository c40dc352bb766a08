"""Instruction-tuning sequences from chat sets (data/chat_indexed.py), for `--sft` training.

A chat sample of n tokens gives n - 1 positions: inputs ``tokens[:-1]``, labels ``tokens[1:]``,
loss mask ``target[1:]`` (a position is trained on when the token it predicts is an assistant
token). Samples become fixed-length sequences of ``seq_length`` positions in one of two ways:

* ``pack`` (default): samples are laid one after another (next fit, in a shuffled order), each with
  its own ``segment_ids`` value and positions restarting at 0, so that attention never crosses a
  sample boundary (block-diagonal causal attention, built by pipeline.py) and every sample sees the
  positions it would see alone;
* ``pad``: one sample per sequence.

The rest of a sequence is padding (pad id, loss mask 0, its own segment). A sample longer than
``seq_length + 1`` tokens is truncated (``truncate``, the default), skipped (``skip``) or refused
(``error``); a sample left without a target token is skipped. Every one is counted
(`SFTDataset.describe`).

The order is fixed by the seed: epoch e shuffles the sample order with (seed, e) and packs it, so
sequence i is always the same and a resumed run (MicroBatchIterator with its consumed samples)
continues exactly. Validation sets are packed once, in file order, and never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy

from megatron_llamapro.data.chat_indexed import ChatDataError, ChatIndexedDataset

PACKING_MODES = ("pack", "pad")
OVERLONG_POLICIES = ("truncate", "skip", "error")


@dataclass(frozen=True)
class SFTSettings:
    seq_length: int
    packing: str = "pack"
    overlong: str = "truncate"
    pad_id: int = 0
    seed: int = 1234


@dataclass
class SampleCounts:
    samples: int = 0  # samples in the set
    used: int = 0
    truncated: int = 0
    skipped_long: int = 0
    skipped_no_target: int = 0
    positions: int = 0  # positions of the used samples (after truncation)


class ChatSamples:
    """The samples of one split: (chat set, sample index) pairs over one or more chat sets, their
    usable lengths after the over-long policy, and the counts."""

    def __init__(self, sets: Sequence[ChatIndexedDataset], selected: Sequence[numpy.ndarray],
                 settings: SFTSettings, name: str) -> None:
        self.sets, self.settings, self.name = list(sets), settings, name
        limit = settings.seq_length + 1
        refs, lengths = [], []
        counts = SampleCounts()
        for set_index, (chat, indices) in enumerate(zip(sets, selected)):
            indices = numpy.asarray(indices, dtype=numpy.int64)
            full = numpy.asarray(chat.lengths, dtype=numpy.int64)[indices]
            counts.samples += len(indices)
            long = full > limit
            if long.any() and settings.overlong == "error":
                first = int(indices[numpy.argmax(long)])
                raise ChatDataError(
                    f"{chat.prefix}: sample {first} has {int(full[numpy.argmax(long)])} tokens, more than "
                    f"--seq-length {settings.seq_length} + 1 ({int(long.sum())} such samples); raise --seq-length "
                    "or pass --sft-overlong truncate|skip")
            keep = ~long if settings.overlong == "skip" else numpy.ones(len(indices), dtype=bool)
            counts.skipped_long += int(long.sum()) if settings.overlong == "skip" else 0
            counts.truncated += int(long.sum()) if settings.overlong == "truncate" else 0
            used = numpy.minimum(full, limit)
            # a sample truncated before its first answer has nothing left to train on
            for k in numpy.nonzero(keep & long)[0]:
                if not chat[int(indices[k])][1][1:limit].any():
                    keep[k] = False
                    counts.skipped_no_target += 1
            keep &= used >= 2
            refs.append(numpy.stack([numpy.full(int(keep.sum()), set_index), indices[keep]], axis=1))
            lengths.append(used[keep])
        self.refs = numpy.concatenate(refs) if refs else numpy.zeros((0, 2), dtype=numpy.int64)
        self.lengths = numpy.concatenate(lengths) if lengths else numpy.zeros(0, dtype=numpy.int64)
        counts.used = len(self.refs)
        counts.positions = int((self.lengths - 1).sum())
        self.counts = counts
        if counts.used == 0:
            raise ChatDataError(f"chat set(s) {', '.join(c.prefix for c in sets)}: no usable sample in the "
                                f"{name} split ({counts.samples} samples)")

    def sample(self, ref: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        set_index, index = self.refs[ref]
        tokens, target = self.sets[int(set_index)][int(index)]
        n = int(self.lengths[ref])
        return tokens[:n], target[:n]


def pack_order(positions: numpy.ndarray, order: numpy.ndarray, seq_length: int, packing: str) -> list[numpy.ndarray]:
    """Sequences as arrays of sample refs: `order` laid out next-fit (or one per sequence)."""
    if packing == "pad":
        return [order[i:i + 1] for i in range(len(order))]
    sequences, current, used = [], [], 0
    for ref in order:
        need = int(positions[ref])
        if current and used + need > seq_length:
            sequences.append(numpy.asarray(current, dtype=numpy.int64))
            current, used = [], 0
        current.append(int(ref))
        used += need
    if current:
        sequences.append(numpy.asarray(current, dtype=numpy.int64))
    return sequences


class SFTDataset:
    """Sequence i -> {tokens, labels, loss_mask, position_ids, segment_ids} of seq_length each.

    ``num_sequences``: build as many shuffled epochs as that needs (training); None: one epoch
    in file order (validation)."""

    repeats_samples = False  # an evaluation reads it up to its end (evaluation.WholeBatches), never again

    def __init__(self, samples: ChatSamples, num_sequences: int | None) -> None:
        self.samples, self.settings = samples, samples.settings
        positions = samples.lengths - 1
        seq = self.settings.seq_length
        sequences: list[numpy.ndarray] = []
        if num_sequences is None:
            sequences = pack_order(positions, numpy.arange(len(positions)), seq, self.settings.packing)
            self.epochs = 1
            self.sequences_per_epoch = len(sequences)
        else:
            epoch = 0
            while len(sequences) < num_sequences:
                rng = numpy.random.Generator(numpy.random.PCG64([self.settings.seed, epoch]))
                sequences += pack_order(positions, rng.permutation(len(positions)), seq, self.settings.packing)
                if epoch == 0:
                    self.sequences_per_epoch = len(sequences)  # the next epochs' packings differ by a few
                epoch += 1
            self.epochs = epoch
        self._starts = numpy.cumsum([0] + [len(s) for s in sequences])
        self._refs = numpy.concatenate(sequences) if sequences else numpy.zeros(0, dtype=numpy.int64)

    def __len__(self) -> int:
        return len(self._starts) - 1

    def refs(self, index: int) -> numpy.ndarray:
        return self._refs[self._starts[index]:self._starts[index + 1]]

    def __getitem__(self, index: int) -> dict[str, numpy.ndarray]:
        seq, pad = self.settings.seq_length, self.settings.pad_id
        tokens = numpy.full(seq, pad, dtype=numpy.int64)
        labels = numpy.full(seq, pad, dtype=numpy.int64)
        loss_mask = numpy.zeros(seq, dtype=numpy.float32)
        position_ids = numpy.zeros(seq, dtype=numpy.int64)
        segment_ids = numpy.zeros(seq, dtype=numpy.int64)
        at = 0
        for segment, ref in enumerate(self.refs(index)):
            ids, target = self.samples.sample(int(ref))
            n = len(ids) - 1
            tokens[at:at + n] = ids[:-1]
            labels[at:at + n] = ids[1:]
            loss_mask[at:at + n] = target[1:]
            position_ids[at:at + n] = numpy.arange(n)
            segment_ids[at:at + n] = segment
            at += n
        if at < seq:  # padding: a segment of its own, never trained on
            position_ids[at:] = numpy.arange(seq - at)
            segment_ids[at:] = segment_ids[at - 1] + 1 if at else 0
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
                "segment_ids": segment_ids}

    def describe(self) -> str:
        c, s = self.samples.counts, self.settings
        dropped = []
        if c.truncated:
            dropped.append(f"{c.truncated} truncated to {s.seq_length + 1} tokens")
        if c.skipped_long:
            dropped.append(f"{c.skipped_long} over-long skipped")
        if c.skipped_no_target:
            dropped.append(f"{c.skipped_no_target} skipped (no assistant token left after truncation)")
        fill = 100.0 * c.positions / max(1, self.sequences_per_epoch * s.seq_length)
        how = "packed" if s.packing == "pack" else "padded"
        return (f"chat set '{self.samples.name}': {c.used} of {c.samples} samples"
                f"{' (' + ', '.join(dropped) + ')' if dropped else ''}, {how} into {self.sequences_per_epoch} "
                f"sequences of {s.seq_length} per epoch ({fill:.1f}% of positions are sample tokens)")


def split_ranges(count: int, fractions: Sequence[float]) -> list[numpy.ndarray]:
    """Sample indices of the train/valid/test splits of `count` samples, contiguous, by Megatron's
    rounding of split bookends."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + fraction)
    ends = [int(round(b * count)) for b in bounds]
    return [numpy.arange(ends[i], ends[i + 1]) for i in range(len(fractions))]


def check_data_inputs(data_path: Sequence[str], valid_data, sft: bool) -> None:
    """--data-path under --sft names chat sets only (and never with weights); without --sft no
    chat set may appear; --valid-data may mix chat and text sets under --sft. Each chat set is
    opened (its parts and their agreement checked), each text set size-checked."""
    from megatron_llamapro.data.blend import DataSpecError, check_prefixes_exist, parse_data_path, parse_valid_data
    from megatron_llamapro.data.chat_indexed import is_chat_prefix

    blend = parse_data_path(data_path)
    valid = parse_valid_data(valid_data or None) or {}
    if not sft:
        for flag, prefix in [("--data-path", p) for p in blend.prefixes] + [("--valid-data", p) for p in valid.values()]:
            if is_chat_prefix(prefix):
                raise DataSpecError(f"{flag} {prefix}: a chat set (tools/preprocess_data.py --chat); train on it with --sft")
        check_prefixes_exist(blend.prefixes + list(valid.values()))
        return
    if blend.weights is not None:
        raise DataSpecError("--sft: --data-path weights are not supported for chat sets (the samples of all chat "
                            "sets are shuffled together); list the chat set prefixes without weights")
    for prefix in blend.prefixes:
        if not is_chat_prefix(prefix):
            check_prefixes_exist([prefix])  # a missing file is named first
            raise DataSpecError(f"--data-path {prefix}: not a chat set (no {prefix}.chat.json); --sft trains on "
                                "tools/preprocess_data.py --chat output (<prefix>_chat_document)")
        ChatIndexedDataset(prefix)
    for prefix in valid.values():
        if is_chat_prefix(prefix):
            ChatIndexedDataset(prefix)
        else:
            check_prefixes_exist([prefix])


def build_sft_datasets(data_path: Sequence[str], split: str, valid_data, settings: SFTSettings,
                       train_sequences: int, eval_sequences: int, tokenizer, cache_dir: str | None = None,
                       log=print):
    """(train SFTDataset, {validation name: dataset}) for --sft.

    The chat sets of --data-path are training data. Validation: the --valid-data chat sets under
    their names, else the --split valid part of the chat sets as 'chat' (then that part is held
    out of training); --valid-data text sets are GPTDatasets at --seq-length beside them."""
    from megatron_llamapro.data.blend import build_validation_sets, parse_data_path, parse_split, parse_valid_data
    from megatron_llamapro.data.chat_indexed import is_chat_prefix

    prefixes = parse_data_path(data_path).prefixes
    valid = parse_valid_data(valid_data or None) or {}
    chat_valid = {name: p for name, p in valid.items() if is_chat_prefix(p)}
    text_valid = {name: p for name, p in valid.items() if name not in chat_valid}
    sets = [ChatIndexedDataset(p) for p in prefixes]
    valid_sets: dict = {}
    if chat_valid:
        train_selected = [numpy.arange(len(s)) for s in sets]
        for name, prefix in chat_valid.items():
            chat = ChatIndexedDataset(prefix)
            valid_sets[name] = SFTDataset(ChatSamples([chat], [numpy.arange(len(chat))], settings, name), None)
    else:
        fractions = parse_split(split)
        ranges = [split_ranges(len(s), fractions) for s in sets]
        train_selected = [r[0] for r in ranges]
        if any(len(r[1]) for r in ranges):
            valid_sets["chat"] = SFTDataset(ChatSamples(sets, [r[1] for r in ranges], settings, "chat"), None)
    train = SFTDataset(ChatSamples(sets, train_selected, settings, "train"), train_sequences)
    log(train.describe() + f"; {train.epochs} epoch(s) for {train_sequences} sequences")
    for dataset in valid_sets.values():
        log(dataset.describe())
    valid_sets.update(build_validation_sets(text_valid, settings.seq_length, settings.seed, eval_sequences,
                                            tokenizer, cache_dir))
    return train, valid_sets
