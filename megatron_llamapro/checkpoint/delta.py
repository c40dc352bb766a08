"""Trainable-only deltas: a training checkpoint that holds only the trained parameters.

Written by the trainer with --save-trainable-only: per model-parallel rank, the trainable
parameters by canonical name in `iter_N/delta/mp_rank_XX_YYY.pt` (beside the optimizer state,
torch_dist); `iter_N/trainer_state.json` records `trainable_only` and the base checkpoint the run
started from. `DeltaSource` reads base + delta as one checkpoint; `merge_delta` writes that as a
complete checkpoint (tools/merge_delta.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.integrity import STATE_FILE, folder_problem
from megatron_llamapro.checkpoint.layout import Layout, StagePlacement, merge_tp, shard_of
from megatron_llamapro.checkpoint.manifest import Manifest
from megatron_llamapro.checkpoint.source import CheckpointError, TensorSource
from megatron_llamapro.checkpoint.tracker import TRACKER, iteration_name, parse_iteration_dir, read_tracker
from megatron_llamapro.errors import UserError

DELTA_DIR = "delta"


# ---- writing (one file per model-parallel rank, from inside the training job) -------------------

def trainable_tensors(chunks: list[torch.nn.Module], manifest: Manifest) -> dict[str, torch.Tensor]:
    """Trainable parameters of this rank, keyed by canonical (global, TE-spec) names."""
    from megatron.core import parallel_state as ps

    layout = Layout(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                    ps.get_virtual_pipeline_model_parallel_world_size())
    placement = StagePlacement(manifest.arch.num_layers, layout)
    stage = ps.get_pipeline_model_parallel_rank()
    out = {}
    for chunk_index, chunk in enumerate(chunks):
        module = chunk.module if hasattr(chunk, "module") else chunk
        for name, param in module.named_parameters():
            if param.requires_grad:
                out[placement.global_name(weight_map.te_spec_name(name), stage, chunk_index)] = param.detach().cpu().clone()
    return out


def write_delta_file(iteration_dir: Path, chunks: list[torch.nn.Module], manifest: Manifest) -> None:
    """This rank's trainable tensors into iteration_dir/delta/ (data-parallel rank 0 writes)."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    layout = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}
    path = Path(iteration_dir) / DELTA_DIR / f"mp_rank_{tp:02d}_{pp:03d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tensors": trainable_tensors(chunks, manifest), "layout": layout}, path)


# ---- reading --------------------------------------------------------------------------------------

class DeltaSource(TensorSource):
    """A base checkpoint with a trainable-only delta applied on top."""

    def __init__(self, base: TensorSource, delta_iteration_dir: Path):
        self.base = base
        self.path = base.path
        self.manifest = base.manifest
        self.delta_dir = Path(delta_iteration_dir) / DELTA_DIR
        files = sorted(self.delta_dir.glob("mp_rank_*.pt"))
        if not files:
            raise CheckpointError(f"{self.delta_dir}: no delta files (not a trainable-only checkpoint)")
        shards: dict[str, dict[int, torch.Tensor]] = {}
        tp = 1
        for file in files:
            try:
                data = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:  # damaged zip archives raise several kinds
                raise CheckpointError(f"{file}: unreadable delta file ({type(exc).__name__})") from None
            tp = int(data["layout"]["tp"])
            tp_rank = int(file.name.split("_")[2])
            for name, tensor in data["tensors"].items():
                shards.setdefault(name, {})[tp_rank] = tensor
        self.delta = {}
        for name, by_rank in shards.items():
            if len(by_rank) != tp:
                raise CheckpointError(f"{self.delta_dir}: tensor {name} lacks TP shards ({sorted(by_rank)} of {tp})")
            self.delta[name] = merge_tp([by_rank[r] for r in range(tp)], weight_map.split_rule(name))

    def full(self, name: str) -> torch.Tensor:
        if name in self.delta:
            return self.delta[name]
        return self.base.full(name)

    def get(self, name, tp_rank=0, tp=1, padded_vocab=None):
        name = self.resolve(name)
        if name in self.delta:
            return shard_of(self.delta[name], name, tp_rank, tp, padded_vocab)
        return self.base.get(name, tp_rank, tp, padded_vocab)

    def tokenizer_dir(self):
        return self.base.tokenizer_dir()

    def close(self):
        self.base.close()


def open_delta_source(base: str, delta_iteration: str) -> DeltaSource:
    """Base checkpoint + delta as one source; module-level so functools.partial of it pickles
    (write_checkpoint calls it once per worker)."""
    from megatron_llamapro.checkpoint.open import open_checkpoint

    source = open_checkpoint(Path(base))
    try:
        return DeltaSource(source, Path(delta_iteration))
    except BaseException:
        source.close()
        raise


def _iteration_problem(it_dir: Path) -> str | None:
    """None if a saved iteration folder is complete and its files are as saved (sizes, checksums)."""
    state_file = it_dir / STATE_FILE
    if not state_file.is_file():
        return f"{state_file}: missing (incomplete checkpoint)"
    try:
        record = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return f"{state_file}: not valid JSON"
    if record.get("format", "torch_dist") == "torch_dist" and not (it_dir / "metadata.json").is_file():
        return f"{it_dir / 'metadata.json'}: missing (incomplete torch_dist checkpoint)"
    return folder_problem(it_dir)


def delta_iteration_dir(save_dir: Path, iteration: int | None = None) -> Path:
    """The iter_N folder of a trainable-only checkpoint under save_dir (the tracker's by default),
    checked complete; CheckpointError naming the file otherwise."""
    save_dir = Path(save_dir)
    if iteration is None:
        try:
            iteration = read_tracker(save_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise CheckpointError(str(exc)) from None
    it_dir = save_dir / iteration_name(iteration)
    if not it_dir.is_dir():
        raise CheckpointError(f"{it_dir}: missing")
    problem = _iteration_problem(it_dir)
    if problem:
        raise CheckpointError(problem)
    record = json.loads((it_dir / STATE_FILE).read_text())
    if not record.get("trainable_only"):
        raise CheckpointError(f"{it_dir / STATE_FILE}: a full checkpoint, not a trainable-only delta "
                              "(it loads on its own: no merge needed)")
    return it_dir


# ---- merging ---------------------------------------------------------------------------------------

def split_delta_path(delta: Path, iteration: int | None) -> tuple[Path, int | None]:
    """(the run's --save root, iteration) for --delta given as the root or as one of its iter_N folders."""
    delta = Path(delta)
    named = parse_iteration_dir(delta.name)
    if isinstance(named, int) and not (delta / TRACKER).exists():
        if iteration is not None and named != iteration:
            raise UserError(f"--iteration {iteration} contradicts --delta {delta}")
        return delta.parent, named
    return delta, iteration


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def merge_delta(base: Path, save_dir: Path, iteration: int | None, out: Path, fmt: str | None = None,
                layout: Layout = Layout(), overwrite: bool = False,
                warn: Callable[[str], None] = _warn) -> dict:
    """Write base + the trainable-only delta saved under save_dir (at `iteration`, the tracker's by
    default) to `out` as a complete checkpoint, atomically: model weights only, in the base's format
    unless `fmt` says otherwise (`layout` applies to the torch format). The base should be the
    checkpoint the run started from: another path is merged after a warning, another model is
    refused. Returns write_checkpoint's summary plus the iteration folder, iteration and the
    number of trained tensors."""
    import functools

    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.open import sniff_format

    base, save_dir = Path(base), Path(save_dir)
    it_dir = delta_iteration_dir(save_dir, iteration)
    record = json.loads((it_dir / STATE_FILE).read_text())
    recorded = record.get("base_checkpoint")
    if recorded and Path(recorded).resolve() != base.resolve():
        warn(f"warning: {it_dir} was trained from {recorded}, merging into {base}")
    delta_manifest = Manifest.read(save_dir)
    fmt = fmt or sniff_format(base)
    make_source = functools.partial(open_delta_source, str(base.resolve()), str(it_dir.resolve()))
    with make_source() as source:
        if delta_manifest is not None and delta_manifest.arch != source.manifest.arch:
            raise CheckpointError(f"--base {base}: a different model from the one {save_dir} was trained "
                                  f"on ({delta_manifest.arch.num_layers} vs {source.arch.num_layers} layers ...)")
        trained = len(source.delta)
    summary = write_checkpoint(make_source, out, fmt, layout if fmt == "torch" else Layout(), overwrite=overwrite)
    return summary | {"iteration_dir": it_dir, "iteration": record["iteration"], "trained_tensors": trained}
